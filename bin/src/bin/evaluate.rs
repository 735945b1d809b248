//! `evaluate`: COCO AP/AR identical to pycocotools, semantic-segmentation mIoU identical to
//! mmsegmentation. The metrics live in the `mobileone-eval` crate; this only parses arguments,
//! finds files and prints.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use mobileone_eval::coco::{self, GroundTruth, IouType};
use mobileone_eval::seg::{reduce_zero_label, LabelMap, SegMetric};
use rayon::prelude::*;

#[derive(Parser)]
#[command(
    name = "evaluate",
    about = "Score detections (COCO mAP, identical to pycocotools 2.0.11) or segmentation maps \
             (mIoU, identical to mmsegmentation's IoUMetric)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// COCO AP/AR of a result file: pycocotools' 12 summary lines and a per-category table.
    ///
    /// Bad input is an error, as in pycocotools: detections on images missing from the ground
    /// truth, an empty result list, annotations without `area`, non-finite boxes or scores; and,
    /// where pycocotools would silently miscount, annotation id 0 or duplicate annotation ids.
    /// Detections of categories not in the ground truth are ignored (as pycocotools does) and
    /// counted in a note on stderr.
    Coco(CocoArgs),
    /// mIoU, mAcc and aAcc of predicted class-index PNGs against same-named label PNGs.
    ///
    /// Labels equal to --ignore-index are skipped; a class absent from both predictions and
    /// labels is NaN (null in --json) and left out of the means. Predictions or labels outside
    /// 0..num-classes are reported on stderr.
    Seg(SegArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum IouArg {
    /// Box IoU.
    Bbox,
    /// Mask IoU (segmentation polygons/RLE).
    Segm,
}

#[derive(clap::Args)]
struct CocoArgs {
    /// Ground truth: a COCO instances JSON file.
    #[arg(long)]
    gt: PathBuf,
    /// Detections: a COCO result JSON file (array of {image_id, category_id, bbox, score}).
    #[arg(long)]
    dt: PathBuf,
    /// What the detections are compared by.
    #[arg(long, value_enum, default_value_t = IouArg::Bbox)]
    iou_type: IouArg,
    /// Print only {"stats": [12 numbers in pycocotools order], "per_category": {...}} to stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct SegArgs {
    /// Folder of predicted class-index PNGs (8-bit gray/palette or 16-bit gray).
    #[arg(long)]
    pred: PathBuf,
    /// Folder of label PNGs; every one needs a prediction of the same file name.
    #[arg(long)]
    gt: PathBuf,
    /// Number of classes (150 for ADE20K, 21 for Pascal VOC).
    #[arg(long)]
    num_classes: usize,
    /// ADE20K convention: label 0 ("other") is ignored and labels 1..N become 0..N-1.
    #[arg(long)]
    reduce_zero_label: bool,
    /// Label value that is not scored.
    #[arg(long, default_value_t = 255)]
    ignore_index: u32,
    /// Print only {"mIoU", "mAcc", "aAcc", "per_class_iou": [...]} (fractions, null for NaN).
    #[arg(long)]
    json: bool,
}

fn main() {
    mobileone_cli::cli_main(run);
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Coco(args) => evaluate_coco(args),
        Command::Seg(args) => evaluate_seg(args),
    }
}

fn evaluate_coco(args: CocoArgs) -> Result<()> {
    let iou_type = match args.iou_type {
        IouArg::Bbox => IouType::Bbox,
        IouArg::Segm => IouType::Segm,
    };
    let gt = GroundTruth::from_path(&args.gt).context("loading the ground truth")?;
    let result = coco::evaluate_file(&gt, &args.dt, iou_type).context("evaluating detections")?;
    if result.input.unknown_category > 0 {
        eprintln!(
            "note: ignored {} detections of categories not in the ground truth (as pycocotools does)",
            result.input.unknown_category
        );
    }
    if result.input.negative_size > 0 {
        eprintln!(
            "note: {} detections have a negative width or height; they never match (as in pycocotools)",
            result.input.negative_size
        );
    }
    if args.json {
        println!("{}", result.to_json());
        return Ok(());
    }
    for line in result.summary_lines() {
        println!("{line}");
    }
    println!("\nPer category (percent; '-' where pycocotools has no value):");
    print!("{}", result.per_category_table());
    Ok(())
}

fn evaluate_seg(args: SegArgs) -> Result<()> {
    let mut names: Vec<String> = std::fs::read_dir(&args.gt)
        .with_context(|| format!("reading label folder {}", args.gt.display()))?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name.to_ascii_lowercase().ends_with(".png"))
        .collect();
    names.sort();
    if names.is_empty() {
        bail!("no .png label maps in {}", args.gt.display());
    }
    if let Some(missing) = names.iter().find(|n| !args.pred.join(n).is_file()) {
        bail!(
            "{} has no prediction {} ({} label maps in {})",
            args.gt.join(missing).display(),
            args.pred.join(missing).display(),
            names.len(),
            args.gt.display()
        );
    }

    let bar = ProgressBar::new(names.len() as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} maps [{elapsed} < {eta}]")
            .expect("static template"),
    );
    let empty = SegMetric::new(args.num_classes, args.ignore_index)?;
    let metric = names
        .par_iter()
        .try_fold(
            || empty.clone(),
            |mut metric, name| -> Result<SegMetric> {
                add_pair(
                    &mut metric,
                    &args.pred.join(name),
                    &args.gt.join(name),
                    args.reduce_zero_label,
                )?;
                bar.inc(1);
                Ok(metric)
            },
        )
        .try_reduce(
            || empty.clone(),
            |mut a, b| {
                a.merge(&b);
                Ok(a)
            },
        )?;
    bar.finish_and_clear();

    let result = metric.compute();
    if result.out_of_range_pred > 0 || result.out_of_range_label > 0 {
        eprintln!(
            "note: {} predicted and {} label pixels are outside 0..{} (not ignore {}); \
             they count as misses / are dropped, as in mmseg",
            result.out_of_range_pred,
            result.out_of_range_label,
            args.num_classes,
            args.ignore_index
        );
    }
    if args.json {
        println!("{}", result.to_json());
        return Ok(());
    }
    let pct = |v: Option<f64>| v.map_or("nan".to_string(), |v| format!("{:.2}", 100.0 * v));
    println!(
        "{} maps, {} classes: mIoU {}  mAcc {}  aAcc {}  (percent)",
        result.images,
        args.num_classes,
        pct(result.miou),
        pct(result.macc),
        pct(result.aacc)
    );
    print!("{}", result.per_class_table());
    Ok(())
}

fn add_pair(metric: &mut SegMetric, pred: &Path, gt: &Path, reduce_zero: bool) -> Result<()> {
    let prediction = LabelMap::read_png(pred)?;
    let mut label = LabelMap::read_png(gt)?;
    if (prediction.width, prediction.height) != (label.width, label.height) {
        bail!(
            "{} is {}x{} but its label {} is {}x{}",
            pred.display(),
            prediction.width,
            prediction.height,
            gt.display(),
            label.width,
            label.height
        );
    }
    if reduce_zero {
        reduce_zero_label(&mut label.labels);
    }
    metric.update(&prediction.labels, &label.labels)?;
    Ok(())
}
