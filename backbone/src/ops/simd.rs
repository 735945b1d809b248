//! The SIMD instruction set the native kernels run on, chosen at run time through `pulp`: AVX-512
//! (`x86-64-v4`), AVX2 + FMA (`x86-64-v3`), NEON on aarch64, scalar last. Each kernel is written once,
//! generic over [`pulp::Simd`], and compiled for every level.
//!
//! The level is the best the CPU supports unless lowered, by `MOBILEONE_SIMD=scalar|avx2|avx512|neon`
//! (read once) or [`set_simd_level`], so a machine with AVX-512 also tests and benchmarks the AVX2 and
//! scalar paths. The GEMMs (`gemm` crate) choose their own kernels and are not lowered by this.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use pulp::{MemMask, Simd, WithSimd};

use super::Activation;

/// An instruction-set level of the native kernels, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// Plain Rust, one lane (every CPU).
    Scalar,
    /// aarch64 Advanced SIMD, 4 f32 lanes.
    Neon,
    /// x86-64-v3: AVX2 + FMA, 8 f32 lanes.
    Avx2,
    /// x86-64-v4: AVX-512 F/BW/CD/DQ/VL, 16 f32 lanes.
    Avx512,
}

impl SimdLevel {
    /// Every level, lowest first.
    pub const ALL: [SimdLevel; 4] = [Self::Scalar, Self::Neon, Self::Avx2, Self::Avx512];

    /// Whether this CPU can run the level.
    pub fn is_supported(self) -> bool {
        match self {
            Self::Scalar => true,
            #[cfg(target_arch = "aarch64")]
            Self::Neon => pulp::aarch64::Neon::try_new().is_some(),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => pulp::x86::V3::try_new().is_some(),
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => pulp::x86::V4::try_new().is_some(),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The highest level this CPU supports.
    pub fn best() -> Self {
        *Self::ALL
            .iter()
            .rev()
            .find(|l| l.is_supported())
            .unwrap_or(&Self::Scalar)
    }
}

impl fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Scalar => "scalar",
            Self::Neon => "neon",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        })
    }
}

impl FromStr for SimdLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|l| l.to_string() == s.trim().to_ascii_lowercase())
            .ok_or_else(|| {
                format!("unknown SIMD level `{s}`: expected scalar, neon, avx2 or avx512")
            })
    }
}

/// Level set by [`set_simd_level`]: 0 = none, else 1 + index in [`SimdLevel::ALL`].
static OVERRIDE: AtomicU8 = AtomicU8::new(0);

/// The level the kernels run on unless [`set_simd_level`] says otherwise, decided once: the one
/// `MOBILEONE_SIMD` names, else the best. An unknown or unsupported value is reported once on stderr
/// and ignored; an empty one counts as unset.
fn default_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = SimdLevel::best();
        let Some(value) = std::env::var("MOBILEONE_SIMD")
            .ok()
            .filter(|v| !v.trim().is_empty())
        else {
            return best;
        };
        match value.parse::<SimdLevel>() {
            Ok(level) if level.is_supported() => level,
            Ok(level) => {
                eprintln!(
                    "warning: MOBILEONE_SIMD={value}: this CPU cannot run {level}; using {best}"
                );
                best
            }
            Err(e) => {
                eprintln!("warning: MOBILEONE_SIMD: {e}; using {best}");
                best
            }
        }
    })
}

/// The level the kernels run on now: [`set_simd_level`]'s, else `MOBILEONE_SIMD`'s, else the best.
/// Always one this CPU supports.
pub fn simd_level() -> SimdLevel {
    match OVERRIDE.load(Ordering::Relaxed) {
        0 => default_level(),
        i => SimdLevel::ALL[i as usize - 1],
    }
}

/// Makes the kernels run on `level` (process-wide, for tests and benchmarks), or back on the default
/// with `None`.
///
/// # Errors
/// When this CPU cannot run `level`.
pub fn set_simd_level(level: Option<SimdLevel>) -> Result<(), String> {
    let code = match level {
        None => 0,
        Some(level) if level.is_supported() => {
            1 + SimdLevel::ALL.iter().position(|&l| l == level).unwrap_or(0) as u8
        }
        Some(level) => return Err(format!("this CPU cannot run {level}")),
    };
    OVERRIDE.store(code, Ordering::Relaxed);
    Ok(())
}

