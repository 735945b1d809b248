//! A depthwise convolution and the 1x1 convolution after it (a reparameterised MobileOne's two
//! blocks of each pair) as one op for inference on the AVX2 level. The depthwise kernels write their
//! output straight into position panels, per image each run of [`PANEL`] (16) positions of every
//! channel, channel after channel: the copy that the AVX2 1x1 kernel otherwise packs from the planes
//! before it multiplies. Packing it there is done by every thread for its own tile, so at batch 1,
//! where each of two threads gets half the rows and all the positions, the whole input was copied
//! twice per layer. A MobileOne stage whose layers all fit the blocked layout runs in it instead
//! ([`super::blocked`]); these pairs serve the rest (channel counts that are not multiples of 8).

use super::depthwise::{self, OutPlanes, PlaneLayout};
use super::gemm_conv::pointwise_images;
use super::pointwise::{panels_len, PANEL};
use super::simd::{simd_level, SimdLevel};
use super::{with_cpu_slices, Activation, ConvConfig, Geometry};
use candle_core::{DType, Result, Tensor};
use std::cell::Cell;

/// Most panels per plane (1024 positions, 32x32). Each depthwise plane is stored a run in every
/// panel: S2 at AVX2, one thread, fastest calls, 96 × 56x56 (196 panels) 0.13 -> 0.23 ms, where
/// its 1x1 gained 0.03; 256 × 28x28 (49) 0.086 -> 0.093 against 0.019 (S1 and S0 likewise).
const MAX_PANELS: usize = 64;

/// Most values of the panels buffer a thread keeps between calls (16 MB).
const MAX_KEPT: usize = 4 << 20;

thread_local! {
    /// The intermediate in panels, reused by the calling thread's next pair.
    static PANELS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// `act(conv1x1(act(depthwise(x))))`: x (N, C, H, W) through a KxK depthwise convolution (weight
/// (C, 1, K, K), bias (C), geometry `depthwise_cfg`) and then a 1x1 one (weight (C_out, C, 1, 1),
/// bias (C_out), stride 1, no padding), both followed by `act`, to (N, C_out, H', W'). The same
/// kernels as [`super::conv2d`] compute both, with the intermediate in position panels on the AVX2
/// level where the depthwise kernel writes panels (the channel groups, the 3x3 stride-1 plane
/// kernel) and an output plane has at most [`MAX_PANELS`] panels (32x32); elsewhere (other levels,
/// devices, dtypes, geometries, wider planes) it is the two convolutions. The result is the same
/// either way, bit for bit. No gradient: inference only.
///
/// # Errors
/// When the shapes do not fit (named in the message).
pub fn depthwise_then_pointwise(
    x: &Tensor,
    (w1, b1, depthwise_cfg): (&Tensor, &Tensor, &ConvConfig),
    (w2, b2, pointwise_cfg): (&Tensor, &Tensor, &ConvConfig),
    act: Activation,
) -> Result<Tensor> {
    let (c, one, k, k2) = w1.dims4()?;
    let native = simd_level() == SimdLevel::Avx2
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && [w1, b1, w2, b2].iter().all(|t| t.dtype() == DType::F32)
        && x.rank() == 4
        && x.dim(1)? == c
        && (one, k) == (1, k2)
        && depthwise_cfg.groups == c
        && b1.dims() == [c]
        && w2.rank() == 4
        && w2.dims()[1..] == [c, 1, 1]
        && b2.dims() == [w2.dim(0)?]
        && *pointwise_cfg
            == (ConvConfig {
                stride: 1,
                padding: 0,
                dilation: 1,
                groups: 1,
            });
    let g = Geometry {
        stride: depthwise_cfg.stride,
        padding: depthwise_cfg.padding,
        dilation: depthwise_cfg.dilation,
        act,
    };
    let layout = match native {
        true => Some(PlaneLayout::new(x.dim(2)?, x.dim(3)?, k, &g)?),
        false => None,
    }
    .filter(|l| {
        depthwise::writes_panels(l, c) && (l.out_height * l.out_width).div_ceil(PANEL) <= MAX_PANELS
    });
    let Some(layout) = layout else {
        let y = super::conv2d(x, w1, Some(b1), depthwise_cfg, act)?;
        return super::conv2d(&y, w2, Some(b2), pointwise_cfg, act);
    };
    let n = x.dim(0)?;
    let c_out = w2.dim(0)?;
    let (oh, ow) = (layout.out_height, layout.out_width);
    let positions = oh * ow;
    // One buffer per calling thread, kept: written back into the same lines each time, the
    // panels stay in cache. Zeroed when allocated: each panel's padding run and the last panel's
    // positions past the plane are never written (nor read).
    let mut panels = PANELS.take();
    let len = n * panels_len(c, positions);
    if panels.len() < len {
        panels = vec![0.0; len];
    }
    let mut out = super::output_buffer(n * c_out * positions);
    with_cpu_slices(&[x, w1, b1, w2, b2], "depthwise-pointwise", |s| {
        let into_panels = OutPlanes {
            ptr: panels.as_mut_ptr(),
            plane_out: positions,
            panels: Some(c),
        };
        depthwise::forward(&layout, (s[0], s[1], s[2]), act, (n, c, 1), into_panels);
        let shape = (n, c_out, c, positions);
        pointwise_images((&panels[..len], true), (s[3], s[4]), act, shape, &mut out);
        Ok(())
    })?;
    // A large batch's buffer is not held on to (S1 at batch 8 on one thread needs 1.2 M values).
    if panels.len() <= MAX_KEPT {
        PANELS.set(panels);
    }
    Tensor::from_vec(out, (n, c_out, oh, ow), x.device())
}
