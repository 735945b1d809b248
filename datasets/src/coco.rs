//! COCO instances JSON (`instances_*.json`): serde types, a fast reader with precise errors, and
//! an index by image id plus contiguous label <-> category id maps.

use crate::error::{DatasetError, Result};
use crate::mask::Rle;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The top level of an instances file. Unknown keys (`info`, `licenses`, ...) are ignored on read.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CocoFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<serde_json::Value>,
    pub images: Vec<CocoImage>,
    #[serde(default)]
    pub annotations: Vec<CocoAnnotation>,
    pub categories: Vec<CocoCategory>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CocoImage {
    pub id: u64,
    pub file_name: String,
    pub width: u32,
    pub height: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CocoCategory {
    pub id: u64,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supercategory: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CocoAnnotation {
    pub id: u64,
    pub image_id: u64,
    pub category_id: u64,
    /// `[x, y, width, height]` in pixels.
    pub bbox: [f64; 4],
    pub area: f64,
    #[serde(default, deserialize_with = "crowd_flag", serialize_with = "crowd_int")]
    pub iscrowd: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub segmentation: Option<Segmentation>,
}

impl CocoAnnotation {
    /// The box as `[x1, y1, x2, y2]`.
    pub fn bbox_xyxy(&self) -> [f64; 4] {
        let [x, y, w, h] = self.bbox;
        [x, y, x + w, y + h]
    }
}

/// A segmentation: polygons (`[[x0, y0, x1, y1, ...], ...]`) or an RLE mask (COCO uses RLE for
/// crowd regions, with `counts` as a list of runs or the compressed string).
#[derive(Clone, Debug, PartialEq)]
pub enum Segmentation {
    Polygons(Vec<Vec<f64>>),
    Rle { size: [u32; 2], counts: RleCounts },
}

#[derive(Clone, Debug, PartialEq)]
pub enum RleCounts {
    Runs(Vec<u32>),
    Compressed(String),
}

impl Segmentation {
    /// The mask at the image's size, rasterised as pycocotools' `annToRLE` does.
    pub fn to_rle(&self, height: u32, width: u32) -> std::result::Result<Rle, String> {
        match self {
            Segmentation::Polygons(polygons) => {
                let parts: Vec<Rle> = polygons
                    .iter()
                    .map(|poly| Rle::from_polygon(poly, height, width))
                    .collect();
                Ok(Rle::union(&parts).unwrap_or_else(|| Rle {
                    height,
                    width,
                    counts: vec![height * width],
                }))
            }
            Segmentation::Rle { size, counts } => {
                let [h, w] = *size;
                let rle = match counts {
                    RleCounts::Runs(runs) => {
                        let rle = Rle {
                            height: h,
                            width: w,
                            counts: runs.clone(),
                        };
                        rle.check()?;
                        rle
                    }
                    RleCounts::Compressed(text) => Rle::from_compressed(text, h, w)?,
                };
                if (h, w) != (height, width) {
                    return Err(format!(
                        "RLE size {w}x{h} differs from the image size {width}x{height}"
                    ));
                }
                Ok(rle)
            }
        }
    }
}

impl Serialize for Segmentation {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            Segmentation::Polygons(polygons) => polygons.serialize(serializer),
            Segmentation::Rle { size, counts } => {
                let mut map = serializer.serialize_map(Some(2))?;
                map.serialize_entry("size", size)?;
                match counts {
                    RleCounts::Runs(runs) => map.serialize_entry("counts", runs)?,
                    RleCounts::Compressed(text) => map.serialize_entry("counts", text)?,
                }
                map.end()
            }
        }
    }
}

/// Hand-written so polygons stream straight into vectors (an untagged enum would buffer every
/// annotation) and so errors say which form was expected.
impl<'de> Deserialize<'de> for Segmentation {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct SegmentationVisitor;

        #[derive(Deserialize)]
        #[serde(untagged)]
        enum CountsRepr {
            Runs(Vec<u32>),
            Compressed(String),
        }

