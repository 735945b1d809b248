//! The generic single-stage detector (torchvision's `SSD`): MobileOne taps at strides 16 and 32, extra
//! blocks, SSDLite heads, default boxes; inference to detections in original-image pixels, training to
//! losses.

use std::path::Path;

use candle_core::{Device, ModuleT, Result, Tensor};
use candle_nn::VarBuilder;
use mobileone::checkpoint::{self, Checkpoint};
use mobileone::{Form, MobileOne};

use crate::anchors::{Box4, DefaultBoxGenerator};
use crate::config::{resolve, Labels, Overrides, SsdLiteConfig};
use crate::loss::{Losses, SsdLoss, Target};
use crate::postprocess::{postprocess, Detection, PostProcessConfig};
use crate::ssdlite::{ExtraBlock, SsdLiteHead};
use crate::transform::{ImageView, Transform};
use crate::Error;

/// Raw head outputs of a batch and the feature-map sizes they came from.
#[derive(Debug, Clone)]
pub struct HeadOutputs {
    /// `(N, anchors, num_classes)`.
    pub cls_logits: Tensor,
    /// `(N, anchors, 4)`.
    pub bbox_regression: Tensor,
    /// (height, width) of each level's feature map.
    pub grid_sizes: Vec<(usize, usize)>,
}

/// Wall-clock time of the stages of one [`SsdDetector::detect_timed`] call.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTimes {
    /// Normalisation and the resize to the network input.
    pub preprocess: std::time::Duration,
    /// The network and the default boxes.
    pub inference: std::time::Duration,
    /// Softmax, decoding, per-class NMS, rescaling to the image.
    pub postprocess: std::time::Duration,
}

#[derive(Debug, Clone)]
pub struct SsdDetector {
    pub config: SsdLiteConfig,
    pub body: MobileOne,
    pub extra: Vec<ExtraBlock>,
    pub head: SsdLiteHead,
    pub anchor_generator: DefaultBoxGenerator,
    pub loss: SsdLoss,
    pub postprocess: PostProcessConfig,
}

impl SsdDetector {
    /// Builds the detector from `vb` at the checkpoint root (`backbone.body.*`, `backbone.extra.*`,
    /// `head.*`); `form` says whether the trunk is reparameterised and whether the extra blocks' and
    /// heads' BatchNorms are folded.
    pub fn new(config: &SsdLiteConfig, form: Form, vb: VarBuilder) -> Result<Self> {
        let trunk = config.trunk.clone().with_num_classes(None);
        let body_vb = vb.pp("backbone").pp("body");
        let fused = form.heads_fused;
        let body = if form.trunk_fused {
            MobileOne::new_fused(&trunk, 32, body_vb)?
        } else {
            MobileOne::new(&trunk, 32, body_vb)?
        };
        let mut in_channels = trunk.feature_channels()[4];
        let mut extra = Vec::with_capacity(4);
        for (i, &out) in config.extra_channels.iter().enumerate() {
            extra.push(ExtraBlock::new(
                vb.pp("backbone").pp("extra").pp(i),
                in_channels,
                out,
                fused,
            )?);
            in_channels = out;
        }
        let anchor_generator = DefaultBoxGenerator::ssdlite(6);
        let head = SsdLiteHead::new(
            vb.pp("head"),
            &config.level_channels(),
            &anchor_generator.num_anchors_per_location(),
            config.num_classes,
            fused,
        )?;
        Ok(Self {
            config: config.clone(),
            body,
            extra,
            head,
            anchor_generator,
            loss: SsdLoss::default(),
            postprocess: PostProcessConfig::default(),
        })
    }

    /// Builds the detector a checkpoint describes (see [`resolve`]), strictly: every tensor must be used
    /// with the right shape.
    pub fn from_checkpoint(
        checkpoint: &Checkpoint,
        overrides: &Overrides,
        device: &Device,
    ) -> std::result::Result<(Self, Labels), Error> {
        let (config, labels) = resolve(&checkpoint.tensors, &checkpoint.metadata, overrides)?;
        let form = Self::stored_form(checkpoint);
        let hint = checkpoint::variant_hint(&checkpoint.tensors, "backbone.body.", &config.trunk);
        let detector = checkpoint::build_strict(&checkpoint.tensors, device, &hint, |vb| {
            Self::new(&config, form, vb)
        })?;
        Ok((detector, labels))
    }

    /// The form each module is stored in: the trunk is fused when it has `reparam_conv` tensors, the
    /// heads when the first extra block's conv carries a bias (a folded BatchNorm) instead of a BN.
    pub fn stored_form(checkpoint: &Checkpoint) -> Form {
        Form {
            trunk_fused: checkpoint.is_fused("backbone.body."),
            heads_fused: checkpoint.tensors.contains_key("backbone.extra.0.0.0.bias"),
        }
    }

    /// Reads a checkpoint file and builds the detector.
    pub fn load(
        path: &Path,
        overrides: &Overrides,
        device: &Device,
    ) -> std::result::Result<(Self, Labels), Error> {
        Self::from_checkpoint(&checkpoint::load(path)?, overrides, device)
    }

    pub fn transform(&self) -> Transform {
        let s = self.config.image_size;
        Transform {
            mean: self.config.mean,
            std: self.config.std,
            size: (s, s),
        }
    }

