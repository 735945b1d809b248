//! What the trainer needs from a model and its data: a batch loss, validation, and its tensors and
//! metadata for checkpoints.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use candle_core::Tensor;
use mobileone_datasets::{Batch, Loader};

use crate::error::{Result, TrainError};

/// Detection (SSDLite) or segmentation (DeepLabV3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    Det,
    Seg,
}

/// Where the training data comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    Coco,
    Voc,
    Ade20k,
    /// A folder written by `dataset synth` (COCO layout for detection, VOC layout for segmentation).
    Synth,
    /// The YOLO detection layout: `data.yaml` with `train` / `val` image folders and `names`.
    Yolo,
    /// A generic segmentation folder (images, label PNGs, split lists) described by a JSON config
    /// (`mobileone_datasets::segmentation::FolderConfig`), e.g. CamVid.
    Folder,
}

impl FromStr for DatasetKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "coco" => Ok(Self::Coco),
            "voc" => Ok(Self::Voc),
            "ade20k" => Ok(Self::Ade20k),
            "synth" => Ok(Self::Synth),
            "yolo" => Ok(Self::Yolo),
            "folder" => Ok(Self::Folder),
            _ => Err(format!(
                "unknown dataset `{s}` (expected coco, yolo, voc, ade20k, folder or synth)"
            )),
        }
    }
}

/// Training augmentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Augment {
    /// The reference recipe: torchvision's SSDLite (photometric, zoom-out, IoU crop, flip) or
    /// mmsegmentation's (rescale 0.5–2, crop, flip, photometric).
    Full,
    /// Photometric distortion, horizontal flip and a resize to the input size, no crops: learns faster
    /// on easy data such as the synthetic shapes.
    Flip,
    /// Resize only.
    None,
}

impl FromStr for Augment {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Ok(Self::Full),
            "flip" => Ok(Self::Flip),
            "none" => Ok(Self::None),
            _ => Err(format!(
                "unknown augmentation `{s}` (expected full, flip or none)"
            )),
        }
    }
}

/// Validation results: the metric that selects `best` and the values logged beside it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Validation {
    /// (name, value); the first is the one `best` is chosen by.
    pub values: Vec<(String, f64)>,
}

impl Validation {
    pub fn primary(&self) -> f64 {
        self.values.first().map_or(f64::NAN, |v| v.1)
    }
}

pub trait Task {
    /// Loss of one batch with BatchNorm in training mode. `step_seed` seeds anything random in the
    /// forward pass (dropout), so a step can be replayed.
    fn loss(&self, batch: &Batch, step_seed: u64) -> Result<Tensor>;

    /// Names of the values [`Task::validate`] returns, the primary metric first.
    fn metric_names(&self) -> Vec<String>;

    /// Metrics on the validation split, computed with the fused model (the one that is deployed).
    fn validate(&self, progress: &dyn Fn(usize, usize)) -> Result<Validation>;

    /// Every tensor of the train-time model under checkpoint names (running statistics included).
    fn named_tensors(&self) -> Vec<(String, Tensor)>;

    /// Header metadata that lets `detect` / `segment` rebuild the model.
    fn metadata(&self) -> HashMap<String, String>;

    /// The reparameterised, BN-folded model's tensors (detached), as `detect` / `segment` load them.
    fn fused_tensors(&self) -> Result<Vec<(String, Tensor)>>;

    fn train_loader(&self) -> &Arc<Loader>;
}

/// `(instances JSON, image folder)` of a COCO-layout split: `instances_{split}2017.json` with
/// `{split}2017/` (COCO) or `instances_{split}.json` with `{split}/` (`dataset synth`).
pub fn coco_split(root: &Path, split: &str) -> Result<(PathBuf, PathBuf)> {
    let candidates = [
        (
            root.join("annotations")
                .join(format!("instances_{split}2017.json")),
            root.join(format!("{split}2017")),
        ),
        (
            root.join("annotations")
                .join(format!("instances_{split}.json")),
            root.join(split),
        ),
    ];
    for (json, images) in &candidates {
        if json.is_file() {
            return Ok((json.clone(), images.clone()));
        }
    }
    Err(TrainError::Config(format!(
        "no COCO {split} annotations under {}: expected {} or {}",
        root.display(),
        candidates[0].0.display(),
        candidates[1].0.display()
    )))
}

/// Detaches every tensor (no autograd history in exported or evaluated copies).
pub fn detached(tensors: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    tensors.into_iter().map(|(k, t)| (k, t.detach())).collect()
}

/// Warns when most training images are smaller than the network input (`size`), so every one is
/// upscaled: `sides` holds each image's side that the transform stretches to `size` (the longer side
/// for the detector's square resize, the shorter for the segmenter's resize), `which` names it.
pub(crate) fn warn_if_upscaled(mut sides: Vec<u32>, size: usize, which: &str) {
    sides.sort_unstable();
    if let Some(&median) = sides.get(sides.len() / 2) {
        if (median as usize) < size {
            eprintln!(
                "warning: the training images' {which} side is {median} px (median) but --size is {size}: \
                 every image is upscaled, which costs time for no detail; --size {median} would be faster"
            );
        }
    }
}
