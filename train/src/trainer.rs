//! The training loop: steps with gradient clipping and non-finite checks, per-epoch validation and
//! logs, `last` / `best` checkpoints holding the model, the optimizer state and the run state (so
//! `--resume` continues exactly, mid-epoch included), interruption, and the fused export.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::Device;
use candle_nn::VarMap;
use indicatif::{ProgressBar, ProgressStyle};
use mobileone::checkpoint::{self, CheckpointError};
use mobileone::Variant;
use mobileone_datasets::Batch;

use crate::detection::DetectionTask;
use crate::error::{Result, TrainError};
use crate::init::seeded_var_builder;
use crate::metrics::{write_logs, EpochRecord};
use crate::optim::{grad_norm, trainable_params, Optimizer, OptimizerKind};
use crate::schedule::{annealed_weight_decay, CosineSchedule};
use crate::segmentation::SegmentationTask;
use crate::task::{Augment, DatasetKind, Task, TaskKind};

/// Prefix of the optimizer state in checkpoints (ignored by the model loaders).
pub const OPTIMIZER_PREFIX: &str = "optimizer.";
/// Metadata key of the run state (JSON) in checkpoints.
pub const TRAIN_STATE_KEY: &str = "train_state";
pub const LAST: &str = "last.safetensors";
pub const BEST: &str = "best.safetensors";
pub const FUSED: &str = "fused.safetensors";
pub const CURVES: &str = "curves.png";

mod variant_serde {
    use mobileone::Variant;
    pub fn serialize<S: serde::Serializer>(v: &Variant, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Variant, D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Everything that decides the trained weights; stored in checkpoints so a resume can check it is
/// continuing the same run.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunSettings {
    pub task: TaskKind,
    pub dataset: DatasetKind,
    pub data_root: PathBuf,
    #[serde(with = "variant_serde")]
    pub variant: Variant,
    /// ImageNet (or other) weights of the train-time trunk to start from; random init otherwise.
    pub init_backbone: Option<PathBuf>,
    pub epochs: usize,
    pub batch_size: usize,
    /// Side of the square training input.
    pub image_size: usize,
    pub lr: f64,
    pub optimizer: OptimizerKind,
    pub weight_decay: f64,
    /// Weight decay at the end of the run, annealed along a cosine (MobileOne paper); `None`: constant.
    pub weight_decay_end: Option<f64>,
    pub warmup_epochs: f64,
    /// Maximum global gradient norm; `None`: no clipping.
    pub clip_grad: Option<f64>,
    pub seed: u64,
    /// Data-loading threads.
    pub workers: usize,
    /// Validate every this many epochs (and after the last).
    pub val_every: usize,
    pub augment: Augment,
    /// Segmentation: auxiliary FCN head on the stride-16 features, loss weight 0.5.
    pub aux_loss: bool,
    /// Segmentation: output stride of the trunk (16 or 8 by dilation).
    pub output_stride: usize,
    /// Segmentation: width of the ASPP branches and the layers after them (torchvision: 256).
    /// Checkpoints written before this setting existed were trained with the default.
    #[serde(default = "default_head_channels")]
    pub head_channels: usize,
    /// Segmentation: dilations of the three 3x3 ASPP branches (torchvision: 12, 24, 36).
    #[serde(default = "default_atrous_rates")]
    pub atrous_rates: Vec<usize>,
    /// The trunk is trained in its reparameterised form (one conv with bias per block), as an
    /// ImageNet checkpoint that only exists fused is fine-tuned; decided by `--init-backbone`.
    #[serde(default)]
    pub fused_trunk: bool,
    /// A fused `init_backbone` starts the train-time branches (computing the fused function in eval
    /// mode) instead of the fused trunk (`--init-branches`).
    #[serde(default)]
    pub branches_from_fused: bool,
    /// Learning rate of the trunk as a multiple of the heads' (parameter groups).
    #[serde(default = "default_backbone_lr_mult")]
    pub backbone_lr_mult: f64,
    /// Folder datasets: the layout/classes JSON (default `<data_root>/dataset.json`).
    #[serde(default)]
    pub dataset_config: Option<PathBuf>,
    /// Split validated on (folder and YOLO datasets name it; e.g. CamVid's `test`).
    #[serde(default = "default_val_split")]
    pub val_split: String,
}

fn default_val_split() -> String {
    "val".into()
}

fn default_backbone_lr_mult() -> f64 {
    1.0
}

fn default_head_channels() -> usize {
    deeplabv3::config::DEFAULT_HEAD_CHANNELS
}

fn default_atrous_rates() -> Vec<usize> {
    deeplabv3::config::DEFAULT_ATROUS_RATES.to_vec()
}

impl RunSettings {
    /// Fields that may differ between a run and its resumption without changing the result.
    fn resumable_view(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("settings serialise");
        let map = v.as_object_mut().expect("settings are an object");
        for key in [
            "data_root",
            "workers",
            "init_backbone",
            "val_every",
            "dataset_config",
        ] {
            map.remove(key);
        }
        v
    }
}

/// Running sums of the epoch in progress (saved on interruption, so the epoch's log stays exact).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct EpochProgress {
    loss_sum: f64,
    batches: u64,
    images: u64,
    seconds: f64,
}

