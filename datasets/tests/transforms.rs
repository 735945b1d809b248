//! Transforms keep boxes and masks consistent with the image, deterministically.

use mobileone_datasets::io::LabelMap;
use mobileone_datasets::synth::{generate_image, SynthConfig};
use mobileone_datasets::transforms::{
    horizontal_flip, sample_rng, Compose, PhotometricDistort, RandomHorizontalFlip, RandomIoUCrop,
    RandomScaleCrop, RandomZoomOut, Resize,
};
use mobileone_datasets::{Sample, Transform, IGNORE_INDEX};

/// A synthetic sample whose mask holds instance numbers (1..) and whose labels are those
/// numbers, so each box can be checked against its own instance's pixels.
fn instance_sample(index: u64) -> Sample {
    let synth = generate_image(
        &SynthConfig {
            seed: 21,
            size: 160,
            ..SynthConfig::default()
        },
        index,
    );
    let mut sample = Sample::new(&synth.image);
    let mut mask = LabelMap::new(160, 160, 0);
    for (k, object) in synth.objects.iter().enumerate() {
        for (i, &on) in object.mask.to_mask().iter().enumerate() {
            if on == 1 {
                mask.data[i] = k as u8 + 1;
            }
        }
        let [x, y, w, h] = object.bbox;
        sample
            .boxes
            .push([x as f32, y as f32, (x + w) as f32, (y + h) as f32]);
        sample.labels.push(k as u32 + 1);
    }
    sample.mask = Some(mask);
    sample
}

/// Tight box of the pixels of `value` (pixel x covers [x, x + 1)).
fn pixel_box(mask: &LabelMap, value: u8) -> Option<[f32; 4]> {
    let mut b: Option<[f32; 4]> = None;
    for y in 0..mask.height {
        for x in 0..mask.width {
            if mask.get(x, y) == value {
                let (x, y) = (x as f32, y as f32);
                b = Some(match b {
                    None => [x, y, x + 1.0, y + 1.0],
                    Some(b) => [
                        b[0].min(x),
                        b[1].min(y),
                        b[2].max(x + 1.0),
                        b[3].max(y + 1.0),
                    ],
                });
            }
        }
    }
    b
}

#[test]
fn flipping_twice_is_the_identity_and_boxes_follow_the_mask() {
    for index in 0..5 {
        let sample = instance_sample(index);
        let flipped = horizontal_flip(sample.clone());
        let (w, h) = (sample.width(), sample.height());
        for (x, y) in [(0, 0), (3, 7), (w - 1, h - 1), (w / 2, h / 3)] {
            let mirrored = ((y * w + (w - 1 - x)) * 3, (y * w + x) * 3);
            assert_eq!(
                flipped.image.data[mirrored.0..mirrored.0 + 3],
                sample.image.data[mirrored.1..mirrored.1 + 3],
                "pixel ({x}, {y}) keeps its RGB order"
            );
        }
        let mask = flipped.mask.as_ref().unwrap();
        for (b, &label) in flipped.boxes.iter().zip(&flipped.labels) {
            assert_eq!(pixel_box(mask, label as u8), Some(*b), "instance {label}");
        }
        assert_eq!(horizontal_flip(flipped), sample);
    }
}

#[test]
fn iou_crop_and_zoom_out_keep_instances_inside_their_boxes() {
    let pipeline = Compose(vec![
        Box::new(RandomZoomOut {
            p: 0.5,
            ..RandomZoomOut::default()
        }),
        Box::new(RandomIoUCrop::default()),
        Box::new(RandomHorizontalFlip { p: 0.5 }),
    ]);
    let mut cropped = 0;
    for index in 0..6 {
        for epoch in 0..8 {
            let sample = instance_sample(index);
            let original_size = (sample.width(), sample.height());
            let out = pipeline.apply(sample, &mut sample_rng(4, epoch, index));
            cropped += usize::from((out.width(), out.height()) != original_size);
            let mask = out.mask.as_ref().unwrap();
            assert_eq!(
                (mask.width as usize, mask.height as usize),
                (out.width(), out.height())
            );
            assert_eq!(out.image.data.len(), out.width() * out.height() * 3);
            for (b, &label) in out.boxes.iter().zip(&out.labels) {
                assert!(
                    b[0] >= 0.0
                        && b[1] >= 0.0
                        && b[2] <= out.width() as f32
                        && b[3] <= out.height() as f32
                );
                assert!(b[2] > b[0] && b[3] > b[1]);
                // Every visible pixel of the instance lies inside its (clamped) box.
                if let Some(p) = pixel_box(mask, label as u8) {
                    assert!(
                        p[0] >= b[0] && p[1] >= b[1] && p[2] <= b[2] && p[3] <= b[3],
                        "{p:?} in {b:?}"
                    );
                }
            }
        }
    }
    assert!(cropped > 10, "crops and zooms happen ({cropped})");
}

