//! From head outputs to detections, as torchvision's `SSD.postprocess_detections` followed by
//! `GeneralizedRCNNTransform.postprocess`; plain f32 slices, candidates sorted once.

use crate::anchors::Box4;
use crate::box_coder::BoxCoder;
use crate::matcher::box_area;

/// One detected object; `label` indexes the classifier outputs (0 is background, never returned).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    pub bbox: Box4,
    pub score: f32,
    pub label: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PostProcessConfig {
    /// Keep class scores strictly above this.
    pub score_thresh: f32,
    /// Suppress a box whose IoU with a higher-scoring box of the same class is above this.
    pub nms_thresh: f32,
    /// Detections kept per image after NMS.
    pub detections_per_img: usize,
    /// Highest-scoring candidates kept per class before NMS.
    pub topk_candidates: usize,
}

impl Default for PostProcessConfig {
    /// torchvision's `ssdlite320_mobilenet_v3_large` defaults (COCO evaluation settings).
    fn default() -> Self {
        Self {
            score_thresh: 0.001,
            nms_thresh: 0.55,
            detections_per_img: 300,
            topk_candidates: 300,
        }
    }
}

/// In-place softmax over rows of `num_classes` (max-subtracted, as `torch.softmax`).
pub fn softmax_rows(logits: &mut [f32], num_classes: usize) {
    for row in logits.chunks_exact_mut(num_classes) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        for v in row.iter_mut() {
            *v /= sum;
        }
    }
}

/// Greedy NMS: indices of the kept boxes, highest score first. Equal scores keep their input order
/// (torchvision's stable sort). Suppresses when IoU > `iou_threshold`.
pub fn nms(boxes: &[Box4], scores: &[f32], iou_threshold: f32) -> Vec<usize> {
    batched_nms(boxes, scores, &vec![0; boxes.len()], iou_threshold)
}

/// Up to this many boxes torchvision's `batched_nms` on CPU shifts each class by
/// `label · (max coordinate + 1)` and runs one NMS; above, it runs NMS per class on the raw boxes.
const COORDINATE_TRICK_MAX_BOXES: usize = 1000;

/// Class-wise NMS (`torchvision.ops.batched_nms`): boxes only suppress boxes of their own label.
/// Returns kept indices sorted by decreasing score (equal scores by index).
pub fn batched_nms(
    boxes: &[Box4],
    scores: &[f32],
    labels: &[usize],
    iou_threshold: f32,
) -> Vec<usize> {
    batched_nms_top(boxes, scores, labels, iou_threshold, usize::MAX)
}

/// The first `max_keep` indices of [`batched_nms`]. Candidates are visited once in global score order and
/// checked against the kept boxes of their label only, which is greedy per-class NMS; it stops as soon
/// as `max_keep` boxes are kept, since every later candidate would rank below them.
pub fn batched_nms_top(
    boxes: &[Box4],
    scores: &[f32],
    labels: &[usize],
    iou_threshold: f32,
    max_keep: usize,
) -> Vec<usize> {
    // Reproduce the shifted coordinates (and so their rounding) where torchvision uses them.
    let shifted: Vec<Box4>;
    let boxes = if boxes.len() <= COORDINATE_TRICK_MAX_BOXES && !boxes.is_empty() {
        let max_coordinate = boxes
            .iter()
            .flatten()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        shifted = boxes
            .iter()
            .zip(labels)
            .map(|(b, &l)| {
                let offset = l as f32 * (max_coordinate + 1.0);
                [b[0] + offset, b[1] + offset, b[2] + offset, b[3] + offset]
            })
            .collect();
        &shifted
    } else {
        boxes
    };
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let num_labels = labels.iter().max().map_or(0, |m| m + 1);
    // Per label, the kept boxes with their areas.
    let mut kept: Vec<Vec<(Box4, f32)>> = vec![Vec::new(); num_labels];
    let mut keep = Vec::new();
    for i in order {
        if keep.len() >= max_keep {
            break;
        }
        let b = &boxes[i];
        let area = box_area(b);
        let suppressed = kept[labels[i]].iter().any(|(k, k_area)| {
            let w = (k[2].min(b[2]) - k[0].max(b[0])).max(0.0);
            let h = (k[3].min(b[3]) - k[1].max(b[1])).max(0.0);
            let inter = w * h;
            inter / (k_area + area - inter) > iou_threshold
        });
        if !suppressed {
            kept[labels[i]].push((*b, area));
            keep.push(i);
        }
    }
    keep
}

