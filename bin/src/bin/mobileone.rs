//! `mobileone`: run, fuse, classify with and benchmark the MobileOne backbone.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};
use image::imageops::FilterType;
use mobileone::checkpoint::{self, load_mobileone, Checkpoint};
use mobileone::{MobileOne, MobileOneConfig, Variant};
use mobileone_cli::{bench, imageio, npy};
use mobileone_train::trainer::TRAIN_STATE_KEY;

#[derive(Parser)]
#[command(
    name = "mobileone",
    version,
    about = "MobileOne backbone: features, reparameterisation, ImageNet classification, CPU benchmark",
    long_about = "MobileOne (Apple, 2022) S0-S4 on CPU. Weights may be timm safetensors, Apple .pth/.pth.tar \
                  checkpoints (unfused or fused) or this project's safetensors; the naming is detected from the \
                  key names."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Writes the features at strides 2, 4, 8, 16, 32 (and logits, if the weights have a classifier).
    Features(FeaturesArgs),
    /// Reparameterises a train-time checkpoint into one conv per layer, with timm's fused key names;
    /// detector and segmenter checkpoints also get their head BatchNorms folded. The metadata is
    /// kept (bar a training run's resume state); --half stores float16.
    Fuse(FuseArgs),
    /// Top-k ImageNet classes of an image, with timm's eval preprocessing.
    Classify(ClassifyArgs),
    /// Median forward latency of a random-weight model.
    Bench(bench::BenchArgs),
}

#[derive(clap::Args)]
struct ModelArgs {
    /// Model variant: s0, s1, s2, s3 or s4 (default: the checkpoint's metadata, else judged from its
    /// layer widths).
    #[arg(long)]
    variant: Option<Variant>,
    /// Weights: .safetensors, .pth or .pth.tar, timm or Apple naming, unfused or fused.
    #[arg(long)]
    weights: PathBuf,
    /// Worker threads (default: RAYON_NUM_THREADS, else one per core).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(clap::Args)]
struct FeaturesArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Input images as a float32 NCHW .npy array, already normalised.
    #[arg(long)]
    input: PathBuf,
    /// Output safetensors with `features.0` … `features.4` and `logits`.
    #[arg(long)]
    out: PathBuf,
    /// Reparameterise before running (no effect on already fused weights).
    #[arg(long)]
    fuse: bool,
    /// 32, or 16 / 8 by dilating the last stages (torchvision's replace_stride_with_dilation).
    #[arg(long, default_value_t = 32, value_parser = parse_output_stride)]
    output_stride: usize,
}

#[derive(clap::Args)]
struct FuseArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output safetensors (timm's `reparam_conv` names, variant in the metadata).
    #[arg(long)]
    out: PathBuf,
    /// Store the weights as float16: half the file size, outputs within float16 rounding of the
    /// float32 model (every loader computes in float32).
    #[arg(long)]
    half: bool,
}

#[derive(clap::Args)]
struct ClassifyArgs {
    /// Image file (JPEG or PNG).
    image: PathBuf,
    #[command(flatten)]
    model: ModelArgs,
    /// How many classes to print.
    #[arg(long, default_value_t = 5)]
    top: usize,
}

fn parse_output_stride(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(v @ (8 | 16 | 32)) => Ok(v),
        _ => Err(format!("`{s}` is not an output stride: use 32, 16 or 8")),
    }
}

fn main() {
    mobileone_cli::cli_main(run);
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Features(args) => features(&args),
        Command::Fuse(args) => fuse(&args),
        Command::Classify(args) => classify(&args),
        Command::Bench(args) => bench::run(&args),
    }
}

/// What a checkpoint holds, judged by its metadata and key names.
#[derive(Debug, PartialEq)]
enum CheckpointKind {
    Backbone,
    Detector,
    Segmenter,
}

fn checkpoint_kind(ckpt: &Checkpoint) -> CheckpointKind {
    match ckpt.metadata.get("task").map(String::as_str) {
        Some("detection") => return CheckpointKind::Detector,
        Some("segmentation") => return CheckpointKind::Segmenter,
        _ => {}
    }
    if ckpt
        .tensors
        .keys()
        .any(|k| k.starts_with("head.classification_head."))
    {
        CheckpointKind::Detector
    } else if ckpt.tensors.keys().any(|k| k.starts_with("classifier.0.")) {
        CheckpointKind::Segmenter
    } else {
        CheckpointKind::Backbone
    }
}

