//! Evaluation metrics whose numbers match the reference implementations exactly.
//!
//! - [`coco`]: COCO box and mask mAP, identical to pycocotools 2.0.11 (matching and
//!   accumulation by the `hotcoco` crate; input validation and the per-category table here).
//! - [`seg`]: semantic-segmentation mIoU / mAcc / aAcc, identical to mmsegmentation's `IoUMetric`,
//!   accumulated in exact integers.

pub mod coco;
mod numpy_sum;
pub mod seg;
