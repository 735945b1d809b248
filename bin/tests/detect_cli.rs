//! End-to-end checks of the `detect` binary with the tiny torchvision-made detector of
//! heads/ssdlite/tests/fixtures, on real photos and the COCO val2017 samples (MOBILEONE_DATA).
mod common;

use common::{run_ok, scratch, shared_data};
use mobileone_cli::bundled;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn fixtures() -> PathBuf {
    repo().join("heads/ssdlite/tests/fixtures")
}

fn weights() -> String {
    fixtures()
        .join("tiny_ssdlite.safetensors")
        .display()
        .to_string()
}

/// Runs `detect`; without `--out-dir` it saves no pictures (never into the source tree).
fn detect(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_detect"));
    cmd.args(args);
    if !args.contains(&"--out-dir") && !args.contains(&"--no-save") {
        cmd.arg("--no-save");
    }
    cmd.output().expect("detect runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn results(path: &Path) -> Vec<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn photos_give_tables_coco_json_and_drawings() {
    let dir = scratch("detect", "photos");
    let json = dir.join("results.json");
    let photo = shared_data().join("photos/pets.jpg");
    let png = fixtures().join("pets_213x160.png");
    let w = weights();
    let out = detect(&[
        photo.to_str().unwrap(),
        png.to_str().unwrap(),
        "--weights",
        &w,
        "--json",
        json.to_str().unwrap(),
        "--out-dir",
        dir.to_str().unwrap(),
        "--max-dets",
        "7",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("pets.jpg 512x430: "), "{stdout}");
    let entries = results(&json);
    assert_eq!(entries.len(), 14);
    for e in &entries {
        let bbox: Vec<f64> = e["bbox"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let (w, h) = if e["file_name"] == "pets.jpg" {
            (512.0, 430.0)
        } else {
            (213.0, 160.0)
        };
        assert!(
            bbox[0] >= 0.0
                && bbox[1] >= 0.0
                && bbox[0] + bbox[2] <= w + 1e-3
                && bbox[1] + bbox[3] <= h + 1e-3
        );
        assert!(e["score"].as_f64().unwrap() > 0.3 && e["category_id"].as_u64().is_some());
    }
    for name in ["pets.jpg", "pets_213x160.png"] {
        let drawn = image::open(dir.join(name)).unwrap();
        assert!(drawn.width() > 0);
    }
}

#[test]
fn fused_detector_gives_the_same_detections() {
    let dir = scratch("detect", "fused");
    let png = fixtures().join("pets_213x160.png");
    let w = weights();
    let mut runs = Vec::new();
    for (name, fuse) in [("plain.json", false), ("fused.json", true)] {
        let json = dir.join(name);
        let mut args = vec![
            png.to_str().unwrap(),
            "--weights",
            &w,
            "--json",
            json.to_str().unwrap(),
        ];
        if fuse {
            args.push("--fuse");
        }
        let out = detect(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        runs.push(results(&json));
    }
    // Scores differ by float rounding, so near-ties may swap places: match each of the top 100 instead.
    let xyxy = |e: &serde_json::Value| -> [f64; 4] {
        let b: Vec<f64> = e["bbox"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        [b[0], b[1], b[0] + b[2], b[1] + b[3]]
    };
    let iou = |a: [f64; 4], b: [f64; 4]| {
        let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
        let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
        let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h;
        w * h / union
    };
    assert!(!runs[0].is_empty());
    for a in runs[0].iter().take(100) {
        let found = runs[1].iter().any(|b| {
            a["category_id"] == b["category_id"]
                && (a["score"].as_f64().unwrap() - b["score"].as_f64().unwrap()).abs() < 1e-4
                && iou(xyxy(a), xyxy(b)) >= 0.99
        });
        assert!(found, "fused run lacks {a}");
    }
}

#[test]
fn bad_inputs_fail_clearly_and_keep_results() {
    let dir = scratch("detect", "bad");
    let w = weights();
    let png = fixtures().join("pets_213x160.png");
    let not_image = dir.join("notes.jpg");
    std::fs::write(&not_image, "not a picture").unwrap();
    let json = dir.join("partial.json");
    let out = detect(&[
        not_image.to_str().unwrap(),
        png.to_str().unwrap(),
        "--weights",
        &w,
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("notes.jpg: cannot decode image"),
        "{}",
        stderr(&out)
    );
    assert!(
        !results(&json).is_empty(),
        "results of the readable image are kept"
    );

    let empty = scratch("detect", "empty");
    let out = detect(&[empty.to_str().unwrap(), "--weights", &w]);
    assert!(
        !out.status.success() && stderr(&out).contains("has no images"),
        "{}",
        stderr(&out)
    );

    // No --weights and no bundled model: the missing file and the way around it are named.
    let no_models = scratch("detect", "no-models");
    let out = Command::new(env!("CARGO_BIN_EXE_detect"))
        .arg(&png)
        .env(bundled::MODELS_DIR_ENV, &no_models)
        .output()
        .unwrap();
    let message = stderr(&out);
    assert!(!out.status.success(), "{message}");
    assert!(
        message.contains(&no_models.join(bundled::DETECTOR).display().to_string())
            && message.contains("pass --weights"),
        "{message}"
    );

    let backbone = repo().join("backbone/tests/fixtures/tiny/unfused.safetensors");
    let out = detect(&[
        png.to_str().unwrap(),
        "--weights",
        backbone.to_str().unwrap(),
    ]);
    assert!(
        !out.status.success() && stderr(&out).contains("is it a detector"),
        "{}",
        stderr(&out)
    );

    let out = detect(&[png.to_str().unwrap(), "--weights", &w, "--variant", "s0"]);
    assert!(
        !out.status.success(),
        "an S0 trunk cannot read the tiny weights"
    );
    assert!(
        stderr(&out).contains("backbone.body.stem"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn coco_samples_are_evaluated() {
    let root = shared_data().join("coco-val2017-samples");
    let annotations = root.join("instances_val2017_5.json");
    let images = root.join("images");
    let w = weights();
    let out = detect(&[
        "--dataset",
        "coco",
        "--data-root",
        root.to_str().unwrap(),
        "--annotations",
        annotations.to_str().unwrap(),
        "--image-dir",
        images.to_str().unwrap(),
        "--weights",
        &w,
        // The test model's classes are unnamed: map them onto COCO categories.
        "--label-map",
        "class1=person,class2=bicycle,class3=car,class4=motorcycle,class5=airplane,class6=bus,class7=train,class8=truck,class9=boat,class10=traffic light",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("5 images"), "{stdout}");
    assert!(
        stdout.contains("evaluating 10 of the dataset's 80 categories"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]"),
        "{stdout}"
    );
    assert_eq!(
        stdout
            .lines()
            .filter(|l| l.contains("Average Recall") || l.contains("Average Precision"))
            .count(),
        12
    );
}

/// Without --weights and images, `detect` runs the bundled model on the bundled photo and saves the
/// drawing into a fresh numbered run folder (runs/detect/predict, predict2, …), never over an earlier
/// run. The bundled model here is the tiny test detector stored the way the real one is (fused,
/// float16, by `mobileone fuse --half`); the photo is the committed models/astronaut.jpg.
#[test]
fn without_weights_or_images_runs_the_bundled_model_into_fresh_run_folders() {
    let models = scratch("detect", "bundled");
    let cwd = scratch("detect", "bundled-cwd");
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_mobileone"))
            .args([
                "fuse",
                "--half",
                "--weights",
                &weights(),
                "--set",
                "trained_on=nothing (test)",
                "--out",
            ])
            .arg(models.join(bundled::DETECTOR)),
    );
    std::fs::copy(
        repo().join("models").join(bundled::DEMO_IMAGE),
        models.join(bundled::DEMO_IMAGE),
    )
    .unwrap();
    let demo = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_detect"));
        cmd.env(bundled::MODELS_DIR_ENV, &models).current_dir(&cwd);
        cmd
    };
    for run in ["predict", "predict2"] {
        let out = run_ok(&mut demo());
        let (stdout, message) = (String::from_utf8_lossy(&out.stdout), stderr(&out));
        assert!(
            message.contains("bundled detector") && message.contains("trained on nothing (test)"),
            "{message}"
        );
        assert!(stdout.contains("astronaut.jpg 512x512:"), "{stdout}");
        assert!(stdout.contains(&format!("runs/detect/{run}")), "{stdout}");
        // A JPEG input gives a JPEG picture of the same size.
        let picture = cwd.join("runs/detect").join(run).join("astronaut.jpg");
        assert_eq!(image::image_dimensions(&picture).unwrap(), (512, 512));
        assert_eq!(
            image::ImageFormat::from_path(&picture).unwrap(),
            image::ImageFormat::Jpeg
        );
    }

    // --out-dir decides where the drawing goes, --no-save draws nothing; a PNG gives a PNG.
    let elsewhere = cwd.join("drawings");
    let png = fixtures().join("pets_213x160.png");
    run_ok(demo().arg(&png).arg("--out-dir").arg(&elsewhere));
    assert!(elsewhere.join("pets_213x160.png").is_file());
    let stdout =
        String::from_utf8_lossy(&run_ok(demo().arg(&png).arg("--no-save")).stdout).into_owned();
    assert!(
        stdout.contains("pets_213x160.png 213x160:") && !stdout.contains("saved to"),
        "{stdout}"
    );
    assert!(!cwd.join("runs/detect/predict3").exists());

    // Given weights, the images are the user's to name.
    let out = demo().args(["--weights", &weights()]).output().unwrap();
    assert!(
        !out.status.success() && stderr(&out).contains("give one or more images"),
        "{}",
        stderr(&out)
    );

    // A missing demo image is named.
    std::fs::remove_file(models.join(bundled::DEMO_IMAGE)).unwrap();
    let out = demo().output().unwrap();
    assert!(
        !out.status.success() && stderr(&out).contains("astronaut.jpg is missing"),
        "{}",
        stderr(&out)
    );
    std::fs::remove_dir_all(&models).unwrap();
    std::fs::remove_dir_all(&cwd).unwrap();
}

/// The committed person detector (models/, found from where the binary was built) loads and runs on
/// the committed photo as on a fresh clone, says what it was trained on and how well it does, and
/// finds the astronaut.
#[test]
fn the_committed_person_detector_finds_the_astronaut() {
    let cwd = scratch("detect", "committed");
    let out = run_ok(
        Command::new(env!("CARGO_BIN_EXE_detect"))
            .env_remove(bundled::MODELS_DIR_ENV)
            .current_dir(&cwd),
    );
    let message = stderr(&out);
    assert!(
        message.contains("trained on coco-person") && message.contains("held-out mAP"),
        "{message}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("astronaut.jpg 512x512:"), "{stdout}");
    let first = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("1 "))
        .unwrap_or_default();
    assert!(first.contains("person"), "{stdout}");
    assert!(cwd.join("runs/detect/predict/astronaut.jpg").is_file());
    std::fs::remove_dir_all(&cwd).unwrap();
}

/// `../shared/cases/23-truncated-jpeg`: a JPEG cut at 60 % (Pillow: "image file is truncated"). It was
/// decoded with grey rows and used; now every path refuses it by name: files (skipped, counted, exit
/// 1, the readable images' results still written whole, none when no image was read), and a
/// dataset run (stops, writes nothing).
#[test]
fn a_truncated_jpeg_is_refused_by_name_everywhere() {
    let case = common::shared_cases().join("23-truncated-jpeg");
    let dir = scratch("detect", "truncated");
    let json = dir.join("out.json");
    let truncated = case.join("owl_truncated.jpg");
    let baseline = case.join("owl_baseline.jpg");
    let out = detect(&[
        truncated.to_str().unwrap(),
        baseline.to_str().unwrap(),
        "--weights",
        &weights(),
        "--score-thresh",
        "0.0",
        "--json",
        json.to_str().unwrap(),
        "--out-dir",
        dir.join("pictures").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let message = stderr(&out);
    assert!(
        message.contains("owl_truncated.jpg") && message.contains("truncated"),
        "{message}"
    );
    assert!(
        message.contains("1 of 2 image(s) failed: owl_truncated.jpg"),
        "{message}"
    );
    // The intact image's detections and picture are written whole; none of the truncated one.
    let entries = results(&json);
    assert!(!entries.is_empty() && entries.iter().all(|e| e["file_name"] == "owl_baseline.jpg"));
    assert!(dir.join("pictures/owl_baseline.jpg").is_file());
    assert!(!dir.join("pictures/owl_truncated.jpg").exists());
    // The truncated image alone: exit 1 and no (empty) results file.
    let alone = dir.join("alone.json");
    let out = detect(&[
        truncated.to_str().unwrap(),
        "--weights",
        &weights(),
        "--json",
        alone.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!alone.exists(), "no results file when no image was read");

    let report = dir.join("dataset.json");
    // The case's categories are shapes; map the test model's ten classes onto them.
    let label_map: Vec<String> = (1..=10)
        .map(|i| format!("class{i}={}", if i % 2 == 1 { "circle" } else { "ellipse" }))
        .collect();
    let label_map = label_map.join(",");
    let out = detect(&[
        "--dataset",
        "coco",
        "--data-root",
        case.join("coco").to_str().unwrap(),
        "--weights",
        &weights(),
        "--label-map",
        &label_map,
        "--json",
        report.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("owl_truncated.jpg") && stderr(&out).contains("truncated"),
        "{}",
        stderr(&out)
    );
    assert!(!report.exists(), "nothing half-written");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A model is never scored on a dataset whose categories it does not know: class ids 1..10 of an
/// unnamed model would collide with person…traffic light. Refused with both lists; `--label-map`
/// states the correspondence.
#[test]
fn evaluating_on_unknown_categories_is_refused_with_both_lists() {
    let root = shared_data().join("coco-val2017-samples");
    let out = detect(&[
        "--dataset",
        "coco",
        "--data-root",
        root.to_str().unwrap(),
        "--annotations",
        root.join("instances_val2017_5.json").to_str().unwrap(),
        "--image-dir",
        root.join("images").to_str().unwrap(),
        "--weights",
        &weights(),
    ]);
    assert!(!out.status.success());
    let message = stderr(&out);
    assert!(
        message.contains("\"class1\"") && message.contains("person, bicycle"),
        "{message}"
    );
    assert!(message.contains("--label-map"), "{message}");
}

/// `detect FOLDER --json` takes image ids from the file names of `--annotations` (so the results
/// evaluate against it), else from numeric file names, else 1, 2, … — and says which.
#[test]
fn result_image_ids_come_from_the_ground_truth_or_the_file_names() {
    let root = shared_data().join("coco-val2017-samples");
    let gt = root.join("instances_val2017_5.json");
    let dir = scratch("detect", "image-ids");
    let gt_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&gt).unwrap()).unwrap();
    let id_of = |name: &str| -> u64 {
        gt_json["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["file_name"] == name)
            .unwrap()["id"]
            .as_u64()
            .unwrap()
    };
    for (extra, how) in [
        (Some(gt.to_str().unwrap()), "from the file names of"),
        (None, "the numbers in the file names"),
    ] {
        let json = dir.join("r.json");
        let mut args = vec![
            root.join("images").to_str().unwrap().to_string(),
            "--weights".into(),
            weights(),
            "--score-thresh".into(),
            "0.0".into(),
            "--no-save".into(),
            "--json".into(),
            json.to_str().unwrap().into(),
        ];
        if let Some(gt) = extra {
            args.extend(["--annotations".into(), gt.to_string()]);
        }
        let out = detect(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains(how));
        for e in results(&json) {
            assert_eq!(
                e["image_id"].as_u64().unwrap(),
                id_of(e["file_name"].as_str().unwrap()),
                "{e}"
            );
        }
    }
    // Names that are not numbers: 1, 2, … in order.
    let png = fixtures().join("pets_213x160.png");
    let json = dir.join("seq.json");
    let out = detect(&[
        png.to_str().unwrap(),
        "--weights",
        &weights(),
        "--score-thresh",
        "0.0",
        "--no-save",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("1, 2, … in the order listed"));
    assert!(results(&json).iter().all(|e| e["image_id"] == 1));
    std::fs::remove_dir_all(dir).unwrap();
}
