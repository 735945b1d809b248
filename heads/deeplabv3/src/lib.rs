//! DeepLabV3 semantic segmentation on a MobileOne trunk, with torchvision's architecture and key names
//! (`models/segmentation/deeplabv3.py`): ASPP head, optional auxiliary FCN head, output stride 32/16/8
//! through dilation, logits resized to the input exactly as `F.interpolate(bilinear, align_corners=False)`.

pub mod aspp;
pub mod checkpoint;
pub mod config;
pub mod dropout;
pub mod inference;
pub mod loss;
pub mod model;

use std::path::PathBuf;

pub use checkpoint::{load, Overrides};
pub use config::{DeepLabConfig, SegmenterSpec};
pub use dropout::seed_dropout;
pub use inference::{predict_logits, InferenceOptions};
pub use loss::{cross_entropy, segmentation_loss, IGNORE_INDEX};
pub use mobileone::resize::resize_bilinear;
pub use model::{DeepLabV3, SegmentationOutput};

#[derive(Debug, thiserror::Error)]
pub enum DeepLabError {
    #[error(transparent)]
    Checkpoint(#[from] mobileone::CheckpointError),
    #[error("{}: {message}", .path.display())]
    Invalid { path: PathBuf, message: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
