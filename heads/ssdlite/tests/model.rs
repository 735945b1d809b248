//! The detector as a model: trainable from a `VarMap`, fused checkpoints that round-trip, metadata.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use mobileone::{MobileOneConfig, Variant};
use ssdlite::config::{resolve, to_metadata};
use ssdlite::{ImageView, Labels, Overrides, SsdDetector, SsdLiteConfig, Target};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The tiny torchvision-made detector of the parity fixtures.
fn tiny_detector() -> (SsdDetector, Labels) {
    SsdDetector::load(
        &fixture("tiny_ssdlite.safetensors"),
        &Overrides::default(),
        &Device::Cpu,
    )
    .unwrap()
}

/// The real 213×160 photo of the fixtures.
fn pets() -> image::RgbImage {
    image::open(fixture("pets_213x160.png")).unwrap().to_rgb8()
}

fn pets_view(img: &image::RgbImage) -> ImageView<'_> {
    ImageView {
        pixels: img.as_raw(),
        height: img.height() as usize,
        width: img.width() as usize,
    }
}

fn small_config() -> SsdLiteConfig {
    SsdLiteConfig {
        trunk: MobileOneConfig {
            stem_channels: 8,
            stage_channels: [8, 16, 16, 32],
            stage_blocks: [1, 1, 1, 1],
            num_conv_branches: 2,
            se_blocks: [0; 4],
            num_classes: None,
        },
        variant: None,
        extra_channels: [16, 16, 8, 8],
        num_classes: 4,
        image_size: 128,
        ..SsdLiteConfig::new(Variant::S0, 4)
    }
}

#[test]
fn training_loss_backpropagates_to_trunk_and_heads() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let detector = SsdDetector::new(&small_config(), mobileone::Form::TRAIN, vb).unwrap();
    let images = Tensor::randn(0f32, 1.0, (2, 3, 128, 128), &Device::Cpu).unwrap();
    let targets = vec![
        Target {
            boxes: vec![[10.0, 10.0, 60.0, 90.0]],
            labels: vec![2],
        },
        Target {
            boxes: vec![[50.0, 40.0, 120.0, 100.0], [0.0, 0.0, 20.0, 20.0]],
            labels: vec![1, 3],
        },
    ];
    let losses = detector.forward_loss(&images, &targets).unwrap();
    let total = losses.total().unwrap();
    assert!(total.to_scalar::<f32>().unwrap().is_finite());
    let grads = total.backward().unwrap();
    let vars = varmap.data().lock().unwrap();
    for key in [
        "backbone.body.stem.conv_kxk.0.conv.weight",
        "backbone.extra.0.2.0.weight",
        "head.classification_head.module_list.1.1.weight",
        "head.regression_head.module_list.0.0.1.weight",
    ] {
        let var = vars.get(key).unwrap_or_else(|| panic!("no variable {key}"));
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {key}"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{key}: gradient norm {norm}"
        );
    }
}

#[test]
fn fused_checkpoint_round_trips_with_the_same_detections() {
    let device = Device::Cpu;
    let (mut detector, labels) = tiny_detector();
    let img = pets();
    let view = pets_view(&img);
    let before = detector.detect(&[view], &device).unwrap().remove(0);
    detector.fuse().unwrap();
    let dir = std::env::temp_dir().join(format!("ssdlite-fused-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("fused.safetensors");
    mobileone::checkpoint::save(
        &path,
        &detector.named_tensors(),
        &to_metadata(&detector.config, &labels),
    )
    .unwrap();
    let (reloaded, labels_again) =
        SsdDetector::load(&path, &Overrides::default(), &device).unwrap();
    assert!(reloaded.is_fused());
    assert_eq!(labels_again, labels);
    assert_eq!(reloaded.config, detector.config);
    let after = reloaded.detect(&[view], &device).unwrap().remove(0);
    assert_eq!(before.len(), after.len());
    for (a, b) in before.iter().zip(&after).take(100) {
        assert_eq!(a.label, b.label);
        assert!(
            (a.score - b.score).abs() <= 1e-4,
            "{} vs {}",
            a.score,
            b.score
        );
        assert!(ssdlite::matcher::box_iou(&a.bbox, &b.bbox) >= 0.99);
    }
}

#[test]
fn configuration_comes_from_shapes_when_metadata_is_missing() {
    let ckpt = mobileone::checkpoint::load(&fixture("tiny_ssdlite.safetensors")).unwrap();
    let bare: HashMap<String, String> = HashMap::new();
    // The tiny trunk is no published variant: without metadata the caller must say which trunk it is.
    let err = resolve(&ckpt.tensors, &bare, &Overrides::default()).unwrap_err();
    assert!(err.to_string().contains("--variant"), "{err}");
    // With a trunk given, classes and extra widths are read off the tensors.
    let (config, labels) = resolve(
        &ckpt.tensors,
        &bare,
        &Overrides {
            variant: Some(Variant::S0),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(config.num_classes, 11);
    assert_eq!(config.extra_channels, [64, 32, 32, 16]);
    assert_eq!(config.image_size, 320);
    assert_eq!(labels, Labels::default_for(11));
    // A 91-class head gets torchvision's COCO names with label = category id.
    let coco = Labels::default_for(91);
    assert_eq!((coco.name(1), coco.category_id(90)), ("person", 90));
    // A segmentation checkpoint is refused by its metadata.
    let seg: HashMap<String, String> = [("task".to_string(), "segmentation".to_string())].into();
    assert!(resolve(&ckpt.tensors, &seg, &Overrides::default())
        .unwrap_err()
        .to_string()
        .contains("segmentation"));
}

/// What fine-tuning a reparameterised timm trunk under torchvision's heads produces: a fused trunk
/// (`reparam_conv`) with heads that still carry BatchNorm. "Fused or not" is decided per module, so
/// it loads as it is (it used to be refused with "missing key `backbone.extra.0.0.0.bias`"), gives the
/// unfused model's detections, and `fuse` folds the rest.
#[test]
fn a_fused_trunk_under_batchnorm_heads_loads_per_module() {
    let device = Device::Cpu;
    let (detector, labels) = tiny_detector();
    let img = pets();
    let view = pets_view(&img);
    let before = detector.detect(&[view], &device).unwrap().remove(0);
    let mut mixed = detector.clone();
    mixed.body.reparameterize().unwrap();
    let dir = std::env::temp_dir().join(format!("ssdlite-mixed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mixed.safetensors");
    mobileone::checkpoint::save(
        &path,
        &mixed.named_tensors(),
        &to_metadata(&mixed.config, &labels),
    )
    .unwrap();
    let checkpoint = mobileone::checkpoint::load(&path).unwrap();
    assert!(checkpoint
        .tensors
        .contains_key("backbone.extra.0.0.1.running_var"));
    assert_eq!(
        SsdDetector::stored_form(&checkpoint),
        mobileone::Form::FUSED_TRUNK
    );
    let (reloaded, _) =
        SsdDetector::from_checkpoint(&checkpoint, &Overrides::default(), &device).unwrap();
    assert!(!reloaded.is_fused());
    let mut folded = reloaded.clone();
    folded.fuse().unwrap();
    assert!(folded.is_fused());
    for model in [&reloaded, &folded] {
        let after = model.detect(&[view], &device).unwrap().remove(0);
        assert_eq!(before.len(), after.len());
        for (a, b) in before.iter().zip(&after).take(100) {
            assert_eq!(a.label, b.label);
            assert!(
                (a.score - b.score).abs() <= 1e-4,
                "{} vs {}",
                a.score,
                b.score
            );
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}
