//! `segment`: DeepLabV3 semantic segmentation with a MobileOne trunk, on images or over a dataset.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, D};
use clap::{Parser, ValueEnum};
use deeplabv3::{predict_logits, DeepLabV3, InferenceOptions, Overrides, SegmenterSpec};
use indicatif::{ProgressBar, ProgressStyle};
use mobileone::Variant;
use mobileone_cli::segment_render::{overlay_with_legend, write_class_png, ClassMap};
use mobileone_cli::{bundled, imageio, npy, output};
use mobileone_datasets::segmentation::VOC_CLASSES;
use mobileone_datasets::{SegmentationDataset, IGNORE_INDEX};
use mobileone_eval::seg::{SegMetric, SegMetrics};

#[derive(Parser)]
#[command(
    name = "segment",
    version,
    about = "Semantic segmentation with DeepLabV3 on MobileOne: masks and overlays for images, mIoU over VOC/ADE20K",
    long_about = "Semantic segmentation with DeepLabV3 (torchvision's architecture: ASPP head, output stride \
                  32/16/8 by dilation) on a MobileOne trunk.\n\n\
                  With images: saves <name>_mask.png (a palette PNG: class index per pixel, coloured) and \
                  <name>_overlay.jpg|png (the classes found tinted over the photo, with their legend) into a \
                  fresh runs/segment/predict<N> folder (--out-dir to choose, --no-save to skip), and \
                  optionally the raw logits. Images run at full resolution unless --size N resizes the \
                  shorter side.\n\
                  With --dataset: runs over a VOC 2012, ADE20K or segmentation-folder dataset and prints mIoU, mAcc, aAcc and \
                  per-class IoU (mmsegmentation's IoUMetric).\n\n\
                  Architecture settings come from the checkpoint's metadata; the flags below override them \
                  for checkpoints without metadata.\n\n\
                  Without --weights it runs the bundled segmenter \
                  (models/deeplabv3_mobileone_s0_coco_voc.safetensors: the 20 VOC classes, trained on 149 \
                  COCO images, so a small model of modest accuracy; see models/README.md); with no image \
                  either, on models/astronaut.jpg. MOBILEONE_MODELS_DIR names another folder holding \
                  those files."
)]
struct Cli {
    /// Images or folders of images (JPEG, PNG) [default without --weights: the bundled
    /// models/astronaut.jpg].
    images: Vec<PathBuf>,
    /// Segmenter weights (.safetensors with torchvision DeepLabV3 key names) [default: the bundled
    /// VOC-class segmenter, models/deeplabv3_mobileone_s0_coco_voc.safetensors].
    #[arg(long)]
    weights: Option<PathBuf>,
    /// MobileOne variant of the trunk (default: metadata, else guessed from the weights).
    #[arg(long)]
    variant: Option<Variant>,
    /// Number of classes (default: metadata, else the classifier's width).
    #[arg(long)]
    num_classes: Option<usize>,
    /// Output stride 32, 16 or 8 (default: metadata, else 16).
    #[arg(long)]
    output_stride: Option<usize>,
    /// ASPP atrous rates, e.g. 12,24,36 (default: metadata, else 12,24,36).
    #[arg(long, value_delimiter = ',', value_name = "R1,R2,R3")]
    atrous_rates: Option<Vec<usize>>,
    /// Resize the shorter side to N pixels before the network; logits are resized back to the image.
    #[arg(long, value_name = "N")]
    size: Option<usize>,
    /// Sliding-window inference for very large images: N×N windows every 2N/3 pixels, overlapping
    /// logits averaged (after --size, if given).
    #[arg(long, value_name = "N")]
    tile: Option<usize>,
    /// Folder for masks and overlays (and predictions and metrics.json with --dataset) [default: a
    /// fresh runs/segment/predict, predict2, … (val, val2, … with --dataset) under the current
    /// folder, so reruns never overwrite].
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// Save no masks or overlays (the printed classes, --mask-out and --logits-out still come out).
    #[arg(long, conflicts_with = "out_dir")]
    no_save: bool,
    /// Path of the class-index PNG (one image only; default <out-dir>/<name>_mask.png).
    #[arg(long)]
    mask_out: Option<PathBuf>,
    /// Also write the logits at input resolution as float32 NCHW .npy (one image only).
    #[arg(long)]
    logits_out: Option<PathBuf>,
    /// Reparameterise the trunk and fold BatchNorms first (same outputs, faster).
    #[arg(long)]
    fuse: bool,
    /// Time N forward passes on the first image and print the median latency.
    #[arg(long, value_name = "N")]
    bench: Option<usize>,
    /// Worker threads (default: RAYON_NUM_THREADS, else one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Evaluate over a dataset instead of segmenting images.
    #[arg(long, requires = "data_root", conflicts_with_all = ["images", "mask_out", "logits_out", "bench"])]
    dataset: Option<DatasetKind>,
    /// Dataset root: VOC2012 (or VOCdevkit above it) / ADEChallengeData2016 (or its parent).
    #[arg(long)]
    data_root: Option<PathBuf>,
    /// Split: VOC `val`/`train` (ImageSets/Segmentation/<split>.txt), ADE20K `validation`/`training`
    /// (images/<split>, annotations/<split>) [default: VOC every PNG of SegmentationClass/, ADE20K the
    /// flat images/ and annotations/ folders of sample copies].
    #[arg(long)]
    split: Option<String>,
    /// --dataset folder: the JSON describing the layout and classes [default: <data-root>/dataset.json].
    #[arg(long, value_name = "JSON")]
    dataset_config: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum DatasetKind {
    Voc,
    Ade20k,
    /// A segmentation folder described by a JSON (<data-root>/dataset.json or --dataset-config),
    /// e.g. CamVid with datasets/configs/camvid.json; --split names the split (default val).
    Folder,
}

fn main() {
    mobileone_cli::cli_main(run);
}

fn run(mut cli: Cli) -> Result<()> {
    // Always: it also keeps candle's spinning elementwise pool out of the kernels' way.
    mobileone::ops::set_threads(cli.threads.unwrap_or(0))
        .context("cannot start the worker threads")?;
    if cli.dataset.is_none() && cli.images.is_empty() {
        if cli.weights.is_some() {
            bail!("give one or more images, or --dataset voc|ade20k --data-root DIR (see --help)");
        }
        // The out-of-the-box demo: bundled model on the bundled image.
        cli.images = vec![bundled::demo_image(bundled::DEMO_IMAGE)?];
    }
    cli.images = imageio::expand_inputs(&cli.images)?;
    if cli.size == Some(0) || cli.tile == Some(0) {
        bail!("--size and --tile must be at least 1 pixel");
    }
    if cli.images.len() > 1 && (cli.mask_out.is_some() || cli.logits_out.is_some()) {
        bail!("--mask-out and --logits-out name one file: use them with a single image");
    }
    let (model, spec) = load_model(&cli)?;
    let run = if cli.dataset.is_some() {
        "val"
    } else {
        "predict"
    };
    // The dataset report always needs its folder (metrics.json).
    let save = output::save_dir(
        "segment",
        run,
        cli.out_dir.as_deref(),
        cli.no_save && cli.dataset.is_none(),
    );
    match cli.dataset {
        Some(kind) => evaluate(&cli, kind, &model, spec, save.as_deref().expect("a folder")),
        None => segment_images(&cli, &model, &spec, save.as_deref()),
    }
}

fn load_model(cli: &Cli) -> Result<(DeepLabV3, SegmenterSpec)> {
    let weights =
        bundled::weights_or_bundled(cli.weights.as_deref(), bundled::SEGMENTER, "segmenter")?;
    let overrides = Overrides {
        variant: cli.variant,
        num_classes: cli.num_classes,
        output_stride: cli.output_stride,
        atrous_rates: cli.atrous_rates.clone(),
    };
    let (mut model, mut spec) = deeplabv3::load(&weights, &overrides, &candle_core::Device::Cpu)
        .with_context(|| format!("cannot load segmenter weights {}", weights.display()))?;
    if spec.class_names.is_empty() && spec.config.num_classes == VOC_CLASSES.len() {
        spec.class_names = VOC_CLASSES.iter().map(|s| s.to_string()).collect();
    }
    if cli.fuse && !model.is_fused() {
        model.fuse().context("cannot fuse the model")?;
    }
    let c = &spec.config;
    eprintln!(
        "DeepLabV3 MobileOne-{} | {} classes | output stride {} | rates {:?}{}",
        spec.variant.map_or("custom".into(), |v| v.to_string()),
        c.num_classes,
        c.output_stride,
        c.atrous_rates,
        if model.is_fused() { " | fused" } else { "" }
    );
    Ok((model, spec))
}

/// Class indices (row-major) of the argmax over classes of (1, C, H, W) logits.
fn argmax_map(logits: &Tensor) -> Result<ClassMap> {
    let (_, _, height, width) = logits.dims4()?;
    let classes = logits
        .argmax(D::Minus(3))?
        .to_dtype(DType::U32)?
        .flatten_all()?
        .to_vec1::<u32>()?;
    Ok(ClassMap {
        width: width as u32,
        height: height as u32,
        classes,
    })
}

fn segment_images(
    cli: &Cli,
    model: &DeepLabV3,
    spec: &SegmenterSpec,
    save: Option<&Path>,
) -> Result<()> {
    if save.is_some() {
        output::distinct_stems(&cli.images)?;
    }
    let palette = class_palette(spec);
    let (mut failures, mut speed) = (Vec::new(), output::Speed::default());
    for (i, path) in cli.images.iter().enumerate() {
        // An unreadable image is reported, skipped and counted; the others still run.
        let outcome = (|| -> Result<()> {
            let start = Instant::now();
            let image = imageio::load_rgb(path)?;
            let decoded = Instant::now();
            let input = imageio::to_tensor(&image, spec.mean, spec.std)?;
            if i == 0 {
                if let Some(n) = cli.bench {
                    bench(model, &input, options(cli), n)?;
                }
            }
            let preprocessed = Instant::now();
            // Inference includes the resizes of --size (input down, logits back up).
            let logits = predict_logits(model, &input, options(cli))
                .with_context(|| format!("segmentation of {} failed", path.display()))?;
            let inferred = Instant::now();
            let map = argmax_map(&logits)?;
            let done = Instant::now();
            speed.add([
                decoded - start,
                preprocessed - decoded,
                inferred - preprocessed,
                done - inferred,
            ]);
            let elapsed = (done - decoded).as_secs_f64() * 1e3;
            let stem = file_stem(path);
            let mut written = Vec::new();
            let mask_path = cli
                .mask_out
                .clone()
                .or_else(|| save.map(|dir| dir.join(format!("{stem}_mask.png"))));
            if let Some(mask_path) = mask_path {
                write_class_png(&mask_path, &map, &palette)?;
                written.push(mask_path);
            }
            if let Some(dir) = save {
                let overlay_path = output::picture_path(dir, path, "_overlay");
                let overlay = overlay_with_legend(
                    &image,
                    &map,
                    |c| spec.color(c as usize),
                    |c| spec.class_name(c as usize),
                    0.5,
                )?;
                output::write_picture(&overlay_path, &overlay)?;
                written.push(overlay_path);
            }
            if let Some(logits_path) = &cli.logits_out {
                npy::write_f32(logits_path, &logits)?;
            }
            let total = map.classes.len() as f64;
            let present: Vec<String> = map
                .histogram()
                .iter()
                .filter(|&&(_, n)| n as f64 / total >= 0.0005)
                .map(|&(c, n)| {
                    format!(
                        "{} {:.1}%",
                        spec.class_name(c as usize),
                        100.0 * n as f64 / total
                    )
                })
                .collect();
            println!(
                "{} {}x{}: {}, {elapsed:.1} ms",
                output::file_name(path),
                image.width(),
                image.height(),
                present.join(", ")
            );
            if !written.is_empty() {
                let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
                println!("  wrote {}", names.join(" and "));
            }
            Ok(())
        })();
        if let Err(e) = outcome {
            eprintln!("error: {e:#}");
            failures.push(output::file_name(path));
        }
    }
    if speed.images() > 0 {
        let at = cli.size.map_or(
            "at full resolution (--size N resizes the shorter side)".into(),
            |n| format!("with the shorter side resized to {n}"),
        );
        println!("{}", speed.line(&at));
    }
    output::print_saved(save);
    output::failures(&failures, cli.images.len())
}

/// The colour of every class the model predicts, as the mask PNGs' palette.
fn class_palette(spec: &SegmenterSpec) -> Vec<[u8; 3]> {
    (0..spec.config.num_classes)
        .map(|c| spec.color(c))
        .collect()
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map_or("image".into(), |s| s.to_string_lossy().into_owned())
}

fn options(cli: &Cli) -> InferenceOptions {
    InferenceOptions {
        shorter_side: cli.size,
        tile: cli.tile,
    }
}

fn bench(model: &DeepLabV3, input: &Tensor, options: InferenceOptions, runs: usize) -> Result<()> {
    if runs == 0 {
        bail!("--bench needs at least one run");
    }
    predict_logits(model, input, options)?; // warm-up
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            predict_logits(model, input, options).map(|_| start.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<candle_core::Result<_>>()?;
    let (_, _, h, w) = input.dims4()?;
    let what = format!(
        "segment{}",
        options
            .shorter_side
            .map_or(String::new(), |n| format!(" (shorter side resized to {n})"))
    );
    println!(
        "{}",
        mobileone_cli::bench::bench_line(&what, (w, h), &mut times)
    );
    Ok(())
}

fn evaluate(
    cli: &Cli,
    kind: DatasetKind,
    model: &DeepLabV3,
    mut spec: SegmenterSpec,
    out_dir: &Path,
) -> Result<()> {
    let root = cli
        .data_root
        .as_ref()
        .expect("clap requires --data-root with --dataset");
    let split = cli.split.as_deref();
    let dataset = match kind {
        DatasetKind::Voc => SegmentationDataset::voc(root, split, false),
        DatasetKind::Ade20k => SegmentationDataset::ade20k(root, split),
        DatasetKind::Folder => {
            let config_path = cli
                .dataset_config
                .clone()
                .unwrap_or_else(|| root.join(mobileone_datasets::segmentation::FOLDER_CONFIG_FILE));
            mobileone_datasets::segmentation::FolderConfig::read(&config_path).and_then(|config| {
                SegmentationDataset::folder(root, split.unwrap_or("val"), &config)
            })
        }
    }
    .with_context(|| format!("cannot open the dataset at {}", root.display()))?;
    if dataset.is_empty() {
        bail!("no annotated images found under {}", dataset.root.display());
    }
    let num_classes = dataset.num_classes();
    if num_classes != spec.config.num_classes {
        bail!(
            "the model predicts {} classes but the dataset has {num_classes}: use a checkpoint trained on it",
            spec.config.num_classes
        );
    }
    if spec.class_names.is_empty() {
        spec.class_names = dataset.class_names.clone();
    }
    let mut metric = SegMetric::new(num_classes, IGNORE_INDEX as u32)?;
    let mut skipped: Vec<String> = Vec::new();
    let bar = ProgressBar::new(dataset.len() as u64).with_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} images, {elapsed} elapsed, eta {eta} {msg}",
        )
        .expect("valid template"),
    );
    let palette = class_palette(&spec);
    let predictions_dir = out_dir.join("predictions");
    std::fs::create_dir_all(&predictions_dir)
        .with_context(|| format!("cannot create {}", predictions_dir.display()))?;
    for index in 0..dataset.len() {
        let item = &dataset.items[index];
        let (image, labels) = match dataset.load(index) {
            Ok(pair) => pair,
            Err(e) => {
                bar.suspend(|| eprintln!("skipped {}: {e}", item.id));
                skipped.push(format!("{}: {e}", item.id));
                bar.inc(1);
                continue;
            }
        };
        let input = imageio::to_tensor(&image, spec.mean, spec.std)?;
        let logits = predict_logits(model, &input, options(cli))
            .with_context(|| format!("segmentation of {} failed", item.image.display()))?;
        let map = argmax_map(&logits)?;
        metric.update(&map.classes, &labels.data)?;
        write_class_png(
            &predictions_dir.join(format!("{}.png", item.id)),
            &map,
            &palette,
        )?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let metrics = metric.compute();
    if metrics.images == 0 {
        bail!(
            "every image was skipped ({} of them), no metric to report",
            skipped.len()
        );
    }
    print_metrics(&metrics, &spec);
    if !skipped.is_empty() {
        println!(
            "skipped {} of {} images (listed above)",
            skipped.len(),
            dataset.len()
        );
    }
    let mut json = metrics.to_json();
    json["images"] = metrics.images.into();
    json["skipped"] = skipped.into();
    json["class_names"] = spec.class_names.clone().into();
    let metrics_path = out_dir.join("metrics.json");
    mobileone::checkpoint::write_atomic(
        &metrics_path,
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )
    .with_context(|| format!("cannot write {}", metrics_path.display()))?;
    println!(
        "wrote {} and per-image masks in {}",
        metrics_path.display(),
        predictions_dir.display()
    );
    Ok(())
}

