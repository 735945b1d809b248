//! `detect`: SSDLite object detection with a MobileOne trunk, on images or over a COCO dataset.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use mobileone::Variant;
use mobileone_cli::detections::{coco_results, draw, summary, table, CocoResult};
use mobileone_cli::{bundled, imageio, output};
use mobileone_datasets::CocoDataset;
use mobileone_eval::coco::{evaluate_bbox, Detection as EvalDetection, GroundTruth};
use ssdlite::{Detection, ImageView, Labels, Overrides, SsdDetector, StageTimes};

#[derive(Clone, Copy, ValueEnum)]
enum DatasetKind {
    /// <data-root>/annotations/instances_<split>.json with images in <data-root>/<split>.
    Coco,
    /// A YOLO data.yaml (or the folder holding it); --split names its split (default val).
    Yolo,
}

#[derive(Parser)]
#[command(
    name = "detect",
    version,
    about = "Object detection with SSDLite on MobileOne: boxes for images, COCO mAP over a dataset",
    long_about = "Object detection with SSDLite (torchvision's SSD with separable heads; the input size is the \
                  checkpoint's) on a \
                  MobileOne trunk.\n\n\
                  With images (files or folders): prints a table of detections per image, saves the photos \
                  with labelled boxes into a fresh runs/detect/predict<N> folder (--out-dir to choose, \
                  --no-save to skip) and optionally COCO-style results (--json).\n\
                  With --dataset coco|yolo: runs over a COCO layout (<data-root>/annotations/instances_<split>.json, \
                  <data-root>/<split>/*.jpg) or a YOLO data.yaml and prints the 12 COCO box statistics \
                  (pycocotools-exact) over the categories the model predicts.\n\n\
                  Architecture, classes and normalisation come from the checkpoint's metadata; the flags \
                  below override them for checkpoints without metadata (e.g. trained with torchvision).\n\n\
                  Without --weights it runs the bundled person detector \
                  (models/ssdlite_mobileone_s0_coco_person.safetensors: SSDLite-320 on Apple's ImageNet \
                  MobileOne-S0, fine-tuned on COCO person boxes); with no image either, on the bundled \
                  photo models/astronaut.jpg. MOBILEONE_MODELS_DIR names another folder holding those files."
)]
struct Cli {
    /// Images or folders of images (JPEG, PNG) [default without --weights: the bundled
    /// models/astronaut.jpg].
    images: Vec<PathBuf>,
    /// Detector weights (.safetensors with torchvision SSD key names) [default: the bundled person
    /// detector, models/ssdlite_mobileone_s0_coco_person.safetensors].
    #[arg(long)]
    weights: Option<PathBuf>,
    /// MobileOne variant of the trunk (default: metadata, else guessed from the weights).
    #[arg(long)]
    variant: Option<Variant>,
    /// Number of classes including background (default: metadata, else the head's width).
    #[arg(long)]
    num_classes: Option<usize>,
    /// Side of the square network input (default: the checkpoint's metadata — 320 for the bundled
    /// detector — else 320).
    #[arg(long)]
    image_size: Option<usize>,
    /// Keep detections scoring above this [default: 0.3 for images, 0.001 with --dataset].
    #[arg(long)]
    score_thresh: Option<f32>,
    /// IoU above which a lower-scoring box of the same class is suppressed.
    #[arg(long, default_value_t = 0.55)]
    nms_thresh: f32,
    /// Detections kept per image.
    #[arg(long, default_value_t = 300)]
    max_dets: usize,
    /// Rows of the per-image table printed (and boxes drawn); the JSON keeps every detection.
    #[arg(long, default_value_t = 10, value_name = "N")]
    show: usize,
    /// Write the detections as a COCO results JSON (category_id, bbox [x, y, w, h], score, image_id, file_name).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Save each image with its labelled boxes (same name and format) into DIR [default: a fresh
    /// runs/detect/predict, predict2, … under the current folder, so reruns never overwrite].
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// Draw nothing and save no pictures (the table and --json still come out).
    #[arg(long, conflicts_with = "out_dir")]
    no_save: bool,
    /// Reparameterise the trunk and fold the heads' BatchNorms before running (same detections, faster).
    #[arg(long)]
    fuse: bool,
    /// Time N detections of the first image (preprocessing, network and post-processing) and print them.
    #[arg(long, value_name = "N")]
    bench: Option<usize>,
    /// Worker threads (default: RAYON_NUM_THREADS, else one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Evaluate over a dataset instead of images.
    #[arg(long, value_enum, requires = "data_root")]
    dataset: Option<DatasetKind>,
    /// Root of the dataset (COCO layout).
    #[arg(long)]
    data_root: Option<PathBuf>,
    /// Dataset split [default: val2017 for coco, val for yolo].
    #[arg(long)]
    split: Option<String>,
    /// Instances JSON, when not at <data-root>/annotations/instances_<split>.json. With images
    /// instead of --dataset, it gives the results' image_id by file name (so the --json file can be
    /// evaluated against it).
    #[arg(long, visible_alias = "gt")]
    annotations: Option<PathBuf>,
    /// Evaluate a model whose class names differ from the dataset's: MODEL=DATASET pairs, e.g.
    /// `--label-map cat=domestic_cat,car=automobile`; model classes not listed are matched by name.
    #[arg(long, value_delimiter = ',', value_name = "MODEL=DATASET")]
    label_map: Vec<String>,
    /// Image folder, when not <data-root>/<split>.
    #[arg(long)]
    image_dir: Option<PathBuf>,
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
            bail!(
                "give one or more images or folders, or --dataset coco --data-root DIR (see --help)"
            );
        }
        // The out-of-the-box demo: bundled model on the bundled photo.
        cli.images = vec![bundled::demo_image(bundled::DEMO_IMAGE)?];
    }
    let (detector, labels) = load_detector(&cli)?;
    match cli.dataset {
        Some(_) => evaluate_coco(&cli, &detector, &labels),
        None => {
            let dir = output::save_dir("detect", "predict", cli.out_dir.as_deref(), cli.no_save);
            detect_images(&cli, &detector, &labels, dir.as_deref())
        }
    }
}

