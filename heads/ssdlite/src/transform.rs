//! Input preprocessing as torchvision's `GeneralizedRCNNTransform` with `fixed_size`: RGB in [0, 1],
//! normalise, then resize with `F.interpolate(mode="bilinear", align_corners=False)` (no antialias).
//! Plain f32 CHW buffers; the arithmetic follows PyTorch's CPU kernel so results agree to rounding.

use candle_core::{Device, Result, Tensor};

/// Bilinear resize of a CHW buffer, `F.interpolate(x, size=(out_h, out_w), mode="bilinear",
/// align_corners=False)`, through the project's one implementation ([`mobileone::resize`]).
pub fn resize_bilinear(
    src: &[f32],
    channels: usize,
    in_size: (usize, usize),
    out_size: (usize, usize),
) -> Result<Vec<f32>> {
    let x = Tensor::from_slice(src, (1, channels, in_size.0, in_size.1), &Device::Cpu)?;
    mobileone::resize::resize_bilinear(&x, out_size.0, out_size.1)?
        .flatten_all()?
        .to_vec1()
}

/// `(x - mean[c]) / std[c]` per channel of a CHW buffer.
pub fn normalize(chw: &mut [f32], mean: &[f32; 3], std: &[f32; 3]) {
    let plane = chw.len() / 3;
    for (c, values) in chw.chunks_exact_mut(plane).enumerate() {
        for v in values {
            *v = (*v - mean[c]) / std[c];
        }
    }
}

/// Interleaved RGB8 pixels → CHW f32 in [0, 1] (`to_tensor`: value / 255).
pub fn rgb8_to_chw(pixels: &[u8], height: usize, width: usize) -> Vec<f32> {
    assert_eq!(
        pixels.len(),
        height * width * 3,
        "RGB8 buffer must be height × width × 3"
    );
    let plane = height * width;
    let mut out = vec![0.0f32; 3 * plane];
    for (p, rgb) in pixels.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * plane + p] = rgb[c] as f32 / 255.0;
        }
    }
    out
}

/// Borrowed interleaved RGB8 pixels of one image.
#[derive(Debug, Clone, Copy)]
pub struct ImageView<'a> {
    pub pixels: &'a [u8],
    pub height: usize,
    pub width: usize,
}

/// Normalisation statistics and the fixed network input size.
#[derive(Debug, Clone, PartialEq)]
pub struct Transform {
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// (height, width) of the network input.
    pub size: (usize, usize),
}

impl Transform {
    /// Interleaved RGB8 image → normalised, resized CHW buffer of `3 × size.0 × size.1`.
    pub fn apply(&self, pixels: &[u8], height: usize, width: usize) -> Result<Vec<f32>> {
        let mut chw = rgb8_to_chw(pixels, height, width);
        normalize(&mut chw, &self.mean, &self.std);
        resize_bilinear(&chw, 3, (height, width), self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_is_identity() {
        let x: Vec<f32> = (0..2 * 3 * 5).map(|v| v as f32 * 0.37).collect();
        assert_eq!(resize_bilinear(&x, 2, (3, 5), (3, 5)).unwrap(), x);
    }

    #[test]
    fn upsample_two_pixels() {
        // torch: F.interpolate(tensor([[[[0., 1.]]]]), size=(1, 4), mode="bilinear") = [0, .25, .75, 1]
        let out = resize_bilinear(&[0.0, 1.0], 1, (1, 2), (1, 4)).unwrap();
        assert_eq!(out, vec![0.0, 0.25, 0.75, 1.0]);
    }
}
