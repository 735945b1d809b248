//! Default boxes, exactly as torchvision's `DefaultBoxGenerator` (`anchor_utils.py`).
//!
//! The arithmetic mirrors torchvision's dtypes: scales and width/height pairs are computed in f64
//! (Python floats) and rounded to f32 once; centres and the corner conversion run in f32.

/// A box as `[x1, y1, x2, y2]`.
pub type Box4 = [f32; 4];

#[derive(Debug, Clone, PartialEq)]
pub struct DefaultBoxGenerator {
    aspect_ratios: Vec<Vec<f64>>,
    scales: Vec<f64>,
    clip: bool,
    /// Per level, the (w, h) pairs relative to the image, already rounded to f32.
    wh_pairs: Vec<Vec<[f32; 2]>>,
}

impl DefaultBoxGenerator {
    /// `DefaultBoxGenerator(aspect_ratios, min_ratio, max_ratio, clip=True)` with linearly spaced scales.
    pub fn new(aspect_ratios: Vec<Vec<f64>>, min_ratio: f64, max_ratio: f64) -> Self {
        let num_outputs = aspect_ratios.len();
        let scales = if num_outputs > 1 {
            let range = max_ratio - min_ratio;
            let mut scales: Vec<f64> = (0..num_outputs)
                .map(|k| min_ratio + range * k as f64 / (num_outputs as f64 - 1.0))
                .collect();
            scales.push(1.0);
            scales
        } else {
            vec![min_ratio, max_ratio]
        };
        let wh_pairs = (0..num_outputs)
            .map(|k| {
                let s_k = scales[k];
                let s_prime = (scales[k] * scales[k + 1]).sqrt();
                let mut pairs = vec![[s_k, s_k], [s_prime, s_prime]];
                for &ar in &aspect_ratios[k] {
                    let sq = ar.sqrt();
                    let (w, h) = (s_k * sq, s_k / sq);
                    pairs.push([w, h]);
                    pairs.push([h, w]);
                }
                pairs
                    .into_iter()
                    .map(|[w, h]| [w as f32, h as f32])
                    .collect()
            })
            .collect();
        Self {
            aspect_ratios,
            scales,
            clip: true,
            wh_pairs,
        }
    }

    /// torchvision's SSDLite configuration: `DefaultBoxGenerator([[2, 3]] * levels, 0.2, 0.95)`.
    pub fn ssdlite(levels: usize) -> Self {
        Self::new(vec![vec![2.0, 3.0]; levels], 0.2, 0.95)
    }

    pub fn num_levels(&self) -> usize {
        self.aspect_ratios.len()
    }

    pub fn scales(&self) -> &[f64] {
        &self.scales
    }

    /// Anchors per location of each level (`2 + 2 * len(aspect_ratios[k])`).
    pub fn num_anchors_per_location(&self) -> Vec<usize> {
        self.aspect_ratios.iter().map(|r| 2 + 2 * r.len()).collect()
    }

    /// Default boxes in image pixels, ordered level → y → x → anchor.
    /// `grid_sizes` are the feature maps' (height, width); `image_size` is the network input's (height, width).
    pub fn generate(&self, grid_sizes: &[(usize, usize)], image_size: (usize, usize)) -> Vec<Box4> {
        assert_eq!(
            grid_sizes.len(),
            self.num_levels(),
            "one grid size per level"
        );
        let (img_h, img_w) = (image_size.0 as f32, image_size.1 as f32);
        let mut boxes = Vec::new();
        for (k, &(f_h, f_w)) in grid_sizes.iter().enumerate() {
            let pairs: Vec<[f32; 2]> = self.wh_pairs[k]
                .iter()
                .map(|&[w, h]| {
                    if self.clip {
                        [w.clamp(0.0, 1.0), h.clamp(0.0, 1.0)]
                    } else {
                        [w, h]
                    }
                })
                .collect();
            for y in 0..f_h {
                let cy = (y as f32 + 0.5) / f_h as f32;
                for x in 0..f_w {
                    let cx = (x as f32 + 0.5) / f_w as f32;
                    for &[w, h] in &pairs {
                        boxes.push([
                            (cx - 0.5 * w) * img_w,
                            (cy - 0.5 * h) * img_h,
                            (cx + 0.5 * w) * img_w,
                            (cy + 0.5 * h) * img_h,
                        ]);
                    }
                }
            }
        }
        boxes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssdlite_320_has_3234_anchors() {
        let gen = DefaultBoxGenerator::ssdlite(6);
        let grids = [(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)];
        assert_eq!(gen.generate(&grids, (320, 320)).len(), 3234);
        assert_eq!(gen.num_anchors_per_location(), vec![6; 6]);
        assert!((gen.scales()[5] - 0.95).abs() < 1e-12 && gen.scales()[6] == 1.0);
    }
}
