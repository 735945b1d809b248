//! `train`: trains SSDLite (`train det`) or DeepLabV3 (`train seg`) on a MobileOne trunk.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use mobileone::Variant;
// Linked for its global allocator (`mobileone_cli`), which this tool shares with the others.
use mobileone_cli as _;
use mobileone_train::{
    Augment, DatasetKind, OptimizerKind, Outcome, RunSettings, TaskKind, Trainer,
};

#[derive(Clone, Copy, ValueEnum)]
enum Command {
    /// SSDLite detection (multibox loss, COCO mAP).
    Det,
    /// DeepLabV3 semantic segmentation (cross-entropy with ignore index 255, mIoU).
    Seg,
}

#[derive(Parser)]
#[command(
    name = "train",
    version,
    about = "Train SSDLite (det) or DeepLabV3 (seg) on MobileOne, from ImageNet weights or from scratch",
    long_about = "Train SSDLite (det) or DeepLabV3 (seg) on the train-time multi-branch MobileOne with \
                  candle's autograd (BatchNorm in training mode).\n\n\
                  Each epoch ends with a validation (COCO box mAP@[.5:.95] / mAP@0.5, or mIoU / aAcc) \
                  printed and logged to <out>/metrics.csv and metrics.json, the curves in <out>/curves.png, \
                  and the checkpoints <out>/last.safetensors (every epoch) and best.safetensors (best \
                  validation), which hold the weights, the optimizer state and the run state: --resume \
                  continues exactly. Ctrl-C saves last.safetensors and stops; a NaN/inf loss stops and \
                  keeps the last good checkpoint. At the end <out>/fused.safetensors holds the \
                  reparameterised model with BatchNorms folded, as detect / segment load it.\n\n\
                  Data (--data-root): det reads COCO layouts (annotations/instances_{train,val}[2017].json \
                  with {train,val}[2017]/ images), seg reads VOC 2012 (ImageSets/Segmentation/{train,val}.txt) \
                  or ADE20K (training/validation); --dataset synth reads a folder written by `dataset synth`."
)]
struct Cli {
    /// What to train.
    #[arg(value_enum)]
    command: Command,
    /// Dataset format: coco, yolo (data.yaml), voc, ade20k, folder (images + label PNGs described by
    /// a JSON config, e.g. CamVid) or synth.
    #[arg(long)]
    dataset: DatasetKind,
    /// folder: the JSON that describes the layout and classes [default: <data-root>/dataset.json];
    /// datasets/configs/camvid.json describes CamVid.
    #[arg(long, value_name = "JSON")]
    dataset_config: Option<PathBuf>,
    /// Split to validate on (e.g. CamVid's `test`).
    #[arg(long, default_value = "val", value_name = "SPLIT")]
    val_split: String,
    /// Dataset folder.
    #[arg(long)]
    data_root: PathBuf,
    /// MobileOne variant of the trunk.
    #[arg(long, default_value = "s0")]
    variant: Variant,
    /// Trunk weights to start from, e.g. timm's or Apple's ImageNet checkpoint; random initialisation
    /// without it. A reparameterised (fused) checkpoint is fine-tuned in that form (one conv per
    /// layer); a train-time one keeps its branches.
    #[arg(long, value_name = "W")]
    init_backbone: Option<PathBuf>,
    /// With a reparameterised --init-backbone: also train its train-time branches, started so that the
    /// trunk computes the fused function in eval mode (first conv branch = the fused kernel, the other
    /// branches off with zero BatchNorm scale), instead of fine-tuning the fused form.
    #[arg(long, requires = "init_backbone")]
    init_branches: bool,
    /// Learning rate of the trunk as a multiple of the heads' (parameter groups)
    /// [default: 0.2 with --init-backbone, else 1].
    #[arg(long, value_name = "X")]
    backbone_lr_mult: Option<f64>,
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Images per optimizer step [default: 16 for det, 8 for seg].
    #[arg(long)]
    batch: Option<usize>,
    /// Side of the square training input in pixels [default: 320 for det (SSDLite-320), 512 for seg];
    /// a warning says when it upscales the dataset's images.
    #[arg(long)]
    size: Option<usize>,
    /// Peak learning rate (default: 1e-3 for adamw, 0.05 for sgd).
    #[arg(long)]
    lr: Option<f64>,
    /// adamw (betas 0.9, 0.999; the measured recipe) or sgd (momentum 0.9).
    #[arg(long, default_value = "adamw")]
    optimizer: OptimizerKind,
    /// Weight decay of conv/linear weights (default: 4e-5 for sgd as torchvision's SSDLite, 0.01 for adamw).
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Anneal the weight decay along a cosine down to this value (the MobileOne paper: 1e-4 → 1e-5).
    #[arg(long)]
    weight_decay_end: Option<f64>,
    /// Linear learning-rate warm-up, in epochs (fractions allowed), before the cosine decay
    /// [default: 3 % of the run, as the calibration recipe].
    #[arg(long)]
    warmup_epochs: Option<f64>,
    /// Clip the global gradient norm to this value.
    #[arg(long, value_name = "MAX_NORM")]
    clip_grad: Option<f64>,
    /// Seed of the initialisation, data order, augmentation and dropout: same seed, same run.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compute threads of the native kernels (default: RAYON_NUM_THREADS, else one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Data-loading threads.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Output folder for checkpoints, logs and curves (`--out-dir` as in detect and segment).
    #[arg(long, visible_alias = "out-dir", default_value = "runs/train")]
    out: PathBuf,
    /// Continue a run from its last.safetensors / best.safetensors (same settings required).
    #[arg(long, value_name = "CKPT")]
    resume: Option<PathBuf>,
    /// Validate every N epochs (and after the last).
    #[arg(long, default_value_t = 1, value_name = "N")]
    val_every: usize,
    /// Augmentation: full (the reference recipe: SSD crops / mmseg rescale + crop), flip (photometric
    /// + flip, no crops) or none [default: flip for det, the measured fine-tuning recipe; full for seg].
    #[arg(long)]
    augment: Option<Augment>,
    /// seg: add torchvision's auxiliary FCN head on the stride-16 features (loss weight 0.5).
    #[arg(long)]
    aux_loss: bool,
    /// seg: output stride of the trunk, 16 or 8 (dilation).
    #[arg(long, default_value_t = 16)]
    output_stride: usize,
    /// seg: width of the ASPP branches, projection and 3x3 refinement conv [default: 256, as
    /// torchvision]; a narrower head (e.g. 64) makes a much smaller model.
    #[arg(long, value_name = "N")]
    head_channels: Option<usize>,
    /// seg: dilations of the three 3x3 ASPP branches [default: 12,24,36].
    #[arg(long, value_delimiter = ',', num_args = 1, value_name = "A,B,C")]
    atrous_rates: Option<Vec<usize>>,
    /// Without a terminal (logs), print a progress line every N steps, and at least every 30 s.
    #[arg(long, default_value_t = 50, value_name = "N")]
    log_every: u64,
}

