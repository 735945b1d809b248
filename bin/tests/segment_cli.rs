//! End-to-end checks of the `segment` binary on real photos and the VOC/ADE20K samples (MOBILEONE_DATA),
//! with random-weight MobileOne-S0 segmenters written to a scratch folder; bad inputs must end with a
//! clear `error: ...` and exit code 1 or a counted skip, never a panic.
mod common;

use common::{run_err, run_ok, scratch, shared_cases, shared_data};
use mobileone_cli::bundled;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use deeplabv3::{DeepLabV3, SegmenterSpec};
use mobileone::Variant;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_segment"))
}

/// Random-weight DeepLabV3-MobileOne-S0 (narrow 32-channel head to keep the test fast) with metadata.
fn write_random_segmenter(path: &Path, num_classes: usize) {
    let mut spec = SegmenterSpec::new(Variant::S0, num_classes, 16);
    spec.config.head_channels = 32;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = DeepLabV3::new(&spec.config, vb).unwrap();
    deeplabv3::checkpoint::save(path, &model, &spec).unwrap();
}

/// A mask PNG's class indices (palette PNGs store the index per pixel), as an image.
fn label_image(path: &Path) -> image::GrayImage {
    let labels = mobileone_datasets::io::read_label_png(path).unwrap();
    image::GrayImage::from_raw(labels.width, labels.height, labels.data).unwrap()
}

fn png_size(path: &Path) -> (u32, u32) {
    image::image_dimensions(path).unwrap()
}

