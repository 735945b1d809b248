//! Autograd through every train-time module (MobileOne blocks with k conv branches, scale and identity
//! branches, SE and dilation; SSDLite extra blocks and heads; ASPP, DeepLab and FCN heads, dropout and
//! the losses), on tiny configurations, in two parts:
//!
//! 1. in f64 (candle's reference convolutions) against central finite differences: each parameter
//!    tensor along a random direction d, `grad · d` vs `(L(p + εd) − L(p − εd)) / 2ε`;
//! 2. the f32 gradients of the same model through the native kernels (what training runs) against
//!    those f64 gradients, tensor by tensor.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use mobileone::{MobileOne, MobileOneConfig};
use mobileone_train::init::seeded_var_builder;
use mobileone_train::optim::trainable_params;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Element-wise ops on the calling thread, as the `train` binary runs them (candle's spin-waiting pool
/// beside the kernels' pool oversubscribes small machines). Set before the first candle op.
fn single_threaded_elementwise() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("CANDLE_NUM_THREADS", "1"));
}

fn tiny_trunk() -> MobileOneConfig {
    MobileOneConfig {
        stem_channels: 8,
        stage_channels: [8, 16, 16, 24],
        stage_blocks: [1, 2, 1, 1],
        num_conv_branches: 2,
        se_blocks: [0, 0, 0, 1],
        num_classes: None,
    }
}

fn random(shape: &[usize], seed: u64, dtype: DType) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)
}

/// Σ_i ⟨outputs_i, R_i⟩ with fixed random R_i: every output element gets a distinct gradient.
fn projection(outputs: &[Tensor]) -> Result<Tensor> {
    let dtype = outputs[0].dtype();
    let mut total = Tensor::zeros((), dtype, &Device::Cpu)?;
    for (i, o) in outputs.iter().enumerate() {
        let r = random(o.dims(), 1000 + i as u64, dtype)?;
        total = (total + (o * r)?.sum_all()?)?;
    }
    Ok(total)
}

fn scalar(t: &Tensor) -> Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// A copy of `vars` in f64, to build the same model on candle's reference (f64) convolutions.
fn to_f64(vars: &VarMap) -> Result<VarMap> {
    let copy = VarMap::new();
    {
        let mut data = copy.data().lock().unwrap();
        for (name, var) in vars.data().lock().unwrap().iter() {
            let t = var.as_tensor().to_dtype(DType::F64)?;
            data.insert(name.clone(), Var::from_tensor(&t)?);
        }
    }
    Ok(copy)
}

