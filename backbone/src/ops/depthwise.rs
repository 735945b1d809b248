//! Depthwise KxK convolution (groups = input channels, each input channel feeding `multiplier`
//! consecutive output channels) with fused bias and activation, and its backward pass.
//!
//! Every kernel is written once over `pulp::Simd` and runs on the level [`super::simd`] chooses
//! (AVX-512, AVX2, NEON, scalar). Forward with K in {1, 3, 5}, stride 1, and stride 2 without
//! dilation: each output row is computed straight from the input rows, a vector of outputs at a
//! time, one FMA per tap (at stride 2 each pair of kernel columns is one load of twice the lanes
//! split into even and odd lanes in registers); rows in the vertical padding read a zero row and
//! vectors that cross a row end use masked loads (masked lanes read 0). Everything else (other
//! strides, dilated stride 2, other kernels, very wide planes, backward) copies each plane into a
//! zero-padded buffer split into stride×stride phases, so that every tap reads a contiguous run of
//! the buffer for consecutive outputs of a row. On AVX2, narrow 3x3 planes run 8 channels at a
//! time on a transposed, channels-last copy instead ([`ChannelGroups`]).

use super::pointwise::{panel_offset, panel_stride, panels_len, PANEL};
use super::simd::{
    activate_v, deinterleave, dispatch, dispatch_8_lanes, lanes_in, load, neighbours, simd_level,
    store_first, transpose8, vectorized, SimdLevel,
};
use super::{
    activate, cpu_slice, output_size, pre_activation_grad, with_cpu_slices, Activation, Geometry,
    SendPtr,
};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use pulp::{MemMask, Simd, WithSimd};
use rayon::prelude::*;
use std::cell::RefCell;

/// Extra buffer elements so a full vector load (up to 16 lanes) at the end of the last row stays in
/// bounds.
const SLACK: usize = 16;
/// A row of zeros that the direct kernels read in place of rows in the vertical padding.
static ZEROS: [f32; MAX_DIRECT_WIDTH] = [0.0; MAX_DIRECT_WIDTH];
/// Widest plane the direct kernels read in place (wider ones use the padded copy).
pub(super) const MAX_DIRECT_WIDTH: usize = 4096;
/// Smallest number of outputs one rayon task should compute, so tiny planes are batched.
const MIN_TASK_OUTPUTS: usize = 4096;

