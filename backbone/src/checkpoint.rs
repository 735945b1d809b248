//! Reading and writing weights: timm safetensors, Apple `.pth`/`.pth.tar` (unfused or fused) through
//! candle's PyTorch pickle reader, and the project's own safetensors with metadata. Every naming is
//! mapped to timm's keys by name, and models are built strictly: a missing key, an unexpected key or a
//! wrong shape is one error that names the key.
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::mobileone::{MobileOne, MobileOneConfig, Variant};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read {path}: {error}")]
    Io {
        path: PathBuf,
        /// Not `source`: the message already shows it, and `{:#}` would print it twice.
        error: std::io::Error,
    },
    #[error("{path} is not a readable checkpoint: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("missing key `{key}` (the model expects shape {expected:?}){hint}")]
    MissingKey {
        key: String,
        expected: Vec<usize>,
        hint: String,
    },
    #[error("key `{key}` has shape {found:?} in the checkpoint but the model expects {expected:?}{hint}")]
    ShapeMismatch {
        key: String,
        found: Vec<usize>,
        expected: Vec<usize>,
        hint: String,
    },
    #[error("{} unexpected key(s) in the checkpoint, first `{}`{hint}", .keys.len(), .keys[0])]
    UnexpectedKeys { keys: Vec<String>, hint: String },
    #[error("cannot build the model: {0}")]
    Model(#[from] candle_core::Error),
}

/// Key convention a checkpoint was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// timm's `byobnet` names (also what this project writes).
    Timm,
    /// Apple's ml-mobileone names (`stage0`, `rbr_conv`, `rbr_scale`, `rbr_skip`, `se`, `linear`).
    Apple,
}

/// Tensors keyed by timm names, with the safetensors header metadata (empty for `.pth`).
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub tensors: HashMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
    pub naming: Naming,
}

impl Checkpoint {
    /// Whether the MobileOne weights below `prefix` are already reparameterised.
    pub fn is_fused(&self, prefix: &str) -> bool {
        self.tensors
            .contains_key(&format!("{prefix}stem.reparam_conv.weight"))
    }

    /// Classifier width of an ImageNet checkpoint, if it has a `head.fc`.
    pub fn num_classes(&self, prefix: &str) -> Option<usize> {
        self.tensors
            .get(&format!("{prefix}head.fc.weight"))
            .map(|t| t.dims()[0])
    }
}

/// Reads a checkpoint, recognising the file type by content and the naming by key names.
pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let bytes = fs::read(path).map_err(|source| CheckpointError::Io {
        path: path.into(),
        error: source,
    })?;
    let format_err = |reason: String| CheckpointError::Format {
        path: path.into(),
        reason,
    };
    let (raw, metadata) = if bytes.starts_with(b"PK\x03\x04") {
        (read_pth(path).map_err(format_err)?, HashMap::new())
    } else {
        read_safetensors(&bytes).map_err(format_err)?
    };
    if raw.is_empty() {
        return Err(format_err("it holds no tensors".into()));
    }
    let naming = detect_naming(raw.keys());
    let mut tensors = HashMap::with_capacity(raw.len());
    for (key, tensor) in raw {
        let key = key.strip_prefix("module.").unwrap_or(&key).to_string();
        let key = match naming {
            Naming::Apple => apple_to_timm(&key),
            Naming::Timm => key,
        };
        let tensor = if tensor.dtype().is_float() && tensor.dtype() != DType::F32 {
            tensor
                .to_dtype(DType::F32)
                .map_err(|e| format_err(e.to_string()))?
        } else {
            tensor
        };
        tensors.insert(key, tensor);
    }
    Ok(Checkpoint {
        path: path.into(),
        tensors,
        metadata,
        naming,
    })
}

type Tensors = HashMap<String, Tensor>;

fn read_safetensors(bytes: &[u8]) -> Result<(Tensors, HashMap<String, String>), String> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| format!("neither a safetensors file nor a PyTorch zip archive ({e})"))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let tensors =
        candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| e.to_string())?;
    Ok((tensors, metadata))
}

