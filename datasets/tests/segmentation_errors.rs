//! Bad segmentation inputs give errors that name the file.

use mobileone_datasets::io::{encode_label_png, voc_palette, LabelMap};
use mobileone_datasets::{DatasetError, SegmentationDataset};
use std::path::Path;

fn write_voc(root: &Path, image_size: (u32, u32), labels: &LabelMap) {
    std::fs::create_dir_all(root.join("JPEGImages")).unwrap();
    std::fs::create_dir_all(root.join("SegmentationClass")).unwrap();
    std::fs::create_dir_all(root.join("ImageSets/Segmentation")).unwrap();
    image::RgbImage::new(image_size.0, image_size.1)
        .save(root.join("JPEGImages/a.jpg"))
        .unwrap();
    let png = encode_label_png(labels, Some(&voc_palette())).unwrap();
    std::fs::write(root.join("SegmentationClass/a.png"), png).unwrap();
    std::fs::write(root.join("ImageSets/Segmentation/val.txt"), "a\n").unwrap();
}

#[test]
fn mask_of_another_size_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    write_voc(dir.path(), (8, 8), &LabelMap::new(8, 6, 1));
    let dataset = SegmentationDataset::voc(dir.path(), Some("val"), false).unwrap();
    let error = dataset.load(0).unwrap_err();
    assert!(matches!(error, DatasetError::MaskSizeMismatch { .. }));
    let message = error.to_string();
    assert!(
        message.contains("a.png: annotation is 8x6 but its image"),
        "{message}"
    );
    assert!(message.contains("a.jpg is 8x8"), "{message}");
    assert!(dataset.check_item(0).is_err());
}

#[test]
fn labels_outside_the_classes_are_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut labels = LabelMap::new(8, 8, 255);
    labels.data[5] = 21;
    write_voc(dir.path(), (8, 8), &labels);
    let dataset = SegmentationDataset::voc(dir.path(), Some("val"), false).unwrap();
    let message = dataset.load(0).unwrap_err().to_string();
    assert!(
        message.contains("a.png: label 21 is outside the 21 classes"),
        "{message}"
    );
}

#[test]
fn not_a_png_and_missing_folders_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    write_voc(dir.path(), (8, 8), &LabelMap::new(8, 8, 0));
    std::fs::write(dir.path().join("SegmentationClass/a.png"), b"garbage").unwrap();
    let dataset = SegmentationDataset::voc(dir.path(), Some("val"), false).unwrap();
    let message = dataset.load(0).unwrap_err().to_string();
    assert!(message.contains("a.png: cannot decode image"), "{message}");
    let message = SegmentationDataset::voc(dir.path().join("nothing"), None, false)
        .unwrap_err()
        .to_string();
    assert!(message.contains("not a Pascal VOC root"), "{message}");
    let message = SegmentationDataset::ade20k(dir.path(), Some("training"))
        .unwrap_err()
        .to_string();
    assert!(message.contains("annotations/training"), "{message}");
}