/// Where the run is; saved in every checkpoint's metadata.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct TrainState {
    settings: RunSettings,
    /// Completed epochs.
    epoch: usize,
    /// Batches done in the epoch in progress.
    step_in_epoch: u64,
    global_step: u64,
    optimizer_steps: u64,
    best: Option<f64>,
    progress: EpochProgress,
    history: Vec<EpochRecord>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// All epochs done; the fused model was exported.
    Finished {
        fused: PathBuf,
        best_metric: Option<f64>,
    },
    /// Stopped on request (Ctrl-C) after saving `checkpoint`.
    Interrupted { checkpoint: PathBuf },
}

pub struct Trainer {
    task: Box<dyn Task>,
    vars: VarMap,
    optimizer: Optimizer,
    schedule: CosineSchedule,
    state: TrainState,
    out_dir: PathBuf,
    /// Stop (as on Ctrl-C) once this many optimizer steps have been done in total.
    pub stop_after_steps: Option<u64>,
    /// Without a terminal, print a progress line every this many steps (0: never).
    pub log_every: u64,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.into(),
        error: source,
    }
}

/// Checkpoint prefix of the trunk inside the detectors and segmenters.
const TRUNK_PREFIX: &str = "backbone.body.";

/// Where a trunk's tensors live in a checkpoint: under `backbone.body.` (a detector or segmenter) or
/// at the root (an ImageNet classifier).
fn trunk_prefix(ckpt: &checkpoint::Checkpoint) -> &'static str {
    if ckpt.tensors.keys().any(|k| k.starts_with(TRUNK_PREFIX)) {
        TRUNK_PREFIX
    } else {
        ""
    }
}

/// The run state a training checkpoint stores in its metadata.
fn stored_state(ckpt: &checkpoint::Checkpoint, path: &Path) -> Result<TrainState> {
    let resume_err = |message: String| TrainError::Resume {
        path: path.into(),
        message,
    };
    let raw = ckpt.metadata.get(TRAIN_STATE_KEY).ok_or_else(|| {
        resume_err(format!(
            "not a training checkpoint (no `{TRAIN_STATE_KEY}` metadata); to start from pretrained trunk weights use --init-backbone"
        ))
    })?;
    serde_json::from_str(raw).map_err(|e| resume_err(format!("metadata `{TRAIN_STATE_KEY}`: {e}")))
}

/// Seed of everything random in one step's forward pass.
fn step_seed(seed: u64, step: u64) -> u64 {
    let mut z = seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^ (z >> 31)
}

