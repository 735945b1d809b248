//! Decoding and resizing against Pillow on the real photos of `MOBILEONE_DATA`: the SHA-256 of the RGB
//! bytes Pillow produces (tools/reference/classify_fixtures.py writes fixtures/pillow_reference.json),
//! and the truncated JPEG of `../shared/cases/23-truncated-jpeg`, which Pillow refuses.

mod common;

use mobileone_datasets::imaging::{read_rgb, resize, Filter};
use sha2::{Digest, Sha256};

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn decoding_and_every_resize_filter_match_pillow_bit_for_bit() {
    let data = common::shared_data();
    let reference: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/pillow_reference.json")).unwrap();
    let images = reference["images"].as_object().unwrap();
    assert_eq!(images.len(), 11, "the 11 shared photos");
    let mut resized_checked = 0;
    for (rel, entry) in images {
        let image = read_rgb(&data.join(rel)).unwrap();
        assert_eq!(
            (image.width() as u64, image.height() as u64),
            (
                entry["width"].as_u64().unwrap(),
                entry["height"].as_u64().unwrap()
            ),
            "{rel}"
        );
        assert_eq!(
            sha256(image.as_raw()),
            entry["decoded_sha256"],
            "{rel}: decoded pixels differ from Pillow's"
        );
        for case in entry["resized"].as_array().unwrap() {
            let filter: Filter = case["filter"].as_str().unwrap().parse().unwrap();
            let (w, h) = (
                case["width"].as_u64().unwrap() as u32,
                case["height"].as_u64().unwrap() as u32,
            );
            let out = resize(&image, w, h, filter);
            assert_eq!(
                sha256(out.as_raw()),
                case["sha256"],
                "{rel}: resize to {w}x{h} with {filter:?} differs from Pillow's"
            );
            resized_checked += 1;
        }
    }
    assert_eq!(resized_checked, 33);
}

#[test]
fn a_truncated_jpeg_is_refused_as_pillow_does() {
    let case = common::shared_cases().join("23-truncated-jpeg");
    let path = case.join("owl_truncated.jpg");
    let message = read_rgb(&path).unwrap_err().to_string();
    assert!(
        message.contains("owl_truncated.jpg") && message.contains("truncated"),
        "{message}"
    );
    read_rgb(&case.join("owl_baseline.jpg")).unwrap();
}
