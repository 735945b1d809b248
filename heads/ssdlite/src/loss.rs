//! SSD training loss, as torchvision's `SSD.compute_loss`: smooth-L1 (beta 1) on matched anchors plus
//! cross-entropy over positives and the hardest negatives (3 per positive), both divided by the number
//! of matched anchors in the batch. Matching and mining run on plain values; the loss stays differentiable.

use candle_core::{DType, Result, Tensor, D};

use crate::anchors::Box4;
use crate::box_coder::BoxCoder;
use crate::matcher::{Match, SsdMatcher};

/// Ground truth of one image, in network-input pixels; labels index the classifier (0 is background).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Target {
    pub boxes: Vec<Box4>,
    pub labels: Vec<usize>,
}

/// The two loss terms (scalars).
#[derive(Debug, Clone)]
pub struct Losses {
    pub bbox_regression: Tensor,
    pub classification: Tensor,
}

impl Losses {
    pub fn total(&self) -> Result<Tensor> {
        &self.bbox_regression + &self.classification
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SsdLoss {
    pub matcher: SsdMatcher,
    pub coder: BoxCoder,
    /// Negatives kept per positive: `(1 - positive_fraction) / positive_fraction` = 3.
    pub neg_to_pos_ratio: f32,
}

impl Default for SsdLoss {
    fn default() -> Self {
        Self {
            matcher: SsdMatcher::default(),
            coder: BoxCoder::default(),
            neg_to_pos_ratio: 3.0,
        }
    }
}

/// `smooth_l1_loss(x, y, beta=1, reduction="sum")`.
fn smooth_l1_sum(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let d = (x - y)?.abs()?;
    let quadratic = (d.sqr()? * 0.5)?;
    let linear = (&d - 0.5)?;
    d.lt(1.0)?.where_cond(&quadratic, &linear)?.sum_all()
}

impl SsdLoss {
    /// `cls_logits` is `(N, anchors, classes)`, `bbox_regression` `(N, anchors, 4)`; one target per image.
    /// Returns the losses and each image's anchor assignment.
    pub fn compute(
        &self,
        cls_logits: &Tensor,
        bbox_regression: &Tensor,
        anchors: &[Box4],
        targets: &[Target],
    ) -> Result<(Losses, Vec<Vec<Match>>)> {
        let (n, num_anchors, num_classes) = cls_logits.dims3()?;
        if targets.len() != n || num_anchors != anchors.len() {
            candle_core::bail!(
                "loss: {} targets and {} anchors for a batch of {n} with {num_anchors} predictions",
                targets.len(),
                anchors.len()
            );
        }
        for (i, t) in targets.iter().enumerate() {
            if t.labels.len() != t.boxes.len() {
                candle_core::bail!(
                    "target {i}: {} labels for {} boxes",
                    t.labels.len(),
                    t.boxes.len()
                );
            }
            if let Some(l) = t.labels.iter().find(|&&l| l == 0 || l >= num_classes) {
                candle_core::bail!(
                    "target {i}: label {l} outside 1..{num_classes} (0 is the background)"
                );
            }
            // torchvision asserts the same: a zero-size box has no defined regression target.
            if let Some(b) = t.boxes.iter().find(|b| !(b[2] > b[0] && b[3] > b[1])) {
                candle_core::bail!("target {i}: box {b:?} has no positive width and height");
            }
        }
        let device = cls_logits.device();
        let mut bbox_loss = Tensor::zeros((), DType::F32, device)?;
        let mut cls_targets = vec![0u32; n * num_anchors];
        let mut num_foreground = 0usize;
        let mut assignments = Vec::with_capacity(n);
        for (i, target) in targets.iter().enumerate() {
            let matches = self.matcher.assign(&target.boxes, anchors);
            let mut fg_idx = Vec::new();
            let mut regression_targets = Vec::new();
            for (a, m) in matches.iter().enumerate() {
                if let Match::GroundTruth(g) = *m {
                    fg_idx.push(a as u32);
                    regression_targets.extend(self.coder.encode(&target.boxes[g], &anchors[a]));
                    cls_targets[i * num_anchors + a] = target.labels[g] as u32;
                }
            }
            if !fg_idx.is_empty() {
                let k = fg_idx.len();
                let idx = Tensor::from_vec(fg_idx, k, device)?;
                let pred = bbox_regression.get(i)?.index_select(&idx, 0)?;
                let want = Tensor::from_vec(regression_targets, (k, 4), device)?;
                bbox_loss = (bbox_loss + smooth_l1_sum(&pred, &want)?)?;
                num_foreground += k;
            }
            assignments.push(matches);
        }

        // Per-anchor cross-entropy, then torchvision's mining: rank anchors by loss with positives at -inf
        // and keep those ranked below 3·positives; positives always count.
        let log_probs = candle_nn::ops::log_softmax(cls_logits, D::Minus1)?;
        let target_t = Tensor::from_vec(cls_targets.clone(), (n, num_anchors, 1), device)?;
        let cls_loss = log_probs.gather(&target_t, 2)?.squeeze(2)?.neg()?;
        let values = cls_loss
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut weights = vec![0f32; n * num_anchors];
        for i in 0..n {
            let row = i * num_anchors..(i + 1) * num_anchors;
            let positive = |a: usize| cls_targets[row.start + a] > 0;
            let num_positive = (0..num_anchors).filter(|&a| positive(a)).count();
            let num_negative = self.neg_to_pos_ratio * num_positive as f32;
            let mut ranked: Vec<(f32, usize)> = (0..num_anchors)
                .map(|a| {
                    (
                        if positive(a) {
                            f32::NEG_INFINITY
                        } else {
                            values[row.start + a]
                        },
                        a,
                    )
                })
                .collect();
            ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
            for (rank, &(_, a)) in ranked.iter().enumerate() {
                if (rank as f32) < num_negative {
                    weights[row.start + a] += 1.0;
                }
            }
            for a in 0..num_anchors {
                if positive(a) {
                    weights[row.start + a] += 1.0;
                }
            }
        }
        let weights = Tensor::from_vec(weights, (n, num_anchors), device)?;
        let denominator = num_foreground.max(1) as f64;
        let classification = ((cls_loss * weights)?.sum_all()? / denominator)?;
        let losses = Losses {
            bbox_regression: (bbox_loss / denominator)?,
            classification,
        };
        Ok((losses, assignments))
    }
}

/// Scales ground-truth boxes from original-image pixels to network-input pixels, as
/// `GeneralizedRCNNTransform` does for targets.
pub fn resize_boxes(
    boxes: &[Box4],
    original_size: (usize, usize),
    new_size: (usize, usize),
) -> Vec<Box4> {
    let ratio_h = new_size.0 as f32 / original_size.0 as f32;
    let ratio_w = new_size.1 as f32 / original_size.1 as f32;
    boxes
        .iter()
        .map(|b| {
            [
                b[0] * ratio_w,
                b[1] * ratio_h,
                b[2] * ratio_w,
                b[3] * ratio_h,
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn bad_targets_are_refused_with_a_reason() {
        let anchors = [[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0]];
        let cls = Tensor::zeros((1, 2, 3), DType::F32, &Device::Cpu).unwrap();
        let reg = Tensor::zeros((1, 2, 4), DType::F32, &Device::Cpu).unwrap();
        let loss = SsdLoss::default();
        let cases = [
            (
                Target {
                    boxes: vec![[0.0, 0.0, 5.0, 5.0]],
                    labels: vec![3],
                },
                "outside 1..3",
            ),
            (
                Target {
                    boxes: vec![[0.0, 0.0, 5.0, 5.0]],
                    labels: vec![],
                },
                "0 labels for 1 boxes",
            ),
            (
                Target {
                    boxes: vec![[4.0, 0.0, 4.0, 5.0]],
                    labels: vec![1],
                },
                "no positive width",
            ),
        ];
        for (target, reason) in cases {
            let err = loss
                .compute(&cls, &reg, &anchors, &[target])
                .unwrap_err()
                .to_string();
            assert!(err.contains(reason), "{err}");
        }
        let ok = Target {
            boxes: vec![[0.0, 0.0, 9.0, 9.0]],
            labels: vec![2],
        };
        let (losses, matches) = loss.compute(&cls, &reg, &anchors, &[ok]).unwrap();
        assert_eq!(matches[0][0], Match::GroundTruth(0));
        assert!(losses.total().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    }
}
