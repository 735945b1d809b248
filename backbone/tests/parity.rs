//! Parity with timm (fixtures from tools/reference/backbone_fixtures.py): every feature level and the
//! logits, unfused and fused, timm and Apple naming, output strides 32/16/8; plus key/shape manifests of
//! the published S0–S4 and clear errors for bad weights.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use mobileone::checkpoint::{self, apple_to_timm, load_mobileone, CheckpointError};
use mobileone::parity::max_relative_error;
use mobileone::{MobileOne, MobileOneConfig, Variant};

const PARITY_TOL: f32 = 1e-4;
const FUSE_TOL: f32 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// Mirrors TINY_CFG in tools/reference/backbone_fixtures.py.
fn tiny_config() -> MobileOneConfig {
    MobileOneConfig {
        stem_channels: 16,
        stage_channels: [16, 32, 64, 64],
        stage_blocks: [2, 2, 2, 2],
        num_conv_branches: 2,
        se_blocks: [0, 0, 1, 2],
        num_classes: Some(10),
    }
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("tiny/reference.safetensors"), &Device::Cpu)
        .unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    max_relative_error(a, b).unwrap()
}

fn load_tiny(file: &str, output_stride: usize) -> MobileOne {
    let ckpt = checkpoint::load(&fixtures().join("tiny").join(file)).unwrap();
    load_mobileone(&ckpt, &tiny_config(), output_stride, &Device::Cpu).unwrap()
}

/// [`assert_matches_level`] on the CPU's best SIMD level and, where the CPU has it and it is a
/// lower one, on AVX2 (whose 1x1 and depthwise layers run in the blocked NCHW8c layout at
/// inference); one test at a time forces a level (it is process-wide).
fn assert_matches_timm(model: &MobileOne, output_stride: usize, what: &str) {
    use mobileone::ops::simd::{set_simd_level, simd_level, SimdLevel};
    static FORCING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = FORCING.lock().unwrap_or_else(|e| e.into_inner());
    assert_matches_level(model, output_stride, &format!("{what} ({})", simd_level()));
    if simd_level() != SimdLevel::Avx2 && set_simd_level(Some(SimdLevel::Avx2)).is_ok() {
        assert_matches_level(model, output_stride, &format!("{what} (avx2)"));
        set_simd_level(None).unwrap();
    }
}

fn assert_matches_level(model: &MobileOne, output_stride: usize, what: &str) {
    let refs = reference();
    let feats = model.forward_features(&refs["input"], false).unwrap();
    assert_eq!(feats.len(), 5);
    for (i, f) in feats.iter().enumerate() {
        let err = rel_err(f, &refs[&format!("os{output_stride}.features.{i}")]);
        assert!(
            err <= PARITY_TOL,
            "{what} os{output_stride} features.{i}: rel err {err:e}"
        );
    }
    if output_stride == 32 {
        let logits = model.forward_head(&feats[4]).unwrap().unwrap();
        let err = rel_err(&logits, &refs["logits"]);
        assert!(err <= PARITY_TOL, "{what} logits: rel err {err:e}");
    }
    // Without the stem's level, a fused model runs the stem and first block as one pass.
    for levels in [&[3, 4][..], &[4], &[1, 2]] {
        let feats = model
            .forward_features_at(&refs["input"], false, levels)
            .unwrap();
        assert_eq!(feats.len(), levels.len());
        for (f, i) in feats.iter().zip(levels) {
            let err = rel_err(f, &refs[&format!("os{output_stride}.features.{i}")]);
            assert!(
                err <= PARITY_TOL,
                "{what} os{output_stride} features.{i} of {levels:?}: rel err {err:e}"
            );
        }
    }
    // An inference batch is dealt out to the kernels' threads image by image (with two threads:
    // images 0 and 1, then image 2 alone, split between the threads) and concatenated back: every
    // image where it was, as alone.
    let half = (&refs["input"] * 0.5).unwrap();
    let batch = Tensor::cat(&[&refs["input"], &half, &refs["input"]], 0).unwrap();
    let feats = model.forward_features_at(&batch, false, &[3, 4]).unwrap();
    let half_alone = model.forward_features_at(&half, false, &[3, 4]).unwrap();
    for ((f, alone), i) in feats.iter().zip(&half_alone).zip([3, 4]) {
        let reference = &refs[&format!("os{output_stride}.features.{i}")];
        for image in [0, 2] {
            let err = rel_err(&f.narrow(0, image, 1).unwrap(), reference);
            assert!(
                err <= PARITY_TOL,
                "{what} os{output_stride} features.{i}, image {image} of 3: rel err {err:e}"
            );
        }
        let err = rel_err(&f.narrow(0, 1, 1).unwrap(), alone);
        assert!(
            err <= PARITY_TOL,
            "{what} features.{i}, image 1 of 3: rel err {err:e}"
        );
    }
    assert!(model
        .forward_features_at(&refs["input"], false, &[4, 3])
        .is_err());
}

