//! 1x1 convolution of one NCHW image, `out (C_out, H*W) = act(W (C_out, C_in) × X (C_in, H*W) + b)`,
//! register-blocked over `pulp::Simd`.
//!
//! [`MR`] output channels × up to four vectors of output positions stay in registers for the whole
//! C_in loop; each step loads one row segment of X and broadcasts one weight per channel, both read
//! in place (no packing: with 49 positions, as in a 7x7 stage, copying the weights would cost as
//! much as the product itself). Bias and activation are applied as the sums leave the registers,
//! so the output is written once. Replaces the `gemm` crate for the pointwise layers, where its
//! per-call packing and block planning cost ~20 % at MobileOne's sizes.

use super::simd::{activate_v, dispatch, lanes_in, load, store_first};
use super::Activation;
use pulp::{Simd, WithSimd};
use std::ops::Range;

/// Output channels per register block.
pub(super) const MR: usize = 6;

/// One tile of the product: output channels `rows`, positions `cols` of one image.
pub(super) struct PointwiseTile<'a> {
    /// Weights (C_out, C_in), row-major.
    pub w: &'a [f32],
    pub c_in: usize,
    pub bias: &'a [f32],
    pub act: Activation,
    /// The image's input (C_in, positions), rows `positions` apart.
    pub x: &'a [f32],
    /// The image's output (C_out, positions).
    pub out: *mut f32,
    pub positions: usize,
    pub rows: Range<usize>,
    pub cols: Range<usize>,
}

impl WithSimd for PointwiseTile<'_> {
    type Output = ();

    /// Blocks of [`MR`] channels × NV vectors of positions (4 with 32 registers, AVX-512 and
    /// NEON; 2 with 16, AVX2), then the positions left over with as many vectors as they need.
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let lanes = S::F32_LANES;
        let nv = if lanes == 8 { 2 } else { 4 };
        let step = nv * lanes;
        let full_end = self.cols.start + self.cols.len() / step * step;
        for q in (self.cols.start..full_end).step_by(step) {
            if lanes == 8 {
                self.block_rows::<S, 2, true>(simd, q, step);
            } else {
                self.block_rows::<S, 4, true>(simd, q, step);
            }
        }
        let rest = self.cols.end - full_end;
        match rest.div_ceil(lanes) {
            0 => {}
            1 => self.block_rows::<S, 1, false>(simd, full_end, rest),
            2 => self.block_rows::<S, 2, false>(simd, full_end, rest),
            3 => self.block_rows::<S, 3, false>(simd, full_end, rest),
            _ => self.block_rows::<S, 4, false>(simd, full_end, rest),
        }
    }
}

impl PointwiseTile<'_> {
    /// Positions `q .. q + count` of every channel of the tile, [`MR`] channels at a time.
    #[inline(always)]
    fn block_rows<S: Simd, const NV: usize, const FULL: bool>(
        &self,
        simd: S,
        q: usize,
        count: usize,
    ) {
        for r0 in self.rows.clone().step_by(MR) {
            let rows = (self.rows.end - r0).min(MR);
            // SAFETY: the block lies inside the tile.
            unsafe { self.block::<S, NV, FULL>(simd, r0, rows, q, count) };
        }
    }

    /// Output channels `r0 .. r0 + rows` (rows ≤ MR) × positions `q .. q + count`, with
    /// count = NV·lanes when `FULL`, else within the last of NV vectors.
    ///
    /// # Safety
    /// The block lies inside the image's input and output.
    #[inline(always)]
    unsafe fn block<S: Simd, const NV: usize, const FULL: bool>(
        &self,
        simd: S,
        r0: usize,
        rows: usize,
        q: usize,
        count: usize,
    ) {
        let lanes = S::F32_LANES;
        let c_in = self.c_in;
        let last = lanes_in(simd, 0, (count - (NV - 1) * lanes) as isize);
        // Channels past `rows` repeat the last one; their sums are not stored.
        let w_rows: [*const f32; MR] =
            std::array::from_fn(|r| self.w.as_ptr().add((r0 + r.min(rows - 1)) * c_in));
        let mut acc: [[S::f32s; NV]; MR] =
            std::array::from_fn(|r| [simd.splat_f32s(self.bias[r0 + r.min(rows - 1)]); NV]);
        let mut x = self.x.as_ptr().add(q);
        for ci in 0..c_in {
            let xv: [S::f32s; NV] = std::array::from_fn(|v| {
                if FULL || v + 1 < NV {
                    load::<S>(x.add(v * lanes))
                } else {
                    simd.mask_load_ptr_f32s(last, x.add(v * lanes))
                }
            });
            for r in 0..MR {
                let wb = simd.splat_f32s(*w_rows[r].add(ci));
                for v in 0..NV {
                    acc[r][v] = simd.mul_add_f32s(wb, xv[v], acc[r][v]);
                }
            }
            x = x.add(self.positions);
        }
        for (r, acc) in acc.iter().enumerate().take(rows) {
            let out = self.out.add((r0 + r) * self.positions + q);
            for (v, &a) in acc.iter().enumerate() {
                let a = activate_v(simd, a, self.act);
                store_first::<S>(simd, out.add(v * lanes), count - v * lanes, a);
            }
        }
    }
}

/// Runs one tile on the current SIMD level.
pub(super) fn run(tile: PointwiseTile) {
    dispatch(tile)
}
