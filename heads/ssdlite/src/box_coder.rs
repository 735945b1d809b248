//! Box encoding relative to anchors, as torchvision's `det_utils.BoxCoder` (`_utils.py`), in f32.

use crate::anchors::Box4;

/// `log(1000 / 16)`: torchvision's upper clamp of dw, dh before `exp`.
pub const BBOX_XFORM_CLIP: f64 = 4.135_166_556_742_356;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoxCoder {
    pub weights: [f32; 4],
    pub bbox_xform_clip: f32,
}

impl Default for BoxCoder {
    /// SSD's coder: weights (10, 10, 5, 5).
    fn default() -> Self {
        Self::new([10.0, 10.0, 5.0, 5.0])
    }
}

fn centre_size(b: &Box4) -> [f32; 4] {
    let w = b[2] - b[0];
    let h = b[3] - b[1];
    [b[0] + 0.5 * w, b[1] + 0.5 * h, w, h]
}

impl BoxCoder {
    pub fn new(weights: [f32; 4]) -> Self {
        Self {
            weights,
            bbox_xform_clip: BBOX_XFORM_CLIP as f32,
        }
    }

    /// Regression targets `(dx, dy, dw, dh)` that move `anchor` onto `target` (`encode_single`).
    pub fn encode(&self, target: &Box4, anchor: &Box4) -> [f32; 4] {
        let [wx, wy, ww, wh] = self.weights;
        let [ax, ay, aw, ah] = centre_size(anchor);
        let [gx, gy, gw, gh] = centre_size(target);
        [
            wx * (gx - ax) / aw,
            wy * (gy - ay) / ah,
            ww * (gw / aw).ln(),
            wh * (gh / ah).ln(),
        ]
    }

    /// Box predicted by `codes` relative to `anchor` (`decode_single`).
    pub fn decode(&self, codes: &[f32; 4], anchor: &Box4) -> Box4 {
        let [wx, wy, ww, wh] = self.weights;
        let [ax, ay, aw, ah] = centre_size(anchor);
        let dx = codes[0] / wx;
        let dy = codes[1] / wy;
        // torch.clamp(max=...) only: very negative sizes are allowed (exp underflows to 0).
        let dw = (codes[2] / ww).min(self.bbox_xform_clip);
        let dh = (codes[3] / wh).min(self.bbox_xform_clip);
        let cx = dx * aw + ax;
        let cy = dy * ah + ay;
        let half_w = 0.5 * (dw.exp() * aw);
        let half_h = 0.5 * (dh.exp() * ah);
        [cx - half_w, cy - half_h, cx + half_w, cy + half_h]
    }
}
