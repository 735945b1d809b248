//! Semantic-segmentation metrics identical to mmsegmentation's `IoUMetric`.
//!
//! Per image, pixels whose label is `ignore_index` are dropped; per class the intersection,
//! prediction area and label area are counted and summed over the whole dataset (exact `u64`
//! counts, where mmseg sums `torch.histc` float histograms), union = pred + label − intersection.
//! IoU = I/U and Acc = I/L per class; a class with U = 0 (resp. L = 0) is NaN and left out of
//! the mean (numpy `nanmean`, summed in numpy's order); aAcc = ΣI / ΣL.
//!
//! Like `torch.histc(min=0, max=num_classes-1)`, values outside `0..num_classes` (other than
//! `ignore_index` in the label) fall out of the histograms: an out-of-range prediction on a valid
//! pixel counts in the label area only (a miss), an out-of-range label counts nowhere. Both are
//! counted in [`SegMetrics::out_of_range_pred`] / [`SegMetrics::out_of_range_label`] so they are
//! reported instead of passing silently.

use std::io::BufReader;
use std::path::Path;

use crate::numpy_sum::pairwise_sum;

#[derive(Debug, thiserror::Error)]
pub enum SegError {
    #[error("prediction has {pred} pixels but the label map has {label}")]
    SizeMismatch { pred: usize, label: usize },
    #[error("num_classes must be at least 1")]
    NoClasses,
    #[error("cannot read {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: invalid PNG")]
    Png {
        path: String,
        source: png::DecodingError,
    },
    #[error("{path}: not a class-index map ({color:?}, {depth:?}); expected 8-bit grayscale or palette, or 16-bit grayscale")]
    NotALabelMap {
        path: String,
        color: png::ColorType,
        depth: png::BitDepth,
    },
}

/// A class-index map: one label per pixel, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    pub width: usize,
    pub height: usize,
    pub labels: Vec<u16>,
}

impl LabelMap {
    /// Read a PNG of class indices: 8-bit grayscale, 8-bit palette (the indices, as in VOC's
    /// `SegmentationClass`, not the colours) or 16-bit grayscale.
    pub fn read_png(path: &Path) -> Result<Self, SegError> {
        let name = || path.display().to_string();
        let file = std::fs::File::open(path).map_err(|source| SegError::Read {
            path: name(),
            source,
        })?;
        let mut decoder = png::Decoder::new(BufReader::new(file));
        decoder.set_transformations(png::Transformations::IDENTITY);
        let png_err = |source| SegError::Png {
            path: name(),
            source,
        };
        let mut reader = decoder.read_info().map_err(png_err)?;
        let size = reader.output_buffer_size().unwrap_or(0);
        let mut buf = vec![0; size];
        let info = reader.next_frame(&mut buf).map_err(png_err)?;
        let (width, height) = (info.width as usize, info.height as usize);
        let labels = match (info.color_type, info.bit_depth) {
            (png::ColorType::Grayscale | png::ColorType::Indexed, png::BitDepth::Eight) => buf
                .chunks_exact(info.line_size)
                .flat_map(|row| row[..width].iter().map(|&v| u16::from(v)))
                .collect(),
            (png::ColorType::Grayscale, png::BitDepth::Sixteen) => buf
                .chunks_exact(info.line_size)
                .flat_map(|row| {
                    row[..2 * width]
                        .chunks_exact(2)
                        .map(|b| u16::from_be_bytes([b[0], b[1]]))
                })
                .collect(),
            (color, depth) => {
                return Err(SegError::NotALabelMap {
                    path: name(),
                    color,
                    depth,
                })
            }
        };
        Ok(Self {
            width,
            height,
            labels,
        })
    }
}

/// mmseg's `reduce_zero_label` (ADE20K), applied to a label map when it is loaded:
/// 0 ("other") → ignored (255), every other label − 1, 255 stays 255.
pub fn reduce_zero_label(labels: &mut [u16]) {
    for v in labels {
        *v = match *v {
            0 | 255 => 255,
            x => x - 1,
        };
    }
}

