//! Anchor ↔ ground-truth assignment, as torchvision's `SSDMatcher` (`_utils.py`) over `box_iou`.

use crate::anchors::Box4;

/// Area with the COCO convention (no +1), as `torchvision.ops.box_area`.
pub fn box_area(b: &Box4) -> f32 {
    (b[2] - b[0]) * (b[3] - b[1])
}

/// Intersection over union, as `torchvision.ops.box_iou` for one pair (f32 throughout).
pub fn box_iou(a: &Box4, b: &Box4) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    inter / (box_area(a) + box_area(b) - inter)
}

/// What an anchor was matched to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Match {
    Background,
    GroundTruth(usize),
}

impl Match {
    /// torchvision's encoding: the ground-truth index, or -1 for background.
    pub fn to_index(self) -> i64 {
        match self {
            Match::Background => -1,
            Match::GroundTruth(i) => i as i64,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SsdMatcher {
    pub iou_threshold: f32,
}

impl Default for SsdMatcher {
    fn default() -> Self {
        Self { iou_threshold: 0.5 }
    }
}

impl SsdMatcher {
    /// One match per anchor: each anchor takes its best ground truth when that IoU reaches the threshold;
    /// then each ground truth claims its own best anchor (later ground truths win a shared anchor).
    /// Ties pick the first maximum, as `Tensor.max(dim)`.
    pub fn assign(&self, gt_boxes: &[Box4], anchors: &[Box4]) -> Vec<Match> {
        if gt_boxes.is_empty() || anchors.is_empty() {
            return vec![Match::Background; anchors.len()];
        }
        let mut best_anchor: Vec<(f32, usize)> = vec![(f32::NEG_INFINITY, 0); gt_boxes.len()];
        let mut matches: Vec<Match> = anchors
            .iter()
            .enumerate()
            .map(|(a, anchor)| {
                let mut best = (f32::NEG_INFINITY, 0);
                for (g, gt) in gt_boxes.iter().enumerate() {
                    let iou = box_iou(gt, anchor);
                    if iou > best.0 {
                        best = (iou, g);
                    }
                    if iou > best_anchor[g].0 {
                        best_anchor[g] = (iou, a);
                    }
                }
                if best.0 >= self.iou_threshold {
                    Match::GroundTruth(best.1)
                } else {
                    Match::Background
                }
            })
            .collect();
        for (g, &(_, a)) in best_anchor.iter().enumerate() {
            matches[a] = Match::GroundTruth(g);
        }
        matches
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iou_of_half_overlap() {
        let a = [0.0, 0.0, 2.0, 2.0];
        let b = [1.0, 0.0, 3.0, 2.0];
        assert!((box_iou(&a, &b) - 1.0 / 3.0).abs() < 1e-7);
        assert_eq!(box_iou(&a, &[5.0, 5.0, 6.0, 6.0]), 0.0);
    }

    #[test]
    fn every_ground_truth_gets_its_best_anchor() {
        let anchors = [
            [0.0, 0.0, 10.0, 10.0],
            [20.0, 20.0, 30.0, 30.0],
            [0.0, 0.0, 100.0, 100.0],
        ];
        // Poor overlap with everything: still forced onto anchor 0.
        let gts = [[0.0, 0.0, 3.0, 3.0], [20.0, 20.0, 30.0, 30.0]];
        let m = SsdMatcher::default().assign(&gts, &anchors);
        assert_eq!(
            m,
            vec![
                Match::GroundTruth(0),
                Match::GroundTruth(1),
                Match::Background
            ]
        );
        assert_eq!(
            SsdMatcher::default().assign(&[], &anchors),
            vec![Match::Background; 3]
        );
    }
}