impl Trainer {
    /// Builds the model, data and optimizer; with `resume`, restores weights, optimizer and run state
    /// from a `last` / `best` checkpoint of the same run.
    pub fn new(mut settings: RunSettings, out_dir: &Path, resume: Option<&Path>) -> Result<Self> {
        if settings.epochs == 0 || settings.batch_size == 0 || settings.val_every == 0 {
            return Err(TrainError::Config(
                "epochs, batch size and --val-every must be at least 1".into(),
            ));
        }
        if settings.task == TaskKind::Seg && settings.batch_size < 2 {
            return Err(TrainError::Config(
                "segmentation needs a batch of at least 2: the ASPP pooling branch's BatchNorm sees one value per image".into(),
            ));
        }
        // The trunk's form follows the weights it starts from (a resumed run keeps its own); each
        // checkpoint is read once, here.
        let start = match (resume, &settings.init_backbone) {
            (Some(path), _) => {
                let ckpt = checkpoint::load(path)?;
                let state = stored_state(&ckpt, path)?;
                settings.fused_trunk = state.settings.fused_trunk;
                Some((ckpt, Some(state)))
            }
            (None, Some(path)) => {
                let ckpt = checkpoint::load(path)?;
                settings.fused_trunk =
                    ckpt.is_fused(trunk_prefix(&ckpt)) && !settings.branches_from_fused;
                Some((ckpt, None))
            }
            (None, None) => None,
        };
        let device = Device::Cpu;
        let vars = VarMap::new();
        let vb = seeded_var_builder(&vars, settings.seed, &device);
        let task: Box<dyn Task> = match settings.task {
            TaskKind::Det => Box::new(DetectionTask::new(&settings, vb)?),
            TaskKind::Seg => Box::new(SegmentationTask::new(&settings, vb)?),
        };
        let steps_per_epoch = task.train_loader().num_batches() as u64;
        if steps_per_epoch == 0 {
            return Err(TrainError::Config(format!(
                "the training split has fewer images than one batch of {}",
                settings.batch_size
            )));
        }
        let schedule = CosineSchedule::new(
            settings.lr,
            (settings.warmup_epochs * steps_per_epoch as f64).round() as u64,
            settings.epochs as u64 * steps_per_epoch,
        );
        let optimizer = Optimizer::new(
            settings.optimizer,
            trainable_params(&vars, TRUNK_PREFIX, settings.backbone_lr_mult),
        );
        let mut trainer = Self {
            task,
            vars,
            optimizer,
            schedule,
            state: TrainState {
                settings: settings.clone(),
                epoch: 0,
                step_in_epoch: 0,
                global_step: 0,
                optimizer_steps: 0,
                best: None,
                progress: EpochProgress::default(),
                history: Vec::new(),
            },
            out_dir: out_dir.to_path_buf(),
            stop_after_steps: None,
            log_every: 50,
        };
        match start {
            Some((ckpt, Some(state))) => trainer.restore(&ckpt, state, &settings)?,
            Some((ckpt, None)) => trainer.init_backbone(&ckpt)?,
            None => {}
        }
        Ok(trainer)
    }

    pub fn task(&self) -> &dyn Task {
        self.task.as_ref()
    }

    pub fn global_step(&self) -> u64 {
        self.state.global_step
    }

    pub fn completed_epochs(&self) -> usize {
        self.state.epoch
    }

    pub fn history(&self) -> &[EpochRecord] {
        &self.state.history
    }

    pub fn steps_per_epoch(&self) -> u64 {
        self.task.train_loader().num_batches() as u64
    }

    /// Copies trunk weights (timm names, train-time or reparameterised as the trunk was built, with or
    /// without a `backbone.body.` prefix) into the model; a classifier head in the file is ignored. A
    /// train-time trunk started from a fused file takes [`checkpoint::branch_init_from_fused`].
    fn init_backbone(&mut self, ckpt: &checkpoint::Checkpoint) -> Result<()> {
        let prefix = trunk_prefix(ckpt);
        let config = mobileone::MobileOneConfig::from_variant(self.state.settings.variant);
        let hint = checkpoint::variant_hint(&ckpt.tensors, prefix, &config);
        let branches_from_fused = ckpt.is_fused(prefix) && !self.state.settings.fused_trunk;
        let data = self.vars.data().lock().unwrap();
        for (name, var) in data.iter() {
            let Some(key) = name.strip_prefix(TRUNK_PREFIX) else {
                continue;
            };
            if branches_from_fused {
                if let Some(value) =
                    checkpoint::branch_init_from_fused(key, &ckpt.tensors, prefix, var.as_tensor())?
                {
                    var.set(&value)?;
                }
                continue;
            }
            let key = format!("{prefix}{key}");
            let tensor = ckpt
                .tensors
                .get(&key)
                .ok_or_else(|| CheckpointError::MissingKey {
                    key: key.clone(),
                    expected: var.dims().to_vec(),
                    hint: format!("{hint} (in {})", ckpt.path.display()),
                })?;
            if tensor.dims() != var.dims() {
                return Err(CheckpointError::ShapeMismatch {
                    key,
                    found: tensor.dims().to_vec(),
                    expected: var.dims().to_vec(),
                    hint,
                }
                .into());
            }
            var.set(tensor)?;
        }
        Ok(())
    }

