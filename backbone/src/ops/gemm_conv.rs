//! Dense (groups = 1) convolution as matrix products per image with fused bias and activation.
//!
//! In NCHW a 1x1 stride-1 convolution of one image is already `W (C_out, C_in) × X (C_in, H*W)`:
//! it runs on the register-blocked [`pointwise`] kernel with no copy, in tiles that rayon runs in
//! parallel. Strided KxK convolutions (the stem) run on the same kernel, over im2col columns unfolded
//! one band of output rows at a time ([`forward_by_bands`]).
//! Stride-1 KxK convolutions run tap by tap on `gemm`, over only the outputs each tap reaches
//! ([`forward_by_taps`]). The backward pass is `gemm` products over the im2col columns.

use super::pointwise::{self, PointwiseTile};
use super::simd::{deinterleave, dispatch, lanes_in, store_first};
use super::{
    activate, band_range, cpu_slice, output_size, row_bands, with_cpu_slices, Activation, Geometry,
    SendPtr,
};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use pulp::{Simd, WithSimd};
use rayon::prelude::*;
use std::borrow::Cow;

/// Dense convolution of x (N, C_in, H, W) with weight (C_out, C_in, K, K) and bias (C_out).
pub(super) struct GemmConv(pub(super) Geometry);

/// Smallest tile sides worth a separate GEMM call (packing the operands has a fixed cost).
const MIN_TILE_COLS: usize = 64;
const MIN_TILE_ROWS: usize = 32;

/// Sizes of the per-image GEMM `out (m, n) = weight (m, k) × cols (k, n)`.
#[derive(Clone, Copy)]
struct GemmShape {
    m: usize,
    n: usize,
    k: usize,
}

/// One tile of the output: image `image`, rows `rows`, columns `cols`.
struct Tile {
    image: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
}

/// Splits `images` GEMMs into enough tiles to keep every thread busy: each image's product into
/// about `threads / images` tiles, or more where that leaves a thread idle at the end (one per
/// thread: with two, the extra joins cost S1 and S2 1-2 % at batch 1, though a thread slowed down
/// by other work now stalls the op), rows in multiples of 6 (the register block of the pointwise
/// kernel and of `gemm`'s), columns in multiples of `quantum` (a vector of 16, or whole output
/// rows), choosing among the row/column splits the one that, dealt out to the threads largest
/// first, lets them finish soonest (448 channels x 784 positions on two threads: row blocks of 228
/// and 220, not column blocks of 400 and 384). Inside [`super::one_tile_per_image`], one tile per
/// image.
fn plan_tiles(images: usize, s: GemmShape, quantum: usize) -> Vec<Tile> {
    let threads = rayon::current_num_threads();
    // Tiles per image: enough for every thread, or more where the images do not divide evenly
    // between the threads (3 on 2: two tiles each, not one).
    let per_image_range = if super::one_tile_per_image_set() {
        1..=1
    } else {
        threads.div_ceil(images.max(1))..=threads.max(1)
    };
    let split = |(per_image, row_splits): (usize, usize)| {
        let col_splits = per_image.div_ceil(row_splits);
        let row_step = s.m.div_ceil(row_splits).next_multiple_of(6);
        let col_step = s.n.div_ceil(col_splits).next_multiple_of(quantum);
        (
            row_step.max(MIN_TILE_ROWS).min(s.m).max(1),
            col_step
                .max(MIN_TILE_COLS.next_multiple_of(quantum))
                .min(s.n)
                .max(1),
        )
    };
    let tiles_of = |(row_step, col_step): (usize, usize)| {
        let mut tiles = Vec::new();
        for image in 0..images {
            for r0 in (0..s.m).step_by(row_step) {
                for c0 in (0..s.n).step_by(col_step) {
                    tiles.push(Tile {
                        image,
                        rows: r0..(r0 + row_step).min(s.m),
                        cols: c0..(c0 + col_step).min(s.n),
                    });
                }
            }
        }
        tiles
    };
    // Finishing time of the threads when each takes the largest tile left as it becomes free.
    let finish = |tiles: &[Tile]| {
        let mut sizes: Vec<usize> = tiles.iter().map(|t| t.rows.len() * t.cols.len()).collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let mut loads = vec![0usize; threads];
        for size in sizes {
            *loads.iter_mut().min().expect("at least one thread") += size;
        }
        loads.into_iter().max().unwrap_or(0)
    };
    per_image_range
        .flat_map(|per_image| (1..=per_image).map(move |row_splits| (per_image, row_splits)))
        .map(|splits| tiles_of(split(splits)))
        .min_by_key(|tiles| (finish(tiles), tiles.len()))
        .unwrap_or_default()
}