fn print_metrics(metrics: &SegMetrics, spec: &SegmenterSpec) {
    let pct = |v: Option<f64>| v.map_or("nan".to_string(), |v| format!("{:.2}", 100.0 * v));
    println!("{:<24} {:>7} {:>7}", "class", "IoU", "Acc");
    for (c, m) in metrics.per_class.iter().enumerate() {
        if m.union > 0 {
            println!(
                "{:<24} {:>7} {:>7}",
                spec.class_name(c),
                pct(m.iou),
                pct(m.acc)
            );
        }
    }
    let absent = metrics.per_class.iter().filter(|m| m.union == 0).count();
    if absent > 0 {
        println!("({absent} classes neither labelled nor predicted: left out of the means)");
    }
    println!(
        "mIoU {}  mAcc {}  aAcc {}  ({} images, {} ignored pixels)",
        pct(metrics.miou),
        pct(metrics.macc),
        pct(metrics.aacc),
        metrics.images,
        metrics.ignored_pixels
    );
    if metrics.out_of_range_label > 0 || metrics.out_of_range_pred > 0 {
        println!(
            "warning: {} labels and {} predictions were outside the {} classes",
            metrics.out_of_range_label,
            metrics.out_of_range_pred,
            metrics.per_class.len()
        );
    }
}
