//! Runs of reparameterised depthwise 3x3 and 1x1 layers in the blocked NCHW8c layout, for
//! inference on the AVX2 level: value (n, c, y, x) at ((n·C/8 + c/8)·H·W + y·W + x)·8 + c % 8,
//! ONNX Runtime's NCHWc layout for 8-lane vectors. There a depthwise output vector (8 channels at
//! one position) is nine multiply-adds with plain loads, without the transposes of the channel-group
//! kernel or the lane shifts of the plane kernels, and a 1x1 layer broadcasts one input value per
//! position against vectors of 8 output channels' weights, packed once per model
//! ([`PackedPointwise`]), its output already blocked for the next layer. A run converts its input
//! from planes once and its output back once.

use super::depthwise::{channel_group_output, channel_group_taps};
use super::simd::{activate_v, dispatch_8_lanes, lanes_in, load, store_first, transpose8};
use super::{one_tile_per_image_set, output_buffer, with_cpu_slices, Activation, SendPtr};
use candle_core::{Result, Tensor, TensorId};
use pulp::{Simd, WithSimd};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// A run is entered on the AVX2 level only ([`enabled`]); a level lowered meanwhile by another
/// thread would leave the output unwritten, so the kernels insist.
const LEVEL: &str = "a blocked run's kernels need the AVX2 level";
/// Channels per block: the lanes of an AVX2 vector.
pub(crate) const BLOCK: usize = 8;
/// Positions per 1x1 register block (6 × 2 vectors of 8 output channels: 12 sums, 2 weight vectors
/// and a broadcast in AVX2's 16 registers).
const POSITIONS: usize = 6;

/// Squeeze-and-excitation's gate from the channel means: (N, C, 1, 1) → (N, C, 1, 1).
pub(crate) trait Excite: Sync {
    fn gate(&self, means: &Tensor) -> Result<Tensor>;
}

/// One layer of a blocked run: a 3x3 depthwise convolution (padding 1, stride 1 or 2) or a 1x1
/// convolution (stride 1), each with its bias, then where `excite` is given its output times the
/// gate of its channel means, then the run's activation.
pub(crate) enum BlockedLayer<'a> {
    /// Weight (C, 1, 3, 3), bias (C).
    Depthwise {
        weight: &'a Tensor,
        bias: &'a Tensor,
        stride: usize,
        excite: Option<&'a dyn Excite>,
    },
    /// Weight (C_out, C_in, 1, 1), bias (C_out), and the cache of its packed weights.
    Pointwise {
        weight: &'a Tensor,
        bias: &'a Tensor,
        packed: &'a PackedPointwise,
        excite: Option<&'a dyn Excite>,
    },
}

/// The weights of a 1x1 layer packed for the blocked kernel: per pair of output blocks (the odd
/// last block alone), for each input channel the pair's two vectors of 8 output channels' weights,
/// (C_out / 16, C_in, 16), so that a pair's weights are one contiguous run read in order. Kept for the weight tensor it was packed from
/// (by id): packing per call would cost about as much as the layer at batch 1.
#[derive(Default)]
pub struct PackedPointwise(Mutex<Option<(TensorId, Arc<Vec<f32>>)>>);

impl Clone for PackedPointwise {
    /// An empty cache: a clone packs its own weights on first use.
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for PackedPointwise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PackedPointwise")
    }
}

impl PackedPointwise {
    /// The packing of `weight` (C_out, C_in, 1, 1), C_out a multiple of [`BLOCK`]. A variable's
    /// values can change under the same id (an optimiser step, `Var::set`), so its packing is
    /// made afresh on every call and not kept.
    fn get(&self, weight: &Tensor) -> Result<Arc<Vec<f32>>> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((id, packed)) = &*slot {
            if *id == weight.id() && !weight.is_variable() {
                return Ok(packed.clone());
            }
        }
        let (c_out, c_in) = (weight.dim(0)?, weight.dim(1)?);
        let packed = with_cpu_slices(&[weight], "blocked pointwise", |s| {
            let w = s[0];
            let mut packed = vec![0f32; c_out * c_in];
            let blocks = c_out / BLOCK;
            for (o, row) in w.chunks_exact(c_in).enumerate() {
                let (block, lane) = (o / BLOCK, o % BLOCK);
                // The pair's first block, its blocks (2, or the odd last 1) and this one's place.
                let (first, v) = (block / 2 * 2, block % 2);
                let pair_blocks = (blocks - first).min(2);
                for (ci, &value) in row.iter().enumerate() {
                    packed[(first * c_in + ci * pair_blocks + v) * BLOCK + lane] = value;
                }
            }
            Ok(Arc::new(packed))
        })?;
        if !weight.is_variable() {
            *slot = Some((weight.id(), packed.clone()));
        }
        Ok(packed)
    }
}