#[test]
fn iou_crop_keeps_only_boxes_with_centres_inside() {
    let mut sample = Sample::new(&image::RgbImage::new(100, 100));
    sample.boxes = vec![[0.0, 0.0, 10.0, 10.0], [40.0, 40.0, 90.0, 90.0]];
    sample.labels = vec![1, 2];
    let crop = RandomIoUCrop {
        sampler_options: vec![0.3],
        ..RandomIoUCrop::default()
    };
    for seed in 0..20 {
        let out = crop.apply(sample.clone(), &mut sample_rng(seed, 0, 0));
        assert!(out.width() < 100 || out.height() < 100);
        assert!(
            out.labels.contains(&2),
            "seed {seed}: the big box has IoU >= 0.3 with any accepted crop"
        );
    }
}

#[test]
fn resize_scales_boxes_and_mask_together() {
    let sample = instance_sample(1);
    let out = Resize {
        width: 80,
        height: 40,
    }
    .apply(sample.clone(), &mut sample_rng(0, 0, 0));
    assert_eq!((out.width(), out.height()), (80, 40));
    for (a, b) in sample.boxes.iter().zip(&out.boxes) {
        assert_eq!(*b, [a[0] / 2.0, a[1] / 4.0, a[2] / 2.0, a[3] / 4.0]);
    }
    let mask = out.mask.unwrap();
    assert_eq!(mask.get(10, 5), sample.mask.as_ref().unwrap().get(20, 20));
}

#[test]
fn scale_crop_gives_the_crop_size_padded_with_ignore() {
    let transform = RandomScaleCrop {
        scale: (320, 80),
        ratio_range: (0.5, 2.0),
        crop: (96, 96),
        cat_max_ratio: 0.75,
    };
    let mut padded = false;
    for seed in 0..10 {
        let mut sample = instance_sample(seed);
        sample.boxes.clear();
        sample.labels.clear();
        let out = transform.apply(sample, &mut sample_rng(seed, 0, 0));
        assert_eq!((out.width(), out.height()), (96, 96));
        let mask = out.mask.unwrap();
        assert_eq!(mask.data.len(), 96 * 96);
        padded |= mask.data.contains(&IGNORE_INDEX);
    }
    assert!(
        padded,
        "ratio 0.5 of 80 px gives images smaller than the crop, padded with 255"
    );
}

#[test]
fn photometric_distortion_changes_colours_only() {
    let sample = instance_sample(2);
    let mut changed = false;
    for seed in 0..4 {
        let out = PhotometricDistort::default().apply(sample.clone(), &mut sample_rng(seed, 0, 0));
        assert_eq!(out.boxes, sample.boxes);
        assert_eq!(out.mask, sample.mask);
        assert!(out.image.data.iter().all(|v| (0.0..=255.0).contains(v)));
        changed |= out.image != sample.image;
    }
    assert!(changed);
}

#[test]
fn pipelines_are_deterministic_given_the_seed() {
    let pipeline = Compose::ssd_train(64, [123.0, 117.0, 104.0]);
    let a = pipeline.apply(instance_sample(3), &mut sample_rng(9, 2, 3));
    let b = pipeline.apply(instance_sample(3), &mut sample_rng(9, 2, 3));
    assert_eq!(a, b);
    assert_eq!((a.width(), a.height()), (64, 64));
    let others: Vec<Sample> = (0..4)
        .map(|s| pipeline.apply(instance_sample(3), &mut sample_rng(s, 2, 3)))
        .collect();
    assert!(others.iter().any(|o| *o != a));
    let seg = Compose::seg_train((256, 128), 64);
    assert_eq!(
        seg.apply(instance_sample(0), &mut sample_rng(1, 0, 0)),
        seg.apply(instance_sample(0), &mut sample_rng(1, 0, 0))
    );
}
