//! Inference around the network: optional resizing of the input and back.

use candle_core::{Result, Tensor};

use crate::model::DeepLabV3;
use crate::resize::resize_bilinear;

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

/// Eval-mode logits (N, classes, H, W) at the resolution of `image` (a normalised NCHW batch). With
/// `shorter_side`, the image is first resized so its shorter side has that length and the logits are
/// resized back.
pub fn predict_logits(
    model: &DeepLabV3,
    image: &Tensor,
    shorter_side: Option<usize>,
) -> Result<Tensor> {
    let (_, _, height, width) = image.dims4()?;
    match shorter_side {
        Some(n) if n != height.min(width) => {
            let (h, w) = shorter_side_size(height, width, n);
            let logits = model
                .forward_t(&resize_bilinear(image, h, w)?, false)?
                .logits;
            resize_bilinear(&logits, height, width)
        }
        _ => Ok(model.forward_t(image, false)?.logits),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorter_side_keeps_the_aspect_ratio() {
        assert_eq!(shorter_side_size(480, 640, 240), (240, 320));
        assert_eq!(shorter_side_size(131, 97, 50), (68, 50));
        assert_eq!(shorter_side_size(1, 1000, 1), (1, 1000));
    }
}