/// Whether x can enter a blocked run: the AVX2 level, an f32 CPU tensor (N, C, H, W).
pub(crate) fn enabled(x: &Tensor) -> bool {
    super::simd::simd_level() == super::simd::SimdLevel::Avx2
        && x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && x.rank() == 4
}

/// The channels after `layers` when they can run blocked on `c_in` input channels, else `None`:
/// every channel count a multiple of [`BLOCK`], depthwise layers 3x3 with one output per input
/// channel, 1x1 layers reading the previous layer's channels, f32 CPU weights.
pub(crate) fn channels_after(c_in: usize, layers: &[BlockedLayer]) -> Option<usize> {
    let mut c = c_in;
    for layer in layers {
        let ok = match *layer {
            BlockedLayer::Depthwise {
                weight,
                bias,
                stride,
                ..
            } => {
                weight.dims() == [c, 1, 3, 3] && bias.dims() == [c] && (stride == 1 || stride == 2)
            }
            BlockedLayer::Pointwise { weight, bias, .. } => {
                let c_out = weight.dims()[0];
                let ok = weight.dims() == [c_out, c, 1, 1] && bias.dims() == [c_out];
                c = c_out;
                ok
            }
        };
        let f32_cpu = [weight_of(layer), bias_of(layer)]
            .iter()
            .all(|t| t.dtype() == candle_core::DType::F32 && t.device().is_cpu());
        if !(ok && f32_cpu && c.is_multiple_of(BLOCK)) {
            return None;
        }
    }
    c_in.is_multiple_of(BLOCK).then_some(c)
}

fn weight_of<'a>(layer: &BlockedLayer<'a>) -> &'a Tensor {
    match *layer {
        BlockedLayer::Depthwise { weight, .. } | BlockedLayer::Pointwise { weight, .. } => weight,
    }
}

fn bias_of<'a>(layer: &BlockedLayer<'a>) -> &'a Tensor {
    match *layer {
        BlockedLayer::Depthwise { bias, .. } | BlockedLayer::Pointwise { bias, .. } => bias,
    }
}

/// The input of a blocked [`run`]: planes, or values already blocked (the stem's).
pub(crate) enum Input<'a> {
    Planes(&'a Tensor),
    Blocked(Blocked),
}

/// `layers` one after the other on x (N, C, H, W), each followed by `act`, in the blocked layout
/// (a planes input [`enabled`], the layers checked by [`channels_after`]); the result (N, C', H',
/// W') in planes on `device`.
///
/// # Errors
/// When a tensor is not on the CPU or not contiguous f32 (named in the message).
pub(crate) fn run(
    x: Input,
    layers: &[BlockedLayer],
    act: Activation,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mut y = match x {
        Input::Blocked(y) => y,
        Input::Planes(x) => {
            debug_assert!(enabled(x) && channels_after(x.dim(1)?, layers).is_some());
            let (n, c, h, w) = x.dims4()?;
            with_cpu_slices(&[x], "blocked run", |s| {
                Ok(Blocked::from_planes(s[0], (n, c, h, w)))
            })?
        }
    };
    for layer in layers {
        let excite = match *layer {
            BlockedLayer::Depthwise { excite, .. } | BlockedLayer::Pointwise { excite, .. } => {
                excite
            }
        };
        // With squeeze-and-excitation the activation follows the gate.
        let conv_act = match excite {
            Some(_) => Activation::None,
            None => act,
        };
        y = match *layer {
            BlockedLayer::Depthwise {
                weight,
                bias,
                stride,
                ..
            } => with_cpu_slices(&[weight, bias], "blocked depthwise", |s| {
                Ok(y.depthwise((s[0], s[1]), stride, conv_act))
            })?,
            BlockedLayer::Pointwise {
                weight,
                bias,
                packed,
                ..
            } => {
                let packed = packed.get(weight)?;
                let c_out = weight.dim(0)?;
                with_cpu_slices(&[bias], "blocked pointwise", |s| {
                    Ok(y.pointwise((&packed, s[0]), c_out, conv_act))
                })?
            }
        };
        if let Some(excite) = excite {
            let means = Tensor::from_vec(y.means(), (y.n, y.c, 1, 1), device)?;
            let gate = excite.gate(&means)?.flatten_all()?.to_vec1::<f32>()?;
            y.scale(&gate, act);
        }
    }
    let (n, c, h, w) = (y.n, y.c, y.h, y.w);
    Tensor::from_vec(y.into_planes(), (n, c, h, w), device)
}