#[test]
fn segments_a_photo_and_writes_mask_overlay_and_logits() {
    let dir = scratch("segment", "photo");
    let weights = dir.join("voc.safetensors");
    write_random_segmenter(&weights, 21);
    let photo = shared_data().join("photos/pets.jpg");
    let (w, h) = png_size(&photo);
    let out = run_ok(
        bin()
            .arg(&photo)
            .arg("--weights")
            .arg(&weights)
            .args(["--size", "96", "--out-dir"])
            .arg(&dir)
            .arg("--logits-out")
            .arg(dir.join("logits.npy")),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("pets.jpg"), "{stdout}");
    assert_eq!(png_size(&dir.join("pets_mask.png")), (w, h));
    let (ow, oh) = png_size(&dir.join("pets_overlay.jpg"));
    assert!(ow > w && oh >= h, "overlay has a legend panel");
    let logits = mobileone_cli::npy::read_f32(&dir.join("logits.npy")).unwrap();
    assert_eq!(logits.dims(), &[1, 21, h as usize, w as usize]);
    let mask = label_image(&dir.join("pets_mask.png"));
    assert!(mask.pixels().all(|p| p[0] < 21));

    // Fusing changes nothing but speed.
    run_ok(
        bin()
            .arg(&photo)
            .arg("--weights")
            .arg(&weights)
            .args(["--size", "96", "--fuse", "--mask-out"])
            .arg(dir.join("fused_mask.png"))
            .arg("--out-dir")
            .arg(&dir),
    );
    let fused = label_image(&dir.join("fused_mask.png"));
    // Sliding windows give a mask of the image's size too.
    run_ok(
        bin()
            .arg(&photo)
            .arg("--weights")
            .arg(&weights)
            .args(["--size", "96", "--tile", "64", "--mask-out"])
            .arg(dir.join("tiled_mask.png"))
            .arg("--out-dir")
            .arg(&dir),
    );
    assert_eq!(png_size(&dir.join("tiled_mask.png")), (w, h));
    let same = mask
        .pixels()
        .zip(fused.pixels())
        .filter(|(a, b)| a == b)
        .count();
    assert!(
        same as f64 >= 0.999 * mask.len() as f64,
        "fused mask differs: {same}/{}",
        mask.len()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn evaluates_the_voc_and_ade20k_samples() {
    let dir = scratch("segment", "datasets");
    let voc = dir.join("voc.safetensors");
    write_random_segmenter(&voc, 21);
    let out = run_ok(
        bin()
            .args(["--dataset", "voc", "--data-root"])
            .arg(shared_data().join("voc2012-sample"))
            .arg("--weights")
            .arg(&voc)
            .args(["--size", "64", "--out-dir"])
            .arg(dir.join("voc")),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("mIoU") && stdout.contains("(1 images"),
        "{stdout}"
    );
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("voc/metrics.json")).unwrap())
            .unwrap();
    assert_eq!(metrics["images"], 1);
    assert_eq!(metrics["per_class_iou"].as_array().unwrap().len(), 21);

    // A 21-class model on the 150-class ADE20K is refused, a 150-class one runs.
    let err = run_err(
        bin()
            .args(["--dataset", "ade20k", "--data-root"])
            .arg(shared_data().join("ade20k-samples"))
            .arg("--weights")
            .arg(&voc),
    );
    assert!(err.contains("21 classes") && err.contains("150"), "{err}");
    let ade = dir.join("ade.safetensors");
    write_random_segmenter(&ade, 150);
    let out = run_ok(
        bin()
            .args(["--dataset", "ade20k", "--data-root"])
            .arg(shared_data().join("ade20k-samples"))
            .arg("--weights")
            .arg(&ade)
            .args(["--size", "64", "--out-dir"])
            .arg(dir.join("ade")),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("(3 images"), "{stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unusable_annotations_are_counted_skips() {
    let dir = scratch("segment", "skip");
    let weights = dir.join("voc.safetensors");
    write_random_segmenter(&weights, 21);
    let root = dir.join("VOC2012");
    std::fs::create_dir_all(root.join("JPEGImages")).unwrap();
    std::fs::create_dir_all(root.join("SegmentationClass")).unwrap();
    let sample = shared_data().join("voc2012-sample");
    std::fs::copy(
        sample.join("JPEGImages/2007_000063.jpg"),
        root.join("JPEGImages/good.jpg"),
    )
    .unwrap();
    std::fs::copy(
        sample.join("SegmentationClass/2007_000063.png"),
        root.join("SegmentationClass/good.png"),
    )
    .unwrap();
    std::fs::copy(
        sample.join("JPEGImages/2007_000063.jpg"),
        root.join("JPEGImages/bad.jpg"),
    )
    .unwrap();
    image::GrayImage::new(10, 10)
        .save(root.join("SegmentationClass/bad.png"))
        .unwrap();
    std::fs::copy(
        sample.join("JPEGImages/2007_000063.jpg"),
        root.join("JPEGImages/range.jpg"),
    )
    .unwrap();
    image::GrayImage::from_pixel(500, 375, image::Luma([30]))
        .save(root.join("SegmentationClass/range.png"))
        .unwrap();
    let out = run_ok(
        bin()
            .args(["--dataset", "voc", "--data-root"])
            .arg(&root)
            .arg("--weights")
            .arg(&weights)
            .args(["--size", "64", "--out-dir"])
            .arg(dir.join("out")),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("skipped 2 of 3 images"), "{stdout}");
    assert!(
        stderr.contains("bad") && stderr.contains("10x10"),
        "{stderr}"
    );
    assert!(
        stderr.contains("range") && stderr.contains("label 30"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = scratch("segment", "errors");
    let photo = shared_data().join("photos/owl.jpg");
    // No --weights and no bundled model: the missing file and the way around it are named.
    let err = run_err(bin().arg(&photo).env(bundled::MODELS_DIR_ENV, &dir));
    assert!(
        err.contains(&dir.join(bundled::SEGMENTER).display().to_string())
            && err.contains("pass --weights"),
        "{err}"
    );

    let weights = dir.join("voc.safetensors");
    write_random_segmenter(&weights, 21);
    let not_an_image = dir.join("notes.jpg");
    std::fs::write(&not_an_image, b"not a jpeg").unwrap();
    let err = run_err(
        bin()
            .arg(&not_an_image)
            .arg("--weights")
            .arg(&weights)
            .arg("--out-dir")
            .arg(&dir),
    );
    assert!(err.contains("notes.jpg"), "{err}");

    // An ImageNet backbone checkpoint is not a segmenter.
    let backbone = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../backbone/tests/fixtures/tiny/unfused.safetensors");
    let err = run_err(bin().arg(&photo).arg("--weights").arg(&backbone));
    assert!(err.contains("not a DeepLabV3 checkpoint"), "{err}");

    // A wrong architecture override names the variant the weights look like.
    let err = run_err(
        bin()
            .arg(&photo)
            .arg("--weights")
            .arg(&weights)
            .args(["--variant", "s1"]),
    );
    assert!(err.contains("s0"), "{err}");

    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}").unwrap();
    let err = run_err(bin().arg(&photo).arg("--weights").arg(&garbage));
    assert!(err.contains("garbage.safetensors"), "{err}");

    let err = run_err(
        bin()
            .arg(&photo)
            .arg(&photo)
            .arg("--weights")
            .arg(&weights)
            .arg("--mask-out")
            .arg("m.png"),
    );
    assert!(err.contains("single image"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Without --weights and images, `segment` runs the bundled model on the bundled photo and writes the
/// mask and overlay into a fresh run folder. The bundled model here is a random S0 segmenter stored
/// the way the real one is (fused, float16, by `mobileone fuse --half`); the photo is the committed
/// models/astronaut.jpg.
#[test]
fn without_weights_or_images_runs_the_bundled_model() {
    let models = scratch("segment", "bundled");
    let cwd = scratch("segment", "bundled-cwd");
    let trained = cwd.join("trained.safetensors");
    write_random_segmenter(&trained, 8);
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_mobileone"))
            .args(["fuse", "--half", "--weights"])
            .arg(&trained)
            .arg("--out")
            .arg(models.join(bundled::SEGMENTER)),
    );
    let photo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models")
        .join(bundled::DEMO_IMAGE);
    std::fs::copy(photo, models.join(bundled::DEMO_IMAGE)).unwrap();
    let demo = || {
        let mut cmd = bin();
        cmd.env(bundled::MODELS_DIR_ENV, &models).current_dir(&cwd);
        cmd
    };
    let out = run_ok(demo().args(["--size", "128"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bundled segmenter"), "{stderr}");
    assert!(stderr.contains("fused"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("astronaut.jpg 512x512:"), "{stdout}");
    let run = cwd.join("runs/segment/predict");
    assert_eq!(png_size(&run.join("astronaut_mask.png")), (512, 512));
    let (ow, oh) = image::image_dimensions(run.join("astronaut_overlay.jpg")).unwrap();
    assert!(ow > 512 && oh >= 512, "overlay has a legend panel");

    // A named folder stands for the images in it (here the photo beside the model file); a second
    // run gets a fresh folder.
    let out = run_ok(demo().arg(&models).args(["--size", "128"]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("astronaut.jpg 512x512:"), "{stdout}");
    assert!(stdout.contains("runs/segment/predict2"), "{stdout}");
    assert_eq!(
        png_size(&cwd.join("runs/segment/predict2/astronaut_mask.png")),
        (512, 512)
    );

    // Given weights, the images are the user's to name.
    let err = run_err(demo().arg("--weights").arg(&trained));
    assert!(err.contains("give one or more images"), "{err}");

    // A missing demo image is named.
    std::fs::remove_file(models.join(bundled::DEMO_IMAGE)).unwrap();
    let err = run_err(&mut demo());
    assert!(err.contains("astronaut.jpg is missing"), "{err}");
    std::fs::remove_dir_all(&models).unwrap();
    std::fs::remove_dir_all(&cwd).unwrap();
}

/// The committed segmenter (models/, found from where the binary was built) loads and runs on the
/// bundled photo as on a fresh clone, says what it was trained on and its held-out metric, and finds
/// the astronaut: "person" is the most common class after background and covers her (a large share
/// of the picture's centre).
#[test]
fn the_committed_segmenter_finds_the_astronaut() {
    let cwd = scratch("segment", "committed");
    let out = run_ok(bin().env_remove(bundled::MODELS_DIR_ENV).current_dir(&cwd));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("trained on coco-mini")
            && stderr.contains("held-out")
            && stderr.contains("mIoU"),
        "{stderr}"
    );
    let mask = label_image(&cwd.join("runs/segment/predict/astronaut_mask.png"));
    assert_eq!(mask.dimensions(), (512, 512));
    const PERSON: u8 = 15;
    let centre: Vec<u8> = (160..352)
        .flat_map(|y| (160..352).map(move |x| (x, y)))
        .map(|(x, y)| mask.get_pixel(x, y)[0])
        .collect();
    let person = centre.iter().filter(|&&c| c == PERSON).count() as f64 / centre.len() as f64;
    assert!(person > 0.5, "person covers {person:.2} of the centre");
    std::fs::remove_dir_all(&cwd).unwrap();
}

/// `../shared/cases/23-truncated-jpeg`: the JPEG cut at 60 % is refused by name (Pillow: "image file is
/// truncated") and skipped; the intact image beside it is still segmented and saved; exit status 1.
#[test]
fn a_truncated_jpeg_is_skipped_by_name_and_the_rest_is_written() {
    let case = shared_cases().join("23-truncated-jpeg");
    let dir = scratch("segment", "truncated");
    let weights = dir.join("voc.safetensors");
    write_random_segmenter(&weights, 21);
    let out = bin()
        .arg(case.join("owl_truncated.jpg"))
        .arg(case.join("owl_baseline.jpg"))
        .arg("--weights")
        .arg(&weights)
        .args(["--size", "64", "--out-dir"])
        .arg(dir.join("out"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("owl_truncated.jpg") && stderr.contains("truncated"),
        "{stderr}"
    );
    assert!(stderr.contains("1 of 2 image(s) failed"), "{stderr}");
    assert!(dir.join("out/owl_baseline_mask.png").is_file());
    assert!(!dir.join("out/owl_truncated_mask.png").exists());
    std::fs::remove_dir_all(dir).unwrap();
}
