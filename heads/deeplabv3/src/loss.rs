//! Training loss of torchvision's segmentation reference (`references/segmentation/train.py`):
//! pixel-wise cross-entropy ignoring label 255, plus `aux_weight` × the same loss on the auxiliary logits.

use candle_core::{DType, Result, Tensor, D};

/// Label of pixels that take no part in the loss or the metrics (VOC's void border, ADE20K's "other").
pub const IGNORE_INDEX: u32 = 255;

/// `F.cross_entropy(logits, targets, ignore_index=255)` with mean reduction over the labelled pixels.
///
/// `logits` is (N, C, H, W), `targets` (N, H, W) of an integer dtype. A label that is neither
/// `ignore_index` nor below C is an error (as in PyTorch). When every pixel is ignored PyTorch returns
/// NaN; this returns 0 so that one unlabelled crop does not poison a training run.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, ignore_index: u32) -> Result<Tensor> {
    let (n, classes, height, width) = logits.dims4()?;
    let target_dims = targets.dims3()?;
    if target_dims != (n, height, width) {
        candle_core::bail!(
            "cross-entropy: targets are {target_dims:?} but logits are {:?}",
            logits.dims()
        );
    }
    let targets = targets.to_dtype(DType::U32)?;
    let ignored = targets.eq(ignore_index)?;
    let safe_targets = ignored.where_cond(&targets.zeros_like()?, &targets)?;
    let largest = safe_targets.max_all()?.to_scalar::<u32>()?;
    if largest as usize >= classes {
        candle_core::bail!(
            "cross-entropy: label {largest} is outside 0..{classes} and is not the ignore index {ignore_index}"
        );
    }
    let log_probs = candle_nn::ops::log_softmax(logits, 1)?;
    let picked = log_probs
        .gather(&safe_targets.unsqueeze(1)?.contiguous()?, 1)?
        .squeeze(1)?;
    let labelled = ignored.eq(0u8)?.to_dtype(logits.dtype())?;
    let count = labelled
        .sum_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    if count == 0.0 {
        return picked.sum_all()?.affine(0.0, 0.0);
    }
    (picked * labelled)?
        .sum_all()?
        .affine(-1.0 / count as f64, 0.0)
}

/// Loss of a DeepLabV3 forward pass: the main head's cross-entropy plus `aux_weight` times the auxiliary
/// head's (torchvision uses 0.5) when auxiliary logits are given.
pub fn segmentation_loss(
    logits: &Tensor,
    aux_logits: Option<&Tensor>,
    targets: &Tensor,
    aux_weight: f64,
) -> Result<Tensor> {
    let main = cross_entropy(logits, targets, IGNORE_INDEX)?;
    match aux_logits {
        Some(aux) => main + cross_entropy(aux, targets, IGNORE_INDEX)?.affine(aux_weight, 0.0)?,
        None => Ok(main),
    }
}

/// Per-pixel class indices (N, H, W) as u32: the argmax over the class dimension.
pub fn predictions(logits: &Tensor) -> Result<Tensor> {
    logits.argmax(D::Minus(3))?.to_dtype(DType::U32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_hand_computed_cross_entropy_and_ignores_255() -> Result<()> {
        // Two pixels, two classes: logits (0, ln 3) → p = (1/4, 3/4). Pixel 0 label 1, pixel 1 ignored.
        let logits =
            Tensor::new(&[0f32, 0.0, 3f32.ln(), 5.0], &Device::Cpu)?.reshape((1, 2, 1, 2))?;
        let targets = Tensor::new(&[[[1u32, 255]]], &Device::Cpu)?;
        let loss = cross_entropy(&logits, &targets, IGNORE_INDEX)?.to_scalar::<f32>()?;
        assert!((loss - (4f32 / 3.0).ln()).abs() < 1e-6, "{loss}");
        Ok(())
    }

    #[test]
    fn out_of_range_labels_are_errors() -> Result<()> {
        let logits = Tensor::zeros((1, 3, 1, 2), DType::F32, &Device::Cpu)?;
        let targets = Tensor::new(&[[[1u8, 3]]], &Device::Cpu)?;
        let err = cross_entropy(&logits, &targets, IGNORE_INDEX).unwrap_err();
        assert!(err.to_string().contains("label 3"), "{err}");
        Ok(())
    }

    #[test]
    fn all_ignored_gives_zero() -> Result<()> {
        let logits = Tensor::ones((1, 3, 2, 2), DType::F32, &Device::Cpu)?;
        let targets = Tensor::full(255u32, (1, 2, 2), &Device::Cpu)?;
        assert_eq!(
            cross_entropy(&logits, &targets, IGNORE_INDEX)?.to_scalar::<f32>()?,
            0.0
        );
        Ok(())
    }

    #[test]
    fn aux_loss_is_weighted() -> Result<()> {
        let logits = Tensor::new(&[0f32, 1.0], &Device::Cpu)?.reshape((1, 2, 1, 1))?;
        let targets = Tensor::new(&[[[0u32]]], &Device::Cpu)?;
        let main = cross_entropy(&logits, &targets, IGNORE_INDEX)?.to_scalar::<f32>()?;
        let total = segmentation_loss(&logits, Some(&logits), &targets, 0.5)?.to_scalar::<f32>()?;
        assert!((total - 1.5 * main).abs() < 1e-6);
        Ok(())
    }
}
