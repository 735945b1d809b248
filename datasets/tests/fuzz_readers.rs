//! Truncated and bit-flipped copies of the real sample files (JPEG photos, palette and greyscale label
//! PNGs, COCO instances JSON, YOLO labels) fed to every reader: each must return (an image, or an
//! error naming the file), never panic. Seeded, so a failure names an input that can be rebuilt.
mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use mobileone_datasets::imaging::read_rgb;
use mobileone_datasets::io::read_label_png;
use mobileone_datasets::yolo::YoloDataset;
use mobileone_datasets::CocoDataset;

/// Mutants of `bytes`: cut at 1 %, 10 %, 35 %, 60 %, 90 % and 99.9 % of the length, and 12 copies with
/// 1–8 bits flipped at positions from a fixed linear congruential sequence.
fn mutants(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for permille in [10usize, 100, 350, 600, 900, 999] {
        out.push((
            format!("cut at {permille}‰"),
            bytes[..bytes.len() * permille / 1000].to_vec(),
        ));
    }
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as usize
    };
    for copy in 0..12 {
        let mut m = bytes.to_vec();
        let flips = 1 + copy % 8;
        let mut at = Vec::new();
        for _ in 0..flips {
            let position = next() % m.len();
            m[position] ^= 1 << (next() % 8);
            at.push(position);
        }
        out.push((format!("bits flipped at {at:?}"), m));
    }
    out
}

/// Writes each mutant to `dir/name` and calls `read` on it: a panic fails the test with the mutant's
/// description; an error must name the file.
fn check_reader<T>(
    dir: &Path,
    source: &Path,
    name: &str,
    read: impl Fn(&Path) -> Result<T, String>,
) -> (usize, usize) {
    let bytes = std::fs::read(source).unwrap();
    let (mut ok, mut refused) = (0, 0);
    for (what, mutant) in mutants(&bytes) {
        let path = dir.join(name);
        std::fs::write(&path, &mutant).unwrap();
        match catch_unwind(AssertUnwindSafe(|| read(&path))) {
            Err(_) => panic!("{} ({what}) made the reader panic", source.display()),
            Ok(Ok(_)) => ok += 1,
            Ok(Err(message)) => {
                assert!(
                    message.contains(name),
                    "{} ({what}): the error names no file: {message}",
                    source.display()
                );
                refused += 1;
            }
        }
    }
    (ok, refused)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fuzz-readers-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn images_and_label_pngs() {
    let data = common::shared_data();
    let dir = scratch("images");
    let mut refused_truncated_jpeg = 0;
    for rel in [
        "photos/owl.jpg",
        "photos/grace_hopper.jpg",
        "coco-val2017-samples/images/000000128372.jpg",
        "camvid/images/train/0001TP_006690.jpg",
    ] {
        let (_, refused) = check_reader(&dir, &data.join(rel), "mutant.jpg", |p| {
            read_rgb(p).map_err(|e| e.to_string())
        });
        refused_truncated_jpeg += refused;
    }
    // Every cut JPEG lacks its end: all six cuts of each of the four photos are refused.
    assert!(
        refused_truncated_jpeg >= 24,
        "only {refused_truncated_jpeg} refusals"
    );
    for rel in [
        "voc2012-sample/SegmentationClass/2007_000063.png",
        "ade20k-samples/annotations/ADE_val_00000001.png",
        "camvid/labels/train/0001TP_006690.png",
    ] {
        check_reader(&dir, &data.join(rel), "mutant.png", |p| {
            read_label_png(p).map_err(|e| e.to_string())
        });
        check_reader(&dir, &data.join(rel), "mutant.png", |p| {
            read_rgb(p).map_err(|e| e.to_string())
        });
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn coco_json_and_yolo_labels() {
    let data = common::shared_data();
    let dir = scratch("json");
    for rel in [
        "coco-val2017-samples/instances_val2017_5.json",
        "coco-val2014-100/instances_val2014_100.json",
    ] {
        let (_, refused) = check_reader(&dir, &data.join(rel), "mutant.json", |p| {
            CocoDataset::open(p).map_err(|e| e.to_string())
        });
        assert!(refused >= 6, "{rel}: every cut is invalid JSON");
    }
    // A YOLO layout whose one label file is mutated; errors must name the label file.
    let root = dir.join("yolo");
    std::fs::create_dir_all(root.join("images/val")).unwrap();
    std::fs::create_dir_all(root.join("labels/val")).unwrap();
    std::fs::write(
        root.join("data.yaml"),
        "path: .\nval: images/val\nnames:\n  0: person\n",
    )
    .unwrap();
    let source = data.join("coco-person/labels/val");
    let label = std::fs::read_dir(&source)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let stem = label.file_stem().unwrap().to_str().unwrap().to_string();
    std::fs::copy(
        data.join(format!("coco-person/images/val/{stem}.jpg")),
        root.join(format!("images/val/{stem}.jpg")),
    )
    .unwrap();
    let labels_dir = root.join("labels/val");
    check_reader(&labels_dir, &label, &format!("{stem}.txt"), |_| {
        YoloDataset::open(&root)
            .and_then(|y| y.split("val"))
            .map_err(|e| e.to_string())
    });
    std::fs::remove_dir_all(dir).unwrap();
}
