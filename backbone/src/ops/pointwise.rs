//! The product `out (C_out, P) = act(W (C_out, C_in) × X (C_in, P) + b)` of one NCHW image (P
//! positions), register-blocked over `pulp::Simd`: a 1x1 convolution, or an im2col-unfolded one.
//!
//! [`MR`] output channels × up to four vectors of positions stay in registers for the whole C_in
//! loop; each step loads one row segment of X and broadcasts one weight per channel, both read in
//! place (no packing: with 49 positions, as in a 7x7 stage, copying the weights would cost as much
//! as the product itself). Bias and activation are applied as the sums leave the registers, so the
//! output is written once. Replaces the `gemm` crate for these: 8–15 % faster at MobileOne's 1x1
//! sizes (gemm packs both operands on every call), and lowered with the other kernels by
//! `MOBILEONE_SIMD`. (The tap-by-tap stride-1 convolutions stay on `gemm`, whose packing pays off
//! there: it gathers each tap's weights, 9 apart, once per call.)

use super::simd::{activate_v, dispatch, lanes_in, load, store_first};
use super::Activation;
use pulp::{Simd, WithSimd};

/// Output channels per register block.
const MR: usize = 6;

/// One tile of the product, every pointer at the tile's first row and column: weight (r, ci) at
/// `w + r·w_rs + ci`, input (ci, q) at `x + ci·x_rs + q`, output (r, q) at `out + r·out_rs + q`,
/// bias r at `bias[r]`, for r < `rows`, q < `cols`.
pub(super) struct PointwiseTile<'a> {
    pub w: *const f32,
    pub w_rs: usize,
    pub x: *const f32,
    pub x_rs: usize,
    pub out: *mut f32,
    pub out_rs: usize,
    pub c_in: usize,
    pub rows: usize,
    pub cols: usize,
    pub bias: &'a [f32],
    pub act: Activation,
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
        let full_end = self.cols / step * step;
        for q in (0..full_end).step_by(step) {
            if lanes == 8 {
                self.block_rows::<S, 2, true>(simd, q, step);
            } else {
                self.block_rows::<S, 4, true>(simd, q, step);
            }
        }
        let rest = self.cols - full_end;
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
        for r0 in (0..self.rows).step_by(MR) {
            let rows = (self.rows - r0).min(MR);
            // SAFETY: the block lies inside the tile.
            unsafe { self.block::<S, NV, FULL>(simd, r0, rows, q, count) };
        }
    }

    /// Output channels `r0 .. r0 + rows` (rows ≤ MR) × positions `q .. q + count`, with
    /// count = NV·lanes when `FULL`, else within the last of NV vectors.
    ///
    /// # Safety
    /// The block lies inside the tile, and the tile inside its buffers.
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
        let last = lanes_in(simd, 0, (count - (NV - 1) * lanes) as isize);
        let load_block = |ptr: *const f32| -> [S::f32s; NV] {
            std::array::from_fn(|v| {
                if FULL || v + 1 < NV {
                    load::<S>(ptr.add(v * lanes))
                } else {
                    simd.mask_load_ptr_f32s(last, ptr.add(v * lanes))
                }
            })
        };
        // Channels past `rows` repeat the last one; their sums are not stored.
        let row = |r: usize| r0 + r.min(rows - 1);
        let w_rows: [*const f32; MR] = std::array::from_fn(|r| self.w.add(row(r) * self.w_rs));
        let out = |r: usize| self.out.add(row(r) * self.out_rs + q);
        let mut acc: [[S::f32s; NV]; MR] =
            std::array::from_fn(|r| [simd.splat_f32s(self.bias[row(r)]); NV]);
        let mut x = self.x.add(q);
        for ci in 0..self.c_in {
            let xv = load_block(x);
            for r in 0..MR {
                let wb = simd.splat_f32s(*w_rows[r].add(ci));
                for v in 0..NV {
                    acc[r][v] = simd.mul_add_f32s(wb, xv[v], acc[r][v]);
                }
            }
            x = x.add(self.x_rs);
        }
        // Indexed by constants only (`take(rows)` made the compiler keep `acc` on the stack).
        #[allow(clippy::needless_range_loop)]
        for r in 0..MR {
            if r < rows {
                for v in 0..NV {
                    let a = activate_v(simd, acc[r][v], self.act);
                    store_first::<S>(simd, out(r).add(v * lanes), count - v * lanes, a);
                }
            }
        }
    }
}

/// Runs one tile on the current SIMD level.
///
/// # Safety
/// Every element the tile's strides and sizes address lies inside its buffer, and no other
/// thread writes the tile's output meanwhile.
pub(super) unsafe fn run(tile: PointwiseTile) {
    dispatch(tile)
}
