//! mIoU against the mmsegmentation IoUMetric formula (numpy reference in
//! tools/reference/eval_fixtures.py), on generated maps and on real ADE20K / VOC annotations.

use std::path::Path;

use mobileone_eval::seg::{reduce_zero_label, LabelMap, SegMetric, SegMetrics};
use serde_json::Value;

#[path = "../../testing/shared_data.rs"]
mod shared_data;
use shared_data::shared_data;

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/seg")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn optional_floats(v: &Value) -> Vec<Option<f64>> {
    v.as_array().unwrap().iter().map(Value::as_f64).collect()
}

fn counts(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// Exact equality: the same integer totals and the same float operations in the same order.
fn assert_matches_reference(got: &SegMetrics, want: &Value) {
    assert_eq!(
        got.per_class
            .iter()
            .map(|c| c.intersect)
            .collect::<Vec<_>>(),
        counts(&want["area_intersect"])
    );
    assert_eq!(
        got.per_class.iter().map(|c| c.union).collect::<Vec<_>>(),
        counts(&want["area_union"])
    );
    assert_eq!(
        got.per_class
            .iter()
            .map(|c| c.label_area)
            .collect::<Vec<_>>(),
        counts(&want["area_label"])
    );
    assert_eq!(
        got.per_class.iter().map(|c| c.iou).collect::<Vec<_>>(),
        optional_floats(&want["per_class_iou"])
    );
    assert_eq!(
        got.per_class.iter().map(|c| c.acc).collect::<Vec<_>>(),
        optional_floats(&want["per_class_acc"])
    );
    assert_eq!(got.miou, want["mIoU"].as_f64());
    assert_eq!(got.macc, want["mAcc"].as_f64());
    assert_eq!(got.aacc, want["aAcc"].as_f64());
}

#[test]
fn generated_maps_match_mmseg_formula() {
    let case = fixture("random.json");
    let mut metric = SegMetric::new(case["num_classes"].as_u64().unwrap() as usize, 255).unwrap();
    for image in case["images"].as_array().unwrap() {
        let pred: Vec<u8> = counts(&image["pred"])
            .into_iter()
            .map(|v| v as u8)
            .collect();
        let gt: Vec<u8> = counts(&image["gt"]).into_iter().map(|v| v as u8).collect();
        metric.update(&pred, &gt).unwrap();
    }
    let got = metric.compute();
    assert_matches_reference(&got, &case["expected"]);
    assert_eq!(
        got.per_class[5].iou, None,
        "a class absent from both maps is NaN"
    );
}

/// The deterministic perturbation of eval_fixtures.py's `perturbed`.
fn perturbed(label: &LabelMap, num_classes: u16) -> Vec<u16> {
    let mut pred = label.labels.clone();
    for y in 0..label.height {
        for x in 0..label.width {
            let p = &mut pred[y * label.width + x];
            if label.labels[y * label.width + x] == 255 {
                *p = ((x + y) % num_classes as usize) as u16;
            } else if (x * 7 + y * 13) % 5 == 0 {
                *p = (*p + 1) % num_classes;
            }
        }
    }
    pred
}

#[test]
fn real_annotations_match_mmseg_formula() {
    let cases = fixture("real_perturbed.json");
    let folders = [
        ("ade20k", "ade20k-samples/annotations"),
        ("voc2012", "voc2012-sample/SegmentationClass"),
    ];
    for (name, folder) in folders {
        let case = &cases[name];
        let num_classes = case["num_classes"].as_u64().unwrap() as u16;
        let mut vs_itself = SegMetric::new(num_classes as usize, 255).unwrap();
        let mut vs_perturbed = SegMetric::new(num_classes as usize, 255).unwrap();
        for file in case["files"].as_array().unwrap() {
            let path = shared_data().join(folder).join(file.as_str().unwrap());
            let mut label = LabelMap::read_png(&path).unwrap_or_else(|e| panic!("{e}"));
            if case["reduce_zero_label"].as_bool().unwrap() {
                reduce_zero_label(&mut label.labels);
            }
            vs_itself.update(&label.labels, &label.labels).unwrap();
            vs_perturbed
                .update(&perturbed(&label, num_classes), &label.labels)
                .unwrap();
        }
        let itself = vs_itself.compute();
        assert_eq!(
            (itself.miou, itself.macc, itself.aacc),
            (Some(1.0), Some(1.0), Some(1.0)),
            "{name}"
        );
        assert_eq!(
            itself.out_of_range_label, 0,
            "{name}: labels outside 0..{num_classes}"
        );
        assert_matches_reference(&vs_perturbed.compute(), &case["expected"]);
    }
}
