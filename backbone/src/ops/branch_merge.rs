//! The training-mode tail of a multi-branch MobileOne block as one native op:
//! `y = act(Σ_b BN_b(z_b) + BN_id(x))`, every BatchNorm normalising with its batch statistics.
//!
//! The block runs all its conv branches as one convolution whose output `z` stacks the branches
//! along the channel axis. Composed from candle ops, the same tail costs a BN op, an add and their
//! autograd bookkeeping per branch (each backward add allocates and zeroes a full activation) and
//! a multi-pass ReLU backward: per layer that was several times the work of the convolutions.
//! Here the forward pass reads every input once and the backward pass twice, per channel.
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::{cpu_slice, pre_activation_grad, with_cpu_slices, Activation, SendPtr};

/// How the branches sit in the channels of `z`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BranchLayout {
    /// Channel `b·C + c` (a dense conv with the branch weights concatenated).
    BranchMajor,
    /// Channel `c·B + b` (a depthwise conv with channel multiplier B).
    ChannelMajor,
}

/// The op, carrying the batch statistics of every BatchNorm, indexed `bn·C + c` with the branch
/// BNs first and the identity BN (when present) last. `params` holds all gammas, then all betas,
/// in the same order.
pub(crate) struct BranchMerge {
    pub branches: usize,
    pub channels: usize,
    pub layout: BranchLayout,
    pub identity: bool,
    pub act: Activation,
    pub mean: Vec<f32>,
    pub invstd: Vec<f32>,
}

impl BranchMerge {
    fn norms(&self) -> usize {
        self.branches + usize::from(self.identity)
    }

    /// Channel of `z` holding branch `b` of output channel `c`.
    fn z_channel(&self, b: usize, c: usize) -> usize {
        match self.layout {
            BranchLayout::BranchMajor => b * self.channels + c,
            BranchLayout::ChannelMajor => c * self.branches + b,
        }
    }

    /// (images, plane size), checking every shape against the op's configuration.
    fn check(&self, z: &Shape, x: Option<&Shape>, params: &Shape) -> Result<(usize, usize)> {
        let (n, zc, h, w) = z.dims4()?;
        let expected_params = 2 * self.norms() * self.channels;
        if zc != self.branches * self.channels || params.elem_count() != expected_params {
            candle_core::bail!(
                "branch-merge: {} branches of {} channels need z (N, {}, H, W) and {expected_params} parameters, got {z:?} and {params:?}",
                self.branches,
                self.channels,
                self.branches * self.channels
            );
        }
        if let Some(x) = x {
            if x.dims() != [n, self.channels, h, w] {
                candle_core::bail!(
                    "branch-merge: identity input {x:?} does not match ({n}, {}, {h}, {w})",
                    self.channels
                );
            }
        }
        Ok((n, h * w))
    }

    fn forward(
        &self,
        z: &[f32],
        x: Option<&[f32]>,
        params: &[f32],
        n: usize,
        plane: usize,
    ) -> Vec<f32> {
        let (c_count, norms) = (self.channels, self.norms());
        let (gamma, beta) = params.split_at(norms * c_count);
        let mut out = super::output_buffer(n * c_count * plane);
        out.par_chunks_mut(plane).enumerate().for_each(|(p, out)| {
            let (img, c) = (p / c_count, p % c_count);
            let scale = |k: usize| self.invstd[k * c_count + c] * gamma[k * c_count + c];
            let shift: f32 = (0..norms)
                .map(|k| beta[k * c_count + c] - self.mean[k * c_count + c] * scale(k))
                .sum();
            out.fill(shift);
            for b in 0..self.branches {
                let src =
                    &z[(img * self.branches * c_count + self.z_channel(b, c)) * plane..][..plane];
                let s = scale(b);
                out.iter_mut().zip(src).for_each(|(o, &v)| *o += v * s);
            }
            if let Some(x) = x {
                let src = &x[p * plane..][..plane];
                let s = scale(self.branches);
                out.iter_mut().zip(src).for_each(|(o, &v)| *o += v * s);
            }
            if self.act != Activation::None {
                out.iter_mut()
                    .for_each(|o| *o = super::activate(*o, self.act));
            }
        });
        out
    }