        impl<'de> Visitor<'de> for SegmentationVisitor {
            type Value = Segmentation;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of polygons or an RLE object {\"size\", \"counts\"}")
            }

            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut polygons = Vec::with_capacity(seq.size_hint().unwrap_or(1));
                while let Some(polygon) = seq.next_element::<Vec<f64>>()? {
                    polygons.push(polygon);
                }
                Ok(Segmentation::Polygons(polygons))
            }

            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut size = None;
                let mut counts = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "size" => size = Some(map.next_value::<[u32; 2]>()?),
                        "counts" => {
                            counts = Some(match map.next_value::<CountsRepr>()? {
                                CountsRepr::Runs(runs) => RleCounts::Runs(runs),
                                CountsRepr::Compressed(text) => RleCounts::Compressed(text),
                            })
                        }
                        _ => {
                            map.next_value::<de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(Segmentation::Rle {
                    size: size.ok_or_else(|| de::Error::missing_field("size"))?,
                    counts: counts.ok_or_else(|| de::Error::missing_field("counts"))?,
                })
            }
        }

        deserializer.deserialize_any(SegmentationVisitor)
    }
}

/// `iscrowd` is 0/1 in COCO files; booleans are accepted too.
fn crowd_flag<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<bool, D::Error> {
    struct FlagVisitor;
    impl Visitor<'_> for FlagVisitor {
        type Value = bool;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("0, 1 or a boolean")
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<bool, E> {
            Ok(v)
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<bool, E> {
            match v {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(E::invalid_value(de::Unexpected::Unsigned(v), &self)),
            }
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<bool, E> {
            match v {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(E::invalid_value(de::Unexpected::Signed(v), &self)),
            }
        }
    }
    deserializer.deserialize_any(FlagVisitor)
}

fn crowd_int<S: Serializer>(value: &bool, serializer: S) -> std::result::Result<S::Ok, S::Error> {
    serializer.serialize_u8(*value as u8)
}

/// Parses instances JSON from memory. `path` is only used in error messages. The fast path is
/// plain serde_json; on failure the input is parsed again to find the JSON path of the error.
pub fn parse_coco_json(bytes: &[u8], path: &Path) -> Result<CocoFile> {
    match serde_json::from_slice::<CocoFile>(bytes) {
        Ok(file) => Ok(file),
        Err(error) => {
            let mut deserializer = serde_json::Deserializer::from_slice(bytes);
            let field = match serde_path_to_error::deserialize::<_, CocoFile>(&mut deserializer) {
                Err(located) => located.path().to_string(),
                Ok(_) => ".".to_string(),
            };
            Err(DatasetError::Json {
                path: path.to_path_buf(),
                field,
                line: error.line(),
                column: error.column(),
                message: strip_position(&error.to_string()),
            })
        }
    }
}

/// serde_json appends " at line L column C"; the position is reported separately.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(index) => message[..index].to_string(),
        None => message.to_string(),
    }
}

/// A COCO `[x, y, w, h]` box as torchvision's detection reference (`ConvertCocoPolysToMask`) turns it
/// into a training target: float32, `x2 = x + w` and `y2 = y + h` added in float32, clamped to the
/// image, kept only if `x2 > x1` and `y2 > y1`. So a width of 5.55e-15 (what `(0.1 + 0.2) - 0.3`
/// writes) vanishes in the sum and the box is dropped, as it is there.
pub fn training_box(bbox: [f64; 4], width: u32, height: u32) -> Option<[f32; 4]> {
    let [x, y, w, h] = bbox.map(|v| v as f32);
    let (wf, hf) = (width as f32, height as f32);
    let x1 = x.clamp(0.0, wf);
    let y1 = y.clamp(0.0, hf);
    let x2 = (x + w).clamp(0.0, wf);
    let y2 = (y + h).clamp(0.0, hf);
    (x2 > x1 && y2 > y1).then_some([x1, y1, x2, y2])
}

/// A parsed instances file with lookups. Labels are contiguous: label `l` (1-based, 0 is left for
/// background) is the `l`-th category in ascending id order.
#[derive(Clone, Debug)]
pub struct CocoDataset {
    pub path: PathBuf,
    pub images: Vec<CocoImage>,
    pub annotations: Vec<CocoAnnotation>,
    /// Sorted by id.
    pub categories: Vec<CocoCategory>,
    image_index: HashMap<u64, usize>,
    annotations_by_image: Vec<Vec<usize>>,
    label_by_category: HashMap<u64, u32>,
}

