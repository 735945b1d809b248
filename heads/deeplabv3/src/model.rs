//! DeepLabV3 as torchvision's `_SimpleSegmentationModel`: trunk (`backbone.body`), `classifier`
//! (DeepLabHead) on the last features, optional `aux_classifier` (FCNHead), logits resized to the input.

use candle_core::{ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use mobileone::{Form, MobileOne};

use crate::aspp::{DeepLabHead, FcnHead};
use crate::config::DeepLabConfig;
use mobileone::resize::resize_bilinear;

/// Logits at the input's resolution, (N, classes, H, W).
#[derive(Debug, Clone)]
pub struct SegmentationOutput {
    pub logits: Tensor,
    /// The auxiliary head's logits, when the model has one.
    pub aux_logits: Option<Tensor>,
}

#[derive(Debug, Clone)]
pub struct DeepLabV3 {
    pub config: DeepLabConfig,
    pub backbone: MobileOne,
    pub classifier: DeepLabHead,
    pub aux_classifier: Option<FcnHead>,
}

impl DeepLabV3 {
    /// Train-time form (multi-branch trunk, separate BatchNorms) below the checkpoint root `vb`.
    pub fn new(config: &DeepLabConfig, vb: VarBuilder) -> Result<Self> {
        Self::with_form(config, Form::TRAIN, vb)
    }

    /// Inference form as written by [`DeepLabV3::fuse`] + [`DeepLabV3::named_tensors`]: reparameterised
    /// trunk, BatchNorms folded into conv biases.
    pub fn new_fused(config: &DeepLabConfig, vb: VarBuilder) -> Result<Self> {
        Self::with_form(config, Form::FUSED, vb)
    }

    /// Trunk and heads each in the form `form` gives (e.g. a reparameterised trunk under heads that
    /// still carry BatchNorm, as fine-tuning a fused ImageNet trunk produces).
    pub fn with_form(config: &DeepLabConfig, form: Form, vb: VarBuilder) -> Result<Self> {
        config.validate().map_err(candle_core::Error::Msg)?;
        let trunk = config.backbone.clone().with_num_classes(None);
        let body = vb.pp("backbone").pp("body");
        let fused = form.heads_fused;
        let backbone = if form.trunk_fused {
            MobileOne::new_fused(&trunk, config.output_stride, body)?
        } else {
            MobileOne::new(&trunk, config.output_stride, body)?
        };
        let channels = trunk.feature_channels();
        let classifier = DeepLabHead::new(
            vb.pp("classifier"),
            channels[4],
            config.head_channels,
            config.num_classes,
            &config.atrous_rates,
            fused,
        )?;
        let aux_classifier = config
            .aux_feature_index()
            .map(|i| {
                FcnHead::new(
                    vb.pp("aux_classifier"),
                    channels[i],
                    config.num_classes,
                    fused,
                )
            })
            .transpose()?;
        Ok(Self {
            config: config.clone(),
            backbone,
            classifier,
            aux_classifier,
        })
    }

    /// Logits at the input's resolution; `train` selects batch statistics and dropout.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<SegmentationOutput> {
        let (_, _, height, width) = x.dims4()?;
        let aux = match (&self.aux_classifier, self.config.aux_feature_index()) {
            (Some(head), Some(i)) if i < 4 => Some((head, i)),
            _ => None,
        };
        let levels: Vec<usize> = aux.map(|(_, i)| i).into_iter().chain([4]).collect();
        let features = self.backbone.forward_features_at(x, train, &levels)?;
        let logits = self
            .classifier
            .forward_t(&features[levels.len() - 1], train)?;
        let logits = resize_bilinear(&logits, height, width)?;
        let aux_logits = match aux {
            Some((head, _)) => Some(resize_bilinear(
                &head.forward_t(&features[0], train)?,
                height,
                width,
            )?),
            _ => None,
        };
        Ok(SegmentationOutput { logits, aux_logits })
    }

    /// Reparameterises the trunk and folds every BatchNorm of the heads; eval-mode outputs are unchanged.
    pub fn fuse(&mut self) -> Result<()> {
        self.backbone.reparameterize()?;
        self.classifier.fuse()?;
        if let Some(aux) = &mut self.aux_classifier {
            aux.fuse()?;
        }
        Ok(())
    }

    pub fn is_fused(&self) -> bool {
        self.backbone.is_fused() && self.classifier.is_fused()
    }

    /// Every tensor under torchvision's checkpoint names (fused or not, as the model is).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .backbone
            .named_tensors()
            .into_iter()
            .map(|(k, t)| (format!("backbone.body.{k}"), t))
            .collect();
        self.classifier.named_tensors("classifier", &mut out);
        if let Some(aux) = &self.aux_classifier {
            aux.named_tensors("aux_classifier", &mut out);
        }
        out
    }
}
