//! COCO evaluation against pycocotools 2.0.11: the real 100-image val2014 case (MOBILEONE_DATA)
//! and generated cases (fixtures from tools/reference/eval_fixtures.py).

use std::path::{Path, PathBuf};

use mobileone_eval::coco::{
    evaluate_bbox, evaluate_file, CocoError, CocoStats, Detection, GroundTruth, IouType,
};
use serde_json::Value;

const TOLERANCE: f64 = 1e-12;

#[path = "../../testing/shared_data.rs"]
mod shared_data;
use shared_data::shared_data;

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/coco")
        .join(case)
}

fn expected(case: &str) -> Value {
    let text = std::fs::read_to_string(fixture(case).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn assert_close(case: &str, what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{case} {what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= TOLERANCE,
            "{case} {what}[{i}]: got {g}, pycocotools {w}"
        );
    }
}

fn run(case: &str) -> Result<CocoStats, CocoError> {
    let dir = fixture(case);
    let iou_type = match expected(case)["iou_type"].as_str().unwrap() {
        "segm" => IouType::Segm,
        _ => IouType::Bbox,
    };
    let gt = GroundTruth::from_path(&dir.join("gt.json"))?;
    evaluate_file(&gt, &dir.join("dt.json"), iou_type)
}

/// Stats, per-category stats and the summary text all match pycocotools.
fn check_case(case: &str) -> CocoStats {
    let want = expected(case);
    let got = run(case).unwrap_or_else(|e| panic!("{case}: {e}"));
    assert_close(case, "stats", &got.stats, &floats(&want["stats"]));
    let per_category = want["per_category"].as_object().unwrap();
    assert_eq!(
        got.per_category.len(),
        per_category.len(),
        "{case}: categories"
    );
    for c in &got.per_category {
        let w = floats(&per_category[&c.id.to_string()]);
        assert_close(case, &format!("category {}", c.id), &c.stats, &w);
    }
    let lines: Vec<&str> = want["summary"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(got.summary_lines(), lines, "{case}: summary text");
    got
}

#[test]
fn generated_cases_match_pycocotools() {
    for case in [
        "random",
        "crowd",
        "score_ties",
        "max_dets",
        "area_bounds",
        "unknown_category",
        "negative_boxes",
        "bad_input_base",
        "segm_random",
    ] {
        check_case(case);
    }
}

#[test]
fn defined_quirks_are_counted() {
    let unknown = check_case("unknown_category");
    assert!(unknown.input.unknown_category > 0);
    let dt: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("unknown_category").join("dt.json")).unwrap(),
    )
    .unwrap();
    let n_unknown = dt
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["category_id"] == 999)
        .count();
    assert_eq!(unknown.input.unknown_category, n_unknown);
    assert!(check_case("negative_boxes").input.negative_size > 0);
    // A category with detections but no ground truth, and one with neither, are -1 throughout.
    let random = check_case("random");
    for id in [33, 41] {
        let c = random.per_category.iter().find(|c| c.id == id).unwrap();
        assert_eq!(c.num_gt, 0);
        assert!(
            c.stats.iter().all(|&s| s == -1.0),
            "category {id}: {:?}",
            c.stats
        );
    }
}

#[test]
fn bad_input_is_rejected_where_pycocotools_raises() {
    for (case, raised) in [
        ("dt_image_not_in_gt", "AssertionError"),
        ("empty_results", "IndexError"),
        ("gt_missing_area", "KeyError: 'area'"),
    ] {
        assert!(
            expected(case)["error"]
                .as_str()
                .unwrap()
                .starts_with(raised),
            "{case}"
        );
        let err = run(case).expect_err(case);
        let ok = match case {
            "dt_image_not_in_gt" => matches!(err, CocoError::UnknownImage { image_id: 77, .. }),
            "empty_results" => matches!(err, CocoError::NoDetections { .. }),
            _ => matches!(err, CocoError::MissingField { field: "area", .. }),
        };
        assert!(ok, "{case}: unexpected error {err}");
        assert!(
            err.to_string().contains(".json"),
            "{case}: error names no file: {err}"
        );
    }
}

#[test]
fn missing_iscrowd_reads_as_zero() {
    // pycocotools raises KeyError; we document iscrowd = 0, the same numbers as the file with it.
    assert!(expected("gt_missing_iscrowd")["error"]
        .as_str()
        .unwrap()
        .contains("iscrowd"));
    let got = run("gt_missing_iscrowd").unwrap();
    assert_close(
        "gt_missing_iscrowd",
        "stats",
        &got.stats,
        &floats(&expected("bad_input_base")["stats"]),
    );
}