/// N images' activations in the blocked layout (module docs).
pub(crate) struct Blocked {
    data: Vec<f32>,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
}

/// Runs `task(i)` for i in 0..count: on the pool's threads, or on the calling thread inside
/// [`super::one_tile_per_image`] (its images already have a thread each).
fn for_tasks(count: usize, task: impl Fn(usize) + Sync + Send) {
    if one_tile_per_image_set() || rayon::current_num_threads() == 1 {
        (0..count).for_each(task);
    } else {
        (0..count).into_par_iter().for_each(task);
    }
}

impl Blocked {
    /// Values already in the blocked layout of (N, C, H, W), C a multiple of [`BLOCK`].
    pub(crate) fn from_parts(data: Vec<f32>, (n, c, h, w): (usize, usize, usize, usize)) -> Self {
        debug_assert!(data.len() == n * c * h * w && c.is_multiple_of(BLOCK));
        Self { data, n, c, h, w }
    }

    /// C.
    pub(crate) fn channels(&self) -> usize {
        self.c
    }

    /// x (N, C, H, W) in planes, C a multiple of [`BLOCK`].
    fn from_planes(x: &[f32], (n, c, h, w): (usize, usize, usize, usize)) -> Self {
        let data = transposed(x, h * w, true);
        Self { data, n, c, h, w }
    }

    /// The activations back in planes, (N, C, H, W).
    fn into_planes(self) -> Vec<f32> {
        transposed(&self.data, self.h * self.w, false)
    }

    /// Each image's channel means, (N, C).
    fn means(&self) -> Vec<f32> {
        let positions = self.h * self.w;
        let mut means = vec![0f32; self.n * self.c];
        for (run, block) in self
            .data
            .chunks_exact(positions * BLOCK)
            .zip(means.chunks_exact_mut(BLOCK))
        {
            let mut sum = [0f32; BLOCK];
            for vector in run.chunks_exact(BLOCK) {
                for (s, &v) in sum.iter_mut().zip(vector) {
                    *s += v;
                }
            }
            for (m, s) in block.iter_mut().zip(sum) {
                *m = s / positions as f32;
            }
        }
        means
    }

    /// Every value times its image's channel gate (N, C), then `act`.
    fn scale(&mut self, gate: &[f32], act: Activation) {
        let run = self.h * self.w * BLOCK;
        let data = SendPtr(self.data.as_mut_ptr());
        for_tasks(self.n * self.c / BLOCK, |block| {
            // SAFETY: block `block`'s run is this task's alone.
            let run = unsafe { std::slice::from_raw_parts_mut(data.get().add(block * run), run) };
            let gate = &gate[block * BLOCK..][..BLOCK];
            for vector in run.chunks_exact_mut(BLOCK) {
                for (v, &g) in vector.iter_mut().zip(gate) {
                    *v = super::activate(*v * g, act);
                }
            }
        });
    }

    /// The 3x3 depthwise convolution (padding 1) with weight (C, 1, 3, 3) and bias (C), then `act`.
    fn depthwise(&self, (w, b): (&[f32], &[f32]), stride: usize, act: Activation) -> Self {
        let (oh, ow) = ((self.h - 1) / stride + 1, (self.w - 1) / stride + 1);
        let mut data = output_buffer(self.n * self.c * oh * ow);
        let out = SendPtr(data.as_mut_ptr());
        // Rows above and below the plane read this instead (zeros times the taps add nothing).
        let zeros = vec![0f32; self.w * BLOCK];
        for_tasks(self.n * self.c / BLOCK, |block| {
            dispatch_8_lanes(DepthwiseBlock {
                x: &self.data[block * BLOCK * self.h * self.w..][..BLOCK * self.h * self.w],
                taps: (w, b, block % (self.c / BLOCK) * BLOCK),
                // SAFETY: block `block`'s run of the output.
                out: unsafe { out.get().add(block * BLOCK * oh * ow) },
                size: (self.h, self.w, oh, ow),
                stride,
                act,
                zeros: &zeros,
            })
            .expect(LEVEL);
        });
        Self {
            data,
            n: self.n,
            c: self.c,
            h: oh,
            w: ow,
        }
    }

