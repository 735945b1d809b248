//! A batch loader: decodes and augments samples on worker threads and yields batches as plain
//! `f32` NCHW buffers plus targets, ready to become tensors in any framework.

use crate::coco::{training_box, CocoDataset};
use crate::error::{DatasetError, Result};
use crate::io::read_rgb;
use crate::segmentation::{SegmentationDataset, IGNORE_INDEX};
use crate::transforms::{sample_rng, Sample, Transform};
use rand::seq::SliceRandom;
use rayon::prelude::*;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

/// Something that produces un-augmented samples by index.
pub trait SampleSource: Send + Sync {
    fn len(&self) -> usize;
    fn load(&self, index: usize) -> Result<Sample>;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How COCO categories become training labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelMode {
    /// 1..=K in ascending category id order (0 = background).
    Contiguous,
    /// The category id itself (torchvision's COCO convention, `num_classes = 91`).
    CategoryId,
}

/// COCO detection samples: boxes (xyxy pixels) and labels of the non-crowd annotations with
/// positive size. Crowd regions are left out of training targets, as in Detectron2.
pub struct CocoDetection {
    pub dataset: CocoDataset,
    pub image_dir: PathBuf,
    pub label_mode: LabelMode,
}

impl CocoDetection {
    pub fn new(dataset: CocoDataset, image_dir: impl Into<PathBuf>, label_mode: LabelMode) -> Self {
        Self {
            dataset,
            image_dir: image_dir.into(),
            label_mode,
        }
    }
}

impl SampleSource for CocoDetection {
    fn len(&self) -> usize {
        self.dataset.images.len()
    }

    fn load(&self, index: usize) -> Result<Sample> {
        let info = &self.dataset.images[index];
        let path = self.image_dir.join(&info.file_name);
        let image = read_rgb(&path)?;
        if image.dimensions() != (info.width, info.height) {
            return Err(DatasetError::invalid(
                &path,
                format!(
                    "image is {}x{} but the annotations say {}x{}",
                    image.width(),
                    image.height(),
                    info.width,
                    info.height
                ),
            ));
        }
        let mut sample = Sample::new(&image);
        for annotation in self.dataset.annotations_for(info.id) {
            if annotation.iscrowd {
                continue;
            }
            let Some(bbox) = training_box(annotation.bbox, info.width, info.height) else {
                continue;
            };
            let label = match self.label_mode {
                LabelMode::Contiguous => self
                    .dataset
                    .label_of(annotation.category_id)
                    .expect("checked when the dataset was indexed"),
                LabelMode::CategoryId => annotation.category_id as u32,
            };
            sample.boxes.push(bbox);
            sample.labels.push(label);
        }
        Ok(sample)
    }
}

impl SampleSource for SegmentationDataset {
    fn len(&self) -> usize {
        self.items.len()
    }

    fn load(&self, index: usize) -> Result<Sample> {
        let (image, labels) = SegmentationDataset::load(self, index)?;
        let mut sample = Sample::new(&image);
        sample.mask = Some(labels);
        Ok(sample)
    }
}

/// Per-channel normalisation applied to RGB in [0, 1].
#[derive(Clone, Copy, Debug)]
pub struct Normalize {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Normalize {
    pub const IMAGENET: Self = Self {
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };
}

#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub shuffle: bool,
    pub drop_last: bool,
    pub seed: u64,
    /// Decoding/augmentation threads.
    pub num_workers: usize,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
    /// `None` leaves pixels in [0, 1].
    pub normalize: Option<Normalize>,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            batch_size: 8,
            shuffle: true,
            drop_last: true,
            seed: 0,
            num_workers: 2,
            prefetch: 2,
            normalize: Some(Normalize::IMAGENET),
        }
    }
}

/// Targets of one image.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    /// `[x1, y1, x2, y2]` in pixels of the batch image.
    pub boxes: Vec<[f32; 4]>,
    pub labels: Vec<u32>,
}

/// A batch. Images of different sizes are padded at the bottom/right to the largest (0 in
/// normalised space; masks 255), which leaves boxes valid.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `N x 3 x H x W`, row-major.
    pub images: Vec<f32>,
    pub shape: [usize; 4],
    pub targets: Vec<Target>,
    /// `N x H x W` labels (255 = ignored) when the source has masks.
    pub masks: Option<Vec<u8>>,
    /// Source indices of the samples.
    pub indices: Vec<usize>,
}

pub struct Loader {
    source: Arc<dyn SampleSource>,
    transform: Arc<dyn Transform>,
    config: LoaderConfig,
    pool: Arc<rayon::ThreadPool>,
}

