//! NCHW → NHWC as a native CPU op: the permutation torchvision's detection heads apply to their
//! outputs (`(N, A·K, H, W)` → `(N, H·W·A, K)`). candle's strided copy of that permutation takes
//! about 1.3 ns a value on one thread: 0.29 ms for SSDLite-320's 546 × 20 × 20 class logits, ~5 %
//! of the whole detector; this blocked transpose, split over the threads, takes a fraction of that.

use super::cpu_slice;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Side of the square tiles the transpose moves (a 16 × 16 tile of f32 is 16 cache lines each way).
const TILE: usize = 16;
/// Values per rayon task at least.
const MIN_TASK_VALUES: usize = 1 << 14;

/// x (N, C, H, W) → (N, H, W, C), contiguous. Other devices and dtypes: candle's permutation.
pub fn channels_last(x: &Tensor) -> Result<Tensor> {
    if !(x.device().is_cpu() && x.dtype() == DType::F32 && x.rank() == 4) {
        return x.permute((0, 2, 3, 1))?.contiguous();
    }
    x.contiguous()?.apply_op1(ChannelsLast)
}

struct ChannelsLast;

impl CustomOp1 for ChannelsLast {
    fn name(&self) -> &'static str {
        "channels-last"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s, l, self.name())?;
        let (n, c, h, w) = l.shape().dims4()?;
        let positions = h * w;
        let mut out = super::output_buffer(n * positions * c);
        if !out.is_empty() {
            // Tasks of whole tiles of positions (all channels), never across images.
            let per_task = (MIN_TASK_VALUES / c.max(1))
                .next_multiple_of(TILE)
                .min(positions);
            out.par_chunks_mut(positions * c)
                .enumerate()
                .for_each(|(image, dst)| {
                    let src = &x[image * c * positions..][..c * positions];
                    dst.par_chunks_mut(per_task * c)
                        .enumerate()
                        .for_each(|(t, dst)| transpose_block(src, positions, c, t * per_task, dst));
                });
        }
        Ok((CpuStorage::F32(out), Shape::from((n, h, w, c))))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.permute((0, 3, 1, 2))?.contiguous()?))
    }
}

/// `dst[(p - p0)·C + ch] = src[ch·P + p]` for the positions p0 .. p0 + dst.len() / C of one image
/// (`src`: C rows of P positions), a TILE × TILE tile at a time through a local copy, so both sides
/// are read and written in runs of whole cache lines.
fn transpose_block(src: &[f32], positions: usize, channels: usize, p0: usize, dst: &mut [f32]) {
    let count = dst.len() / channels.max(1);
    let mut tile = [[0f32; TILE]; TILE];
    for pt in (0..count).step_by(TILE) {
        let pn = (count - pt).min(TILE);
        for ct in (0..channels).step_by(TILE) {
            let cn = (channels - ct).min(TILE);
            for (c, row) in tile.iter_mut().enumerate().take(cn) {
                row[..pn].copy_from_slice(&src[(ct + c) * positions + p0 + pt..][..pn]);
            }
            for p in 0..pn {
                let out = &mut dst[(pt + p) * channels + ct..][..cn];
                for (c, v) in out.iter_mut().enumerate() {
                    *v = tile[c][p];
                }
            }
        }
    }
}