    /// The 1x1 convolution with weights packed by [`PackedPointwise`] and bias (C_out), then `act`.
    fn pointwise(&self, (packed, b): (&[f32], &[f32]), c_out: usize, act: Activation) -> Self {
        let positions = self.h * self.w;
        let mut data = output_buffer(self.n * c_out * positions);
        let out = SendPtr(data.as_mut_ptr());
        // Pairs of output blocks per image (the last one alone where C_out / 8 is odd).
        let pairs = (c_out / BLOCK).div_ceil(2);
        let image_in = self.c * positions;
        let pair_block = |image: usize, pair: usize, range: (usize, usize)| {
            let first = 2 * pair;
            dispatch_8_lanes(PointwiseBlock {
                x: &self.data[image * image_in..][..image_in],
                w: &packed[first * BLOCK * self.c..],
                b: &b[first * BLOCK..],
                // SAFETY: this pair's blocks of the image's output.
                out: unsafe { out.get().add((image * c_out + first * BLOCK) * positions) },
                c_in: self.c,
                positions,
                range,
                blocks: (c_out / BLOCK - first).min(2),
                act,
            })
            .expect(LEVEL);
        };
        // Tasks of one pair over a range of positions: the whole plane, or as many ranges as
        // threads where the pairs do not divide evenly between the threads (S0's 48 channels, 3
        // pairs on 2 threads: one thread had two, the other one).
        let threads = match one_tile_per_image_set() {
            true => 1,
            false => rayon::current_num_threads(),
        };
        let ranges = match (self.n * pairs).is_multiple_of(threads) {
            true => 1,
            false => threads.min(positions.div_ceil(POSITIONS)),
        };
        let chunk = positions.div_ceil(ranges).next_multiple_of(POSITIONS);
        let ranges = positions.div_ceil(chunk);
        for_tasks(self.n * pairs * ranges, |task| {
            let (image, pair, k) = (
                task / (pairs * ranges),
                task / ranges % pairs,
                task % ranges,
            );
            pair_block(image, pair, (k * chunk, ((k + 1) * chunk).min(positions)));
        });
        Self {
            data,
            n: self.n,
            c: c_out,
            h: self.h,
            w: self.w,
        }
    }
}

/// Every group of 8 planes of `plane` values in `src` as one run of `plane` vectors (to the blocked
/// layout), or back when not `to_blocked`: a task per group.
fn transposed(src: &[f32], plane: usize, to_blocked: bool) -> Vec<f32> {
    let mut dst = output_buffer(src.len());
    let out = SendPtr(dst.as_mut_ptr());
    let run = BLOCK * plane;
    for_tasks(src.len() / run, |block| {
        dispatch_8_lanes(Transpose {
            src: src[block * run..][..run].as_ptr(),
            // SAFETY: group `block`'s run of the output is this task's alone.
            dst: unsafe { out.get().add(block * run) },
            plane,
            to_blocked,
        })
        .expect(LEVEL);
    });
    dst
}

/// 8 planes of `plane` values at `src` into one run of `plane` vectors at `dst` (8 positions at a
/// time through an 8 × 8 transpose), or back when not `to_blocked`.
struct Transpose {
    src: *const f32,
    dst: *mut f32,
    plane: usize,
    to_blocked: bool,
}

