//! Semantic segmentation datasets: Pascal VOC 2012 and ADE20K SceneParsing (and the synthetic
//! set's copies of those layouts).

use crate::error::{DatasetError, Result};
use crate::io::{image_size, read_label_png, read_rgb, LabelMap};
use image::RgbImage;
use std::path::{Path, PathBuf};

/// Label value of pixels that are ignored by losses and metrics.
pub const IGNORE_INDEX: u8 = 255;

/// The 21 Pascal VOC classes, background first.
pub const VOC_CLASSES: [&str; 21] = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
];

/// File with one class name per line, written by `dataset synth`; when present it overrides the
/// default class names of a layout.
pub const CLASS_NAMES_FILE: &str = "class_names.txt";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SegmentationLayout {
    /// `JPEGImages/*.jpg` + `SegmentationClass/*.png` palette masks (0..20, 255 void).
    Voc,
    /// As `Voc` but masks from `SegmentationClassAug` (greyscale, same values).
    VocAug,
    /// `images/<split>/*.jpg` + `annotations/<split>/*.png` (0 other, 1..150), read with
    /// `reduce_zero_label`: 0 -> 255, k -> k - 1.
    Ade20k,
    /// A generic folder described by a [`FolderConfig`] (mmsegmentation's custom datasets), e.g. CamVid.
    Folder,
}

/// How a generic segmentation folder is laid out and labelled (mmsegmentation's `BaseSegDataset`
/// settings), read from a small JSON file. `{split}` in the paths is replaced by the split name.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct FolderConfig {
    /// Class names, index = label value.
    pub classes: Vec<String>,
    /// RGB colour of each class for drawn masks (optional).
    #[serde(default)]
    pub palette: Option<Vec<[u8; 3]>>,
    /// Label value that marks pixels to ignore (mapped to 255 on reading).
    #[serde(default = "default_ignore")]
    pub ignore_index: u8,
    /// mmseg's `reduce_zero_label`: 0 is ignored and every other value shifts down by one.
    #[serde(default)]
    pub reduce_zero_label: bool,
    #[serde(default = "default_img_dir")]
    pub img_dir: String,
    #[serde(default = "default_ann_dir")]
    pub ann_dir: String,
    /// File listing the split's image stems, one per line; without it every annotation is used.
    #[serde(default = "default_split_file")]
    pub split_file: String,
    #[serde(default = "default_img_suffix")]
    pub img_suffix: String,
    #[serde(default = "default_seg_map_suffix")]
    pub seg_map_suffix: String,
}

fn default_ignore() -> u8 {
    IGNORE_INDEX
}
fn default_img_dir() -> String {
    "images/{split}".into()
}
fn default_ann_dir() -> String {
    "labels/{split}".into()
}
fn default_split_file() -> String {
    "{split}.txt".into()
}
fn default_img_suffix() -> String {
    ".jpg".into()
}
fn default_seg_map_suffix() -> String {
    ".png".into()
}

/// Name of the folder config a generic segmentation root may hold.
pub const FOLDER_CONFIG_FILE: &str = "dataset.json";

impl FolderConfig {
    /// Reads a config JSON; errors name the file and the field.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| DatasetError::io(path, e))?;
        let config: Self = serde_json::from_str(&text).map_err(|e| {
            DatasetError::invalid(path, format!("not a segmentation folder config: {e}"))
        })?;
        if config.classes.is_empty() || config.classes.len() > 255 {
            return Err(DatasetError::invalid(
                path,
                "`classes` must list 1 to 255 names",
            ));
        }
        if let Some(palette) = &config.palette {
            if palette.len() != config.classes.len() {
                return Err(DatasetError::invalid(
                    path,
                    format!(
                        "`palette` has {} colours for {} classes",
                        palette.len(),
                        config.classes.len()
                    ),
                ));
            }
        }
        Ok(config)
    }
}

/// One image and its annotation PNG.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentationItem {
    pub id: String,
    pub image: PathBuf,
    pub annotation: PathBuf,
}

/// A list of image/annotation pairs with the layout's label convention.
#[derive(Clone, Debug)]
pub struct SegmentationDataset {
    pub root: PathBuf,
    pub layout: SegmentationLayout,
    pub items: Vec<SegmentationItem>,
    /// Names of the training classes 0..num_classes (after `reduce_zero_label` for ADE20K).
    pub class_names: Vec<String>,
    /// Label value read as "ignore" and mapped to 255 (folder layouts, e.g. CamVid's void = 11).
    pub ignore_label: Option<u8>,
    /// Class colours given by the dataset (folder layouts), else `None`.
    pub palette: Option<Vec<[u8; 3]>>,
    /// mmseg's `reduce_zero_label` (ADE20K, or a folder config that asks for it).
    zero_label_ignored: bool,
}

