//! `mobileone`: run, fuse, classify with and benchmark the MobileOne backbone.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};
use image::RgbImage;
use mobileone::checkpoint::{self, load_mobileone, Checkpoint};
use mobileone::{MobileOne, MobileOneConfig, Variant};
use mobileone_cli::classify::{self, EvalTransform};
use mobileone_cli::{bench, hub, imageio, npy, output};
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
    /// Median forward latency of a random-weight model (classifier, SSDLite or DeepLabV3). The
    /// native kernels run on the best SIMD level of the CPU; MOBILEONE_SIMD=avx2|scalar|… forces a
    /// lower one (the line says which ran).
    Bench(bench::BenchArgs),
}

#[derive(clap::Args)]
struct ModelArgs {
    /// Model variant: s0, s1, s2, s3 or s4 (default: the checkpoint's metadata, else judged from its
    /// layer widths).
    #[arg(long)]
    variant: Option<Variant>,
    /// Weights: .safetensors, .pth or .pth.tar, timm or Apple naming, unfused or fused; or a Hugging
    /// Face Hub id such as hf-hub:timm/mobileone_s0.apple_in1k (…s1…s4), read from the local HF
    /// cache or downloaded into it.
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
    /// Set a metadata entry, e.g. `--set trained_on="synthetic shapes"` (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(clap::Args)]
struct ClassifyArgs {
    /// Images (JPEG, PNG, ...) or folders of images; with --dataset, none.
    #[arg(required_unless_present = "dataset")]
    inputs: Vec<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// How many classes to list per image.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    top: u64,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    batch: u64,
    /// Write the predictions as JSON: a list of {file, predictions: [{class_index, label,
    /// probability}]}; with --dataset, {top1, top5, images, per_image: [...]}.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Save the pictures (each photo with its top classes written on it) here instead of a fresh
    /// runs/classify/predict<N> folder.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// Save no pictures.
    #[arg(long, conflicts_with = "out_dir")]
    no_save: bool,
    /// Evaluate on a labelled set instead: `imagenet` reads --data-root as DIR/labels.txt
    /// (`<file> <class>` lines, images in DIR/images/) or the ImageFolder layout (DIR/<wnid>/*).
    #[arg(long, value_parser = ["imagenet"], requires = "data_root")]
    dataset: Option<String>,
    /// Folder of the labelled set (--dataset).
    #[arg(long, value_name = "DIR")]
    data_root: Option<PathBuf>,
    /// Network input side in pixels [default: the checkpoint's or hub config's, else 224].
    #[arg(long, value_name = "S")]
    input_size: Option<u32>,
    /// Centre-crop fraction: the shorter side is resized to floor(S / crop_pct) [default: the
    /// checkpoint's or hub config's, else 0.875].
    #[arg(long)]
    crop_pct: Option<f64>,
    /// Resize filter, as Pillow's: bilinear, bicubic, lanczos or box [default: the checkpoint's or
    /// hub config's, else bilinear].
    #[arg(long)]
    interpolation: Option<mobileone_datasets::imaging::Filter>,
    /// Normalisation mean, R,G,B [default: the checkpoint's or hub config's, else ImageNet's].
    #[arg(long, value_delimiter = ',', num_args = 3)]
    mean: Option<Vec<f32>>,
    /// Normalisation standard deviation, R,G,B [default: the checkpoint's or hub config's, else
    /// ImageNet's].
    #[arg(long, value_delimiter = ',', num_args = 3)]
    std: Option<Vec<f32>>,
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

fn read_checkpoint(args: &ModelArgs, path: &Path) -> Result<Checkpoint> {
    // Always: it also keeps candle's spinning elementwise pool out of the kernels' way.
    mobileone::ops::set_threads(args.threads.unwrap_or(0))
        .context("cannot start the worker threads")?;
    Ok(checkpoint::load(path)?)
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
    let resolved = hub::resolve(&args.model.weights)?;
    let ckpt = read_checkpoint(&args.model, &resolved.path)?;
    let model_args = ModelArgs {
        variant: args.model.variant.or(resolved.variant),
        weights: resolved.path,
        threads: args.model.threads,
    };
    let (variant, mut model) = build_backbone(&model_args, &ckpt, args.output_stride)?;
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
    let resolved = hub::resolve(&args.model.weights)?;
    let ckpt = read_checkpoint(&args.model, &resolved.path)?;
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
    for entry in &args.set {
        let (key, value) = entry
            .split_once('=')
            .with_context(|| format!("--set `{entry}`: expected KEY=VALUE"))?;
        metadata.insert(key.to_string(), value.to_string());
    }
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

/// The eval transform: timm's MobileOne defaults, then the hub config, the checkpoint metadata and
/// the flags, each overriding the one before.
fn eval_transform(
    args: &ClassifyArgs,
    ckpt: &Checkpoint,
    hub_config: Option<&Path>,
) -> Result<EvalTransform> {
    let mut t = EvalTransform::default();
    if let Some(path) = hub_config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        t.update_from_json(&json)
            .with_context(|| format!("{}", path.display()))?;
    }
    t.update_from_metadata(&ckpt.metadata)
        .with_context(|| format!("{}", args.model.weights.display()))?;
    if let Some(v) = args.input_size {
        t.input_size = v;
    }
    if let Some(v) = args.crop_pct {
        if !(v > 0.0 && v <= 1.0) {
            bail!("--crop-pct {v} is outside (0, 1]");
        }
        t.crop_pct = v;
    }
    if let Some(v) = args.interpolation {
        t.interpolation = v;
    }
    if let Some(v) = &args.mean {
        t.mean = [v[0], v[1], v[2]];
    }
    if let Some(v) = &args.std {
        t.std = [v[0], v[1], v[2]];
    }
    Ok(t)
}

/// Softmax probabilities of a batch of images.
fn predict(
    model: &MobileOne,
    transform: &EvalTransform,
    images: &[RgbImage],
) -> Result<Vec<Vec<f32>>> {
    let images: Vec<&RgbImage> = images.iter().collect();
    Ok(predict_timed(model, transform, &images)?.0)
}

/// [`predict`] and the time of its three stages for the whole batch: the eval transform, the network,
/// the softmax.
fn predict_timed(
    model: &MobileOne,
    transform: &EvalTransform,
    images: &[&RgbImage],
) -> Result<(Vec<Vec<f32>>, [std::time::Duration; 3])> {
    use rayon::prelude::*;
    let start = std::time::Instant::now();
    let inputs: Vec<Vec<f32>> = images.par_iter().map(|im| transform.apply(im)).collect();
    let x = transform.batch(inputs)?;
    let preprocessed = std::time::Instant::now();
    let feats = model.forward_features_at(&x, false, &[4])?;
    let logits = model.forward_head(&feats[0])?.context(
        "the weights have no classifier (`head.fc`): they are a backbone-only checkpoint",
    )?;
    let inferred = std::time::Instant::now();
    let probabilities = candle_nn::ops::softmax_last_dim(&logits)?.to_vec2::<f32>()?;
    let times = [
        preprocessed - start,
        inferred - preprocessed,
        inferred.elapsed(),
    ];
    Ok((probabilities, times))
}

fn classify(args: &ClassifyArgs) -> Result<()> {
    let resolved = hub::resolve(&args.model.weights)?;
    let ckpt = read_checkpoint(&args.model, &resolved.path)?;
    let model_args = ModelArgs {
        variant: args.model.variant.or(resolved.variant),
        weights: resolved.path.clone(),
        threads: args.model.threads,
    };
    let (variant, mut model) = build_backbone(&model_args, &ckpt, 32)?;
    model.reparameterize()?;
    let transform = eval_transform(args, &ckpt, resolved.config.as_deref())?;
    let mut names: Vec<String> = IMAGENET_CLASSES.lines().map(str::to_string).collect();
    eprintln!(
        "MobileOne-{variant} | {} | input {}, resize {} ({:?}), crop_pct {}",
        args.model.weights.display(),
        transform.input_size,
        transform.scale_size(),
        transform.interpolation,
        transform.crop_pct
    );
    match &args.dataset {
        Some(_) => {
            let root = args
                .data_root
                .as_deref()
                .expect("clap requires --data-root");
            let set = classify::read_imagenet(root)?;
            if let Some(n) = &set.class_names {
                names = n.clone();
            }
            evaluate_imagenet(args, &model, &transform, &set, &names)
        }
        None => classify_images(args, &model, &transform, &names),
    }
}

/// Classifies each image: one console line per image, the pictures in a fresh run folder, a speed
/// summary; an unreadable image is reported and skipped, the others still run (then exit 1).
fn classify_images(
    args: &ClassifyArgs,
    model: &MobileOne,
    transform: &EvalTransform,
    names: &[String],
) -> Result<()> {
    use rayon::prelude::*;
    use std::time::{Duration, Instant};
    let files = imageio::expand_inputs(&args.inputs)?;
    let save = output::save_dir("classify", "predict", args.out_dir.as_deref(), args.no_save);
    if save.is_some() {
        output::distinct_stems(&files)?;
    }
    let (mut results, mut failures, mut speed) = (Vec::new(), Vec::new(), output::Speed::default());
    for chunk in files.chunks(args.batch as usize) {
        let loaded: Vec<(Result<RgbImage>, Duration)> = chunk
            .par_iter()
            .map(|f| {
                let start = Instant::now();
                (imageio::load_rgb(f), start.elapsed())
            })
            .collect();
        let mut batch = Vec::new();
        for (file, (image, decode)) in chunk.iter().zip(loaded) {
            match image {
                Ok(image) => batch.push((file, image, decode)),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    failures.push(output::file_name(file));
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        let images: Vec<&RgbImage> = batch.iter().map(|(_, image, _)| image).collect();
        let (probabilities, [pre, inference, post]) = predict_timed(model, transform, &images)?;
        let n = batch.len() as u32;
        for ((file, image, decode), probs) in batch.iter().zip(&probabilities) {
            let started = Instant::now();
            let predictions = classify::top_k(probs, args.top as usize, names);
            let post = post / n + started.elapsed();
            speed.add([*decode, pre / n, inference / n, post]);
            println!(
                "{} {}x{}: {}, {:.1} ms",
                output::file_name(file),
                image.width(),
                image.height(),
                classify::summary(&predictions),
                ((pre + inference) / n + post).as_secs_f64() * 1e3
            );
            if let Some(dir) = &save {
                let mut picture = image.clone();
                classify::draw(&mut picture, &predictions);
                output::write_picture(&output::picture_path(dir, file, ""), &picture)?;
            }
            results.push(serde_json::json!({"file": file, "predictions": predictions}));
        }
    }
    if let Some(path) = &args.json {
        write_json(path, &serde_json::Value::Array(results))?;
        println!("wrote {}", path.display());
    }
    if speed.images() > 0 {
        let s = transform.input_size;
        println!(
            "{}",
            speed.line(&format!("at {s}x{s}, batches of up to {}", args.batch))
        );
    }
    output::print_saved(save.as_deref());
    output::failures(&failures, files.len())
}

fn evaluate_imagenet(
    args: &ClassifyArgs,
    model: &MobileOne,
    transform: &EvalTransform,
    set: &classify::LabelledImages,
    names: &[String],
) -> Result<()> {
    use rayon::prelude::*;
    let started = std::time::Instant::now();
    let bar = indicatif::ProgressBar::new(set.items.len() as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30.cyan/blue}] {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix("classifying");
    let (mut top1, mut top5) = (0usize, 0usize);
    let mut per_image = Vec::with_capacity(set.items.len());
    for (done, chunk) in set.items.chunks(args.batch as usize).enumerate() {
        let images = chunk
            .par_iter()
            .map(|(f, _)| imageio::load_rgb(f))
            .collect::<Result<Vec<_>>>()?;
        let probabilities = predict(model, transform, &images)?;
        for ((file, class), probs) in chunk.iter().zip(&probabilities) {
            let top = classify::top_k(probs, 5.max(args.top as usize), names);
            let hit1 = top[0].class_index == *class;
            let hit5 = top.iter().take(5).any(|p| p.class_index == *class);
            top1 += hit1 as usize;
            top5 += hit5 as usize;
            per_image.push(serde_json::json!({
                "file": file.file_name().map(|n| n.to_string_lossy()),
                "class_index": class,
                "top5": top.iter().take(5).map(|p| p.class_index).collect::<Vec<_>>(),
                "probability": top[0].probability,
            }));
        }
        let seen = (done * args.batch as usize + chunk.len()) as f64;
        bar.set_position(seen as u64);
        bar.set_message(format!(
            "top-1 {:.2}% top-5 {:.2}%",
            100.0 * top1 as f64 / seen,
            100.0 * top5 as f64 / seen
        ));
    }
    bar.finish_and_clear();
    let n = set.items.len();
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}: {n} images, top-1 {:.4}, top-5 {:.4} ({:.1} images/s including decoding, {} threads)",
        args.data_root.as_deref().unwrap_or(Path::new("")).display(),
        top1 as f64 / n as f64,
        top5 as f64 / n as f64,
        n as f64 / seconds,
        mobileone::ops::current_threads()
    );
    if let Some(path) = &args.json {
        write_json(
            path,
            &serde_json::json!({
                "top1": top1 as f64 / n as f64,
                "top5": top5 as f64 / n as f64,
                "images": n,
                "seconds": seconds,
                "per_image": per_image,
            }),
        )?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Writes pretty JSON atomically (a temporary file, then a rename).
fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)? + "\n";
    checkpoint::write_atomic(path, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}
