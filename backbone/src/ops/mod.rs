//! Fast CPU convolution kernels wired into candle as custom ops.
//!
//! candle runs a grouped convolution as one convolution per group, so a depthwise layer becomes
//! hundreds of tiny convolutions; MobileOne is made of exactly those layers. [`conv2d`] routes
//! f32 CPU convolutions to native kernels (depthwise KxK, 1x1 and dense KxK as a GEMM), each with
//! bias and activation fused into the output pass and a backward pass for autograd, and falls back
//! to candle's convolution for everything else (other dtypes and devices, grouped non-depthwise
//! convolutions). Tensors stay NCHW at the op boundary.

pub(crate) mod batch_norm;
pub(crate) mod blocked;
pub(crate) mod branch_merge;
mod depthwise;
pub mod excite;
mod gemm_conv;
pub mod layout;
pub mod panels;
mod pointwise;
pub mod simd;
pub mod stem;

use candle_core::{DType, Result, Tensor};

// The kernels own the types of their interface; `layers` builds on them (the arrow runs one way).
/// Geometry of a 2-D convolution (square kernels, symmetric padding, as in the reference models).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvConfig {
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    pub groups: usize,
}

impl Default for ConvConfig {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
        }
    }
}

/// Activation applied right after a convolution's bias, so kernels can fuse it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    Relu,
    Relu6,
}

impl Activation {
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::None => Ok(x.clone()),
            Activation::Relu => x.relu(),
            Activation::Relu6 => x.clamp(0f32, 6f32),
        }
    }
}

/// 2D convolution of `x` (N, C_in, H, W) with `weight` (C_out, C_in/groups, K, K), then `bias`
/// (C_out) and `act`, in one pass where a native kernel applies.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    cfg: &ConvConfig,
    act: Activation,
) -> Result<Tensor> {
    let (c_out, c_in_per_group, kh, kw) = weight.dims4()?;
    let c_in = x.dim(1)?;
    let native = x.device().is_cpu()
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && bias.is_none_or(|b| b.dtype() == DType::F32)
        && kh == kw
        && x.rank() == 4;
    if native {
        let depthwise = cfg.groups == c_in && c_in_per_group == 1 && c_out % c_in == 0;
        if depthwise || cfg.groups == 1 {
            let x = x.contiguous()?;
            let weight = weight.contiguous()?;
            let bias = match bias {
                Some(b) => b.contiguous()?,
                None => Tensor::zeros(c_out, DType::F32, x.device())?,
            };
            let geometry = Geometry {
                stride: cfg.stride,
                padding: cfg.padding,
                dilation: cfg.dilation,
                act,
            };
            return if depthwise {
                x.apply_op3(&weight, &bias, depthwise::DepthwiseConv(geometry))
            } else {
                x.apply_op3(&weight, &bias, gemm_conv::GemmConv(geometry))
            };
        }
    }
    reference_conv2d(x, weight, bias, cfg, act)
}

/// candle's own convolution followed by bias and activation: the fallback for inputs without a
/// native kernel, and the reference the native kernels are tested against.
pub fn reference_conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    cfg: &ConvConfig,
    act: Activation,
) -> Result<Tensor> {
    let y = x.conv2d(weight, cfg.padding, cfg.stride, cfg.dilation, cfg.groups)?;
    let y = match bias {
        Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?)?,
        None => y,
    };
    match act {
        Activation::None => Ok(y),
        Activation::Relu => y.relu(),
        Activation::Relu6 => y.clamp(0f32, 6f32),
    }
}

/// Sets the number of threads of the global rayon pool every kernel runs on (0: `RAYON_NUM_THREADS`,
/// else one per core). Call it once, at start-up, before any other rayon or candle work.
///
/// Unless `CANDLE_NUM_THREADS` is set, this also makes candle's own elementwise ops (the few left
/// outside the native kernels, e.g. squeeze-excitation's scaling) run on the calling thread: candle
/// runs them on a second pool whose workers spin while idle, and on a busy machine they took
/// about a fifth of S4's CPU time away from the kernels (measured with perf).
pub fn set_threads(n: usize) -> std::result::Result<(), rayon::ThreadPoolBuildError> {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Read once, when candle first needs its pool; nothing else runs yet at start-up.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
}

/// Keeps the memory that freed tensors held in the process for the next allocation, instead of
/// handing it back to the kernel (glibc; elsewhere a no-op): blocks up to 32 MB (glibc's largest
/// mmap threshold) come from the heap, and the heap's free top is given back only past 1 GB. With
/// glibc's adaptive defaults each forward pass faulted its activations in again, a zeroed page at a
/// time: S3 at batch 8 took 14 000 page faults (~55 MB) per pass, 179 → 154 ms with this. (`M_TOP_PAD`
/// alone turns the adaptive mmap threshold off and left every block over 128 KB to mmap: 3× slower
/// in a loop of two layers.) One arena for all threads: a forward pass allocates on a pool thread,
/// whose own arena's heaps glibc unmaps as soon as they are entirely free, whatever the trim
/// threshold (S1 at batch 8: 627 page faults per pass, 0 with one arena; `perf stat -e page-faults`).
/// ONNX Runtime keeps its activations in an arena for the same reason.
/// Process-wide: for applications, called first in `main` (the command-line tools do).
pub fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets tunables of the allocator.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Runs `f` on a thread of the kernels' pool. Each native kernel splits its work with rayon; called
/// from outside the pool, every kernel would first hand its work over to the pool and put the
/// calling thread to sleep, a wake-up round trip per layer. Wrap a whole forward pass in this.
pub fn run_in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