    fn restore(
        &mut self,
        ckpt: &checkpoint::Checkpoint,
        state: TrainState,
        settings: &RunSettings,
    ) -> Result<()> {
        let resume_err = |message: String| TrainError::Resume {
            path: ckpt.path.clone(),
            message,
        };
        let (stored, given) = (state.settings.resumable_view(), settings.resumable_view());
        if stored != given {
            let differing: Vec<String> = given
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, v)| stored.get(k.as_str()) != Some(v))
                .map(|(k, v)| {
                    format!(
                        "{k}: checkpoint {} vs now {v}",
                        stored.get(k.as_str()).unwrap_or(&serde_json::Value::Null)
                    )
                })
                .collect();
            return Err(resume_err(format!(
                "the checkpoint belongs to a different run ({}); resume with the same settings",
                differing.join("; ")
            )));
        }
        {
            let data = self.vars.data().lock().unwrap();
            for (name, var) in data.iter() {
                let tensor = ckpt
                    .tensors
                    .get(name)
                    .ok_or_else(|| CheckpointError::MissingKey {
                        key: name.clone(),
                        expected: var.dims().to_vec(),
                        hint: String::new(),
                    })?;
                if tensor.dims() != var.dims() {
                    return Err(CheckpointError::ShapeMismatch {
                        key: name.clone(),
                        found: tensor.dims().to_vec(),
                        expected: var.dims().to_vec(),
                        hint: String::new(),
                    }
                    .into());
                }
                var.set(tensor)?;
            }
            let mut unexpected: Vec<String> = ckpt
                .tensors
                .keys()
                .filter(|k| !k.starts_with(OPTIMIZER_PREFIX) && !data.contains_key(*k))
                .cloned()
                .collect();
            if !unexpected.is_empty() {
                unexpected.sort();
                return Err(CheckpointError::UnexpectedKeys {
                    keys: unexpected,
                    hint: String::new(),
                }
                .into());
            }
        }
        self.optimizer
            .load_state(&ckpt.tensors, OPTIMIZER_PREFIX, state.optimizer_steps)
            .map_err(resume_err)?;
        self.state = TrainState {
            settings: settings.clone(),
            ..state
        };
        Ok(())
    }

    /// One optimizer step on `batch`; returns the loss before the update. A non-finite loss or
    /// gradient stops with [`TrainError::NonFinite`] and leaves the weights untouched.
    pub fn step(&mut self, batch: &Batch) -> Result<f64> {
        let settings = &self.state.settings;
        let step = self.state.global_step;
        let total = self.schedule.total_steps;
        let lr = self.schedule.lr(step);
        let weight_decay = match settings.weight_decay_end {
            Some(end) => annealed_weight_decay(settings.weight_decay, end, step, total),
            None => settings.weight_decay,
        };
        let non_finite = |what, value: f64, state: &TrainState| TrainError::NonFinite {
            what,
            value,
            epoch: state.epoch + 1,
            step: state.global_step,
            last_good: Some(self.out_dir.join(LAST)).filter(|p| p.is_file()),
        };
        let loss = self.task.loss(batch, step_seed(settings.seed, step))?;
        let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            return Err(non_finite("loss", value, &self.state));
        }
        let grads = loss.backward()?;
        let norm = grad_norm(self.optimizer.params(), &grads)?;
        if !norm.is_finite() {
            return Err(non_finite("gradient norm", norm, &self.state));
        }
        let scale = match settings.clip_grad {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        self.optimizer.step(&grads, lr, weight_decay, scale)?;
        self.state.global_step += 1;
        self.state.step_in_epoch += 1;
        self.state.optimizer_steps = self.optimizer.steps;
        Ok(value)
    }

    /// Writes the model, optimizer state and run state to `path` (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = self.task.named_tensors();
        tensors.extend(self.optimizer.state_tensors(OPTIMIZER_PREFIX));
        let mut metadata = self.task.metadata();
        metadata.insert(
            TRAIN_STATE_KEY.into(),
            serde_json::to_string(&self.state).expect("state serialises"),
        );
        self.insert_summary(&mut metadata);
        checkpoint::save(path, &tensors, &metadata)?;
        Ok(())
    }

    /// `epoch`, the data (`trained_on`) and the last validation (`metric`) in plain metadata keys, for
    /// people and tools.
    fn insert_summary(&self, metadata: &mut HashMap<String, String>) {
        metadata.insert("epoch".into(), self.state.epoch.to_string());
        let settings = &self.state.settings;
        let data = settings.data_root.file_name().map_or_else(
            || settings.data_root.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        metadata.insert(
            "trained_on".into(),
            format!(
                "{data} ({}, {} training images, {} epochs at {} px{})",
                serde_json::to_value(settings.dataset)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                self.task.train_loader().num_samples(),
                self.state.epoch,
                settings.image_size,
                if settings.init_backbone.is_some() {
                    ", trunk from ImageNet weights"
                } else {
                    ", from random initialisation"
                }
            ),
        );
        if let Some(v) = self
            .state
            .history
            .iter()
            .rev()
            .find_map(|r| r.validation.as_ref())
        {
            let values: serde_json::Map<String, serde_json::Value> = v
                .values
                .iter()
                .map(|(k, x)| (k.clone(), serde_json::json!(x)))
                .collect();
            metadata.insert(
                "metric".into(),
                serde_json::Value::Object(values).to_string(),
            );
        }
    }

    /// Reparameterises a copy of the model, folds its BatchNorms and writes it for `detect` / `segment`.
    pub fn export_fused(&self, path: &Path) -> Result<()> {
        let tensors = self.task.fused_tensors()?;
        let mut metadata = self.task.metadata();
        self.insert_summary(&mut metadata);
        checkpoint::save(path, &tensors, &metadata)?;
        Ok(())
    }

    fn progress_bar(&self, epoch: usize) -> ProgressBar {
        let pb = ProgressBar::new(self.steps_per_epoch());
        pb.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30.cyan/blue}] {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        pb.set_prefix(format!(
            "epoch {}/{}",
            epoch + 1,
            self.state.settings.epochs
        ));
        pb.set_position(self.state.step_in_epoch);
        pb
    }

    /// Trains until the last epoch (then exports the fused model) or until `stop` is raised (then
    /// saves `last` and returns [`Outcome::Interrupted`]). On an error, an output directory this run
    /// created and left empty is removed again.
    pub fn run(&mut self, stop: &AtomicBool) -> Result<Outcome> {
        let created = !self.out_dir.exists();
        std::fs::create_dir_all(&self.out_dir).map_err(io_error(&self.out_dir))?;
        let outcome = self.run_epochs(stop);
        if outcome.is_err() && created {
            // Fails, and so keeps the directory, when anything was written into it.
            let _ = std::fs::remove_dir(&self.out_dir);
        }
        outcome
    }

    /// [`run`](Self::run) once its output directory exists.
    fn run_epochs(&mut self, stop: &AtomicBool) -> Result<Outcome> {
        let last = self.out_dir.join(LAST);
        let epochs = self.state.settings.epochs;
        let logging = !std::io::stderr().is_terminal() && self.log_every > 0;
        let mut last_log = Instant::now();
        while self.state.epoch < epochs {
            let epoch = self.state.epoch;
            let pb = self.progress_bar(epoch);
            let loader = self.task.train_loader().clone();
            let batches = loader
                .epoch(epoch as u64)
                .skip(self.state.step_in_epoch as usize);
            let mut started = Instant::now();
            for batch in batches {
                let batch = batch?;
                let loss = self.step(&batch)?;
                let p = &mut self.state.progress;
                p.loss_sum += loss;
                p.batches += 1;
                p.images += batch.shape[0] as u64;
                p.seconds += started.elapsed().as_secs_f64();
                started = Instant::now();
                let speed = p.images as f64 / p.seconds.max(1e-9);
                let message = format!(
                    "loss {loss:.4} (avg {:.4}) lr {:.2e} {speed:.1} img/s",
                    p.loss_sum / p.batches as f64,
                    self.schedule.lr(self.state.global_step.saturating_sub(1)),
                );
                pb.set_position(self.state.step_in_epoch);
                pb.set_message(message.clone());
                if logging
                    && (self.state.global_step.is_multiple_of(self.log_every)
                        || last_log.elapsed().as_secs() >= 30)
                {
                    last_log = Instant::now();
                    eprintln!(
                        "epoch {}/{} step {}/{} {message}",
                        epoch + 1,
                        epochs,
                        self.state.step_in_epoch,
                        self.steps_per_epoch()
                    );
                }
                let limit_reached = self
                    .stop_after_steps
                    .is_some_and(|n| self.state.global_step >= n);
                if stop.load(Ordering::SeqCst) || limit_reached {
                    pb.abandon();
                    self.save(&last)?;
                    return Ok(Outcome::Interrupted { checkpoint: last });
                }
            }
            pb.finish_and_clear();
            self.finish_epoch()?;
        }
        let fused = self.out_dir.join(FUSED);
        self.export_fused(&fused)?;
        Ok(Outcome::Finished {
            fused,
            best_metric: self.state.best,
        })
    }

    /// Validation (when due), logs, curves and checkpoints at the end of an epoch.
    fn finish_epoch(&mut self) -> Result<()> {
        let settings = self.state.settings.clone();
        let epoch = self.state.epoch + 1;
        let progress = std::mem::take(&mut self.state.progress);
        let validate = epoch.is_multiple_of(settings.val_every) || epoch == settings.epochs;
        let validation_started = Instant::now();
        let validation = if validate {
            let pb = ProgressBar::new(0);
            pb.set_style(
                ProgressStyle::with_template("validating [{bar:30}] {pos}/{len}")
                    .expect("valid template"),
            );
            let v = self.task.validate(&|done, total| {
                pb.set_length(total as u64);
                pb.set_position(done as u64);
            })?;
            pb.finish_and_clear();
            Some(v)
        } else {
            None
        };
        let record = EpochRecord {
            epoch,
            step: self.state.global_step,
            lr: self.schedule.lr(self.state.global_step.saturating_sub(1)),
            train_loss: progress.loss_sum / progress.batches.max(1) as f64,
            images_per_s: progress.images as f64 / progress.seconds.max(1e-9),
            seconds: progress.seconds,
            wall_seconds: self.state.history.last().map_or(0.0, |r| r.wall_seconds)
                + progress.seconds
                + validation_started.elapsed().as_secs_f64(),
            validation: validation.clone(),
        };
        let improved = validation.as_ref().is_some_and(|v| {
            let m = v.primary();
            self.state.best.is_none_or(|b| m > b)
        });
        if improved {
            self.state.best = validation.as_ref().map(|v| v.primary());
        }
        let mut line = format!(
            "epoch {epoch}/{}: loss {:.4}, {:.1} img/s, {:.0} s ({:.1} min into the run)",
            settings.epochs,
            record.train_loss,
            record.images_per_s,
            record.seconds,
            record.wall_seconds / 60.0
        );
        if let Some(v) = &validation {
            for (name, value) in &v.values {
                line.push_str(&format!(", {name} {value:.4}"));
            }
            if improved {
                line.push_str(" (best)");
            }
        }
        println!("{line}");
        self.state.history.push(record);
        self.state.epoch = epoch;
        self.state.step_in_epoch = 0;
        write_logs(
            &self.out_dir,
            &self.task.metric_names(),
            &self.state.history,
        )?;
        let title = format!(
            "{} {} on {:?}, {} px, batch {}",
            match settings.task {
                TaskKind::Det => "SSDLite",
                TaskKind::Seg => "DeepLabV3",
            },
            settings.variant,
            settings.dataset,
            settings.image_size,
            settings.batch_size
        );
        crate::plot::write_curves(&self.out_dir.join(CURVES), &self.state.history, &title)?;
        self.save(&self.out_dir.join(LAST))?;
        if improved {
            self.save(&self.out_dir.join(BEST))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_saved_before_the_head_flags_read_as_torchvision_defaults() {
        let mut value = serde_json::to_value(RunSettings {
            task: TaskKind::Seg,
            dataset: DatasetKind::Synth,
            data_root: "shapes".into(),
            variant: Variant::S0,
            init_backbone: None,
            epochs: 1,
            batch_size: 2,
            image_size: 64,
            lr: 0.1,
            optimizer: OptimizerKind::SGD,
            weight_decay: 0.0,
            weight_decay_end: None,
            warmup_epochs: 0.0,
            clip_grad: None,
            seed: 0,
            workers: 1,
            val_every: 1,
            augment: Augment::None,
            aux_loss: false,
            output_stride: 16,
            head_channels: 64,
            atrous_rates: vec![1, 2, 3],
            fused_trunk: false,
            branches_from_fused: false,
            backbone_lr_mult: 1.0,
            dataset_config: None,
            val_split: "val".into(),
        })
        .unwrap();
        let map = value.as_object_mut().unwrap();
        map.remove("head_channels");
        map.remove("atrous_rates");
        let old: RunSettings = serde_json::from_value(value).unwrap();
        assert_eq!(old.head_channels, 256);
        assert_eq!(old.atrous_rates, vec![12, 24, 36]);
    }
}
