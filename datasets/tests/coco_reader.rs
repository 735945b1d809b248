//! COCO JSON parsing: every segmentation form, label maps, and errors that name the field.

use mobileone_datasets::coco::{parse_coco_json, RleCounts};
use mobileone_datasets::{CocoDataset, DatasetError, Segmentation};
use std::path::Path;

const CATEGORIES: &str =
    r#"[{"id": 5, "name": "b"}, {"id": 2, "name": "a", "supercategory": "x"}]"#;

fn document(annotations: &str) -> String {
    format!(
        r#"{{"info": {{"year": 2017}}, "licenses": [],
            "images": [{{"id": 7, "file_name": "7.jpg", "width": 4, "height": 3, "license": 1}}],
            "annotations": {annotations},
            "categories": {CATEGORIES}}}"#
    )
}

fn open(text: &str) -> Result<CocoDataset, DatasetError> {
    let path = Path::new("instances_test.json");
    CocoDataset::from_file(parse_coco_json(text.as_bytes(), path)?, path)
}

fn error_text(text: &str) -> String {
    open(text).unwrap_err().to_string()
}

#[test]
fn reads_polygons_rle_lists_and_compressed_rle() {
    let dataset = open(&document(
        r#"[
        {"id": 1, "image_id": 7, "category_id": 5, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 0,
         "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]},
        {"id": 2, "image_id": 7, "category_id": 2, "bbox": [0, 0, 1, 3], "area": 3, "iscrowd": 1,
         "segmentation": {"size": [3, 4], "counts": [0, 3, 9]}},
        {"id": 3, "image_id": 7, "category_id": 2, "bbox": [1, 0, 1, 3], "area": 3, "iscrowd": 0,
         "segmentation": {"size": [3, 4], "counts": "336"}}
    ]"#,
    ))
    .unwrap();
    assert_eq!(dataset.annotations.len(), 3);
    // Categories sorted by id: label 1 = id 2, label 2 = id 5.
    assert_eq!(dataset.label_of(2), Some(1));
    assert_eq!(dataset.label_of(5), Some(2));
    assert_eq!(
        dataset.category_ids_by_label(),
        vec![None, Some(2), Some(5)]
    );
    assert_eq!(dataset.class_names(), vec!["background", "a", "b"]);
    let annotations: Vec<_> = dataset.annotations_for(7).collect();
    assert!(annotations[1].iscrowd);
    assert_eq!(annotations[0].bbox_xyxy(), [0.0, 0.0, 2.0, 2.0]);
    assert!(matches!(
        &annotations[1].segmentation,
        Some(Segmentation::Rle {
            counts: RleCounts::Runs(_),
            ..
        })
    ));
    for annotation in &annotations {
        let rle = annotation
            .segmentation
            .as_ref()
            .unwrap()
            .to_rle(3, 4)
            .unwrap();
        assert_eq!(
            rle.area() as f64,
            annotation.area,
            "annotation {}",
            annotation.id
        );
    }
    assert_eq!(dataset.annotations_for(99).count(), 0);
    // pycocotools encodes column 1 of a 3x4 mask as "336"; round trip through the serialised form.
    let text = serde_json::to_string(&dataset.to_file()).unwrap();
    let again = open(&text).unwrap();
    assert_eq!(again.annotations, dataset.annotations);
}

#[test]
fn missing_field_is_named_with_its_position() {
    let message = error_text(&document(
        r#"[{"id": 1, "image_id": 7, "category_id": 5, "bbox": [0, 0, 2, 2], "area": 4},
            {"id": 2, "image_id": 7, "category_id": 5, "bbox": [0, 0, 2, 2]}]"#,
    ));
    assert!(message.contains("instances_test.json"), "{message}");
    assert!(message.contains("annotations[1]"), "{message}");
    assert!(message.contains("missing field `area`"), "{message}");
    assert!(message.contains("line 4"), "{message}");
}

#[test]
fn wrong_type_is_named_with_its_json_path() {
    let message = error_text(&document(
        r#"[{"id": 1, "image_id": 7, "category_id": 5, "bbox": [0, "0", 2, 2], "area": 4}]"#,
    ));
    assert!(message.contains("annotations[0].bbox[1]"), "{message}");
    assert!(message.contains("invalid type: string"), "{message}");
    let message = error_text(&document(
        r#"[{"id": 1, "image_id": 7, "category_id": 5, "bbox": [0, 0, 2, 2], "area": 4,
             "segmentation": {"size": [3, 4]}}]"#,
    ));
    assert!(message.contains("annotations[0].segmentation"), "{message}");
    assert!(message.contains("missing field `counts`"), "{message}");
    let message = error_text(&document(
        r#"[{"id": 1, "image_id": 7, "category_id": 5, "bbox": [0, 0, 2, 2], "area": 4, "iscrowd": 2}]"#,
    ));
    assert!(message.contains("annotations[0].iscrowd"), "{message}");
}

#[test]
fn syntax_errors_report_line_and_column() {
    let message = error_text("{\"images\": [\n  {\"id\": 1,, }]}");
    assert!(message.contains("line 2"), "{message}");
    assert!(message.contains("column 12"), "{message}");
    assert!(message.contains("images[0]"), "{message}");
}

#[test]
fn dangling_references_are_errors() {
    let message = error_text(&document(
        r#"[{"id": 9, "image_id": 8, "category_id": 5, "bbox": [0, 0, 2, 2], "area": 4}]"#,
    ));
    assert!(
        message.contains("annotations[0] (id 9): image_id 8 is not in `images`"),
        "{message}"
    );
    let message = error_text(&document(
        r#"[{"id": 9, "image_id": 7, "category_id": 3, "bbox": [0, 0, 2, 2], "area": 4}]"#,
    ));
    assert!(
        message.contains("category_id 3 is not in `categories`"),
        "{message}"
    );
    // A negative size is not refused: training drops the box, as torchvision's reference does
    // (`x2 <= x1` after conversion), and counts it.
    let dataset = open(&document(
        r#"[{"id": 9, "image_id": 7, "category_id": 5, "bbox": [0, 0, -2, 2], "area": 4}]"#,
    ))
    .unwrap();
    assert_eq!(dataset.degenerate_boxes().len(), 1);
}

#[test]
fn rle_of_the_wrong_size_is_an_error() {
    let segmentation = Segmentation::Rle {
        size: [3, 4],
        counts: RleCounts::Runs(vec![0, 3, 8]),
    };
    let error = segmentation.to_rle(3, 4).unwrap_err();
    assert!(error.contains("cover 11 pixels"), "{error}");
    let segmentation = Segmentation::Rle {
        size: [3, 4],
        counts: RleCounts::Runs(vec![0, 3, 9]),
    };
    let error = segmentation.to_rle(4, 4).unwrap_err();
    assert!(error.contains("differs from the image size"), "{error}");
}

#[test]
fn missing_file_names_the_path() {
    let message = CocoDataset::open("/nonexistent/instances.json")
        .unwrap_err()
        .to_string();
    assert!(message.contains("/nonexistent/instances.json"), "{message}");
}