thread_local! {
    /// Per-task scratch: the padded input plane or a kernel's mask table (and, in backward, the
    /// padded input gradient), reused across calls.
    static BUFFERS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Where a depthwise convolution writes its output planes: NCHW, or position panels (the layout
/// [`super::panels`] hands to the 1x1 kernel: per image, each run of [`PANEL`] positions of every
/// channel, channel after channel).
#[derive(Clone, Copy)]
pub(super) struct OutPlanes {
    pub ptr: *mut f32,
    /// Positions per output plane.
    pub plane_out: usize,
    /// The channels per image when the output is in panels.
    pub panels: Option<usize>,
}

// SAFETY: tasks write disjoint planes through it.
unsafe impl Send for OutPlanes {}
unsafe impl Sync for OutPlanes {}

impl OutPlanes {
    /// Position `q` of output plane `p` (counted over the batch: image · C + channel).
    ///
    /// # Safety
    /// `p` and `q` lie inside the output.
    #[inline(always)]
    unsafe fn at(&self, p: usize, q: usize) -> *mut f32 {
        match self.panels {
            None => self.ptr.add(p * self.plane_out + q),
            Some(channels) => {
                let (image, channel) = (p / channels, p % channels);
                let image_len = panels_len(channels, self.plane_out);
                self.ptr
                    .add(image * image_len + channel * PANEL + self.offset(q))
            }
        }
    }

    /// Offset of position `q` of a plane from its position 0.
    #[inline(always)]
    fn offset(&self, q: usize) -> usize {
        match self.panels {
            None => q,
            Some(channels) => panel_offset(q, panel_stride(channels)),
        }
    }
}

/// Depthwise convolution of x (N, C, H, W) (weight (C·M, 1, K, K), bias (C·M), geometry `layout`)
/// into `out`: tasks of whole planes, tiny planes batched, but at least two tasks per thread; whole
/// groups of channels for the channel-group kernel.
pub(super) fn forward(
    layout: &PlaneLayout,
    (x, w, b): (&[f32], &[f32], &[f32]),
    act: Activation,
    (n, c, multiplier): (usize, usize, usize),
    out: OutPlanes,
) {
    let plane_out = layout.out_height * layout.out_width;
    let planes = n * c * multiplier;
    let by_groups = ChannelGroups::applies(layout, multiplier, c);
    let quantum = if by_groups { CHANNEL_GROUP } else { 1 };
    let group = MIN_TASK_OUTPUTS
        .div_ceil(plane_out)
        .min(planes.div_ceil(2 * rayon::current_num_threads()))
        .next_multiple_of(quantum)
        .max(quantum);
    (0..planes.div_ceil(group))
        .into_par_iter()
        .for_each(|task| {
            let first = task * group;
            let count = group.min(planes - first);
            if by_groups {
                dispatch_8_lanes(ChannelGroups {
                    l: layout,
                    x,
                    w,
                    b,
                    act,
                    channels: c,
                    first,
                    count,
                    out,
                })
                .expect("an AVX2 or AVX-512 level");
            } else {
                let channels = (c, multiplier);
                forward_planes(layout, (x, w, b), act, channels, (first, count), out);
            }
        });
}

/// Whether [`forward`] can write this layer's output (one output channel per input channel, `c`
/// of them) in panels: on the kernels that store each vector straight into its panel, the
/// channel-group kernel and the 3x3 stride-1 plane kernel.
pub(super) fn writes_panels(layout: &PlaneLayout, c: usize) -> bool {
    ChannelGroups::applies(layout, 1, c) || slides_3x3(layout)
}

/// Whether the plane kernels run the layer on [`Slide3`]: 3x3, stride 1, padding 1, no dilation
/// (an output plane the size of the input).
fn slides_3x3(l: &PlaneLayout) -> bool {
    l.kernel == 3
        && l.stride == 1
        && l.padding == 1
        && l.dilation == 1
        && (l.out_height, l.out_width) == (l.height, l.width)
}

/// Depthwise convolution of x (N, C, H, W) with weight (C·M, 1, K, K) and bias (C·M): output channel
/// o reads input channel o / M.
pub(super) struct DepthwiseConv(pub(super) Geometry);

/// Where each input value of a plane lands in the padded, phase-split buffer.
pub(super) struct PlaneLayout {
    height: usize,
    width: usize,
    stride: usize,
    padding: usize,
    /// Zero rows above the plane's first row (`padding`, except for a band of a taller plane whose
    /// rows above are in the band itself).
    top: usize,
    dilation: usize,
    kernel: usize,
    pub(super) out_height: usize,
    pub(super) out_width: usize,
    phase_height: usize,
    phase_width: usize,
    /// Buffer offset of tap (ky, kx), row-major over the kernel.
    taps: Vec<usize>,
    /// Per phase column: the input columns ix0, ix0 + stride, … (`count` of them) land at
    /// columns j0, j0 + 1, … of every row of that phase.
    phase_columns: Vec<PhaseColumns>,
}

#[derive(Clone, Copy)]
struct PhaseColumns {
    ix0: usize,
    count: usize,
    j0: usize,
}

impl PlaneLayout {
    pub(super) fn new(height: usize, width: usize, kernel: usize, g: &Geometry) -> Result<Self> {
        let out_height = output_size(height, kernel, g)?;
        let out_width = output_size(width, kernel, g)?;
        let s = g.stride;
        let phase_height = (height + 2 * g.padding).div_ceil(s);
        let phase_width = (width + 2 * g.padding).div_ceil(s);
        let phase_len = phase_height * phase_width;
        let mut taps = Vec::with_capacity(kernel * kernel);
        for ky in 0..kernel {
            for kx in 0..kernel {
                let (dy, dx) = (ky * g.dilation, kx * g.dilation);
                let phase = (dy % s) * s + dx % s;
                taps.push(phase * phase_len + (dy / s) * phase_width + dx / s);
            }
        }
        let phase_columns = (0..s)
            .map(|phase_x| {
                let ix0 = (phase_x + s - g.padding % s) % s;
                PhaseColumns {
                    ix0: ix0.min(width),
                    count: width.saturating_sub(ix0).div_ceil(s),
                    j0: ((ix0 + g.padding) / s).min(phase_width),
                }
            })
            .collect();
        Ok(Self {
            height,
            width,
            stride: s,
            padding: g.padding,
            top: g.padding,
            dilation: g.dilation,
            kernel,
            out_height,
            out_width,
            phase_height,
            phase_width,
            taps,
            phase_columns,
        })
    }

    fn buffer_len(&self) -> usize {
        self.stride * self.stride * self.phase_height * self.phase_width + SLACK
    }

    /// Start of padded row `py` of phase column `px % stride`, i.e. the index of (py, px) minus px / stride.
    fn row_start(&self, py: usize, phase_x: usize) -> usize {
        let s = self.stride;
        ((py % s) * s + phase_x) * self.phase_height * self.phase_width
            + (py / s) * self.phase_width
    }

    /// Calls `f(plane_index, buffer_index)` for each run of one input row that is contiguous in
    /// the buffer: `f(row_in_plane_start, buffer_start, count)` with plane step `stride`.
    fn for_each_run(&self, mut f: impl FnMut(usize, usize, usize)) {
        let (s, p) = (self.stride, self.padding);
        for iy in 0..self.height {
            for phase_x in 0..s {
                // First column ix with (ix + p) % s == phase_x.
                let ix0 = (phase_x + s - p % s) % s;
                if ix0 >= self.width {
                    continue;
                }
                let count = (self.width - ix0).div_ceil(s);
                let start = self.row_start(iy + p, phase_x) + (ix0 + p) / s;
                f(iy * self.width + ix0, start, count);
            }
        }
    }

    /// Zero-pads and phase-splits `plane` (H*W) into `buf`, writing each buffer element once.
    #[inline(always)]
    fn scatter(&self, plane: &[f32], buf: &mut [f32]) {
        let (s, p, pw) = (self.stride, self.padding, self.phase_width);
        let phase_len = self.phase_height * pw;
        for phase_y in 0..s {
            for i in 0..self.phase_height {
                let source = (i * s + phase_y)
                    .checked_sub(p)
                    .filter(|&iy| iy < self.height)
                    .map(|iy| &plane[iy * self.width..(iy + 1) * self.width]);
                for (phase_x, cols) in self.phase_columns.iter().enumerate() {
                    let start = (phase_y * s + phase_x) * phase_len + i * pw;
                    let dst = &mut buf[start..start + pw];
                    let Some(src) = source else {
                        dst.fill(0.0);
                        continue;
                    };
                    let (j0, j1) = (cols.j0, cols.j0 + cols.count);
                    dst[..j0].fill(0.0);
                    copy_strided(&src[cols.ix0..], s, &mut dst[j0..j1]);
                    dst[j1..].fill(0.0);
                }
            }
        }
    }

    /// Inverse of [`scatter`](Self::scatter): reads the unpadded plane back out of `buf`.
    fn gather(&self, buf: &[f32], plane: &mut [f32]) {
        let s = self.stride;
        self.for_each_run(|dst, src, count| {
            if s == 1 {
                plane[dst..dst + count].copy_from_slice(&buf[src..src + count]);
            } else {
                for (v, d) in buf[src..src + count]
                    .iter()
                    .zip(plane[dst..].iter_mut().step_by(s))
                {
                    *d = *v;
                }
            }
        });
    }
}

/// `dst[j] = src[j * step]`.
#[inline(always)]
pub(super) fn copy_strided(src: &[f32], step: usize, dst: &mut [f32]) {
    match step {
        1 => dst.copy_from_slice(&src[..dst.len()]),
        // By pairs, so the compiler emits even-lane shuffles where a SIMD level is active.
        2 => {
            let pairs = dst.len().min(src.len() / 2);
            for (d, pair) in dst[..pairs].iter_mut().zip(src.chunks_exact(2)) {
                *d = pair[0];
            }
            if pairs < dst.len() && src.len() % 2 == 1 {
                dst[pairs] = src[src.len() - 1];
            }
        }
        _ => {
            for (d, v) in dst.iter_mut().zip(src.iter().step_by(step)) {
                *d = *v;
            }
        }
    }
}

/// Output plane from a scattered input plane for kernels without a SIMD kernel (other than 1, 3,
/// 5): `out[oy*OW+ox] = act(bias + Σ_t w[t]·buf[tap_t + oy*PW + ox])`.
fn forward_plane(
    l: &PlaneLayout,
    buf: &[f32],
    weights: &[f32],
    bias: f32,
    act: Activation,
    out: &mut [f32],
) {
    debug_assert!(buf.len() >= l.buffer_len() && out.len() == l.out_height * l.out_width);
    for oy in 0..l.out_height {
        let row = &buf[oy * l.phase_width..];
        for (ox, o) in out[oy * l.out_width..(oy + 1) * l.out_width]
            .iter_mut()
            .enumerate()
        {
            let mut acc = bias;
            for (&tap, &w) in l.taps.iter().zip(weights) {
                acc += w * row[tap + ox];
            }
            *o = activate(acc, act);
        }
    }
}

/// Output planes `first ..` (as many as `out` holds) of the batch, each computed by the kernel
/// `P` from its input plane.
struct Planes<'a, P> {
    l: &'a PlaneLayout,
    x: &'a [f32],
    w: &'a [f32],
    b: &'a [f32],
    act: Activation,
    /// Input channels and output channels per input channel.
    channels: (usize, usize),
    /// First output plane of the task, and how many.
    first: usize,
    count: usize,
    out: OutPlanes,
    kernel: std::marker::PhantomData<P>,
}

/// A kernel that computes one output plane from its unpadded input plane (`buf`: scratch space,
/// filled by `prepare` once per task of planes, before the first).
trait PlaneKernel {
    /// Whether the kernel writes its output straight into panels (`PlaneArgs::panels`).
    const PANELS: bool = false;
    #[inline(always)]
    fn prepare<S: Simd>(_: S, _: &PlaneLayout, _: &mut Vec<f32>) {}
    fn run<S: Simd>(simd: S, args: PlaneArgs, buf: &mut Vec<f32>);
}

impl PlaneKernel for Slide3<'_> {
    const PANELS: bool = true;

    /// The column masks of the vectors of a plane, which repeat every `period` vectors.
    #[inline(always)]
    fn prepare<S: Simd>(simd: S, l: &PlaneLayout, buf: &mut Vec<f32>) {
        let period = column_period::<S>(l.width);
        table_resize::<[S::m32s; 2]>(buf, period);
        let (first, last) = (simd.splat_f32s(0.5), simd.splat_f32s(l.width as f32 - 1.5));
        let mut columns = LaneColumns::new(simd, l.width);
        for k in 0..period {
            let masks = [
                simd.greater_than_f32s(columns.col, first),
                simd.less_than_f32s(columns.col, last),
            ];
            table_set(buf, k, masks);
            columns.advance();
        }
    }

    #[inline(always)]
    fn run<S: Simd>(simd: S, args: PlaneArgs, buf: &mut Vec<f32>) {
        Slide3(args, buf).with_simd(simd)
    }
}

/// Vectors after which the lane columns of a plane W wide, flattened, repeat: `W / gcd(W, lanes)`.
fn column_period<S: Simd>(width: usize) -> usize {
    let (mut a, mut b) = (width, S::F32_LANES);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    width / a
}

/// f32 words one entry of type `T` (an array of SIMD masks) takes in a task's scratch buffer, the
/// mask tables that [`PlaneKernel::prepare`] builds.
fn table_words<T>() -> usize {
    std::mem::size_of::<T>().div_ceil(4)
}

/// Makes `buf` exactly `entries` entries of `T` long.
fn table_resize<T>(buf: &mut Vec<f32>, entries: usize) {
    buf.resize(entries * table_words::<T>(), 0.0);
}

/// Entries of `T` in the table.
fn table_len<T>(buf: &[f32]) -> usize {
    buf.len() / table_words::<T>()
}

/// Stores entry `i` (panics past the table's end).
#[inline(always)]
fn table_set<T: Copy>(buf: &mut [f32], i: usize, value: T) {
    let words = table_words::<T>();
    let slot = &mut buf[i * words..(i + 1) * words];
    // SAFETY: the slot holds size_of::<T>() bytes; T is plain data (SIMD masks).
    unsafe { (slot.as_mut_ptr() as *mut T).write_unaligned(value) }
}