/// Reads a `torch.save` zip; the state dict may be the top-level object or under `state_dict`/`model`.
fn read_pth(path: &Path) -> Result<Tensors, String> {
    let mut last_error = String::new();
    for key in [None, Some("state_dict"), Some("model")] {
        // The pickle reader is not hardened against corrupt archives; a panic there is a bad file.
        let read = std::panic::catch_unwind(|| candle_core::pickle::read_all_with_key(path, key));
        match read {
            Ok(Ok(tensors)) if !tensors.is_empty() => return Ok(tensors.into_iter().collect()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => last_error = e.to_string(),
            Err(_) => last_error = "the PyTorch pickle reader failed on this file".into(),
        }
    }
    Err(if last_error.is_empty() {
        "no tensors found in the PyTorch archive".into()
    } else {
        last_error
    })
}

fn detect_naming<'a>(keys: impl Iterator<Item = &'a String>) -> Naming {
    for key in keys {
        let key = key.strip_prefix("module.").unwrap_or(key);
        if key.starts_with("stage0.")
            || key.contains("rbr_conv")
            || key.contains("rbr_scale")
            || key.contains("rbr_skip")
        {
            return Naming::Apple;
        }
    }
    Naming::Timm
}

/// `stage0.*` → `stem.*`, `stage{n}.*` → `stages.{n-1}.*`, branch and SE names to timm's.
pub fn apple_to_timm(key: &str) -> String {
    let mut parts: Vec<String> = key.split('.').map(str::to_string).collect();
    match parts[0]
        .strip_prefix("stage")
        .and_then(|n| n.parse::<usize>().ok())
    {
        Some(0) => parts[0] = "stem".into(),
        Some(n) => parts[0] = format!("stages.{}", n - 1),
        None if parts[0] == "linear" => parts[0] = "head.fc".into(),
        None => {}
    }
    for part in parts.iter_mut() {
        let renamed = match part.as_str() {
            "rbr_conv" => "conv_kxk",
            "rbr_scale" => "conv_scale",
            "rbr_skip" => "identity",
            "se" => "attn",
            "reduce" => "fc1",
            "expand" => "fc2",
            _ => continue,
        };
        *part = renamed.into();
    }
    parts.join(".")
}

/// Keys a model never reads: PyTorch's BN step counters and the optimizer state that `train` keeps in
/// its checkpoints (under `optimizer.`), so those checkpoints load for inference as they are.
fn is_ignorable(key: &str) -> bool {
    key.ends_with("num_batches_tracked") || key.starts_with("optimizer.")
}

/// A `VarBuilder` backend that records which keys the model reads and turns the first problem into a
/// typed error.
struct StrictBackend {
    tensors: HashMap<String, Tensor>,
    used: Arc<Mutex<HashSet<String>>>,
    problem: Arc<Mutex<Option<CheckpointError>>>,
}

impl StrictBackend {
    fn fail(&self, error: CheckpointError) -> candle_core::Error {
        let message = error.to_string();
        self.problem.lock().unwrap().get_or_insert(error);
        candle_core::Error::Msg(message)
    }
}

