//! The stem and the first (stride-2 depthwise) layer of a reparameterised MobileOne as one pass, for
//! inference: the stem's output is the largest activation of the network (48 × 112² per 224² image,
//! 19 MB at batch 8) and is otherwise written to memory only to be read back by the next layer.

use super::blocked::Blocked;
use super::depthwise::{
    channel_group_output, channel_group_taps, store_channel_runs, CHANNEL_GROUP as GROUP,
};
use super::gemm_conv::{band_columns, band_product};
use super::simd::{activate_v, dispatch_8_lanes, eight_lanes, load};
use super::{
    band_range, depthwise, output_size, row_bands, with_cpu_slices, Activation, ConvConfig,
    Geometry, SendPtr,
};
use candle_core::{DType, Result, Tensor};
use pulp::{Simd, WithSimd};
use rayon::prelude::*;
use std::cell::RefCell;

/// Stem values one band keeps (512 KB, in L2 while its depthwise rows are computed). Each band
/// computes the stem row it shares with the next one again, so fewer, taller bands redo less: S1
/// at AVX2, one thread, fastest of 80 passes, 256 KB (4 depthwise rows a band) 0.782 ms, 512 KB
/// (8 rows) 0.713–0.737, 1 MB 0.727; at two threads SSDLite-320 0.83 -> 0.78 ms, S0 at batch 8
/// 0.60 -> 0.56 per image, S0 and S1 at batch 1 within 2 %.
const BAND_VALUES: usize = 128 * 1024;

