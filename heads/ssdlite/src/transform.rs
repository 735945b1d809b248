//! Input preprocessing as torchvision's `GeneralizedRCNNTransform` with `fixed_size`: RGB in [0, 1],
//! normalise, then resize with `F.interpolate(mode="bilinear", align_corners=False)` (no antialias).
//! Plain f32 CHW buffers; the arithmetic follows PyTorch's CPU kernel so results agree to rounding.

/// Source indices and weights of one output coordinate (PyTorch's `compute_source_index_and_lambda`).
#[derive(Debug, Clone, Copy)]
struct Tap {
    i0: usize,
    i1: usize,
    w0: f32,
    w1: f32,
}

fn linear_taps(input_size: usize, output_size: usize) -> Vec<Tap> {
    if input_size == output_size {
        return (0..output_size)
            .map(|i| Tap {
                i0: i,
                i1: i,
                w0: 1.0,
                w1: 0.0,
            })
            .collect();
    }
    let scale = input_size as f32 / output_size as f32;
    (0..output_size)
        .map(|o| {
            let real = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (real.floor() as usize).min(input_size - 1);
            let w1 = (real - i0 as f32).clamp(0.0, 1.0);
            let i1 = if i0 < input_size - 1 { i0 + 1 } else { i0 };
            Tap {
                i0,
                i1,
                w0: 1.0 - w1,
                w1,
            }
        })
        .collect()
}

/// Bilinear resize of a CHW buffer, `F.interpolate(x, size=(out_h, out_w), mode="bilinear",
/// align_corners=False)`.
pub fn resize_bilinear(
    src: &[f32],
    channels: usize,
    in_size: (usize, usize),
    out_size: (usize, usize),
) -> Vec<f32> {
    let (in_h, in_w) = in_size;
    let (out_h, out_w) = out_size;
    assert_eq!(
        src.len(),
        channels * in_h * in_w,
        "buffer must be channels × height × width"
    );
    let ys = linear_taps(in_h, out_h);
    let xs = linear_taps(in_w, out_w);
    let mut out = Vec::with_capacity(channels * out_h * out_w);
    for plane in src.chunks_exact(in_h * in_w) {
        for ty in &ys {
            let row0 = &plane[ty.i0 * in_w..(ty.i0 + 1) * in_w];
            let row1 = &plane[ty.i1 * in_w..(ty.i1 + 1) * in_w];
            for tx in &xs {
                let top = row0[tx.i0] * tx.w0 + row0[tx.i1] * tx.w1;
                let bottom = row1[tx.i0] * tx.w0 + row1[tx.i1] * tx.w1;
                out.push(top * ty.w0 + bottom * ty.w1);
            }
        }
    }
    out
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
    pub fn apply(&self, pixels: &[u8], height: usize, width: usize) -> Vec<f32> {
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
        assert_eq!(resize_bilinear(&x, 2, (3, 5), (3, 5)), x);
    }

    #[test]
    fn upsample_two_pixels() {
        // torch: F.interpolate(tensor([[[[0., 1.]]]]), size=(1, 4), mode="bilinear") = [0, .25, .75, 1]
        let out = resize_bilinear(&[0.0, 1.0], 1, (1, 2), (1, 4));
        assert_eq!(out, vec![0.0, 0.25, 0.75, 1.0]);
    }
}