impl SimpleBackend for StrictBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some(tensor) = self.tensors.get(name) else {
            return Err(self.fail(CheckpointError::MissingKey {
                key: name.into(),
                expected: s.dims().to_vec(),
                hint: String::new(),
            }));
        };
        if tensor.shape() != &s {
            return Err(self.fail(CheckpointError::ShapeMismatch {
                key: name.into(),
                found: tensor.dims().to_vec(),
                expected: s.dims().to_vec(),
                hint: String::new(),
            }));
        }
        self.used.lock().unwrap().insert(name.to_string());
        tensor.to_device(dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.tensors.get(name) {
            Some(t) => {
                self.used.lock().unwrap().insert(name.to_string());
                t.to_device(dev)?.to_dtype(dtype)
            }
            None => Err(self.fail(CheckpointError::MissingKey {
                key: name.into(),
                expected: vec![],
                hint: String::new(),
            })),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Builds a model from `tensors`, requiring that it reads every tensor (but `num_batches_tracked`) with
/// the right shape. `hint` is appended to errors, e.g. a guess at the checkpoint's real variant.
pub fn build_strict<T>(
    tensors: &HashMap<String, Tensor>,
    device: &Device,
    hint: &str,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<T>,
) -> Result<T, CheckpointError> {
    let used = Arc::new(Mutex::new(HashSet::new()));
    let problem = Arc::new(Mutex::new(None));
    let backend = StrictBackend {
        tensors: tensors.clone(),
        used: used.clone(),
        problem: problem.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
    let model = build(vb).map_err(|e| match problem.lock().unwrap().take() {
        Some(CheckpointError::MissingKey { key, expected, .. }) => CheckpointError::MissingKey {
            key,
            expected,
            hint: hint.into(),
        },
        Some(CheckpointError::ShapeMismatch {
            key,
            found,
            expected,
            ..
        }) => CheckpointError::ShapeMismatch {
            key,
            found,
            expected,
            hint: hint.into(),
        },
        Some(other) => other,
        None => CheckpointError::Model(e),
    })?;
    let used = used.lock().unwrap();
    let unexpected: BTreeSet<&String> = tensors
        .keys()
        .filter(|k| !used.contains(*k) && !is_ignorable(k))
        .collect();
    if !unexpected.is_empty() {
        return Err(CheckpointError::UnexpectedKeys {
            keys: unexpected.into_iter().cloned().collect(),
            hint: hint.into(),
        });
    }
    Ok(model)
}

/// Which published variant the MobileOne weights below `prefix` have, judged by layer widths and
/// branch count; `None` for a custom configuration.
pub fn guess_variant(tensors: &HashMap<String, Tensor>, prefix: &str) -> Option<Variant> {
    let out_channels = |block: &str| {
        ["conv_kxk.0.conv.weight", "reparam_conv.weight"]
            .iter()
            .find_map(|leaf| tensors.get(&format!("{prefix}{block}.{leaf}")))
            .map(|t| t.dims()[0])
    };
    let widths = [
        out_channels("stem")?,
        out_channels("stages.0.1")?,
        out_channels("stages.1.1")?,
        out_channels("stages.2.1")?,
        out_channels("stages.3.1")?,
    ];
    let fused = tensors.contains_key(&format!("{prefix}stem.reparam_conv.weight"));
    let branches = (0..)
        .take_while(|j| {
            tensors.contains_key(&format!("{prefix}stages.0.0.conv_kxk.{j}.conv.weight"))
        })
        .count();
    Variant::ALL.into_iter().find(|&v| {
        let cfg = MobileOneConfig::from_variant(v);
        cfg.feature_channels() == widths && (fused || branches == cfg.num_conv_branches)
    })
}

/// Error hint naming the variant the weights look like when it is not the one being built.
pub fn variant_hint(
    tensors: &HashMap<String, Tensor>,
    prefix: &str,
    config: &MobileOneConfig,
) -> String {
    let requested = Variant::ALL
        .into_iter()
        .find(|&v| same_trunk(&MobileOneConfig::from_variant(v), config));
    match (guess_variant(tensors, prefix), requested) {
        (Some(found), Some(requested)) if found != requested => {
            format!(" (the weights look like MobileOne-{found}, not {requested}: pass --variant {found})")
        }
        (Some(found), None) => format!(" (the weights look like MobileOne-{found})"),
        (None, _)
            if !tensors
                .keys()
                .any(|k| k.starts_with(&format!("{prefix}stem."))) =>
        {
            format!(" (the checkpoint has no MobileOne keys under `{prefix}stem.`)")
        }
        _ => String::new(),
    }
}

fn same_trunk(a: &MobileOneConfig, b: &MobileOneConfig) -> bool {
    a.clone().with_num_classes(None) == b.clone().with_num_classes(None)
}

/// Builds MobileOne from a backbone checkpoint (fused or not, as the checkpoint is). Detector and
/// segmenter checkpoints are loaded by their heads, which build the trunk below `backbone.body`.
pub fn load_mobileone(
    checkpoint: &Checkpoint,
    config: &MobileOneConfig,
    output_stride: usize,
    device: &Device,
) -> Result<MobileOne, CheckpointError> {
    let hint = variant_hint(&checkpoint.tensors, "", config);
    let fused = checkpoint.is_fused("");
    build_strict(&checkpoint.tensors, device, &hint, |vb| {
        if fused {
            MobileOne::new_fused(config, output_stride, vb)
        } else {
            MobileOne::new(config, output_stride, vb)
        }
    })
}

/// Writes tensors and header metadata to `path` through a temporary file and a rename, so an
/// interrupted write never leaves a truncated checkpoint behind.
pub fn save(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &HashMap<String, String>,
) -> Result<(), CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.into(),
        error: source,
    };
    let contiguous = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.contiguous()?)))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let metadata = (!metadata.is_empty()).then(|| metadata.clone());
    let bytes = safetensors::serialize(contiguous.iter().map(|(k, t)| (k.as_str(), t)), metadata)
        .map_err(|e| CheckpointError::Format {
        path: path.into(),
        reason: e.to_string(),
    })?;
    write_atomic(path, &bytes).map_err(io)
}