#[test]
fn every_naming_and_form_matches_timm_at_every_output_stride() {
    for file in [
        "unfused.safetensors",
        "unfused_apple.pth.tar",
        "fused.safetensors",
        "fused_apple.pth.tar",
    ] {
        for os in [32, 16, 8] {
            let model = load_tiny(file, os);
            assert_eq!(model.is_fused(), file.starts_with("fused"), "{file}");
            assert_matches_timm(&model, os, file);
        }
    }
}

#[test]
fn naming_is_detected() {
    let apple = checkpoint::load(&fixtures().join("tiny/unfused_apple.pth.tar")).unwrap();
    assert_eq!(apple.naming, checkpoint::Naming::Apple);
    let timm = checkpoint::load(&fixtures().join("tiny/unfused.safetensors")).unwrap();
    assert_eq!(timm.naming, checkpoint::Naming::Timm);
    let mut a: Vec<_> = apple
        .tensors
        .keys()
        .filter(|k| !k.ends_with("num_batches_tracked"))
        .collect();
    let mut t: Vec<_> = timm.tensors.keys().collect();
    a.sort();
    t.sort();
    assert_eq!(a, t);
}

#[test]
fn reparameterize_is_exact_and_matches_timm() {
    let refs = reference();
    for os in [32, 16, 8] {
        let unfused = load_tiny("unfused.safetensors", os);
        let mut fused = unfused.clone();
        fused.reparameterize().unwrap();
        assert!(fused.is_fused());
        let a = unfused.forward_features(&refs["input"], false).unwrap();
        let b = fused.forward_features(&refs["input"], false).unwrap();
        for i in 0..5 {
            let err = rel_err(&b[i], &a[i]);
            assert!(
                err <= FUSE_TOL,
                "os{os} fused vs unfused features.{i}: {err:e}"
            );
        }
        assert_matches_timm(&fused, os, "reparameterized");
    }
}

#[test]
fn fused_weights_equal_timms_reparameterization() {
    let mut ours = load_tiny("unfused.safetensors", 32);
    ours.reparameterize().unwrap();
    let timm = checkpoint::load(&fixtures().join("tiny/fused.safetensors")).unwrap();
    let named = ours.named_tensors();
    assert_eq!(named.len(), timm.tensors.len());
    for (key, tensor) in named {
        let err = rel_err(&tensor, &timm.tensors[&key]);
        assert!(err <= 1e-6, "{key}: {err:e}");
    }
}

#[test]
fn train_mode_uses_batch_statistics() {
    let refs = reference();
    let model = load_tiny("unfused.safetensors", 32);
    let x = Tensor::cat(&[&refs["input"], &(&refs["input"] * 0.5).unwrap()], 0).unwrap();
    let eval = model.forward_features(&x, false).unwrap();
    let train = model.forward_features(&x, true).unwrap();
    assert!(
        rel_err(&train[4], &eval[4]) > 1e-3,
        "train mode must not use running statistics"
    );
}

