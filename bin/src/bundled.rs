//! The bundled models and demo images of the repository's `models/` folder, which `detect` and
//! `segment` use when given no weights (and no image).
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// Environment variable naming another folder to take the bundled files from.
pub const MODELS_DIR_ENV: &str = "MOBILEONE_MODELS_DIR";
/// The person detector: SSDLite-320 on MobileOne-S0 (Apple's ImageNet weights) fine-tuned on the COCO
/// person boxes of `coco-person`, fused, float16.
pub const DETECTOR: &str = "ssdlite_mobileone_s0_coco_person.safetensors";
/// The segmenter: DeepLabV3 (OS16, ASPP 6/12/18) on MobileOne-S0 (Apple's ImageNet weights)
/// fine-tuned on the 20 VOC classes of COCO images (torchvision's COCO→VOC masks of `coco-mini`),
/// fused, float16.
pub const SEGMENTER: &str = "deeplabv3_mobileone_s0_coco_voc.safetensors";
/// A real photo (NASA, public domain) that `detect` and `segment` run on when given nothing.
pub const DEMO_IMAGE: &str = "astronaut.jpg";

/// `$MOBILEONE_MODELS_DIR`, else `<repository>/models` (found from where this crate was built).
pub fn models_dir() -> PathBuf {
    match std::env::var_os(MODELS_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the CLI crate lives inside the workspace")
            .join("models"),
    }
}

/// `given`, else the bundled weights `name` (saying so on stderr, as the demo `what`), or an error
/// that names the missing file and the way around it.
pub fn weights_or_bundled(given: Option<&Path>, name: &str, what: &str) -> Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.to_path_buf());
    }
    let path = models_dir().join(name);
    if !path.is_file() {
        bail!(
            "no --weights given and the bundled demo model {} is missing: pass --weights FILE \
             (or set {MODELS_DIR_ENV} to a folder holding {name})",
            path.display()
        );
    }
    let (trained_on, metrics) = description(&path);
    eprintln!(
        "no --weights: using the bundled {what} {} (trained on {}{})",
        path.display(),
        trained_on.as_deref().unwrap_or("unknown data"),
        metrics.map_or(String::new(), |m| format!("; held-out {m}"))
    );
    Ok(path)
}

/// What the checkpoint's metadata says it was trained on (`trained_on`) and the held-out metrics its
/// training run stored (`metric`, as "mAP 0.047, mAP50 0.093"), so the tool says how good it is.
fn description(path: &Path) -> (Option<String>, Option<String>) {
    let Some(bytes) = std::fs::read(path).ok() else {
        return (None, None);
    };
    let Ok((_, header)) = safetensors::SafeTensors::read_metadata(&bytes) else {
        return (None, None);
    };
    let Some(metadata) = header.metadata().as_ref() else {
        return (None, None);
    };
    (
        metadata.get("trained_on").cloned(),
        recorded_metrics(metadata.get("metric")),
    )
}

fn recorded_metrics(metric: Option<&String>) -> Option<String> {
    let values: serde_json::Map<String, serde_json::Value> = serde_json::from_str(metric?).ok()?;
    let shown: Vec<String> = values
        .iter()
        .filter_map(|(name, value)| Some(format!("{name} {:.3}", value.as_f64()?)))
        .collect();
    (!shown.is_empty()).then(|| shown.join(", "))
}

/// The bundled demo image `name`, or an error that names the missing file and the way around it.
pub fn demo_image(name: &str) -> Result<PathBuf> {
    let path = models_dir().join(name);
    if !path.is_file() {
        bail!(
            "no image given and the demo image {} is missing: name one or more images (see --help)",
            path.display()
        );
    }
    Ok(path)
}
