//! The product `out (C_out, P) = act(W (C_out, C_in) × X (C_in, P) + b)` of one NCHW image (P
//! positions), register-blocked over `pulp::Simd`: a 1x1 convolution, or an im2col-unfolded one.
//!
//! [`MR`] output channels × up to four vectors of positions stay in registers for the whole C_in
//! loop; each step loads one row segment of X and broadcasts one weight per channel. The weights
//! are read in place (with 49 positions, as in a 7x7 stage, copying them would cost as much as the
//! product itself); X is too, unless its rows thrash L1, when each panel of positions is packed
//! first. Bias and activation are applied as the sums leave the registers, so the output is
//! written once. A last vector of positions at most half used (4 of 16 lanes at 14x14, 1 of 16 at
//! 7x7) is computed as dot products along C_in instead. Replaces the `gemm` crate for these:
//! 8–15 % faster at MobileOne's 1x1 sizes (gemm packs both operands on every call), and lowered
//! with the other kernels by `MOBILEONE_SIMD`. (The tap-by-tap stride-1 convolutions stay on
//! `gemm`, whose packing pays off there: it gathers each tap's weights, 9 apart, once per call.)

use super::simd::{activate_v, dispatch, lanes_in, load, store_first};
use super::{activate, Activation};
use pulp::{Simd, WithSimd};

/// Output channels per register block.
const MR: usize = 6;
/// Positions per panel of an input in panels ([`PointwiseTile::x_ps`]): a step of the AVX2 block
/// (two vectors of 8).
pub(super) const PANEL: usize = 16;

/// Distance between consecutive panels of an input of `channels` channels in panels: its runs of
/// [`PANEL`] and one more, so that the panels do not start 2^k bytes apart (with 512 channels 32 KB,
/// where every panel's run of a channel falls in the same L1 set).
pub(super) fn panel_stride(channels: usize) -> usize {
    PANEL * (channels + 1)
}

/// Values one image of `channels` × `positions` takes in panels (the last panel's positions past
/// the plane, and each panel's extra run, unused).
pub(super) fn panels_len(channels: usize, positions: usize) -> usize {
    positions.div_ceil(PANEL) * panel_stride(channels)
}

/// Offset of position `q` of a channel from its position 0, in panels `stride` apart.
#[inline(always)]
pub(super) fn panel_offset(q: usize, stride: usize) -> usize {
    q / PANEL * stride + q % PANEL
}

/// Output channels per step of [`PointwiseTile::tail_dots`] for 1, 2 and more positions: 8 for one
/// (the classifier's fc at batch 1, or a 7x7 plane's last position; more weight rows in flight: S1's
/// 1280 -> 1000 fc at AVX2, two threads, 0.171 -> 0.149 ms against 4 rows, one thread 0.37 -> 0.33
/// ms from 2 to 4), 4 for two, else 2 (with up to 8 positions, 16 sums): at most 16 sums, the
/// registers AVX2 has.
const DOT_CHANNELS: [usize; 3] = [8, 4, 2];
/// Smallest C_in worth computing a short tail as dot products (each sum ends in a lane reduction).
const DOT_MIN_C_IN: usize = 64;
/// Most bytes of input in one band of positions: every channel block runs over a band before the
/// next starts, so the band's input stays in L2 while each output row is written in runs of the
/// band's width. Block after block down one column of positions instead (a run of 16 or 64 per
/// row, every row of the tile in turn) missed on the output rows' lines: 96 channels at 56x56,
/// batch 8, one thread: AVX2 7.0 -> 5.0 ms, AVX-512 5.7 -> 5.1 ms.
const BAND_BYTES: usize = 256 << 10;
/// Input channels ahead that the block prefetches its row segments on x86 when it reads them in
/// place (rows a plane apart defeat the hardware prefetcher).
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 16;