impl WithSimd for Transpose {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        debug_assert!(S::F32_LANES == BLOCK);
        let (src, dst, plane) = (self.src, self.dst, self.plane);
        let zero = simd.splat_f32s(0.0);
        for q in (0..plane).step_by(BLOCK) {
            let count = (plane - q).min(BLOCK);
            // SAFETY: positions q .. q + count of the 8 planes and of the run.
            unsafe {
                if self.to_blocked {
                    let mask = lanes_in(simd, 0, count as isize);
                    let rows: [S::f32s; BLOCK] = std::array::from_fn(|i| {
                        let p = src.add(i * plane + q);
                        if count == BLOCK {
                            load::<S>(p)
                        } else {
                            simd.mask_load_ptr_f32s(mask, p)
                        }
                    });
                    let columns = transpose8(simd, rows);
                    #[allow(clippy::needless_range_loop)]
                    for j in 0..BLOCK {
                        if j < count {
                            (dst.add((q + j) * BLOCK) as *mut S::f32s).write_unaligned(columns[j]);
                        }
                    }
                } else {
                    let vectors: [S::f32s; BLOCK] = std::array::from_fn(|j| {
                        if j < count {
                            load::<S>(src.add((q + j) * BLOCK))
                        } else {
                            zero
                        }
                    });
                    let rows = transpose8(simd, vectors);
                    for (i, row) in rows.into_iter().enumerate() {
                        store_first(simd, dst.add(i * plane + q), count, row);
                    }
                }
            }
        }
    }
}

/// One block of 8 channels of a 3x3 depthwise convolution (padding 1): each output vector from its
/// nine input vectors, rows outside the plane read from `zeros`, columns outside it skipped.
struct DepthwiseBlock<'a> {
    /// The block's input, H·W vectors.
    x: &'a [f32],
    /// Weight (C, 1, 3, 3), bias (C), and the block's first channel.
    taps: (&'a [f32], &'a [f32], usize),
    out: *mut f32,
    /// (H, W, H', W').
    size: (usize, usize, usize, usize),
    stride: usize,
    act: Activation,
    /// W vectors of zeros.
    zeros: &'a [f32],
}

impl WithSimd for DepthwiseBlock<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        debug_assert!(S::F32_LANES == BLOCK);
        let (h, w, oh, ow) = self.size;
        let stride = self.stride;
        let (weight, bias, c0) = self.taps;
        let wv = channel_group_taps::<S>(weight, bias, c0);
        let zero = simd.splat_f32s(0.0);
        let x = self.x.as_ptr();
        debug_assert!(self.x.len() == h * w * BLOCK && self.zeros.len() == w * BLOCK);
        for oy in 0..oh {
            let iy0 = (oy * stride) as isize - 1;
            let rows: [*const f32; 3] = std::array::from_fn(|ky| {
                let iy = iy0 + ky as isize;
                if iy >= 0 && (iy as usize) < h {
                    // SAFETY: row iy of the block's input.
                    unsafe { x.add(iy as usize * w * BLOCK) }
                } else {
                    self.zeros.as_ptr()
                }
            });
            // SAFETY: output row oy of the block.
            let dst = unsafe { self.out.add(oy * ow * BLOCK) };
            for ox in 0..ow {
                let ix0 = (ox * stride) as isize - 1;
                let sum = if ix0 >= 0 && ix0 + 2 < w as isize {
                    // SAFETY: columns ix0 .. ix0 + 3 of each row lie inside it.
                    channel_group_output(simd, &wv, |ky, kx| unsafe {
                        load::<S>(rows[ky].add((ix0 as usize + kx) * BLOCK))
                    })
                } else {
                    channel_group_output(simd, &wv, |ky, kx| {
                        let ix = ix0 + kx as isize;
                        if ix >= 0 && (ix as usize) < w {
                            // SAFETY: column ix of the row.
                            unsafe { load::<S>(rows[ky].add(ix as usize * BLOCK)) }
                        } else {
                            zero
                        }
                    })
                };
                // SAFETY: output vector ox of the row.
                unsafe {
                    (dst.add(ox * BLOCK) as *mut S::f32s)
                        .write_unaligned(activate_v(simd, sum, self.act));
                }
            }
        }
    }
}

/// One or two blocks of 8 output channels of a 1x1 convolution over all positions of one image:
/// [`POSITIONS`] positions at a time, each input value broadcast against the blocks' weight
/// vectors.
struct PointwiseBlock<'a> {
    /// The image's input, blocked (C_in / 8 runs of `positions` vectors).
    x: &'a [f32],
    /// Packed weights from the first output block on ((C_in, 8·blocks) for the pair).
    w: &'a [f32],
    /// Bias from the first output channel on.
    b: &'a [f32],
    /// The first output block's run.
    out: *mut f32,
    c_in: usize,
    positions: usize,
    /// The positions computed, start .. end.
    range: (usize, usize),
    /// Output blocks: 1 or 2.
    blocks: usize,
    act: Activation,
}