thread_local! {
    /// Set by [`one_tile_per_image`] on the thread running its closure.
    static ONE_TILE_PER_IMAGE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with each GEMM-based layer (the 1x1, strided and dense convolutions) keeping each image
/// in one tile, on the calling thread, instead of splitting it between the pool's threads: for
/// work that already gives every thread images of its own (`MobileOne`'s inference on a batch).
/// Splitting an image there made each of two tiles on the same thread pack the image's input
/// panels again (row tiles read every position). Nests: the previous setting comes back after.
pub fn one_tile_per_image<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ONE_TILE_PER_IMAGE.with(|flag| flag.set(self.0));
        }
    }
    let _restore = Restore(ONE_TILE_PER_IMAGE.with(|flag| flag.replace(true)));
    f()
}

/// Whether the calling thread runs inside [`one_tile_per_image`].
fn one_tile_per_image_set() -> bool {
    ONE_TILE_PER_IMAGE.with(|flag| flag.get())
}

/// Number of threads the kernels run on (rayon's global pool).
pub fn current_threads() -> usize {
    rayon::current_num_threads()
}

/// Stride, padding, dilation and activation of one native convolution.
#[derive(Clone, Copy)]
struct Geometry {
    stride: usize,
    padding: usize,
    dilation: usize,
    act: Activation,
}

/// Output size of a convolution along one axis, or an error when the kernel does not fit.
fn output_size(input: usize, kernel: usize, g: &Geometry) -> Result<usize> {
    let span = g.dilation * (kernel - 1) + 1;
    let padded = input + 2 * g.padding;
    if g.stride == 0 || g.dilation == 0 || padded < span {
        candle_core::bail!(
            "conv2d: kernel {kernel} (dilation {}) does not fit input {input} with padding {} and stride {}",
            g.dilation,
            g.padding,
            g.stride
        );
    }
    Ok((padded - span) / g.stride + 1)
}

/// Applies the activation to one value (used by the scalar paths).
#[inline(always)]
fn activate(v: f32, act: Activation) -> f32 {
    match act {
        Activation::None => v,
        Activation::Relu => v.max(0.0),
        Activation::Relu6 => v.clamp(0.0, 6.0),
    }
}

/// Derivative of the activation, read from its output `y` (0 where it clipped).
#[inline(always)]
fn activation_grad_mask(y: f32, act: Activation) -> f32 {
    match act {
        Activation::None => 1.0,
        Activation::Relu => (y > 0.0) as u8 as f32,
        Activation::Relu6 => (y > 0.0 && y < 6.0) as u8 as f32,
    }
}

/// `pre = grad · act'(out)`: dL/d(pre-activation) from the gradient at the activation's output.
#[inline(always)]
fn pre_activation_grad(grad: &[f32], out: &[f32], act: Activation, pre: &mut [f32]) {
    for ((d, &g), &y) in pre.iter_mut().zip(grad).zip(out) {
        *d = g * activation_grad_mask(y, act);
    }
}

/// Contiguous f32 slice of a CPU storage, or an error naming the op.
pub(crate) fn cpu_slice<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
    op: &str,
) -> Result<&'a [f32]> {
    let data = match storage {
        candle_core::CpuStorage::F32(data) => data,
        _ => candle_core::bail!("{op}: expected f32 storage"),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: expected a contiguous tensor"),
    }
}

/// Runs `f` on the f32 CPU values of `tensors` (made contiguous first where needed), read in place:
/// backward passes get their inputs without the copies `to_vec1` would make.
pub(crate) fn with_cpu_slices<R>(
    tensors: &[&Tensor],
    op: &str,
    f: impl FnOnce(&[&[f32]]) -> Result<R>,
) -> Result<R> {
    let contiguous = tensors
        .iter()
        .map(|t| t.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = contiguous.iter().map(|t| t.storage_and_layout()).collect();
    let slices = guards
        .iter()
        .map(|(storage, layout)| match &**storage {
            candle_core::Storage::Cpu(cpu) => cpu_slice(cpu, layout, op),
            _ => candle_core::bail!("{op}: expected a CPU tensor"),
        })
        .collect::<Result<Vec<_>>>()?;
    f(&slices)
}

/// How many bands to cut `rows` output rows of each of `images` images into, at most `most` rows
/// each: as few as that allows, but with fewer images than threads a multiple of threads / images,
/// so the threads get equal shares. Band `b` covers [`band_range`]`(rows, bands, b)`: the bands are
/// as even as the rows allow (S0's stem at batch 1 on 2 threads: 56 rows in 12 bands of 4–5, 28 rows
/// per thread; 11 bands of 5 and one of 1 left 30 and 26).
fn row_bands(rows: usize, most: usize, images: usize) -> usize {
    let threads = rayon::current_num_threads();
    let bands = rows.div_ceil(most.max(1));
    if images < threads {
        bands
            .next_multiple_of(threads.div_ceil(images.max(1)))
            .min(rows)
    } else {
        bands
    }
}

/// Rows of band `b` of `bands` (see [`row_bands`]).
fn band_range(rows: usize, bands: usize, b: usize) -> std::ops::Range<usize> {
    b * rows / bands..(b + 1) * rows / bands
}

/// An output vector that the kernel then writes completely, without zeroing it first (the same
/// allocation as candle's `alloc_uninit`: f32 has no invalid bit patterns and no drop).
#[allow(clippy::uninit_vec)]
fn output_buffer(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: see above; every caller overwrites all `len` elements before reading any.
    unsafe { v.set_len(len) };
    v
}

/// Raw pointer that rayon tasks may share when each writes a disjoint part of the buffer.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Taking `self` makes closures capture the whole (Send) wrapper, not the raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}