/// Incremental IoU accumulator: feed one (prediction, label) pair per image, then [`compute`](Self::compute).
#[derive(Debug, Clone)]
pub struct SegMetric {
    num_classes: usize,
    ignore_index: u32,
    intersect: Vec<u64>,
    pred_area: Vec<u64>,
    label_area: Vec<u64>,
    out_of_range_pred: u64,
    out_of_range_label: u64,
    ignored: u64,
    images: usize,
}

/// Per-class totals and ratios; `None` is mmseg's NaN.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassMetrics {
    pub iou: Option<f64>,
    pub acc: Option<f64>,
    pub intersect: u64,
    pub union: u64,
    pub pred_area: u64,
    pub label_area: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SegMetrics {
    /// Mean IoU over classes with a non-zero union (`None` when there is none).
    pub miou: Option<f64>,
    /// Mean accuracy over classes present in the labels.
    pub macc: Option<f64>,
    /// Overall pixel accuracy (`None` when no pixel was labelled).
    pub aacc: Option<f64>,
    pub per_class: Vec<ClassMetrics>,
    pub images: usize,
    /// Pixels whose label was `ignore_index`.
    pub ignored_pixels: u64,
    /// Valid pixels whose prediction was outside `0..num_classes`.
    pub out_of_range_pred: u64,
    /// Pixels whose label was outside `0..num_classes` and not `ignore_index`.
    pub out_of_range_label: u64,
}

impl SegMetric {
    pub fn new(num_classes: usize, ignore_index: u32) -> Result<Self, SegError> {
        if num_classes == 0 {
            return Err(SegError::NoClasses);
        }
        Ok(Self {
            num_classes,
            ignore_index,
            intersect: vec![0; num_classes],
            pred_area: vec![0; num_classes],
            label_area: vec![0; num_classes],
            out_of_range_pred: 0,
            out_of_range_label: 0,
            ignored: 0,
            images: 0,
        })
    }

    /// Add one image: `pred` and `label` are row-major class-index maps of the same size.
    pub fn update<P, L>(&mut self, pred: &[P], label: &[L]) -> Result<(), SegError>
    where
        P: Copy + Into<u32>,
        L: Copy + Into<u32>,
    {
        if pred.len() != label.len() {
            return Err(SegError::SizeMismatch {
                pred: pred.len(),
                label: label.len(),
            });
        }
        let n = self.num_classes;
        for (&p, &l) in pred.iter().zip(label) {
            let (p, l) = (p.into() as usize, l.into() as usize);
            if l == self.ignore_index as usize {
                self.ignored += 1;
                continue;
            }
            if l < n {
                self.label_area[l] += 1;
                if p == l {
                    self.intersect[l] += 1;
                }
            } else {
                self.out_of_range_label += 1;
            }
            if p < n {
                self.pred_area[p] += 1;
            } else {
                self.out_of_range_pred += 1;
            }
        }
        self.images += 1;
        Ok(())
    }

    /// Merge another accumulator (e.g. from another thread) into this one.
    pub fn merge(&mut self, other: &SegMetric) {
        for (a, b) in self.intersect.iter_mut().zip(&other.intersect) {
            *a += b;
        }
        for (a, b) in self.pred_area.iter_mut().zip(&other.pred_area) {
            *a += b;
        }
        for (a, b) in self.label_area.iter_mut().zip(&other.label_area) {
            *a += b;
        }
        self.out_of_range_pred += other.out_of_range_pred;
        self.out_of_range_label += other.out_of_range_label;
        self.ignored += other.ignored;
        self.images += other.images;
    }

    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    pub fn compute(&self) -> SegMetrics {
        let ratio = |num: u64, den: u64| (den > 0).then(|| num as f64 / den as f64);
        let per_class: Vec<ClassMetrics> = (0..self.num_classes)
            .map(|c| {
                let (i, p, l) = (self.intersect[c], self.pred_area[c], self.label_area[c]);
                let union = p + l - i;
                ClassMetrics {
                    iou: ratio(i, union),
                    acc: ratio(i, l),
                    intersect: i,
                    union,
                    pred_area: p,
                    label_area: l,
                }
            })
            .collect();
        let total_intersect: u64 = self.intersect.iter().sum();
        let total_label: u64 = self.label_area.iter().sum();
        SegMetrics {
            miou: nanmean(per_class.iter().map(|c| c.iou)),
            macc: nanmean(per_class.iter().map(|c| c.acc)),
            aacc: ratio(total_intersect, total_label),
            per_class,
            images: self.images,
            ignored_pixels: self.ignored,
            out_of_range_pred: self.out_of_range_pred,
            out_of_range_label: self.out_of_range_label,
        }
    }
}