fn load_detector(cli: &Cli) -> Result<(SsdDetector, Labels)> {
    let weights =
        bundled::weights_or_bundled(cli.weights.as_deref(), bundled::DETECTOR, "detector")?;
    let overrides = Overrides {
        variant: cli.variant,
        num_classes: cli.num_classes,
        image_size: cli.image_size,
    };
    let (mut detector, labels) = SsdDetector::load(&weights, &overrides, &Device::Cpu)
        .with_context(|| format!("cannot load detector weights {}", weights.display()))?;
    if cli.fuse && !detector.is_fused() {
        detector.fuse().context("cannot fuse the detector")?;
    }
    let default_thresh = if cli.dataset.is_some() { 0.001 } else { 0.3 };
    detector.postprocess.score_thresh = cli.score_thresh.unwrap_or(default_thresh);
    detector.postprocess.nms_thresh = cli.nms_thresh;
    detector.postprocess.detections_per_img = cli.max_dets;
    Ok((detector, labels))
}

fn detect_one(
    detector: &SsdDetector,
    image: &image::RgbImage,
) -> Result<(Vec<Detection>, StageTimes)> {
    let view = ImageView {
        pixels: image.as_raw(),
        height: image.height() as usize,
        width: image.width() as usize,
    };
    let (mut found, times) = detector.detect_timed(&[view], &Device::Cpu)?;
    Ok((found.remove(0), times))
}

/// The COCO `image_id` of each file: from the `file_name`s of `--annotations` when given, else the
/// file stems when every one is a distinct number (COCO's `000000128372.jpg` → 128372), else 1, 2, ….
/// Returns the ids and how they were chosen.
fn image_ids(files: &[PathBuf], annotations: Option<&Path>) -> Result<(Vec<u64>, String)> {
    if let Some(path) = annotations {
        let dataset = CocoDataset::open(path)
            .with_context(|| format!("cannot read {} for image ids", path.display()))?;
        let by_name: std::collections::HashMap<&str, u64> = dataset
            .images
            .iter()
            .map(|i| {
                (
                    Path::new(&i.file_name)
                        .file_name()
                        .and_then(|n| n.to_str())
                        .unwrap_or(""),
                    i.id,
                )
            })
            .collect();
        let ids = files
            .iter()
            .map(|f| {
                by_name
                    .get(output::file_name(f).as_str())
                    .copied()
                    .with_context(|| {
                        format!(
                            "{} is not an image of {} (no such file_name)",
                            f.display(),
                            path.display()
                        )
                    })
            })
            .collect::<Result<Vec<u64>>>()?;
        return Ok((ids, format!("from the file names of {}", path.display())));
    }
    let numeric: Option<Vec<u64>> = files
        .iter()
        .map(|f| f.file_stem()?.to_str()?.parse::<u64>().ok())
        .collect();
    match numeric {
        Some(ids) if ids.iter().collect::<std::collections::HashSet<_>>().len() == ids.len() => {
            Ok((ids, "the numbers in the file names".into()))
        }
        _ => Ok((
            (1..=files.len() as u64).collect(),
            "1, 2, … in the order listed (name --annotations to take them from a COCO file)".into(),
        )),
    }
}