impl WithSimd for PointwiseBlock<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        debug_assert!(S::F32_LANES == BLOCK);
        let (start, end) = self.range;
        let full = start + (end - start) / POSITIONS * POSITIONS;
        macro_rules! run {
            ($v:literal) => {{
                for q in (start..full).step_by(POSITIONS) {
                    self.block::<S, POSITIONS, $v, 1>(simd, q);
                }
                // Short blocks sum alternate input channels into separate sets, so that at least
                // 8 multiply-adds are in flight (a 7x7 plane's 49th position: one position, two
                // blocks, was two dependency chains).
                match end - full {
                    0 => {}
                    1 => self.block::<S, 1, $v, 4>(simd, full),
                    2 => self.block::<S, 2, $v, 2>(simd, full),
                    3 => self.block::<S, 3, $v, 2>(simd, full),
                    4 => self.block::<S, 4, $v, 1>(simd, full),
                    _ => self.block::<S, 5, $v, 1>(simd, full),
                }
            }};
        }
        if self.blocks == 2 {
            run!(2)
        } else {
            run!(1)
        }
    }
}

impl PointwiseBlock<'_> {
    /// Positions q .. q + P of V output blocks, input channel ci summed into set ci % SETS.
    // Indexed by constants only: iterators made the compiler keep the sums on the stack.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    fn block<S: Simd, const P: usize, const V: usize, const SETS: usize>(&self, simd: S, q: usize) {
        let (c_in, positions) = (self.c_in, self.positions);
        debug_assert!(self.w.len() >= V * c_in * BLOCK && self.b.len() >= V * BLOCK);
        let zero = simd.splat_f32s(0.0);
        // SAFETY: the bias holds V blocks of 8.
        let mut acc: [[[S::f32s; P]; V]; SETS] = std::array::from_fn(|set| {
            std::array::from_fn(|v| {
                [if set == 0 {
                    unsafe { load::<S>(self.b.as_ptr().add(v * BLOCK)) }
                } else {
                    zero
                }; P]
            })
        });
        let w = self.w.as_ptr();
        // SAFETY: q + P ≤ positions, so every x read lies in the image's C_in / 8 runs; the weights
        // hold V blocks of C_in vectors.
        unsafe {
            let mut x = self.x.as_ptr().add(q * BLOCK);
            for cb in 0..c_in / BLOCK {
                for c in 0..BLOCK {
                    let ci = cb * BLOCK + c;
                    let acc = &mut acc[c % SETS];
                    let wv: [S::f32s; V] =
                        std::array::from_fn(|v| load::<S>(w.add((ci * V + v) * BLOCK)));
                    for j in 0..P {
                        let xb = simd.splat_f32s(*x.add(j * BLOCK + c));
                        for v in 0..V {
                            acc[v][j] = simd.mul_add_f32s(xb, wv[v], acc[v][j]);
                        }
                    }
                }
                x = x.add(positions * BLOCK);
            }
            for set in 1..SETS {
                for v in 0..V {
                    for j in 0..P {
                        acc[0][v][j] = simd.add_f32s(acc[0][v][j], acc[set][v][j]);
                    }
                }
            }
            let acc = &acc[0];
            for v in 0..V {
                for j in 0..P {
                    let dst = self.out.add((v * positions + q + j) * BLOCK);
                    (dst as *mut S::f32s).write_unaligned(activate_v(simd, acc[v][j], self.act));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The packing of a constant is kept; a variable's is made again on every call, so a value set
    /// under the same id is never read stale.
    #[test]
    fn packed_weights_follow_a_variable() {
        let values = |v: f32| Tensor::full(v, (16, 8, 1, 1), &Device::Cpu).unwrap();
        let cache = PackedPointwise::default();
        let constant = values(1.0);
        let first = cache.get(&constant).unwrap();
        assert!(Arc::ptr_eq(&first, &cache.get(&constant).unwrap()));
        let var = Var::from_tensor(&values(1.0)).unwrap();
        assert!(cache
            .get(var.as_tensor())
            .unwrap()
            .iter()
            .all(|&w| w == 1.0));
        var.set(&values(2.0)).unwrap();
        assert!(cache
            .get(var.as_tensor())
            .unwrap()
            .iter()
            .all(|&w| w == 2.0));
    }
}
