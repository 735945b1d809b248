//! The YOLO layout on `MOBILEONE_DATA/coco-person` (real COCO person boxes, written by the data's
//! publisher): the counts its README states, image ids from the COCO file names, and an exact round
//! trip YOLO → COCO → YOLO → COCO on a copy of 25 validation images.
mod common;

use mobileone_datasets::yolo::{write_split, ImageIds, YoloDataset};

#[test]
fn coco_person_reads_as_its_readme_says() {
    let yolo = YoloDataset::open(&common::shared_data().join("coco-person")).unwrap();
    assert_eq!(yolo.names, vec!["person"]);
    for (split, images, boxes) in [("train", 1993, 8668), ("val", 400, 1356)] {
        let read = yolo.split(split).unwrap();
        assert_eq!(
            (read.dataset.images.len(), read.dataset.annotations.len()),
            (images, boxes),
            "{split}"
        );
        assert_eq!(read.image_ids, ImageIds::FromFileNames);
        assert_eq!(read.dropped_empty, 0);
        // `000000000139.jpg` is COCO image 139; every box lies inside its image.
        for image in &read.dataset.images {
            let stem: u64 = image.file_name.trim_end_matches(".jpg").parse().unwrap();
            assert_eq!(image.id, stem);
            assert!(
                image.width.max(image.height) <= 384,
                "{}: longest side at most 384",
                image.file_name
            );
        }
        for a in &read.dataset.annotations {
            let image = read
                .dataset
                .images
                .iter()
                .find(|i| i.id == a.image_id)
                .unwrap();
            let [x, y, w, h] = a.bbox;
            assert!(
                x >= -1e-6
                    && y >= -1e-6
                    && x + w <= image.width as f64 + 1e-6
                    && y + h <= image.height as f64 + 1e-6
            );
            assert_eq!(a.category_id, 1);
            assert!((a.area - w * h).abs() < 1e-9);
        }
    }
}

#[test]
fn yolo_to_coco_to_yolo_is_exact_to_float_precision() {
    let data = common::shared_data().join("coco-person");
    let dir = std::env::temp_dir().join(format!("yolo-roundtrip-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // A 25-image copy of the val split.
    let small = dir.join("small");
    std::fs::create_dir_all(small.join("images/val")).unwrap();
    std::fs::create_dir_all(small.join("labels/val")).unwrap();
    let mut stems: Vec<String> = std::fs::read_dir(data.join("labels/val"))
        .unwrap()
        .map(|e| {
            e.unwrap()
                .path()
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    stems.sort();
    for stem in stems.iter().take(25) {
        std::fs::copy(
            data.join(format!("images/val/{stem}.jpg")),
            small.join(format!("images/val/{stem}.jpg")),
        )
        .unwrap();
        std::fs::copy(
            data.join(format!("labels/val/{stem}.txt")),
            small.join(format!("labels/val/{stem}.txt")),
        )
        .unwrap();
    }
    std::fs::write(
        small.join("data.yaml"),
        "path: .\nval: images/val\nnames: [person]\n",
    )
    .unwrap();
    let first = YoloDataset::open(&small).unwrap().split("val").unwrap();
    let out = dir.join("again");
    assert_eq!(
        write_split(&first.dataset, &first.image_root, &out, "val").unwrap(),
        0
    );
    let second = YoloDataset::open(&out).unwrap().split("val").unwrap();
    assert_eq!(first.dataset.images, second.dataset.images);
    assert_eq!(
        first.dataset.annotations.len(),
        second.dataset.annotations.len()
    );
    for (a, b) in first
        .dataset
        .annotations
        .iter()
        .zip(&second.dataset.annotations)
    {
        assert_eq!(
            (a.id, a.image_id, a.category_id),
            (b.id, b.image_id, b.category_id)
        );
        for (u, v) in a.bbox.iter().zip(&b.bbox) {
            assert!(
                (u - v).abs() <= 1e-9 * u.abs().max(1.0),
                "{:?} vs {:?}",
                a.bbox,
                b.bbox
            );
        }
    }
    // The label text itself survives: same numbers as the source files, line by line.
    for stem in stems.iter().take(25) {
        let parse = |p: std::path::PathBuf| -> Vec<f64> {
            std::fs::read_to_string(p)
                .unwrap()
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect()
        };
        let (src, dst) = (
            parse(small.join(format!("labels/val/{stem}.txt"))),
            parse(out.join(format!("labels/val/{stem}.txt"))),
        );
        assert_eq!(src.len(), dst.len());
        for (u, v) in src.iter().zip(&dst) {
            assert!((u - v).abs() <= 1e-12, "{stem}: {u} vs {v}");
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}