/// One tile of the product, every pointer at the tile's first row and column: weight (r, ci) at
/// `w + r·w_rs + ci`, input (ci, q) at `x + ci·x_rs + q` (or, in panels, at `x + (q / PANEL)·x_ps +
/// ci·x_rs + q % PANEL`), output (r, q) at `out + r·out_rs + q`, bias r at `bias[r]`, for r <
/// `rows`, q < `cols`.
pub(super) struct PointwiseTile<'a> {
    pub w: *const f32,
    pub w_rs: usize,
    pub x: *const f32,
    pub x_rs: usize,
    /// Distance between panels of [`PANEL`] positions when the input comes in panels (the AVX2
    /// level only, the tile starting at a panel's start), each already what packing would make
    /// of it; 0 for rows of positions.
    pub x_ps: usize,
    pub out: *mut f32,
    pub out_rs: usize,
    pub c_in: usize,
    pub rows: usize,
    pub cols: usize,
    pub bias: &'a [f32],
    pub act: Activation,
}

/// A [`PointwiseTile`] with scratch space for its packed input panels.
struct Packed<'a> {
    tile: PointwiseTile<'a>,
    panel: &'a mut Vec<f32>,
}

impl WithSimd for Packed<'_> {
    type Output = ();

    /// Blocks of [`MR`] channels × NV vectors of positions (4 with 32 registers, AVX-512 and
    /// NEON; 2 with 16, AVX2), band by band of positions ([`BAND_BYTES`]), each band channel
    /// block by channel block; then the positions left over with as many vectors as they need.
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let tile = &self.tile;
        let lanes = S::F32_LANES;
        let nv = if lanes == 8 { 2 } else { 4 };
        let step = nv * lanes;
        let full_end = tile.cols / step * step;
        // Each C_in × step panel of a band's inputs, which every channel block reads, is copied
        // into one contiguous run first where reading it in place thrashes L1: rows of one cache line
        // (AVX2, NEON) or rows a multiple of 1 KB apart (32x32 and 64x64 planes) fall in a few
        // L1 sets and were read from L2 again by every block (AVX2 at 32x32: 7.6 -> 2.7 ms for
        // 1024 -> 256 channels). AVX-512 panels elsewhere run 2-5 % faster in place.
        let panels = tile.x_ps != 0;
        debug_assert!(!panels || step == PANEL);
        let pack = !panels && tile.rows > MR && (lanes < 16 || tile.x_rs.is_multiple_of(256));
        let band = (BAND_BYTES / (4 * tile.c_in)).max(step) / step * step;
        if pack {
            self.panel.resize(tile.c_in * band.min(full_end), 0.0);
        }
        for b0 in (0..full_end).step_by(band) {
            let b_end = (b0 + band).min(full_end);
            if pack {
                let panel = self.panel.as_mut_ptr();
                for q in (b0..b_end).step_by(step) {
                    // SAFETY: the tile's rows of X hold columns q .. q + step; the panel holds the
                    // band's (b_end - b0)·C_in values.
                    unsafe {
                        let x = tile.x.add(q);
                        let dst = panel.add((q - b0) * tile.c_in);
                        for ci in 0..tile.c_in {
                            for v in 0..nv {
                                let value = load::<S>(x.add(ci * tile.x_rs + v * lanes));
                                (dst.add(ci * step + v * lanes) as *mut S::f32s)
                                    .write_unaligned(value);
                            }
                        }
                    }
                }
            }
            for r0 in (0..tile.rows).step_by(MR) {
                let rows = (tile.rows - r0).min(MR);
                for q in (b0..b_end).step_by(step) {
                    let x = if pack {
                        // SAFETY: inside the panel.
                        (
                            unsafe { self.panel.as_ptr().add((q - b0) * tile.c_in) },
                            step,
                        )
                    } else if panels {
                        // SAFETY: the tile's panel of column q.
                        (unsafe { tile.x.add(panel_offset(q, tile.x_ps)) }, tile.x_rs)
                    } else {
                        // SAFETY: column q of the tile.
                        (unsafe { tile.x.add(q) }, tile.x_rs)
                    };
                    // SAFETY: the block lies inside the tile.
                    unsafe {
                        if lanes == 8 {
                            tile.block::<S, 2, true>(simd, x, r0, rows, q, step);
                        } else {
                            tile.block::<S, 4, true>(simd, x, r0, rows, q, step);
                        }
                    }
                }
            }
        }
        tile.rest(simd, full_end, self.panel);
    }
}