impl Loader {
    pub fn new(
        source: Arc<dyn SampleSource>,
        transform: Arc<dyn Transform>,
        config: LoaderConfig,
    ) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.num_workers.max(1))
            .thread_name(|i| format!("loader-{i}"))
            .build()
            .map_err(|e| DatasetError::invalid("<loader>", format!("cannot start workers: {e}")))?;
        Ok(Self {
            source,
            transform,
            config,
            pool: Arc::new(pool),
        })
    }

    /// Samples in the source (an epoch reads `num_batches() × batch_size` of them).
    pub fn num_samples(&self) -> usize {
        self.source.len()
    }

    pub fn num_batches(&self) -> usize {
        let (n, b) = (self.source.len(), self.config.batch_size.max(1));
        if self.config.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The sample order of an epoch: a seeded permutation when shuffling.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.source.len()).collect();
        if self.config.shuffle {
            let mut rng = sample_rng(self.config.seed, epoch, u64::MAX);
            order.shuffle(&mut rng);
        }
        order
    }

    /// Loads and augments one sample exactly as the batches of `epoch` do.
    pub fn sample(&self, epoch: u64, index: usize) -> Result<Sample> {
        let mut rng = sample_rng(self.config.seed, epoch, index as u64);
        let sample = self.source.load(index)?;
        Ok(self.transform.apply(sample, &mut rng))
    }

    /// Batches of one epoch, prepared in the background. Deterministic for a given seed and
    /// epoch, whatever the number of workers. Dropping the iterator stops the workers.
    pub fn epoch(self: &Arc<Self>, epoch: u64) -> BatchIter {
        let order = self.epoch_order(epoch);
        let batch_size = self.config.batch_size.max(1);
        let mut chunks: Vec<Vec<usize>> = order.chunks(batch_size).map(<[usize]>::to_vec).collect();
        if self.config.drop_last && chunks.last().is_some_and(|c| c.len() < batch_size) {
            chunks.pop();
        }
        let (sender, receiver) = sync_channel(self.config.prefetch.max(1));
        let loader = Arc::clone(self);
        std::thread::spawn(move || {
            for indices in chunks {
                // A panicking transform must end the epoch with an error, not a short epoch.
                let samples = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    loader.pool.install(|| {
                        indices
                            .par_iter()
                            .map(|&index| loader.sample(epoch, index))
                            .collect::<Result<Vec<Sample>>>()
                    })
                }))
                .unwrap_or_else(|_| {
                    Err(DatasetError::invalid(
                        "<loader>",
                        format!("a worker panicked while preparing samples {indices:?}"),
                    ))
                });
                let batch = samples.map(|s| collate(s, indices, loader.config.normalize));
                let failed = batch.is_err();
                if sender.send(batch).is_err() || failed {
                    return;
                }
            }
        });
        BatchIter { receiver }
    }
}

/// Iterator over the batches of one epoch; stops after the first error.
pub struct BatchIter {
    receiver: Receiver<Result<Batch>>,
}

impl Iterator for BatchIter {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Self::Item> {
        self.receiver.recv().ok()
    }
}

/// Stacks samples into an NCHW batch, padding to the largest size.
pub fn collate(samples: Vec<Sample>, indices: Vec<usize>, normalize: Option<Normalize>) -> Batch {
    let n = samples.len();
    let h = samples.iter().map(Sample::height).max().unwrap_or(0);
    let w = samples.iter().map(Sample::width).max().unwrap_or(0);
    let has_masks = samples.iter().any(|s| s.mask.is_some());
    let mut images = vec![0f32; n * 3 * h * w];
    let mut masks = has_masks.then(|| vec![IGNORE_INDEX; n * h * w]);
    let (mean, std) = match normalize {
        Some(norm) => (norm.mean, norm.std),
        None => ([0.0; 3], [1.0; 3]),
    };
    let mut targets = Vec::with_capacity(n);
    for (i, sample) in samples.into_iter().enumerate() {
        let (sw, sh) = (sample.width(), sample.height());
        for c in 0..3 {
            let plane = &mut images[(i * 3 + c) * h * w..(i * 3 + c + 1) * h * w];
            for y in 0..sh {
                for x in 0..sw {
                    let v = sample.image.data[(y * sw + x) * 3 + c] / 255.0;
                    plane[y * w + x] = (v - mean[c]) / std[c];
                }
            }
        }
        if let (Some(all), Some(mask)) = (masks.as_mut(), sample.mask.as_ref()) {
            for y in 0..sh {
                let row = &mask.data[y * sw..(y + 1) * sw];
                all[(i * h + y) * w..(i * h + y) * w + sw].copy_from_slice(row);
            }
        }
        targets.push(Target {
            boxes: sample.boxes,
            labels: sample.labels,
        });
    }
    Batch {
        images,
        shape: [n, 3, h, w],
        targets,
        masks,
        indices,
    }
}