impl CocoDataset {
    /// Reads and indexes an instances JSON file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| DatasetError::io(path, e))?;
        let file = parse_coco_json(&bytes, path)?;
        Self::from_file(file, path)
    }

    /// Indexes an already parsed file, checking that ids are unique and references resolve.
    pub fn from_file(file: CocoFile, path: &Path) -> Result<Self> {
        let CocoFile {
            images,
            annotations,
            mut categories,
            ..
        } = file;
        let mut image_index = HashMap::with_capacity(images.len());
        for (position, image) in images.iter().enumerate() {
            if image_index.insert(image.id, position).is_some() {
                return Err(DatasetError::invalid(
                    path,
                    format!("images[{position}]: duplicate image id {}", image.id),
                ));
            }
        }
        categories.sort_by_key(|c| c.id);
        let mut label_by_category = HashMap::with_capacity(categories.len());
        for (position, category) in categories.iter().enumerate() {
            if label_by_category
                .insert(category.id, position as u32 + 1)
                .is_some()
            {
                return Err(DatasetError::invalid(
                    path,
                    format!("categories: duplicate category id {}", category.id),
                ));
            }
        }
        let mut annotations_by_image = vec![Vec::new(); images.len()];
        for (position, annotation) in annotations.iter().enumerate() {
            let Some(&image) = image_index.get(&annotation.image_id) else {
                return Err(DatasetError::invalid(
                    path,
                    format!(
                        "annotations[{position}] (id {}): image_id {} is not in `images`",
                        annotation.id, annotation.image_id
                    ),
                ));
            };
            if !label_by_category.contains_key(&annotation.category_id) {
                return Err(DatasetError::invalid(
                    path,
                    format!(
                        "annotations[{position}] (id {}): category_id {} is not in `categories`",
                        annotation.id, annotation.category_id
                    ),
                ));
            }
            // A box without area (even a negative size) is only dropped by training, as torchvision
            // does; a non-finite one cannot be converted at all.
            if annotation.bbox.iter().any(|v| !v.is_finite()) {
                return Err(DatasetError::invalid(
                    path,
                    format!(
                        "annotations[{position}] (id {}, image_id {}): bbox {:?} is not finite",
                        annotation.id, annotation.image_id, annotation.bbox
                    ),
                ));
            }
            annotations_by_image[image].push(position);
        }
        Ok(Self {
            path: path.to_path_buf(),
            images,
            annotations,
            categories,
            image_index,
            annotations_by_image,
            label_by_category,
        })
    }

    /// The ids of the non-crowd annotations whose box has no area (zero or negative width or
    /// height) once converted as training converts it ([`training_box`]), in file order; training
    /// drops them.
    pub fn degenerate_boxes(&self) -> Vec<u64> {
        self.annotations
            .iter()
            .filter(|a| !a.iscrowd)
            .filter(|a| {
                let image = self.image(a.image_id).expect("checked when indexed");
                training_box(a.bbox, image.width, image.height).is_none()
            })
            .map(|a| a.id)
            .collect()
    }

    /// The image with this id.
    pub fn image(&self, image_id: u64) -> Option<&CocoImage> {
        self.image_index.get(&image_id).map(|&i| &self.images[i])
    }

    /// Position of the image in `images`.
    pub fn image_position(&self, image_id: u64) -> Option<usize> {
        self.image_index.get(&image_id).copied()
    }

    /// Annotations of the image with this id (empty for unknown ids).
    pub fn annotations_for(&self, image_id: u64) -> impl Iterator<Item = &CocoAnnotation> {
        let positions: &[usize] = match self.image_index.get(&image_id) {
            Some(&i) => &self.annotations_by_image[i],
            None => &[],
        };
        positions.iter().map(|&a| &self.annotations[a])
    }

    /// Number of categories (labels run 1..=num_categories).
    pub fn num_categories(&self) -> usize {
        self.categories.len()
    }

    /// Contiguous label (1-based) of a category id.
    pub fn label_of(&self, category_id: u64) -> Option<u32> {
        self.label_by_category.get(&category_id).copied()
    }

    /// Category id of a contiguous label (1-based).
    pub fn category_of(&self, label: u32) -> Option<u64> {
        let index = (label as usize).checked_sub(1)?;
        self.categories.get(index).map(|c| c.id)
    }

    /// Category ids indexed by label: element 0 is background (`None`).
    pub fn category_ids_by_label(&self) -> Vec<Option<u64>> {
        std::iter::once(None)
            .chain(self.categories.iter().map(|c| Some(c.id)))
            .collect()
    }

    /// Category names indexed by label: element 0 is `"background"`.
    pub fn class_names(&self) -> Vec<String> {
        std::iter::once("background".to_string())
            .chain(self.categories.iter().map(|c| c.name.clone()))
            .collect()
    }

    /// Rebuilds the serialisable form (categories sorted by id).
    pub fn to_file(&self) -> CocoFile {
        CocoFile {
            info: None,
            images: self.images.clone(),
            annotations: self.annotations.clone(),
            categories: self.categories.clone(),
        }
    }
}