type Manifest = BTreeMap<String, BTreeMap<String, serde_json::Value>>;

fn shapes(named: Vec<(String, Tensor)>) -> BTreeMap<String, Vec<usize>> {
    named
        .into_iter()
        .map(|(k, t)| (k, t.dims().to_vec()))
        .collect()
}

fn manifest_shapes(
    entry: &BTreeMap<String, serde_json::Value>,
    key: &str,
    apple: bool,
) -> BTreeMap<String, Vec<usize>> {
    let map: BTreeMap<String, Vec<usize>> = serde_json::from_value(entry[key].clone()).unwrap();
    map.into_iter()
        .map(|(k, v)| (if apple { apple_to_timm(&k) } else { k }, v))
        .collect()
}

#[test]
fn published_variants_have_timm_and_apple_keys_and_shapes() {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).unwrap();
    let manifest: Manifest = serde_json::from_str(&text).unwrap();
    for variant in Variant::ALL {
        let entry = &manifest[&variant.to_string()];
        let cfg = MobileOneConfig::from_variant(variant);
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let unfused = shapes(
            MobileOne::new(&cfg, 32, vb.clone())
                .unwrap()
                .named_tensors(),
        );
        assert_eq!(
            unfused,
            manifest_shapes(entry, "timm_unfused", false),
            "{variant} timm unfused"
        );
        assert_eq!(
            unfused,
            manifest_shapes(entry, "apple_unfused", true),
            "{variant} apple unfused"
        );
        let fused_model = MobileOne::new_fused(&cfg, 32, vb).unwrap();
        let fused = shapes(fused_model.named_tensors());
        assert_eq!(
            fused,
            manifest_shapes(entry, "timm_fused", false),
            "{variant} timm fused"
        );
        assert_eq!(
            fused,
            manifest_shapes(entry, "apple_fused", true),
            "{variant} apple fused"
        );
        let params: usize = fused.values().map(|s| s.iter().product::<usize>()).sum();
        assert_eq!(
            serde_json::json!(params),
            entry["params_fused"],
            "{variant} fused parameter count"
        );
    }
}

fn load_err(file: &Path, cfg: &MobileOneConfig) -> String {
    match checkpoint::load(file) {
        Err(e) => e.to_string(),
        Ok(ckpt) => match load_mobileone(&ckpt, cfg, 32, &Device::Cpu) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{} loaded", file.display()),
        },
    }
}

#[test]
fn bad_weights_give_clear_errors() {
    let dir = std::env::temp_dir().join(format!("mobileone-bad-weights-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = std::fs::read(fixtures().join("tiny/unfused.safetensors")).unwrap();
    let pth = std::fs::read(fixtures().join("tiny/unfused_apple.pth.tar")).unwrap();

    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &good[..good.len() / 2]).unwrap();
    let msg = load_err(&truncated, &tiny_config());
    assert!(
        msg.contains("truncated.safetensors") && msg.contains("not a readable checkpoint"),
        "{msg}"
    );

    let truncated_pth = dir.join("truncated.pth.tar");
    std::fs::write(&truncated_pth, &pth[..pth.len() / 2]).unwrap();
    let msg = load_err(&truncated_pth, &tiny_config());
    assert!(msg.contains("truncated.pth.tar"), "{msg}");

    let random = dir.join("random.bin");
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&random, bytes).unwrap();
    let msg = load_err(&random, &tiny_config());
    assert!(
        msg.contains("random.bin") && msg.contains("neither a safetensors file nor a PyTorch zip"),
        "{msg}"
    );

    let missing = load_err(&dir.join("does-not-exist.safetensors"), &tiny_config());
    assert!(
        missing.contains("cannot read") && missing.contains("does-not-exist"),
        "{missing}"
    );

    // Tiny weights into S0: a shape error naming the key and both shapes.
    let msg = load_err(
        &fixtures().join("tiny/unfused.safetensors"),
        &MobileOneConfig::s0(),
    );
    assert!(
        msg.contains("stem.conv_kxk.0.conv.weight")
            && msg.contains("[16, 3, 3, 3]")
            && msg.contains("[48, 3, 3, 3]"),
        "{msg}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn wrong_variant_is_named() {
    // Zero weights shaped like S1, loaded as S0: the error suggests --variant s1.
    let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
    let s1 = MobileOne::new(&MobileOneConfig::s1(), 32, vb).unwrap();
    let ckpt = checkpoint::Checkpoint {
        path: "s1.safetensors".into(),
        tensors: s1.named_tensors().into_iter().collect(),
        metadata: HashMap::new(),
        naming: checkpoint::Naming::Timm,
    };
    let err = load_mobileone(&ckpt, &MobileOneConfig::s0(), 32, &Device::Cpu).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, CheckpointError::ShapeMismatch { .. }),
        "{msg}"
    );
    assert!(msg.contains("--variant s1"), "{msg}");
}

