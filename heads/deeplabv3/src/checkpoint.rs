//! Loading segmenter checkpoints: torchvision key names, header metadata, command-line overrides for
//! checkpoints that carry no metadata, strict key and shape checking.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use mobileone::checkpoint::{self, build_strict, guess_variant, variant_hint, Checkpoint};
use mobileone::{Form, MobileOneConfig, Variant};

use crate::config::{
    DeepLabConfig, MetadataFields, SegmenterSpec, DEFAULT_ATROUS_RATES, DEFAULT_HEAD_CHANNELS,
    DEFAULT_OUTPUT_STRIDE, IMAGENET_MEAN, IMAGENET_STD, TASK,
};
use crate::model::DeepLabV3;
use crate::DeepLabError;

/// Prefix of the trunk's keys in torchvision's segmentation models.
pub const BACKBONE_PREFIX: &str = "backbone.body.";
const CLASSIFIER_WEIGHT: &str = "classifier.4.weight";
const AUX_HIDDEN_WEIGHT: &str = "aux_classifier.0.weight";

/// Values given on the command line; each one wins over the checkpoint's metadata.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub variant: Option<Variant>,
    pub num_classes: Option<usize>,
    pub output_stride: Option<usize>,
    pub atrous_rates: Option<Vec<usize>>,
}

/// Reads a segmenter checkpoint and builds the model it holds (fused or not, as stored).
pub fn load(
    path: &Path,
    overrides: &Overrides,
    device: &Device,
) -> Result<(DeepLabV3, SegmenterSpec), DeepLabError> {
    let checkpoint = checkpoint::load(path)?;
    let spec = resolve_spec(&checkpoint, overrides)?;
    let model = build(&checkpoint.tensors, &spec.config, device)?;
    Ok((model, spec))
}

/// Builds the model from tensors under torchvision's names, strictly (every key used, shapes checked).
pub fn build(
    tensors: &HashMap<String, Tensor>,
    config: &DeepLabConfig,
    device: &Device,
) -> Result<DeepLabV3, DeepLabError> {
    let hint = variant_hint(tensors, BACKBONE_PREFIX, &config.backbone);
    let form = stored_form(tensors);
    Ok(build_strict(tensors, device, &hint, |vb| {
        DeepLabV3::with_form(config, form, vb)
    })?)
}

/// The form each module is stored in: the trunk is fused when it has `reparam_conv` tensors, the
/// heads when the ASPP's first conv carries a bias (a folded BatchNorm) instead of a BN.
pub fn stored_form(tensors: &HashMap<String, Tensor>) -> Form {
    Form {
        trunk_fused: tensors.contains_key(&format!("{BACKBONE_PREFIX}stem.reparam_conv.weight")),
        heads_fused: tensors.contains_key("classifier.0.convs.0.0.bias"),
    }
}

/// Writes the model's tensors with `spec`'s metadata (atomically).
pub fn save(path: &Path, model: &DeepLabV3, spec: &SegmenterSpec) -> Result<(), DeepLabError> {
    Ok(checkpoint::save(
        path,
        &model.named_tensors(),
        &spec.to_metadata(),
    )?)
}

/// Architecture and inference settings: overrides, then metadata, then what the tensors show, then
/// torchvision's defaults.
pub fn resolve_spec(
    checkpoint: &Checkpoint,
    overrides: &Overrides,
) -> Result<SegmenterSpec, DeepLabError> {
    let invalid = |message: String| DeepLabError::Invalid {
        path: checkpoint.path.clone(),
        message,
    };
    let meta = MetadataFields::parse(&checkpoint.metadata).map_err(invalid)?;
    if let Some(task) = meta.task.as_deref().filter(|t| *t != TASK) {
        return Err(invalid(format!(
            "this is a `{task}` checkpoint, not a segmenter"
        )));
    }
    let tensors = &checkpoint.tensors;
    let Some(classifier) = tensors.get(CLASSIFIER_WEIGHT) else {
        return Err(invalid(not_a_segmenter(tensors)));
    };
    let variant = overrides
        .variant
        .or(meta.variant)
        .or_else(|| guess_variant(tensors, BACKBONE_PREFIX))
        .ok_or_else(|| {
            invalid("cannot tell which MobileOne variant the trunk is; pass --variant".into())
        })?;
    let backbone = MobileOneConfig::from_variant(variant).with_num_classes(None);
    let stored_classes = classifier.dims()[0];
    let num_classes = overrides
        .num_classes
        .or(meta.num_classes)
        .unwrap_or(stored_classes);
    if num_classes != stored_classes {
        let source = if overrides.num_classes.is_some() {
            "--num-classes"
        } else {
            "the metadata's `num_classes`"
        };
        return Err(invalid(format!(
            "{source} says {num_classes} classes, but the checkpoint has {stored_classes} (its classifier \
             `classifier.4.weight` has {stored_classes} outputs)"
        )));
    }
    let aux_stride = match tensors.get(AUX_HIDDEN_WEIGHT) {
        None => None,
        Some(aux) => Some(meta.aux_stride.unwrap_or_else(|| {
            // Infer from the aux head's input width; stride 16 (torchvision's choice) when ambiguous.
            let channels = backbone.feature_channels();
            if aux.dims()[1] == channels[2] && channels[2] != channels[3] {
                8
            } else {
                16
            }
        })),
    };
    let config = DeepLabConfig {
        backbone,
        output_stride: overrides
            .output_stride
            .or(meta.output_stride)
            .unwrap_or(DEFAULT_OUTPUT_STRIDE),
        atrous_rates: overrides
            .atrous_rates
            .clone()
            .or(meta.atrous_rates)
            .unwrap_or_else(|| DEFAULT_ATROUS_RATES.to_vec()),
        // The refinement conv's width is the head's width, whatever the metadata says.
        head_channels: tensors
            .get("classifier.1.weight")
            .map_or(DEFAULT_HEAD_CHANNELS, |t| t.dims()[0]),
        num_classes,
        aux_stride,
    };
    config.validate().map_err(invalid)?;
    let class_names = meta.class_names.unwrap_or_default();
    if !class_names.is_empty() && class_names.len() != num_classes {
        return Err(invalid(format!(
            "the checkpoint has {num_classes} classes but its metadata lists {} class names",
            class_names.len()
        )));
    }
    let palette = meta.palette.unwrap_or_default();
    if !palette.is_empty() && palette.len() < num_classes {
        return Err(invalid(format!(
            "metadata palette has {} colours for {num_classes} classes",
            palette.len()
        )));
    }
    Ok(SegmenterSpec {
        variant: Some(variant),
        config,
        class_names,
        palette,
        mean: meta.mean.unwrap_or(IMAGENET_MEAN),
        std: meta.std.unwrap_or(IMAGENET_STD),
    })
}

/// Explains what a checkpoint without a DeepLabV3 classifier seems to be.
fn not_a_segmenter(tensors: &HashMap<String, Tensor>) -> String {
    let has = |prefix: &str| tensors.keys().any(|k| k.starts_with(prefix));
    let what = if has("stem.") {
        "it looks like a MobileOne ImageNet checkpoint (keys `stem.*`), not a segmenter"
    } else if has("head.") || has("anchor") || has("backbone.extra") {
        "it looks like a detector checkpoint"
    } else {
        "it has no DeepLabV3 keys"
    };
    format!("not a DeepLabV3 checkpoint: no `{CLASSIFIER_WEIGHT}`; {what}")
}
