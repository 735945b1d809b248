//! Readers on the real samples in `MOBILEONE_DATA`, compared with PIL/pycocotools facts
//! (tools/reference/datasets_samples.py).

mod common;

use mobileone_datasets::io::read_label_png;
use mobileone_datasets::{CocoDataset, SegmentationDataset, IGNORE_INDEX};
use std::collections::BTreeMap;

fn histogram(data: &[u8]) -> BTreeMap<String, u64> {
    let mut counts = [0u64; 256];
    data.iter().for_each(|&v| counts[v as usize] += 1);
    (0..256)
        .filter(|&v| counts[v] > 0)
        .map(|v| (v.to_string(), counts[v]))
        .collect()
}

fn expected_histogram(reference: &serde_json::Value, rel: &str) -> BTreeMap<String, u64> {
    serde_json::from_value(reference["label_pngs"][rel]["histogram"].clone()).unwrap()
}

#[test]
fn coco_samples_match_pycocotools() {
    let data = common::shared_data();
    let reference = common::fixture("samples_reference.json");
    for rel in [
        "coco-val2017-samples/instances_val2017_5.json",
        "coco-val2014-100/instances_val2014_100.json",
    ] {
        let expected = &reference["coco"][rel];
        let dataset = CocoDataset::open(data.join(rel)).unwrap();
        assert_eq!(
            dataset.images.len() as u64,
            expected["images"].as_u64().unwrap()
        );
        assert_eq!(
            dataset.annotations.len() as u64,
            expected["annotations"].as_u64().unwrap()
        );
        let crowd = dataset.annotations.iter().filter(|a| a.iscrowd).count();
        assert_eq!(crowd as u64, expected["crowd"].as_u64().unwrap(), "{rel}");
        let ids: Vec<u64> = serde_json::from_value(expected["categories"].clone()).unwrap();
        assert_eq!(
            dataset.categories.iter().map(|c| c.id).collect::<Vec<_>>(),
            ids
        );
        // Contiguous labels 1..=80 over non-contiguous ids 1..=90.
        assert_eq!(dataset.num_categories(), 80);
        for (i, &id) in ids.iter().enumerate() {
            assert_eq!(dataset.label_of(id), Some(i as u32 + 1));
            assert_eq!(dataset.category_of(i as u32 + 1), Some(id));
        }
        assert_eq!(dataset.label_of(12), None, "COCO has no category 12");
        assert_eq!(dataset.category_of(0), None, "label 0 is background");
        for (image_id, count) in expected["annotations_per_image"].as_object().unwrap() {
            let image_id: u64 = image_id.parse().unwrap();
            assert!(dataset.image(image_id).is_some());
            assert_eq!(
                dataset.annotations_for(image_id).count() as u64,
                count.as_u64().unwrap()
            );
        }
        // Masks from polygons and crowd RLEs equal pycocotools' annToRLE.
        for annotation in &dataset.annotations {
            let image = dataset.image(annotation.image_id).unwrap();
            let rle = annotation
                .segmentation
                .as_ref()
                .unwrap()
                .to_rle(image.height, image.width)
                .unwrap();
            let facts = &expected["masks"][annotation.id.to_string()];
            assert_eq!(
                rle.area(),
                facts["mask_area"].as_u64().unwrap(),
                "annotation {}",
                annotation.id
            );
            let bbox: Vec<f64> = serde_json::from_value(facts["mask_bbox"].clone()).unwrap();
            assert_eq!(rle.bbox().to_vec(), bbox, "annotation {}", annotation.id);
        }
    }
}

#[test]
fn voc_sample_reads_palette_indices() {
    let data = common::shared_data();
    let reference = common::fixture("samples_reference.json");
    let dataset = SegmentationDataset::voc(data.join("voc2012-sample"), None, false).unwrap();
    assert_eq!(dataset.len(), 1);
    assert_eq!(dataset.num_classes(), 21);
    assert!(!dataset.reduce_zero_label());
    let (image, labels) = dataset.load(0).unwrap();
    assert_eq!(image.dimensions(), (500, 375));
    let rel = "voc2012-sample/SegmentationClass/2007_000063.png";
    assert_eq!(reference["label_pngs"][rel]["mode"], "P");
    assert_eq!(histogram(&labels.data), expected_histogram(&reference, rel));
    // Without ImageSets the split file is a clear error.
    let error =
        SegmentationDataset::voc(data.join("voc2012-sample"), Some("val"), false).unwrap_err();
    assert!(
        error.to_string().contains("ImageSets/Segmentation/val.txt"),
        "{error}"
    );
}

#[test]
fn ade20k_samples_reduce_zero_label() {
    let data = common::shared_data();
    let reference = common::fixture("samples_reference.json");
    let dataset = SegmentationDataset::ade20k(data.join("ade20k-samples"), None).unwrap();
    assert_eq!(dataset.len(), 3);
    assert_eq!(dataset.num_classes(), 150);
    assert_eq!(dataset.class_names[0], "wall");
    assert_eq!(dataset.class_names[149], "flag");
    for (i, item) in dataset.items.iter().enumerate() {
        let rel = format!("ade20k-samples/annotations/{}.png", item.id);
        let raw = read_label_png(&item.annotation).unwrap();
        assert_eq!(histogram(&raw.data), expected_histogram(&reference, &rel));
        let (image, labels) = dataset.load(i).unwrap();
        assert_eq!(image.dimensions(), (labels.width, labels.height));
        for (&r, &l) in raw.data.iter().zip(&labels.data) {
            assert_eq!(l, if r == 0 { IGNORE_INDEX } else { r - 1 });
        }
    }
}
