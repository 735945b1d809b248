//! Boxes become training targets as torchvision's detection reference makes them
//! (`ConvertCocoPolysToMask`: float32 xyxy, clamped to the image, kept if x2 > x1 and y2 > y1): the
//! boxes of `../shared/cases/19-near-zero-box-training` and the rest of that kind.
mod common;

use mobileone_datasets::coco::training_box;
use mobileone_datasets::stats::DetectionStats;
use mobileone_datasets::{CocoDataset, CocoDetection, LabelMode, SampleSource};

#[test]
fn boxes_without_area_in_float32_are_dropped_as_torchvision_does() {
    // (x + w) in float32: 30 + 5.55e-15 == 30, so x2 == x1.
    assert_eq!(
        training_box([30.0, 30.0, 5.551115123125783e-15, 20.0], 100, 100),
        None
    );
    assert_eq!(training_box([10.0, 10.0, 0.0, 30.0], 100, 100), None);
    assert_eq!(
        training_box([40.0, 30.0, 20.0, -10.0], 100, 100),
        None,
        "negative height"
    );
    assert_eq!(
        training_box([120.0, 10.0, 5.0, 5.0], 100, 100),
        None,
        "outside the image: clamped to nothing"
    );
    assert_eq!(
        training_box([-5.0, 90.0, 20.0, 30.0], 100, 100),
        Some([0.0, 90.0, 15.0, 100.0]),
        "clamped"
    );
    assert_eq!(
        training_box([0.1, 0.2, 0.3, 0.4], 10, 10),
        Some([0.1, 0.2, 0.1f32 + 0.3f32, 0.2f32 + 0.4f32])
    );
}

#[test]
fn the_near_zero_case_loads_without_the_box_and_counts_it() {
    let case = common::shared_cases().join("19-near-zero-box-training");
    let root = case.join("data_B_float_noise");
    let dataset = CocoDataset::open(root.join("annotations/instances_train2017.json")).unwrap();
    assert_eq!(dataset.degenerate_boxes().len(), 1);
    assert_eq!(DetectionStats::from_coco(&dataset).degenerate, 1);
    let source = CocoDetection::new(
        dataset.clone(),
        root.join("train2017"),
        LabelMode::Contiguous,
    );
    let position = dataset.image_position(2).unwrap();
    assert!(
        source.load(position).unwrap().boxes.is_empty(),
        "image 2 holds only the 5.55e-15-wide box"
    );
    // Negative sizes are dropped the same way, not refused; non-finite boxes are refused by name.
    let negative =
        CocoDataset::open(case.join("instances_train2017_negative_height.json")).unwrap();
    // width 0, height -10, and a 1e-9 box at x = 30 (30 + 1e-9 == 30 in float32).
    assert_eq!(negative.degenerate_boxes().len(), 3);
    let mut text: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(case.join("instances_train2017_negative_height.json")).unwrap(),
    )
    .unwrap();
    text["annotations"][1]["bbox"][0] = serde_json::json!("NOT_A_NUMBER");
    let dir = std::env::temp_dir().join(format!("degenerate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("inf.json");
    // Python's json.dumps writes a float('inf') coordinate as `Infinity`.
    std::fs::write(
        &path,
        text.to_string().replace("\"NOT_A_NUMBER\"", "Infinity"),
    )
    .unwrap();
    let message = CocoDataset::open(&path).unwrap_err().to_string();
    assert!(
        message.contains("inf.json") && message.contains("annotations[1]"),
        "{message}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