thread_local! {
    /// A band's im2col columns, its stem output, and (channels last) its depthwise outputs.
    static BUFFERS: RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> =
        const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// `act(depthwise(act(conv(x))))`: x (N, C_in, H, W) through a dense KxK convolution (weight
/// (C, C_in, K, K), bias (C), `stem`'s geometry) and then a 3x3 stride-2 depthwise one (weight
/// (C, 1, 3, 3), bias (C), padding 1), both followed by `act`, to (N, C, H₂, W₂). Computed in bands
/// of output rows: each band's stem rows (with the rows above and below it) are produced into a
/// per-thread buffer by the same kernels as [`super::conv2d`] and consumed there by the depthwise
/// kernel, so the stem's output never reaches memory. Where the native kernels do not apply (other
/// devices or dtypes, other geometries) it is the two convolutions. No gradient: inference only.
///
/// # Errors
/// When the shapes do not fit (named in the message).
pub fn dense_then_depthwise(
    x: &Tensor,
    stem: (&Tensor, &Tensor, &ConvConfig),
    depthwise: (&Tensor, &Tensor, &ConvConfig),
    act: Activation,
) -> Result<Tensor> {
    match stem_depthwise(x, stem, depthwise, act, false)? {
        Output::Planes(y) => Ok(y),
        Output::Blocked(..) => unreachable!("blocked output only when asked for"),
    }
}

/// [`dense_then_depthwise`] with its output in the blocked NCHW8c layout ([`super::blocked`]) where
/// it runs channels last (8-lane levels, C a multiple of 8); else in planes.
///
/// # Errors
/// As [`dense_then_depthwise`].
pub(crate) fn dense_then_depthwise_blocked(
    x: &Tensor,
    stem: (&Tensor, &Tensor, &ConvConfig),
    depthwise: (&Tensor, &Tensor, &ConvConfig),
    act: Activation,
) -> Result<Output> {
    stem_depthwise(x, stem, depthwise, act, true)
}

/// The result of [`dense_then_depthwise_blocked`].
pub(crate) enum Output {
    Planes(Tensor),
    Blocked(Blocked),
}

fn stem_depthwise(
    x: &Tensor,
    (w1, b1, stem): (&Tensor, &Tensor, &ConvConfig),
    (w2, b2, depthwise_cfg): (&Tensor, &Tensor, &ConvConfig),
    act: Activation,
    blocked: bool,
) -> Result<Output> {
    let (c, c_in_w, k, _) = w1.dims4()?;
    let g1 = Geometry {
        stride: stem.stride,
        padding: stem.padding,
        dilation: stem.dilation,
        act,
    };
    let g2 = Geometry {
        stride: 2,
        padding: 1,
        dilation: 1,
        act,
    };
    let native = x.device().is_cpu()
        && x.dtype() == DType::F32
        && [w1, b1, w2, b2].iter().all(|t| t.dtype() == DType::F32)
        && x.rank() == 4
        && stem.groups == 1
        && x.dim(1)? == c_in_w
        && w1.dim(3)? == k
        && b1.dims() == [c]
        && w2.dims() == [c, 1, 3, 3]
        && b2.dims() == [c]
        && *depthwise_cfg
            == (ConvConfig {
                stride: 2,
                padding: 1,
                dilation: 1,
                groups: c,
            })
        // The depthwise kernel reads rows in place up to its widest.
        && output_size(x.dim(3)?, k, &g1).is_ok_and(|width| width <= depthwise::MAX_DIRECT_WIDTH);
    if !native {
        let y = super::conv2d(x, w1, Some(b1), stem, act)?;
        return Ok(Output::Planes(super::conv2d(
            &y,
            w2,
            Some(b2),
            depthwise_cfg,
            act,
        )?));
    }
    let (n, c_in, h, w) = x.dims4()?;
    let (h1, w1o) = (output_size(h, k, &g1)?, output_size(w, k, &g1)?);
    let (h2, w2o) = (output_size(h1, 3, &g2)?, output_size(w1o, 3, &g2)?);
    // Depthwise output rows per band at most: its 2·rows + 1 stem rows of every channel fit
    // BAND_VALUES.
    let most = ((BAND_VALUES / (c * w1o)).saturating_sub(1) / 2).clamp(1, h2);
    let bands = row_bands(h2, most, n);
    let mut out = super::output_buffer(n * c * h2 * w2o);
    let out_ptr = SendPtr(out.as_mut_ptr());
    let channels_last = eight_lanes() && c.is_multiple_of(GROUP);
    let blocked = blocked && channels_last;
    with_cpu_slices(&[x, w1, b1, w2, b2], "stem-depthwise", |s| {
        let (x, w1, b1, w2, b2) = (s[0], s[1], s[2], s[3], s[4]);
        // The stem's weights as (C_in·K·K, C): a vector of 8 channels per tap.
        let taps = c_in * k * k;
        let w1t: Vec<f32> = match channels_last {
            true => (0..taps * c).map(|i| w1[i % c * taps + i / c]).collect(),
            false => Vec::new(),
        };
        (0..n * bands).into_par_iter().try_for_each(|task| {
            let (image, rows) = (task / bands, band_range(h2, bands, task % bands));
            let (oy0, band_rows) = (rows.start, rows.len());
            // Stem rows r0 .. r0 + 2·band_rows + 1 feed the band; those outside the image are 0.
            let (r0, count) = (2 * oy0 as isize - 1, 2 * band_rows + 1);
            let valid = r0.max(0) as usize..((r0 + count as isize) as usize).min(h1);
            let plane = count * w1o;
            let image_x = &x[image * c_in * h * w..][..c_in * h * w];
            // SAFETY: rows oy0 .. oy0 + band_rows of this image's output planes (or blocks)
            // belong to this task.
            let out = match blocked {
                true => (
                    unsafe { out_ptr.get().add((image * c * h2 + oy0 * GROUP) * w2o) },
                    h2 * w2o * GROUP,
                ),
                false => (
                    unsafe { out_ptr.get().add((image * c * h2 + oy0) * w2o) },
                    h2 * w2o,
                ),
            };
            if channels_last {
                return BUFFERS.with_borrow_mut(|(columns, tile, outputs)| {
                    band_columns(image_x, (c_in, h, w), k, w1o, &g1, valid.clone(), columns);
                    let first = (valid.start as isize - r0) as usize;
                    dispatch_8_lanes(ChannelsLastBand {
                        columns,
                        stem: (&w1t, b1),
                        depthwise: (w2, b2),
                        act,
                        band: (count, first..first + valid.len(), w1o),
                        rows: (band_rows, w2o),
                        out,
                        blocked,
                        tile,
                        outputs,
                    })
                    .expect("an AVX2 or AVX-512 level");
                    Ok(())
                });
            }
            BUFFERS.with_borrow_mut(|(columns, band, _)| {
                band.resize(c * plane, 0.0);
                for channel in band.chunks_exact_mut(plane) {
                    for (r, row) in channel.chunks_exact_mut(w1o).enumerate() {
                        let stem_row = r0 + r as isize;
                        if stem_row < 0 || stem_row as usize >= h1 {
                            row.fill(0.0);
                        }
                    }
                }
                if !valid.is_empty() {
                    let first = (valid.start as isize - r0) as usize;
                    // SAFETY: the product writes rows `first ..` of every channel's band plane,
                    // inside `band`.
                    unsafe {
                        band_product(
                            image_x,
                            (c_in, h, w),
                            (w1, b1),
                            k,
                            w1o,
                            &g1,
                            valid,
                            columns,
                            (band.as_mut_ptr().add(first * w1o), plane),
                        )
                    }
                }
                // SAFETY: see `out`.
                unsafe { depthwise::strided_band(band, w1o, (w2, b2), act, band_rows, out)? };
                Ok(())
            })
        })
    })?;
    Ok(match blocked {
        true => Output::Blocked(Blocked::from_parts(out, (n, c, h2, w2o))),
        false => Output::Planes(Tensor::from_vec(out, (n, c, h2, w2o), x.device())?),
    })
}

/// One band on AVX2 and AVX-512 with the stem's output kept channels last, the layout ONNX
/// Runtime's blocked kernels use: the stem is computed as 6 positions × 16 channels in registers (a
/// broadcast input times a vector of 8 channels' weights per tap) and stored as vectors of 8
/// channels into a tile of the band's rows with a zero column on each side; every depthwise output
/// vector is then nine multiply-adds with plain loads (the plane kernel splits each input vector
/// into even and odd lanes, six shuffles per kernel row), and 8 × 8 transposes put the outputs into
/// their planes. Multiplies and adds in the order of the 1x1 kernel's register block and the
/// stride-2 plane kernel. S1 at AVX2, fastest of 600 passes: stem and depthwise 0.73 -> 0.58 ms on
/// one thread, 0.39 -> 0.30 on two (ONNX Runtime's two layers: 0.57 on one); S0 0.55 -> 0.44 and
/// 0.28 -> 0.22. On AVX-512 in 8-lane vectors too (Zen 4 runs a 512-bit FMA as two 256-bit halves):
/// S1 on one thread 0.71 -> 0.61 ms (mean), 0.64 -> 0.54 (fastest).
struct ChannelsLastBand<'a> {
    /// The im2col columns of the band's valid stem rows: C_in·K·K rows of valid·W₁.
    columns: &'a [f32],
    /// Stem weight (C_in·K·K, C) and bias (C).
    stem: (&'a [f32], &'a [f32]),
    /// Depthwise weight (C, 9) and bias (C).
    depthwise: (&'a [f32], &'a [f32]),
    act: Activation,
    /// Stem rows in the band, which of them lie inside the image, and the stem's width W₁.
    band: (usize, std::ops::Range<usize>, usize),
    /// Depthwise output rows of the band, and their width.
    rows: (usize, usize),
    /// Channel c's output rows at `out.0 + c·out.1`, or with `blocked` group g's output vectors
    /// (the blocked NCHW8c layout, [`super::blocked`]) at `out.0 + g·out.1`.
    out: (*mut f32, usize),
    blocked: bool,
    tile: &'a mut Vec<f32>,
    outputs: &'a mut Vec<f32>,
}

