//! Training-mode BatchNorm as one native CPU op with its backward pass.
//!
//! Built from candle's elementwise ops, training-mode BN costs about ten single-threaded passes over
//! the activation (transpose, mean, centre, square, mean, divide, scale, shift…), and MobileOne's
//! train-time form has k + 2 BNs per layer: that, not the convolutions, dominated its forward pass.
//! Here the statistics take two passes (f64 accumulation), the normalisation one, all parallel over
//! channels, and the backward pass is PyTorch's closed form.
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_slice, with_cpu_slices};

/// Per-channel mean and biased variance of an NCHW slice.
pub(crate) fn channel_stats(x: &[f32], n: usize, c: usize, plane: usize) -> (Vec<f64>, Vec<f64>) {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let planes = || (0..n).map(move |b| &x[(b * c + ch) * plane..(b * c + ch + 1) * plane]);
            let count = (n * plane) as f64;
            let mean = planes()
                .flat_map(|p| p.iter())
                .map(|&v| v as f64)
                .sum::<f64>()
                / count;
            let var = planes()
                .flat_map(|p| p.iter())
                .map(|&v| (v as f64 - mean).powi(2))
                .sum::<f64>()
                / count;
            (mean, var)
        })
        .unzip()
}

/// Per-channel mean and biased variance of an NCHW f32 CPU tensor, with an error when a channel has
/// fewer than two values (training-mode BN is undefined there).
pub(crate) fn tensor_channel_stats(x: &Tensor) -> Result<(Vec<f64>, Vec<f64>)> {
    let (n, c, h, w) = x.dims4()?;
    if n * h * w < 2 {
        candle_core::bail!(
            "batch-norm in training mode needs more than one value per channel, got input {:?}",
            x.dims()
        );
    }
    with_cpu_slices(&[x], "batch-norm", |s| Ok(channel_stats(s[0], n, c, h * w)))
}

/// `(x - mean) * invstd * gamma + beta` with the batch's own statistics, which the op carries so the
/// backward pass need not recompute them.
pub(crate) struct BatchNormTrain {
    pub mean: Vec<f32>,
    pub invstd: Vec<f32>,
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, gamma, beta) = (
            cpu_slice(s1, l1, self.name())?,
            cpu_slice(s2, l2, self.name())?,
            cpu_slice(s3, l3, self.name())?,
        );
        let (_, c, h, w) = l1.shape().dims4()?;
        let plane = h * w;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(plane)
            .zip(x.par_chunks(plane))
            .enumerate()
            .for_each(|(p, (o, xi))| {
                let ch = p % c;
                let scale = self.invstd[ch] * gamma[ch];
                let shift = beta[ch] - self.mean[ch] * scale;
                for (o, &v) in o.iter_mut().zip(xi) {
                    *o = v * scale + shift;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, c, h, w) = x.dims4()?;
        let plane = h * w;
        let count = (n * plane) as f64;
        let (dx, dgamma, dbeta) = with_cpu_slices(&[x, grad, gamma], self.name(), |s| {
            let (xs, gs, gamma_v) = (s[0], s[1], s[2]);
            // Per channel: Σ dy and Σ dy·x̂.
            let (dbeta, dgamma): (Vec<f64>, Vec<f64>) = (0..c)
                .into_par_iter()
                .map(|ch| {
                    let (mut sum, mut dot) = (0f64, 0f64);
                    for b in 0..n {
                        let range = (b * c + ch) * plane..(b * c + ch + 1) * plane;
                        for (&g, &v) in gs[range.clone()].iter().zip(&xs[range]) {
                            sum += g as f64;
                            dot += g as f64 * ((v - self.mean[ch]) * self.invstd[ch]) as f64;
                        }
                    }
                    (sum, dot)
                })
                .unzip();
            // dx = γ·invstd·(dy − mean(dy) − x̂·mean(dy·x̂))
            let mut dx = super::output_buffer(xs.len());
            dx.par_chunks_mut(plane).enumerate().for_each(|(p, out)| {
                let ch = p % c;
                let range = p * plane..(p + 1) * plane;
                let k = gamma_v[ch] * self.invstd[ch];
                let mean_dy = (dbeta[ch] / count) as f32;
                let mean_dyx = (dgamma[ch] / count) as f32;
                for ((o, &g), &v) in out.iter_mut().zip(&gs[range.clone()]).zip(&xs[range]) {
                    let xhat = (v - self.mean[ch]) * self.invstd[ch];
                    *o = k * (g - mean_dy - xhat * mean_dyx);
                }
            });
            Ok((dx, dgamma, dbeta))
        })?;
        let device = x.device();
        let to_tensor = |v: Vec<f64>| {
            Tensor::from_vec(
                v.into_iter().map(|e| e as f32).collect::<Vec<_>>(),
                c,
                device,
            )
        };
        Ok((
            Some(Tensor::from_vec(dx, (n, c, h, w), device)?),
            Some(to_tensor(dgamma)?),
            Some(to_tensor(dbeta)?),
        ))
    }
}
