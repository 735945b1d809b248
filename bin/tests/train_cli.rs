//! The `train` binary's error contract: bad input is one `error: ...` line naming the problem and a
//! non-zero exit, before any training starts.

use std::process::Command;

fn train(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_train"))
        .args(args)
        .output()
        .unwrap()
}

fn out_dir(name: &str) -> String {
    std::env::temp_dir()
        .join(format!("train-cli-{name}-{}", std::process::id()))
        .display()
        .to_string()
}

#[test]
fn missing_annotations_are_named() {
    let out = train(&[
        "det",
        "--dataset",
        "synth",
        "--data-root",
        "/nonexistent/shapes",
        "--out",
        &out_dir("missing"),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("/nonexistent/shapes"), "{stderr}");
}

#[test]
fn detection_needs_coco_style_boxes() {
    let out = train(&[
        "det",
        "--dataset",
        "voc",
        "--data-root",
        env!("CARGO_MANIFEST_DIR"),
        "--out",
        &out_dir("voc"),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("COCO format"), "{stderr}");
}

#[test]
fn unknown_optimizer_is_rejected_by_the_parser() {
    let out = train(&[
        "seg",
        "--dataset",
        "voc",
        "--data-root",
        ".",
        "--optimizer",
        "lamb",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown optimizer `lamb`"), "{stderr}");
}

#[test]
fn head_flags_belong_to_segmentation() {
    let out = train(&[
        "det",
        "--dataset",
        "synth",
        "--data-root",
        "/nonexistent/shapes",
        "--head-channels",
        "64",
        "--out",
        &out_dir("head"),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--head-channels") && stderr.contains("train seg"),
        "{stderr}"
    );
}
