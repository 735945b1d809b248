//! DeepLabV3 training: VOC / ADE20K-layout data, cross-entropy with ignore index 255 (+ optional
//! auxiliary loss), mmseg-exact mIoU on the validation split.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use deeplabv3::{segmentation_loss, DeepLabV3, SegmenterSpec};
use mobileone_datasets::segmentation::FolderConfig;
use mobileone_datasets::transforms::{PhotometricDistort, RandomHorizontalFlip, Resize};
use mobileone_datasets::{
    Batch, Compose, Loader, LoaderConfig, Normalize, SegmentationDataset, Transform,
};
use mobileone_eval::seg::SegMetric;

use crate::error::{Result, TrainError};
use crate::task::{detached, warn_if_upscaled, Augment, DatasetKind, Task, Validation};
use crate::RunSettings;

/// torchvision's segmentation reference weighs the auxiliary loss by 0.5.
const AUX_WEIGHT: f64 = 0.5;

pub struct SegmentationTask {
    pub model: DeepLabV3,
    pub spec: SegmenterSpec,
    loader: Arc<Loader>,
    val: SegmentationDataset,
    image_size: usize,
    device: Device,
}

fn open_split(settings: &RunSettings, train: bool) -> Result<SegmentationDataset> {
    let root = &settings.data_root;
    Ok(match settings.dataset {
        DatasetKind::Folder => {
            let config_path = settings
                .dataset_config
                .clone()
                .unwrap_or_else(|| root.join(mobileone_datasets::segmentation::FOLDER_CONFIG_FILE));
            let config = FolderConfig::read(&config_path)?;
            let split = if train {
                "train"
            } else {
                settings.val_split.as_str()
            };
            SegmentationDataset::folder(root, split, &config)?
        }
        DatasetKind::Voc | DatasetKind::Synth => {
            SegmentationDataset::voc(root, Some(if train { "train" } else { "val" }), false)?
        }
        DatasetKind::Ade20k => {
            SegmentationDataset::ade20k(root, Some(if train { "training" } else { "validation" }))?
        }
        DatasetKind::Coco | DatasetKind::Yolo => {
            return Err(TrainError::Config(format!(
            "segmentation reads VOC or ADE20K layouts (--dataset voc, ade20k or synth), not {:?}",
            settings.dataset
        )))
        }
    })
}

impl SegmentationTask {
    pub fn new(settings: &RunSettings, vb: VarBuilder) -> Result<Self> {
        let train = open_split(settings, true)?;
        let val = open_split(settings, false)?;
        if train.class_names != val.class_names {
            return Err(TrainError::Config(
                "the training and validation splits name different classes".into(),
            ));
        }
        if train.is_empty() || val.is_empty() {
            return Err(TrainError::Config(format!(
                "{} has {} training and {} validation images; both are needed",
                settings.data_root.display(),
                train.len(),
                val.len()
            )));
        }
        if settings.augment != Augment::Full {
            // The first 16 images stand for the set: reading every header would cost a pass.
            let sides = train
                .items
                .iter()
                .take(16)
                .filter_map(|item| mobileone_datasets::io::image_size(&item.image).ok())
                .map(|(w, h)| w.min(h))
                .collect();
            warn_if_upscaled(sides, settings.image_size, "shorter");
        }
        let mut spec = SegmenterSpec::new(
            settings.variant,
            train.num_classes(),
            settings.output_stride,
        );
        spec.class_names = train.class_names.clone();
        if let Some(palette) = &train.palette {
            spec.palette = palette.clone();
        }
        spec.config.head_channels = settings.head_channels;
        spec.config.atrous_rates = settings.atrous_rates.clone();
        spec.config.validate().map_err(TrainError::Config)?;
        if settings.aux_loss {
            spec.config.aux_stride = Some(16);
        }
        let form = mobileone::Form {
            trunk_fused: settings.fused_trunk,
            heads_fused: false,
        };
        let model = DeepLabV3::with_form(&spec.config, form, vb)?;
        let size = settings.image_size;
        let resize = Resize {
            width: size,
            height: size,
        };
        let transform: Arc<dyn Transform> = match settings.augment {
            Augment::Full => Arc::new(Compose::seg_train((4 * size, size), size)),
            Augment::Flip => Arc::new(Compose(vec![
                Box::new(PhotometricDistort::default()),
                Box::new(RandomHorizontalFlip { p: 0.5 }),
                Box::new(resize),
            ])),
            Augment::None => Arc::new(resize),
        };
        let loader = Loader::new(
            Arc::new(train),
            transform,
            LoaderConfig {
                batch_size: settings.batch_size,
                shuffle: true,
                drop_last: true,
                seed: settings.seed,
                num_workers: settings.workers,
                prefetch: 2,
                normalize: Some(Normalize {
                    mean: spec.mean,
                    std: spec.std,
                }),
            },
        )?;
        Ok(Self {
            model,
            spec,
            loader: Arc::new(loader),
            val,
            image_size: size,
            device: Device::Cpu,
        })
    }

