//! Architecture hyper-parameters and the checkpoint metadata that records them.

use std::collections::HashMap;
use std::str::FromStr;

use mobileone::{MobileOneConfig, Variant};

/// torchvision's `DeepLabHead` default atrous rates.
pub const DEFAULT_ATROUS_RATES: [usize; 3] = [12, 24, 36];
/// Width of torchvision's ASPP branches, projection and 3x3 refinement conv.
pub const DEFAULT_HEAD_CHANNELS: usize = 256;
/// Output stride of DeepLabV3 unless told otherwise (the common training setting).
pub const DEFAULT_OUTPUT_STRIDE: usize = 16;
/// ImageNet normalisation, what MobileOne trunks are trained with.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Everything that decides the shape of the network.
#[derive(Debug, Clone, PartialEq)]
pub struct DeepLabConfig {
    /// MobileOne trunk (its `num_classes` is ignored: the trunk is built without a classifier).
    pub backbone: MobileOneConfig,
    /// 32, 16 or 8: strides removed from the last stages and replaced by dilation.
    pub output_stride: usize,
    /// Dilations of the three 3x3 ASPP branches.
    pub atrous_rates: Vec<usize>,
    /// Width of the ASPP branches and the layers after them (256 in torchvision).
    pub head_channels: usize,
    pub num_classes: usize,
    /// Nominal stride (8 or 16) of the trunk features the auxiliary FCN head reads; `None`: no aux head.
    pub aux_stride: Option<usize>,
}

impl DeepLabConfig {
    /// A preset trunk with torchvision's defaults (rates 12/24/36, no auxiliary head).
    pub fn new(variant: Variant, num_classes: usize, output_stride: usize) -> Self {
        Self {
            backbone: MobileOneConfig::from_variant(variant).with_num_classes(None),
            output_stride,
            atrous_rates: DEFAULT_ATROUS_RATES.to_vec(),
            head_channels: DEFAULT_HEAD_CHANNELS,
            num_classes,
            aux_stride: None,
        }
    }

    /// Index into `MobileOne::forward_features` of the auxiliary head's input.
    pub fn aux_feature_index(&self) -> Option<usize> {
        self.aux_stride.map(|s| if s == 8 { 2 } else { 3 })
    }

    pub fn validate(&self) -> Result<(), String> {
        if ![32, 16, 8].contains(&self.output_stride) {
            return Err(format!(
                "output stride must be 32, 16 or 8, got {}",
                self.output_stride
            ));
        }
        if self.atrous_rates.len() != 3 || self.atrous_rates.contains(&0) {
            return Err(format!(
                "ASPP needs three positive atrous rates, got {:?}",
                self.atrous_rates
            ));
        }
        if self.num_classes == 0 || self.head_channels == 0 {
            return Err("the number of classes and the head width must be positive".into());
        }
        if let Some(s) = self.aux_stride {
            if s != 8 && s != 16 {
                return Err(format!(
                    "the auxiliary head reads stride-8 or stride-16 features, not {s}"
                ));
            }
        }
        Ok(())
    }
}

