//! SSDLite detection on a MobileOne trunk, following torchvision's detection package:
//! default boxes ([`anchors`]), box coding ([`box_coder`]), anchor matching ([`matcher`]),
//! training loss ([`loss`]), post-processing ([`postprocess`]), preprocessing ([`transform`]),
//! the network's building blocks ([`ssdlite`]) and the generic detector ([`detector`]).

pub mod anchors;
pub mod box_coder;
pub mod config;
pub mod detector;
pub mod loss;
pub mod matcher;
pub mod postprocess;
pub mod ssdlite;
pub mod transform;

pub use anchors::{Box4, DefaultBoxGenerator};
pub use box_coder::BoxCoder;
pub use config::{Labels, Overrides, SsdLiteConfig};
pub use detector::{HeadOutputs, SsdDetector, StageTimes};
pub use loss::{Losses, SsdLoss, Target};
pub use matcher::{Match, SsdMatcher};
pub use postprocess::{Detection, PostProcessConfig};
pub use transform::{ImageView, Transform};

/// Errors of loading and configuring a detector.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Checkpoint(#[from] mobileone::CheckpointError),
    #[error("checkpoint metadata `{key}`: {reason}")]
    Metadata { key: String, reason: String },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