/// Entry `i`, as [`table_set`] stored it.
///
/// # Safety
/// `i < table_len::<T>(buf)`, and the entry was stored as a `T`.
#[inline(always)]
unsafe fn table_get<T: Copy>(buf: &[f32], i: usize) -> T {
    debug_assert!(i < table_len::<T>(buf));
    (buf.as_ptr().add(i * table_words::<T>()) as *const T).read_unaligned()
}

impl<const K: usize, const T: usize> PlaneKernel for Flat<'_, K, T> {
    #[inline(always)]
    fn run<S: Simd>(simd: S, args: PlaneArgs, _: &mut Vec<f32>) {
        Flat::<K, T>(args).with_simd(simd)
    }
}

impl<const K: usize, const T: usize, const STRIDE: usize> PlaneKernel for Rows<'_, K, T, STRIDE> {
    /// The load masks of the vectors that reach past a row's ends ([`RowVectors`]), the same in
    /// every row of every plane of the task.
    #[inline(always)]
    fn prepare<S: Simd>(simd: S, l: &PlaneLayout, buf: &mut Vec<f32>) {
        let rv = RowVectors::new::<S, K, STRIDE>(l);
        table_resize::<[S::m32s; ROW_LOADS]>(buf, rv.edges());
        for v in (0..rv.head).chain(rv.tail..rv.count) {
            let masks: [S::m32s; ROW_LOADS] = std::array::from_fn(|j| {
                lanes_in(simd, rv.load_column::<S, STRIDE>(v, j), l.width as isize).mask()
            });
            table_set(buf, rv.entry(v), masks);
        }
    }

    #[inline(always)]
    fn run<S: Simd>(simd: S, args: PlaneArgs, buf: &mut Vec<f32>) {
        Rows::<K, T, STRIDE>(args, buf).with_simd(simd)
    }
}

/// Loads per kernel row of one vector of [`Rows`] outputs, at most: K at stride 1, two per pair
/// of kernel columns at stride 2 (K ≤ 5).
const ROW_LOADS: usize = 6;

/// The vectors of an output row of [`Rows`]: `count` in all, those before `head` and from `tail`
/// on read past the row's ends (masked loads), those between only inside it.
struct RowVectors {
    count: usize,
    head: usize,
    tail: usize,
    padding: isize,
    /// Dilation (a constant 1 at stride 2, so that kernel's indexing folds).
    dilation: usize,
}

impl RowVectors {
    #[inline(always)]
    fn new<S: Simd, const K: usize, const STRIDE: usize>(l: &PlaneLayout) -> Self {
        let lanes = S::F32_LANES;
        let dilation = if STRIDE == 1 { l.dilation } else { 1 };
        // Input columns one vector of outputs reads, from its first tap: at stride 2 up to the
        // end of the last pair's load.
        let span = if STRIDE == 1 {
            lanes + (K - 1) * dilation
        } else {
            2 * ((K - 1) / 2) + 2 * lanes
        };
        let count = l.out_width.div_ceil(lanes);
        let mut rv = RowVectors {
            count,
            head: count,
            tail: count,
            padding: l.padding as isize,
            dilation,
        };
        let first = |v: usize| rv.first_column::<S, STRIDE>(v);
        let head = (0..count).find(|&v| first(v) >= 0).unwrap_or(count);
        let tail = (head..count)
            .find(|&v| first(v) + span as isize > l.width as isize)
            .unwrap_or(count);
        (rv.head, rv.tail) = (head, tail);
        rv
    }

    /// Input column of vector `v`'s first tap.
    #[inline(always)]
    fn first_column<S: Simd, const STRIDE: usize>(&self, v: usize) -> isize {
        (STRIDE * v * S::F32_LANES) as isize - self.padding
    }

    /// Input column where vector `v`'s load `j` of a kernel row starts: kernel column kx = j at
    /// stride 1; at stride 2 the pair of columns from 2·(j / 2), its first (even j) or second
    /// (odd j) vector.
    #[inline(always)]
    fn load_column<S: Simd, const STRIDE: usize>(&self, v: usize, j: usize) -> isize {
        let first = self.first_column::<S, STRIDE>(v);
        if STRIDE == 1 {
            first + (j * self.dilation) as isize
        } else {
            first + (2 * (j / 2) + (j % 2) * S::F32_LANES) as isize
        }
    }

    /// Vectors with masks.
    fn edges(&self) -> usize {
        self.head + self.count - self.tail
    }

    /// Entry of edge vector `v` in the mask table.
    fn entry(&self, v: usize) -> usize {
        if v < self.head {
            v
        } else {
            v - self.tail + self.head
        }
    }
}

impl<const T: usize> PlaneKernel for Phased<'_, T> {
    /// Scatters the plane into the padded, phase-split buffer first.
    #[inline(always)]
    fn run<S: Simd>(simd: S, args: PlaneArgs, buf: &mut Vec<f32>) {
        buf.resize(args.l.buffer_len(), 0.0);
        args.l.scatter(args.input, buf);
        Phased::<T>(PlaneArgs { input: buf, ..args }).with_simd(simd)
    }
}

/// Kernels without a SIMD form (other than 1, 3 and 5): [`forward_plane`] on the padded copy.
struct Generic;

impl PlaneKernel for Generic {
    #[inline(always)]
    fn run<S: Simd>(_: S, args: PlaneArgs, buf: &mut Vec<f32>) {
        buf.resize(args.l.buffer_len(), 0.0);
        args.l.scatter(args.input, buf);
        forward_plane(args.l, buf, args.weights, args.bias, args.act, args.out)
    }
}

impl<P: PlaneKernel> WithSimd for Planes<'_, P> {
    type Output = ();

    /// One SIMD dispatch for the whole group: with 7x7 planes the per-plane work is ~100 cycles.
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let (c, multiplier) = self.channels;
        let c_out = c * multiplier;
        let (plane_in, plane_out) = (
            self.l.height * self.l.width,
            self.l.out_height * self.l.out_width,
        );
        let taps = self.l.kernel * self.l.kernel;
        // Taken out of the thread-local for the group: a closure would not inherit the SIMD
        // level's target features, and the kernels inside it would call their intrinsics.
        let mut buf = BUFFERS.with_borrow_mut(|(buf, _)| std::mem::take(buf));
        P::prepare(simd, self.l, &mut buf);
        assert!(
            self.out.panels.is_none() || P::PANELS,
            "depthwise: this plane kernel cannot write panels"
        );
        for p in self.first..self.first + self.count {
            let (image, co) = (p / c_out, p % c_out);
            let input = image * c + co / multiplier;
            // SAFETY: plane p is this task's.
            let (out, panels) = match self.out.panels {
                None => (
                    unsafe { std::slice::from_raw_parts_mut(self.out.at(p, 0), plane_out) },
                    None,
                ),
                Some(channels) => (
                    &mut [][..],
                    Some((unsafe { self.out.at(p, 0) }, panel_stride(channels))),
                ),
            };
            P::run(
                simd,
                PlaneArgs {
                    l: self.l,
                    input: &self.x[input * plane_in..(input + 1) * plane_in],
                    weights: &self.w[co * taps..(co + 1) * taps],
                    bias: self.b[co],
                    act: self.act,
                    out,
                    panels,
                },
                &mut buf,
            );
        }
        BUFFERS.with_borrow_mut(|(slot, _)| *slot = buf);
    }
}

