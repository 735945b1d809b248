//! COCO → VOC semantic masks on `MOBILEONE_DATA/coco-mini` (354 real images, polygons and crowd RLEs)
//! against torchvision's segmentation reference (tools/reference/coco_voc_fixtures.py wrote the SHA-256
//! of each uint8 mask and the training filter's choice to fixtures/coco_voc_reference.json).
mod common;

use mobileone_datasets::coco_voc::{keep_for_training, voc_mask};
use mobileone_datasets::CocoDataset;
use sha2::{Digest, Sha256};

#[test]
fn masks_and_the_training_filter_match_torchvision_pixel_for_pixel() {
    let reference: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/coco_voc_reference.json")).unwrap();
    let root = common::shared_data().join("coco-mini");
    let mut checked = 0;
    for split in ["train", "val"] {
        let dataset =
            CocoDataset::open(root.join(format!("annotations/instances_{split}2017.json")))
                .unwrap();
        let want = &reference["splits"][split];
        for image in &dataset.images {
            let mask = voc_mask(&dataset, image.id).unwrap();
            let sha: String = Sha256::digest(&mask.data)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let expected = &want["images"][image.id.to_string()];
            if sha != expected["sha256"] {
                let mut hist = std::collections::BTreeMap::new();
                mask.data
                    .iter()
                    .for_each(|&v| *hist.entry(v.to_string()).or_insert(0u64) += 1);
                panic!(
                    "{split} image {}: mask differs from torchvision's: ours {hist:?}, theirs {}",
                    image.id, expected["histogram"]
                );
            }
            checked += 1;
        }
        // torchvision's CocoDetection lists images by sorted id.
        let mut kept: Vec<u64> = dataset
            .images
            .iter()
            .map(|i| i.id)
            .filter(|&id| keep_for_training(&dataset, id))
            .collect();
        kept.sort_unstable();
        let want_kept: Vec<u64> =
            serde_json::from_value(want["kept_for_training"].clone()).unwrap();
        assert_eq!(kept, want_kept, "{split}: images kept for training");
    }
    assert_eq!(checked, 354);
}