fn run() -> Result<i32> {
    let cli = Cli::parse();
    // Always: it also keeps candle's spin-waiting element-wise pool out of the kernels' way (3x
    // slower training measured on 2 cores with both pools).
    mobileone::ops::set_threads(cli.threads.unwrap_or(0))
        .context("cannot start the worker threads")?;
    if matches!(cli.command, Command::Det) {
        for (given, flag) in [
            (cli.head_channels.is_some(), "--head-channels"),
            (cli.atrous_rates.is_some(), "--atrous-rates"),
        ] {
            if given {
                bail!("{flag} sets the DeepLabV3 head: it applies to `train seg` only");
            }
        }
    }
    let sgd = matches!(cli.optimizer, OptimizerKind::Sgd { .. });
    let det = matches!(cli.command, Command::Det);
    let settings = RunSettings {
        task: match cli.command {
            Command::Det => TaskKind::Det,
            Command::Seg => TaskKind::Seg,
        },
        dataset: cli.dataset,
        data_root: cli.data_root,
        variant: cli.variant,
        backbone_lr_mult: cli
            .backbone_lr_mult
            .unwrap_or(if cli.init_backbone.is_some() {
                0.2
            } else {
                1.0
            }),
        fused_trunk: false,
        branches_from_fused: cli.init_branches,
        dataset_config: cli.dataset_config,
        val_split: cli.val_split,
        init_backbone: cli.init_backbone,
        epochs: cli.epochs,
        batch_size: cli.batch.unwrap_or(if det { 16 } else { 8 }),
        image_size: cli.size.unwrap_or(if det { 320 } else { 512 }),
        lr: cli.lr.unwrap_or(if sgd { 0.05 } else { 1e-3 }),
        optimizer: cli.optimizer,
        weight_decay: cli.weight_decay.unwrap_or(if sgd { 4e-5 } else { 0.01 }),
        weight_decay_end: cli.weight_decay_end,
        warmup_epochs: cli.warmup_epochs.unwrap_or(0.03 * cli.epochs as f64),
        clip_grad: cli.clip_grad,
        seed: cli.seed,
        workers: cli.workers,
        val_every: cli.val_every,
        augment: cli
            .augment
            .unwrap_or(if det { Augment::Flip } else { Augment::Full }),
        aux_loss: cli.aux_loss,
        output_stride: cli.output_stride,
        head_channels: cli
            .head_channels
            .unwrap_or(deeplabv3::config::DEFAULT_HEAD_CHANNELS),
        atrous_rates: cli
            .atrous_rates
            .unwrap_or_else(|| deeplabv3::config::DEFAULT_ATROUS_RATES.to_vec()),
    };
    let mut trainer = Trainer::new(settings.clone(), &cli.out, cli.resume.as_deref())?;
    trainer.log_every = cli.log_every;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: exiting without saving");
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to quit at once)");
    })
    .context("cannot install the Ctrl-C handler")?;
    println!(
        "training {} MobileOne-{} on {} ({:?}), {} steps/epoch x {} epochs, batch {}, {} px, {} lr {} wd {}, {} threads{}",
        match settings.task {
            TaskKind::Det => "SSDLite",
            TaskKind::Seg => "DeepLabV3",
        },
        settings.variant,
        settings.data_root.display(),
        settings.dataset,
        trainer.steps_per_epoch(),
        settings.epochs,
        settings.batch_size,
        settings.image_size,
        settings.optimizer.name(),
        settings.lr,
        settings.weight_decay,
        mobileone::ops::current_threads(),
        match trainer.completed_epochs() {
            0 if trainer.global_step() == 0 => String::new(),
            done => format!(", resumed after {done} epochs + {} steps", trainer.global_step() - done as u64 * trainer.steps_per_epoch()),
        }
    );
    match trainer.run(&stop)? {
        Outcome::Finished { fused, best_metric } => {
            println!(
                "done: fused model {}{}; checkpoints, metrics.csv and curves.png in {}",
                fused.display(),
                best_metric.map_or(String::new(), |m| format!(", best {m:.4}")),
                cli.out.display()
            );
            Ok(0)
        }
        Outcome::Interrupted { checkpoint } => {
            println!(
                "stopped: saved {}; continue with --resume {}",
                checkpoint.display(),
                checkpoint.display()
            );
            Ok(130)
        }
    }
}

fn main() {
    mobileone::ops::retain_freed_memory();
    match run() {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