#[test]
fn missing_and_unexpected_keys_are_named() {
    let ckpt = checkpoint::load(&fixtures().join("tiny/unfused.safetensors")).unwrap();
    let mut missing = ckpt.clone();
    missing.tensors.remove("stages.2.3.identity.running_var");
    let msg = load_mobileone(&missing, &tiny_config(), 32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("missing key `stages.2.3.identity.running_var`") && msg.contains("[64]"),
        "{msg}"
    );

    let mut extra = ckpt;
    extra.tensors.insert(
        "stages.9.0.extra.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let msg = load_mobileone(&extra, &tiny_config(), 32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("unexpected key") && msg.contains("stages.9.0.extra.weight"),
        "{msg}"
    );
}

#[test]
fn saved_checkpoints_round_trip_with_metadata() {
    let mut model = load_tiny("unfused.safetensors", 32);
    model.reparameterize().unwrap();
    let path = std::env::temp_dir().join(format!(
        "mobileone-roundtrip-{}.safetensors",
        std::process::id()
    ));
    let metadata = HashMap::from([("variant".to_string(), "tiny".to_string())]);
    checkpoint::save(&path, &model.named_tensors(), &metadata).unwrap();
    let back = checkpoint::load(&path).unwrap();
    assert_eq!(back.metadata["variant"], "tiny");
    let reloaded = load_mobileone(&back, &tiny_config(), 32, &Device::Cpu).unwrap();
    assert_matches_timm(&reloaded, 32, "saved fused");
    std::fs::remove_file(&path).unwrap();
}

/// `--init-branches`: a train-time trunk started from timm's reparameterised tiny checkpoint with
/// `branch_init_from_fused` computes timm's features and logits in eval mode, and every branch but the
/// first is off (zero BatchNorm scale) while its conv keeps a random initialisation.
#[test]
fn branches_started_from_a_fused_checkpoint_compute_the_fused_function() {
    let fused = checkpoint::load(&fixtures().join("tiny/fused.safetensors")).unwrap();
    let vars = candle_nn::VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, &Device::Cpu);
    let model = MobileOne::new(&tiny_config(), 32, vb).unwrap();
    assert!(!model.is_fused());
    let mut started = 0;
    for (name, var) in vars.data().lock().unwrap().iter() {
        let value =
            checkpoint::branch_init_from_fused(name, &fused.tensors, "", var.as_tensor()).unwrap();
        match value {
            Some(value) => {
                var.set(&value).unwrap();
                started += 1;
            }
            None => assert!(
                name.ends_with("conv.weight") && !name.contains("conv_kxk.0."),
                "{name} kept its initialisation"
            ),
        }
        if name.ends_with("conv_scale.bn.weight") || name.ends_with("identity.weight") {
            assert_eq!(
                var.as_tensor()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
                0.0
            );
        }
    }
    assert!(started > 0);
    assert_matches_timm(&model, 32, "train-time branches from the fused checkpoint");
}
