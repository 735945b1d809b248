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
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    nms_sorted(boxes, &order, iou_threshold)
}

/// Greedy NMS over `order` (already sorted by decreasing score).
fn nms_sorted(boxes: &[Box4], order: &[usize], iou_threshold: f32) -> Vec<usize> {
    let areas: Vec<f32> = order.iter().map(|&i| box_area(&boxes[i])).collect();
    let mut suppressed = vec![false; order.len()];
    let mut keep = Vec::new();
    for (p, &i) in order.iter().enumerate() {
        if suppressed[p] {
            continue;
        }
        keep.push(i);
        let bi = &boxes[i];
        for q in p + 1..order.len() {
            if suppressed[q] {
                continue;
            }
            let bj = &boxes[order[q]];
            let w = (bi[2].min(bj[2]) - bi[0].max(bj[0])).max(0.0);
            let h = (bi[3].min(bj[3]) - bi[1].max(bj[1])).max(0.0);
            let inter = w * h;
            if inter / (areas[p] + areas[q] - inter) > iou_threshold {
                suppressed[q] = true;
            }
        }
    }
    keep
}

/// Up to this many boxes torchvision's `batched_nms` on CPU shifts each class by
/// `label · (max coordinate + 1)` and runs one NMS; above, it runs NMS per class on the raw boxes.
const COORDINATE_TRICK_MAX_BOXES: usize = 1000;

/// Class-wise NMS (`torchvision.ops.batched_nms`): boxes only suppress boxes of their own label.
/// Returns kept indices sorted by decreasing score.
pub fn batched_nms(
    boxes: &[Box4],
    scores: &[f32],
    labels: &[usize],
    iou_threshold: f32,
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
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let num_labels = labels.iter().max().map_or(0, |m| m + 1);
    let mut per_label: Vec<Vec<usize>> = vec![Vec::new(); num_labels];
    for &i in &order {
        per_label[labels[i]].push(i);
    }
    let mut keep: Vec<usize> = per_label
        .iter()
        .flat_map(|idx| nms_sorted(boxes, idx, iou_threshold))
        .collect();
    keep.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    keep
}

/// Detections of one image.
///
/// `cls_logits` is `[anchors × num_classes]`, `box_regression` `[anchors × 4]`, both row-major;
/// `input_size` is the network input's (height, width) that boxes are clipped to, and `original_size`
/// the (height, width) the returned boxes are scaled to.
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

    let mut cand_boxes = Vec::new();
    let mut cand_scores = Vec::new();
    let mut cand_labels = Vec::new();
    let mut class_candidates: Vec<(f32, usize)> = Vec::with_capacity(num_anchors);
    for label in 1..num_classes {
        class_candidates.clear();
        class_candidates.extend(
            (0..num_anchors)
                .map(|a| (scores[a * num_classes + label], a))
                .filter(|&(s, _)| s > config.score_thresh),
        );
        let k = config.topk_candidates.min(class_candidates.len());
        if k < class_candidates.len() {
            class_candidates
                .select_nth_unstable_by(k, |x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
            class_candidates.truncate(k);
        }
        class_candidates.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
        for &(s, a) in &class_candidates {
            cand_boxes.push(boxes[a]);
            cand_scores.push(s);
            cand_labels.push(label);
        }
    }

    let keep = batched_nms(&cand_boxes, &cand_scores, &cand_labels, config.nms_thresh);
    let ratio_h = original_size.0 as f32 / input_size.0 as f32;
    let ratio_w = original_size.1 as f32 / input_size.1 as f32;
    keep.into_iter()
        .take(config.detections_per_img)
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