/// Computes output planes `first .. first + count` into `out`, one SIMD dispatch for all of them:
/// strides 1 and 2 straight from the input, other strides (and kernels other than 1, 3 and 5)
/// through the padded, phase-split copy.
fn forward_planes(
    l: &PlaneLayout,
    (x, w, b): (&[f32], &[f32], &[f32]),
    act: Activation,
    channels: (usize, usize),
    (first, count): (usize, usize),
    out: OutPlanes,
) {
    macro_rules! run {
        ($kernel:ty) => {
            dispatch(Planes::<$kernel> {
                l,
                x,
                w,
                b,
                act,
                channels,
                first,
                count,
                out,
                kernel: std::marker::PhantomData,
            })
        };
    }
    let same = l.out_height == l.height && l.out_width == l.width;
    // The flattened kernel reads any width; the row kernel reads rows of ZEROS in the padding.
    let flat = l.stride == 1 && same;
    let direct = l.width <= MAX_DIRECT_WIDTH && (l.stride == 1 || l.dilation == 1);
    match (l.kernel, l.stride, flat, direct) {
        (1, 1, true, _) => run!(Flat<1, 1>),
        (3, 1, true, _) if slides_3x3(l) => run!(Slide3),
        (3, 1, true, _) => run!(Flat<3, 9>),
        (5, 1, true, _) => run!(Flat<5, 25>),
        (1, 1, false, true) => run!(Rows<1, 1, 1>),
        (3, 1, false, true) => run!(Rows<3, 9, 1>),
        (5, 1, false, true) => run!(Rows<5, 25, 1>),
        (1, 2, _, true) => run!(Rows<1, 1, 2>),
        (3, 2, _, true) => run!(Rows<3, 9, 2>),
        (5, 2, _, true) => run!(Rows<5, 25, 2>),
        (1, _, _, _) => run!(Phased<1>),
        (3, _, _, _) => run!(Phased<9>),
        (5, _, _, _) => run!(Phased<25>),
        _ => run!(Generic),
    }
}

/// Stride-1 KxK plane with "same" padding (output size = input size) computed over the plane
/// flattened to one row of H·W values: a tap is then one offset for every output, `(ky·d - p)·W +
/// kx·d - p`, so vectors run across row ends and every lane is used (a 14-wide row would fill 14 of
/// 16 lanes, a 7-wide one 7). Lanes whose tap column falls outside the image are masked by the
/// column of each lane (kept as a vector, advanced by the vector length modulo W); taps above or
/// below the plane fall outside the flattened range and are masked by it.
struct Flat<'a, const K: usize, const T: usize>(PlaneArgs<'a>);

impl<const K: usize, const T: usize> WithSimd for Flat<'_, K, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let PlaneArgs {
            l,
            input: plane,
            weights,
            bias,
            act,
            out,
            ..
        } = self.0;
        let (h, w, p, d) = (l.height, l.width, l.padding as isize, l.dilation as isize);
        let len = (h * w) as isize;
        debug_assert!(plane.len() == h * w && out.len() == h * w && weights.len() == T);
        let lanes = S::F32_LANES as isize;
        let wi = w as isize;
        // Column shift of each kernel column; lanes at column c read column c + shift.
        let shift: [isize; K] = std::array::from_fn(|kx| kx as isize * d - p);
        let flat = FlatPlane::<S, K, T> {
            simd,
            plane: plane.as_ptr(),
            len,
            wv: std::array::from_fn(|t| simd.splat_f32s(weights[t])),
            bias: simd.splat_f32s(bias),
            offsets: std::array::from_fn(|t| {
                let (ky, kx) = ((t / K) as isize, t % K);
                (ky * d - p) * wi + shift[kx]
            }),
            low: std::array::from_fn(|kx| simd.splat_f32s(-shift[kx] as f32)),
            high: std::array::from_fn(|kx| simd.splat_f32s((wi - shift[kx]) as f32)),
            act,
        };
        // Vectors whose every tap lies inside the flattened plane need no range check, only the
        // column masks: from the first vector at or past the most negative offset, up to the last
        // that the most positive one keeps inside.
        let (first_tap, last_tap) = (
            flat.offsets.iter().min().copied().unwrap_or(0),
            flat.offsets.iter().max().copied().unwrap_or(0),
        );
        let interior_start =
            ((-first_tap).max(0) as usize).next_multiple_of(lanes as usize) as isize;
        // Inclusive; below interior_start (so no vector is interior) when the plane is too short.
        let interior_end = len - last_tap - lanes;
        let mut columns = LaneColumns::new(simd, w);
        let mut q = 0isize;
        while q < len {
            let acc = if q >= interior_start && q <= interior_end {
                flat.vector::<false>(q, columns.col)
            } else {
                flat.vector::<true>(q, columns.col)
            };
            // SAFETY: outputs q .. min(q + lanes, H·W) exist.
            unsafe {
                store_first::<S>(simd, out.as_mut_ptr().offset(q), (len - q) as usize, acc);
            }
            columns.advance();
            q += lanes;
        }
    }
}

/// [`Flat`] for the 3x3 kernel with padding 1 (no dilation), reading each input vector once: the
/// three rows a vector of outputs reads (the flattened plane at −W, 0 and +W) are each one load
/// per step, slid along as the window moves, and the left and right taps are those loads moved by
/// one lane in registers, instead of nine unaligned masked loads. The taps left of column 0 and
/// right of column W−1 are dropped by one select per side on their summed contributions, with the
/// masks of each vector's lane columns read from the table that [`PlaneKernel::prepare`] built for
/// the task (the second field), since they repeat every W / gcd(W, lanes) vectors.
struct Slide3<'a>(PlaneArgs<'a>, &'a [f32]);

impl WithSimd for Slide3<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let PlaneArgs {
            l,
            input: plane,
            weights,
            bias,
            act,
            out,
            panels,
        } = self.0;
        let masks = self.1;
        let (h, w) = (l.height, l.width);
        debug_assert!(l.kernel == 3 && l.padding == 1 && l.dilation == 1 && l.stride == 1);
        debug_assert!(plane.len() == h * w && weights.len() == 9);
        debug_assert!(out.len() == h * w || panels.is_some() && S::F32_LANES <= PANEL);
        let len = (h * w) as isize;
        let lanes = S::F32_LANES as isize;
        let wv: [S::f32s; 9] = std::array::from_fn(|t| simd.splat_f32s(weights[t]));
        let b = simd.splat_f32s(bias);
        let rows: [isize; 3] = [-(w as isize), 0, w as isize];
        // No closure: it would lose the level's target features and call its intrinsics.
        let read = plane.as_ptr();
        let mut prev = [simd.splat_f32s(0.0); 3];
        let mut cur = prev;
        for r in 0..3 {
            prev[r] = read_flat(simd, read, rows[r] - lanes, len, true);
            cur[r] = read_flat(simd, read, rows[r], len, true);
        }
        // Steps whose next loads (q + lanes ± W .. q + 2·lanes ± W) all lie inside the plane.
        let (interior_start, interior_end) = (w as isize - lanes, len - w as isize - 2 * lanes);
        // The column masks of vector k (Slide3::prepare), cycling with the table's period.
        let period = table_len::<[S::m32s; 2]>(masks);
        debug_assert!(period == column_period::<S>(w));
        let mut k = 0;
        let zero = simd.splat_f32s(0.0);
        // One step: the vector of outputs at q. `$check` is a literal, so the interior loop below
        // compiles without any range test (one loop with a run-time flag kept them all, ~75
        // instructions per AVX2 vector), and `$act` one, so the activation is not a branch.
        macro_rules! step {
            ($q:expr, $check:expr, $act:expr) => {
                let q: isize = $q;
                let mut sums = [zero, b, zero];
                for r in 0..3 {
                    let next = read_flat(simd, read, q + lanes + rows[r], len, $check);
                    let (left, right) = neighbours(simd, prev[r], cur[r], next);
                    sums[0] = simd.mul_add_f32s(wv[3 * r], left, sums[0]);
                    sums[1] = simd.mul_add_f32s(wv[3 * r + 1], cur[r], sums[1]);
                    sums[2] = simd.mul_add_f32s(wv[3 * r + 2], right, sums[2]);
                    prev[r] = cur[r];
                    cur[r] = next;
                }
                // SAFETY: k < period, the table's length.
                let [has_left, has_right]: [S::m32s; 2] = unsafe { table_get(masks, k) };
                k = if k + 1 == period { 0 } else { k + 1 };
                let acc = simd.add_f32s(
                    sums[1],
                    simd.add_f32s(
                        simd.select_f32s(has_left, sums[0], zero),
                        simd.select_f32s(has_right, sums[2], zero),
                    ),
                );
                let acc = activate_v(simd, acc, $act);
                // SAFETY: outputs q .. min(q + lanes, H·W) exist (all `lanes` in the interior); a
                // vector from a multiple of its lanes stays inside one run of PANEL.
                unsafe {
                    let dst = match panels {
                        None => out.as_mut_ptr().offset(q),
                        Some((start, run)) => start.add(panel_offset(q as usize, run)),
                    };
                    if $check {
                        store_first::<S>(simd, dst, (len - q) as usize, acc);
                    } else {
                        (dst as *mut S::f32s).write_unaligned(acc);
                    }
                }
            };
        }
        let mut q = 0isize;
        while q < len && q < interior_start {
            step!(q, true, act);
            q += lanes;
        }
        macro_rules! interior {
            ($act:expr) => {
                while q <= interior_end {
                    step!(q, false, $act);
                    q += lanes;
                }
            };
        }
        match act {
            Activation::None => interior!(Activation::None),
            Activation::Relu => interior!(Activation::Relu),
            Activation::Relu6 => interior!(Activation::Relu6),
        }
        while q < len {
            step!(q, true, act);
            q += lanes;
        }
    }
}