impl WithSimd for ChannelsLastBand<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        const G: usize = GROUP;
        assert!(
            S::F32_LANES == G,
            "the channels-last stem runs on 8-lane vectors only"
        );
        let ((w1t, b1), (w2, b2)) = (self.stem, self.depthwise);
        let (count, valid, width) = self.band;
        let (rows, out_width) = self.rows;
        let c = b1.len();
        let taps = w1t.len() / c;
        let cols = valid.len() * width;
        // Tile row stride (input columns -1 ..= W₁), and one group's rows.
        let tw = width + 2;
        let group_len = count * tw * G;
        self.tile.resize(c / G * group_len, 0.0);
        // Zeros: the border columns, and the rows outside the image.
        for tile in self.tile.chunks_exact_mut(group_len) {
            for (r, row) in tile.chunks_exact_mut(tw * G).enumerate() {
                if valid.contains(&r) {
                    row[..G].fill(0.0);
                    row[(width + 1) * G..].fill(0.0);
                } else {
                    row.fill(0.0);
                }
            }
        }
        // The stem: 16 channels (two groups) × 6 positions at a time.
        let tile = self.tile.as_mut_ptr();
        for c0 in (0..c).step_by(2 * G) {
            macro_rules! run {
                ($v:literal) => {
                    for r in valid.clone() {
                        // SAFETY: channels c0 .. c0 + $v·8 ≤ C of the weights and bias, row
                        // r − valid.start of `columns`, row r of groups c0 / 8 .. of the tile.
                        unsafe {
                            let block = StemBlock::<S, $v> {
                                w: w1t.as_ptr().add(c0),
                                c,
                                x: self.columns.as_ptr().add((r - valid.start) * width),
                                cols,
                                taps,
                                bias: std::array::from_fn(|v| {
                                    load::<S>(b1.as_ptr().add(c0 + v * G))
                                }),
                                act: self.act,
                                dst: tile.add((c0 / G * count + r) * tw * G + G),
                                group_len,
                            };
                            let mut p = 0;
                            while p + 6 <= width {
                                block.run::<6>(simd, p);
                                p += 6;
                            }
                            match width - p {
                                0 => {}
                                1 => block.run::<1>(simd, p),
                                2 => block.run::<2>(simd, p),
                                3 => block.run::<3>(simd, p),
                                4 => block.run::<4>(simd, p),
                                _ => block.run::<5>(simd, p),
                            }
                        }
                    }
                };
            }
            if c - c0 >= 2 * G {
                run!(2)
            } else {
                run!(1)
            }
        }
        // The depthwise outputs of a group, padded to whole transposes (blocked: written in
        // place).
        if !self.blocked {
            self.outputs.resize((rows * out_width + G) * G, 0.0);
        }
        for g in 0..c / G {
            let wv = channel_group_taps::<S>(w2, b2, g * G);
            // SAFETY: group g's rows lie inside the tile.
            let group = unsafe { tile.add(g * group_len) as *const f32 };
            macro_rules! outputs {
                ($act:expr) => {{
                    let mut dst = match self.blocked {
                        // SAFETY: group g's rows of the caller's blocked output.
                        true => unsafe { self.out.0.add(g * self.out.1) },
                        false => self.outputs.as_mut_ptr(),
                    };
                    for oy in 0..rows {
                        for ox in 0..out_width {
                            // SAFETY: band rows 2·oy .. 2·oy + 2 < count, tile columns 2·ox ..
                            // 2·ox + 2 ≤ W₁ + 1; `outputs` holds rows·out_width vectors.
                            unsafe {
                                let at = group.add((2 * oy * tw + 2 * ox) * G);
                                let sum = channel_group_output(simd, &wv, |ky, kx| {
                                    load::<S>(at.add((ky * tw + kx) * G))
                                });
                                (dst as *mut S::f32s).write_unaligned(activate_v(simd, sum, $act));
                                dst = dst.add(G);
                            }
                        }
                    }
                }};
            }
            match self.act {
                Activation::None => outputs!(Activation::None),
                Activation::Relu => outputs!(Activation::Relu),
                Activation::Relu6 => outputs!(Activation::Relu6),
            }
            if self.blocked {
                continue;
            }
            // Back into the group's planes, 8 positions of a row at a time.
            for oy in 0..rows {
                for x0 in (0..out_width).step_by(G) {
                    let row = oy * out_width + x0;
                    // SAFETY: `outputs` holds G vectors past the last row's; the caller's rows of
                    // channels g·G ...
                    unsafe {
                        store_channel_runs(
                            simd,
                            self.outputs.as_ptr().add(row * G),
                            std::array::from_fn(|i| self.out.0.add((g * G + i) * self.out.1 + row)),
                            out_width - x0,
                        )
                    };
                }
            }
        }
    }
}

