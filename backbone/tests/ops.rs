//! The native convolution kernels against candle's reference convolution: outputs and gradients.

use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var};
use mobileone::layers::{Activation, ConvConfig};
use mobileone::ops::simd::{set_simd_level, SimdLevel};
use mobileone::ops::{conv2d, reference_conv2d};
use mobileone::parity::max_relative_error;

/// Largest tolerated max|native - reference| / max|reference|.
const TOLERANCE: f32 = 1e-5;

/// Deterministic values in [-1, 1) (candle's CPU randn cannot be seeded).
fn tensor(shape: &[usize], seed: u64) -> Tensor {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let len = shape.iter().product::<usize>();
    let data: Vec<f32> = (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn relative_error(actual: &Tensor, expected: &Tensor) -> f32 {
    max_relative_error(actual, expected).unwrap()
}

struct Case {
    input: [usize; 4],
    out_channels: usize,
    kernel: usize,
    config: ConvConfig,
    bias: bool,
    act: Activation,
}

impl Case {
    fn weight_shape(&self) -> [usize; 4] {
        let per_group = self.input[1] / self.config.groups;
        [self.out_channels, per_group, self.kernel, self.kernel]
    }

    /// Runs `conv` on fresh variables and returns output and gradients of sum(output * probe).
    fn run(
        &self,
        conv: fn(&Tensor, &Tensor, Option<&Tensor>, &ConvConfig, Activation) -> Result<Tensor>,
    ) -> (Tensor, Vec<Tensor>) {
        let x = Var::from_tensor(&tensor(&self.input, 1)).unwrap();
        let w = Var::from_tensor(&tensor(&self.weight_shape(), 2)).unwrap();
        // Relu6 needs outputs above 6 to exercise its upper clip.
        let scale = if matches!(self.act, Activation::Relu6) {
            8.0
        } else {
            1.0
        };
        let w = Var::from_tensor(&(w.as_tensor() * scale).unwrap()).unwrap();
        let b = Var::from_tensor(&tensor(&[self.out_channels], 3)).unwrap();
        let bias = self.bias.then(|| b.as_tensor().clone());
        let y = conv(
            x.as_tensor(),
            w.as_tensor(),
            bias.as_ref(),
            &self.config,
            self.act,
        )
        .unwrap();
        let probe = tensor(y.dims(), 4);
        let grads: GradStore = (&y * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut out = vec![
            grads.get(x.as_tensor()).unwrap().clone(),
            grads.get(w.as_tensor()).unwrap().clone(),
        ];
        if self.bias {
            out.push(grads.get(b.as_tensor()).unwrap().clone());
        }
        (y, out)
    }

    /// Asserts the native path matches the reference; returns the largest relative error seen.
    fn check(&self) -> f32 {
        let (y, grads) = self.run(conv2d);
        let (y_ref, grads_ref) = self.run(reference_conv2d);
        let name = format!(
            "input {:?} out {} k{} stride {} pad {} dil {} groups {} bias {} {:?}",
            self.input,
            self.out_channels,
            self.kernel,
            self.config.stride,
            self.config.padding,
            self.config.dilation,
            self.config.groups,
            self.bias,
            self.act
        );
        let mut worst = relative_error(&y, &y_ref);
        assert!(worst <= TOLERANCE, "{name}: output relative error {worst}");
        for (which, (g, g_ref)) in ["input", "weight", "bias"]
            .iter()
            .zip(grads.iter().zip(&grads_ref))
        {
            let err = relative_error(g, g_ref);
            assert!(
                err <= TOLERANCE,
                "{name}: {which} gradient relative error {err}"
            );
            worst = worst.max(err);
        }
        worst
    }
}

fn config(stride: usize, padding: usize, dilation: usize, groups: usize) -> ConvConfig {
    ConvConfig {
        stride,
        padding,
        dilation,
        groups,
    }
}

const ACTS: [Activation; 3] = [Activation::None, Activation::Relu, Activation::Relu6];

/// Runs `check` on every SIMD level this CPU supports (the kernels forced down to each in turn) and
/// names the levels it cannot run as not exercised here; returns the worst error over the levels.
/// The machines alternate between AVX2-only and AVX-512 kinds (and aarch64 under emulation), so every
/// level is tested somewhere.
fn on_every_level(what: &str, check: impl Fn() -> f32) -> f32 {
    static FORCING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = FORCING.lock().unwrap_or_else(|e| e.into_inner());
    let mut worst = 0f32;
    let mut skipped = Vec::new();
    for level in SimdLevel::ALL {
        if set_simd_level(Some(level)).is_err() {
            skipped.push(level.to_string());
            continue;
        }
        let error = check();
        set_simd_level(None).unwrap();
        eprintln!("{what}, {level}: worst relative error {error:e}");
        worst = worst.max(error);
    }
    eprintln!(
        "{what}: not exercised on this CPU: {}",
        if skipped.is_empty() {
            "none".into()
        } else {
            skipped.join(", ")
        }
    );
    worst
}

#[test]
fn depthwise_matches_reference() {
    let worst = on_every_level("depthwise", depthwise_cases);
    assert!(worst <= TOLERANCE);
}

fn depthwise_cases() -> f32 {
    let mut worst = 0f32;
    // Widths below, at and above one 4-, 8- and 16-lane vector; odd sizes for the stride-2 phases.
    // H and W share their parity: candle's reference conv2d backward uses one output padding for
    // both. Widths 40 (8 lanes) and 80 (16 lanes) give stride-2 rows vectors that need no masking.
    for input in [
        [2, 5, 9, 11],
        [1, 3, 6, 8],
        [1, 4, 17, 21],
        [1, 2, 12, 40],
        [1, 2, 10, 80],
    ] {
        let c = input[1];
        for (kernel, stride, padding, dilation) in [
            (3, 1, 1, 1),
            (3, 2, 1, 1),
            (3, 1, 0, 1),
            (3, 2, 0, 1),
            (3, 1, 2, 2),
            (3, 2, 2, 2),
            (1, 1, 0, 1),
            (1, 2, 0, 1),
            (5, 1, 2, 1),
            (5, 2, 2, 1),
            (7, 1, 3, 1),
        ] {
            for act in ACTS {
                for bias in [true, false] {
                    let case = Case {
                        input,
                        out_channels: c,
                        kernel,
                        config: config(stride, padding, dilation, c),
                        bias,
                        act,
                    };
                    worst = worst.max(case.check());
                }
            }
        }
    }
    // "Same" kernels on planes narrower than a vector, exactly one vector wide, and of one value
    // (the sliding 3x3 kernel's neighbour lanes and column masks at their limits).
    for input in [[1, 2, 20, 2], [1, 2, 4, 16], [1, 2, 1, 1], [1, 2, 7, 7]] {
        for (kernel, padding) in [(3, 1), (5, 2)] {
            for act in ACTS {
                let case = Case {
                    input,
                    out_channels: 2,
                    kernel,
                    config: config(1, padding, 1, 2),
                    bias: true,
                    act,
                };
                worst = worst.max(case.check());
            }
        }
    }
    // Whole groups of 8 channels, 3x3, padding 1, planes up to 20 wide at stride 1 and 56 at
    // stride 2: the channel-group kernel on AVX2, and on AVX-512 at stride 2 up to 28 wide (two
    // images of two groups, odd sizes whose rows end in a partial group of columns, planes of one
    // and four values, the widest planes, and wider ones that stay on the plane kernels).
    for (input, stride) in [
        ([2, 16, 14, 14], 1),
        ([2, 16, 14, 14], 2),
        ([1, 8, 9, 11], 1),
        ([1, 8, 9, 11], 2),
        ([1, 8, 7, 5], 1),
        ([1, 8, 1, 1], 1),
        ([1, 8, 2, 2], 2),
        ([1, 8, 20, 20], 1),
        ([1, 8, 21, 21], 1),
        ([1, 8, 28, 28], 2),
        ([1, 8, 29, 29], 2),
        ([1, 8, 56, 56], 2),
        ([1, 8, 58, 58], 2),
    ] {
        for act in ACTS {
            for bias in [true, false] {
                let case = Case {
                    input,
                    out_channels: input[1],
                    kernel: 3,
                    config: config(stride, 1, 1, input[1]),
                    bias,
                    act,
                };
                worst = worst.max(case.check());
            }
        }
    }
    // Stride 3 takes the padded-copy path (H ≡ W mod 3 for the reference backward).
    for act in ACTS {
        let case = Case {
            input: [2, 3, 10, 13],
            out_channels: 3,
            kernel: 3,
            config: config(3, 1, 1, 3),
            bias: true,
            act,
        };
        worst = worst.max(case.check());
    }
    // Channel multiplier 2 and 5 (the train-time MobileOne block runs its branches as one such conv).
    for (multiplier, stride) in [(2, 1), (5, 2)] {
        for act in ACTS {
            let case = Case {
                input: [2, 3, 9, 11],
                out_channels: 3 * multiplier,
                kernel: 3,
                config: config(stride, 1, 1, 3),
                bias: true,
                act,
            };
            worst = worst.max(case.check());
        }
    }
    worst
}

#[test]
fn pointwise_matches_reference() {
    let worst = on_every_level("pointwise", pointwise_cases);
    assert!(worst <= TOLERANCE);
}

fn pointwise_cases() -> f32 {
    let mut worst = 0f32;
    // Large enough to split into several tiles across rows and columns; positions left over after
    // the full register blocks in every count of vectors (49, 196, 40, 100, 72 positions) with
    // channel counts that leave partial channel blocks.
    for (input, out_channels) in [
        ([2, 7, 5, 6], 9),
        ([1, 16, 12, 12], 70),
        ([3, 33, 3, 3], 65),
        ([1, 20, 7, 7], 50),
        ([1, 24, 14, 14], 50),
        ([2, 9, 5, 8], 50),
        ([1, 12, 10, 10], 31),
        // C_in ≥ 64 (some not a multiple of any vector): a last vector at most half used is
        // computed as dot products over C_in, 1 to 8 positions of it (49, 196, 100, 65, 66).
        ([1, 70, 7, 7], 9),
        ([2, 64, 14, 14], 13),
        ([1, 66, 10, 10], 7),
        ([1, 72, 5, 13], 5),
        ([1, 67, 6, 11], 5),
        ([1, 64, 8, 9], 3),
        // Rows 256 values apart: the input panels are packed on every level.
        ([2, 20, 16, 16], 13),
        // Tiles wider than one band of positions (256 KB of input: 320 positions at 200
        // channels): a full band and a partial one per image, packed (13 rows) and in place (5).
        ([2, 200, 24, 24], 13),
        ([1, 200, 24, 24], 5),
        // Several bands, then the positions after the full panels: 529 positions, the last one
        // a dot product on every level.
        ([1, 200, 23, 23], 13),
    ] {
        for act in ACTS {
            for bias in [true, false] {
                let case = Case {
                    input,
                    out_channels,
                    kernel: 1,
                    config: config(1, 0, 1, 1),
                    bias,
                    act,
                };
                worst = worst.max(case.check());
            }
        }
    }
    let strided = Case {
        input: [2, 6, 9, 7],
        out_channels: 5,
        kernel: 1,
        config: config(2, 0, 1, 1),
        bias: true,
        act: Activation::Relu,
    };
    worst = worst.max(strided.check());
    worst
}

#[test]
fn dense_matches_reference() {
    let worst = on_every_level("dense", dense_cases);
    assert!(worst <= TOLERANCE);
}

fn dense_cases() -> f32 {
    let mut worst = 0f32;
    for (kernel, stride, padding, dilation) in [
        (3, 2, 1, 1),
        (3, 1, 1, 1),
        (3, 1, 2, 2),
        (3, 1, 0, 1),
        (5, 2, 2, 1),
        // Stride 1 runs tap by tap over the valid outputs only: side columns cut to their valid
        // width (dilation 4), taps entirely in the padding (dilation 12 on 11 columns), output
        // rows and columns that no tap reaches (padding 3 with a 3x3), a 5x5, a padded 1x1.
        (3, 1, 4, 4),
        (3, 1, 12, 12),
        (3, 1, 3, 1),
        (5, 1, 2, 1),
        (1, 1, 1, 1),
    ] {
        for act in ACTS {
            let case = Case {
                input: [2, 3, 13, 11],
                out_channels: 6,
                kernel,
                config: config(stride, padding, dilation, 1),
                bias: true,
                act,
            };
            worst = worst.max(case.check());
        }
    }
    // Large enough to be split into several bands of output rows and blocks of channels, as
    // DeepLabV3's ASPP is (1024 channels at 32x32, dilations 12/24/36).
    for dilation in [1, 6, 12, 24] {
        let case = Case {
            input: [2, 24, 32, 32],
            out_channels: 80,
            kernel: 3,
            config: config(1, dilation, dilation, 1),
            bias: true,
            act: Activation::Relu,
        };
        worst = worst.max(case.check());
    }
    // Strided: 64·9 unfolded rows leave room for 4 output rows per band, so the 7 output rows of
    // 13 input rows at stride 2 run as several bands (on up to two threads, of 3 and 4 rows).
    for act in ACTS {
        let case = Case {
            input: [2, 64, 13, 11],
            out_channels: 8,
            kernel: 3,
            config: config(2, 1, 1, 1),
            bias: true,
            act,
        };
        worst = worst.max(case.check());
    }
    worst
}

#[test]
fn grouped_and_other_dtypes_fall_back_to_candle() {
    Case {
        input: [1, 8, 6, 6],
        out_channels: 4,
        kernel: 3,
        config: config(1, 1, 1, 2),
        bias: true,
        act: Activation::Relu,
    }
    .check();
    let x = tensor(&[1, 4, 5, 5], 5).to_dtype(DType::F64).unwrap();
    let w = tensor(&[4, 1, 3, 3], 6).to_dtype(DType::F64).unwrap();
    let cfg = config(1, 1, 1, 4);
    let y = conv2d(&x, &w, None, &cfg, Activation::None).unwrap();
    let y_ref = reference_conv2d(&x, &w, None, &cfg, Activation::None).unwrap();
    assert_eq!(
        y.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        y_ref.flatten_all().unwrap().to_vec1::<f64>().unwrap()
    );
}

#[test]
fn strided_views_are_accepted() {
    // A transposed (non-contiguous) input goes through the native kernel after a copy.
    let x = tensor(&[1, 4, 7, 6], 7).transpose(2, 3).unwrap();
    let w = tensor(&[4, 1, 3, 3], 8);
    let cfg = config(1, 1, 1, 4);
    let y = conv2d(&x, &w, None, &cfg, Activation::Relu).unwrap();
    let y_ref = reference_conv2d(&x, &w, None, &cfg, Activation::Relu).unwrap();
    assert!(relative_error(&y, &y_ref) <= TOLERANCE);
}

#[test]
fn channels_last_is_candles_permutation() {
    // Whole and partial 16 x 16 tiles, several tasks per image (546 channels: 32 positions a
    // task), two images, and a transposed (non-contiguous) input.
    for shape in [[2, 546, 20, 20], [1, 24, 3, 3], [2, 5, 7, 9], [1, 1, 1, 1]] {
        let x = tensor(&shape, 9);
        let y = mobileone::ops::layout::channels_last(&x).unwrap();
        let y_ref = x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
        assert_eq!(y.dims(), y_ref.dims());
        let diff = (y - y_ref).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{shape:?}");
    }
    let x = tensor(&[1, 6, 5, 4], 10).transpose(2, 3).unwrap();
    let y = mobileone::ops::layout::channels_last(&x).unwrap();
    let y_ref = x.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap();
    let diff = (y - y_ref).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
}

#[test]
fn squeeze_excite_passes_match_candle() {
    let worst = on_every_level("squeeze-excite", squeeze_excite_cases);
    assert!(worst <= TOLERANCE);
}

/// `plane_mean` and `scale_planes` against candle's mean and broadcast multiply + activation:
/// outputs and the gradients of x and gate.
fn squeeze_excite_cases() -> f32 {
    use mobileone::ops::excite::{plane_mean, scale_planes};
    let mut worst = 0f32;
    // Planes of 49 (batched into tasks), 143 and 1 value.
    for dims in [[2, 5, 7, 7], [1, 3, 13, 11], [2, 40, 1, 1]] {
        for act in ACTS {
            let x = Var::from_tensor(&(tensor(&dims, 11) * 8.0).unwrap()).unwrap();
            let gate = Var::from_tensor(&tensor(&[dims[0], dims[1], 1, 1], 12)).unwrap();
            let run = |native: bool| -> Vec<Tensor> {
                let (mean, y) = if native {
                    (
                        plane_mean(x.as_tensor()).unwrap(),
                        scale_planes(x.as_tensor(), gate.as_tensor(), act).unwrap(),
                    )
                } else {
                    let mean = x.mean_keepdim(3).unwrap().mean_keepdim(2).unwrap();
                    let scaled = x.as_tensor().broadcast_mul(gate.as_tensor()).unwrap();
                    (mean, act.apply(&scaled).unwrap())
                };
                let loss = ((&y * tensor(y.dims(), 13)).unwrap().sum_all().unwrap()
                    + (&mean * tensor(mean.dims(), 14))
                        .unwrap()
                        .sum_all()
                        .unwrap())
                .unwrap();
                let grads = loss.backward().unwrap();
                vec![
                    mean,
                    y,
                    grads.get(x.as_tensor()).unwrap().clone(),
                    grads.get(gate.as_tensor()).unwrap().clone(),
                ]
            };
            let (native, reference) = (run(true), run(false));
            for (what, (a, b)) in ["mean", "output", "grad x", "grad gate"]
                .iter()
                .zip(native.iter().zip(&reference))
            {
                let e = relative_error(a, b);
                assert!(
                    e <= TOLERANCE,
                    "{dims:?} {act:?} {what}: relative error {e}"
                );
                worst = worst.max(e);
            }
        }
    }
    worst
}

#[test]
fn stem_then_depthwise_matches_reference() {
    let worst = on_every_level("stem + depthwise", stem_then_depthwise_cases);
    assert!(worst <= TOLERANCE);
}

#[test]
fn stem_then_depthwise_names_mismatched_shapes() {
    // A bias shorter than the stem's channels: an error naming the shapes, not a crash or
    // channels left unwritten.
    on_every_level("stem + depthwise, mismatched bias", || {
        let x = tensor(&[1, 3, 32, 32], 1);
        let (w1, b1) = (tensor(&[16, 3, 3, 3], 2), tensor(&[8], 3));
        let (w2, b2) = (tensor(&[16, 1, 3, 3], 4), tensor(&[16], 5));
        let err = mobileone::ops::stem::dense_then_depthwise(
            &x,
            (&w1, &b1, &config(2, 1, 1, 1)),
            (&w2, &b2, &config(2, 1, 1, 16)),
            Activation::Relu,
        )
        .expect_err("a bias of 8 for 16 channels")
        .to_string();
        assert!(err.contains("bias"), "{err}");
        0.0
    });
}

/// The fused stem and stride-2 depthwise pass against candle's two convolutions: one band (odd
/// sizes), 15 output rows in bands of unequal height (3 and 4 rows with two threads, 5 with one),
/// and a last band whose bottom row lies below the image; on AVX2 the channels-last band for
/// multiples of 8 channels (one or two groups per block, stem rows of 6 and 13 positions, output
/// rows of 3 and 7).
fn stem_then_depthwise_cases() -> f32 {
    let mut worst = 0f32;
    for (input, channels) in [
        ([2, 3, 13, 11], 6),
        ([2, 3, 13, 11], 24),
        ([1, 3, 30, 26], 8),
        // 15 × 100 depthwise outputs of 48 channels: bands of at most 6 rows (BAND_VALUES).
        ([1, 3, 60, 400], 48),
        ([1, 3, 61, 300], 40),
    ] {
        for act in ACTS {
            let x = tensor(&input, 1);
            let w1 = tensor(&[channels, 3, 3, 3], 2);
            let b1 = tensor(&[channels], 3);
            let w2 = tensor(&[channels, 1, 3, 3], 4);
            let b2 = tensor(&[channels], 5);
            let stem = config(2, 1, 1, 1);
            let depthwise = config(2, 1, 1, channels);
            let y = mobileone::ops::stem::dense_then_depthwise(
                &x,
                (&w1, &b1, &stem),
                (&w2, &b2, &depthwise),
                act,
            )
            .unwrap();
            let mid = reference_conv2d(&x, &w1, Some(&b1), &stem, act).unwrap();
            let y_ref = reference_conv2d(&mid, &w2, Some(&b2), &depthwise, act).unwrap();
            let error = relative_error(&y, &y_ref);
            assert!(
                error <= TOLERANCE,
                "input {input:?} → {channels} channels {act:?}: relative error {error}"
            );
            worst = worst.max(error);
        }
    }
    worst
}

#[test]
fn depthwise_then_pointwise_matches_the_two_convolutions() {
    let worst = on_every_level("depthwise + 1x1", depthwise_then_pointwise_cases);
    assert!(worst <= TOLERANCE);
}

/// The depthwise and 1x1 pair (its intermediate in position panels on the AVX2 level) against the
/// two native convolutions, bit for bit, and against candle's: in panels, the channel-group kernel
/// at strides 1 and 2 (16 channels at 14x14 and from 28x28) and the 3x3 plane kernel (12 channels
/// at 28x28), outputs whose last panel is partly used (7x7, 10x10), several images, and fewer
/// output channels than a register block, 64 panels per plane (32x32); as two convolutions, planes
/// of more than 64 panels (33x33, 56x56, and stride 2 from 112 wide).
fn depthwise_then_pointwise_cases() -> f32 {
    let mut worst = 0f32;
    for (input, stride, out_channels) in [
        ([1, 16, 14, 14], 1, 40),
        ([2, 16, 28, 28], 2, 24),
        ([1, 12, 28, 28], 1, 30),
        ([3, 12, 56, 56], 1, 5),
        ([1, 8, 112, 112], 2, 16),
        ([2, 24, 14, 14], 2, 64),
        ([1, 8, 10, 10], 1, 7),
        // 64 panels per plane (the most in panels) and 69 (two convolutions).
        ([1, 8, 32, 32], 1, 8),
        ([1, 8, 33, 33], 1, 8),
    ] {
        for act in ACTS {
            let channels = input[1];
            let x = tensor(&input, 1);
            let w1 = tensor(&[channels, 1, 3, 3], 2);
            let b1 = tensor(&[channels], 3);
            let w2 = tensor(&[out_channels, channels, 1, 1], 4);
            let b2 = tensor(&[out_channels], 5);
            let depthwise = config(stride, 1, 1, channels);
            let pointwise = config(1, 0, 1, 1);
            let y = mobileone::ops::panels::depthwise_then_pointwise(
                &x,
                (&w1, &b1, &depthwise),
                (&w2, &b2, &pointwise),
                act,
            )
            .unwrap();
            let mid = conv2d(&x, &w1, Some(&b1), &depthwise, act).unwrap();
            let y_two = conv2d(&mid, &w2, Some(&b2), &pointwise, act).unwrap();
            let what = format!("input {input:?} stride {stride} → {out_channels} {act:?}");
            let diff = (&y - &y_two).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(
                diff.to_scalar::<f32>().unwrap(),
                0.0,
                "{what}: not the two convolutions'"
            );
            let mid = reference_conv2d(&x, &w1, Some(&b1), &depthwise, act).unwrap();
            let y_ref = reference_conv2d(&mid, &w2, Some(&b2), &pointwise, act).unwrap();
            let error = relative_error(&y, &y_ref);
            assert!(error <= TOLERANCE, "{what}: relative error {error}");
            worst = worst.max(error);
        }
    }
    worst
}
