//! Training of SSDLite (`train det`) and DeepLabV3 (`train seg`) on the train-time MobileOne with
//! candle's autograd: reproducible initialisation ([`init`]), PyTorch-exact SGD / AdamW with saveable
//! state ([`optim`]), warm-up + cosine schedules ([`schedule`]), the two tasks ([`detection`],
//! [`segmentation`]), the loop with checkpoints, validation, resume and fused export ([`trainer`]),
//! the metrics log ([`metrics`]) and the curves ([`plot`]).

pub mod detection;
pub mod error;
pub mod init;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod segmentation;
pub mod task;
pub mod trainer;

pub use error::{Result, TrainError};
pub use optim::OptimizerKind;
pub use task::{Augment, DatasetKind, Task, TaskKind, Validation};
pub use trainer::{Outcome, RunSettings, Trainer};
