//! `mobileone bench`: median forward latency of a random-weight MobileOne classifier on CPU.
//!
//! Random weights are enough for timing (the kernels do not depend on values), so no checkpoint is
//! needed; weights are scaled like Kaiming initialisation so activations stay finite.

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use mobileone::{MobileOne, MobileOneConfig, Variant};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Model variant: s0, s1, s2, s3 or s4.
    #[arg(long, default_value = "s0")]
    pub variant: Variant,
    /// Input height and width in pixels.
    #[arg(long, default_value_t = 224)]
    pub size: usize,
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
    /// Time the reparameterised (inference) form instead of the multi-branch train-time form.
    #[arg(long)]
    pub fused: bool,
    /// Print only `{"median_ms": …}` on standard output.
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

pub fn run(args: &BenchArgs) -> Result<()> {
    mobileone::ops::set_threads(args.threads.unwrap_or(0)).context("setting the thread count")?;
    anyhow::ensure!(args.iters > 0, "--iters must be at least 1");
    anyhow::ensure!(
        args.batch > 0 && args.size >= 32,
        "--batch must be ≥ 1 and --size ≥ 32"
    );
    let device = Device::Cpu;
    let config = MobileOneConfig::from_variant(args.variant);
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, device.clone());
    let model = if args.fused {
        MobileOne::new_fused(&config, 32, vb)?
    } else {
        MobileOne::new(&config, 32, vb)?
    };
    let input = Tensor::randn(0f32, 1.0, (args.batch, 3, args.size, args.size), &device)?;
    let forward = || -> Result<Tensor> {
        mobileone::ops::run_in_pool(|| {
            let features = model.forward_features(&input, false)?;
            let last = features.last().context("no features")?;
            Ok(model.forward_head(last)?.unwrap_or_else(|| last.clone()))
        })
    };
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
        println!("{}", serde_json::json!({ "median_ms": median }));
    } else {
        let what = format!(
            "mobileone {} ({}), batch {}",
            args.variant,
            if args.fused {
                "fused"
            } else {
                "train-time branches"
            },
            args.batch
        );
        println!(
            "{}",
            bench_line(&what, (args.size, args.size), &mut times_ms)
        );
    }
    Ok(())
}

/// The one `--bench` line of every tool: what ran, at which input size, on how many threads, and the
/// median / mean / min / max of the runs in milliseconds.
pub fn bench_line(what: &str, (width, height): (usize, usize), times_ms: &mut [f64]) -> String {
    times_ms.sort_by(f64::total_cmp);
    let n = times_ms.len().max(1);
    let mean = times_ms.iter().sum::<f64>() / n as f64;
    format!(
        "bench {what}, {width}x{height}, {} threads: median {:.2} ms, mean {:.2}, min {:.2}, max {:.2} ({} runs)",
        mobileone::ops::current_threads(),
        times_ms.get(times_ms.len() / 2).copied().unwrap_or(f64::NAN),
        mean,
        times_ms.first().copied().unwrap_or(f64::NAN),
        times_ms.last().copied().unwrap_or(f64::NAN),
        times_ms.len()
    )
}