/// Detections of one image.
///
/// `cls_logits` is `[anchors × num_classes]`, `box_regression` `[anchors × 4]`, both row-major;
/// `input_size` is the network input's (height, width) that boxes are clipped to, and `original_size`
/// the (height, width) the returned boxes are scaled to.
#[allow(clippy::too_many_arguments)] // torchvision's inputs: outputs, anchors, sizes, coder, settings
pub fn postprocess(
    cls_logits: &[f32],
    box_regression: &[f32],
    anchors: &[Box4],
    num_classes: usize,
    input_size: (usize, usize),
    original_size: (usize, usize),
    coder: &BoxCoder,
    config: &PostProcessConfig,
) -> Vec<Detection> {
    let num_anchors = anchors.len();
    assert_eq!(
        cls_logits.len(),
        num_anchors * num_classes,
        "cls_logits must be anchors × classes"
    );
    assert_eq!(
        box_regression.len(),
        num_anchors * 4,
        "box_regression must be anchors × 4"
    );
    let mut scores = cls_logits.to_vec();
    softmax_rows(&mut scores, num_classes);
    let (in_h, in_w) = (input_size.0 as f32, input_size.1 as f32);
    let boxes: Vec<Box4> = box_regression
        .chunks_exact(4)
        .zip(anchors)
        .map(|(codes, anchor)| {
            let b = coder.decode(&[codes[0], codes[1], codes[2], codes[3]], anchor);
            [
                b[0].clamp(0.0, in_w),
                b[1].clamp(0.0, in_h),
                b[2].clamp(0.0, in_w),
                b[3].clamp(0.0, in_h),
            ]
        })
        .collect();

    // One pass over the scores gathers every class's candidates; then top-k per class.
    let mut per_class: Vec<Vec<(f32, usize)>> = vec![Vec::new(); num_classes];
    for (a, row) in scores.chunks_exact(num_classes).enumerate() {
        for (label, &s) in row.iter().enumerate().skip(1) {
            if s > config.score_thresh {
                per_class[label].push((s, a));
            }
        }
    }
    let mut cand_boxes = Vec::new();
    let mut cand_scores = Vec::new();
    let mut cand_labels = Vec::new();
    let by_score = |x: &(f32, usize), y: &(f32, usize)| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1));
    for (label, candidates) in per_class.iter_mut().enumerate().skip(1) {
        let k = config.topk_candidates.min(candidates.len());
        if k < candidates.len() {
            candidates.select_nth_unstable_by(k, by_score);
            candidates.truncate(k);
        }
        candidates.sort_by(by_score);
        for &(s, a) in candidates.iter() {
            cand_boxes.push(boxes[a]);
            cand_scores.push(s);
            cand_labels.push(label);
        }
    }

    let keep = batched_nms_top(
        &cand_boxes,
        &cand_scores,
        &cand_labels,
        config.nms_thresh,
        config.detections_per_img,
    );
    let ratio_h = original_size.0 as f32 / input_size.0 as f32;
    let ratio_w = original_size.1 as f32 / input_size.1 as f32;
    keep.into_iter()
        .map(|i| {
            let b = cand_boxes[i];
            Detection {
                bbox: [
                    b[0] * ratio_w,
                    b[1] * ratio_h,
                    b[2] * ratio_w,
                    b[3] * ratio_h,
                ],
                score: cand_scores[i],
                label: cand_labels[i],
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nms_keeps_best_of_overlapping_pair() {
        let boxes = [
            [0.0, 0.0, 10.0, 10.0],
            [1.0, 1.0, 11.0, 11.0],
            [20.0, 20.0, 30.0, 30.0],
        ];
        assert_eq!(nms(&boxes, &[0.5, 0.9, 0.7], 0.5), vec![1, 2]);
        // Different labels never suppress each other.
        assert_eq!(
            batched_nms(&boxes, &[0.5, 0.9, 0.7], &[1, 2, 1], 0.5),
            vec![1, 2, 0]
        );
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut v = vec![1.0, 2.0, 3.0, -1000.0, 0.0, 1000.0];
        softmax_rows(&mut v, 3);
        assert!((v[..3].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(v[5], 1.0);
    }
}