impl SegmentationDataset {
    /// Opens a VOC 2012 root (the folder holding `JPEGImages`, or `VOCdevkit/VOC2012` or `VOC2012`
    /// under it). With `Some(split)` the ids come from `ImageSets/Segmentation/<split>.txt`; with
    /// `None`, every PNG of the mask folder is used (for partial copies without `ImageSets`).
    pub fn voc(root: impl AsRef<Path>, split: Option<&str>, aug: bool) -> Result<Self> {
        let base = find_voc_base(root.as_ref())?;
        let (layout, mask_dir) = if aug {
            (
                SegmentationLayout::VocAug,
                base.join("SegmentationClassAug"),
            )
        } else {
            (SegmentationLayout::Voc, base.join("SegmentationClass"))
        };
        let ids = match split {
            Some(split) => {
                let list = base
                    .join("ImageSets")
                    .join("Segmentation")
                    .join(format!("{split}.txt"));
                let text =
                    std::fs::read_to_string(&list).map_err(|e| DatasetError::io(&list, e))?;
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            None => png_stems(&mask_dir)?,
        };
        let image_dir = base.join("JPEGImages");
        let items = ids
            .into_iter()
            .map(|id| SegmentationItem {
                image: image_dir.join(format!("{id}.jpg")),
                annotation: mask_dir.join(format!("{id}.png")),
                id,
            })
            .collect();
        let class_names = read_class_names(&base)?
            .unwrap_or_else(|| VOC_CLASSES.iter().map(|s| s.to_string()).collect());
        Ok(Self {
            root: base,
            layout,
            items,
            class_names,
            ignore_label: None,
            palette: None,
            zero_label_ignored: false,
        })
    }

    /// Opens an ADE20K SceneParsing root (`ADEChallengeData2016` or its parent). With
    /// `Some(split)` (`training`/`validation`) images come from `images/<split>`; with `None`
    /// from `images/` directly (flat sample folders).
    pub fn ade20k(root: impl AsRef<Path>, split: Option<&str>) -> Result<Self> {
        let root = root.as_ref();
        let base = if root.join("ADEChallengeData2016").is_dir() {
            root.join("ADEChallengeData2016")
        } else {
            root.to_path_buf()
        };
        let (image_dir, mask_dir) = match split {
            Some(split) => (
                base.join("images").join(split),
                base.join("annotations").join(split),
            ),
            None => (base.join("images"), base.join("annotations")),
        };
        let items = png_stems(&mask_dir)?
            .into_iter()
            .map(|id| SegmentationItem {
                image: image_dir.join(format!("{id}.jpg")),
                annotation: mask_dir.join(format!("{id}.png")),
                id,
            })
            .collect();
        let class_names = match read_class_names(&base)? {
            Some(names) => names,
            None => read_ade_object_info(&base)?,
        };
        Ok(Self {
            root: base,
            layout: SegmentationLayout::Ade20k,
            items,
            class_names,
            ignore_label: None,
            palette: None,
            zero_label_ignored: true,
        })
    }

    /// Opens split `split` of a generic folder layout described by `config` (see [`FolderConfig`]).
    /// Every listed image and annotation must exist.
    pub fn folder(root: impl AsRef<Path>, split: &str, config: &FolderConfig) -> Result<Self> {
        let root = root.as_ref();
        let sub = |pattern: &str| root.join(pattern.replace("{split}", split));
        let (image_dir, mask_dir, list) = (
            sub(&config.img_dir),
            sub(&config.ann_dir),
            sub(&config.split_file),
        );
        let stems: Vec<String> = if list.is_file() {
            let text = std::fs::read_to_string(&list).map_err(|e| DatasetError::io(&list, e))?;
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect()
        } else {
            let suffix = config.seg_map_suffix.as_str();
            let mut stems = Vec::new();
            for entry in std::fs::read_dir(&mask_dir).map_err(|e| DatasetError::io(&mask_dir, e))? {
                let name = entry
                    .map_err(|e| DatasetError::io(&mask_dir, e))?
                    .file_name();
                if let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(suffix)) {
                    stems.push(stem.to_string());
                }
            }
            stems.sort();
            stems
        };
        let mut items = Vec::with_capacity(stems.len());
        for id in stems {
            let image = image_dir.join(format!("{id}{}", config.img_suffix));
            let annotation = mask_dir.join(format!("{id}{}", config.seg_map_suffix));
            for path in [&image, &annotation] {
                if !path.is_file() {
                    return Err(DatasetError::invalid(
                        path,
                        format!("listed in split `{split}` but missing"),
                    ));
                }
            }
            items.push(SegmentationItem {
                id,
                image,
                annotation,
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
            layout: SegmentationLayout::Folder,
            items,
            class_names: config.classes.clone(),
            ignore_label: (config.ignore_index != IGNORE_INDEX).then_some(config.ignore_index),
            palette: config.palette.clone(),
            zero_label_ignored: config.reduce_zero_label,
        })
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// Whether annotation value 0 means "ignored" and the rest shift down by one.
    pub fn reduce_zero_label(&self) -> bool {
        self.zero_label_ignored
    }

    /// Reads the labels of item `index` as training labels (0..num_classes, 255 ignored),
    /// checking every value is in range.
    pub fn load_labels(&self, index: usize) -> Result<LabelMap> {
        let item = &self.items[index];
        let mut labels = read_label_png(&item.annotation)?;
        if self.reduce_zero_label() {
            reduce_zero_label(&mut labels);
        } else if let Some(ignore) = self.ignore_label {
            for v in labels.data.iter_mut().filter(|v| **v == ignore) {
                *v = IGNORE_INDEX;
            }
        }
        let num_classes = self.num_classes();
        if let Some(bad) = labels
            .data
            .iter()
            .find(|&&v| v != IGNORE_INDEX && v as usize >= num_classes)
        {
            return Err(DatasetError::invalid(
                &item.annotation,
                format!(
                    "label {bad} is outside the {num_classes} classes (0..{}) and is not {IGNORE_INDEX}",
                    num_classes - 1
                ),
            ));
        }
        Ok(labels)
    }

    /// Decodes the image and labels of item `index`; their sizes must agree.
    pub fn load(&self, index: usize) -> Result<(RgbImage, LabelMap)> {
        let item = &self.items[index];
        let labels = self.load_labels(index)?;
        let image = read_rgb(&item.image)?;
        check_same_size(item, image.dimensions(), &labels)?;
        Ok((image, labels))
    }

    /// Checks that the image exists and has the annotation's size, without decoding pixels.
    pub fn check_item(&self, index: usize) -> Result<()> {
        let item = &self.items[index];
        let labels = read_label_png(&item.annotation)?;
        check_same_size(item, image_size(&item.image)?, &labels)
    }
}

fn check_same_size(item: &SegmentationItem, image: (u32, u32), labels: &LabelMap) -> Result<()> {
    if image != (labels.width, labels.height) {
        return Err(DatasetError::MaskSizeMismatch {
            mask: item.annotation.clone(),
            image: item.image.clone(),
            mask_width: labels.width,
            mask_height: labels.height,
            image_width: image.0,
            image_height: image.1,
        });
    }
    Ok(())
}

/// ADE20K's `reduce_zero_label`: 0 ("other") becomes 255, every other value `k` becomes `k - 1`.
pub fn reduce_zero_label(labels: &mut LabelMap) {
    for v in labels.data.iter_mut() {
        *v = if *v == 0 { IGNORE_INDEX } else { *v - 1 };
    }
}

fn find_voc_base(root: &Path) -> Result<PathBuf> {
    let candidates = [
        root.to_path_buf(),
        root.join("VOC2012"),
        root.join("VOCdevkit").join("VOC2012"),
    ];
    candidates
        .into_iter()
        .find(|c| c.join("JPEGImages").is_dir())
        .ok_or_else(|| {
            DatasetError::invalid(
                root,
                "not a Pascal VOC root: no JPEGImages in it, in VOC2012/ or in VOCdevkit/VOC2012/",
            )
        })
}

/// Sorted file stems of the `.png` files of a folder.
fn png_stems(dir: &Path) -> Result<Vec<String>> {
    let entries = std::fs::read_dir(dir).map_err(|e| DatasetError::io(dir, e))?;
    let mut stems = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| DatasetError::io(dir, e))?.path();
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("png"))
        {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                stems.push(stem.to_string());
            }
        }
    }
    stems.sort();
    Ok(stems)
}

