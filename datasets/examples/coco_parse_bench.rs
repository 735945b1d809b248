//! Times `CocoDataset::open` on a generated COCO-train2017-sized instances file (118 287 images,
//! ~860 000 annotations with polygons, 1% crowd RLE; about 450 MB).
//!
//! cargo run --release -p mobileone-datasets --example coco_parse_bench -- /tmp/big_instances.json
//! (the file is generated on the first run and reused afterwards)

use mobileone_datasets::CocoDataset;
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::time::Instant;

const IMAGES: u64 = 118_287;
const ANNOTATIONS: u64 = 860_001;

fn generate(path: &std::path::Path) -> std::io::Result<()> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    write!(
        out,
        r#"{{"info": {{"description": "generated"}}, "licenses": [], "images": ["#
    )?;
    for id in 1..=IMAGES {
        let sep = if id == 1 { "" } else { ", " };
        write!(
            out,
            r#"{sep}{{"license": 3, "file_name": "{id:012}.jpg", "coco_url": "http://images.cocodataset.org/train2017/{id:012}.jpg", "height": 480, "width": 640, "date_captured": "2013-11-14 16:28:13", "flickr_url": "http://farm4.staticflickr.com/x.jpg", "id": {id}}}"#
        )?;
    }
    write!(out, r#"], "annotations": ["#)?;
    for id in 1..=ANNOTATIONS {
        let sep = if id == 1 { "" } else { ", " };
        let image_id = rng.random_range(1..=IMAGES);
        let category_id = rng.random_range(1..=90u64);
        let (x, y) = (
            rng.random_range(0.0..500.0f64),
            rng.random_range(0.0..400.0f64),
        );
        let segmentation = if id % 100 == 0 {
            let runs: Vec<String> = (0..200)
                .map(|_| rng.random_range(1..600u32).to_string())
                .collect();
            format!(r#"{{"counts": [{}], "size": [480, 640]}}"#, runs.join(","))
        } else {
            let points: Vec<String> = (0..rng.random_range(12..36) * 2)
                .map(|_| format!("{:.2}", rng.random_range(0.0..400.0f64)))
                .collect();
            format!("[[{}]]", points.join(","))
        };
        write!(
            out,
            r#"{sep}{{"segmentation": {segmentation}, "area": {:.5}, "iscrowd": {}, "image_id": {image_id}, "bbox": [{x:.2}, {y:.2}, {:.2}, {:.2}], "category_id": {category_id}, "id": {id}}}"#,
            rng.random_range(10.0..90000.0f64),
            u8::from(id % 100 == 0),
            rng.random_range(1.0..140.0f64),
            rng.random_range(1.0..80.0f64)
        )?;
    }
    write!(out, r#"], "categories": ["#)?;
    for id in 1..=90 {
        let sep = if id == 1 { "" } else { ", " };
        write!(
            out,
            r#"{sep}{{"supercategory": "thing", "id": {id}, "name": "class{id}"}}"#
        )?;
    }
    write!(out, "]}}")?;
    out.flush()
}

fn main() {
    let path = std::path::PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "/tmp/big_instances.json".into()),
    );
    if !path.exists() {
        let start = Instant::now();
        generate(&path).expect("write the benchmark file");
        println!(
            "generated {} in {:.1}s",
            path.display(),
            start.elapsed().as_secs_f64()
        );
    }
    let size = std::fs::metadata(&path).expect("stat").len() as f64 / 1e6;
    for run in 0..3 {
        let start = Instant::now();
        let dataset = CocoDataset::open(&path).expect("parse");
        let seconds = start.elapsed().as_secs_f64();
        println!(
            "run {run}: {size:.0} MB, {} images, {} annotations: read + parse + index in {seconds:.2}s ({:.0} MB/s)",
            dataset.images.len(),
            dataset.annotations.len(),
            size / seconds
        );
    }
}