/// The variant to build: `--variant`, else the metadata's, else the one the layer widths match.
fn resolve_variant(args: &ModelArgs, ckpt: &Checkpoint) -> Result<Variant> {
    if let Some(v) = args.variant {
        return Ok(v);
    }
    if let Some(v) = ckpt.metadata.get("variant") {
        return v.parse().map_err(|e: String| {
            anyhow::anyhow!("{}: metadata `variant`: {e}", args.weights.display())
        });
    }
    checkpoint::guess_variant(&ckpt.tensors, "").with_context(|| {
        format!(
            "cannot tell which MobileOne variant {} is; pass --variant",
            args.weights.display()
        )
    })
}

fn read_checkpoint(args: &ModelArgs) -> Result<Checkpoint> {
    // Always: it also keeps candle's spinning elementwise pool out of the kernels' way.
    mobileone::ops::set_threads(args.threads.unwrap_or(0))
        .context("cannot start the worker threads")?;
    Ok(checkpoint::load(&args.weights)?)
}

/// Builds the backbone a checkpoint describes (classifier included when present).
fn build_backbone(
    args: &ModelArgs,
    ckpt: &Checkpoint,
    output_stride: usize,
) -> Result<(Variant, MobileOne)> {
    if checkpoint_kind(ckpt) != CheckpointKind::Backbone {
        bail!(
            "{} is a detector or segmenter checkpoint; use `detect` or `segment`",
            args.weights.display()
        );
    }
    let variant = resolve_variant(args, ckpt)?;
    let config = MobileOneConfig::from_variant(variant).with_num_classes(ckpt.num_classes(""));
    let model = load_mobileone(ckpt, &config, output_stride, &Device::Cpu).with_context(|| {
        format!(
            "cannot load {} as MobileOne-{variant}",
            args.weights.display()
        )
    })?;
    Ok((variant, model))
}

fn features(args: &FeaturesArgs) -> Result<()> {
    let x = npy::read_f32(&args.input)?;
    if x.rank() != 4 || x.dim(1)? != 3 {
        bail!(
            "{}: expected a float32 N×3×H×W array, got shape {:?}",
            args.input.display(),
            x.dims()
        );
    }
    let ckpt = read_checkpoint(&args.model)?;
    let (variant, mut model) = build_backbone(&args.model, &ckpt, args.output_stride)?;
    if args.fuse {
        model.reparameterize()?;
    }
    let feats = model.forward_features(&x, false)?;
    let mut out: Vec<(String, Tensor)> = feats
        .iter()
        .enumerate()
        .map(|(i, f)| (format!("features.{i}"), f.clone()))
        .collect();
    if let Some(logits) = model.forward_head(&feats[4])? {
        out.push(("logits".into(), logits));
    }
    let metadata = HashMap::from([
        ("variant".to_string(), variant.to_string()),
        ("output_stride".to_string(), args.output_stride.to_string()),
    ]);
    checkpoint::save(&args.out, &out, &metadata)?;
    for (name, t) in &out {
        println!("{name:<12} {:?}", t.dims());
    }
    println!("wrote {}", args.out.display());
    Ok(())
}

fn fuse(args: &FuseArgs) -> Result<()> {
    let ckpt = read_checkpoint(&args.model)?;
    let (what, tensors, model_metadata) = match checkpoint_kind(&ckpt) {
        CheckpointKind::Backbone => fuse_backbone(args, &ckpt)?,
        CheckpointKind::Detector => {
            let overrides = ssdlite::Overrides {
                variant: args.model.variant,
                ..Default::default()
            };
            let (mut detector, labels) =
                ssdlite::SsdDetector::from_checkpoint(&ckpt, &overrides, &Device::Cpu)
                    .with_context(|| {
                        format!("cannot load detector {}", args.model.weights.display())
                    })?;
            detector.fuse()?;
            let metadata = ssdlite::config::to_metadata(&detector.config, &labels);
            ("SSDLite detector", detector.named_tensors(), metadata)
        }
        CheckpointKind::Segmenter => {
            let overrides = deeplabv3::Overrides {
                variant: args.model.variant,
                ..Default::default()
            };
            let spec = deeplabv3::checkpoint::resolve_spec(&ckpt, &overrides)?;
            let mut model =
                deeplabv3::checkpoint::build(&ckpt.tensors, &spec.config, &Device::Cpu)?;
            model.fuse()?;
            (
                "DeepLabV3 segmenter",
                model.named_tensors(),
                spec.to_metadata(),
            )
        }
    };
    // What the input says about itself (e.g. a training run's epoch and metric) stays, under the
    // model's own description; the resumable run state does not describe a fused model.
    let mut metadata: HashMap<String, String> = ckpt
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != TRAIN_STATE_KEY)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.extend(model_metadata);
    let tensors = if args.half {
        to_half(tensors)?
    } else {
        tensors
    };
    checkpoint::save(&args.out, &tensors, &metadata)?;
    let params: usize = tensors.iter().map(|(_, t)| t.elem_count()).sum();
    let bytes = std::fs::metadata(&args.out).map_or(0, |m| m.len());
    println!(
        "fused {what} ({:.2} M parameters, {}, {:.1} MB): {} → {}",
        params as f64 / 1e6,
        if args.half { "float16" } else { "float32" },
        bytes as f64 / 1e6,
        args.model.weights.display(),
        args.out.display()
    );
    Ok(())
}

