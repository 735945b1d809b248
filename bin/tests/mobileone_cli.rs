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
            .args(["--variant", "s0", "--top", "3", "--weights"])
            .arg(&weights),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ranks: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert_eq!(ranks.len(), 3, "{stdout}");
    assert!(ranks.iter().all(|l| l.contains('%')), "{stdout}");

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