/// The 1x1 convolution `out (N, C_out, P) = act(w (C_out, C_in) × x + b (C_out))` of `n` images
/// on the [`pointwise`] kernel, in the tiles [`plan_tiles`] cuts: x (N, C_in, P), or with `panels`
/// x in position panels ([`super::panels`]: per image, [`pointwise::panels_len`] values).
pub(super) fn pointwise_images(
    (x, panels): (&[f32], bool),
    (w, b): (&[f32], &[f32]),
    act: Activation,
    (n, c_out, c_in, positions): (usize, usize, usize, usize),
    out: &mut [f32],
) {
    let shape = GemmShape {
        m: c_out,
        n: positions,
        k: c_in,
    };
    let (image_len, x_rs, x_ps) = if panels {
        let x_ps = pointwise::panel_stride(c_in);
        (
            pointwise::panels_len(c_in, positions),
            pointwise::PANEL,
            x_ps,
        )
    } else {
        (c_in * positions, positions, 0)
    };
    debug_assert!(x.len() == n * image_len && out.len() == n * c_out * positions);
    let out_ptr = SendPtr(out.as_mut_ptr());
    plan_tiles(n, shape, pointwise::PANEL)
        .par_iter()
        .for_each(|tile| {
            let image_out = out_ptr.get().wrapping_add(tile.image * shape.m * shape.n);
            let image_x = &x[tile.image * image_len..][..image_len];
            // Tiles start at multiples of PANEL columns (the quantum).
            let x_col = if panels {
                pointwise::panel_offset(tile.cols.start, x_ps)
            } else {
                tile.cols.start
            };
            // SAFETY: tiles are disjoint; every pointer stays inside its (checked) buffer.
            unsafe {
                pointwise::run(PointwiseTile {
                    w: w.as_ptr().add(tile.rows.start * shape.k),
                    w_rs: shape.k,
                    x: image_x.as_ptr().add(x_col),
                    x_rs,
                    x_ps,
                    out: image_out.add(tile.rows.start * shape.n + tile.cols.start),
                    out_rs: shape.n,
                    c_in: shape.k,
                    rows: tile.rows.len(),
                    cols: tile.cols.len(),
                    bias: &b[tile.rows.clone()],
                    act,
                })
            }
        });
}

/// Unfolds x (N, C_in, H, W) into (N, C_in*K*K, OH*OW) columns: row (ci, ky, kx) holds the input
/// value under that tap for every output position, 0 in the padding. Writes every element once.
fn im2col(
    x: &[f32],
    (n, c_in, h, w): (usize, usize, usize, usize),
    k: usize,
    (oh, ow): (usize, usize),
    g: &Geometry,
) -> Vec<f32> {
    let ohw = oh * ow;
    let mut cols = super::output_buffer(n * c_in * k * k * ohw);
    cols.par_chunks_mut(ohw).enumerate().for_each(|(row, dst)| {
        let (image, tap) = (row / (c_in * k * k), row % (c_in * k * k));
        let plane = &x[(image * c_in + tap / (k * k)) * h * w..][..h * w];
        unfold_tap(plane, (h, w), (tap / k % k, tap % k), ow, g, 0..oh, dst);
    });
    cols
}

/// The im2col columns of output rows `rows` of a 3x3 stride-2 convolution with padding 1 (the
/// stem), as [`unfold_tap`] writes them: each input row is split into its even and odd values once,
/// and those are the rows of all three taps of its kernel row (kx = 1: the even values, kx = 2:
/// the odd ones, kx = 0: the odd ones one column later), a vector at a time.
struct Stride2Rows<'a> {
    image: &'a [f32],
    shape: (usize, usize, usize),
    ow: usize,
    rows: std::ops::Range<usize>,
    columns: &'a mut [f32],
}