/// Positions `p .. p + NP` of one stem row × V groups of 8 channels: input tap t of position p
/// at `x + t·cols + p`, weights of the V groups at `w + t·c`, outputs (vectors of 8 channels) at
/// `dst + v·group_len + p·8`.
struct StemBlock<S: Simd, const V: usize> {
    w: *const f32,
    c: usize,
    x: *const f32,
    cols: usize,
    taps: usize,
    bias: [S::f32s; V],
    act: Activation,
    dst: *mut f32,
    group_len: usize,
}

impl<S: Simd, const V: usize> StemBlock<S, V> {
    /// # Safety
    /// The positions, weights and outputs lie inside their buffers.
    #[inline(always)]
    unsafe fn run<const NP: usize>(&self, simd: S, p: usize) {
        let mut acc = [self.bias; NP];
        for t in 0..self.taps {
            let wv: [S::f32s; V] =
                std::array::from_fn(|v| load::<S>(self.w.add(t * self.c + v * GROUP)));
            for (j, acc) in acc.iter_mut().enumerate() {
                let xb = simd.splat_f32s(*self.x.add(t * self.cols + p + j));
                for (a, w) in acc.iter_mut().zip(&wv) {
                    *a = simd.mul_add_f32s(*w, xb, *a);
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            for (v, a) in acc.iter().enumerate() {
                let dst = self.dst.add(v * self.group_len + (p + j) * GROUP);
                (dst as *mut S::f32s).write_unaligned(activate_v(simd, *a, self.act));
            }
        }
    }
}
