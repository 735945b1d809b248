//! Inference around the network: optional resizing of the input and back, and sliding-window inference
//! for images too large to run at once.

use candle_core::{Device, Result, Tensor};

use crate::model::DeepLabV3;
use mobileone::resize::resize_bilinear;

/// Size (height, width) that makes the shorter side `shorter` and keeps the aspect ratio.
pub fn shorter_side_size(height: usize, width: usize, shorter: usize) -> (usize, usize) {
    let scale = shorter as f64 / height.min(width) as f64;
    let scaled = |side: usize| ((side as f64 * scale).round() as usize).max(1);
    if height <= width {
        (shorter, scaled(width))
    } else {
        (scaled(height), shorter)
    }
}

/// How the network sees an image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InferenceOptions {
    /// Resize so the shorter side has this length first; the logits are resized back.
    pub shorter_side: Option<usize>,
    /// Run on `tile`×`tile` windows every `2·tile/3` pixels and average the overlapping logits
    /// (mmsegmentation's `slide` mode) instead of on the whole image at once.
    pub tile: Option<usize>,
}

/// A shorter-side length alone (whole-image inference).
impl From<Option<usize>> for InferenceOptions {
    fn from(shorter_side: Option<usize>) -> Self {
        Self {
            shorter_side,
            tile: None,
        }
    }
}

/// Eval-mode logits (N, classes, H, W) at the resolution of `image` (a normalised NCHW batch).
pub fn predict_logits(
    model: &DeepLabV3,
    image: &Tensor,
    options: impl Into<InferenceOptions>,
) -> Result<Tensor> {
    let options = options.into();
    let (_, _, height, width) = image.dims4()?;
    let run = |x: &Tensor| match options.tile {
        Some(tile) => sliding_window_logits(model, x, tile, (2 * tile / 3).max(1)),
        None => Ok(model.forward_t(x, false)?.logits),
    };
    match options.shorter_side {
        Some(n) if n != height.min(width) => {
            let (h, w) = shorter_side_size(height, width, n);
            let logits = run(&resize_bilinear(image, h, w)?)?;
            resize_bilinear(&logits, height, width)
        }
        _ => run(image),
    }
}

/// Window start positions along one axis, as mmsegmentation's `slide_inference`: every `stride`
/// pixels, the last window moved back to end at the border.
fn window_starts(size: usize, tile: usize, stride: usize) -> Vec<(usize, usize)> {
    let count = size.saturating_sub(tile).div_ceil(stride) + 1;
    (0..count)
        .map(|i| {
            let end = (i * stride + tile).min(size);
            (end.saturating_sub(tile), end)
        })
        .collect()
}

/// Logits averaged over overlapping `tile`×`tile` windows placed every `stride` pixels.
pub fn sliding_window_logits(
    model: &DeepLabV3,
    image: &Tensor,
    tile: usize,
    stride: usize,
) -> Result<Tensor> {
    if tile == 0 || stride == 0 {
        candle_core::bail!("sliding-window tile and stride must be positive");
    }
    let (_, _, height, width) = image.dims4()?;
    let mut sum: Option<Tensor> = None;
    let mut count = vec![0f32; height * width];
    for &(y1, y2) in &window_starts(height, tile, stride) {
        for &(x1, x2) in &window_starts(width, tile, stride) {
            let window = image.narrow(2, y1, y2 - y1)?.narrow(3, x1, x2 - x1)?;
            let logits = model.forward_t(&window, false)?.logits;
            let placed =
                logits
                    .pad_with_zeros(2, y1, height - y2)?
                    .pad_with_zeros(3, x1, width - x2)?;
            sum = Some(match sum {
                Some(s) => (s + placed)?,
                None => placed,
            });
            for y in y1..y2 {
                count[y * width + x1..y * width + x2]
                    .iter_mut()
                    .for_each(|c| *c += 1.0);
            }
        }
    }
    let count =
        Tensor::from_vec(count, (1, 1, height, width), &Device::Cpu)?.to_device(image.device())?;
    sum.expect("at least one window").broadcast_div(&count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_cover_the_axis_like_mmseg() {
        assert_eq!(window_starts(100, 512, 341), vec![(0, 100)]);
        assert_eq!(window_starts(683, 512, 341), vec![(0, 512), (171, 683)]);
        assert_eq!(window_starts(10, 4, 3), vec![(0, 4), (3, 7), (6, 10)]);
    }

    #[test]
    fn shorter_side_keeps_the_aspect_ratio() {
        assert_eq!(shorter_side_size(480, 640, 240), (240, 320));
        assert_eq!(shorter_side_size(131, 97, 50), (68, 50));
        assert_eq!(shorter_side_size(1, 1000, 1), (1, 1000));
    }
}