impl PointwiseTile<'_> {
    /// Positions `full_end ..` (fewer than a full block) of every channel; `scratch` holds a
    /// short tail's gathered columns.
    #[inline(always)]
    fn rest<S: Simd>(&self, simd: S, full_end: usize, scratch: &mut Vec<f32>) {
        let lanes = S::F32_LANES;
        let rest = self.cols - full_end;
        // SAFETY: the tile's rows of X (or its last panel) hold columns full_end .. full_end + rest.
        let x = unsafe { self.column(full_end) };
        let (whole, part) = (rest / lanes, rest % lanes);
        if part == 0 || 2 * part > lanes || self.c_in < DOT_MIN_C_IN {
            match rest.div_ceil(lanes) {
                0 => {}
                1 => self.block_rows::<S, 1, false>(simd, x, full_end, rest),
                2 => self.block_rows::<S, 2, false>(simd, x, full_end, rest),
                3 => self.block_rows::<S, 3, false>(simd, x, full_end, rest),
                _ => self.block_rows::<S, 4, false>(simd, x, full_end, rest),
            }
            return;
        }
        // A last vector less than half used (4 of 16 lanes at 14x14, 1 of 16 at 7x7): its
        // positions as dot products over C_in instead, where every lane works.
        match whole {
            0 => {}
            1 => self.block_rows::<S, 1, true>(simd, x, full_end, lanes),
            2 => self.block_rows::<S, 2, true>(simd, x, full_end, 2 * lanes),
            _ => self.block_rows::<S, 3, true>(simd, x, full_end, 3 * lanes),
        }
        let q = full_end + whole * lanes;
        // SAFETY: positions q .. q + part are the tile's last.
        unsafe {
            match part {
                1 => self.tail_dots::<S, 1>(simd, q, scratch),
                2 => self.tail_dots::<S, 2>(simd, q, scratch),
                3 => self.tail_dots::<S, 3>(simd, q, scratch),
                4 => self.tail_dots::<S, 4>(simd, q, scratch),
                5 => self.tail_dots::<S, 5>(simd, q, scratch),
                6 => self.tail_dots::<S, 6>(simd, q, scratch),
                7 => self.tail_dots::<S, 7>(simd, q, scratch),
                _ => self.tail_dots::<S, 8>(simd, q, scratch),
            }
        }
    }

    /// Input column `q` and the row stride from there (within its panel, for an input in panels;
    /// the run from `q` must not leave it).
    ///
    /// # Safety
    /// Column q lies inside the tile.
    #[inline(always)]
    unsafe fn column(&self, q: usize) -> (*const f32, usize) {
        if self.x_ps == 0 {
            (self.x.add(q), self.x_rs)
        } else {
            (self.x.add(panel_offset(q, self.x_ps)), self.x_rs)
        }
    }

    /// Positions `q .. q + count` of every channel of the tile, [`MR`] channels at a time.
    /// `x`: the input of column q and its row stride (the tile's own, or a packed panel).
    #[inline(always)]
    fn block_rows<S: Simd, const NV: usize, const FULL: bool>(
        &self,
        simd: S,
        x: (*const f32, usize),
        q: usize,
        count: usize,
    ) {
        for r0 in (0..self.rows).step_by(MR) {
            let rows = (self.rows - r0).min(MR);
            // SAFETY: the block lies inside the tile.
            unsafe { self.block::<S, NV, FULL>(simd, x, r0, rows, q, count) };
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
        (mut x, x_rs): (*const f32, usize),
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
        // A packed panel's rows are contiguous and the hardware prefetcher streams them; the
        // prefetches cost AVX2 4-13 % per layer there (S1 and S2, batch 1 and 8, fastest of
        // 300-450 passes each).
        #[cfg(target_arch = "x86_64")]
        let strided = x_rs != NV * lanes;
        for ci in 0..self.c_in {
            #[cfg(target_arch = "x86_64")]
            if strided && ci + PREFETCH_AHEAD < self.c_in {
                for v in 0..NV {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        x.add(PREFETCH_AHEAD * x_rs + v * lanes) as *const i8,
                    );
                }
            }
            // The next block's weights, a line per row every 16 input channels: rows past a page
            // start cold for the hardware prefetcher, and a layer's weights come from L3 or
            // memory on its first pass (1024 x 256 at 7x7, or the classifier's 1000 x 1024).
            // AVX2, S1 at batch 1: 512 -> 1280 at 7x7 0.42 -> 0.35 ms, 512 x 14x14 0.52 -> 0.50.
            #[cfg(target_arch = "x86_64")]
            if ci % 16 == 0 {
                for row in &w_rows {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        row.wrapping_add(MR * self.w_rs + ci) as *const i8,
                    );
                }
            }
            let xv = load_block(x);
            for r in 0..MR {
                let wb = simd.splat_f32s(*w_rows[r].add(ci));
                for v in 0..NV {
                    acc[r][v] = simd.mul_add_f32s(wb, xv[v], acc[r][v]);
                }
            }
            x = x.add(x_rs);
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

    /// Positions `q .. q + T` of every channel as dot products over C_in, vectorised along C_in:
    /// the T input columns are gathered into contiguous rows of `columns` (scratch) once, then [`DOT_CHANNELS`] weight
    /// rows at a time are multiplied with all T of them (each weight read once) and every sum is
    /// reduced across its lanes.
    ///
    /// # Safety
    /// Positions `q .. q + T` lie inside the tile, and the tile inside its buffers.
    #[inline(always)]
    unsafe fn tail_dots<S: Simd, const T: usize>(&self, simd: S, q: usize, columns: &mut Vec<f32>) {
        let (lanes, k) = (S::F32_LANES, self.c_in);
        columns.resize(T * k, 0.0);
        let (x0, x_rs) = self.column(q);
        for ci in 0..k {
            let x = x0.add(ci * x_rs);
            for t in 0..T {
                columns[t * k + ci] = *x.add(t);
            }
        }
        let chunks = k / lanes;
        let last = lanes_in(simd, 0, (k % lanes) as isize);
        // A constant per T: the unused channels' accumulators compile away.
        let dc = DOT_CHANNELS[(T - 1).min(2)];
        for r0 in (0..self.rows).step_by(dc) {
            let rows = (self.rows - r0).min(dc);
            // Channels past `rows` repeat the last one; their sums are not stored.
            let w: [*const f32; DOT_CHANNELS[0]] =
                std::array::from_fn(|c| self.w.add((r0 + c.min(rows - 1)) * self.w_rs));
            let mut acc = [[simd.splat_f32s(0.0); T]; DOT_CHANNELS[0]];
            // No closure here: it would lose the level's target features and call its intrinsics.
            for chunk in 0..k.div_ceil(lanes) {
                let (offset, full) = (chunk * lanes, chunk < chunks);
                let mut xv = [simd.splat_f32s(0.0); T];
                for (t, xv) in xv.iter_mut().enumerate() {
                    let ptr = columns.as_ptr().add(t * k + offset);
                    *xv = if full {
                        load::<S>(ptr)
                    } else {
                        simd.mask_load_ptr_f32s(last, ptr)
                    };
                }
                #[cfg(target_arch = "x86_64")]
                for row in &w[..dc] {
                    // The next rows' weights (as in `block`), a line at a time.
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        row.wrapping_add(dc * self.w_rs + offset) as *const i8,
                    );
                }
                for c in 0..dc {
                    let ptr = w[c].add(offset);
                    let wv = if full {
                        load::<S>(ptr)
                    } else {
                        simd.mask_load_ptr_f32s(last, ptr)
                    };
                    for t in 0..T {
                        acc[c][t] = simd.mul_add_f32s(wv, xv[t], acc[c][t]);
                    }
                }
            }
            #[allow(clippy::needless_range_loop)]
            for c in 0..dc {
                if c < rows {
                    let out = self.out.add((r0 + c) * self.out_rs + q);
                    for t in 0..T {
                        let sum = self.bias[r0 + c] + simd.reduce_sum_f32s(acc[c][t]);
                        *out.add(t) = activate(sum, self.act);
                    }
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
    thread_local! {
        static PANEL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    // Taken out of the thread-local: inside its closure the kernel would lose its target features.
    let mut panel = PANEL.take();
    dispatch(Packed {
        tile,
        panel: &mut panel,
    });
    PANEL.set(panel);
}