impl WithSimd for Stride2Rows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let ((c_in, h, w), ow) = (self.shape, self.ow);
        let lanes = S::F32_LANES;
        let cols = self.rows.len() * ow;
        debug_assert!(ow == w.div_ceil(2) && self.columns.len() == c_in * 9 * cols);
        // Output row by output row, so each channel's input rows are read in order (the kernel
        // rows of one output row are consecutive input rows): a stream the prefetchers follow.
        for ci in 0..c_in {
            for (r, oy) in self.rows.clone().enumerate() {
                for ky in 0..3 {
                    let taps = &mut self.columns[(ci * 9 + ky * 3) * cols..][..3 * cols];
                    let iy = (2 * oy + ky) as isize - 1;
                    let at = |kx: usize| kx * cols + r * ow;
                    if iy < 0 || iy >= h as isize {
                        for kx in 0..3 {
                            taps[at(kx)..][..ow].fill(0.0);
                        }
                        continue;
                    }
                    let src = self.image[(ci * h + iy as usize) * w..][..w].as_ptr();
                    #[cfg(target_arch = "x86_64")]
                    if ky == 2 && (iy as usize) + 4 < h {
                        for line in (0..2 * w).step_by(16) {
                            // SAFETY: prefetching has no effect on memory; rows iy + 3, iy + 4 exist.
                            unsafe {
                                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                                    src.add(3 * w + line) as *const i8,
                                )
                            };
                        }
                    }
                    taps[at(0)] = 0.0;
                    for ox in (0..ow).step_by(lanes) {
                        let x = 2 * ox;
                        // SAFETY: only values inside the row are read, and only outputs inside
                        // each tap's row of `ow` written (kx = 0 one column on, one fewer).
                        unsafe {
                            let lo = simd.mask_load_ptr_f32s(
                                lanes_in(simd, x as isize, w as isize),
                                src.add(x),
                            );
                            let hi = simd.mask_load_ptr_f32s(
                                lanes_in(simd, (x + lanes) as isize, w as isize),
                                src.add(x + lanes),
                            );
                            let (even, odd) = deinterleave(simd, lo, hi);
                            let base = taps.as_mut_ptr();
                            store_first::<S>(simd, base.add(at(1) + ox), ow - ox, even);
                            store_first::<S>(simd, base.add(at(2) + ox), ow - ox, odd);
                            if ox + 1 < ow {
                                store_first::<S>(simd, base.add(at(0) + ox + 1), ow - ox - 1, odd);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// One im2col row restricted to the output rows `rows`: `dst[(oy - rows.start)·OW + ox]` = the
/// value of `plane` (H, W) under kernel tap (ky, kx) for output (oy, ox), 0 in the padding.
fn unfold_tap(
    plane: &[f32],
    (h, w): (usize, usize),
    (ky, kx): (usize, usize),
    ow: usize,
    g: &Geometry,
    rows: std::ops::Range<usize>,
    dst: &mut [f32],
) {
    let (s, p, d) = (g.stride, g.padding as isize, g.dilation);
    // Output columns whose input column lies inside the image: ox*s + kx*d - p in [0, w).
    let shift = (kx * d) as isize - p;
    let first = if shift >= 0 {
        0
    } else {
        ((-shift) as usize).div_ceil(s)
    };
    let last = if (w as isize) > shift {
        ((w as isize - shift) as usize).div_ceil(s).min(ow)
    } else {
        0
    };
    for (oy, out) in rows.zip(dst.chunks_exact_mut(ow)) {
        let iy = (oy * s + ky * d) as isize - p;
        if iy < 0 || iy >= h as isize || first >= last {
            out.fill(0.0);
            continue;
        }
        let src = &plane[iy as usize * w..][..w];
        let start = (first as isize * s as isize + shift) as usize;
        out[..first].fill(0.0);
        super::depthwise::copy_strided(&src[start..], s, &mut out[first..last]);
        out[last..].fill(0.0);
    }
}

/// Unfolded values one band of a strided convolution's forward keeps (64 KB: the band's columns
/// stay in L2 while every output channel reads them, and one register block's slice in L1).
const BAND_VALUES: usize = 16 * 1024;

/// Forward of a strided KxK convolution (the stem) in bands of output rows: each band's im2col
/// columns are unfolded into a per-thread buffer and multiplied by the weights at once, so the
/// K²-fold copy of the input never leaves the cache (unfolding the whole input first cost a
/// quarter of the stem's time, and the product then read the columns back from memory).
#[allow(clippy::too_many_arguments)]
fn forward_by_bands(
    (x, w, b): (&[f32], &[f32], &[f32]),
    (n, c_in, h, wd): (usize, usize, usize, usize),
    k: usize,
    (oh, ow): (usize, usize),
    shape: GemmShape,
    g: &Geometry,
    out: &mut [f32],
) {
    thread_local! {
        static COLUMNS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let bands = row_bands(oh, BAND_VALUES / (shape.k * ow), n);
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..n * bands).into_par_iter().for_each(|task| {
        let (image, rows) = (task / bands, band_range(oh, bands, task % bands));
        let image_x = &x[image * c_in * h * wd..][..c_in * h * wd];
        let out = out_ptr
            .get()
            .wrapping_add(image * shape.m * shape.n + rows.start * ow);
        // SAFETY: bands are disjoint; every channel's rows of the band lie inside `out`.
        COLUMNS.with_borrow_mut(|columns| unsafe {
            band_product(
                image_x,
                (c_in, h, wd),
                (w, b),
                k,
                ow,
                g,
                rows,
                columns,
                (out, shape.n),
            )
        });
    });
}

/// Output rows `rows` (each OW wide) of one image (C_in, H, W) of a dense convolution with weight
/// (C_out, C_in·K·K) and bias (C_out), activation `g.act`: the im2col columns of those rows are
/// unfolded into `columns` (scratch) and multiplied by the [`pointwise`] kernel, channel c's rows
/// written at `out.0 + c·out.1`.
///
/// # Safety
/// For every output channel c, `out.0 + c·out.1 .. + rows.len()·OW` is writable and written by no
/// other thread meanwhile.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn band_product(
    image: &[f32],
    (c_in, h, w): (usize, usize, usize),
    (weight, bias): (&[f32], &[f32]),
    k: usize,
    ow: usize,
    g: &Geometry,
    rows: std::ops::Range<usize>,
    columns: &mut Vec<f32>,
    (out, out_rs): (*mut f32, usize),
) {
    let (taps, cols) = (c_in * k * k, rows.len() * ow);
    band_columns(image, (c_in, h, w), k, ow, g, rows, columns);
    pointwise::run(PointwiseTile {
        w: weight.as_ptr(),
        w_rs: taps,
        x: columns.as_ptr(),
        x_rs: cols,
        x_ps: 0,
        out,
        out_rs,
        c_in: taps,
        rows: bias.len(),
        cols,
        bias,
        act: g.act,
    })
}

/// The im2col columns of output rows `rows` (each OW wide) of a dense KxK convolution of one image
/// (C_in, H, W) into `columns`: row (ci, ky, kx) of C_in·K·K holds, for each of the rows' outputs,
/// the input value under that tap (0 in the padding).
pub(super) fn band_columns(
    image: &[f32],
    (c_in, h, w): (usize, usize, usize),
    k: usize,
    ow: usize,
    g: &Geometry,
    rows: std::ops::Range<usize>,
    columns: &mut Vec<f32>,
) {
    let (taps, cols) = (c_in * k * k, rows.len() * ow);
    columns.resize(taps * cols, 0.0);
    if k == 3 && g.stride == 2 && g.padding == 1 && g.dilation == 1 {
        dispatch(Stride2Rows {
            image,
            shape: (c_in, h, w),
            ow,
            rows,
            columns,
        });
    } else {
        for (tap, dst) in columns.chunks_exact_mut(cols).enumerate() {
            let plane = &image[tap / (k * k) * h * w..][..h * w];
            unfold_tap(
                plane,
                (h, w),
                (tap / k % k, tap % k),
                ow,
                g,
                rows.clone(),
                dst,
            );
        }
    }
}

impl CustomOp3 for GemmConv {
    fn name(&self) -> &'static str {
        "gemm-conv2d"
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
        let (x, w, b) = (
            cpu_slice(s1, l1, self.name())?,
            cpu_slice(s2, l2, self.name())?,
            cpu_slice(s3, l3, self.name())?,
        );
        let (n, c_in, h, wd) = l1.shape().dims4()?;
        let (c_out, w_in, k, k2) = l2.shape().dims4()?;
        if w_in != c_in || k != k2 || b.len() != c_out {
            candle_core::bail!(
                "conv2d: input {:?} needs weight (C_out, {c_in}, K, K) and bias (C_out), got {:?} and {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let g = &self.0;
        let (oh, ow) = (output_size(h, k, g)?, output_size(wd, k, g)?);
        let shape = GemmShape {
            m: c_out,
            n: oh * ow,
            k: c_in * k * k,
        };
        let pointwise = k == 1 && g.stride == 1 && g.padding == 0;
        if g.stride == 1 && !pointwise {
            let out = forward_by_taps(x, w, b, (n, c_in, h, wd), k, (oh, ow), g);
            return Ok((CpuStorage::F32(out), Shape::from((n, c_out, oh, ow))));
        }
        let mut out = super::output_buffer(n * shape.m * shape.n);
        if !pointwise {
            forward_by_bands((x, w, b), (n, c_in, h, wd), k, (oh, ow), shape, g, &mut out);
            return Ok((CpuStorage::F32(out), Shape::from((n, c_out, oh, ow))));
        }
        pointwise_images(
            (x, false),
            (w, b),
            g.act,
            (n, c_out, c_in, oh * ow),
            &mut out,
        );
        Ok((CpuStorage::F32(out), Shape::from((n, c_out, oh, ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = &self.0;
        let (n, c_in, h, wd) = x.dims4()?;
        let (c_out, _, k, _) = w.dims4()?;
        let (_, _, oh, ow) = res.dims4()?;
        let shape = GemmShape {
            m: c_out,
            n: oh * ow,
            k: c_in * k * k,
        };
        let pointwise = k == 1 && g.stride == 1 && g.padding == 0;
        let (grad_x, grad_w, grad_b) = with_cpu_slices(&[x, w, res, grad_res], self.name(), |s| {
            let (x, w, res, grad_res) = (s[0], s[1], s[2], s[3]);
            let grad = pre_activation_grads(grad_res, res, g.act);
            let grad_b = channel_sums(&grad, n, c_out, shape.n);
            let cols: Cow<[f32]> = if pointwise {
                Cow::Borrowed(x)
            } else {
                Cow::Owned(im2col(x, (n, c_in, h, wd), k, (oh, ow), g))
            };
            let grad_w = weight_grad(&grad, &cols, n, shape);
            let grad_cols = cols_grad(&grad, w, n, shape);
            let grad_x = if pointwise {
                grad_cols
            } else {
                col2im(&grad_cols, (n, c_in, h, wd), k, (oh, ow), g)
            };
            Ok((grad_x, grad_w, grad_b))
        })?;
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(grad_x, x.shape(), dev)?),
            Some(Tensor::from_vec(grad_w, w.shape(), dev)?),
            Some(Tensor::from_vec(grad_b, c_out, dev)?),
        ))
    }
}

/// Output positions `[first, last)` along one axis that read inside the input through kernel
/// offset `tap` (stride 1): `o + tap*d - p` in `[0, size)`.
fn valid_range(size: usize, out: usize, tap: usize, g: &Geometry) -> (usize, usize) {
    let shift = (tap * g.dilation) as isize - g.padding as isize;
    let first = (-shift).max(0) as usize;
    let last = (size as isize - shift).clamp(0, out as isize) as usize;
    (first.min(last), last)
}

/// One kernel column of a stride-1 convolution: the input shifted sideways to the output columns
/// `[first, last)`, (N, C_in, H, last - first), 0 where it reads outside the image.
struct KernelColumn<'a> {
    kx: usize,
    first: usize,
    last: usize,
    input: Cow<'a, [f32]>,
}

impl KernelColumn<'_> {
    fn width(&self) -> usize {
        self.last - self.first
    }
}

/// The kernel columns of a stride-1 convolution that read the image somewhere. A column whose
/// valid outputs are at most three quarters of the width is cut to them (saving GEMM work at the
/// cost of a pass adding its partial result back); the others are zero-padded to the full width,
/// and the centre column of a "same" convolution is the input itself.
fn kernel_columns<'a>(
    x: &'a [f32],
    (n, c_in, h, wd): (usize, usize, usize, usize),
    k: usize,
    ow: usize,
    g: &Geometry,
) -> Vec<KernelColumn<'a>> {
    (0..k)
        .filter_map(|kx| {
            let valid = valid_range(wd, ow, kx, g);
            if valid.0 == valid.1 {
                return None;
            }
            let shift = (kx * g.dilation) as isize - g.padding as isize;
            if shift == 0 && ow == wd {
                let input = Cow::Borrowed(x);
                return Some(KernelColumn {
                    kx,
                    first: 0,
                    last: ow,
                    input,
                });
            }
            let (first, last) = if (valid.1 - valid.0) * 4 > ow * 3 {
                (0, ow)
            } else {
                valid
            };
            let width = last - first;
            let (v0, v1) = (valid.0 - first, valid.1 - first);
            let start = (valid.0 as isize + shift) as usize;
            let mut input = super::output_buffer(n * c_in * h * width);
            input
                .par_chunks_mut(h * width)
                .zip(x.par_chunks(h * wd))
                .for_each(|(dst, src)| {
                    for (d, s) in dst.chunks_exact_mut(width).zip(src.chunks_exact(wd)) {
                        d[..v0].fill(0.0);
                        d[v0..v1].copy_from_slice(&s[start..start + v1 - v0]);
                        d[v1..].fill(0.0);
                    }
                });
            let input = Cow::Owned(input);
            Some(KernelColumn {
                kx,
                first,
                last,
                input,
            })
        })
        .collect()
}

/// Stride-1 dense convolution as one accumulating GEMM per kernel tap over only the outputs that
/// read inside the image: no im2col (a K²-fold copy of the input, 38 MB for DeepLabV3's
/// 1024-channel ASPP at 32x32), and the work follows the valid taps, as in ONNX Runtime's direct
/// convolution (dilation 36 at 32x32 leaves only the centre tap). Full-width kernel columns
/// accumulate straight into the output, cut ones into a small per-tile buffer that is then added
/// to their columns.
#[allow(clippy::too_many_arguments)]
fn forward_by_taps(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    (n, c_in, h, wd): (usize, usize, usize, usize),
    k: usize,
    (oh, ow): (usize, usize),
    g: &Geometry,
) -> Vec<f32> {
    let (c_out, ohw) = (w.len() / (c_in * k * k), oh * ow);
    let columns = kernel_columns(x, (n, c_in, h, wd), k, ow, g);
    // Valid output rows of each kernel row; the taps covering most rows go first.
    let mut kernel_rows: Vec<(usize, usize, usize)> = (0..k)
        .filter_map(|ky| {
            let (first, last) = valid_range(h, oh, ky, g);
            (first < last).then_some((ky, first, last))
        })
        .collect();
    kernel_rows.sort_by_key(|&(_, first, last)| std::cmp::Reverse(last - first));
    let mut out = super::output_buffer(n * c_out * ohw);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let shape = GemmShape {
        m: c_out,
        n: ohw,
        k: c_in,
    };
    // Tiles of whole output rows: `band` is a tile's range of rows.
    plan_tiles(n, shape, ow).par_iter().for_each(|tile| {
        let band = tile.cols.start / ow..tile.cols.end / ow;
        let image_out = out_ptr.get().wrapping_add(tile.image * c_out * ohw);
        // SAFETY: tiles are disjoint; every pointer stays inside its buffer: a tap's input is
        // read at output row oy shifted by whole rows, only for the rows where it is valid.
        let out_row = |r: usize| unsafe {
            std::slice::from_raw_parts_mut(
                image_out.add(r * ohw + band.start * ow),
                band.len() * ow,
            )
        };
        let mut partial = Vec::new();
        let mut out_written = false;
        for column in &columns {
            let (full, width) = (column.width() == ow, column.width());
            // Where this column's taps accumulate: the output itself, or a buffer of the band's
            // rows over the column's width.
            let (dst, dst_rs) = if full {
                (
                    image_out.wrapping_add(tile.rows.start * ohw + band.start * ow),
                    ohw,
                )
            } else {
                partial.resize(tile.rows.len() * band.len() * width, 0.0);
                (partial.as_mut_ptr(), band.len() * width)
            };
            let mut written = full && out_written;
            for &(ky, first, last) in &kernel_rows {
                let (oy0, oy1) = (band.start.max(first), band.end.min(last));
                if oy0 >= oy1 {
                    continue;
                }
                let part_of_band = (oy0, oy1) != (band.start, band.end);
                // SAFETY (this block): as above, inside this tile and its buffers.
                unsafe {
                    if !written && part_of_band {
                        for r in 0..tile.rows.len() {
                            std::slice::from_raw_parts_mut(dst.add(r * dst_rs), band.len() * width)
                                .fill(0.0);
                        }
                    }
                    let row_shift = (ky * g.dilation) as isize - g.padding as isize;
                    let image_in = column.input.as_ptr().add(tile.image * c_in * h * width);
                    gemm::gemm(
                        tile.rows.len(),
                        (oy1 - oy0) * width,
                        c_in,
                        dst.add((oy0 - band.start) * width),
                        1,
                        dst_rs as isize,
                        written || part_of_band,
                        w.as_ptr()
                            .add((tile.rows.start * c_in * k + ky) * k + column.kx),
                        (k * k) as isize,
                        (c_in * k * k) as isize,
                        image_in.offset((oy0 as isize + row_shift) * width as isize),
                        1,
                        (h * width) as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                written = true;
            }
            if full {
                out_written |= written;
                continue;
            }
            if !written {
                continue;
            }
            if !out_written {
                tile.rows.clone().for_each(|r| out_row(r).fill(0.0));
                out_written = true;
            }
            for (r, part) in tile
                .rows
                .clone()
                .zip(partial.chunks_exact(band.len() * width))
            {
                for (o, p) in out_row(r)
                    .chunks_exact_mut(ow)
                    .zip(part.chunks_exact(width))
                {
                    add_assign(&mut o[column.first..column.last], p);
                }
            }
        }
        for r in tile.rows.clone() {
            let row = out_row(r);
            if !out_written {
                row.fill(0.0);
            }
            bias_activation(row, b[r], g.act);
        }
    });
    out
}

/// `dst[i] += src[i]`, auto-vectorised with the current SIMD level's instructions.
fn add_assign(dst: &mut [f32], src: &[f32]) {
    super::simd::vectorized(
        #[inline(always)]
        || dst.iter_mut().zip(src).for_each(|(d, s)| *d += s),
    )
}

/// dL/d(pre-activation) of the whole output, in parallel; borrowed when there is no activation.
fn pre_activation_grads<'a>(grad: &'a [f32], out: &[f32], act: Activation) -> Cow<'a, [f32]> {
    if act == Activation::None {
        return Cow::Borrowed(grad);
    }
    let mut pre = super::output_buffer(grad.len());
    pre.par_chunks_mut(1 << 14)
        .zip(grad.par_chunks(1 << 14))
        .zip(out.par_chunks(1 << 14))
        .for_each(|((d, g), y)| super::pre_activation_grad(g, y, act, d));
    Cow::Owned(pre)
}

/// Per-channel sums of an NCHW buffer (the bias gradient), accumulated in f64.
fn channel_sums(v: &[f32], n: usize, c: usize, plane: usize) -> Vec<f32> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            (0..n)
                .map(|img| {
                    v[(img * c + ch) * plane..][..plane]
                        .iter()
                        .map(|&e| e as f64)
                        .sum::<f64>()
                })
                .sum::<f64>() as f32
        })
        .collect()
}