/// Checks the model built by `build` (f32, native kernels) and its f64 twin as described above;
/// parameters under `fd_skip_prefix` skip the finite differences (but not the f32/f64 comparison).
fn check<M>(
    seed: u64,
    fd_skip_prefix: Option<&str>,
    build: impl Fn(VarBuilder) -> Result<M>,
    loss: impl Fn(&M, DType) -> Result<Tensor>,
) -> Result<()> {
    let vars = VarMap::new();
    let model32 = build(seeded_var_builder(&vars, seed, &Device::Cpu))?;
    let vars64 = to_f64(&vars)?;
    let model64 = build(VarBuilder::from_varmap(&vars64, DType::F64, &Device::Cpu))?;
    let params = trainable_params(&vars64, "", 1.0);
    assert!(!params.is_empty());
    let grads64 = loss(&model64, DType::F64)?.backward()?;
    let grads32 = loss(&model32, DType::F32)?.backward()?;
    let vars32: HashMap<String, Var> = vars.data().lock().unwrap().clone();
    let eps = 1e-6;
    let mut failures = Vec::new();
    for (i, p) in params.iter().enumerate() {
        let var = &p.var;
        let g64 = grads64
            .get(var.as_tensor())
            .cloned()
            .unwrap_or(var.as_tensor().zeros_like()?);
        // 1. f64 autograd vs finite differences (the trunk has its own test).
        let skip_fd = fd_skip_prefix.is_some_and(|prefix| p.name.starts_with(prefix));
        let (analytic, numeric) = if skip_fd {
            (0.0, 0.0)
        } else {
            let original = var.as_tensor().detach().copy()?;
            let d = random(var.dims(), i as u64, DType::F64)?;
            let d = (&d / scalar(&d.sqr()?.sum_all()?)?.sqrt())?;
            let analytic = scalar(&(&g64 * &d)?.sum_all()?)?;
            var.set(&(&original + (&d * eps)?)?)?;
            let plus = scalar(&loss(&model64, DType::F64)?)?;
            var.set(&(&original - (&d * eps)?)?)?;
            let minus = scalar(&loss(&model64, DType::F64)?)?;
            var.set(&original)?;
            (analytic, (plus - minus) / (2.0 * eps))
        };
        if !skip_fd && (analytic - numeric).abs() > 1e-4 * analytic.abs().max(numeric.abs()) + 1e-6
        {
            failures.push(format!(
                "{}: f64 autograd {analytic:.8} vs finite differences {numeric:.8}",
                p.name
            ));
        }
        // 2. native f32 autograd vs f64 autograd. The bound allows for f32 rounding amplified by
        //    batch-statistics BatchNorm over near-constant channels of a random network (worst seen:
        //    1.8e-3 relative, on a stride-2 block's 1x1 scale branch).
        let g32 = grads32
            .get(vars32[&p.name].as_tensor())
            .map(|g| g.to_dtype(DType::F64))
            .transpose()?
            .unwrap_or(g64.zeros_like()?);
        let error = scalar(&(&g32 - &g64)?.sqr()?.sum_all()?)?.sqrt();
        let norm = scalar(&g64.sqr()?.sum_all()?)?.sqrt();
        if error > 5e-3 * norm + 1e-6 {
            failures.push(format!(
                "{}: f32 gradient off by {error:.3e} (norm {norm:.3e})",
                p.name
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} problems over {} parameters:\n{}",
        failures.len(),
        params.len(),
        failures.join("\n")
    );
    Ok(())
}

#[test]
fn mobileone_train_time_blocks() -> Result<()> {
    single_threaded_elementwise();
    // Output stride 16: the last stage is dilated. Even sizes at every stride: candle's reference
    // conv2d backward mis-sizes the input gradient of stride-2 convolutions on odd inputs.
    check(
        1,
        None,
        |vb| MobileOne::new(&tiny_trunk(), 16, vb),
        |model, dtype| {
            let x = random(&[2, 3, 64, 64], 7, dtype)?;
            projection(&model.forward_features(&x, true)?)
        },
    )
}

#[test]
fn ssdlite_extra_blocks_and_heads() -> Result<()> {
    single_threaded_elementwise();
    let config = ssdlite::SsdLiteConfig {
        trunk: tiny_trunk(),
        variant: None,
        extra_channels: [16, 8, 8, 8],
        num_classes: 3,
        image_size: 128,
        mean: [0.5; 3],
        std: [0.25; 3],
    };
    check(
        2,
        Some("backbone.body."),
        |vb| ssdlite::SsdDetector::new(&config, mobileone::Form::TRAIN, vb),
        |detector, dtype| {
            let x = random(&[2, 3, 128, 128], 8, dtype)?;
            let out = detector.head_outputs(&x, true)?;
            projection(&[out.cls_logits, out.bbox_regression])
        },
    )
}

#[test]
fn deeplab_heads_dropout_and_loss() -> Result<()> {
    single_threaded_elementwise();
    let config = deeplabv3::DeepLabConfig {
        backbone: tiny_trunk(),
        output_stride: 16,
        atrous_rates: vec![1, 2, 3],
        head_channels: 8,
        num_classes: 3,
        aux_stride: Some(16),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let labels: Vec<u32> = (0..2 * 64 * 64)
        .map(|_| match rng.random_range(0..4u32) {
            3 => 255,
            v => v,
        })
        .collect();
    let labels = Tensor::from_vec(labels, (2, 64, 64), &Device::Cpu)?;
    check(
        3,
        Some("backbone.body."),
        |vb| deeplabv3::DeepLabV3::new(&config, vb),
        |model, dtype| {
            let x = random(&[2, 3, 64, 64], 9, dtype)?;
            // The same dropout masks in every evaluation.
            deeplabv3::seed_dropout(Some(11));
            let out = model.forward_t(&x, true);
            deeplabv3::seed_dropout(None);
            let out = out?;
            deeplabv3::segmentation_loss(&out.logits, out.aux_logits.as_ref(), &labels, 0.5)
        },
    )
}
