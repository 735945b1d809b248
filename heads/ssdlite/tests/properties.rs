//! Property tests: box coding round trips and NMS against a brute-force definition, on random inputs.

use ssdlite::anchors::Box4;
use ssdlite::box_coder::BoxCoder;
use ssdlite::matcher::box_iou;
use ssdlite::postprocess::{batched_nms, nms};

/// SplitMix64: a deterministic generator so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    }

    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.next_f32()
    }

    fn boxed(&mut self, max_side: f32) -> Box4 {
        let (x, y) = (self.range(0.0, 300.0), self.range(0.0, 300.0));
        [
            x,
            y,
            x + self.range(0.5, max_side),
            y + self.range(0.5, max_side),
        ]
    }
}

#[test]
fn decode_inverts_encode() {
    let coder = BoxCoder::default();
    let mut rng = Rng(7);
    for _ in 0..10_000 {
        let anchor = rng.boxed(200.0);
        let target = rng.boxed(200.0);
        let codes = coder.encode(&target, &anchor);
        if codes[2] / 5.0 > coder.bbox_xform_clip || codes[3] / 5.0 > coder.bbox_xform_clip {
            continue; // decode clamps growth beyond 1000/16, by design
        }
        let back = coder.decode(&codes, &anchor);
        for k in 0..4 {
            let tol = 1e-3 + 2e-5 * target[k].abs();
            assert!(
                (back[k] - target[k]).abs() <= tol,
                "{target:?} via {anchor:?} came back as {back:?}"
            );
        }
    }
}

#[test]
fn encode_inverts_decode_within_the_clamp() {
    let coder = BoxCoder::default();
    let mut rng = Rng(11);
    for _ in 0..10_000 {
        let anchor = rng.boxed(200.0);
        let codes = [
            rng.range(-20.0, 20.0),
            rng.range(-20.0, 20.0),
            rng.range(-15.0, 15.0),
            rng.range(-15.0, 15.0),
        ];
        let again = coder.encode(&coder.decode(&codes, &anchor), &anchor);
        for k in 0..4 {
            assert!(
                (again[k] - codes[k]).abs() <= 2e-3,
                "{codes:?} on {anchor:?} re-encoded as {again:?}"
            );
        }
    }
}

/// The definition: walk boxes by decreasing score (ties by index); keep one unless it overlaps a kept
/// box of the same label with IoU above the threshold.
fn brute_force(boxes: &[Box4], scores: &[f32], labels: &[usize], threshold: f32) -> Vec<usize> {
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    order.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
    let mut keep: Vec<usize> = Vec::new();
    for i in order {
        if keep
            .iter()
            .all(|&k| labels[k] != labels[i] || box_iou(&boxes[k], &boxes[i]) <= threshold)
        {
            keep.push(i);
        }
    }
    keep
}

#[test]
fn nms_equals_brute_force() {
    let mut rng = Rng(3);
    // Sizes on both sides of torchvision's coordinate-trick cut-off (1000 boxes).
    for (trial, n) in [5usize, 40, 300, 999, 1500, 4000]
        .into_iter()
        .cycle()
        .take(30)
        .enumerate()
    {
        let boxes: Vec<Box4> = (0..n).map(|_| rng.boxed(120.0)).collect();
        // Coarse scores create ties.
        let scores: Vec<f32> = (0..n)
            .map(|_| (rng.next_f32() * 50.0).floor() / 50.0)
            .collect();
        let threshold = [0.3, 0.5, 0.55, 0.7][trial % 4];
        let single = vec![0usize; n];
        assert_eq!(
            nms(&boxes, &scores, threshold),
            brute_force(&boxes, &scores, &single, threshold)
        );
        let labels: Vec<usize> = (0..n).map(|_| (rng.next_f32() * 5.0) as usize).collect();
        let ours = batched_nms(&boxes, &scores, &labels, threshold);
        let want = brute_force(&boxes, &scores, &labels, threshold);
        if n > 1000 {
            assert_eq!(ours, want, "{n} boxes, threshold {threshold}");
        } else {
            // Below the cut-off the shifted coordinates may round an IoU across the threshold.
            let mut a = ours.clone();
            let mut b = want.clone();
            a.sort();
            b.sort();
            let common = a.iter().filter(|i| b.binary_search(i).is_ok()).count();
            assert!(
                common as f64 >= 0.99 * b.len() as f64,
                "{n} boxes: {common} of {} in common",
                b.len()
            );
        }
    }
}
