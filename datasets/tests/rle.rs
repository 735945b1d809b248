//! The RLE port against pycocotools (fixtures from tools/reference/datasets_rle.py).

mod common;

use mobileone_datasets::Rle;
use serde_json::Value;

fn mask_from_rows(rows: &Value) -> Vec<u8> {
    rows.as_array()
        .unwrap()
        .iter()
        .flat_map(|row| {
            row.as_str()
                .unwrap()
                .bytes()
                .map(|b| b - b'0')
                .collect::<Vec<_>>()
        })
        .collect()
}

fn bbox(value: &Value) -> [f64; 4] {
    let v: Vec<f64> = serde_json::from_value(value.clone()).unwrap();
    [v[0], v[1], v[2], v[3]]
}

#[test]
fn polygon_rasterisation_matches_pycocotools() {
    let fixture = common::fixture("rle_pycocotools.json");
    for (i, case) in fixture["polygons"].as_array().unwrap().iter().enumerate() {
        let (h, w) = (
            case["height"].as_u64().unwrap() as u32,
            case["width"].as_u64().unwrap() as u32,
        );
        let polygon: Vec<f64> = serde_json::from_value(case["polygon"].clone()).unwrap();
        let rle = Rle::from_polygon(&polygon, h, w);
        assert_eq!(
            rle.to_compressed(),
            case["counts"].as_str().unwrap(),
            "case {i}"
        );
        assert_eq!(rle.area(), case["area"].as_u64().unwrap(), "case {i}");
        assert_eq!(rle.bbox(), bbox(&case["bbox"]), "case {i}");
        assert_eq!(
            rle.to_mask(),
            mask_from_rows(&case["mask_rows"]),
            "case {i}"
        );
    }
}

#[test]
fn mask_encoding_matches_pycocotools() {
    let fixture = common::fixture("rle_pycocotools.json");
    for (i, case) in fixture["masks"].as_array().unwrap().iter().enumerate() {
        let (h, w) = (
            case["height"].as_u64().unwrap() as u32,
            case["width"].as_u64().unwrap() as u32,
        );
        let mask = mask_from_rows(&case["mask_rows"]);
        let rle = Rle::from_mask(&mask, w, h);
        let counts = case["counts"].as_str().unwrap();
        assert_eq!(rle.to_compressed(), counts, "case {i}");
        assert_eq!(rle.area(), case["area"].as_u64().unwrap(), "case {i}");
        assert_eq!(rle.bbox(), bbox(&case["bbox"]), "case {i}");
        let parsed = Rle::from_compressed(counts, h, w).unwrap();
        assert_eq!(parsed, rle, "case {i}");
        assert_eq!(parsed.to_mask(), mask, "case {i}");
    }
}

#[test]
fn compressed_strings_that_do_not_fit_are_rejected() {
    // "0" = one run of 0 pixels: does not cover a 2x2 mask.
    let error = Rle::from_compressed("0", 2, 2).unwrap_err();
    assert!(error.contains("cover 0 pixels"), "{error}");
    assert!(Rle::from_compressed("0 ", 2, 2).is_err());
    assert!(
        Rle::from_compressed("o", 2, 2).is_err(),
        "a number that never ends"
    );
}
