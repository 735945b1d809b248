//! ImageNet classification as timm evaluates it: the eval transform (`timm.data.create_transform` with
//! `is_training=False`), batched forward passes, top-k, and the ImageNet validation layouts.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use image::RgbImage;
use mobileone_datasets::imaging::{self, Filter};

/// timm's eval transform: `Resize(floor(input_size / crop_pct))` on the shorter side with Pillow's
/// filter, `CenterCrop(input_size)` with torchvision's rounding, `ToTensor`, `Normalize(mean, std)`.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalTransform {
    /// Side of the square network input, pixels.
    pub input_size: u32,
    pub crop_pct: f64,
    pub interpolation: Filter,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for EvalTransform {
    /// timm's pretrained config of `mobileone_s0`…`s4`: 224, crop_pct 0.875, bilinear, ImageNet mean/std.
    fn default() -> Self {
        Self {
            input_size: 224,
            crop_pct: 0.875,
            interpolation: Filter::Bilinear,
            mean: crate::imageio::IMAGENET_MEAN,
            std: crate::imageio::IMAGENET_STD,
        }
    }
}

fn triple(value: &serde_json::Value, what: &str) -> Result<[f32; 3]> {
    let v: Vec<f32> = serde_json::from_value(value.clone())
        .with_context(|| format!("`{what}` is not a list of numbers"))?;
    <[f32; 3]>::try_from(v.as_slice()).map_err(|_| anyhow::anyhow!("`{what}` must hold 3 numbers"))
}

impl EvalTransform {
    /// Side the shorter image side is resized to: `floor(input_size / crop_pct)` (timm).
    pub fn scale_size(&self) -> u32 {
        (self.input_size as f64 / self.crop_pct).floor() as u32
    }

    /// Updates from timm's `pretrained_cfg` keys (`input_size` [3, H, W], `crop_pct`, `interpolation`,
    /// `mean`, `std`) found at the top of `json` or under `pretrained_cfg` (a hub `config.json`), or in
    /// safetensors metadata values (JSON text).
    pub fn update_from_json(&mut self, json: &serde_json::Value) -> Result<()> {
        let cfg = json.get("pretrained_cfg").unwrap_or(json);
        if let Some(v) = cfg.get("input_size") {
            let size: Vec<u32> = serde_json::from_value(v.clone()).context("`input_size`")?;
            match size.as_slice() {
                [_, h, w] if h == w => self.input_size = *h,
                [s] => self.input_size = *s,
                _ => bail!("`input_size` {size:?}: only square inputs [3, S, S] are supported"),
            }
        }
        if let Some(v) = cfg.get("crop_pct").and_then(|v| v.as_f64()) {
            self.crop_pct = v;
        }
        if let Some(v) = cfg.get("interpolation").and_then(|v| v.as_str()) {
            self.interpolation = v.parse().map_err(anyhow::Error::msg)?;
        }
        if let Some(v) = cfg.get("mean") {
            self.mean = triple(v, "mean")?;
        }
        if let Some(v) = cfg.get("std") {
            self.std = triple(v, "std")?;
        }
        Ok(())
    }

    /// Reads the keys above from a checkpoint's metadata (each value JSON text).
    pub fn update_from_metadata(&mut self, metadata: &HashMap<String, String>) -> Result<()> {
        let mut object = serde_json::Map::new();
        for key in ["input_size", "crop_pct", "interpolation", "mean", "std"] {
            if let Some(text) = metadata.get(key) {
                let value = serde_json::from_str(text)
                    .unwrap_or_else(|_| serde_json::Value::String(text.clone()));
                object.insert(key.to_string(), value);
            }
        }
        self.update_from_json(&serde_json::Value::Object(object))
            .context("checkpoint metadata")
    }