/// Channels per group of [`ChannelGroups`] (and of the channels-last stem): the lanes of an AVX2
/// vector.
pub(super) const CHANNEL_GROUP: usize = 8;

/// A channel group's output vectors of 8 consecutive positions (at `src`, a vector of the 8
/// channels per position) transposed into runs of positions, the first `count` (at most 8 stored)
/// of channel i's run at `dst[i]`.
///
/// # Safety
/// `src` holds 8 vectors and each `dst[i]` min(count, 8) writable values.
#[inline(always)]
pub(super) unsafe fn store_channel_runs<S: Simd>(
    simd: S,
    src: *const f32,
    dst: [*mut f32; CHANNEL_GROUP],
    count: usize,
) {
    let vectors: [S::f32s; CHANNEL_GROUP] =
        std::array::from_fn(|j| load::<S>(src.add(j * CHANNEL_GROUP)));
    for (run, dst) in transpose8(simd, vectors).into_iter().zip(dst) {
        store_first::<S>(simd, dst, count, run);
    }
}

/// The 3x3 weights (C, 9) and the biases of channels `c0 .. c0 + 8` as vectors of the 8 channels, a
/// vector per tap and the biases last: what a channel-group kernel multiplies each output vector's
/// nine input vectors by (on a level of 8 lanes).
#[inline(always)]
pub(super) fn channel_group_taps<S: Simd>(w: &[f32], b: &[f32], c0: usize) -> [S::f32s; 10] {
    debug_assert!(S::F32_LANES == CHANNEL_GROUP);
    let mut values = [[0f32; CHANNEL_GROUP]; 10];
    for (i, c) in (c0..c0 + CHANNEL_GROUP).enumerate() {
        for (tap, values) in values[..9].iter_mut().enumerate() {
            values[i] = w[c * 9 + tap];
        }
        values[9][i] = b[c];
    }
    // SAFETY: 8 values each, the lanes of the level.
    std::array::from_fn(|t| unsafe { load::<S>(values[t].as_ptr()) })
}

/// One output vector of a channel group from `tap(ky, kx)`, its input vector under each tap, and
/// [`channel_group_taps`]' vectors: one accumulator per kernel row (three short dependency chains
/// instead of one of nine), summed (row 0 + row 1) + row 2, in the order of the stride-2 plane
/// kernel.
#[inline(always)]
pub(super) fn channel_group_output<S: Simd>(
    simd: S,
    wv: &[S::f32s; 10],
    tap: impl Fn(usize, usize) -> S::f32s,
) -> S::f32s {
    let zero = simd.splat_f32s(0.0);
    let mut rows = [wv[9], zero, zero];
    for kx in 0..3 {
        for (ky, row) in rows.iter_mut().enumerate() {
            *row = simd.mul_add_f32s(wv[ky * 3 + kx], tap(ky, kx), *row);
        }
    }
    simd.add_f32s(simd.add_f32s(rows[0], rows[1]), rows[2])
}

/// Widest input plane [`ChannelGroups`] takes at stride 1 and at stride 2. One thread, batch 8,
/// against the plane kernels (alternating, median of 3): stride 1, 512 channels at 14x14 0.46 ->
/// 0.36 ms, 256 at 20x20 0.41 -> 0.37, 256 at 10x10 0.17 -> 0.13; stride 2, 512 at 14x14 0.41 ->
/// 0.19, 256 at 20x20 0.45 -> 0.20, 128 at 40x40 0.52 -> 0.33, 96 at 56x56 0.65 -> 0.60. Wider,
/// the plane kernels win: stride 1 at 28x28 (192 channels, two threads, 0.28 against 0.32 ms)
/// and 56x56, stride 2 at 112x112 (48 channels 0.57 against 0.73).
const CHANNEL_GROUP_MAX_WIDTH: [usize; 2] = [20, 56];
/// Widest input plane [`ChannelGroups`] takes at stride 2 on the AVX-512 level, against its 16-lane
/// plane kernel: S0 and S1 on one thread (4 alternating rounds, per layer) 256 at 14x14 0.022 ->
/// 0.011 ms, 512 at 14x14 0.044 -> 0.035, 128 at 28x28 0.022 -> 0.019, 192 at 28x28 0.034 -> 0.029;
/// 96 at 56x56 0.057 -> 0.062 (48 level).
const CHANNEL_GROUP_MAX_WIDTH_AVX512: usize = 28;

/// 3x3 depthwise convolution (padding 1, stride 1 or 2, no dilation) of 8 channels at a time on
/// AVX2, for narrow planes: the group's input planes are transposed, 8 columns of a row at a
/// time, into one buffer of (H + 2) × (W + 2) vectors of the 8 channels with a zero border (a
/// local channels-last tile), where every output vector is nine multiply-adds with plain loads,
/// and the output vectors are transposed back into the 8 output planes. The plane kernels
/// instead shift lanes in registers to reach each output's neighbours (four shuffles per kernel
/// row on AVX2) and mask the row ends, and at stride 2 split even and odd lanes: on narrow planes
/// that costs more than the transposes. ONNX Runtime's AVX2 NCHWc depthwise kernel works the same
/// way on its blocked layout. In S1 at batch 8 (per-layer timing inside the network, two passes
/// of 40): stride 1 at 14x14 0.26-0.29 -> 0.22-0.23 ms, stride 2 from 14x14 0.28-0.29 -> 0.17,
/// from 28x28 0.25-0.27 -> 0.19-0.20, from 56x56 0.40-0.44 -> 0.33-0.35.
struct ChannelGroups<'a> {
    l: &'a PlaneLayout,
    x: &'a [f32],
    w: &'a [f32],
    b: &'a [f32],
    act: Activation,
    /// Channels per image (a multiple of [`CHANNEL_GROUP`]).
    channels: usize,
    /// First output plane of the task and how many (multiples of [`CHANNEL_GROUP`]).
    first: usize,
    count: usize,
    out: OutPlanes,
}

impl ChannelGroups<'_> {
    /// Whether the layer runs on this kernel: one output channel per input channel, whole groups
    /// of channels, a 3x3 kernel with padding 1 and no dilation; on AVX2 stride 1 or 2 with planes
    /// at most [`CHANNEL_GROUP_MAX_WIDTH`] wide, on AVX-512 (in 8-lane vectors) stride 2 from
    /// planes at most [`CHANNEL_GROUP_MAX_WIDTH_AVX512`] wide.
    fn applies(l: &PlaneLayout, multiplier: usize, channels: usize) -> bool {
        let widest = match simd_level() {
            SimdLevel::Avx2 => CHANNEL_GROUP_MAX_WIDTH[l.stride.clamp(1, 2) - 1],
            SimdLevel::Avx512 if l.stride == 2 => CHANNEL_GROUP_MAX_WIDTH_AVX512,
            _ => 0,
        };
        multiplier == 1
            && channels.is_multiple_of(CHANNEL_GROUP)
            && l.kernel == 3
            && l.padding == 1
            && l.top == 1
            && l.dilation == 1
            && (l.stride == 1 || l.stride == 2)
            && l.width <= widest
    }
}

