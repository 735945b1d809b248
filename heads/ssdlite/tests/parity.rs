//! Parity with torchvision's SSD on the fixtures written by tools/reference/ssdlite_fixtures.py.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use ssdlite::anchors::{Box4, DefaultBoxGenerator};
use ssdlite::box_coder::BoxCoder;
use ssdlite::matcher::{box_iou, SsdMatcher};
use ssdlite::transform::{resize_bilinear, rgb8_to_chw};
use ssdlite::{Detection, ImageView, Overrides, SsdDetector, SsdLoss, Target};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("reference.safetensors"), &Device::Cpu).unwrap()
}

fn floats(r: &HashMap<String, Tensor>, key: &str) -> Vec<f32> {
    r[key].flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn boxes(r: &HashMap<String, Tensor>, key: &str) -> Vec<Box4> {
    floats(r, key)
        .chunks_exact(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn photo() -> image::RgbImage {
    image::open(fixture("pets_213x160.png")).unwrap().to_rgb8()
}

#[test]
fn anchors_match_torchvision() {
    let r = reference();
    let gen = DefaultBoxGenerator::ssdlite(6);
    type Case = (&'static str, Vec<(usize, usize)>, (usize, usize));
    let cases: [Case; 3] = [
        (
            "320",
            vec![(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)],
            (320, 320),
        ),
        (
            "160",
            vec![(10, 10), (5, 5), (3, 3), (2, 2), (1, 1), (1, 1)],
            (160, 160),
        ),
        (
            "150x200",
            vec![(10, 13), (5, 7), (3, 4), (2, 2), (1, 1), (1, 1)],
            (150, 200),
        ),
    ];
    for (name, grids, size) in cases {
        let ours: Vec<f32> = gen.generate(&grids, size).into_iter().flatten().collect();
        let theirs = floats(&r, &format!("anchors.{name}"));
        let err = max_abs_diff(&ours, &theirs);
        eprintln!("anchors {name}: {} boxes, max |diff| {err}", ours.len() / 4);
        assert!(err <= 1e-6, "anchors {name}: max |diff| {err}");
    }
}

#[test]
fn box_coder_matches_torchvision() {
    let r = reference();
    let coder = BoxCoder::default();
    let anchors = boxes(&r, "coder.anchors");
    let targets = boxes(&r, "coder.boxes");
    let encoded: Vec<f32> = targets
        .iter()
        .zip(&anchors)
        .flat_map(|(t, a)| coder.encode(t, a))
        .collect();
    let err = max_abs_diff(&encoded, &floats(&r, "coder.encoded"));
    eprintln!("encode: max |diff| {err}");
    assert!(err <= 1e-5, "encode: max |diff| {err}");
    let wild = boxes(&r, "coder.wild_codes");
    let decoded: Vec<f32> = wild
        .iter()
        .zip(&anchors)
        .flat_map(|(c, a)| coder.decode(c, a))
        .collect();
    let theirs = floats(&r, "coder.wild_decoded");
    for (x, y) in decoded.iter().zip(&theirs) {
        assert!(
            (x - y).abs() <= 1e-5 * y.abs().max(1.0),
            "decode of clamped codes: {x} vs {y}"
        );
    }
}

#[test]
fn bilinear_resize_matches_f_interpolate() {
    let r = reference();
    let x = floats(&r, "resize.random_in");
    let ours = resize_bilinear(&x, 3, (17, 23), (40, 31)).unwrap();
    let err = max_abs_diff(&ours, &floats(&r, "resize.random_out_40x31"));
    eprintln!("resize 17x23 -> 40x31: max |diff| {err}");
    assert!(err <= 1e-6, "random 17x23 -> 40x31: max |diff| {err}");
    let img = photo();
    let chw = rgb8_to_chw(img.as_raw(), 160, 213);
    let ours = resize_bilinear(&chw, 3, (160, 213), (48, 64)).unwrap();
    let err = max_abs_diff(&ours, &floats(&r, "resize.photo_out_48x64"));
    eprintln!("resize photo -> 48x64: max |diff| {err}");
    assert!(err <= 1e-6, "photo 160x213 -> 48x64: max |diff| {err}");
}

fn tiny_detector(fuse: bool) -> SsdDetector {
    let (mut detector, labels) = SsdDetector::load(
        &fixture("tiny_ssdlite.safetensors"),
        &Overrides::default(),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(labels.names.len(), 11);
    if fuse {
        detector.fuse().unwrap();
    }
    detector
}

#[test]
fn transform_matches_generalized_rcnn_transform() {
    let r = reference();
    let img = photo();
    let input = tiny_detector(false)
        .transform()
        .apply(img.as_raw(), 160, 213)
        .unwrap();
    let corner: Vec<f32> = (0..3)
        .flat_map(|c| (0..32).flat_map(move |y| (0..32).map(move |x| (c, y, x))))
        .map(|(c, y, x)| input[c * 320 * 320 + y * 320 + x])
        .collect();
    let err = max_abs_diff(&corner, &floats(&r, "transform.photo_corner"));
    eprintln!("transform: max |diff| {err}");
    assert!(err <= 1e-5, "normalised, resized input: max |diff| {err}");
}

fn targets(r: &HashMap<String, Tensor>) -> Vec<Target> {
    (0..3)
        .map(|i| Target {
            boxes: boxes(r, &format!("loss.target{i}.boxes")),
            labels: r[&format!("loss.target{i}.labels")]
                .to_vec1::<i64>()
                .unwrap()
                .into_iter()
                .map(|l| l as usize)
                .collect(),
        })
        .collect()
}

#[test]
fn matcher_and_loss_match_torchvision() {
    let r = reference();
    let anchors = boxes(&r, "anchors.160");
    let targets = targets(&r);
    for (i, t) in targets.iter().enumerate() {
        let ours: Vec<i64> = SsdMatcher::default()
            .assign(&t.boxes, &anchors)
            .into_iter()
            .map(|m| m.to_index())
            .collect();
        let theirs = r[&format!("loss.matched{i}")].to_vec1::<i64>().unwrap();
        assert_eq!(ours, theirs, "matches of image {i}");
    }
    let (losses, _) = SsdLoss::default()
        .compute(
            &r["loss.cls_logits"],
            &r["loss.bbox_regression"],
            &anchors,
            &targets,
        )
        .unwrap();
    let bbox = losses.bbox_regression.to_scalar::<f32>().unwrap();
    let cls = losses.classification.to_scalar::<f32>().unwrap();
    let (want_bbox, want_cls) = (
        floats(&r, "loss.bbox_value")[0],
        floats(&r, "loss.cls_value")[0],
    );
    eprintln!("losses on given outputs: bbox {bbox} vs {want_bbox}, cls {cls} vs {want_cls}");
    assert!(
        (bbox - want_bbox).abs() <= 1e-5 * want_bbox,
        "bbox loss {bbox} vs {want_bbox}"
    );
    assert!(
        (cls - want_cls).abs() <= 1e-5 * want_cls,
        "classification loss {cls} vs {want_cls}"
    );
}

#[test]
fn head_outputs_match_torchvision() {
    let r = reference();
    let detector = tiny_detector(false);
    let img = photo();
    let view = ImageView {
        pixels: img.as_raw(),
        height: 160,
        width: 213,
    };
    let batch = detector.preprocess(&[view], &Device::Cpu).unwrap();
    let out = detector.head_outputs(&batch, false).unwrap();
    for (name, t) in [
        ("cls_logits", &out.cls_logits),
        ("bbox_regression", &out.bbox_regression),
    ] {
        // The fixture keeps every other anchor.
        let (_, num_anchors, columns) = t.dims3().unwrap();
        let rows: Vec<u32> = (0..num_anchors as u32).step_by(2).collect();
        let rows = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
        let ours = t.get(0).unwrap().index_select(&rows, 0).unwrap();
        assert_eq!(ours.dim(1).unwrap(), columns);
        let ours = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let theirs = floats(&r, &format!("head.{name}"));
        let scale = theirs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = max_abs_diff(&ours, &theirs);
        eprintln!("head {name}: max |diff| {err} (max |value| {scale})");
        assert!(
            err <= 1e-4 * scale,
            "{name}: max |diff| {err} (max |value| {scale})"
        );
    }
}

/// Share of the reference's top `k` detections that we also produce: same class, IoU ≥ 0.99,
/// |score difference| ≤ 1e-4.
fn matched_share(ours: &[Detection], reference: &[Detection], k: usize) -> f64 {
    let top = &reference[..k.min(reference.len())];
    let (mut worst_iou, mut worst_score) = (1f32, 0f32);
    let found = top
        .iter()
        .filter(|want| {
            let hit = ours.iter().find(|d| {
                d.label == want.label
                    && (d.score - want.score).abs() <= 1e-4
                    && box_iou(&d.bbox, &want.bbox) >= 0.99
            });
            if let Some(d) = hit {
                worst_iou = worst_iou.min(box_iou(&d.bbox, &want.bbox));
                worst_score = worst_score.max((d.score - want.score).abs());
            }
            hit.is_some()
        })
        .count();
    eprintln!("matched detections: min IoU {worst_iou}, max |score diff| {worst_score}");
    found as f64 / top.len() as f64
}

fn reference_detections(r: &HashMap<String, Tensor>) -> Vec<Detection> {
    let b = boxes(r, "detections.boxes");
    let s = floats(r, "detections.scores");
    let l = r["detections.labels"].to_vec1::<i64>().unwrap();
    (0..s.len())
        .map(|i| Detection {
            bbox: b[i],
            score: s[i],
            label: l[i] as usize,
        })
        .collect()
}

#[test]
fn detections_match_torchvision_unfused_and_fused() {
    let r = reference();
    let want = reference_detections(&r);
    assert_eq!(want.len(), 300);
    let img = photo();
    let view = ImageView {
        pixels: img.as_raw(),
        height: 160,
        width: 213,
    };
    for fuse in [false, true] {
        let ours = tiny_detector(fuse)
            .detect(&[view], &Device::Cpu)
            .unwrap()
            .remove(0);
        let share = matched_share(&ours, &want, 100);
        eprintln!(
            "fused={fuse}: {} detections, top-100 match {:.1}%",
            ours.len(),
            share * 100.0
        );
        assert!(
            share >= 0.99,
            "fused={fuse}: only {:.1}% of torchvision's top 100 matched",
            share * 100.0
        );
    }
}

#[test]
fn training_losses_match_torchvision() {
    let r = reference();
    let detector = tiny_detector(false);
    let img = photo();
    let flipped = image::imageops::flip_horizontal(&img);
    let views = [
        ImageView {
            pixels: img.as_raw(),
            height: 160,
            width: 213,
        },
        ImageView {
            pixels: flipped.as_raw(),
            height: 160,
            width: 213,
        },
    ];
    let batch = detector.preprocess(&views, &Device::Cpu).unwrap();
    let targets: Vec<Target> = (0..2)
        .map(|i| Target {
            boxes: ssdlite::loss::resize_boxes(
                &boxes(&r, &format!("train.target{i}.boxes")),
                (160, 213),
                (320, 320),
            ),
            labels: r[&format!("train.target{i}.labels")]
                .to_vec1::<i64>()
                .unwrap()
                .into_iter()
                .map(|l| l as usize)
                .collect(),
        })
        .collect();
    let losses = detector.forward_loss(&batch, &targets).unwrap();
    let bbox = losses.bbox_regression.to_scalar::<f32>().unwrap();
    let cls = losses.classification.to_scalar::<f32>().unwrap();
    let (want_bbox, want_cls) = (
        floats(&r, "train.bbox_value")[0],
        floats(&r, "train.cls_value")[0],
    );
    eprintln!("train-mode losses: bbox {bbox} vs {want_bbox}, cls {cls} vs {want_cls}");
    assert!(
        (bbox - want_bbox).abs() <= 1e-4 * want_bbox,
        "bbox loss {bbox} vs {want_bbox}"
    );
    assert!(
        (cls - want_cls).abs() <= 1e-4 * want_cls,
        "classification loss {cls} vs {want_cls}"
    );
}