    /// Gradients of z, x (when identity) and the parameters (gammas, then betas).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        z: &[f32],
        x: Option<&[f32]>,
        params: &[f32],
        y: &[f32],
        grad_y: &[f32],
        n: usize,
        plane: usize,
    ) -> (Vec<f32>, Option<Vec<f32>>, Vec<f32>) {
        let (c_count, norms, branches) = (self.channels, self.norms(), self.branches);
        let gamma = &params[..norms * c_count];
        let count = (n * plane) as f64;
        let mut grad_z = super::output_buffer(z.len());
        let mut grad_x = x.map(|x| super::output_buffer(x.len()));
        let (gz_ptr, gx_ptr) = (
            SendPtr(grad_z.as_mut_ptr()),
            grad_x.as_mut().map(|g| SendPtr(g.as_mut_ptr())),
        );
        // Input plane of norm k (a branch of z, or the identity input) for image img, channel c.
        let input_offset = |k: usize, img: usize, c: usize| {
            if k < branches {
                (img * branches * c_count + self.z_channel(k, c)) * plane
            } else {
                (img * c_count + c) * plane
            }
        };
        let source = |k: usize| {
            if k < branches {
                z
            } else {
                x.expect("identity input")
            }
        };
        // Per channel: Σ dy and, per norm, Σ dy·x̂ (dβ and dγ).
        let per_channel: Vec<(f64, Vec<f64>)> = (0..c_count)
            .into_par_iter()
            .map(|c| {
                let mut g = vec![0f32; plane];
                let mut sum = 0f64;
                let mut dots = vec![0f64; norms];
                for img in 0..n {
                    let at = (img * c_count + c) * plane;
                    pre_activation_grad(
                        &grad_y[at..at + plane],
                        &y[at..at + plane],
                        self.act,
                        &mut g,
                    );
                    sum += g.iter().map(|&v| v as f64).sum::<f64>();
                    for (k, dot) in dots.iter_mut().enumerate() {
                        let src = &source(k)[input_offset(k, img, c)..][..plane];
                        *dot += dot_f64(&g, src);
                    }
                }
                // Σ dy·x̂ = invstd·(Σ dy·x − mean·Σ dy)
                for (k, dot) in dots.iter_mut().enumerate() {
                    let i = k * c_count + c;
                    *dot = self.invstd[i] as f64 * (*dot - self.mean[i] as f64 * sum);
                }
                // dx = γ·invstd·(dy − mean(dy) − x̂·mean(dy·x̂))
                let mean_dy = (sum / count) as f32;
                for img in 0..n {
                    let at = (img * c_count + c) * plane;
                    pre_activation_grad(
                        &grad_y[at..at + plane],
                        &y[at..at + plane],
                        self.act,
                        &mut g,
                    );
                    for (k, &dot) in dots.iter().enumerate() {
                        let i = k * c_count + c;
                        let (mean, invstd) = (self.mean[i], self.invstd[i]);
                        let factor = gamma[i] * invstd;
                        let mean_dyx = (dot / count) as f32;
                        let offset = input_offset(k, img, c);
                        let src = &source(k)[offset..][..plane];
                        let dst = if k < branches {
                            gz_ptr
                        } else {
                            gx_ptr.expect("identity gradient")
                        };
                        // SAFETY: this plane belongs to channel c, which only this task writes.
                        let dst =
                            unsafe { std::slice::from_raw_parts_mut(dst.get().add(offset), plane) };
                        for ((d, &gv), &v) in dst.iter_mut().zip(&g).zip(src) {
                            let xhat = (v - mean) * invstd;
                            *d = factor * (gv - mean_dy - xhat * mean_dyx);
                        }
                    }
                }
                (sum, dots)
            })
            .collect();
        let mut grad_params = vec![0f32; 2 * norms * c_count];
        for (c, (sum, dots)) in per_channel.iter().enumerate() {
            for (k, &dot) in dots.iter().enumerate() {
                grad_params[k * c_count + c] = dot as f32;
                grad_params[(norms + k) * c_count + c] = *sum as f32;
            }
        }
        (grad_z, grad_x, grad_params)
    }
}

/// Dot product accumulated in f64 over f32 partial sums of 8 lanes (vectorises, stays accurate
/// over the few thousand values of one plane).
fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    a.chunks(1024)
        .zip(b.chunks(1024))
        .map(|(a, b)| {
            let mut acc = [0f32; 8];
            let whole = a.len() / 8 * 8;
            for (ca, cb) in a[..whole].chunks_exact(8).zip(b[..whole].chunks_exact(8)) {
                for i in 0..8 {
                    acc[i] += ca[i] * cb[i];
                }
            }
            let tail: f32 = a[whole..].iter().zip(&b[whole..]).map(|(x, y)| x * y).sum();
            acc.iter().map(|&v| v as f64).sum::<f64>() + tail as f64
        })
        .sum()
}

impl CustomOp2 for BranchMerge {
    fn name(&self) -> &'static str {
        "branch-merge"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, plane) = self.check(l1.shape(), None, l2.shape())?;
        let z = cpu_slice(s1, l1, "branch-merge")?;
        let params = cpu_slice(s2, l2, "branch-merge")?;
        let (_, _, h, w) = l1.shape().dims4()?;
        let out = self.forward(z, None, params, n, plane);
        Ok((CpuStorage::F32(out), Shape::from((n, self.channels, h, w))))
    }

    fn bwd(
        &self,
        z: &Tensor,
        params: &Tensor,
        y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, plane) = self.check(z.shape(), None, params.shape())?;
        let (gz, _, gp) = with_cpu_slices(&[z, params, y, grad_y], "branch-merge", |s| {
            Ok(self.backward(s[0], None, s[1], s[2], s[3], n, plane))
        })?;
        Ok((
            Some(Tensor::from_vec(gz, z.shape(), z.device())?),
            Some(Tensor::from_vec(gp, params.shape(), z.device())?),
        ))
    }
}

impl CustomOp3 for BranchMerge {
    fn name(&self) -> &'static str {
        "branch-merge"
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
        let (n, plane) = self.check(l1.shape(), Some(l2.shape()), l3.shape())?;
        let z = cpu_slice(s1, l1, "branch-merge")?;
        let x = cpu_slice(s2, l2, "branch-merge")?;
        let params = cpu_slice(s3, l3, "branch-merge")?;
        let out = self.forward(z, Some(x), params, n, plane);
        Ok((CpuStorage::F32(out), l2.shape().clone()))
    }

    fn bwd(
        &self,
        z: &Tensor,
        x: &Tensor,
        params: &Tensor,
        y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n, plane) = self.check(z.shape(), Some(x.shape()), params.shape())?;
        let (gz, gx, gp) = with_cpu_slices(&[z, x, params, y, grad_y], "branch-merge", |s| {
            Ok(self.backward(s[0], Some(s[1]), s[2], s[3], s[4], n, plane))
        })?;
        let gx = gx.expect("identity gradient");
        Ok((
            Some(Tensor::from_vec(gz, z.shape(), z.device())?),
            Some(Tensor::from_vec(gx, x.shape(), x.device())?),
            Some(Tensor::from_vec(gp, params.shape(), z.device())?),
        ))
    }
}