impl WithSimd for ChannelGroups<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        const G: usize = CHANNEL_GROUP;
        assert!(
            S::F32_LANES == G,
            "the channel-group kernel runs on 8-lane vectors only"
        );
        let l = self.l;
        let (h, w, stride) = (l.height, l.width, l.stride);
        let (oh, ow) = (l.out_height, l.out_width);
        let (plane_in, plane_out) = (h * w, oh * ow);
        // Row stride of the tile, in vectors.
        let tw = w + 2;
        // Taken out of the thread-local: inside its closure the kernel would lose its target
        // features.
        let mut buf = BUFFERS.with_borrow_mut(|(buf, _)| std::mem::take(buf));
        // The output vectors, padded to whole groups of G so that each transpose loads G.
        buf.resize(((h + 2) * tw + plane_out.next_multiple_of(G)) * G, 0.0);
        let (tile, outputs) = buf.split_at_mut((h + 2) * tw * G);
        // The tile's border: its first and last rows, and the first and last column of the others.
        tile[..tw * G].fill(0.0);
        tile[(h + 1) * tw * G..].fill(0.0);
        for y in 1..=h {
            tile[y * tw * G..][..G].fill(0.0);
            tile[(y * tw + w + 1) * G..][..G].fill(0.0);
        }
        let zero = simd.splat_f32s(0.0);
        for plane in (self.first..self.first + self.count).step_by(G) {
            let c0 = plane % self.channels;
            let input = &self.x[plane * plane_in..(plane + G) * plane_in];
            let wv = channel_group_taps::<S>(self.w, self.b, c0);
            // The planes into the tile, G columns of a row at a time (consecutive in the tile).
            for y in 0..h {
                for x0 in (0..w).step_by(G) {
                    let (p, count) = (y * w + x0, (w - x0).min(G));
                    // Columns past the row read the next row (stored nowhere); past the plane, 0.
                    let mask = if p + G > plane_in {
                        Some(lanes_in(simd, 0, (plane_in - p) as isize))
                    } else {
                        None
                    };
                    let mut rows = [zero; G];
                    for (i, row) in rows.iter_mut().enumerate() {
                        // SAFETY: channel i's plane holds positions p .. min(p + G, H·W).
                        *row = unsafe {
                            let src = input.as_ptr().add(i * plane_in + p);
                            match mask {
                                None => load::<S>(src),
                                Some(mask) => simd.mask_load_ptr_f32s(mask, src),
                            }
                        };
                    }
                    let columns = transpose8(simd, rows);
                    // SAFETY: row y + 1, column x0 + 1 of the tile.
                    let dst = unsafe { tile.as_mut_ptr().add(((y + 1) * tw + x0 + 1) * G) };
                    #[allow(clippy::needless_range_loop)]
                    for j in 0..G {
                        if j < count {
                            // SAFETY: columns x0 + j < W of row y + 1 lie inside the tile.
                            unsafe { (dst.add(j * G) as *mut S::f32s).write_unaligned(columns[j]) };
                        }
                    }
                }
            }
            // Nine multiply-adds per output vector; compiled per activation (`$act` a literal), so
            // that it is not a branch per vector.
            macro_rules! outputs {
                ($act:expr) => {{
                    let mut dst = outputs.as_mut_ptr();
                    for oy in 0..oh {
                        let mut at = stride * oy * tw * G;
                        for _ in 0..ow {
                            let src = tile.as_ptr();
                            // SAFETY: rows stride·oy + ky ≤ H + 1 and columns stride·ox + kx ≤
                            // W + 1 of the tile; `outputs` holds plane_out vectors.
                            unsafe {
                                let sum = channel_group_output(simd, &wv, |ky, kx| {
                                    load::<S>(src.add(at + (ky * tw + kx) * G))
                                });
                                (dst as *mut S::f32s).write_unaligned(activate_v(simd, sum, $act));
                                dst = dst.add(G);
                            }
                            at += stride * G;
                        }
                    }
                }};
            }
            match self.act {
                Activation::None => outputs!(Activation::None),
                Activation::Relu => outputs!(Activation::Relu),
                Activation::Relu6 => outputs!(Activation::Relu6),
            }
            // The output vectors back into the group's planes (their starts found once).
            // SAFETY: the group's planes are this task's.
            let starts: [*mut f32; G] =
                std::array::from_fn(|i| unsafe { self.out.at(plane + i, 0) });
            for q in (0..plane_out).step_by(G) {
                let offset = self.out.offset(q);
                // SAFETY: `outputs` holds whole groups of G vectors (those past plane_out are not
                // stored); the group's output planes are this task's, and a run of G positions
                // from a multiple of G stays inside one panel.
                unsafe {
                    store_channel_runs(
                        simd,
                        outputs.as_ptr().add(q * G),
                        std::array::from_fn(|i| starts[i].add(offset)),
                        plane_out - q,
                    )
                };
            }
        }
        BUFFERS.with_borrow_mut(|(slot, _)| *slot = buf);
    }
}

/// The vector at `start` of a flattened plane of `len` values, 0 outside it; unmasked unless
/// `check` (then masked where it reaches outside).
#[inline(always)]
fn read_flat<S: Simd>(
    simd: S,
    plane: *const f32,
    start: isize,
    len: isize,
    check: bool,
) -> S::f32s {
    let src = plane.wrapping_offset(start);
    // SAFETY: only lanes inside the plane are read (the caller clears `check` only for vectors
    // wholly inside it).
    unsafe {
        if check && (start < 0 || start + S::F32_LANES as isize > len) {
            simd.mask_load_ptr_f32s(lanes_in(simd, start, len), src)
        } else {
            load::<S>(src)
        }
    }
}

/// The image column of every lane of a vector walking a plane flattened to one row (W wide), exact
/// in f32 (planes are far narrower than 2^24), for the kernels that mask taps by column.
struct LaneColumns<S: Simd> {
    simd: S,
    /// Column of each lane of the current vector.
    col: S::f32s,
    width: S::f32s,
    /// Lanes per vector modulo W: how far the columns move per vector.
    advance: S::f32s,
}

impl<S: Simd> LaneColumns<S> {
    /// The columns of the vector at the plane's start.
    #[inline(always)]
    fn new(simd: S, width: usize) -> Self {
        let first: [f32; 16] = std::array::from_fn(|i| (i % width) as f32);
        Self {
            simd,
            // SAFETY: 16 ≥ lanes values.
            col: unsafe { load::<S>(first.as_ptr()) },
            width: simd.splat_f32s(width as f32),
            advance: simd.splat_f32s((S::F32_LANES % width) as f32),
        }
    }

    /// Moves to the next vector's columns.
    #[inline(always)]
    fn advance(&mut self) {
        let simd = self.simd;
        let col = simd.add_f32s(self.col, self.advance);
        self.col = simd.select_f32s(
            simd.greater_than_or_equal_f32s(col, self.width),
            simd.sub_f32s(col, self.width),
            col,
        );
    }
}

/// One plane of [`Flat`], ready to compute vectors of outputs.
struct FlatPlane<S: Simd, const K: usize, const T: usize> {
    simd: S,
    plane: *const f32,
    len: isize,
    wv: [S::f32s; T],
    bias: S::f32s,
    /// Flattened offset of tap (ky, kx), row-major over the kernel.
    offsets: [isize; T],
    /// Per kernel column: the lanes whose column c has low ≤ c < high read inside the image.
    low: [S::f32s; K],
    high: [S::f32s; K],
    act: Activation,
}

impl<S: Simd, const K: usize, const T: usize> FlatPlane<S, K, T> {
    /// Activated outputs q .. q + lanes, lane i at column `col[i]`. `CHECK`: some tap may fall
    /// outside the flattened plane (the first and last rows' vectors), so every load is also
    /// masked by that range.
    #[inline(always)]
    fn vector<const CHECK: bool>(&self, q: isize, col: S::f32s) -> S::f32s {
        let simd = self.simd;
        let lanes = S::F32_LANES as isize;
        let mut partial = [simd.splat_f32s(0.0); K];
        partial[0] = self.bias;
        for kx in 0..K {
            let columns = simd.and_m32s(
                simd.greater_than_or_equal_f32s(col, self.low[kx]),
                simd.less_than_f32s(col, self.high[kx]),
            );
            for (ky, partial) in partial.iter_mut().enumerate() {
                let start = q + self.offsets[ky * K + kx];
                let src = self.plane.wrapping_offset(start);
                let inside = if CHECK && (start < 0 || start + lanes > self.len) {
                    simd.and_m32s(columns, lanes_in(simd, start, self.len).mask())
                } else {
                    columns
                };
                // SAFETY: only lanes inside the plane are read.
                let v = unsafe { simd.mask_load_ptr_f32s(pulp::MemMask::new(inside), src) };
                *partial = simd.mul_add_f32s(self.wv[ky * K + kx], v, *partial);
            }
        }
        let mut acc = partial[0];
        for p in &partial[1..] {
            acc = simd.add_f32s(acc, *p);
        }
        activate_v(simd, acc, self.act)
    }
}

