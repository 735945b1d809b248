//! The threaded loader on the synthetic set: batch layout, normalisation, determinism.

use mobileone_datasets::loader::{CocoDetection, LabelMode, Loader, LoaderConfig, Normalize};
use mobileone_datasets::synth::{write_dataset, SynthConfig};
use mobileone_datasets::transforms::{Compose, Resize};
use mobileone_datasets::{CocoDataset, SegmentationDataset, IGNORE_INDEX};
use std::sync::Arc;

fn synth_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let config = SynthConfig {
        images: 10,
        seed: 2,
        size: 96,
        val_fraction: 0.0,
        ..SynthConfig::default()
    };
    write_dataset(dir.path(), &config, &|| {}).unwrap();
    dir
}

fn batches(loader: &Arc<Loader>, epoch: u64) -> Vec<mobileone_datasets::Batch> {
    loader.epoch(epoch).collect::<Result<_, _>>().unwrap()
}

#[test]
fn detection_batches_are_nchw_and_deterministic() {
    let dir = synth_dir();
    let dataset = CocoDataset::open(dir.path().join("annotations/instances_train.json")).unwrap();
    let source = Arc::new(CocoDetection::new(
        dataset,
        dir.path().join("train"),
        LabelMode::Contiguous,
    ));
    let make = |workers| {
        let config = LoaderConfig {
            batch_size: 4,
            num_workers: workers,
            seed: 5,
            ..LoaderConfig::default()
        };
        Arc::new(
            Loader::new(
                source.clone(),
                Arc::new(Compose::ssd_train(64, [0.0; 3])),
                config,
            )
            .unwrap(),
        )
    };
    let (one, three) = (make(1), make(3));
    assert_eq!(one.num_batches(), 2, "10 images, batch 4, drop_last");
    let a = batches(&one, 0);
    let b = batches(&three, 0);
    assert_eq!(a.len(), 2);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.shape, [4, 3, 64, 64]);
        assert_eq!(x.images.len(), 4 * 3 * 64 * 64);
        assert_eq!(x.images, y.images, "independent of the number of workers");
        assert_eq!(x.targets, y.targets);
        assert!(x.masks.is_none());
        for target in &x.targets {
            assert_eq!(target.boxes.len(), target.labels.len());
            assert!(target.labels.iter().all(|&l| (1..=7).contains(&l)));
            assert!(target
                .boxes
                .iter()
                .flatten()
                .all(|&v| (0.0..=64.0).contains(&v)));
        }
    }
    let other_epoch = batches(&one, 1);
    assert_ne!(
        other_epoch[0].indices, a[0].indices,
        "each epoch has its own order"
    );
}

#[test]
fn segmentation_batches_carry_masks_and_normalise() {
    let dir = synth_dir();
    let source = Arc::new(SegmentationDataset::voc(dir.path(), Some("train"), false).unwrap());
    let config = LoaderConfig {
        batch_size: 3,
        shuffle: false,
        drop_last: false,
        normalize: Some(Normalize {
            mean: [0.5; 3],
            std: [0.5; 3],
        }),
        ..LoaderConfig::default()
    };
    let loader = Arc::new(
        Loader::new(
            source.clone(),
            Arc::new(Resize {
                width: 48,
                height: 32,
            }),
            config,
        )
        .unwrap(),
    );
    let all = batches(&loader, 0);
    assert_eq!(all.len(), 4);
    assert_eq!(all[3].shape, [1, 3, 32, 48], "last partial batch kept");
    let first = &all[0];
    assert_eq!(first.indices, vec![0, 1, 2]);
    let masks = first.masks.as_ref().unwrap();
    assert_eq!(masks.len(), 3 * 32 * 48);
    assert!(masks.iter().all(|&v| v <= 7 || v == IGNORE_INDEX));
    assert!(first.images.iter().all(|&v| (-1.0..=1.0).contains(&v)));
    // Channel 0 of pixel (1, 0) of image 0, against the same sample outside the loader.
    let resized = loader.sample(0, 0).unwrap();
    assert!((first.images[1] - (resized.image.data[3] / 255.0 - 0.5) / 0.5).abs() < 1e-6);
    assert_eq!(&masks[..48 * 32], &resized.mask.unwrap().data[..]);
}

#[test]
fn unreadable_images_end_the_epoch_with_an_error() {
    let dir = synth_dir();
    let dataset = CocoDataset::open(dir.path().join("annotations/instances_train.json")).unwrap();
    std::fs::write(dir.path().join("train/000000000003.jpg"), b"not a jpeg").unwrap();
    let source = Arc::new(CocoDetection::new(
        dataset,
        dir.path().join("train"),
        LabelMode::CategoryId,
    ));
    let config = LoaderConfig {
        batch_size: 10,
        shuffle: false,
        ..LoaderConfig::default()
    };
    let loader = Arc::new(
        Loader::new(
            source,
            Arc::new(Resize {
                width: 32,
                height: 32,
            }),
            config,
        )
        .unwrap(),
    );
    let results: Vec<_> = loader.epoch(0).collect();
    assert_eq!(results.len(), 1);
    let message = results[0].as_ref().unwrap_err().to_string();
    assert!(
        message.contains("000000000003.jpg") && message.contains("cannot decode"),
        "{message}"
    );
}

/// A source whose third sample panics.
struct Panicking;

impl mobileone_datasets::SampleSource for Panicking {
    fn len(&self) -> usize {
        4
    }
    fn load(&self, index: usize) -> mobileone_datasets::Result<mobileone_datasets::Sample> {
        assert_ne!(index, 2, "boom");
        Ok(mobileone_datasets::Sample::new(&image::RgbImage::new(4, 4)))
    }
}

#[test]
fn a_panicking_sample_is_an_error_not_a_short_epoch() {
    let config = LoaderConfig {
        batch_size: 2,
        shuffle: false,
        ..LoaderConfig::default()
    };
    let loader = Arc::new(
        Loader::new(
            Arc::new(Panicking),
            Arc::new(Resize {
                width: 4,
                height: 4,
            }),
            config,
        )
        .unwrap(),
    );
    let results: Vec<_> = loader.epoch(0).collect();
    assert_eq!(results.len(), 2);
    assert!(results[0].is_ok());
    let message = results[1].as_ref().unwrap_err().to_string();
    assert!(
        message.contains("panicked") && message.contains("[2, 3]"),
        "{message}"
    );
}