    fn fused_model(&self) -> Result<DeepLabV3> {
        let tensors: HashMap<String, Tensor> = self.fused_tensors()?.into_iter().collect();
        deeplabv3::checkpoint::build(&tensors, &self.spec.config, &self.device)
            .map_err(|e| TrainError::Eval(e.to_string()))
    }

    /// Normalised (1, 3, H, W) tensor of an RGB image.
    fn preprocess(&self, image: &image::RgbImage) -> Result<Tensor> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let mut data = vec![0f32; 3 * h * w];
        for (i, px) in image.pixels().enumerate() {
            for c in 0..3 {
                data[c * h * w + i] = (px[c] as f32 / 255.0 - self.spec.mean[c]) / self.spec.std[c];
            }
        }
        Ok(Tensor::from_vec(data, (1, 3, h, w), &self.device)?)
    }
}

impl Task for SegmentationTask {
    fn loss(&self, batch: &Batch, step_seed: u64) -> Result<Tensor> {
        let images = Tensor::from_slice(&batch.images, batch.shape.to_vec(), &self.device)?;
        let [n, _, h, w] = batch.shape;
        let masks = batch.masks.as_ref().ok_or_else(|| {
            TrainError::Config("the segmentation loader produced a batch without masks".into())
        })?;
        let targets = Tensor::from_slice(masks, (n, h, w), &self.device)?;
        deeplabv3::seed_dropout(Some(step_seed));
        let out = self.model.forward_t(&images, true);
        deeplabv3::seed_dropout(None);
        let out = out?;
        Ok(segmentation_loss(
            &out.logits,
            out.aux_logits.as_ref(),
            &targets,
            AUX_WEIGHT,
        )?)
    }

    fn metric_names(&self) -> Vec<String> {
        vec!["mIoU".into(), "aAcc".into()]
    }

    fn validate(&self, progress: &dyn Fn(usize, usize)) -> Result<Validation> {
        let model = self.fused_model()?;
        let num_classes = self.spec.config.num_classes;
        let mut metric = SegMetric::new(num_classes, deeplabv3::IGNORE_INDEX)
            .map_err(|e| TrainError::Eval(e.to_string()))?;
        for index in 0..self.val.len() {
            let (image, labels) = self.val.load(index)?;
            let x = self.preprocess(&image)?;
            let logits = deeplabv3::predict_logits(&model, &x, Some(self.image_size))?;
            let pred = deeplabv3::loss::predictions(&logits)?
                .flatten_all()?
                .to_vec1::<u32>()?;
            metric
                .update(&pred, &labels.data)
                .map_err(|e| TrainError::Eval(e.to_string()))?;
            progress(index + 1, self.val.len());
        }
        let m = metric.compute();
        Ok(Validation {
            values: vec![
                ("mIoU".into(), m.miou.unwrap_or(0.0)),
                ("aAcc".into(), m.aacc.unwrap_or(0.0)),
            ],
        })
    }

    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.model.named_tensors()
    }

    fn metadata(&self) -> HashMap<String, String> {
        self.spec.to_metadata()
    }

    fn fused_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut fused = self.model.clone();
        fused.fuse()?;
        Ok(detached(fused.named_tensors()))
    }

    fn train_loader(&self) -> &Arc<Loader> {
        &self.loader
    }
}