fn detect_images(
    cli: &Cli,
    detector: &SsdDetector,
    labels: &Labels,
    save: Option<&Path>,
) -> Result<()> {
    let files = imageio::expand_inputs(&cli.images)?;
    if save.is_some() {
        output::distinct_stems(&files)?;
    }
    let (ids, id_source) = image_ids(&files, cli.annotations.as_deref())?;
    let bar = progress_bar(files.len(), files.len() > 1);
    let mut results: Vec<CocoResult> = Vec::new();
    let mut failures = Vec::new();
    let mut speed = output::Speed::default();
    for (index, path) in files.iter().enumerate() {
        let name = output::file_name(path);
        let outcome = (|| -> Result<()> {
            let start = Instant::now();
            let mut image = imageio::load_rgb(path)?;
            let decode = start.elapsed();
            let (detections, times) = detect_one(detector, &image)?;
            speed.add([decode, times.preprocess, times.inference, times.postprocess]);
            let ms = (times.preprocess + times.inference + times.postprocess).as_secs_f64() * 1e3;
            bar.suspend(|| {
                println!(
                    "{name} {}x{}: {}, {ms:.1} ms",
                    image.width(),
                    image.height(),
                    summary(&detections, labels)
                );
                print!("{}", table(&detections, labels, cli.show));
            });
            results.extend(coco_results(&detections, labels, ids[index], &name));
            if let Some(dir) = save {
                draw(
                    &mut image,
                    &detections[..detections.len().min(cli.show.max(1))],
                    labels,
                );
                output::write_picture(&output::picture_path(dir, path, ""), &image)?;
            }
            Ok(())
        })();
        if let Err(e) = outcome {
            bar.suspend(|| eprintln!("error: {e:#}"));
            failures.push(name);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    if let Some(json) = &cli.json {
        // With no image read there is nothing to report: no empty file left behind.
        if failures.len() < files.len() {
            write_json(json, &results)?;
            println!(
                "wrote {} detection(s) to {} (image_id: {id_source})",
                results.len(),
                json.display()
            );
        } else {
            eprintln!("{} not written: no image was read", json.display());
        }
    }
    if speed.images() > 0 {
        let size = detector.config.image_size;
        println!("{}", speed.line(&format!("at {size}x{size}")));
    }
    output::print_saved(save);
    if let (Some(runs), Some(first)) = (cli.bench, files.first()) {
        bench(detector, first, runs)?;
    }
    output::failures(&failures, files.len())
}

fn progress_bar(len: usize, visible: bool) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    ProgressBar::new(len as u64).with_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} images [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid progress template"),
    )
}

