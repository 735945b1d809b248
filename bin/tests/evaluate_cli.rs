//! The `evaluate` binary's output contract: `--json` prints only the JSON document.

mod common;

use common::scratch;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn evaluate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_evaluate"))
        .args(args)
        .output()
        .unwrap()
}

fn coco_fixture(case: &str, file: &str) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../eval/tests/fixtures/coco")
        .join(case);
    dir.join(file).display().to_string()
}

#[test]
fn coco_json_is_the_only_stdout() {
    let out = evaluate(&[
        "coco",
        "--gt",
        &coco_fixture("random", "gt.json"),
        "--dt",
        &coco_fixture("random", "dt.json"),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    let want: Value = serde_json::from_str(
        &std::fs::read_to_string(coco_fixture("random", "expected.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(got["stats"], want["stats"]);
    assert_eq!(got["per_category"]["1"]["stats"], want["per_category"]["1"]);
}

#[test]
fn coco_summary_is_pycocotools_text() {
    let out = evaluate(&[
        "coco",
        "--gt",
        &coco_fixture("crowd", "gt.json"),
        "--dt",
        &coco_fixture("crowd", "dt.json"),
    ]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let want: Value = serde_json::from_str(
        &std::fs::read_to_string(coco_fixture("crowd", "expected.json")).unwrap(),
    )
    .unwrap();
    let lines: Vec<&str> = stdout.lines().take(12).collect();
    let want: Vec<&str> = want["summary"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(lines, want);
}

#[test]
fn coco_bad_input_fails_with_a_named_file() {
    let dt = coco_fixture("dt_image_not_in_gt", "dt.json");
    let out = evaluate(&[
        "coco",
        "--gt",
        &coco_fixture("dt_image_not_in_gt", "gt.json"),
        "--dt",
        &dt,
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: ") && stderr.contains(&dt),
        "{stderr}"
    );
}

fn write_map(dir: &Path, name: &str, width: u32, pixels: &[u8]) {
    let img =
        image::GrayImage::from_raw(width, pixels.len() as u32 / width, pixels.to_vec()).unwrap();
    img.save(dir.join(name)).unwrap();
}

#[test]
fn seg_json_reports_nan_classes_as_null() {
    let (pred, gt) = (scratch("evaluate", "pred"), scratch("evaluate", "gt"));
    write_map(&gt, "a.png", 3, &[0, 0, 1, 1, 255, 1]);
    write_map(&pred, "a.png", 3, &[0, 1, 1, 1, 2, 1]);
    let out = evaluate(&[
        "seg",
        "--pred",
        pred.to_str().unwrap(),
        "--gt",
        gt.to_str().unwrap(),
        "--num-classes",
        "3",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    // class 0: I=1 U=2; class 1: I=3 U=4; class 2 absent (the 2 is on an ignored pixel).
    assert_eq!(got["per_class_iou"], serde_json::json!([0.5, 0.75, null]));
    assert_eq!(got["mIoU"], serde_json::json!(0.625));
    assert_eq!(got["aAcc"], serde_json::json!(0.8));

    write_map(&pred, "a.png", 2, &[0, 1, 1, 1, 2, 1]);
    let out = evaluate(&[
        "seg",
        "--pred",
        pred.to_str().unwrap(),
        "--gt",
        gt.to_str().unwrap(),
        "--num-classes",
        "3",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("2x3 but its label"));
    std::fs::remove_dir_all(pred).unwrap();
    std::fs::remove_dir_all(gt).unwrap();
}