#[test]
fn ground_truth_pycocotools_cannot_evaluate_is_rejected() {
    // pycocotools returns numbers for these, but wrong ones (an id-0 object can never be matched;
    // duplicate ids evaluate one annotation twice); the fixtures keep them for the record.
    assert!(expected("ann_id_zero")["stats"].is_array());
    assert!(matches!(
        run("ann_id_zero"),
        Err(CocoError::AnnotationIdZero { index: 0, .. })
    ));
    assert!(matches!(
        run("duplicate_ann_ids"),
        Err(CocoError::DuplicateAnnotationId { .. })
    ));
}

#[test]
fn non_finite_detections_are_rejected() {
    let gt = GroundTruth::from_path(&fixture("bad_input_base").join("gt.json")).unwrap();
    let good = Detection {
        image_id: 1,
        category_id: 1,
        bbox: [1.0, 2.0, 3.0, 4.0],
        score: 0.5,
    };
    let nan_box = Detection {
        bbox: [1.0, f64::NAN, 3.0, 4.0],
        ..good
    };
    let inf_score = Detection {
        score: f64::INFINITY,
        ..good
    };
    for (dets, field) in [(vec![good, nan_box], "bbox"), (vec![inf_score], "score")] {
        match evaluate_bbox(&gt, &dets) {
            Err(CocoError::NonFinite { field: f, .. }) => assert_eq!(f, field),
            other => panic!("expected a non-finite {field} error, got {other:?}"),
        }
    }
    assert!(matches!(
        evaluate_bbox(&gt, &[]),
        Err(CocoError::NoDetections { .. })
    ));
}

fn val2014_100() -> (PathBuf, PathBuf, Vec<f64>) {
    let dir = shared_data().join("coco-val2014-100");
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("expected_bbox_stats.json")).unwrap(),
    )
    .unwrap();
    let stats = expected["stats"].as_object().unwrap();
    let want = mobileone_eval::coco::STAT_NAMES
        .iter()
        .map(|n| stats[*n].as_f64().unwrap())
        .collect();
    (
        dir.join("instances_val2014_100.json"),
        dir.join("fakebbox100_results.json"),
        want,
    )
}

#[test]
fn val2014_100_file_matches_pycocotools() {
    let (gt, dt, want) = val2014_100();
    let gt = GroundTruth::from_path(&gt).unwrap();
    let got = evaluate_file(&gt, &dt, IouType::Bbox).unwrap();
    assert_close("val2014_100", "stats", &got.stats, &want);
    assert_eq!(got.per_category.len(), 80);
}

#[test]
fn val2014_100_in_memory_matches_pycocotools() {
    let (gt, dt, want) = val2014_100();
    let gt = GroundTruth::from_path(&gt).unwrap();
    let results: Value = serde_json::from_str(&std::fs::read_to_string(dt).unwrap()).unwrap();
    let dets: Vec<Detection> = results
        .as_array()
        .unwrap()
        .iter()
        .map(|d| Detection {
            image_id: d["image_id"].as_u64().unwrap(),
            category_id: d["category_id"].as_u64().unwrap(),
            bbox: floats(&d["bbox"]).try_into().unwrap(),
            score: d["score"].as_f64().unwrap(),
        })
        .collect();
    let got = evaluate_bbox(&gt, &dets).unwrap();
    assert_close("val2014_100 in memory", "stats", &got.stats, &want);
}

#[test]
fn val2014_100_masks_match_pycocotools() {
    // Real COCO polygons and crowd RLEs; detections are shifted GT masks as compressed RLE.
    let case = "val2014_100_segm";
    let want = expected(case);
    let gt =
        GroundTruth::from_path(&shared_data().join("coco-val2014-100/instances_val2014_100.json"))
            .unwrap();
    let got = evaluate_file(&gt, &fixture(case).join("dt.json"), IouType::Segm).unwrap();
    assert_close(case, "stats", &got.stats, &floats(&want["stats"]));
    let per_category = want["per_category"].as_object().unwrap();
    for c in &got.per_category {
        assert_close(
            case,
            &format!("category {}", c.id),
            &c.stats,
            &floats(&per_category[&c.id.to_string()]),
        );
    }
}
