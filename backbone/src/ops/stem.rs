//! The stem and the first (stride-2 depthwise) layer of a reparameterised MobileOne as one pass, for
//! inference: the stem's output is the largest activation of the network (48 × 112² per 224² image,
//! 19 MB at batch 8) and is otherwise written to memory only to be read back by the next layer.

use super::gemm_conv::band_product;
use super::{
    band_range, depthwise, output_size, row_bands, with_cpu_slices, Activation, ConvConfig,
    Geometry, SendPtr,
};
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;
use std::cell::RefCell;

/// Stem values one band keeps (512 KB, in L2 while its depthwise rows are computed). Each band
/// computes the stem row it shares with the next one again, so fewer, taller bands redo less: S1
/// at AVX2, one thread, fastest of 80 passes, 256 KB (4 depthwise rows a band) 0.782 ms, 512 KB
/// (8 rows) 0.713–0.737, 1 MB 0.727; at two threads SSDLite-320 0.83 -> 0.78 ms, S0 at batch 8
/// 0.60 -> 0.56 per image, S0 and S1 at batch 1 within 2 %.
const BAND_VALUES: usize = 128 * 1024;

thread_local! {
    /// A band's im2col columns and its stem output.
    static BUFFERS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
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
    (w1, b1, stem): (&Tensor, &Tensor, &ConvConfig),
    (w2, b2, depthwise_cfg): (&Tensor, &Tensor, &ConvConfig),
    act: Activation,
) -> Result<Tensor> {
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
        && w2.dims() == [c, 1, 3, 3]
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
        return super::conv2d(&y, w2, Some(b2), depthwise_cfg, act);
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
    with_cpu_slices(&[x, w1, b1, w2, b2], "stem-depthwise", |s| {
        let (x, w1, b1, w2, b2) = (s[0], s[1], s[2], s[3], s[4]);
        (0..n * bands).into_par_iter().try_for_each(|task| {
            let (image, rows) = (task / bands, band_range(h2, bands, task % bands));
            let (oy0, band_rows) = (rows.start, rows.len());
            // Stem rows r0 .. r0 + 2·band_rows + 1 feed the band; those outside the image are 0.
            let (r0, count) = (2 * oy0 as isize - 1, 2 * band_rows + 1);
            let valid = r0.max(0) as usize..((r0 + count as isize) as usize).min(h1);
            let plane = count * w1o;
            BUFFERS.with_borrow_mut(|(columns, band)| {
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
                    let image_x = &x[image * c_in * h * w..][..c_in * h * w];
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
                // SAFETY: rows oy0 .. oy0 + band_rows of this image's output planes belong to
                // this task.
                unsafe {
                    depthwise::strided_band(
                        band,
                        w1o,
                        (w2, b2),
                        act,
                        band_rows,
                        (out_ptr.get().add((image * c * h2 + oy0) * w2o), h2 * w2o),
                    )?
                };
                Ok(())
            })
        })
    })?;
    Tensor::from_vec(out, (n, c, h2, w2o), x.device())
}