/// One output plane's inputs: the input plane (or its padded, phase-split copy), the channel's taps,
/// bias and activation.
struct PlaneArgs<'a> {
    l: &'a PlaneLayout,
    input: &'a [f32],
    weights: &'a [f32],
    bias: f32,
    act: Activation,
    out: &'a mut [f32],
    /// Instead of `out` (then empty), for a kernel that writes panels ([`PlaneKernel::PANELS`]):
    /// position 0 of the plane in panels, and the distance between its runs of [`PANEL`].
    panels: Option<(*mut f32, usize)>,
}

/// KxK plane at stride `STRIDE` (1, or 2 without dilation) read straight from the unpadded input,
/// a vector of outputs at a time: rows outside the plane read a zero row, and vectors that reach
/// past a row's ends use masked loads (masked lanes read 0). At stride 1 each tap is one load and
/// one FMA; at stride 2 the kernel columns kx and kx + 1 of a row are one load of 2·lanes
/// consecutive inputs split in registers into its even lanes (tap kx) and odd lanes (tap kx + 1),
/// so the plane is read once and never copied. `T` = K·K.
struct Rows<'a, const K: usize, const T: usize, const STRIDE: usize>(PlaneArgs<'a>, &'a [f32]);

impl<const K: usize, const T: usize, const STRIDE: usize> WithSimd for Rows<'_, K, T, STRIDE> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let PlaneArgs {
            l,
            input: plane,
            weights,
            bias,
            act,
            out,
            ..
        } = self.0;
        let masks = self.1;
        let (h, w, top) = (l.height, l.width, l.top as isize);
        let rv = RowVectors::new::<S, K, STRIDE>(l);
        let d = rv.dilation;
        let (oh, ow) = (l.out_height, l.out_width);
        debug_assert!(
            l.stride == STRIDE && (STRIDE == 1 || l.dilation == 1) && w <= MAX_DIRECT_WIDTH
        );
        debug_assert!(plane.len() == h * w && out.len() == oh * ow && weights.len() == T);
        let lanes = S::F32_LANES;
        let wv: [S::f32s; T] = std::array::from_fn(|t| simd.splat_f32s(weights[t]));
        let b = simd.splat_f32s(bias);
        debug_assert!(table_len::<[S::m32s; ROW_LOADS]>(masks) == rv.edges());
        // One vector of outputs; `$masks`: None inside the row (plain loads), else the vector's
        // load masks (Rows::prepare).
        macro_rules! step {
            ($rows:expr, $out_row:expr, $v:expr, $masks:expr) => {
                let ox = $v * lanes;
                let masks: Option<[S::m32s; ROW_LOADS]> = $masks;
                // No closure: it would lose the level's target features and call its intrinsics.
                macro_rules! read {
                    ($row:expr, $col:expr, $j:expr) => {{
                        let src = $row.wrapping_offset($col);
                        // SAFETY: `row` holds `w` values (ZEROS is MAX_DIRECT_WIDTH ≥ w long); a
                        // vector reaching past its ends reads only its lanes inside it.
                        unsafe {
                            match masks {
                                None => load::<S>(src),
                                Some(m) => simd.mask_load_ptr_f32s(MemMask::new(m[$j]), src),
                            }
                        }
                    }};
                }
                // One accumulator per kernel row: K short dependency chains instead of one long.
                let mut partial = [simd.splat_f32s(0.0); K];
                partial[0] = b;
                for kx in (0..K).step_by(STRIDE) {
                    let col = rv.load_column::<S, STRIDE>($v, kx);
                    for ky in 0..K {
                        let row = $rows[ky];
                        if STRIDE == 1 {
                            let v = read!(row, col, kx);
                            partial[ky] = simd.mul_add_f32s(wv[ky * K + kx], v, partial[ky]);
                            continue;
                        }
                        let (lo, hi) = (
                            read!(row, col, kx),
                            read!(row, rv.load_column::<S, STRIDE>($v, kx + 1), kx + 1),
                        );
                        let (even, odd) = deinterleave(simd, lo, hi);
                        partial[ky] = simd.mul_add_f32s(wv[ky * K + kx], even, partial[ky]);
                        if kx + 1 < K {
                            partial[ky] = simd.mul_add_f32s(wv[ky * K + kx + 1], odd, partial[ky]);
                        }
                    }
                }
                let mut acc = partial[0];
                for p in &partial[1..] {
                    acc = simd.add_f32s(acc, *p);
                }
                // SAFETY: outputs ox .. min(ox + lanes, ow) of the row exist.
                unsafe {
                    store_first::<S>(
                        simd,
                        $out_row.as_mut_ptr().add(ox),
                        ow - ox,
                        activate_v(simd, acc, act),
                    );
                }
            };
        }
        for oy in 0..oh {
            // Rows in the padding read zeros, so every output sees the same K*K taps.
            let mut rows = [ZEROS.as_ptr(); K];
            for (ky, row) in rows.iter_mut().enumerate() {
                let iy = (STRIDE * oy + ky * d) as isize - top;
                if iy >= 0 && (iy as usize) < h {
                    *row = plane[iy as usize * w..].as_ptr();
                }
            }
            let out_row = &mut out[oy * ow..(oy + 1) * ow];
            for v in (0..rv.head).chain(rv.tail..rv.count) {
                // SAFETY: the table holds an entry for every edge vector.
                let m = unsafe { table_get(masks, rv.entry(v)) };
                step!(rows, out_row, v, Some(m));
            }
            for v in rv.head..rv.tail {
                step!(rows, out_row, v, None);
            }
        }
    }
}

/// Output rows of a 3x3 stride-2 depthwise convolution (padding 1) of every channel from a band of
/// their input rows that already holds the rows above and below in the image (zeros outside it):
/// channel c's `rows` × out_width outputs go to `out.0 + c·out.1`, from its 2·rows + 1 input rows
/// × `width` at `band[c·(2·rows + 1)·width ..]`; weights (C, 9), bias (C). One SIMD dispatch and
/// one layout for all channels (per channel, they cost as much as a 56-wide band's arithmetic).
///
/// # Safety
/// For every channel c, `out.0 + c·out.1 .. + rows·out_width` is writable and written by no other
/// thread meanwhile.
pub(super) unsafe fn strided_band(
    band: &[f32],
    width: usize,
    (weights, bias): (&[f32], &[f32]),
    act: Activation,
    rows: usize,
    out: (*mut f32, usize),
) -> Result<()> {
    let g = Geometry {
        stride: 2,
        padding: 1,
        dilation: 1,
        act,
    };
    let height = 2 * rows + 1;
    let mut l = PlaneLayout::new(height, width, 3, &g)?;
    l.top = 0;
    l.out_height = rows;
    let channels = bias.len();
    if band.len() != channels * height * width || weights.len() != channels * 9 {
        candle_core::bail!(
            "strided depthwise band: {channels} channels of {height}x{width}: got {} inputs and {} weights",
            band.len(),
            weights.len()
        );
    }
    debug_assert!(width <= MAX_DIRECT_WIDTH);
    /// The band's channels, one stride-2 [`Rows`] plane kernel each, under one dispatch.
    struct Channels<'a> {
        l: &'a PlaneLayout,
        band: &'a [f32],
        w: &'a [f32],
        b: &'a [f32],
        act: Activation,
        out: (*mut f32, usize),
    }
    impl WithSimd for Channels<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: Simd>(self, simd: S) {
            let (plane, outputs) = (
                self.l.height * self.l.width,
                self.l.out_height * self.l.out_width,
            );
            // The edge vectors' load masks, the same for every channel (as for a task of planes).
            let mut masks = BUFFERS.with_borrow_mut(|(buf, _)| std::mem::take(buf));
            <Rows<3, 9, 2> as PlaneKernel>::prepare(simd, self.l, &mut masks);
            for (c, bias) in self.b.iter().enumerate() {
                // SAFETY: the caller's contract.
                let out = unsafe {
                    std::slice::from_raw_parts_mut(self.out.0.add(c * self.out.1), outputs)
                };
                let args = PlaneArgs {
                    l: self.l,
                    input: &self.band[c * plane..(c + 1) * plane],
                    weights: &self.w[c * 9..(c + 1) * 9],
                    bias: *bias,
                    act: self.act,
                    out,
                    panels: None,
                };
                Rows::<3, 9, 2>(args, &masks).with_simd(simd);
            }
            BUFFERS.with_borrow_mut(|(slot, _)| *slot = masks);
        }
    }
    dispatch(Channels {
        l: &l,
        band,
        w: weights,
        b: bias,
        act,
        out,
    });
    Ok(())
}

