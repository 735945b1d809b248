//! `dataset`: generate the synthetic shapes dataset, summarise a COCO / YOLO / VOC / ADE20K dataset,
//! convert between YOLO and COCO.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use mobileone_datasets::stats::{DetectionStats, SegmentationStats};
use mobileone_datasets::synth::{write_dataset, SynthConfig, SHAPE_CLASSES};
use mobileone_datasets::yolo::{self, YoloDataset};
use mobileone_datasets::{CocoDataset, SegmentationDataset};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "dataset",
    about = "Create and inspect detection/segmentation datasets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a synthetic "shapes" dataset (7 classes, 1-10 objects per image, occlusion, crowd
    /// regions) in COCO, Pascal VOC and ADE20K layouts under one folder.
    Synth(SynthArgs),
    /// Print image/annotation counts per class and size buckets. PATH is a COCO instances JSON
    /// file, a YOLO data.yaml, or a folder holding a COCO (annotations/instances_*.json), YOLO
    /// (data.yaml), VOC or ADE20K layout (all found layouts are summarised).
    Stats { path: PathBuf },
    /// Convert a detection dataset between the YOLO layout and COCO instances JSON.
    Convert(ConvertArgs),
    /// Write VOC semantic masks from COCO instances, as torchvision's segmentation reference builds them
    /// for its COCO-trained DeepLabV3 (20 VOC categories, overlaps 255, training images with more than
    /// 1000 px² of them), as a folder layout that `train seg --dataset folder` and `segment` read.
    CocoToVoc(CocoToVocArgs),
}

#[derive(clap::Args)]
struct CocoToVocArgs {
    /// COCO root holding annotations/instances_<split>2017.json and <split>2017/ images.
    #[arg(long)]
    data_root: PathBuf,
    /// Output folder: labels/<split>/<image>.png, <split>.txt and dataset.json (images stay in place).
    #[arg(long)]
    out: PathBuf,
    /// Splits to convert; `train` gets torchvision's training filter.
    #[arg(long, value_delimiter = ',', default_value = "train,val")]
    splits: Vec<String>,
}

#[derive(clap::Args)]
struct ConvertArgs {
    /// Source: a YOLO data.yaml (or its folder), or a COCO instances JSON.
    #[arg(long)]
    from: PathBuf,
    /// yolo-to-coco: a folder that receives annotations/instances_<split>.json for each split (images
    /// stay where they are; `file_name`s are relative to the split's image folder). coco-to-yolo: the
    /// YOLO root to write (images copied to images/<split>/, labels/<split>/*.txt, data.yaml).
    #[arg(long)]
    out: PathBuf,
    /// coco-to-yolo: the folder of the JSON's images.
    #[arg(long)]
    image_dir: Option<PathBuf>,
    /// coco-to-yolo: the split to write [default: val].
    #[arg(long, default_value = "val")]
    split: String,
}

#[derive(clap::Args)]
struct SynthArgs {
    /// Output folder (created; existing files of the same names are replaced).
    #[arg(long)]
    out: PathBuf,
    /// Number of images (train + val).
    #[arg(long, default_value_t = 1000)]
    images: usize,
    /// Random seed: the same seed gives the same dataset.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Width and height of the images in pixels.
    #[arg(long, default_value_t = 320)]
    size: u32,
    /// Share of the images put in the validation split.
    #[arg(long, default_value_t = 0.2)]
    val_fraction: f64,
    /// Smallest shape diameter in pixels; sizes are log-uniform up to 0.8 of the image.
    #[arg(long, default_value_t = 12.0)]
    min_object_size: f64,
    /// Most shapes per image (uniform in 1..=N, plus sometimes a crowd region).
    #[arg(long, default_value_t = 10)]
    max_objects: u32,
}

fn main() {
    mobileone_cli::cli_main(run);
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Synth(args) => synth(args),
        Command::Stats { path } => stats(&path),
        Command::Convert(args) => convert(&args),
        Command::CocoToVoc(args) => coco_to_voc(&args),
    }
}

