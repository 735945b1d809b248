//! Detector configuration and the checkpoint header metadata that carries it.

use std::collections::HashMap;

use candle_core::Tensor;
use mobileone::{MobileOneConfig, Variant};

use crate::Error;

/// torchvision's 91-entry COCO label list (label = COCO category id, "N/A" for unused ids).
pub const COCO_CATEGORIES: [&str; 91] = [
    "__background__",
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "N/A",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "N/A",
    "backpack",
    "umbrella",
    "N/A",
    "N/A",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "N/A",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "N/A",
    "dining table",
    "N/A",
    "N/A",
    "toilet",
    "N/A",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "N/A",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
];

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Architecture and preprocessing of an SSDLite detector.
#[derive(Debug, Clone, PartialEq)]
pub struct SsdLiteConfig {
    /// The MobileOne trunk (without classifier).
    pub trunk: MobileOneConfig,
    /// The published variant the trunk is, `None` for a custom one.
    pub variant: Option<Variant>,
    /// Output widths of the four extra blocks after the stride-32 features.
    pub extra_channels: [usize; 4],
    /// Classifier outputs, background (label 0) included.
    pub num_classes: usize,
    /// Side of the square network input.
    pub image_size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl SsdLiteConfig {
    /// SSDLite320 on a published MobileOne variant: extras 512/256/256/128, ImageNet normalisation.
    pub fn new(variant: Variant, num_classes: usize) -> Self {
        Self {
            trunk: MobileOneConfig::from_variant(variant).with_num_classes(None),
            variant: Some(variant),
            extra_channels: [512, 256, 256, 128],
            num_classes,
            image_size: 320,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// Channels of the six prediction levels: trunk strides 16 and 32, then the extra blocks.
    pub fn level_channels(&self) -> [usize; 6] {
        let c = self.trunk.feature_channels();
        let e = self.extra_channels;
        [c[3], c[4], e[0], e[1], e[2], e[3]]
    }
}

/// Label names and COCO category ids of a detector's classes.
#[derive(Debug, Clone, PartialEq)]
pub struct Labels {
    /// One name per label, label 0 being the background.
    pub names: Vec<String>,
    /// COCO category id of each label (torchvision's COCO models use the id itself as label).
    pub category_ids: Vec<u64>,
}

impl Labels {
    /// torchvision's convention for `num_classes` = 91: label = category id, COCO names; otherwise
    /// generic names and identity ids.
    pub fn default_for(num_classes: usize) -> Self {
        let names = if num_classes == COCO_CATEGORIES.len() {
            COCO_CATEGORIES.iter().map(|s| s.to_string()).collect()
        } else {
            (0..num_classes)
                .map(|i| {
                    if i == 0 {
                        "background".into()
                    } else {
                        format!("class{i}")
                    }
                })
                .collect()
        };
        Self {
            names,
            category_ids: (0..num_classes as u64).collect(),
        }
    }

    pub fn name(&self, label: usize) -> &str {
        self.names.get(label).map_or("?", String::as_str)
    }

    pub fn category_id(&self, label: usize) -> u64 {
        self.category_ids
            .get(label)
            .copied()
            .unwrap_or(label as u64)
    }
}

/// Settings that take precedence over what a checkpoint says (e.g. command-line flags).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub variant: Option<Variant>,
    pub num_classes: Option<usize>,
    pub image_size: Option<usize>,
}

fn metadata_error(key: &str, reason: impl Into<String>) -> Error {
    Error::Metadata {
        key: key.into(),
        reason: reason.into(),
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(
    meta: &HashMap<String, String>,
    key: &str,
) -> Result<Option<T>, Error> {
    meta.get(key)
        .map(|v| serde_json::from_str(v).map_err(|e| metadata_error(key, format!("{e} in {v:?}"))))
        .transpose()
}

fn parse_usize(meta: &HashMap<String, String>, key: &str) -> Result<Option<usize>, Error> {
    meta.get(key)
        .map(|v| {
            v.trim()
                .parse()
                .map_err(|_| metadata_error(key, format!("{v:?} is not a positive integer")))
        })
        .transpose()
}

#[derive(serde::Deserialize, serde::Serialize)]
struct TrunkJson {
    stem_channels: usize,
    stage_channels: [usize; 4],
    stage_blocks: [usize; 4],
    num_conv_branches: usize,
    se_blocks: [usize; 4],
}

/// Resolves the configuration of a detector checkpoint: overrides first, then the header metadata,
/// then what the tensor shapes say (so torchvision-trained checkpoints without metadata load too).
pub fn resolve(
    tensors: &HashMap<String, Tensor>,
    meta: &HashMap<String, String>,
    overrides: &Overrides,
) -> Result<(SsdLiteConfig, Labels), Error> {
    if let Some(task) = meta.get("task") {
        if task != "detection" {
            return Err(metadata_error(
                "task",
                format!("this is a {task} checkpoint, not a detector"),
            ));
        }
    }
    if !tensors
        .keys()
        .any(|k| k.starts_with("head.classification_head."))
    {
        return Err(Error::Config(
            "no SSDLite head in the checkpoint (no `head.classification_head.*` keys): is it a detector?".into(),
        ));
    }
    let (trunk, variant) = if let Some(v) = overrides.variant {
        (MobileOneConfig::from_variant(v), Some(v))
    } else if let Some(t) = parse_json::<TrunkJson>(meta, "mobileone_config")? {
        let cfg = MobileOneConfig {
            stem_channels: t.stem_channels,
            stage_channels: t.stage_channels,
            stage_blocks: t.stage_blocks,
            num_conv_branches: t.num_conv_branches,
            se_blocks: t.se_blocks,
            num_classes: None,
        };
        (cfg, None)
    } else if let Some(v) = meta.get("variant") {
        let v: Variant = v
            .parse()
            .map_err(|_| metadata_error("variant", format!("unknown variant {v:?}")))?;
        (MobileOneConfig::from_variant(v), Some(v))
    } else if let Some(v) = mobileone::checkpoint::guess_variant(tensors, "backbone.body.") {
        (MobileOneConfig::from_variant(v), Some(v))
    } else {
        return Err(Error::Config(
            "cannot tell the MobileOne variant of this checkpoint (no metadata, unknown layer widths): pass --variant"
                .into(),
        ));
    };
    let num_classes = match overrides.num_classes.or(parse_usize(meta, "num_classes")?) {
        Some(n) => n,
        None => {
            // Classification head of level 0 has num_classes × anchors outputs (6 anchors per location).
            let key = "head.classification_head.module_list.0.1.bias";
            let t = tensors.get(key).ok_or_else(|| {
                Error::Config(format!(
                    "the checkpoint has no `{key}`: is it an SSDLite detector?"
                ))
            })?;
            t.dims()[0] / 6
        }
    };
    let extra_channels = match parse_json::<[usize; 4]>(meta, "extra_channels")? {
        Some(e) => e,
        None => {
            let width = |i: usize| {
                tensors
                    .get(&format!("backbone.extra.{i}.2.0.weight"))
                    .map(|t| t.dims()[0])
            };
            match (width(0), width(1), width(2), width(3)) {
                (Some(a), Some(b), Some(c), Some(d)) => [a, b, c, d],
                _ => [512, 256, 256, 128],
            }
        }
    };
    let image_size = overrides
        .image_size
        .or(parse_usize(meta, "image_size")?)
        .unwrap_or(320);
    let mean = parse_json::<[f32; 3]>(meta, "mean")?.unwrap_or(IMAGENET_MEAN);
    let std = parse_json::<[f32; 3]>(meta, "std")?.unwrap_or(IMAGENET_STD);
    let config = SsdLiteConfig {
        trunk: trunk.with_num_classes(None),
        variant,
        extra_channels,
        num_classes,
        image_size,
        mean,
        std,
    };
    let mut labels = Labels::default_for(num_classes);
    if overrides.num_classes.is_some() && overrides.num_classes != parse_usize(meta, "num_classes")?
    {
        // The checkpoint's own class list describes a different head: keep generic labels.
        return Ok((config, labels));
    }
    if let Some(names) = parse_json::<Vec<String>>(meta, "class_names")? {
        if names.len() != num_classes {
            return Err(metadata_error(
                "class_names",
                format!("{} names for {num_classes} classes", names.len()),
            ));
        }
        labels.names = names;
    }
    if let Some(ids) = parse_json::<Vec<u64>>(meta, "label_to_category_id")? {
        if ids.len() != num_classes {
            return Err(metadata_error(
                "label_to_category_id",
                format!("{} ids for {num_classes} classes", ids.len()),
            ));
        }
        labels.category_ids = ids;
    }
    Ok((config, labels))
}

fn json<T: serde::Serialize + ?Sized>(value: &T) -> String {
    serde_json::to_string(value).expect("plain data serialises")
}

/// Header metadata describing `config` and `labels`, as the project writes it.
pub fn to_metadata(config: &SsdLiteConfig, labels: &Labels) -> HashMap<String, String> {
    let mut meta = HashMap::new();
    meta.insert("task".into(), "detection".into());
    meta.insert("architecture".into(), "ssdlite".into());
    match config.variant {
        Some(v) => {
            meta.insert("variant".into(), v.to_string());
        }
        None => {
            let t = &config.trunk;
            let trunk = TrunkJson {
                stem_channels: t.stem_channels,
                stage_channels: t.stage_channels,
                stage_blocks: t.stage_blocks,
                num_conv_branches: t.num_conv_branches,
                se_blocks: t.se_blocks,
            };
            meta.insert("variant".into(), "custom".into());
            meta.insert("mobileone_config".into(), json(&trunk));
        }
    }
    meta.insert("extra_channels".into(), json(&config.extra_channels));
    meta.insert("num_classes".into(), config.num_classes.to_string());
    meta.insert("image_size".into(), config.image_size.to_string());
    meta.insert("mean".into(), json(&config.mean));
    meta.insert("std".into(), json(&config.std));
    meta.insert("class_names".into(), json(&labels.names));
    meta.insert("label_to_category_id".into(), json(&labels.category_ids));
    meta
}
