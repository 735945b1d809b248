//! Bilinear resizing of NCHW tensors, identical to PyTorch's
//! `F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)` without antialiasing.
//!
//! Differentiable (training resizes the logits to the label size too; candle's own `upsample_bilinear2d`
//! has no backward). On the CPU in f32 a custom op computes each output from its four taps in PyTorch's
//! order, in parallel over channels; its backward and other devices and dtypes use the same taps through
//! `index_select` / `index_add`.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

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

    /// The transpose of [`AxisTaps::apply`]: scatters `grad` back onto `input_len` positions along `dim`.
    fn adjoint(&self, grad: &Tensor, dim: usize, input_len: usize) -> Result<Tensor> {
        let device = grad.device();
        let n = self.first.len();
        let weight_shape: &[usize] = if dim == 2 {
            &[1, 1, n, 1]
        } else {
            &[1, 1, 1, n]
        };
        let weights = |w: &[f32]| -> Result<Tensor> {
            Tensor::from_slice(w, weight_shape, device)?.to_dtype(grad.dtype())
        };
        let mut shape = grad.dims().to_vec();
        shape[dim] = input_len;
        Tensor::zeros(shape, grad.dtype(), device)?
            .index_add(
                &indices(&self.first, device)?,
                &grad.broadcast_mul(&weights(&self.first_weight)?)?,
                dim,
            )?
            .index_add(
                &indices(&self.second, device)?,
                &grad.broadcast_mul(&weights(&self.second_weight)?)?,
                dim,
            )
    }
}

/// The CPU f32 forward pass with the taps' backward.
struct BilinearResize {
    height: usize,
    width: usize,
}

impl CustomOp1 for BilinearResize {
    fn name(&self) -> &'static str {
        "bilinear-resize"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("bilinear-resize custom op expects f32");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("bilinear-resize custom op expects a contiguous tensor");
        };
        let (n, c, in_h, in_w) = layout.shape().dims4()?;
        let input = &data[start..end];
        let rows = AxisTaps::new(in_h, self.height);
        let cols = AxisTaps::new(in_w, self.width);
        let plane = self.height * self.width;
        let mut output = vec![0f32; n * c * plane];
        // Input rows some output row reads (downsampling skips most).
        let mut used = vec![false; in_h];
        for &y in rows.first.iter().chain(&rows.second) {
            used[y as usize] = true;
        }
        // Each input row is interpolated across once (upsampling reuses it for several output
        // rows), then every output row is one contiguous blend of two of them; the same products
        // and sums in the same order as `h0 * (w0*top[x0] + w1*top[x1]) + h1 * (…bottom…)`.
        output
            .par_chunks_mut(plane)
            .zip(input.par_chunks(in_h * in_w))
            .for_each(|(out, src)| {
                let mut across = vec![0f32; in_h * self.width];
                let rows_read = src
                    .chunks_exact(in_w)
                    .zip(across.chunks_exact_mut(self.width))
                    .zip(&used);
                for ((row, dst), _) in rows_read.filter(|(_, &used)| used) {
                    for (x, value) in dst.iter_mut().enumerate() {
                        let (x0, x1) = (cols.first[x] as usize, cols.second[x] as usize);
                        *value = cols.first_weight[x] * row[x0] + cols.second_weight[x] * row[x1];
                    }
                }
                for (y, out_row) in out.chunks_exact_mut(self.width).enumerate() {
                    let top = &across[rows.first[y] as usize * self.width..][..self.width];
                    let bottom = &across[rows.second[y] as usize * self.width..][..self.width];
                    let (h0, h1) = (rows.first_weight[y], rows.second_weight[y]);
                    crate::ops::simd::vectorized(
                        #[inline(always)]
                        || {
                            for ((value, &t), &b) in out_row.iter_mut().zip(top).zip(bottom) {
                                *value = h0 * t + h1 * b;
                            }
                        },
                    );
                }
            });
        Ok((
            CpuStorage::F32(output),
            Shape::from((n, c, self.height, self.width)),
        ))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, in_h, in_w) = arg.dims4()?;
        let grad = AxisTaps::new(in_h, self.height).adjoint(grad_res, 2, in_h)?;
        Ok(Some(
            AxisTaps::new(in_w, self.width).adjoint(&grad, 3, in_w)?,
        ))
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
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(BilinearResize { height, width });
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
    fn the_custom_op_agrees_with_the_tap_ops_forward_and_backward() -> Result<()> {
        let x = Tensor::randn(0f32, 1.0, (2, 3, 7, 9), &Device::Cpu)?;
        let upstream = Tensor::randn(0f32, 1.0, (2, 3, 11, 5), &Device::Cpu)?;
        // f64 takes the `index_select` path; the CPU f32 path takes the custom op.
        let x64 = candle_core::Var::from_tensor(&x.to_dtype(DType::F64)?)?;
        let y64 = resize_bilinear(x64.as_tensor(), 11, 5)?;
        let x32 = candle_core::Var::from_tensor(&x)?;
        let y32 = resize_bilinear(x32.as_tensor(), 11, 5)?;
        let forward = (y32.to_dtype(DType::F64)? - &y64)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(forward < 1e-6, "{forward}");
        let g64 = (y64 * upstream.to_dtype(DType::F64)?)?
            .sum_all()?
            .backward()?;
        let g32 = (y32 * &upstream)?.sum_all()?.backward()?;
        let (g64, g32) = (
            g64.get(x64.as_tensor()).unwrap(),
            g32.get(x32.as_tensor()).unwrap(),
        );
        let backward = (g32.to_dtype(DType::F64)? - g64)?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(backward < 1e-5, "{backward}");
        Ok(())
    }

    #[test]
    fn zero_sized_targets_are_errors() -> Result<()> {
        let x = Tensor::zeros((1, 1, 2, 2), DType::F32, &Device::Cpu)?;
        assert!(resize_bilinear(&x, 0, 2).is_err());
        Ok(())
    }
}