fn write_json(path: &Path, results: &[CocoResult]) -> Result<()> {
    let bytes = serde_json::to_vec(results)?;
    mobileone::checkpoint::write_atomic(path, &bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

fn bench(detector: &SsdDetector, path: &Path, runs: usize) -> Result<()> {
    let image = imageio::load_rgb(path)?;
    detect_one(detector, &image)?; // warm-up
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        detect_one(detector, &image)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let size = detector.config.image_size;
    let what = format!(
        "detect {} (network {size}x{size}, pre- and post-processing included)",
        output::file_name(path)
    );
    println!(
        "{}",
        mobileone_cli::bench::bench_line(
            &what,
            (image.width() as usize, image.height() as usize),
            &mut times
        )
    );
    Ok(())
}

/// The model's labels mapped onto the dataset's categories, by name (or `--label-map`); a model class
/// the dataset does not have is refused with both lists, so that a model is never scored on
/// categories it does not know (ids 1..7 of a shapes model would collide with person…train).
fn match_labels(labels: &Labels, dataset: &CocoDataset, label_map: &[String]) -> Result<Labels> {
    let mut renamed = std::collections::HashMap::new();
    for pair in label_map {
        let (model, data) = pair
            .split_once('=')
            .with_context(|| format!("--label-map `{pair}`: expected MODEL=DATASET"))?;
        renamed.insert(model.trim().to_string(), data.trim().to_string());
    }
    let by_name: std::collections::HashMap<&str, u64> = dataset
        .categories
        .iter()
        .map(|c| (c.name.as_str(), c.id))
        .collect();
    let mut category_ids = vec![0u64; labels.names.len()];
    let mut missing = Vec::new();
    for (label, name) in labels.names.iter().enumerate().skip(1) {
        let wanted = renamed.get(name).unwrap_or(name);
        match by_name.get(wanted.as_str()) {
            Some(&id) => category_ids[label] = id,
            None if name.starts_with("N/A") || name == "__background__" => {} // torchvision's COCO gaps
            None => missing.push(name.clone()),
        }
    }
    if !missing.is_empty() {
        let dataset_names: Vec<&str> = dataset.categories.iter().map(|c| c.name.as_str()).collect();
        bail!(
            "the model's classes {missing:?} are not categories of {} (it has: {}); match them with \
             --label-map MODEL=DATASET,... or evaluate on a dataset of the model's classes",
            dataset.path.display(),
            dataset_names.join(", ")
        );
    }
    Ok(Labels {
        names: labels.names.clone(),
        category_ids,
    })
}

/// The ground truth restricted to `category_ids` (pycocotools' `params.catIds`): a detector is
/// scored on the categories it predicts, the images staying the same.
fn restricted_ground_truth(dataset: &CocoDataset, category_ids: &[u64]) -> Result<GroundTruth> {
    let keep: std::collections::HashSet<u64> =
        category_ids.iter().copied().filter(|&c| c != 0).collect();
    let mut file = dataset.to_file();
    file.categories.retain(|c| keep.contains(&c.id));
    file.annotations.retain(|a| keep.contains(&a.category_id));
    Ok(GroundTruth::from_json(
        &serde_json::to_vec(&file)?,
        &dataset.path.display().to_string(),
    )?)
}

fn evaluate_coco(cli: &Cli, detector: &SsdDetector, labels: &Labels) -> Result<()> {
    let root = cli
        .data_root
        .as_ref()
        .expect("clap requires --data-root with --dataset");
    let (dataset, image_dir) = match cli.dataset {
        Some(DatasetKind::Yolo) => {
            let yolo = mobileone_datasets::yolo::YoloDataset::open(root)?;
            let split = yolo.split(cli.split.as_deref().unwrap_or("val"))?;
            (
                split.dataset,
                cli.image_dir.clone().unwrap_or(split.image_root),
            )
        }
        _ => {
            let split = cli.split.as_deref().unwrap_or("val2017");
            let annotations = cli.annotations.clone().unwrap_or_else(|| {
                root.join("annotations")
                    .join(format!("instances_{split}.json"))
            });
            let dataset = CocoDataset::open(&annotations).with_context(|| {
                format!("cannot read COCO annotations {}", annotations.display())
            })?;
            (
                dataset,
                cli.image_dir.clone().unwrap_or_else(|| root.join(split)),
            )
        }
    };
    let annotations = dataset.path.clone();
    if dataset.images.is_empty() {
        bail!("{} lists no images", annotations.display());
    }
    let labels = &match_labels(labels, &dataset, &cli.label_map)?;
    let ground_truth = restricted_ground_truth(&dataset, &labels.category_ids)
        .with_context(|| format!("cannot load ground truth {}", annotations.display()))?;
    let evaluated = ground_truth.categories();
    println!(
        "evaluating {} of the dataset's {} categories (those the model predicts): {}",
        evaluated.len(),
        dataset.categories.len(),
        evaluated
            .iter()
            .map(|(_, n)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let bar = progress_bar(dataset.images.len(), true);
    let mut results: Vec<CocoResult> = Vec::new();
    let start = Instant::now();
    for info in &dataset.images {
        let path = image_dir.join(&info.file_name);
        let image = imageio::load_rgb(&path)
            .with_context(|| format!("image {} of {}", info.id, annotations.display()))?;
        if (image.width(), image.height()) != (info.width, info.height) {
            bail!(
                "{} is {}x{} but the annotations say {}x{}",
                path.display(),
                image.width(),
                image.height(),
                info.width,
                info.height
            );
        }
        let (detections, _) = detect_one(detector, &image)?;
        results.extend(coco_results(&detections, labels, info.id, &info.file_name));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{} images, {} detections in {seconds:.1} s ({:.1} ms/image)",
        dataset.images.len(),
        results.len(),
        1e3 * seconds / dataset.images.len() as f64
    );
    if let Some(json) = &cli.json {
        write_json(json, &results)?;
        println!("wrote {}", json.display());
    }
    if results.is_empty() {
        bail!(
            "no detections above --score-thresh {}: nothing to evaluate",
            detector.postprocess.score_thresh
        );
    }
    let detections: Vec<EvalDetection> = results
        .iter()
        .map(|r| EvalDetection {
            image_id: r.image_id,
            category_id: r.category_id,
            bbox: r.bbox,
            score: r.score,
        })
        .collect();
    let stats = evaluate_bbox(&ground_truth, &detections).context("COCO evaluation failed")?;
    for line in stats.summary_lines() {
        println!("{line}");
    }
    Ok(())
}
