//! End-to-end checks of the `mobileone` binary: features and fuse on a random-weight S0, and bad
//! weights ending with a clear message and a non-zero exit, never a panic.
mod common;

use common::{run_err, run_ok, scratch, shared_data};
use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use mobileone::parity::max_relative_error;
use mobileone::{checkpoint, MobileOne, MobileOneConfig};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mobileone"))
}

/// Random-weight S0 with a classifier, written in timm naming.
fn write_random_s0(path: &Path) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = MobileOne::new(&MobileOneConfig::s0(), 32, vb).unwrap();
    checkpoint::save(path, &model.named_tensors(), &Default::default()).unwrap();
}

fn write_input(path: &Path) {
    let x = Tensor::randn(0f32, 1.0, (1, 3, 64, 80), &Device::Cpu).unwrap();
    mobileone_cli::npy::write_f32(path, &x).unwrap();
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    max_relative_error(a, b).unwrap()
}

#[test]
fn features_of_fused_checkpoint_match_unfused() {
    let dir = scratch("mobileone", "fuse");
    let (weights, fused, input) = (
        dir.join("s0.safetensors"),
        dir.join("s0_fused.safetensors"),
        dir.join("x.npy"),
    );
    write_random_s0(&weights);
    write_input(&input);
    run_ok(
        bin()
            .args(["fuse", "--variant", "s0", "--weights"])
            .arg(&weights)
            .arg("--out")
            .arg(&fused),
    );
    let meta = checkpoint::load(&fused).unwrap();
    assert_eq!(meta.metadata["variant"], "s0");
    assert!(meta.tensors.contains_key("stages.2.19.reparam_conv.bias"));

    for os in ["32", "16", "8"] {
        let (a, b) = (
            dir.join(format!("a{os}.safetensors")),
            dir.join(format!("b{os}.safetensors")),
        );
        let features = |w: &Path, out: &Path| {
            let mut cmd = bin();
            cmd.args([
                "features",
                "--variant",
                "s0",
                "--output-stride",
                os,
                "--weights",
            ])
            .arg(w);
            cmd.arg("--input").arg(&input).arg("--out").arg(out);
            run_ok(&mut cmd);
            candle_core::safetensors::load(out, &Device::Cpu).unwrap()
        };
        let (fa, fb) = (features(&weights, &a), features(&fused, &b));
        for key in [
            "features.0",
            "features.1",
            "features.2",
            "features.3",
            "features.4",
            "logits",
        ] {
            assert!(max_rel(&fb[key], &fa[key]) <= 1e-5, "os {os} {key}");
        }
        // 64x80 input: stride 32 gives 2x3, dilation keeps 4x5 (os 16) or 8x10 (os 8).
        let (h, w) = match os {
            "32" => (2, 3),
            "16" => (4, 5),
            _ => (8, 10),
        };
        assert_eq!(fa["features.4"].dims(), &[1, 1024, h, w]);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_weights_exit_cleanly() {
    let dir = scratch("mobileone", "bad");
    let input = dir.join("x.npy");
    write_input(&input);
    let weights = dir.join("s0.safetensors");
    write_random_s0(&weights);
    let bytes = std::fs::read(&weights).unwrap();

    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let random = dir.join("random.pth");
    std::fs::write(
        &random,
        (0..10_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let out = dir.join("out.safetensors");
    std::fs::write(&out, b"previous results").unwrap();

    for (weights, variant, expect) in [
        (
            &truncated,
            "s0",
            "truncated.safetensors is not a readable checkpoint",
        ),
        (&random, "s0", "random.pth is not a readable checkpoint"),
        (&weights, "s1", "pass --variant s0"),
    ] {
        let mut cmd = bin();
        cmd.args(["features", "--variant", variant, "--weights"])
            .arg(weights);
        cmd.arg("--input").arg(&input).arg("--out").arg(&out);
        let stderr = run_err(&mut cmd);
        assert!(stderr.contains(expect), "{stderr}");
    }
    assert_eq!(
        std::fs::read(&out).unwrap(),
        b"previous results",
        "a failed run must not touch the output"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn classify_prints_top_k_for_a_real_photo() {
    let dir = scratch("mobileone", "classify");
    let weights = dir.join("s0.safetensors");
    write_random_s0(&weights);
    let photo = shared_data().join("photos/grace_hopper.jpg");
    let out = run_ok(
        bin()
            .arg("classify")
            .arg(&photo)
            .args(["--variant", "s0", "--top", "3", "--no-save", "--weights"])
            .arg(&weights),
    );
    // One line per image: its size, the top 3 classes with their probabilities, the time.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().next().unwrap_or_default();
    assert!(line.starts_with("grace_hopper.jpg 512x600: "), "{stdout}");
    assert_eq!(line.matches('%').count(), 3, "{stdout}");
    assert!(line.ends_with(" ms"), "{stdout}");

    let not_an_image = dir.join("notes.jpg");
    std::fs::write(&not_an_image, b"plain text").unwrap();
    let stderr = run_err(
        bin()
            .arg("classify")
            .arg(&not_an_image)
            .arg("--weights")
            .arg(&weights),
    );
    assert!(stderr.contains("notes.jpg"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn fuse_handles_detector_checkpoints_and_names_unknown_trunks() {
    let dir = scratch("mobileone", "fuse-heads");
    let detector = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../heads/ssdlite/tests/fixtures/tiny_ssdlite.safetensors");
    let out = dir.join("fused_detector.safetensors");
    run_ok(
        bin()
            .arg("fuse")
            .arg("--weights")
            .arg(&detector)
            .arg("--out")
            .arg(&out),
    );
    let fused = checkpoint::load(&out).unwrap();
    let (model, _) =
        ssdlite::SsdDetector::from_checkpoint(&fused, &Default::default(), &Device::Cpu).unwrap();
    assert!(model.is_fused());
    assert!(
        !fused.tensors.keys().any(|k| k.contains("running_var")),
        "head BatchNorms must be folded"
    );

    // A tiny segmenter trunk without metadata: no variant can be judged from its widths.
    let segmenter = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../heads/deeplabv3/tests/fixtures/tiny.safetensors");
    let stderr = run_err(
        bin()
            .arg("fuse")
            .arg("--weights")
            .arg(&segmenter)
            .arg("--out")
            .arg(dir.join("seg.safetensors")),
    );
    assert!(stderr.contains("pass --variant"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// The safetensors dtype of every tensor in a file.
fn stored_dtypes(path: &Path) -> std::collections::HashSet<String> {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    file.tensors()
        .iter()
        .map(|(_, view)| format!("{:?}", view.dtype()))
        .collect()
}

/// Every tensor of `half` is its `full` counterpart rounded to float16: the same keys, and each
/// value within half a float16 step (2^-11 relative; 2^-25 absolute below float16's normal range).
fn assert_rounded_to_half(full: &Path, half: &Path) {
    let (full, half) = (
        checkpoint::load(full).unwrap().tensors,
        checkpoint::load(half).unwrap().tensors,
    );
    assert_eq!(
        full.keys().collect::<std::collections::BTreeSet<_>>(),
        half.keys().collect()
    );
    for (key, a) in &full {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = half[key].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (x, y) in a.iter().zip(&b) {
            let step = (x.abs() * 2f32.powi(-11)).max(2f32.powi(-25));
            assert!((x - y).abs() <= step, "{key}: {x} stored as {y}");
        }
    }
}

#[test]
fn half_fused_checkpoints_round_trip_with_their_metadata() {
    let dir = scratch("mobileone", "half");
    let fuse = |input: &Path, out: &Path, half: bool| {
        let mut cmd = bin();
        cmd.arg("fuse")
            .arg("--weights")
            .arg(input)
            .arg("--out")
            .arg(out);
        if half {
            cmd.arg("--half");
        }
        run_ok(&mut cmd);
    };
    // A real photo (deterministic, unlike random noise, which also exaggerates the error).
    use mobileone_cli::imageio;
    let photo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../heads/ssdlite/tests/fixtures/pets_213x160.png");
    let x = imageio::to_tensor(
        &imageio::load_rgb(&photo).unwrap(),
        imageio::IMAGENET_MEAN,
        imageio::IMAGENET_STD,
    )
    .unwrap();

    // Detector: fp32 fused, then its fp16 copy (fusing an already fused model changes nothing).
    let detector = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../heads/ssdlite/tests/fixtures/tiny_ssdlite.safetensors");
    let (full, half) = (dir.join("det32.safetensors"), dir.join("det16.safetensors"));
    fuse(&detector, &full, false);
    fuse(&full, &half, true);
    assert_eq!(stored_dtypes(&half), ["F16".to_string()].into());
    let size = |p: &Path| std::fs::metadata(p).unwrap().len() as f64;
    assert!(size(&half) < 0.55 * size(&full), "fp16 halves the file");
    let load = |p: &Path| {
        let ckpt = checkpoint::load(p).unwrap();
        let (model, labels) =
            ssdlite::SsdDetector::from_checkpoint(&ckpt, &Default::default(), &Device::Cpu)
                .unwrap();
        assert!(model.is_fused());
        let out = model.head_outputs(&x, false).unwrap();
        (
            ckpt.metadata,
            labels.names,
            out.cls_logits,
            out.bbox_regression,
        )
    };
    let (meta32, names32, cls32, box32) = load(&full);
    let (meta16, names16, cls16, box16) = load(&half);
    assert_eq!(meta16, meta32);
    assert_eq!(names16, names32);
    assert_rounded_to_half(&full, &half);
    // Each weight is off by at most 2^-11 of itself; through the tiny random detector's ~20 layers
    // that grows to 6.9e-3 of the largest logit on this photo (1.4e-3 for the segmenter below).
    let (e_cls, e_box) = (max_rel(&cls16, &cls32), max_rel(&box16, &box32));
    println!("detector fp16 vs fp32: logits {e_cls:.2e}, boxes {e_box:.2e}");
    assert!(e_cls < 2e-2 && e_box < 2e-2, "{e_cls} {e_box}");

    // Segmenter, straight from a train-time checkpoint with a training run's metadata: the model
    // description and summary stay, the resume state goes.
    let mut spec = deeplabv3::SegmenterSpec::new(mobileone::Variant::S0, 8, 16);
    spec.config.head_channels = 24;
    spec.config.atrous_rates = vec![2, 4, 6];
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = deeplabv3::DeepLabV3::new(&spec.config, vb).unwrap();
    let mut metadata = spec.to_metadata();
    metadata.insert("epoch".into(), "7".into());
    metadata.insert("train_state".into(), "{}".into());
    let trained = dir.join("seg.safetensors");
    checkpoint::save(&trained, &model.named_tensors(), &metadata).unwrap();
    let (full, half) = (dir.join("seg32.safetensors"), dir.join("seg16.safetensors"));
    fuse(&trained, &full, false);
    fuse(&trained, &half, true);
    assert_eq!(stored_dtypes(&half), ["F16".to_string()].into());
    let load = |p: &Path| {
        let (model, spec) = deeplabv3::load(p, &Default::default(), &Device::Cpu).unwrap();
        assert!(model.is_fused());
        let meta = checkpoint::load(p).unwrap().metadata;
        (meta, spec, model.forward_t(&x, false).unwrap().logits)
    };
    let (meta32, spec32, logits32) = load(&full);
    let (meta16, spec16, logits16) = load(&half);
    assert_eq!(meta16, meta32);
    assert_eq!(meta16["epoch"], "7");
    assert!(!meta16.contains_key("train_state"));
    assert_eq!(spec16, spec32);
    assert_eq!(spec16.config.head_channels, 24);
    assert_eq!(spec16.config.atrous_rates, vec![2, 4, 6]);
    assert_rounded_to_half(&full, &half);
    let e = max_rel(&logits16, &logits32);
    println!("segmenter fp16 vs fp32: logits {e:.2e}");
    assert!(e < 2e-2, "{e}");

    // A weight beyond float16's range is named instead of silently becoming infinity.
    let backbone = dir.join("s0.safetensors");
    write_random_s0(&backbone);
    let mut ckpt = checkpoint::load(&backbone).unwrap();
    let fc = ckpt.tensors["head.fc.weight"].affine(1e6, 0.0).unwrap();
    ckpt.tensors.insert("head.fc.weight".into(), fc);
    let tensors: Vec<(String, Tensor)> = ckpt.tensors.into_iter().collect();
    checkpoint::save(&backbone, &tensors, &Default::default()).unwrap();
    let out = dir.join("s0_half.safetensors");
    let stderr = run_err(
        bin()
            .args(["fuse", "--half", "--weights"])
            .arg(&backbone)
            .arg("--out")
            .arg(&out),
    );
    assert!(
        stderr.contains("head.fc.weight") && stderr.contains("float16"),
        "{stderr}"
    );
    assert!(!out.exists());
    std::fs::remove_dir_all(dir).unwrap();
}