/// Float tensors as float16; a value beyond float16's range is an error naming its tensor.
fn to_half(tensors: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
    const F16_MAX: f32 = 65504.0;
    tensors
        .into_iter()
        .map(|(key, t)| {
            if !t.dtype().is_float() || t.elem_count() == 0 {
                return Ok((key, t));
            }
            let largest = t
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?;
            if largest > F16_MAX {
                bail!("`{key}` holds {largest:e}, beyond float16's range: save it without --half");
            }
            Ok((key.clone(), t.to_dtype(DType::F16)?))
        })
        .collect()
}

type Fused = (&'static str, Vec<(String, Tensor)>, HashMap<String, String>);

fn fuse_backbone(args: &FuseArgs, ckpt: &Checkpoint) -> Result<Fused> {
    let (variant, mut model) = build_backbone(&args.model, ckpt, 32)?;
    if model.is_fused() {
        eprintln!(
            "note: {} is already fused; writing it with timm's names",
            args.model.weights.display()
        );
    }
    model.reparameterize()?;
    let metadata = HashMap::from([
        ("variant".to_string(), variant.to_string()),
        ("fused".to_string(), "true".to_string()),
    ]);
    Ok(("MobileOne backbone", model.named_tensors(), metadata))
}

const IMAGENET_CLASSES: &str = include_str!("../../assets/imagenet_classes.txt");

/// timm's eval transform for MobileOne: resize the shorter side to 224 / 0.875 = 256 (bilinear), centre
/// crop 224, ImageNet normalisation.
fn timm_eval_input(path: &Path) -> Result<Tensor> {
    const SIZE: u32 = 224;
    const RESIZE: u32 = 256;
    let image = imageio::load_rgb(path)?;
    let (w, h) = image.dimensions();
    let (nw, nh) = if w <= h {
        (RESIZE, (RESIZE as u64 * h as u64 / w as u64) as u32)
    } else {
        ((RESIZE as u64 * w as u64 / h as u64) as u32, RESIZE)
    };
    let resized = image::imageops::resize(&image, nw, nh, FilterType::Triangle);
    let (left, top) = ((nw - SIZE + 1) / 2, (nh - SIZE + 1) / 2);
    let cropped = image::imageops::crop_imm(&resized, left, top, SIZE, SIZE).to_image();
    imageio::to_tensor(&cropped, imageio::IMAGENET_MEAN, imageio::IMAGENET_STD)
}

fn classify(args: &ClassifyArgs) -> Result<()> {
    let x = timm_eval_input(&args.image)?;
    let ckpt = read_checkpoint(&args.model)?;
    let (_, mut model) = build_backbone(&args.model, &ckpt, 32)?;
    model.reparameterize()?;
    let feats = model.forward_features(&x, false)?;
    let Some(logits) = model.forward_head(&feats[4])? else {
        bail!(
            "{} has no classifier (`head.fc`); it is a backbone-only checkpoint",
            args.model.weights.display()
        );
    };
    let probs = candle_nn::ops::softmax_last_dim(&logits)?
        .squeeze(0)?
        .to_vec1::<f32>()?;
    let names: Vec<&str> = IMAGENET_CLASSES.lines().collect();
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    println!("{}", args.image.display());
    for (rank, &i) in order.iter().take(args.top).enumerate() {
        let name = if probs.len() == names.len() {
            names[i]
        } else {
            ""
        };
        println!(
            "{:>2}. {:>6.2}%  {:>4}  {}",
            rank + 1,
            probs[i] * 100.0,
            i,
            name
        );
    }
    Ok(())
}