/// A segmenter checkpoint's description: its architecture plus what inference needs around it.
#[derive(Debug, Clone, PartialEq)]
pub struct SegmenterSpec {
    /// The trunk's preset, when it is one (custom trunks are built from code, e.g. in tests).
    pub variant: Option<Variant>,
    pub config: DeepLabConfig,
    /// One name per class (may be empty when the checkpoint does not say).
    pub class_names: Vec<String>,
    /// One RGB colour per class (may be empty: [`default_palette`] then colours the classes).
    pub palette: Vec<[u8; 3]>,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// Metadata keys of a segmenter safetensors header (all values are strings; lists are JSON).
pub mod keys {
    pub const TASK: &str = "task";
    pub const VARIANT: &str = "variant";
    pub const OUTPUT_STRIDE: &str = "output_stride";
    pub const ATROUS_RATES: &str = "atrous_rates";
    pub const NUM_CLASSES: &str = "num_classes";
    pub const HEAD_CHANNELS: &str = "head_channels";
    pub const AUX_STRIDE: &str = "aux_stride";
    pub const CLASS_NAMES: &str = "class_names";
    pub const PALETTE: &str = "palette";
    pub const MEAN: &str = "mean";
    pub const STD: &str = "std";
}

/// Value of the `task` metadata key in segmenter checkpoints.
pub const TASK: &str = "segmentation";

impl SegmenterSpec {
    pub fn new(variant: Variant, num_classes: usize, output_stride: usize) -> Self {
        Self {
            variant: Some(variant),
            config: DeepLabConfig::new(variant, num_classes, output_stride),
            class_names: Vec::new(),
            palette: Vec::new(),
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// The safetensors header metadata describing this segmenter.
    pub fn to_metadata(&self) -> HashMap<String, String> {
        let json = |v: serde_json::Value| v.to_string();
        let mut m = HashMap::new();
        m.insert(keys::TASK.into(), TASK.into());
        if let Some(v) = self.variant {
            m.insert(keys::VARIANT.into(), v.to_string());
        }
        m.insert(
            keys::OUTPUT_STRIDE.into(),
            self.config.output_stride.to_string(),
        );
        m.insert(
            keys::ATROUS_RATES.into(),
            json(serde_json::json!(self.config.atrous_rates)),
        );
        m.insert(
            keys::NUM_CLASSES.into(),
            self.config.num_classes.to_string(),
        );
        m.insert(
            keys::HEAD_CHANNELS.into(),
            self.config.head_channels.to_string(),
        );
        if let Some(s) = self.config.aux_stride {
            m.insert(keys::AUX_STRIDE.into(), s.to_string());
        }
        if !self.class_names.is_empty() {
            m.insert(
                keys::CLASS_NAMES.into(),
                json(serde_json::json!(self.class_names)),
            );
        }
        if !self.palette.is_empty() {
            m.insert(keys::PALETTE.into(), json(serde_json::json!(self.palette)));
        }
        m.insert(keys::MEAN.into(), json(serde_json::json!(self.mean)));
        m.insert(keys::STD.into(), json(serde_json::json!(self.std)));
        m
    }

    /// Name of class `index`, falling back to `class <index>`.
    pub fn class_name(&self, index: usize) -> String {
        self.class_names
            .get(index)
            .cloned()
            .unwrap_or_else(|| format!("class {index}"))
    }

    /// Colour of class `index`: the checkpoint's palette, else [`default_palette`].
    pub fn color(&self, index: usize) -> [u8; 3] {
        self.palette
            .get(index)
            .copied()
            .unwrap_or_else(|| palette_color(index))
    }
}

/// Metadata values as read from a header; every field is optional, parsing errors name the key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetadataFields {
    pub task: Option<String>,
    pub variant: Option<Variant>,
    pub output_stride: Option<usize>,
    pub atrous_rates: Option<Vec<usize>>,
    pub num_classes: Option<usize>,
    pub head_channels: Option<usize>,
    pub aux_stride: Option<usize>,
    pub class_names: Option<Vec<String>>,
    pub palette: Option<Vec<[u8; 3]>>,
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
}

impl MetadataFields {
    pub fn parse(metadata: &HashMap<String, String>) -> Result<Self, String> {
        fn get<T>(
            m: &HashMap<String, String>,
            key: &str,
            parse: impl Fn(&str) -> Result<T, String>,
        ) -> Result<Option<T>, String> {
            m.get(key)
                .map(|v| parse(v).map_err(|e| format!("metadata `{key}` = {v:?}: {e}")))
                .transpose()
        }
        fn number(v: &str) -> Result<usize, String> {
            v.trim().parse().map_err(|e| format!("{e}"))
        }
        fn json<T: serde::de::DeserializeOwned>(v: &str) -> Result<T, String> {
            serde_json::from_str(v).map_err(|e| e.to_string())
        }
        Ok(Self {
            task: metadata.get(keys::TASK).cloned(),
            variant: get(metadata, keys::VARIANT, Variant::from_str)?,
            output_stride: get(metadata, keys::OUTPUT_STRIDE, number)?,
            atrous_rates: get(metadata, keys::ATROUS_RATES, json)?,
            num_classes: get(metadata, keys::NUM_CLASSES, number)?,
            head_channels: get(metadata, keys::HEAD_CHANNELS, number)?,
            aux_stride: get(metadata, keys::AUX_STRIDE, number)?,
            class_names: get(metadata, keys::CLASS_NAMES, json)?,
            palette: get(metadata, keys::PALETTE, json)?,
            mean: get(metadata, keys::MEAN, json)?,
            std: get(metadata, keys::STD, json)?,
        })
    }
}

/// The PASCAL VOC colour map (bit-interleaved class index), which mmseg and most tools also use for
/// datasets with more classes.
pub fn palette_color(index: usize) -> [u8; 3] {
    let mut rgb = [0u8; 3];
    let mut label = index;
    for shift in (0..8).rev() {
        for (c, value) in rgb.iter_mut().enumerate() {
            *value |= (((label >> c) & 1) as u8) << shift;
        }
        label >>= 3;
    }
    rgb
}

/// [`palette_color`] for classes `0..n`.
pub fn default_palette(n: usize) -> Vec<[u8; 3]> {
    (0..n).map(palette_color).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voc_palette_matches_the_official_colours() {
        assert_eq!(palette_color(0), [0, 0, 0]);
        assert_eq!(palette_color(1), [128, 0, 0]);
        assert_eq!(palette_color(2), [0, 128, 0]);
        assert_eq!(palette_color(15), [192, 128, 128]); // person
        assert_eq!(palette_color(20), [0, 64, 128]); // tvmonitor
    }

    #[test]
    fn metadata_round_trips() {
        let mut spec = SegmenterSpec::new(Variant::S1, 3, 8);
        spec.config.aux_stride = Some(16);
        spec.class_names = vec!["a".into(), "b c".into(), "\"d\"".into()];
        spec.palette = default_palette(3);
        let fields = MetadataFields::parse(&spec.to_metadata()).unwrap();
        assert_eq!(fields.task.as_deref(), Some(TASK));
        assert_eq!(fields.variant, Some(Variant::S1));
        assert_eq!(fields.output_stride, Some(8));
        assert_eq!(fields.atrous_rates, Some(vec![12, 24, 36]));
        assert_eq!(fields.num_classes, Some(3));
        assert_eq!(fields.head_channels, Some(256));
        assert_eq!(fields.aux_stride, Some(16));
        assert_eq!(fields.class_names.as_ref(), Some(&spec.class_names));
        assert_eq!(fields.palette.as_ref(), Some(&spec.palette));
        assert_eq!(fields.mean, Some(IMAGENET_MEAN));
    }

    #[test]
    fn bad_metadata_names_the_key() {
        let m = HashMap::from([(keys::ATROUS_RATES.to_string(), "12,24".to_string())]);
        let err = MetadataFields::parse(&m).unwrap_err();
        assert!(err.contains("atrous_rates"), "{err}");
    }
}
