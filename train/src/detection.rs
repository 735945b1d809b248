//! SSDLite training: COCO-layout data, torchvision's multibox loss, COCO box mAP on the validation split.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use mobileone::checkpoint::build_strict;
use mobileone_datasets::transforms::{PhotometricDistort, RandomHorizontalFlip, Resize};
use mobileone_datasets::yolo::YoloDataset;
use mobileone_datasets::{
    Batch, CocoDataset, CocoDetection, Compose, LabelMode, Loader, LoaderConfig, Normalize,
    Transform,
};
use mobileone_eval::coco::{evaluate_bbox, Detection, GroundTruth};
use ssdlite::config::to_metadata;
use ssdlite::{ImageView, Labels, SsdDetector, SsdLiteConfig, Target};

use crate::error::{Result, TrainError};
use crate::task::{coco_split, detached, warn_if_upscaled, Augment, DatasetKind, Task, Validation};
use crate::RunSettings;

pub struct DetectionTask {
    pub detector: SsdDetector,
    pub labels: Labels,
    loader: Arc<Loader>,
    val_images: Vec<(u64, PathBuf)>,
    ground_truth: GroundTruth,
    device: Device,
    batch_size: usize,
}

impl DetectionTask {
    /// Reads the data and builds the train-time detector's variables through `vb`.
    pub fn new(settings: &RunSettings, vb: VarBuilder) -> Result<Self> {
        let [(train, train_dir), (val, val_dir)] = read_splits(settings)?;
        let (train_json, val_json) = (&train.path, &val.path);
        if train.categories != val.categories {
            return Err(TrainError::Config(format!(
                "{} and {} list different categories",
                train_json.display(),
                val_json.display()
            )));
        }
        let names = train.class_names();
        let category_ids = std::iter::once(0)
            .chain(train.categories.iter().map(|c| c.id))
            .collect();
        let labels = Labels {
            names,
            category_ids,
        };
        let mut config = SsdLiteConfig::new(settings.variant, labels.names.len());
        config.image_size = settings.image_size;
        let form = mobileone::Form {
            trunk_fused: settings.fused_trunk,
            heads_fused: false,
        };
        let detector = SsdDetector::new(&config, form, vb)?;
        let val_images = val
            .images
            .iter()
            .map(|i| (i.id, val_dir.join(&i.file_name)))
            .collect();
        let ground_truth = GroundTruth::from_json(
            &serde_json::to_vec(&val.to_file()).expect("COCO serialises"),
            &val.path.display().to_string(),
        )
        .map_err(|e| TrainError::Eval(e.to_string()))?;
        let normalize = Normalize {
            mean: config.mean,
            std: config.std,
        };
        let size = settings.image_size;
        let resize = Resize {
            width: size,
            height: size,
        };
        let fill = normalize.mean.map(|m| m * 255.0);
        let transform: Arc<dyn Transform> = match settings.augment {
            Augment::Full => Arc::new(Compose::ssd_train(size, fill)),
            Augment::Flip => Arc::new(Compose(vec![
                Box::new(PhotometricDistort::default()),
                Box::new(RandomHorizontalFlip { p: 0.5 }),
                Box::new(resize),
            ])),
            Augment::None => Arc::new(resize),
        };
        let sides = train.images.iter().map(|i| i.width.max(i.height)).collect();
        warn_if_upscaled(sides, settings.image_size, "longer");
        let dropped = train.degenerate_boxes();
        if !dropped.is_empty() {
            const SHOWN: usize = 10;
            let ids: Vec<String> = dropped.iter().take(SHOWN).map(u64::to_string).collect();
            let more = if dropped.len() > SHOWN { ", …" } else { "" };
            eprintln!(
                "{}: {} box(es) without area in float32 (zero or negative width or height once \
                 clipped to the image) left out of training, as torchvision's reference drops them: \
                 annotation id(s) {}{more}",
                train.path.display(),
                dropped.len(),
                ids.join(", ")
            );
        }
        let source = Arc::new(CocoDetection::new(train, train_dir, LabelMode::Contiguous));
        let loader = Loader::new(
            source,
            transform,
            LoaderConfig {
                batch_size: settings.batch_size,
                shuffle: true,
                drop_last: true,
                seed: settings.seed,
                num_workers: settings.workers,
                prefetch: 2,
                normalize: Some(normalize),
            },
        )?;
        Ok(Self {
            detector,
            labels,
            loader: Arc::new(loader),
            val_images,
            ground_truth,
            device: Device::Cpu,
            batch_size: settings.batch_size,
        })
    }