fn coco_to_voc(args: &CocoToVocArgs) -> Result<()> {
    use mobileone_datasets::coco_voc::{keep_for_training, voc_class_names, voc_mask};
    let images_root = std::fs::canonicalize(&args.data_root)
        .with_context(|| format!("cannot find {}", args.data_root.display()))?;
    for split in &args.splits {
        let json = images_root
            .join("annotations")
            .join(format!("instances_{split}2017.json"));
        let dataset = CocoDataset::open(&json)?;
        let labels = args.out.join("labels").join(split);
        std::fs::create_dir_all(&labels)
            .with_context(|| format!("cannot create {}", labels.display()))?;
        let mut list = String::new();
        for image in &dataset.images {
            if split == "train" && !keep_for_training(&dataset, image.id) {
                continue;
            }
            let stem = Path::new(&image.file_name)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| image.id.to_string());
            let mask = voc_mask(&dataset, image.id)?;
            let png = mobileone_datasets::io::encode_label_png(
                &mask,
                Some(&mobileone_datasets::io::voc_palette()),
            )?;
            mobileone_datasets::io::write_atomic(&labels.join(format!("{stem}.png")), &png)?;
            list.push_str(&stem);
            list.push('\n');
        }
        let count = list.lines().count();
        mobileone_datasets::io::write_atomic(
            &args.out.join(format!("{split}.txt")),
            list.as_bytes(),
        )?;
        println!(
            "{split}: {count} of {} images written to {}",
            dataset.images.len(),
            labels.display()
        );
    }
    let config = mobileone_datasets::segmentation::FolderConfig {
        classes: voc_class_names(),
        palette: None,
        ignore_index: mobileone_datasets::IGNORE_INDEX,
        reduce_zero_label: false,
        img_dir: images_root.join("{split}2017").display().to_string(),
        ann_dir: "labels/{split}".into(),
        split_file: "{split}.txt".into(),
        img_suffix: ".jpg".into(),
        seg_map_suffix: ".png".into(),
    };
    let path = args
        .out
        .join(mobileone_datasets::segmentation::FOLDER_CONFIG_FILE);
    mobileone_datasets::io::write_atomic(&path, serde_json::to_string_pretty(&config)?.as_bytes())?;
    println!(
        "wrote {} (train with: train seg --dataset folder --data-root {})",
        path.display(),
        args.out.display()
    );
    Ok(())
}

fn convert(args: &ConvertArgs) -> Result<()> {
    let is_json = args.from.extension().is_some_and(|e| e == "json");
    if is_json {
        let dataset = CocoDataset::open(&args.from)?;
        let image_dir = args
            .image_dir
            .as_deref()
            .context("coco-to-yolo needs --image-dir, the folder of the JSON's images")?;
        let crowd = yolo::write_split(&dataset, image_dir, &args.out, &args.split)?;
        println!(
            "wrote {} images and their labels to {} (split `{}`){}",
            dataset.images.len(),
            args.out.display(),
            args.split,
            if crowd > 0 {
                format!("; {crowd} crowd annotation(s) left out (YOLO has no crowd flag)")
            } else {
                String::new()
            }
        );
        return Ok(());
    }
    let source = YoloDataset::open(&args.from)?;
    for split in source.split_names() {
        let read = source.split(&split)?;
        let json = args
            .out
            .join("annotations")
            .join(format!("instances_{split}.json"));
        let bytes = serde_json::to_vec(&read.dataset.to_file())?;
        mobileone_datasets::io::write_atomic(&json, &bytes)?;
        println!(
            "{split}: {} images, {} boxes ({} without area left out), image ids {} → {} (images in {})",
            read.dataset.images.len(),
            read.dataset.annotations.len(),
            read.dropped_empty,
            match read.image_ids {
                yolo::ImageIds::FromFileNames => "from the file names",
                yolo::ImageIds::Sequential => "1, 2, … in sorted order",
            },
            json.display(),
            read.image_root.display()
        );
    }
    Ok(())
}

fn yolo_stats(yaml: &Path) -> Result<()> {
    let source = YoloDataset::open(yaml)?;
    for split in source.split_names() {
        let start = Instant::now();
        let read = source.split(&split)?;
        println!(
            "== YOLO {} split `{split}` (read in {:.2}s; {} label line(s) without area left out)",
            source.yaml.display(),
            start.elapsed().as_secs_f64(),
            read.dropped_empty
        );
        println!("{}", DetectionStats::from_coco(&read.dataset));
    }
    Ok(())
}