    /// The normalised `(3, S, S)` input of an image, row-major, as timm's transform gives it.
    pub fn apply(&self, image: &RgbImage) -> Vec<f32> {
        let (w, h) = imaging::shorter_side_size(image.width(), image.height(), self.scale_size());
        let resized = imaging::resize(image, w, h, self.interpolation);
        let s = self.input_size;
        let (left, top) = imaging::center_crop_offsets(w.max(s), h.max(s), s, s);
        // torchvision pads (with 0) an image smaller than the crop before cropping.
        let (pad_left, pad_top) = (
            if w < s { (s - w) / 2 } else { 0 },
            if h < s { (s - h) / 2 } else { 0 },
        );
        let n = (s * s) as usize;
        let mut out = vec![0f32; 3 * n];
        for y in 0..s {
            for x in 0..s {
                let (sx, sy) = (
                    (x + left) as i64 - pad_left as i64,
                    (y + top) as i64 - pad_top as i64,
                );
                let pixel = if sx >= 0 && sy >= 0 && (sx as u32) < w && (sy as u32) < h {
                    resized.get_pixel(sx as u32, sy as u32).0
                } else {
                    [0, 0, 0]
                };
                let i = (y * s + x) as usize;
                for c in 0..3 {
                    // ToTensor then Normalize, in float32 as torch computes them.
                    out[c * n + i] = (pixel[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
                }
            }
        }
        out
    }

    /// Stacks the inputs of `images` into an `(N, 3, S, S)` tensor.
    pub fn batch(&self, inputs: Vec<Vec<f32>>) -> Result<Tensor> {
        let n = inputs.len();
        let s = self.input_size as usize;
        let data: Vec<f32> = inputs.into_iter().flatten().collect();
        Ok(Tensor::from_vec(data, (n, 3, s, s), &Device::Cpu)?)
    }
}

/// One predicted class.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Prediction {
    pub class_index: usize,
    pub label: String,
    pub probability: f32,
}

/// One console line's worth: `golden retriever 89.1%, Labrador retriever 5.2%, …`.
pub fn summary(predictions: &[Prediction]) -> String {
    predictions
        .iter()
        .map(|p| format!("{} {:.1}%", p.label, p.probability * 100.0))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Writes the predictions on the picture, most probable first, one per line (`89.1% golden
/// retriever`) in white on a dark panel at its top-left corner, sized to the image.
pub fn draw(image: &mut RgbImage, predictions: &[Prediction]) {
    use crate::draw::{draw_text, fill_rect, text_px_for, text_size};
    use image::Rgb;
    let px = text_px_for(image.width(), image.height());
    let lines: Vec<String> = predictions
        .iter()
        .map(|p| format!("{:.1}% {}", p.probability * 100.0, p.label))
        .collect();
    let pad = (px / 4.0).ceil() as u32;
    let line_height = text_size("Ag", px).1;
    let width = lines.iter().map(|l| text_size(l, px).0).max().unwrap_or(0) + 2 * pad;
    let height = line_height * lines.len() as u32 + 2 * pad;
    fill_rect(image, 0, 0, width, height, Rgb([24, 24, 24]));
    for (i, line) in lines.iter().enumerate() {
        let y = pad + i as u32 * line_height;
        draw_text(image, pad as i64, y as i64, line, px, Rgb([255, 255, 255]));
    }
}

/// The `k` most probable classes of one row of softmax probabilities, most probable first (ties by
/// lower index, as `torch.topk` on CPU).
pub fn top_k(probabilities: &[f32], k: usize, names: &[String]) -> Vec<Prediction> {
    let mut order: Vec<usize> = (0..probabilities.len()).collect();
    order.sort_by(|&a, &b| {
        probabilities[b]
            .total_cmp(&probabilities[a])
            .then(a.cmp(&b))
    });
    order
        .into_iter()
        .take(k)
        .map(|i| Prediction {
            class_index: i,
            label: names.get(i).cloned().unwrap_or_default(),
            probability: probabilities[i],
        })
        .collect()
}

/// An ImageNet-style validation set: image files and their class indices.
#[derive(Debug, Clone)]
pub struct LabelledImages {
    pub items: Vec<(PathBuf, usize)>,
    /// Class names when the folder names them (`synset_words.txt`), else `None`.
    pub class_names: Option<Vec<String>>,
}

/// Reads `DIR/labels.txt` (`<file> <class index>` per line, images in `DIR/images/`) or the ImageFolder
/// layout (`DIR/<wnid>/*.JPEG`, classes in sorted wnid order). Class names come from
/// `DIR/synset_words.txt` (`<wnid> <names>` per line, in class-index order) when present.
pub fn read_imagenet(dir: &Path) -> Result<LabelledImages> {
    let synsets = dir.join("synset_words.txt");
    let synset_lines: Option<Vec<(String, String)>> = if synsets.is_file() {
        let text = std::fs::read_to_string(&synsets)
            .with_context(|| format!("cannot read {}", synsets.display()))?;
        Some(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| {
                    let (wnid, names) = l.split_once(' ').unwrap_or((l, ""));
                    (wnid.to_string(), names.trim().to_string())
                })
                .collect(),
        )
    } else {
        None
    };
    let class_names = synset_lines.as_ref().map(|lines| {
        lines
            .iter()
            .map(|(_, n)| n.split(',').next().unwrap_or(n).trim().to_string())
            .collect()
    });
    let labels = dir.join("labels.txt");
    let items = if labels.is_file() {
        let text = std::fs::read_to_string(&labels)
            .with_context(|| format!("cannot read {}", labels.display()))?;
        let mut items = Vec::new();
        for (number, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(file), Some(class), None) = (fields.next(), fields.next(), fields.next())
            else {
                bail!(
                    "{} line {}: expected `<file> <class index>`",
                    labels.display(),
                    number + 1
                );
            };
            let class: usize = class.parse().with_context(|| {
                format!(
                    "{} line {}: class `{class}` is not an index",
                    labels.display(),
                    number + 1
                )
            })?;
            items.push((dir.join("images").join(file), class));
        }
        items
    } else {
        let mut classes: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        classes.sort();
        if classes.is_empty() {
            bail!(
                "{} has neither labels.txt nor class folders (ImageFolder layout: <wnid>/*.JPEG)",
                dir.display()
            );
        }
        let mut items = Vec::new();
        for (class, folder) in classes.iter().enumerate() {
            for file in crate::imageio::expand_inputs(std::slice::from_ref(folder))? {
                items.push((file, class));
            }
        }
        items
    };
    if items.is_empty() {
        bail!("{} lists no images", dir.display());
    }
    Ok(LabelledImages { items, class_names })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_size_is_timm_floor() {
        assert_eq!(EvalTransform::default().scale_size(), 256);
        let t = EvalTransform {
            input_size: 256,
            crop_pct: 0.95,
            ..Default::default()
        };
        assert_eq!(t.scale_size(), 269);
    }

    #[test]
    fn top_k_orders_by_probability_then_index() {
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let top = top_k(&[0.2, 0.5, 0.2], 3, &names);
        assert_eq!(
            top.iter().map(|p| p.class_index).collect::<Vec<_>>(),
            vec![1, 0, 2]
        );
    }

    #[test]
    fn hub_config_keys_update_the_transform() {
        let mut t = EvalTransform::default();
        let cfg = serde_json::json!({"pretrained_cfg": {"input_size": [3, 256, 256], "crop_pct": 0.95,
            "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}});
        t.update_from_json(&cfg).unwrap();
        assert_eq!(
            (t.input_size, t.crop_pct, t.interpolation),
            (256, 0.95, Filter::Bicubic)
        );
        assert!(t
            .update_from_json(&serde_json::json!({"input_size": [3, 224, 200]}))
            .is_err());
    }
}
