//! The inputs of `../shared/cases/` that pycocotools refuses (and variants of the same kind), against
//! what pycocotools 2.0.11 does with them (tools/reference/cases_reference.py wrote
//! fixtures/cases_reference.json): where it raises we must refuse with a message naming the file, the
//! item and what is wrong; where it evaluates we must give its 12 statistics.

use std::path::Path;

use mobileone_eval::coco::{evaluate_file, GroundTruth, IouType};
use serde_json::{json, Value};

#[path = "../../testing/shared_data.rs"]
mod shared_data;

fn reference(key: &str) -> Value {
    let all: Value = serde_json::from_str(include_str!("fixtures/cases_reference.json")).unwrap();
    all[key].clone()
}

fn cases() -> std::path::PathBuf {
    shared_data::shared_cases()
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Evaluates `gt` / `dt` written to a scratch folder; the outcome as the fixture states it.
fn outcome(name: &str, gt: &Value, dt: &Value, iou_type: IouType) -> Result<[f64; 12], String> {
    let dir = std::env::temp_dir()
        .join(format!("eval-cases-{name}-{}", std::process::id()).replace('/', "_"));
    std::fs::create_dir_all(&dir).unwrap();
    let (g, d) = (dir.join("gt.json"), dir.join("dt.json"));
    std::fs::write(&g, gt.to_string()).unwrap();
    std::fs::write(&d, dt.to_string()).unwrap();
    let result = GroundTruth::from_path(&g)
        .and_then(|gt| evaluate_file(&gt, &d, iou_type))
        .map(|s| s.stats)
        .map_err(|e| e.to_string());
    std::fs::remove_dir_all(&dir).unwrap();
    result
}

fn check(key: &str, gt: &Value, dt: &Value, iou_type: IouType) {
    let want = reference(key);
    let got = outcome(key, gt, dt, iou_type);
    match (&want.get("raises"), got) {
        (Some(exception), Err(message)) => {
            let exception = exception.as_str().unwrap();
            assert!(
                message.contains(exception),
                "{key}: pycocotools raises {exception}; ours: {message}"
            );
            assert!(
                message.contains("gt.json") || message.contains("dt.json"),
                "{key}: names no file: {message}"
            );
            println!("{key}: refused as pycocotools ({exception}): {message}");
        }
        (Some(exception), Ok(stats)) => {
            panic!("{key}: pycocotools raises {exception}, we evaluated {stats:?}")
        }
        (None, Ok(stats)) => {
            let want: Vec<f64> = serde_json::from_value(want["stats"].clone()).unwrap();
            for (a, b) in stats.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-12,
                    "{key}: {stats:?} vs pycocotools {want:?}"
                );
            }
        }
        (None, Err(message)) => panic!("{key}: pycocotools evaluates, we refused: {message}"),
    }
}

#[test]
fn a_first_polygon_of_four_numbers_and_its_kind() {
    let dir = cases().join("04-polygon-4-coords");
    let (gt, dt) = (read(&dir.join("gt.json")), read(&dir.join("dt.json")));
    check("04/segm", &gt, &dt, IouType::Segm);
    // Box evaluation never turns the ground truth's polygons into masks: pycocotools evaluates.
    check("04/bbox", &gt, &dt, IouType::Bbox);
    for (name, segmentation) in [
        ("first_polygon_2_numbers", json!([[10, 10]])),
        ("empty_polygon_list", json!([])),
        (
            "second_polygon_4_numbers",
            json!([[10, 10, 50, 10, 50, 40, 10, 40], [1, 1, 2, 2]]),
        ),
    ] {
        let mut g = gt.clone();
        g["annotations"][0]["segmentation"] = segmentation;
        check(&format!("04/{name}/segm"), &g, &dt, IouType::Segm);
    }
}

#[test]
fn mask_results_must_be_compressed_rle() {
    let dir = cases().join("21-rle-counts-list-in-results");
    let gt = read(&dir.join("gt_poly.json"));
    check(
        "21/rle_str/segm",
        &gt,
        &read(&dir.join("dt_rle_str.json")),
        IouType::Segm,
    );
    check(
        "21/rle_list/segm",
        &gt,
        &read(&dir.join("dt_rle_list.json")),
        IouType::Segm,
    );
    let polygons: Vec<Value> = read(&dir.join("dt_rle_str.json"))
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            json!({"image_id": d["image_id"], "category_id": d["category_id"], "score": d["score"],
                   "segmentation": [[10, 10, 50, 10, 50, 40, 10, 40]]})
        })
        .collect();
    check(
        "21/polygon_results/segm",
        &gt,
        &Value::Array(polygons.clone()),
        IouType::Segm,
    );
    // Box evaluation of results without `bbox`: loadRes still reads their masks (boxes come from
    // them), so it refuses lists and polygons there too; with a `bbox` it never reads them.
    let rle_list = read(&dir.join("dt_rle_list.json"));
    check(
        "21/rle_str/bbox",
        &gt,
        &read(&dir.join("dt_rle_str.json")),
        IouType::Bbox,
    );
    check("21/rle_list/bbox", &gt, &rle_list, IouType::Bbox);
    check(
        "21/polygon_results/bbox",
        &gt,
        &Value::Array(polygons),
        IouType::Bbox,
    );
    let with_box: Vec<Value> = rle_list
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let mut d = d.clone();
            d["bbox"] = json!([10, 10, 40, 30]);
            d
        })
        .collect();
    check(
        "21/rle_list_with_bbox/bbox",
        &gt,
        &Value::Array(with_box),
        IouType::Bbox,
    );
}
