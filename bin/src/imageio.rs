//! Image loading and conversion to normalised NCHW tensors, shared by the command-line tools.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use image::RgbImage;

/// ImageNet mean and standard deviation (RGB), the default normalisation of MobileOne checkpoints.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// File extensions taken as images when a folder is named.
pub const IMAGE_EXTENSIONS: [&str; 5] = ["jpg", "jpeg", "png", "bmp", "webp"];

/// Files named on the command line, and the images inside named folders (sorted by name).
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(input)
                .with_context(|| format!("cannot list folder {}", input.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.is_file()
                        && p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                            IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())
                        })
                })
                .collect();
            if found.is_empty() {
                bail!(
                    "folder {} has no images ({})",
                    input.display(),
                    IMAGE_EXTENSIONS.join(", ")
                );
            }
            found.sort();
            files.extend(found);
        } else if input.exists() {
            files.push(input.clone());
        } else {
            bail!("{} does not exist", input.display());
        }
    }
    Ok(files)
}

/// Decodes an image file (by content, not extension) into 8-bit RGB exactly as Pillow does
/// (`mobileone_datasets::imaging`); a truncated or corrupt file is an error naming it.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    Ok(mobileone_datasets::imaging::read_rgb(path)?)
}

/// (1, 3, H, W) float tensor of `(pixel / 255 - mean) / std`.
pub fn to_tensor(image: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Result<Tensor> {
    let (w, h) = image.dimensions();
    let (w, h) = (w as usize, h as usize);
    let mut data = vec![0f32; 3 * h * w];
    for (i, pixel) in image.pixels().enumerate() {
        for c in 0..3 {
            data[c * h * w + i] = (pixel[c] as f32 / 255.0 - mean[c]) / std[c];
        }
    }
    Ok(Tensor::from_vec(data, (1, 3, h, w), &Device::Cpu)?)
}