/// Runs `op` compiled for the current level. Cheap enough to call per plane or row: one atomic load
/// and a match (the level was checked against the CPU when it was chosen).
#[inline]
pub(crate) fn dispatch<Op: WithSimd>(op: Op) -> Op::Output {
    match simd_level() {
        // SAFETY (each arm): `simd_level` only returns levels this CPU supports.
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 => Simd::vectorize(unsafe { pulp::x86::V4::new_unchecked() }, op),
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 => Simd::vectorize(unsafe { pulp::x86::V3::new_unchecked() }, op),
        #[cfg(target_arch = "aarch64")]
        SimdLevel::Neon => Simd::vectorize(unsafe { pulp::aarch64::Neon::new_unchecked() }, op),
        _ => Simd::vectorize(pulp::Scalar::new(), op),
    }
}

/// Whether [`dispatch_8_lanes`] runs its op here: the current level is AVX2 or AVX-512.
pub(crate) fn eight_lanes() -> bool {
    matches!(simd_level(), SimdLevel::Avx512 | SimdLevel::Avx2)
}

/// Runs `op` on 8-lane AVX2 vectors where [`eight_lanes`] (a kernel built around 8 × 8
/// transposes), `None` on other levels.
#[inline]
pub(crate) fn dispatch_8_lanes<Op: WithSimd>(op: Op) -> Option<Op::Output> {
    if !eight_lanes() {
        return None;
    }
    // SAFETY: `simd_level` only returns levels this CPU supports, and AVX-512 implies AVX2.
    #[cfg(target_arch = "x86_64")]
    return Some(Simd::vectorize(
        unsafe { pulp::x86::V3::new_unchecked() },
        op,
    ));
    #[cfg(not(target_arch = "x86_64"))]
    {
        drop(op);
        None
    }
}

/// Runs `f` compiled for the current level: loops inside it are auto-vectorised with that level's
/// instructions (`f` and what it calls should be `#[inline(always)]`).
#[inline]
pub(crate) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    struct Closure<F>(F);
    impl<R, F: FnOnce() -> R> WithSimd for Closure<F> {
        type Output = R;
        #[inline(always)]
        fn with_simd<S: Simd>(self, _: S) -> R {
            (self.0)()
        }
    }
    dispatch(Closure(f))
}

/// `act` applied to every lane.
#[inline(always)]
pub(super) fn activate_v<S: Simd>(simd: S, acc: S::f32s, act: Activation) -> S::f32s {
    let zero = simd.splat_f32s(0.0);
    match act {
        Activation::None => acc,
        Activation::Relu => simd.max_f32s(acc, zero),
        Activation::Relu6 => simd.min_f32s(simd.max_f32s(acc, zero), simd.splat_f32s(6.0)),
    }
}

/// A full vector from `ptr` (unaligned).
///
/// # Safety
/// `ptr .. ptr + lanes` must be readable.
#[inline(always)]
pub(super) unsafe fn load<S: Simd>(ptr: *const f32) -> S::f32s {
    (ptr as *const S::f32s).read_unaligned()
}

