//! The `train` binary's error contract: bad input is one `error: ...` line naming the problem and a
//! non-zero exit, before any training starts.

use std::process::Command;

/// Runs `train` with `args`, expects it to fail and returns its stderr.
fn train_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_train"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "train {args:?} succeeded: {stderr}");
    stderr
}

fn out_dir(name: &str) -> String {
    std::env::temp_dir()
        .join(format!("train-cli-{name}-{}", std::process::id()))
        .display()
        .to_string()
}

/// `train det` for one epoch at 64 px on the COCO layout under `root`, one thread, into `out`.
fn train_tiny_detector(root: &std::path::Path, batch: usize, out: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_train"))
        .args(["det", "--dataset", "coco", "--data-root"])
        .arg(root)
        .args([
            "--size",
            "64",
            "--batch",
            &batch.to_string(),
            "--epochs",
            "1",
        ])
        .args(["--augment", "none", "--threads", "1", "--out", out])
        .output()
        .unwrap()
}

#[test]
fn missing_annotations_are_named() {
    let out = out_dir("missing");
    let stderr = train_fails(&[
        "det",
        "--dataset",
        "synth",
        "--data-root",
        "/nonexistent/shapes",
        "--out",
        &out,
    ]);
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("/nonexistent/shapes"), "{stderr}");
}

#[test]
fn detection_needs_coco_style_boxes() {
    let out = out_dir("voc");
    let root = env!("CARGO_MANIFEST_DIR");
    let stderr = train_fails(&[
        "det",
        "--dataset",
        "voc",
        "--data-root",
        root,
        "--out",
        &out,
    ]);
    assert!(
        stderr.contains("needs box annotations") && stderr.contains("coco, yolo or synth"),
        "{stderr}"
    );
}

#[test]
fn unknown_optimizer_is_rejected_by_the_parser() {
    let stderr = train_fails(&[
        "seg",
        "--dataset",
        "voc",
        "--data-root",
        ".",
        "--optimizer",
        "lamb",
    ]);
    assert!(stderr.contains("unknown optimizer `lamb`"), "{stderr}");
}

#[test]
fn head_flags_belong_to_segmentation() {
    let out = out_dir("head");
    let stderr = train_fails(&[
        "det",
        "--dataset",
        "synth",
        "--data-root",
        "/nonexistent/shapes",
        "--head-channels",
        "64",
        "--out",
        &out,
    ]);
    assert!(
        stderr.contains("--head-channels") && stderr.contains("train seg"),
        "{stderr}"
    );
}

#[path = "../../testing/shared_data.rs"]
mod shared_data;

/// `../shared/cases/19-near-zero-box-training`: a box of width 5.55e-15 among normal ones. torchvision's
/// reference converts boxes to float32 xyxy and keeps only x2 > x1, y2 > y1, so it drops the box and
/// trains; so must we (it aborted at step 1 before), and say that it was dropped.
#[test]
fn a_box_without_area_in_float32_is_dropped_as_torchvision_drops_it() {
    let root = shared_data::shared_cases().join("19-near-zero-box-training/data_B_float_noise");
    let out = out_dir("case19");
    let result = train_tiny_detector(&root, 2, &out);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");
    assert!(
        stderr.contains("1 box(es) without area in float32")
            && stderr.contains("left out of training")
            && stderr.contains("annotation id(s) 99"),
        "{stderr}"
    );
    assert!(std::path::Path::new(&out)
        .join("fused.safetensors")
        .is_file());
    std::fs::remove_dir_all(&out).unwrap();
}

/// `../shared/cases/23-truncated-jpeg` as training data: the run stops on the image, names it, and
/// leaves no empty output directory behind.
#[test]
fn a_truncated_training_image_stops_the_run_by_name_and_leaves_no_empty_output() {
    let case = shared_data::shared_cases().join("23-truncated-jpeg");
    let root =
        std::env::temp_dir().join(format!("train-cli-truncated-data-{}", std::process::id()));
    for split in ["train2017", "val2017"] {
        std::fs::create_dir_all(root.join(split)).unwrap();
        std::fs::copy(
            case.join("owl_truncated.jpg"),
            root.join(split).join("owl_truncated.jpg"),
        )
        .unwrap();
    }
    std::fs::create_dir_all(root.join("annotations")).unwrap();
    for split in ["train2017", "val2017"] {
        std::fs::copy(
            case.join("coco/annotations/instances_val2017.json"),
            root.join(format!("annotations/instances_{split}.json")),
        )
        .unwrap();
    }
    let out = out_dir("truncated");
    let result = train_tiny_detector(&root, 1, &out);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("owl_truncated.jpg") && stderr.contains("truncated"),
        "{stderr}"
    );
    assert!(
        !std::path::Path::new(&out).exists(),
        "no empty output directory left"
    );
    std::fs::remove_dir_all(&root).unwrap();
}
