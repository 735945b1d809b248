//! The synthetic dataset read back through the readers: areas, boxes and masks agree.

use mobileone_datasets::io::read_label_png;
use mobileone_datasets::synth::{generate_image, write_dataset, SynthConfig, SHAPE_CLASSES};
use mobileone_datasets::{CocoDataset, SegmentationDataset, IGNORE_INDEX};
use std::path::Path;

fn generate(dir: &Path, seed: u64) -> SynthConfig {
    let config = SynthConfig {
        images: 12,
        seed,
        size: 128,
        val_fraction: 0.25,
        ..SynthConfig::default()
    };
    write_dataset(dir, &config, &|| {}).unwrap();
    config
}

#[test]
fn coco_round_trip_is_consistent_with_masks() {
    let dir = tempfile::tempdir().unwrap();
    generate(dir.path(), 3);
    let train = CocoDataset::open(dir.path().join("annotations/instances_train.json")).unwrap();
    let val = CocoDataset::open(dir.path().join("annotations/instances_val.json")).unwrap();
    assert_eq!((train.images.len(), val.images.len()), (9, 3));
    assert_eq!(train.num_categories(), SHAPE_CLASSES.len());
    assert!(SHAPE_CLASSES.len() >= 6);
    let voc = SegmentationDataset::voc(dir.path(), Some("train"), false).unwrap();
    assert_eq!(voc.len(), 9);
    assert_eq!(voc.num_classes(), SHAPE_CLASSES.len() + 1);
    let (mut polygons, mut occluded) = (0, 0);
    for (split, dataset) in [("train", &train), ("val", &val)] {
        for image in &dataset.images {
            let path = dir.path().join(split).join(&image.file_name);
            assert_eq!(image::image_dimensions(&path).unwrap(), (128, 128));
            let stem = image.file_name.trim_end_matches(".jpg");
            let semantic = read_label_png(
                &dir.path()
                    .join(format!("VOC2012/SegmentationClass/{stem}.png")),
            )
            .unwrap();
            let annotations: Vec<_> = dataset.annotations_for(image.id).collect();
            assert!(
                annotations.len() <= 11,
                "1-10 shapes plus at most one crowd region"
            );
            let mut claimed = vec![false; semantic.data.len()];
            for annotation in annotations {
                let segmentation = annotation.segmentation.as_ref().unwrap();
                match segmentation {
                    mobileone_datasets::Segmentation::Polygons(_) => polygons += 1,
                    _ if annotation.iscrowd => {}
                    _ => occluded += 1,
                }
                let rle = segmentation.to_rle(image.height, image.width).unwrap();
                assert_eq!(
                    rle.area() as f64,
                    annotation.area,
                    "annotation {}",
                    annotation.id
                );
                assert_eq!(rle.bbox(), annotation.bbox, "annotation {}", annotation.id);
                assert!(annotation.area >= 20.0);
                for (i, &on) in rle.to_mask().iter().enumerate() {
                    if on == 1 {
                        assert_eq!(semantic.data[i] as u64, annotation.category_id);
                        assert!(!claimed[i], "visible masks do not overlap");
                        claimed[i] = true;
                    }
                }
            }
        }
    }
    assert!(
        polygons > 0 && occluded > 0,
        "{polygons} polygons, {occluded} occluded"
    );
}

#[test]
fn ade20k_layout_reduces_background_to_ignore() {
    let dir = tempfile::tempdir().unwrap();
    generate(dir.path(), 5);
    let ade = SegmentationDataset::ade20k(dir.path(), Some("validation")).unwrap();
    assert_eq!(ade.len(), 3);
    assert_eq!(ade.class_names, SHAPE_CLASSES.to_vec());
    let voc = SegmentationDataset::voc(dir.path(), Some("val"), false).unwrap();
    for i in 0..ade.len() {
        let (image, labels) = ade.load(i).unwrap();
        assert_eq!(image.dimensions(), (128, 128));
        let (_, voc_labels) = voc.load(i).unwrap();
        for (&a, &v) in labels.data.iter().zip(&voc_labels.data) {
            assert_eq!(a, if v == 0 { IGNORE_INDEX } else { v - 1 });
        }
    }
}

#[test]
fn generation_is_deterministic_by_seed() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    generate(a.path(), 11);
    generate(b.path(), 11);
    for file in [
        "annotations/instances_train.json",
        "train/000000000001.jpg",
        "VOC2012/SegmentationClass/000000000004.png",
        "VOC2012/ImageSets/Segmentation/val.txt",
    ] {
        assert_eq!(
            std::fs::read(a.path().join(file)).unwrap(),
            std::fs::read(b.path().join(file)).unwrap(),
            "{file}"
        );
    }
    let one = generate_image(
        &SynthConfig {
            seed: 11,
            size: 128,
            ..SynthConfig::default()
        },
        0,
    );
    let written =
        read_label_png(&a.path().join("VOC2012/SegmentationClass/000000000001.png")).unwrap();
    assert_eq!(
        one.labels, written,
        "the in-memory image is the one written"
    );
    assert_ne!(
        generate_image(
            &SynthConfig {
                seed: 12,
                size: 128,
                ..SynthConfig::default()
            },
            0
        )
        .image,
        one.image
    );
}

#[test]
fn crowd_regions_and_sizes_cover_the_range() {
    // Over many images: crowd regions appear, sizes span small to large, all classes occur.
    let (mut crowd, mut small, mut large) = (0, 0, 0);
    let mut classes = [0usize; 8];
    for index in 0..60 {
        let synth = generate_image(
            &SynthConfig {
                seed: 1,
                size: 160,
                ..SynthConfig::default()
            },
            index,
        );
        for object in &synth.objects {
            crowd += object.iscrowd as usize;
            classes[object.label as usize] += 1;
            small += (object.area < 32 * 32) as usize;
            large += (object.area > 96 * 96) as usize;
        }
    }
    assert!(
        crowd > 0 && small > 0 && large > 0,
        "crowd {crowd} small {small} large {large}"
    );
    assert!(classes[1..].iter().all(|&c| c > 0), "{classes:?}");
}