fn synth(args: SynthArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&args.val_fraction) {
        bail!(
            "--val-fraction must be in [0, 1], got {}",
            args.val_fraction
        );
    }
    let config = SynthConfig {
        images: args.images,
        seed: args.seed,
        size: args.size,
        val_fraction: args.val_fraction,
        min_object_size: args.min_object_size,
        max_objects: args.max_objects,
    };
    let bar = ProgressBar::new(args.images as u64).with_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} images, {per_sec}, eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message("generating");
    let start = Instant::now();
    let summary = write_dataset(&args.out, &config, &|| bar.inc(1))
        .with_context(|| format!("writing the synthetic dataset to {}", args.out.display()))?;
    bar.finish_and_clear();
    println!(
        "wrote {} train + {} val images ({} annotations, {} crowd; classes: {}) to {} in {:.1}s",
        summary.train_images,
        summary.val_images,
        summary.annotations,
        summary.crowd,
        SHAPE_CLASSES.join(", "),
        args.out.display(),
        start.elapsed().as_secs_f64()
    );
    println!(
        "  COCO:   {0}/annotations/instances_{{train,val}}.json, {0}/{{train,val}}/\n  VOC:    {0}/VOC2012\n  ADE20K: {0}/ADEChallengeData2016",
        args.out.display()
    );
    Ok(())
}

fn stats(path: &Path) -> Result<()> {
    if path.is_file() {
        let is_yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        return if is_yaml {
            yolo_stats(path)
        } else {
            coco_stats(path)
        };
    }
    if !path.is_dir() {
        bail!("{}: no such file or folder", path.display());
    }
    let mut found = false;
    if path.join("data.yaml").is_file() {
        yolo_stats(&path.join("data.yaml"))?;
        found = true;
    }
    let folder_config = path.join(mobileone_datasets::segmentation::FOLDER_CONFIG_FILE);
    if folder_config.is_file() {
        let config = mobileone_datasets::segmentation::FolderConfig::read(&folder_config)?;
        for split in ["train", "val", "test"] {
            if path
                .join(config.split_file.replace("{split}", split))
                .is_file()
            {
                let dataset = SegmentationDataset::folder(path, split, &config)?;
                segmentation_stats(&format!("segmentation folder, split `{split}`"), &dataset)?;
                found = true;
            }
        }
    }
    let annotations = path.join("annotations");
    if annotations.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&annotations)
            .with_context(|| format!("listing {}", annotations.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|e| e == "json")
                    && p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("instances_"))
            })
            .collect();
        files.sort();
        for file in files {
            coco_stats(&file)?;
            found = true;
        }
    }
    if ["JPEGImages", "VOC2012", "VOCdevkit"]
        .iter()
        .any(|d| path.join(d).is_dir())
    {
        let dataset = SegmentationDataset::voc(path, None, false)?;
        segmentation_stats("Pascal VOC", &dataset)?;
        found = true;
    }
    let ade_base = if path.join("ADEChallengeData2016").is_dir() {
        Some(path.join("ADEChallengeData2016"))
    } else if path.join("images").is_dir() && path.join("annotations").is_dir() {
        Some(path.to_path_buf())
    } else {
        None
    };
    if let Some(base) = ade_base {
        let splits: Vec<Option<&str>> = ["training", "validation"]
            .into_iter()
            .filter(|s| base.join("annotations").join(s).is_dir())
            .map(Some)
            .collect();
        // A folder of COCO annotations JSON next to images is not an ADE20K layout.
        let flat_pngs = splits.is_empty() && has_png(&base.join("annotations"));
        for split in if flat_pngs { vec![None] } else { splits } {
            let dataset = SegmentationDataset::ade20k(&base, split)?;
            let title = format!("ADE20K {}", split.unwrap_or("(all)"));
            segmentation_stats(&title, &dataset)?;
            found = true;
        }
    }
    if !found {
        bail!(
            "{}: found no COCO annotations/instances_*.json, VOC (JPEGImages) or ADE20K (images/ + annotations/) layout",
            path.display()
        );
    }
    Ok(())
}

fn has_png(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .filter_map(|e| e.ok())
            .any(|e| e.path().extension().is_some_and(|x| x == "png"))
    })
}

fn coco_stats(file: &Path) -> Result<()> {
    let start = Instant::now();
    let dataset = CocoDataset::open(file)?;
    println!(
        "== COCO {} (read in {:.2}s)",
        file.display(),
        start.elapsed().as_secs_f64()
    );
    println!("{}", DetectionStats::from_coco(&dataset));
    Ok(())
}

fn segmentation_stats(title: &str, dataset: &SegmentationDataset) -> Result<()> {
    let stats = SegmentationStats::from_dataset(dataset)?;
    println!("== {title} {}", dataset.root.display());
    println!("{stats}");
    Ok(())
}
