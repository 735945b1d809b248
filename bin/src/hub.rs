//! Weights named by Hugging Face Hub id (`hf-hub:timm/mobileone_s0.apple_in1k`), as timm names them:
//! read from the local Hugging Face cache (`HF_HOME`, default `~/.cache/huggingface`) when the file is
//! there, downloaded into it otherwise (which needs network).
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use mobileone::Variant;

/// Prefix that marks a hub id where a weights path is expected (timm's convention).
pub const HUB_PREFIX: &str = "hf-hub:";
/// The weights file of timm's hub repositories.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// timm's pretrained config (preprocessing) beside the weights.
pub const CONFIG_FILE: &str = "config.json";

/// timm's MobileOne repositories, one per variant (Apple's ImageNet-1k weights, train-time form).
pub const TIMM_MOBILEONE: [(&str, Variant); 5] = [
    ("timm/mobileone_s0.apple_in1k", Variant::S0),
    ("timm/mobileone_s1.apple_in1k", Variant::S1),
    ("timm/mobileone_s2.apple_in1k", Variant::S2),
    ("timm/mobileone_s3.apple_in1k", Variant::S3),
    ("timm/mobileone_s4.apple_in1k", Variant::S4),
];

/// A weights argument resolved to a local file.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub path: PathBuf,
    /// The variant a known hub id names.
    pub variant: Option<Variant>,
    /// timm's `config.json` when the weights came from the hub and it has one.
    pub config: Option<PathBuf>,
}

/// Resolves `weights`: a path is used as it is; `hf-hub:<id>` is looked up in the Hugging Face cache
/// and downloaded when missing.
///
/// # Errors
/// A hub id whose file is neither cached nor downloadable (no network, unknown repository); the
/// message says where the cache is and how to fill it.
pub fn resolve(weights: &Path) -> Result<Resolved> {
    let text = weights.to_string_lossy();
    let Some(id) = text.strip_prefix(HUB_PREFIX) else {
        return Ok(Resolved {
            path: weights.to_path_buf(),
            variant: None,
            config: None,
        });
    };
    let variant = TIMM_MOBILEONE
        .iter()
        .find(|(known, _)| *known == id)
        .map(|(_, v)| *v);
    let cache = hf_hub::Cache::from_env();
    let repo = cache.model(id.to_string());
    let offline =
        std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let path = match repo.get(WEIGHTS_FILE) {
        Some(path) => path,
        None if offline => anyhow::bail!(
            "{id}/{WEIGHTS_FILE} is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set",
            cache.path().display()
        ),
        None => download(id).with_context(|| {
            format!(
                "{id}/{WEIGHTS_FILE} is not in the Hugging Face cache ({}) and could not be downloaded; \
                 on a machine with network run the same command once (or `huggingface-cli download {id}`), \
                 or pass --weights a local file",
                cache.path().display()
            )
        })?,
    };
    let config = repo.get(CONFIG_FILE);
    Ok(Resolved {
        path,
        variant,
        config,
    })
}

fn download(id: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()?;
    let repo = api.model(id.to_string());
    let path = repo.get(WEIGHTS_FILE)?;
    // The preprocessing config is optional: timm's defaults apply without it.
    let _ = repo.get(CONFIG_FILE);
    Ok(path)
}