fn read_class_names(base: &Path) -> Result<Option<Vec<String>>> {
    let path = base.join(CLASS_NAMES_FILE);
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| DatasetError::io(&path, e))?;
    Ok(Some(
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
    ))
}

/// Class names from `objectInfo150.csv` (in the root or its parent), else `class_1..class_150`.
fn read_ade_object_info(base: &Path) -> Result<Vec<String>> {
    let candidates = [
        base.join("objectInfo150.csv"),
        base.parent()
            .map(|p| p.join("objectInfo150.csv"))
            .unwrap_or_default(),
    ];
    let Some(path) = candidates.iter().find(|p| p.is_file()) else {
        return Ok((1..=150).map(|i| format!("class_{i}")).collect());
    };
    let text = std::fs::read_to_string(path).map_err(|e| DatasetError::io(path, e))?;
    let mut names = Vec::with_capacity(150);
    for (line_number, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        // Idx,Ratio,Train,Val,Stuff,Name — the name may itself hold ';' but no ','.
        let name = line.splitn(6, ',').nth(5).ok_or_else(|| {
            DatasetError::invalid(
                path,
                format!("line {}: expected 6 columns", line_number + 1),
            )
        })?;
        names.push(name.split(';').next().unwrap_or(name).trim().to_string());
    }
    Ok(names)
}
