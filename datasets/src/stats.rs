//! Dataset summaries for `dataset stats`: a quick check that a dataset was read correctly.

use crate::coco::CocoDataset;
use crate::error::Result;
use crate::segmentation::{SegmentationDataset, IGNORE_INDEX};
use rayon::prelude::*;
use std::fmt;

/// COCO's size buckets by annotation `area`: small < 32², medium < 96², large otherwise
/// (pycocotools' evaluation ranges share their end points; here each annotation is counted once).
pub const SMALL_AREA: f64 = 32.0 * 32.0;
pub const MEDIUM_AREA: f64 = 96.0 * 96.0;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClassCount {
    pub category_id: u64,
    pub name: String,
    pub annotations: usize,
    pub crowd: usize,
    /// Images with at least one annotation of the class.
    pub images: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DetectionStats {
    pub images: usize,
    pub images_without_annotations: usize,
    pub annotations: usize,
    pub crowd: usize,
    /// Non-crowd annotations by size.
    pub small: usize,
    pub medium: usize,
    pub large: usize,
    /// Non-crowd boxes without area in float32 (dropped by training, as torchvision's reference).
    pub degenerate: usize,
    pub per_class: Vec<ClassCount>,
}

impl DetectionStats {
    pub fn from_coco(dataset: &CocoDataset) -> Self {
        let mut stats = Self {
            images: dataset.images.len(),
            annotations: dataset.annotations.len(),
            degenerate: dataset.degenerate_boxes().len(),
            per_class: dataset
                .categories
                .iter()
                .map(|c| ClassCount {
                    category_id: c.id,
                    name: c.name.clone(),
                    ..ClassCount::default()
                })
                .collect(),
            ..Self::default()
        };
        for image in &dataset.images {
            let mut seen = vec![false; stats.per_class.len()];
            let mut any = false;
            for annotation in dataset.annotations_for(image.id) {
                any = true;
                let class = dataset.label_of(annotation.category_id).expect("indexed") as usize - 1;
                let count = &mut stats.per_class[class];
                count.annotations += 1;
                if !seen[class] {
                    seen[class] = true;
                    count.images += 1;
                }
                if annotation.iscrowd {
                    stats.crowd += 1;
                    count.crowd += 1;
                } else if annotation.area < SMALL_AREA {
                    stats.small += 1;
                } else if annotation.area < MEDIUM_AREA {
                    stats.medium += 1;
                } else {
                    stats.large += 1;
                }
            }
            stats.images_without_annotations += usize::from(!any);
        }
        stats
    }
}

impl fmt::Display for DetectionStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let non_crowd = (self.small + self.medium + self.large).max(1) as f64;
        writeln!(
            f,
            "images: {} ({} without annotations)",
            self.images, self.images_without_annotations
        )?;
        writeln!(
            f,
            "annotations: {} ({} crowd)",
            self.annotations, self.crowd
        )?;
        if self.degenerate > 0 {
            writeln!(
                f,
                "boxes without area in float32: {} (training drops them, as torchvision's reference)",
                self.degenerate
            )?;
        }
        writeln!(
            f,
            "sizes (non-crowd, by area): small {} ({:.1}%), medium {} ({:.1}%), large {} ({:.1}%)",
            self.small,
            100.0 * self.small as f64 / non_crowd,
            self.medium,
            100.0 * self.medium as f64 / non_crowd,
            self.large,
            100.0 * self.large as f64 / non_crowd
        )?;
        let width = self
            .per_class
            .iter()
            .map(|c| c.name.len())
            .max()
            .unwrap_or(0)
            .max(8);
        writeln!(
            f,
            "{:>5}  {:<width$}  {:>11}  {:>6}  {:>7}",
            "id", "category", "annotations", "crowd", "images"
        )?;
        for class in &self.per_class {
            writeln!(
                f,
                "{:>5}  {:<width$}  {:>11}  {:>6}  {:>7}",
                class.category_id, class.name, class.annotations, class.crowd, class.images
            )?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SegmentationStats {
    pub images: usize,
    pub pixels: u64,
    pub ignored_pixels: u64,
    /// Per training class: (name, pixels, images containing it).
    pub per_class: Vec<(String, u64, usize)>,
}

impl SegmentationStats {
    /// Reads every annotation (in parallel) and checks that each image has its mask's size.
    pub fn from_dataset(dataset: &SegmentationDataset) -> Result<Self> {
        let histograms: Vec<[u64; 256]> = (0..dataset.len())
            .into_par_iter()
            .map(|i| {
                dataset.check_item(i)?;
                let labels = dataset.load_labels(i)?;
                let mut histogram = [0u64; 256];
                for &v in &labels.data {
                    histogram[v as usize] += 1;
                }
                Ok(histogram)
            })
            .collect::<Result<_>>()?;
        let mut stats = Self {
            images: dataset.len(),
            per_class: dataset
                .class_names
                .iter()
                .map(|n| (n.clone(), 0, 0))
                .collect(),
            ..Self::default()
        };
        for histogram in histograms {
            stats.pixels += histogram.iter().sum::<u64>();
            stats.ignored_pixels += histogram[IGNORE_INDEX as usize];
            for (class, entry) in stats.per_class.iter_mut().enumerate() {
                entry.1 += histogram[class];
                entry.2 += usize::from(histogram[class] > 0);
            }
        }
        Ok(stats)
    }
}

impl fmt::Display for SegmentationStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total = self.pixels.max(1) as f64;
        writeln!(f, "images: {}", self.images)?;
        writeln!(
            f,
            "pixels: {} ({:.2}% ignored = {IGNORE_INDEX})",
            self.pixels,
            100.0 * self.ignored_pixels as f64 / total
        )?;
        let width = self
            .per_class
            .iter()
            .map(|c| c.0.len())
            .max()
            .unwrap_or(0)
            .max(5);
        writeln!(
            f,
            "{:>5}  {:<width$}  {:>8}  {:>7}",
            "label", "class", "pixels %", "images"
        )?;
        for (label, (name, pixels, images)) in self.per_class.iter().enumerate() {
            writeln!(
                f,
                "{:>5}  {:<width$}  {:>8.3}  {:>7}",
                label,
                name,
                100.0 * *pixels as f64 / total,
                images
            )?;
        }
        Ok(())
    }
}