/// [`forward_plane`] for `T` taps on the padded, phase-split buffer: a vector of outputs per step,
/// every tap a contiguous load.
struct Phased<'a, const T: usize>(PlaneArgs<'a>);

impl<const T: usize> WithSimd for Phased<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let PlaneArgs {
            l,
            input: buf,
            weights,
            bias,
            act,
            out,
            ..
        } = self.0;
        let lanes = S::F32_LANES;
        let w: [S::f32s; T] = std::array::from_fn(|t| simd.splat_f32s(weights[t]));
        let taps: [usize; T] = std::array::from_fn(|t| l.taps[t]);
        let b = simd.splat_f32s(bias);
        let ow = l.out_width;
        for oy in 0..l.out_height {
            let src = buf[oy * l.phase_width..].as_ptr();
            let mut ox = 0;
            while ox < ow {
                // Three interleaved accumulators keep the FMA dependency chains short.
                let mut partial = [b, simd.splat_f32s(0.0), simd.splat_f32s(0.0)];
                for t in 0..T {
                    // SAFETY: the buffer holds SLACK ≥ lanes elements past the last row.
                    let v = unsafe { load::<S>(src.add(taps[t] + ox)) };
                    partial[t % 3] = simd.mul_add_f32s(w[t], v, partial[t % 3]);
                }
                let acc = simd.add_f32s(partial[0], simd.add_f32s(partial[1], partial[2]));
                // SAFETY: outputs ox .. min(ox + lanes, ow) of row oy are in `out`.
                unsafe {
                    store_first::<S>(
                        simd,
                        out.as_mut_ptr().add(oy * ow + ox),
                        ow - ox,
                        activate_v(simd, acc, act),
                    );
                }
                ox += lanes;
            }
        }
    }
}

/// Gradients of one channel over the whole batch: accumulates dL/dw (taps) and dL/db, and writes
/// dL/dx for every image. `grad` is dL/d(pre-activation) of one plane.
struct ChannelBackward<'a> {
    layout: &'a PlaneLayout,
    weights: &'a [f32],
}

impl ChannelBackward<'_> {
    /// Adds this plane's contribution to `grad_w` and scatters dL/dx into `grad_buf` (zeroed).
    #[inline(always)]
    fn plane(&self, input_buf: &[f32], grad: &[f32], grad_w: &mut [f64], grad_buf: &mut [f32]) {
        let l = self.layout;
        let ow = l.out_width;
        for oy in 0..l.out_height {
            let g = &grad[oy * ow..(oy + 1) * ow];
            let row = oy * l.phase_width;
            for ((&tap, &w), gw) in l.taps.iter().zip(self.weights).zip(grad_w.iter_mut()) {
                *gw += dot(g, &input_buf[row + tap..row + tap + ow]) as f64;
                for (d, &gv) in grad_buf[row + tap..row + tap + ow].iter_mut().zip(g) {
                    *d += w * gv;
                }
            }
        }
    }

    fn plane_dispatch(
        &self,
        input_buf: &[f32],
        grad: &[f32],
        grad_w: &mut [f64],
        grad_buf: &mut [f32],
    ) {
        // Auto-vectorised with the current SIMD level's instructions.
        vectorized(
            #[inline(always)]
            || self.plane(input_buf, grad, grad_w, grad_buf),
        )
    }
}

/// Dot product with 8 independent partial sums, so it vectorises without reassociation.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (ca, cb) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let tail: f32 = a[chunks..]
        .iter()
        .zip(&b[chunks..])
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

impl DepthwiseConv {
    /// Kernel size, channel multiplier and plane layout, or an error naming the shapes.
    fn check_shapes(&self, x: &Shape, w: &Shape, b: &Shape) -> Result<(usize, usize, PlaneLayout)> {
        let (_, c, h, wd) = x.dims4()?;
        let (wc, one, k, k2) = w.dims4()?;
        if wc == 0 || wc % c != 0 || one != 1 || k != k2 || b.elem_count() != wc {
            candle_core::bail!(
                "depthwise conv2d: input {x:?} needs weight ({c}·M, 1, K, K) and bias ({c}·M), got {w:?} and {b:?}"
            );
        }
        Ok((k, wc / c, PlaneLayout::new(h, wd, k, &self.0)?))
    }
}

impl CustomOp3 for DepthwiseConv {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
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
        let (_, multiplier, layout) = self.check_shapes(l1.shape(), l2.shape(), l3.shape())?;
        let (n, c, _, _) = l1.shape().dims4()?;
        let c_out = c * multiplier;
        let plane_out = layout.out_height * layout.out_width;
        let mut out = super::output_buffer(n * c_out * plane_out);
        let planes = OutPlanes {
            ptr: out.as_mut_ptr(),
            plane_out,
            panels: None,
        };
        forward(&layout, (x, w, b), self.0.act, (n, c, multiplier), planes);
        let shape = Shape::from((n, c_out, layout.out_height, layout.out_width));
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (k, multiplier, layout) = self.check_shapes(x.shape(), w.shape(), b.shape())?;
        let (n, c, h, wd) = x.dims4()?;
        let c_out = c * multiplier;
        let (taps, plane_in) = (k * k, h * wd);
        let plane_out = layout.out_height * layout.out_width;
        let act = self.0.act;

        let mut grad_x = vec![0f32; n * c * plane_in];
        let grad_x_ptr = SendPtr(grad_x.as_mut_ptr());
        // Per input channel: the weight and bias gradients of its `multiplier` output channels.
        let per_channel: Vec<(Vec<f64>, Vec<f64>)> =
            with_cpu_slices(&[x, w, res, grad_res], self.name(), |s| {
                let (xv, wv, rv, gv) = (s[0], s[1], s[2], s[3]);
                Ok((0..c)
                    .into_par_iter()
                    .map(|ci| {
                        let mut grad_w = vec![0f64; multiplier * taps];
                        let mut grad_b = vec![0f64; multiplier];
                        let mut grad_pre = vec![0f32; plane_out];
                        BUFFERS.with_borrow_mut(|(input_buf, grad_buf)| {
                            input_buf.resize(layout.buffer_len(), 0.0);
                            grad_buf.resize(layout.buffer_len(), 0.0);
                            for img in 0..n {
                                let p = img * c + ci;
                                layout.scatter(&xv[p * plane_in..(p + 1) * plane_in], input_buf);
                                grad_buf.fill(0.0);
                                for j in 0..multiplier {
                                    let co = ci * multiplier + j;
                                    let start = (img * c_out + co) * plane_out;
                                    let out_range = start..start + plane_out;
                                    pre_activation_grad(
                                        &gv[out_range.clone()],
                                        &rv[out_range],
                                        act,
                                        &mut grad_pre,
                                    );
                                    grad_b[j] += grad_pre.iter().map(|&g| g as f64).sum::<f64>();
                                    let backward = ChannelBackward {
                                        layout: &layout,
                                        weights: &wv[co * taps..(co + 1) * taps],
                                    };
                                    backward.plane_dispatch(
                                        input_buf,
                                        &grad_pre,
                                        &mut grad_w[j * taps..(j + 1) * taps],
                                        grad_buf,
                                    );
                                }
                                // SAFETY: plane p of grad_x is written by this task only.
                                let grad_plane = unsafe {
                                    std::slice::from_raw_parts_mut(
                                        grad_x_ptr.get().add(p * plane_in),
                                        plane_in,
                                    )
                                };
                                layout.gather(grad_buf, grad_plane);
                            }
                        });
                        (grad_w, grad_b)
                    })
                    .collect())
            })?;

        let grad_w: Vec<f32> = per_channel
            .iter()
            .flat_map(|(gw, _)| gw.iter().map(|&v| v as f32))
            .collect();
        let grad_b: Vec<f32> = per_channel
            .iter()
            .flat_map(|(_, gb)| gb.iter().map(|&v| v as f32))
            .collect();
        let dev = x.device();
        Ok((
            Some(Tensor::from_vec(grad_x, x.shape(), dev)?),
            Some(Tensor::from_vec(grad_w, w.shape(), dev)?),
            Some(Tensor::from_vec(grad_b, b.shape(), dev)?),
        ))
    }
}