/// The value a train-time (multi-branch) trunk variable starts from so that the trunk computes, in
/// eval mode, exactly what a reparameterised checkpoint computes: the first conv branch takes the
/// fused kernel, its BatchNorm passes it through (γ 1, β the fused bias, running mean 0, running
/// variance 1 − ε), and every other branch is switched off by a zero γ and β (the 1x1 scale branch,
/// the BN identity, extra conv branches; their conv weights keep their random initialisation, so they
/// learn once γ moves). SE weights and anything else are copied by name. In training mode the first
/// branch's BatchNorm normalises with batch statistics, so the function is the fused one only up to
/// a per-channel affine map at the start.
///
/// `name` is the train-time variable's name relative to the trunk (`stages.1.0.conv_kxk.0.bn.bias`),
/// `fused` the checkpoint's tensors and `prefix` the trunk's prefix in them. Returns `None` for a
/// variable that keeps its initialisation.
///
/// # Errors
/// A fused tensor the name needs is missing from the checkpoint.
pub fn branch_init_from_fused(
    name: &str,
    fused: &HashMap<String, Tensor>,
    prefix: &str,
    like: &Tensor,
) -> Result<Option<Tensor>, CheckpointError> {
    let eps = crate::mobileone::BN_EPS;
    let fetch = |key: String| {
        fused
            .get(&key)
            .cloned()
            .ok_or_else(|| CheckpointError::MissingKey {
                key,
                expected: like.dims().to_vec(),
                hint: "a reparameterised trunk has `reparam_conv.weight` and `.bias` per block"
                    .into(),
            })
    };
    let fill = |value: f64| -> Result<Option<Tensor>, CheckpointError> {
        Ok(Some((like.ones_like()? * value)?))
    };
    let block = |suffix: &str| name.strip_suffix(suffix).map(str::to_string);
    if let Some(block) = block(".conv_kxk.0.conv.weight") {
        return fetch(format!("{prefix}{block}.reparam_conv.weight")).map(Some);
    }
    if let Some(block) = block(".conv_kxk.0.bn.bias") {
        return fetch(format!("{prefix}{block}.reparam_conv.bias")).map(Some);
    }
    let first_bn = name.contains(".conv_kxk.0.bn.");
    let bn_param = |field: &str| {
        name.ends_with(&format!(".bn.{field}"))
            || (name.contains(".identity.") && name.ends_with(&format!(".{field}")))
    };
    if bn_param("running_mean") {
        return fill(0.0);
    }
    if bn_param("running_var") {
        return fill(if first_bn { 1.0 - eps } else { 1.0 });
    }
    if bn_param("weight") {
        return fill(if first_bn { 1.0 } else { 0.0 });
    }
    if bn_param("bias") {
        return fill(0.0);
    }
    if name.contains(".conv_kxk.") || name.contains(".conv_scale.") {
        return Ok(None);
    }
    Ok(fused.get(&format!("{prefix}{name}")).cloned())
}

/// Writes `bytes` to a sibling temporary file, syncs it and renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apple_keys_map_to_timm() {
        assert_eq!(
            apple_to_timm("stage0.rbr_conv.0.conv.weight"),
            "stem.conv_kxk.0.conv.weight"
        );
        assert_eq!(
            apple_to_timm("stage3.7.rbr_skip.running_var"),
            "stages.2.7.identity.running_var"
        );
        assert_eq!(
            apple_to_timm("stage4.1.se.reduce.bias"),
            "stages.3.1.attn.fc1.bias"
        );
        assert_eq!(
            apple_to_timm("stage1.0.rbr_scale.bn.weight"),
            "stages.0.0.conv_scale.bn.weight"
        );
        assert_eq!(
            apple_to_timm("stage2.3.reparam_conv.bias"),
            "stages.1.3.reparam_conv.bias"
        );
        assert_eq!(apple_to_timm("linear.weight"), "head.fc.weight");
    }
}
