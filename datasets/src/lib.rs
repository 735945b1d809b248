//! Datasets for the MobileOne toolkit: COCO instances, Pascal VOC 2012 and ADE20K readers,
//! box/mask-consistent training transforms, a multi-threaded batch loader, and a synthetic
//! "shapes" dataset written in those formats.

pub mod coco;
pub mod coco_voc;
pub mod error;
pub mod imaging;
pub mod io;
pub mod loader;
pub mod mask;
pub mod segmentation;
pub mod stats;
pub mod synth;
pub mod transforms;
pub mod yolo;

pub use coco::{CocoAnnotation, CocoCategory, CocoDataset, CocoFile, CocoImage, Segmentation};
pub use error::{DatasetError, Result};
pub use io::LabelMap;
pub use loader::{Batch, CocoDetection, LabelMode, Loader, LoaderConfig, Normalize, SampleSource};
pub use mask::Rle;
pub use segmentation::{SegmentationDataset, SegmentationLayout, IGNORE_INDEX};
pub use transforms::{Compose, Sample, SampleRng, Transform};