/// `np.nanmean`: NaNs become 0 in a pairwise sum, divided by the count of non-NaN values.
fn nanmean(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let values: Vec<Option<f64>> = values.collect();
    let count = values.iter().filter(|v| v.is_some()).count();
    let zeroed: Vec<f64> = values.iter().map(|v| v.unwrap_or(0.0)).collect();
    (count > 0).then(|| pairwise_sum(&zeroed) / count as f64)
}

impl SegMetrics {
    /// `{"mIoU", "mAcc", "aAcc", "per_class_iou": [...]}` as fractions, `null` for NaN.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "mIoU": self.miou,
            "mAcc": self.macc,
            "aAcc": self.aacc,
            "per_class_iou": self.per_class.iter().map(|c| c.iou).collect::<Vec<_>>(),
        })
    }

    /// A readable per-class table: IoU and accuracy in percent, pixel counts.
    pub fn per_class_table(&self) -> String {
        use std::fmt::Write as _;
        let pct = |v: Option<f64>| v.map_or("nan".to_string(), |v| format!("{:.2}", 100.0 * v));
        let mut out = format!(
            "{:>5}  {:>7} {:>7}  {:>12} {:>12}\n",
            "class", "IoU", "Acc", "label px", "pred px"
        );
        for (c, m) in self.per_class.iter().enumerate() {
            let _ = writeln!(
                out,
                "{c:>5}  {:>7} {:>7}  {:>12} {:>12}",
                pct(m.iou),
                pct(m.acc),
                m.label_area,
                m.pred_area
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduce_zero_label_matches_mmseg() {
        let mut l = [0u16, 1, 2, 150, 254, 255];
        reduce_zero_label(&mut l);
        assert_eq!(l, [255, 0, 1, 149, 253, 255]);
    }

    #[test]
    fn counts_ignore_and_out_of_range() {
        let mut m = SegMetric::new(3, 255).unwrap();
        // label: 0 0 1 255 7 2 ; pred: 0 1 1 2 0 9
        m.update(&[0u8, 1, 1, 2, 0, 9], &[0u8, 0, 1, 255, 7, 2])
            .unwrap();
        let r = m.compute();
        assert_eq!(r.ignored_pixels, 1);
        assert_eq!(r.out_of_range_label, 1);
        assert_eq!(r.out_of_range_pred, 1);
        let areas: Vec<_> = r
            .per_class
            .iter()
            .map(|c| (c.intersect, c.union, c.pred_area, c.label_area))
            .collect();
        // class 0: pred at px 0 and px 4 (label 7 is out of range but the prediction counts).
        assert_eq!(areas, vec![(1, 3, 2, 2), (1, 2, 2, 1), (0, 1, 0, 1)]);
        assert_eq!(r.aacc, Some(2.0 / 4.0));
    }

    #[test]
    fn size_mismatch_is_an_error() {
        let mut m = SegMetric::new(2, 255).unwrap();
        assert!(matches!(
            m.update(&[0u8; 4], &[0u8; 5]),
            Err(SegError::SizeMismatch { pred: 4, label: 5 })
        ));
        assert!(matches!(SegMetric::new(0, 255), Err(SegError::NoClasses)));
    }

    #[test]
    fn absent_classes_are_nan_and_excluded() {
        let mut m = SegMetric::new(3, 255).unwrap();
        m.update(&[0u16, 1, 1], &[0u8, 1, 0]).unwrap();
        let r = m.compute();
        assert_eq!(r.per_class[2].iou, None);
        assert_eq!(r.miou, Some((0.5 + 0.5) / 2.0));
    }
}
