//! COCO instances as Pascal VOC semantic masks, exactly as torchvision's segmentation reference builds
//! them for its COCO-trained DeepLabV3 weights (`references/segmentation/coco_utils.py`):
//! `FilterAndRemapCocoCategories(CAT_LIST)` keeps the annotations (crowd ones included) of the 20 VOC
//! categories and renumbers them 1..20, `ConvertCocoPolysToMask` rasterises each (polygons united,
//! RLE decoded), takes the largest class per pixel and marks pixels covered by more than one
//! annotation 255 (ignored); for training, `_coco_remove_images_without_annotations` keeps only the
//! images whose kept annotations' `area` fields sum to more than 1000.

use crate::coco::CocoDataset;
use crate::error::{DatasetError, Result};
use crate::io::LabelMap;
use crate::segmentation::{IGNORE_INDEX, VOC_CLASSES};

/// torchvision's `CAT_LIST`: the COCO category id of each VOC class (index 0, background, has none).
pub const VOC_CATEGORY_IDS: [u64; 21] = [
    0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72,
];

/// The VOC class of a COCO category id, if it is one of the 20.
pub fn voc_class(category_id: u64) -> Option<u8> {
    VOC_CATEGORY_IDS
        .iter()
        .skip(1)
        .position(|&c| c == category_id)
        .map(|i| i as u8 + 1)
}

/// The VOC mask (0 background, 1..20, 255 overlaps) of image `image_id`, at the image's size.
///
/// # Errors
/// An annotation whose segmentation cannot be rasterised (named by id and file).
pub fn voc_mask(dataset: &CocoDataset, image_id: u64) -> Result<LabelMap> {
    let image = dataset
        .image(image_id)
        .ok_or_else(|| DatasetError::invalid(&dataset.path, format!("no image {image_id}")))?;
    let (w, h) = (image.width, image.height);
    let n = w as usize * h as usize;
    let mut class = vec![0u8; n];
    let mut cover = vec![0u8; n];
    for annotation in dataset.annotations_for(image_id) {
        let Some(voc) = voc_class(annotation.category_id) else {
            continue;
        };
        let Some(segmentation) = &annotation.segmentation else {
            continue;
        };
        let rle = segmentation.to_rle(h, w).map_err(|e| {
            DatasetError::invalid(&dataset.path, format!("annotation {}: {e}", annotation.id))
        })?;
        for (i, &m) in rle.to_mask().iter().enumerate() {
            if m != 0 {
                class[i] = class[i].max(voc);
                // uint8 sum, as torchvision's `masks.sum(0)` over a uint8 stack.
                cover[i] = cover[i].wrapping_add(1);
            }
        }
    }
    for (c, &k) in class.iter_mut().zip(&cover) {
        if k > 1 {
            *c = IGNORE_INDEX;
        }
    }
    Ok(LabelMap {
        width: w,
        height: h,
        data: class,
    })
}

/// Whether torchvision keeps the image for training: its VOC-category annotations (crowd included)
/// have `area`s summing to more than 1000.
pub fn keep_for_training(dataset: &CocoDataset, image_id: u64) -> bool {
    let area: f64 = dataset
        .annotations_for(image_id)
        .filter(|a| voc_class(a.category_id).is_some())
        .map(|a| a.area)
        .sum();
    area > 1000.0
}

/// The 21 VOC class names, background first.
pub fn voc_class_names() -> Vec<String> {
    VOC_CLASSES.iter().map(|s| s.to_string()).collect()
}
