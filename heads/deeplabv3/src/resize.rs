//! Bilinear resizing of NCHW tensors, identical to PyTorch's
//! `F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)` without antialiasing.
//!
//! Built from `index_select`, multiplications and additions so it runs on any device and is differentiable
//! (training resizes the logits to the label size too); candle's own `upsample_bilinear2d` has no backward.

use candle_core::{DType, Device, Result, Tensor};

/// Source taps of one output axis: two input indices and their weights per output position.
struct AxisTaps {
    first: Vec<u32>,
    second: Vec<u32>,
    first_weight: Vec<f32>,
    second_weight: Vec<f32>,
}

impl AxisTaps {
    /// PyTorch's `compute_source_index_and_lambda` (UpSampleKernel.cpp) in f32, the op-math type of f32 inputs:
    /// equal sizes copy; otherwise src = scale·(dst + 0.5) − 0.5 clamped at 0, scale = in/out.
    fn new(input: usize, output: usize) -> Self {
        let mut taps = Self {
            first: Vec::with_capacity(output),
            second: Vec::with_capacity(output),
            first_weight: Vec::with_capacity(output),
            second_weight: Vec::with_capacity(output),
        };
        let scale = input as f32 / output as f32;
        for dst in 0..output {
            let (index0, index1, lambda1) = if input == output {
                (dst, dst, 0f32)
            } else {
                let real = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
                let index0 = (real.floor() as usize).min(input - 1);
                let lambda1 = (real - index0 as f32).clamp(0.0, 1.0);
                let index1 = if index0 < input - 1 {
                    index0 + 1
                } else {
                    index0
                };
                (index0, index1, lambda1)
            };
            taps.first.push(index0 as u32);
            taps.second.push(index1 as u32);
            taps.first_weight.push(1.0 - lambda1);
            taps.second_weight.push(lambda1);
        }
        taps
    }

    /// Interpolates `x` along `dim` (2 = height, 3 = width): w0·x[i0] + w1·x[i1].
    fn apply(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        let device = x.device();
        let n = self.first.len();
        let weight_shape: &[usize] = if dim == 2 {
            &[1, 1, n, 1]
        } else {
            &[1, 1, 1, n]
        };
        let weights = |w: &[f32]| -> Result<Tensor> {
            Tensor::from_slice(w, weight_shape, device)?.to_dtype(x.dtype())
        };
        let first = x.index_select(&indices(&self.first, device)?, dim)?;
        let second = x.index_select(&indices(&self.second, device)?, dim)?;
        first
            .broadcast_mul(&weights(&self.first_weight)?)?
            .add(&second.broadcast_mul(&weights(&self.second_weight)?)?)
    }
}

fn indices(values: &[u32], device: &Device) -> Result<Tensor> {
    Tensor::from_slice(values, values.len(), device)
}

/// Resizes an NCHW float tensor to `(height, width)` as PyTorch's bilinear interpolation with
/// `align_corners=False` does: width first, then height, matching PyTorch's order of accumulation.
pub fn resize_bilinear(x: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (_, _, in_height, in_width) = x.dims4()?;
    if height == 0 || width == 0 || in_height == 0 || in_width == 0 {
        candle_core::bail!(
            "bilinear resize from {in_height}x{in_width} to {height}x{width}: sizes must be positive"
        );
    }
    if !matches!(
        x.dtype(),
        DType::F32 | DType::F64 | DType::F16 | DType::BF16
    ) {
        candle_core::bail!("bilinear resize needs a float tensor, got {:?}", x.dtype());
    }
    if (in_height, in_width) == (height, width) {
        return Ok(x.clone());
    }
    let x = AxisTaps::new(in_width, width).apply(x, 3)?;
    AxisTaps::new(in_height, height).apply(&x, 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsampling_a_single_pixel_broadcasts_it() -> Result<()> {
        let x = Tensor::new(&[[[[3.5f32]], [[-1.0]]]], &Device::Cpu)?;
        let y = resize_bilinear(&x, 3, 5)?;
        assert_eq!(y.dims(), &[1, 2, 3, 5]);
        let values = y.flatten_all()?.to_vec1::<f32>()?;
        assert!(values[..15].iter().all(|&v| v == 3.5));
        assert!(values[15..].iter().all(|&v| v == -1.0));
        Ok(())
    }

    #[test]
    fn doubling_matches_hand_computed_weights() -> Result<()> {
        // 1-D [0, 1] to 4 samples: src = 0.5·(dst + 0.5) − 0.5 = -0.25→0, 0.25, 0.75, 1.25→clamped to index 1.
        let x = Tensor::new(&[0f32, 1.0], &Device::Cpu)?.reshape((1, 1, 1, 2))?;
        let y = resize_bilinear(&x, 1, 4)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(y, vec![0.0, 0.25, 0.75, 1.0]);
        Ok(())
    }

    #[test]
    fn gradients_flow_through_the_resize() -> Result<()> {
        let x = candle_core::Var::new(&[[[[1f32, 2.0], [3.0, 4.0]]]], &Device::Cpu)?;
        let y = resize_bilinear(x.as_tensor(), 3, 3)?.sum_all()?;
        let grads = y.backward()?;
        let g = grads
            .get(x.as_tensor())
            .expect("gradient")
            .flatten_all()?
            .to_vec1::<f32>()?;
        // Every output's weights sum to one, so the gradient sums to the number of outputs.
        assert!((g.iter().sum::<f32>() - 9.0).abs() < 1e-5);
        Ok(())
    }

    #[test]
    fn zero_sized_targets_are_errors() -> Result<()> {
        let x = Tensor::zeros((1, 1, 2, 2), DType::F32, &Device::Cpu)?;
        assert!(resize_bilinear(&x, 0, 2).is_err());
        Ok(())
    }
}