    fn fused_detector(&self) -> Result<SsdDetector> {
        let tensors: HashMap<String, Tensor> = self.fused_tensors()?.into_iter().collect();
        let config = &self.detector.config;
        Ok(build_strict(&tensors, &self.device, "", |vb| {
            SsdDetector::new(config, mobileone::Form::FUSED, vb)
        })?)
    }
}

/// The train and val splits with their image folders: COCO instances JSON, or a YOLO `data.yaml`
/// read into COCO form.
fn read_splits(settings: &RunSettings) -> Result<[(CocoDataset, PathBuf); 2]> {
    let splits = ["train", settings.val_split.as_str()];
    match settings.dataset {
        DatasetKind::Coco | DatasetKind::Synth => {
            let read = |split: &str| -> Result<(CocoDataset, PathBuf)> {
                let (json, dir) = coco_split(&settings.data_root, split)?;
                Ok((CocoDataset::open(&json)?, dir))
            };
            Ok([read(splits[0])?, read(splits[1])?])
        }
        DatasetKind::Yolo => {
            let yolo = YoloDataset::open(&settings.data_root)?;
            let read = |split: &str| -> Result<(CocoDataset, PathBuf)> {
                let read = yolo.split(split)?;
                if read.dropped_empty > 0 {
                    eprintln!(
                        "{} {split}: {} box(es) without area left out",
                        yolo.yaml.display(),
                        read.dropped_empty
                    );
                }
                Ok((read.dataset, read.image_root))
            };
            Ok([read(splits[0])?, read(splits[1])?])
        }
        other => Err(TrainError::Config(format!(
            "detection needs box annotations (--dataset coco, yolo or synth); {other:?} has none"
        ))),
    }
}

impl Task for DetectionTask {
    fn loss(&self, batch: &Batch, _step_seed: u64) -> Result<Tensor> {
        let images = Tensor::from_slice(&batch.images, batch.shape.to_vec(), &self.device)?;
        let targets: Vec<Target> = batch
            .targets
            .iter()
            .map(|t| Target {
                boxes: t.boxes.clone(),
                labels: t.labels.iter().map(|&l| l as usize).collect(),
            })
            .collect();
        Ok(self.detector.forward_loss(&images, &targets)?.total()?)
    }

    fn metric_names(&self) -> Vec<String> {
        vec!["mAP".into(), "mAP50".into()]
    }

    fn validate(&self, progress: &dyn Fn(usize, usize)) -> Result<Validation> {
        let model = self.fused_detector()?;
        let mut detections = Vec::new();
        let total = self.val_images.len();
        for (chunk_index, chunk) in self.val_images.chunks(self.batch_size.max(1)).enumerate() {
            let images = chunk
                .iter()
                .map(|(_, path)| mobileone_datasets::io::read_rgb(path))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let views: Vec<ImageView> = images
                .iter()
                .map(|im| ImageView {
                    pixels: im.as_raw(),
                    height: im.height() as usize,
                    width: im.width() as usize,
                })
                .collect();
            for ((image_id, _), found) in chunk.iter().zip(model.detect(&views, &self.device)?) {
                detections.extend(found.into_iter().map(|d| {
                    let [x1, y1, x2, y2] = d.bbox.map(f64::from);
                    Detection {
                        image_id: *image_id,
                        category_id: self.labels.category_id(d.label),
                        bbox: [x1, y1, x2 - x1, y2 - y1],
                        score: d.score as f64,
                    }
                }));
            }
            progress(
                (chunk_index * self.batch_size + chunk.len()).min(total),
                total,
            );
        }
        let stats = evaluate_bbox(&self.ground_truth, &detections)
            .map_err(|e| TrainError::Eval(e.to_string()))?;
        // pycocotools reports -1 where there is nothing to average; count that as 0 for `best`.
        let value = |i: usize| stats.stats[i].max(0.0);
        Ok(Validation {
            values: vec![("mAP".into(), value(0)), ("mAP50".into(), value(1))],
        })
    }

    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.detector.named_tensors()
    }

    fn metadata(&self) -> HashMap<String, String> {
        to_metadata(&self.detector.config, &self.labels)
    }

    fn fused_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut fused = self.detector.clone();
        fused.fuse()?;
        Ok(detached(fused.named_tensors()))
    }

    fn train_loader(&self) -> &Arc<Loader> {
        &self.loader
    }
}
