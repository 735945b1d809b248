//! Dense (groups = 1) convolution as a GEMM per image with fused bias and activation.
//!
//! In NCHW a 1x1 stride-1 convolution of one image is already `W (C_out, C_in) × X (C_in, H*W)`,
//! so it needs no copy; other kernels go through im2col first. The GEMM is split into tiles that
//! rayon runs in parallel; each tile gets its bias and activation right after its GEMM, while it
//! is still in cache.

use super::{activate, cpu_slice, output_size, Activation, Geometry, SendPtr};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::borrow::Cow;

/// Dense convolution of x (N, C_in, H, W) with weight (C_out, C_in, K, K) and bias (C_out).
pub(super) struct GemmConv(pub(super) Geometry);

/// Tiles per thread: more than one so a thread slowed down by other work does not stall the op.
const TILES_PER_THREAD: usize = 2;
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

/// Splits `images` GEMMs into enough tiles to keep every thread busy.
fn plan_tiles(images: usize, s: GemmShape) -> Vec<Tile> {
    let wanted = TILES_PER_THREAD * rayon::current_num_threads();
    let per_image = wanted.div_ceil(images.max(1));
    let col_splits = per_image.min((s.n / MIN_TILE_COLS).max(1));
    let row_splits = per_image
        .div_ceil(col_splits)
        .min((s.m / MIN_TILE_ROWS).max(1));
    let col_step = s.n.div_ceil(col_splits).next_multiple_of(16);
    let row_step = s.m.div_ceil(row_splits).next_multiple_of(8);
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
}

/// Unfolds x (N, C_in, H, W) into (N, C_in*K*K, OH*OW) columns: row (ci, ky, kx) holds the input
/// value under that tap for every output position, 0 in the padding. Writes every element once.
#[allow(clippy::too_many_arguments)]
fn im2col(
    x: &[f32],
    (n, c_in, h, w): (usize, usize, usize, usize),
    k: usize,
    (oh, ow): (usize, usize),
    g: &Geometry,
) -> Vec<f32> {
    let ohw = oh * ow;
    let mut cols = super::output_buffer(n * c_in * k * k * ohw);
    let (s, p, d) = (g.stride, g.padding as isize, g.dilation);
    cols.par_chunks_mut(ohw).enumerate().for_each(|(row, dst)| {
        let (image, tap) = (row / (c_in * k * k), row % (c_in * k * k));
        let (ci, ky, kx) = (tap / (k * k), (tap / k) % k, tap % k);
        let plane = &x[(image * c_in + ci) * h * w..][..h * w];
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
        for oy in 0..oh {
            let out = &mut dst[oy * ow..(oy + 1) * ow];
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
    });
    cols
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
        let cols: Cow<[f32]> = if pointwise {
            Cow::Borrowed(x)
        } else {
            Cow::Owned(im2col(x, (n, c_in, h, wd), k, (oh, ow), g))
        };
        let mut out = super::output_buffer(n * shape.m * shape.n);
        let out_ptr = SendPtr(out.as_mut_ptr());
        let act = g.act;
        plan_tiles(n, shape).par_iter().for_each(|tile| {
            let image_out = out_ptr.get().wrapping_add(tile.image * shape.m * shape.n);
            let image_cols = &cols[tile.image * shape.k * shape.n..][..shape.k * shape.n];
            // SAFETY: tiles are disjoint; every pointer stays inside its (checked) buffer.
            unsafe {
                gemm::gemm(
                    tile.rows.len(),
                    tile.cols.len(),
                    shape.k,
                    image_out.add(tile.rows.start * shape.n + tile.cols.start),
                    1,
                    shape.n as isize,
                    false,
                    w.as_ptr().add(tile.rows.start * shape.k),
                    1,
                    shape.k as isize,
                    image_cols.as_ptr().add(tile.cols.start),
                    1,
                    shape.n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
                for r in tile.rows.clone() {
                    let row = std::slice::from_raw_parts_mut(
                        image_out.add(r * shape.n + tile.cols.start),
                        tile.cols.len(),
                    );
                    bias_activation(row, b[r], act);
                }
            }
        });
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
        let grad = match g.act {
            Activation::None => grad_res.clone(),
            Activation::Relu => (grad_res * res.gt(0f32)?.to_dtype(DType::F32)?)?,
            Activation::Relu6 => {
                let inside =
                    (res.gt(0f32)?.to_dtype(DType::F32)? * res.lt(6f32)?.to_dtype(DType::F32)?)?;
                (grad_res * inside)?
            }
        };
        let grad_b = grad.sum((0, 2, 3))?;
        let (n, c_out, oh, ow) = grad.dims4()?;
        let (_, c_in, k, _) = w.dims4()?;
        let (grad_x, grad_w) = if k == 1 && g.stride == 1 && g.padding == 0 {
            let grad = grad.reshape((n, c_out, oh * ow))?;
            let x = x.reshape((n, c_in, oh * ow))?;
            let w = w.reshape((c_out, c_in))?;
            let grad_x = w.t()?.broadcast_matmul(&grad)?;
            let grad_w = grad.matmul(&x.t()?)?.sum(0)?;
            (grad_x, grad_w)
        } else {
            // candle's own conv2d backward formulas, except that input rows and columns no window
            // reaches (bottom/right, each axis on its own) get their zero gradient by padding.
            let grad_x = grad.conv_transpose2d(w, g.padding, 0, g.stride, g.dilation)?;
            let (_, _, h, wd) = x.dims4()?;
            let (_, _, gh, gw) = grad_x.dims4()?;
            let grad_x = grad_x
                .pad_with_zeros(2, 0, h - gh)?
                .pad_with_zeros(3, 0, wd - gw)?;
            let grad_w = x
                .transpose(0, 1)?
                .conv2d(&grad.transpose(0, 1)?, g.padding, g.dilation, g.stride, 1)?
                .transpose(0, 1)?
                .narrow(2, 0, k)?
                .narrow(3, 0, k)?;
            (grad_x, grad_w)
        };
        Ok((
            Some(grad_x.reshape(x.shape())?),
            Some(grad_w.reshape(w.shape())?),
            Some(grad_b),
        ))
    }
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

/// [`bias_activation_body`], vectorised for AVX2 where the CPU has it.
fn bias_activation(row: &mut [f32], bias: f32, act: Activation) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(row: &mut [f32], bias: f32, act: Activation) {
            bias_activation_body(row, bias, act)
        }
        // SAFETY: the CPU supports AVX2+FMA.
        return unsafe { avx2(row, bias, act) };
    }
    bias_activation_body(row, bias, act)
}