    /// The six feature maps: trunk strides 16 and 32, then the extra blocks.
    pub fn features(&self, images: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let trunk = self.body.forward_features_at(images, train, &[3, 4])?;
        let mut x = trunk[1].clone();
        let mut features = trunk;
        for block in &self.extra {
            x = block.forward_t(&x, train)?;
            features.push(x.clone());
        }
        Ok(features)
    }

    /// Head outputs for a preprocessed `(N, 3, H, W)` batch.
    pub fn head_outputs(&self, images: &Tensor, train: bool) -> Result<HeadOutputs> {
        let features = self.features(images, train)?;
        let grid_sizes = features
            .iter()
            .map(|f| Ok((f.dim(2)?, f.dim(3)?)))
            .collect::<Result<Vec<_>>>()?;
        let (cls_logits, bbox_regression) = self.head.forward_t(&features, train)?;
        Ok(HeadOutputs {
            cls_logits,
            bbox_regression,
            grid_sizes,
        })
    }

    /// Default boxes for a network input of `input_size` (height, width) and the grids of `outputs`.
    pub fn anchors(&self, outputs: &HeadOutputs, input_size: (usize, usize)) -> Vec<Box4> {
        self.anchor_generator
            .generate(&outputs.grid_sizes, input_size)
    }

    /// Preprocesses images into one `(N, 3, S, S)` batch.
    pub fn preprocess(&self, images: &[ImageView<'_>], device: &Device) -> Result<Tensor> {
        let transform = self.transform();
        let s = self.config.image_size;
        let mut data = Vec::with_capacity(images.len() * 3 * s * s);
        for image in images {
            data.extend(transform.apply(image.pixels, image.height, image.width)?);
        }
        Tensor::from_vec(data, (images.len(), 3, s, s), device)
    }

    /// Detections per image, boxes in each image's own pixels.
    pub fn detect(&self, images: &[ImageView<'_>], device: &Device) -> Result<Vec<Vec<Detection>>> {
        Ok(self.detect_timed(images, device)?.0)
    }

    /// [`SsdDetector::detect`] and the time its three stages took (wall clock, for the whole batch).
    pub fn detect_timed(
        &self,
        images: &[ImageView<'_>],
        device: &Device,
    ) -> Result<(Vec<Vec<Detection>>, StageTimes)> {
        let mut times = StageTimes::default();
        if images.is_empty() {
            return Ok((Vec::new(), times));
        }
        let start = std::time::Instant::now();
        let batch = self.preprocess(images, device)?;
        times.preprocess = start.elapsed();
        let start = std::time::Instant::now();
        let outputs = self.head_outputs(&batch, false)?;
        let s = self.config.image_size;
        let anchors = self.anchors(&outputs, (s, s));
        let cls = outputs.cls_logits.flatten_all()?.to_vec1::<f32>()?;
        let reg = outputs.bbox_regression.flatten_all()?.to_vec1::<f32>()?;
        times.inference = start.elapsed();
        let start = std::time::Instant::now();
        let (num_anchors, num_classes) = (anchors.len(), self.config.num_classes);
        let detections = images
            .iter()
            .enumerate()
            .map(|(i, image)| {
                postprocess(
                    &cls[i * num_anchors * num_classes..(i + 1) * num_anchors * num_classes],
                    &reg[i * num_anchors * 4..(i + 1) * num_anchors * 4],
                    &anchors,
                    num_classes,
                    (s, s),
                    (image.height, image.width),
                    &self.loss.coder,
                    &self.postprocess,
                )
            })
            .collect();
        times.postprocess = start.elapsed();
        Ok((detections, times))
    }

    /// Training losses of a preprocessed batch; targets in network-input pixels
    /// (see [`crate::loss::resize_boxes`]). BatchNorm runs in training mode.
    pub fn forward_loss(&self, images: &Tensor, targets: &[Target]) -> Result<Losses> {
        let outputs = self.head_outputs(images, true)?;
        let (_, _, h, w) = images.dims4()?;
        let anchors = self.anchors(&outputs, (h, w));
        let (losses, _) = self.loss.compute(
            &outputs.cls_logits,
            &outputs.bbox_regression,
            &anchors,
            targets,
        )?;
        Ok(losses)
    }

    /// Reparameterises the trunk and folds the heads' and extra blocks' BatchNorms (eval-mode exact).
    pub fn fuse(&mut self) -> Result<()> {
        self.body.reparameterize()?;
        self.extra.iter_mut().try_for_each(ExtraBlock::fuse)?;
        self.head.fuse()
    }

    /// Whether trunk and heads are both in their deployed form.
    pub fn is_fused(&self) -> bool {
        self.body.is_fused() && self.extra.iter().all(|b| b.layers[0].is_fused())
    }

    /// Every tensor under torchvision's key names, ready to be saved as a checkpoint.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = self
            .body
            .named_tensors()
            .into_iter()
            .map(|(k, t)| (format!("backbone.body.{k}"), t))
            .collect();
        for (i, block) in self.extra.iter().enumerate() {
            block.push_named_tensors(&format!("backbone.extra.{i}"), &mut out);
        }
        self.head.push_named_tensors("head", &mut out);
        out
    }
}
