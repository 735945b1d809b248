//! Measures the loader's images/s on a synthetic dataset with the SSD and segmentation training
//! pipelines.
//!
//! cargo run --release -p mobileone-datasets --example loader_throughput -- DIR [WORKERS]
//! (DIR is created with 256 synthetic 320 px images when it does not exist)

use mobileone_datasets::loader::{CocoDetection, LabelMode, Loader, LoaderConfig};
use mobileone_datasets::synth::{write_dataset, SynthConfig};
use mobileone_datasets::transforms::Compose;
use mobileone_datasets::{CocoDataset, SampleSource, SegmentationDataset, Transform};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

fn measure(
    name: &str,
    source: Arc<dyn SampleSource>,
    transform: Arc<dyn Transform>,
    workers: usize,
) {
    let config = LoaderConfig {
        batch_size: 32,
        num_workers: workers,
        ..LoaderConfig::default()
    };
    let loader = Arc::new(Loader::new(source, transform, config).expect("loader"));
    let start = Instant::now();
    let mut images = 0;
    for batch in loader.epoch(0) {
        images += batch.expect("batch").shape[0];
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{name}: {images} images in {seconds:.2}s = {:.0} images/s with {workers} workers",
        images as f64 / seconds
    );
}

fn main() {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "/tmp/synth_throughput".into()),
    );
    let workers = std::env::args()
        .nth(2)
        .map_or(2, |w| w.parse().expect("WORKERS is a number"));
    if !dir.exists() {
        let config = SynthConfig {
            images: 256,
            val_fraction: 0.0,
            ..SynthConfig::default()
        };
        write_dataset(&dir, &config, &|| {}).expect("generate");
    }
    let coco = CocoDataset::open(dir.join("annotations/instances_train.json")).expect("coco");
    let detection = Arc::new(CocoDetection::new(
        coco,
        dir.join("train"),
        LabelMode::Contiguous,
    ));
    measure(
        "ssd_train 320",
        detection,
        Arc::new(Compose::ssd_train(320, [124.0, 116.0, 104.0])),
        workers,
    );
    let voc = Arc::new(SegmentationDataset::voc(&dir, Some("train"), false).expect("voc"));
    measure(
        "seg_train 320 crop",
        voc,
        Arc::new(Compose::seg_train((640, 320), 320)),
        workers,
    );
}
