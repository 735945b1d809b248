//! `mobileone bench`: median forward latency on CPU of a random-weight MobileOne classifier, or of the
//! whole SSDLite or DeepLabV3 network on a MobileOne trunk.
//!
//! Random weights are enough for timing (the kernels do not depend on values), so no checkpoint is
//! needed; weights are scaled like Kaiming initialisation so activations stay finite.

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use mobileone::{MobileOne, MobileOneConfig, Variant};

/// Which network `mobileone bench` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchModel {
    /// The ImageNet classifier (trunk + pooled linear head, 1000 classes).
    Classifier,
    /// SSDLite on the trunk: trunk, extra blocks and the box and class heads (91 classes, as
    /// torchvision's COCO detectors), without default boxes, decoding and NMS.
    Ssdlite,
    /// DeepLabV3 on the trunk: output stride 16, 256-wide ASPP with rates 12/24/36, 21 classes, the
    /// logits resized to the input.
    Deeplabv3,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Model variant: s0, s1, s2, s3 or s4.
    #[arg(long, default_value = "s0")]
    pub variant: Variant,
    /// Network to time.
    #[arg(long, value_enum, default_value = "classifier")]
    pub model: BenchModel,
    /// Input height and width in pixels [default: 224 classifier, 320 ssdlite, 512 deeplabv3].
    #[arg(long)]
    pub size: Option<usize>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Worker threads (default: RAYON_NUM_THREADS, else one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Timed forward passes; the median is reported.
    #[arg(long, default_value_t = 50)]
    pub iters: usize,
    /// Untimed forward passes first (buffers, caches, thread start-up).
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Time the reparameterised (inference) form instead of the multi-branch train-time form (for the
    /// heads: BatchNorms folded).
    #[arg(long)]
    pub fused: bool,
    /// Print only `{"median_ms": …, "simd": …}` on standard output.
    #[arg(long)]
    pub json: bool,
}

/// Serves any requested tensor as random values, scaled by its role.
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = shape.dims();
        let t = if name.ends_with("running_var") || (dims.len() == 1 && name.ends_with("weight")) {
            // BatchNorm variance and scale: positive, around 1.
            Tensor::rand(0.5f32, 1.5, shape, dev)?
        } else if dims.len() >= 2 {
            let fan_in = dims[1..].iter().product::<usize>() as f64;
            (Tensor::randn(0f32, 1.0, shape, dev)? * (2.0 / fan_in).sqrt())?
        } else {
            (Tensor::randn(0f32, 1.0, shape, dev)? * 0.1)?
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for `{name}`")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// One forward pass of the timed network.
type Network = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

pub fn run(args: &BenchArgs) -> Result<()> {
    mobileone::ops::set_threads(args.threads.unwrap_or(0)).context("setting the thread count")?;
    let size = args.size.unwrap_or(match args.model {
        BenchModel::Classifier => 224,
        BenchModel::Ssdlite => 320,
        BenchModel::Deeplabv3 => 512,
    });
    anyhow::ensure!(args.iters > 0, "--iters must be at least 1");
    anyhow::ensure!(
        args.batch > 0 && size >= 32,
        "--batch must be ≥ 1 and --size ≥ 32"
    );
    let device = Device::Cpu;
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, device.clone());
    let form = mobileone::Form {
        trunk_fused: args.fused,
        heads_fused: args.fused,
    };
    let network: Network = match args.model {
        BenchModel::Classifier => {
            let config = MobileOneConfig::from_variant(args.variant);
            let model = if args.fused {
                MobileOne::new_fused(&config, 32, vb)?
            } else {
                MobileOne::new(&config, 32, vb)?
            };
            Box::new(move |x| {
                let features = model.forward_features_at(x, false, &[4])?;
                let last = features.last().expect("the stride-32 feature map");
                Ok(model.forward_head(last)?.unwrap_or_else(|| last.clone()))
            })
        }
        BenchModel::Ssdlite => {
            let config = ssdlite::SsdLiteConfig::new(args.variant, 91);
            let model = ssdlite::SsdDetector::new(&config, form, vb)?;
            Box::new(move |x| model.head_outputs(x, false).map(|o| o.cls_logits))
        }
        BenchModel::Deeplabv3 => {
            let config = deeplabv3::DeepLabConfig::new(args.variant, 21, 16);
            let model = deeplabv3::DeepLabV3::with_form(&config, form, vb)?;
            Box::new(move |x| model.forward_t(x, false).map(|o| o.logits))
        }
    };
    let input = Tensor::randn(0f32, 1.0, (args.batch, 3, size, size), &device)?;
    let forward = || -> Result<Tensor> { Ok(mobileone::ops::run_in_pool(|| network(&input))?) };
    for _ in 0..args.warmup {
        forward()?;
    }
    let mut times_ms = Vec::with_capacity(args.iters);
    for _ in 0..args.iters {
        let start = Instant::now();
        forward()?;
        times_ms.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times_ms.sort_by(f64::total_cmp);
    let median = times_ms[times_ms.len() / 2];
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "median_ms": median,
                "simd": mobileone::ops::simd::simd_level().to_string(),
            })
        );
    } else {
        let model = match args.model {
            BenchModel::Classifier => "mobileone",
            BenchModel::Ssdlite => "ssdlite on mobileone",
            BenchModel::Deeplabv3 => "deeplabv3 on mobileone",
        };
        let what = format!(
            "{model} {} ({}), batch {}",
            args.variant,
            if args.fused {
                "fused"
            } else {
                "train-time branches"
            },
            args.batch
        );
        println!("{}", bench_line(&what, (size, size), &mut times_ms));
    }
    Ok(())
}

/// The one `--bench` line of every tool: what ran, at which input size, on how many threads and which
/// SIMD level of the native kernels, and the median / mean / min / max of the runs in milliseconds.
pub fn bench_line(what: &str, (width, height): (usize, usize), times_ms: &mut [f64]) -> String {
    times_ms.sort_by(f64::total_cmp);
    let n = times_ms.len().max(1);
    let mean = times_ms.iter().sum::<f64>() / n as f64;
    format!(
        "bench {what}, {width}x{height}, {} threads, {}: median {:.2} ms, mean {:.2}, min {:.2}, max {:.2} ({} run{})",
        mobileone::ops::current_threads(),
        mobileone::ops::simd::simd_level(),
        times_ms.get(times_ms.len() / 2).copied().unwrap_or(f64::NAN),
        mean,
        times_ms.first().copied().unwrap_or(f64::NAN),
        times_ms.last().copied().unwrap_or(f64::NAN),
        times_ms.len(),
        if times_ms.len() == 1 { "" } else { "s" }
    )
}
