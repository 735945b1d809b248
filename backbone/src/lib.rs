//! MobileOne backbone (S0–S4) on candle: the train-time multi-branch form, its exact reparameterisation
//! into one conv per layer, timm / Apple / own checkpoints, multi-scale features and dilation.
pub mod alloc;
pub mod checkpoint;
pub mod layers;
pub mod mobileone;
pub mod ops;
pub mod parity;
pub mod resize;

pub use checkpoint::{Checkpoint, CheckpointError, Naming};
pub use mobileone::{Form, MobileOne, MobileOneBlock, MobileOneConfig, Variant};