/// Mask of the lanes `i` of a vector starting at column `col` with `0 <= col + i < end`. Built from
/// comparisons and wrapped with `MemMask::new`, so the masked load is one instruction (pulp's
/// `mask_between_*` attaches a per-mask function that the load then calls).
#[inline(always)]
pub(super) fn lanes_in<S: Simd>(simd: S, col: isize, end: isize) -> MemMask<S::m32s> {
    const IOTA: [u32; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
    let lanes = S::F32_LANES as isize;
    let first = (-col).clamp(0, lanes) as u32;
    let stop = (end - col).clamp(first as isize, lanes) as u32;
    // SAFETY: IOTA holds 16 ≥ lanes values.
    let iota = unsafe { (IOTA.as_ptr() as *const S::u32s).read_unaligned() };
    MemMask::new(simd.and_m32s(
        simd.greater_than_or_equal_u32s(iota, simd.splat_u32s(first)),
        simd.less_than_u32s(iota, simd.splat_u32s(stop)),
    ))
}

/// Stores the first `count` lanes of `v` at `ptr` (all of them when `count` is the lane count);
/// a partial store (once per row) is one masked store.
///
/// # Safety
/// `ptr .. ptr + min(count, lanes)` must be writable.
#[inline(always)]
pub(super) unsafe fn store_first<S: Simd>(simd: S, ptr: *mut f32, count: usize, v: S::f32s) {
    if count >= S::F32_LANES {
        (ptr as *mut S::f32s).write_unaligned(v);
    } else {
        simd.mask_store_ptr_f32s(lanes_in(simd, 0, count as isize), ptr, v);
    }
}

/// The even and the odd lanes of the `2·lanes` values `lo ++ hi`, each in order:
/// `([v0, v2, v4, …], [v1, v3, v5, …])`. One or two shuffles per half on AVX-512 (`vpermt2ps`),
/// AVX2 (`vshufps` + `vpermpd`) and NEON (`uzp1`/`uzp2`); `pulp`'s own deinterleave returns the
/// lanes in an ISA-specific order, which a stride-2 convolution cannot use.
#[inline(always)]
pub(super) fn deinterleave<S: Simd>(_simd: S, lo: S::f32s, hi: S::f32s) -> (S::f32s, S::f32s) {
    use std::mem::transmute_copy as cast;
    // SAFETY (each arm): the lane count identifies the vector type of the levels `dispatch` runs
    // (16: x86-64-v4, 8: x86-64-v3, 4 on aarch64: NEON), whose target features are enabled where
    // this inlines; the casts are between types of the same size.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        use std::arch::x86_64::*;
        if S::F32_LANES == 16 && std::mem::size_of::<S::f32s>() == 64 {
            let (a, b): (__m512, __m512) = (cast(&lo), cast(&hi));
            let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
            return (
                cast(&_mm512_permutex2var_ps(a, even, b)),
                cast(&_mm512_permutex2var_ps(a, odd, b)),
            );
        }
        if S::F32_LANES == 8 && std::mem::size_of::<S::f32s>() == 32 {
            let (a, b): (__m256, __m256) = (cast(&lo), cast(&hi));
            // vshufps leaves [a0 a2 b0 b2 | a4 a6 b4 b6]; vpermpd puts the 64-bit pairs in order.
            let in_order = |v: __m256| {
                _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(v)))
            };
            return (
                cast(&in_order(_mm256_shuffle_ps::<0b10_00_10_00>(a, b))),
                cast(&in_order(_mm256_shuffle_ps::<0b11_01_11_01>(a, b))),
            );
        }
    }
    #[cfg(target_arch = "aarch64")]
    unsafe {
        use std::arch::aarch64::*;
        if S::F32_LANES == 4 && std::mem::size_of::<S::f32s>() == 16 {
            let (a, b): (float32x4_t, float32x4_t) = (cast(&lo), cast(&hi));
            return (cast(&vuzp1q_f32(a, b)), cast(&vuzp2q_f32(a, b)));
        }
    }
    // Scalar (one lane: lo is v0, hi is v1) and any other level: through memory.
    let lanes = S::F32_LANES;
    let mut v = [0f32; 32];
    let mut halves = [[0f32; 16]; 2];
    // SAFETY: 32 ≥ 2·lanes values; each half holds 16 ≥ lanes.
    unsafe {
        (v.as_mut_ptr() as *mut S::f32s).write_unaligned(lo);
        (v.as_mut_ptr().add(lanes) as *mut S::f32s).write_unaligned(hi);
        for i in 0..lanes {
            halves[0][i] = v[2 * i];
            halves[1][i] = v[2 * i + 1];
        }
        (load::<S>(halves[0].as_ptr()), load::<S>(halves[1].as_ptr()))
    }
}

/// The 8×8 transpose of 8 vectors of 8 lanes: lane j of output i is lane i of input j. Eight
/// unpacks, eight shuffles and eight 128-bit permutes on AVX2; through memory on any other level
/// with 8 lanes.
#[inline(always)]
pub(super) fn transpose8<S: Simd>(_simd: S, rows: [S::f32s; 8]) -> [S::f32s; 8] {
    use std::mem::transmute_copy as cast;
    debug_assert!(S::F32_LANES == 8);
    // SAFETY: as in `deinterleave`.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        use std::arch::x86_64::*;
        if S::F32_LANES == 8 && std::mem::size_of::<S::f32s>() == 32 {
            // No closures here: they would lose the level's target features and call each
            // intrinsic.
            let (r0, r1, r2, r3): (__m256, __m256, __m256, __m256) = (
                cast(&rows[0]),
                cast(&rows[1]),
                cast(&rows[2]),
                cast(&rows[3]),
            );
            let (r4, r5, r6, r7): (__m256, __m256, __m256, __m256) = (
                cast(&rows[4]),
                cast(&rows[5]),
                cast(&rows[6]),
                cast(&rows[7]),
            );
            // Pairs of rows interleaved: lanes 0, 1 (and 4, 5) of rows 2k and 2k + 1, then lanes
            // 2, 3 (6, 7).
            let (t0, t1) = (_mm256_unpacklo_ps(r0, r1), _mm256_unpackhi_ps(r0, r1));
            let (t2, t3) = (_mm256_unpacklo_ps(r2, r3), _mm256_unpackhi_ps(r2, r3));
            let (t4, t5) = (_mm256_unpacklo_ps(r4, r5), _mm256_unpackhi_ps(r4, r5));
            let (t6, t7) = (_mm256_unpacklo_ps(r6, r7), _mm256_unpackhi_ps(r6, r7));
            // Lane j of rows 0-3 (uj) or 4-7 (vj) in the low half, lane 4 + j in the high half.
            let (u0, u1) = (
                _mm256_shuffle_ps::<0x44>(t0, t2),
                _mm256_shuffle_ps::<0xEE>(t0, t2),
            );
            let (u2, u3) = (
                _mm256_shuffle_ps::<0x44>(t1, t3),
                _mm256_shuffle_ps::<0xEE>(t1, t3),
            );
            let (v0, v1) = (
                _mm256_shuffle_ps::<0x44>(t4, t6),
                _mm256_shuffle_ps::<0xEE>(t4, t6),
            );
            let (v2, v3) = (
                _mm256_shuffle_ps::<0x44>(t5, t7),
                _mm256_shuffle_ps::<0xEE>(t5, t7),
            );
            return [
                cast(&_mm256_permute2f128_ps::<0x20>(u0, v0)),
                cast(&_mm256_permute2f128_ps::<0x20>(u1, v1)),
                cast(&_mm256_permute2f128_ps::<0x20>(u2, v2)),
                cast(&_mm256_permute2f128_ps::<0x20>(u3, v3)),
                cast(&_mm256_permute2f128_ps::<0x31>(u0, v0)),
                cast(&_mm256_permute2f128_ps::<0x31>(u1, v1)),
                cast(&_mm256_permute2f128_ps::<0x31>(u2, v2)),
                cast(&_mm256_permute2f128_ps::<0x31>(u3, v3)),
            ];
        }
    }
    let mut v = [[0f32; 8]; 8];
    for (i, row) in rows.iter().enumerate() {
        // SAFETY: 8 lanes of 4 bytes.
        let lanes: [f32; 8] = unsafe { cast(row) };
        for (j, value) in lanes.into_iter().enumerate() {
            v[j][i] = value;
        }
    }
    // SAFETY: as above.
    std::array::from_fn(|i| unsafe { cast(&v[i]) })
}