/// dL/dW (m, k) = Σ over images of grad (m, n) × colsᵀ (n, k); tiles of dW run in parallel, each
/// accumulating over the images.
fn weight_grad(grad: &[f32], cols: &[f32], images: usize, s: GemmShape) -> Vec<f32> {
    let mut grad_w = vec![0f32; s.m * s.k];
    let dst = SendPtr(grad_w.as_mut_ptr());
    // The tiles of one "image" of the (m, k) output: columns of dW are taps.
    let tiles = plan_tiles(
        1,
        GemmShape {
            m: s.m,
            n: s.k,
            k: s.n,
        },
        16,
    );
    tiles.par_iter().for_each(|tile| {
        for image in 0..images {
            let g = &grad[image * s.m * s.n..][..s.m * s.n];
            let c = &cols[image * s.k * s.n..][..s.k * s.n];
            // SAFETY: tiles are disjoint; every pointer stays inside its buffer.
            unsafe {
                gemm::gemm(
                    tile.rows.len(),
                    tile.cols.len(),
                    s.n,
                    dst.get().add(tile.rows.start * s.k + tile.cols.start),
                    1,
                    s.k as isize,
                    image > 0,
                    g.as_ptr().add(tile.rows.start * s.n),
                    1,
                    s.n as isize,
                    // colsᵀ: element (p, tap) is cols[tap * n + p].
                    c.as_ptr().add(tile.cols.start * s.n),
                    s.n as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        }
    });
    grad_w
}

/// dL/dcols (k, n) = Wᵀ (k, m) × grad (m, n) for every image.
fn cols_grad(grad: &[f32], w: &[f32], images: usize, s: GemmShape) -> Vec<f32> {
    let mut grad_cols = super::output_buffer(images * s.k * s.n);
    let dst = SendPtr(grad_cols.as_mut_ptr());
    let transposed = GemmShape {
        m: s.k,
        n: s.n,
        k: s.m,
    };
    plan_tiles(images, transposed, 16)
        .par_iter()
        .for_each(|tile| {
            let g = &grad[tile.image * s.m * s.n..][..s.m * s.n];
            // SAFETY: tiles are disjoint; every pointer stays inside its buffer.
            unsafe {
                gemm::gemm(
                    tile.rows.len(),
                    tile.cols.len(),
                    s.m,
                    dst.get()
                        .add(tile.image * s.k * s.n + tile.rows.start * s.n + tile.cols.start),
                    1,
                    s.n as isize,
                    false,
                    // Wᵀ: element (tap, co) is w[co * k + tap].
                    w.as_ptr().add(tile.rows.start),
                    s.k as isize,
                    1,
                    g.as_ptr().add(tile.cols.start),
                    1,
                    s.n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
    grad_cols
}

/// The adjoint of [`im2col`]: sums every column entry back onto the input value it was read from.
fn col2im(
    cols: &[f32],
    (n, c_in, h, w): (usize, usize, usize, usize),
    k: usize,
    (oh, ow): (usize, usize),
    g: &Geometry,
) -> Vec<f32> {
    let ohw = oh * ow;
    let mut x = vec![0f32; n * c_in * h * w];
    let (s, p, d) = (g.stride, g.padding as isize, g.dilation);
    x.par_chunks_mut(h * w)
        .enumerate()
        .for_each(|(plane_index, plane)| {
            for ky in 0..k {
                for kx in 0..k {
                    let row = (plane_index * k + ky) * k + kx;
                    let src = &cols[row * ohw..][..ohw];
                    let shift = (kx * d) as isize - p;
                    for oy in 0..oh {
                        let iy = (oy * s + ky * d) as isize - p;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        let dst = &mut plane[iy as usize * w..][..w];
                        for (ox, &v) in src[oy * ow..(oy + 1) * ow].iter().enumerate() {
                            let ix = (ox * s) as isize + shift;
                            if ix >= 0 && ix < w as isize {
                                dst[ix as usize] += v;
                            }
                        }
                    }
                }
            }
        });
    x
}

/// `row[i] = act(row[i] + bias)`.
#[inline(always)]
fn bias_activation_body(row: &mut [f32], bias: f32, act: Activation) {
    match act {
        Activation::None => row.iter_mut().for_each(|v| *v += bias),
        Activation::Relu => row.iter_mut().for_each(|v| *v = (*v + bias).max(0.0)),
        Activation::Relu6 => row.iter_mut().for_each(|v| *v = activate(*v + bias, act)),
    }
}

/// [`bias_activation_body`], auto-vectorised with the current SIMD level's instructions.
fn bias_activation(row: &mut [f32], bias: f32, act: Activation) {
    super::simd::vectorized(
        #[inline(always)]
        || bias_activation_body(row, bias, act),
    )
}
