//! The two full passes of squeeze-and-excitation as native CPU ops: the per-plane mean (squeeze)
//! and `act(x · gate)` (excite, with the block's activation fused).
//!
//! Built from candle's ops they took five passes over the activation on one thread (two means, the
//! broadcast multiply, the activation), ~11 % of S4 at batch 8. The backward passes are written with
//! candle's ops (training S4 with SE is rare; inference is what these are for).

use super::{activate, cpu_slice, Activation};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Planes per rayon task at least, so tiny planes (7x7) are batched.
const MIN_TASK_VALUES: usize = 1 << 14;

fn native(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() == 4
}

/// Mean of every plane of x (N, C, H, W): (N, C, 1, 1).
pub fn plane_mean(x: &Tensor) -> Result<Tensor> {
    if !native(x) {
        return x.mean_keepdim(D::Minus1)?.mean_keepdim(D::Minus2);
    }
    x.contiguous()?.apply_op1(PlaneMean)
}

/// `act(x · gate)` for x (N, C, H, W) and gate (N, C, 1, 1): each plane scaled by its gate.
pub fn scale_planes(x: &Tensor, gate: &Tensor, act: Activation) -> Result<Tensor> {
    let (n, c, _, _) = x.dims4()?;
    if !native(x) || gate.dtype() != DType::F32 || gate.dims() != [n, c, 1, 1] {
        return act.apply(&x.broadcast_mul(gate)?);
    }
    x.contiguous()?
        .apply_op2(&gate.contiguous()?, ScalePlanes(act))
}

struct PlaneMean;

impl CustomOp1 for PlaneMean {
    fn name(&self) -> &'static str {
        "plane-mean"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s, l, self.name())?;
        let (n, c, h, w) = l.shape().dims4()?;
        let plane = h * w;
        let mut out = vec![0f32; n * c];
        out.par_iter_mut()
            .zip(x.par_chunks(plane.max(1)))
            .with_min_len(MIN_TASK_VALUES.div_ceil(plane.max(1)))
            .for_each(|(o, p)| *o = sum(p) / plane as f32);
        Ok((CpuStorage::F32(out), Shape::from((n, c, 1, 1))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, _, h, w) = x.dims4()?;
        Ok(Some(
            (grad.broadcast_as(x.shape())? / (h * w) as f64)?.contiguous()?,
        ))
    }
}

/// Sum in 16 interleaved partial sums, so it vectorises (and rounds like a pairwise sum).
fn sum(values: &[f32]) -> f32 {
    super::simd::vectorized(
        #[inline(always)]
        || {
            let mut partial = [0f32; 16];
            let mut chunks = values.chunks_exact(16);
            for chunk in &mut chunks {
                for (p, v) in partial.iter_mut().zip(chunk) {
                    *p += v;
                }
            }
            partial.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
        },
    )
}

struct ScalePlanes(Activation);

impl CustomOp2 for ScalePlanes {
    fn name(&self) -> &'static str {
        "scale-planes"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, gate) = (
            cpu_slice(s1, l1, self.name())?,
            cpu_slice(s2, l2, self.name())?,
        );
        let (_, _, h, w) = l1.shape().dims4()?;
        let plane = (h * w).max(1);
        let act = self.0;
        let mut out = super::output_buffer(x.len());
        out.par_chunks_mut(plane)
            .zip(x.par_chunks(plane))
            .zip(gate.par_iter())
            .with_min_len(MIN_TASK_VALUES.div_ceil(plane))
            .for_each(|((o, p), &g)| {
                super::simd::vectorized(
                    #[inline(always)]
                    || {
                        for (o, &v) in o.iter_mut().zip(p) {
                            *o = activate(v * g, act);
                        }
                    },
                )
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gate: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // dL/d(x · gate): the activation passes the gradient where its output is not clamped.
        let pre = match self.0 {
            Activation::None => grad.clone(),
            Activation::Relu => (grad * res.gt(0f32)?.to_dtype(DType::F32)?)?,
            Activation::Relu6 => {
                let inside =
                    (res.gt(0f32)?.to_dtype(DType::F32)? * res.lt(6f32)?.to_dtype(DType::F32)?)?;
                (grad * inside)?
            }
        };
        let grad_x = pre.broadcast_mul(gate)?;
        let grad_gate = (pre * x)?.sum_keepdim(D::Minus1)?.sum_keepdim(D::Minus2)?;
        Ok((Some(grad_x), Some(grad_gate)))
    }
}