/// The lanes of `cur` moved up by one, the first filled from the last of `prev` and the vector
/// after (`[prev[L-1], cur[0], …, cur[L-2]]`, `[cur[1], …, cur[L-1], next[0]]`): the left and right
/// neighbours of every lane of a run `prev ++ cur ++ next`. One `valignd` each on AVX-512, two
/// shuffles on AVX2, one `ext` on NEON.
#[inline(always)]
pub(super) fn neighbours<S: Simd>(
    _simd: S,
    prev: S::f32s,
    cur: S::f32s,
    next: S::f32s,
) -> (S::f32s, S::f32s) {
    use std::mem::transmute_copy as cast;
    // SAFETY: as in `deinterleave`.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        use std::arch::x86_64::*;
        if S::F32_LANES == 16 && std::mem::size_of::<S::f32s>() == 64 {
            let (p, c, n): (__m512i, __m512i, __m512i) = (cast(&prev), cast(&cur), cast(&next));
            return (
                cast(&_mm512_alignr_epi32::<15>(c, p)),
                cast(&_mm512_alignr_epi32::<1>(n, c)),
            );
        }
        if S::F32_LANES == 8 && std::mem::size_of::<S::f32s>() == 32 {
            let (p, c, n): (__m256i, __m256i, __m256i) = (cast(&prev), cast(&cur), cast(&next));
            // vperm2i128 pairs each 128-bit half with its neighbour; vpalignr shifts within them.
            let left = _mm256_alignr_epi8::<12>(c, _mm256_permute2x128_si256::<0x21>(p, c));
            let right = _mm256_alignr_epi8::<4>(_mm256_permute2x128_si256::<0x21>(c, n), c);
            return (cast(&left), cast(&right));
        }
    }
    #[cfg(target_arch = "aarch64")]
    unsafe {
        use std::arch::aarch64::*;
        if S::F32_LANES == 4 && std::mem::size_of::<S::f32s>() == 16 {
            let (p, c, n): (float32x4_t, float32x4_t, float32x4_t) =
                (cast(&prev), cast(&cur), cast(&next));
            return (cast(&vextq_f32::<3>(p, c)), cast(&vextq_f32::<1>(c, n)));
        }
    }
    // Scalar (one lane: the neighbours are prev and next) and any other level: through memory.
    let lanes = S::F32_LANES;
    let mut v = [0f32; 48];
    // SAFETY: 48 ≥ 3·lanes values; reads stay within lanes-1 .. 2·lanes+1 ≤ 33.
    unsafe {
        (v.as_mut_ptr() as *mut S::f32s).write_unaligned(prev);
        (v.as_mut_ptr().add(lanes) as *mut S::f32s).write_unaligned(cur);
        (v.as_mut_ptr().add(2 * lanes) as *mut S::f32s).write_unaligned(next);
        (
            load::<S>(v.as_ptr().add(lanes - 1)),
            load::<S>(v.as_ptr().add(lanes + 1)),
        )
    }
}
