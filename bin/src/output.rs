//! Where prediction tools save what they draw, as ultralytics' `yolo predict` does: a fresh numbered
//! run folder per run (`runs/detect/predict`, `predict2`, …) unless `--out-dir` names one, so a rerun
//! never overwrites earlier results; pictures keep their input's format (a JPEG gives a JPEG).
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use image::RgbImage;

/// The folder this run saves into: `out_dir` when given (created), `None` with `--no-save`, else the
/// first free `runs/<tool>/<name>`, `<name>2`, `<name>3`, … under the current folder (created).
pub fn save_dir(
    tool: &str,
    name: &str,
    out_dir: Option<&Path>,
    no_save: bool,
) -> Result<Option<PathBuf>> {
    if no_save {
        return Ok(None);
    }
    let dir = match out_dir {
        Some(dir) => dir.to_path_buf(),
        None => {
            let base = Path::new("runs").join(tool);
            (1..)
                .map(|n| {
                    if n == 1 {
                        base.join(name)
                    } else {
                        base.join(format!("{name}{n}"))
                    }
                })
                .find(|p| !p.exists())
                .expect("some run folder is free")
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(Some(dir))
}

/// `dir/<stem><suffix>.jpg` for a JPEG input, `.png` otherwise.
pub fn picture_path(dir: &Path, input: &Path, suffix: &str) -> PathBuf {
    let stem = input
        .file_stem()
        .map_or("image".into(), |s| s.to_string_lossy().into_owned());
    let jpeg = input
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg"));
    dir.join(format!(
        "{stem}{suffix}.{}",
        if jpeg { "jpg" } else { "png" }
    ))
}

/// Writes a picture atomically, as JPEG (quality 95) or PNG by its extension.
pub fn write_picture(path: &Path, image: &RgbImage) -> Result<()> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    let is_jpeg = path.extension().is_some_and(|e| e == "jpg");
    if is_jpeg {
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 95).encode_image(image)?;
    } else {
        image.write_to(&mut bytes, image::ImageFormat::Png)?;
    }
    mobileone::checkpoint::write_atomic(path, bytes.get_ref())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Mean time per image of each stage, summed over a run and printed once at its end as ultralytics
/// does (`Speed: 1.2 ms decode, 3.4 ms preprocess, … per image`).
#[derive(Debug, Default)]
pub struct Speed {
    images: usize,
    /// Milliseconds summed over the images: decode, preprocess, inference, postprocess.
    ms: [f64; 4],
}

impl Speed {
    /// Adds one image's stage times.
    pub fn add(&mut self, stages: [std::time::Duration; 4]) {
        self.images += 1;
        for (sum, d) in self.ms.iter_mut().zip(stages) {
            *sum += d.as_secs_f64() * 1e3;
        }
    }

    /// How many images were timed.
    pub fn images(&self) -> usize {
        self.images
    }

    /// `Speed: … per image <at> (mean of N)`; `at` says at which input size, e.g. "at 320x320".
    pub fn line(&self, at: &str) -> String {
        let n = self.images.max(1) as f64;
        let [decode, pre, inference, post] = self.ms.map(|ms| ms / n);
        format!(
            "Speed: {decode:.1} ms decode, {pre:.1} ms preprocess, {inference:.1} ms inference, \
             {post:.1} ms postprocess per image {at} (mean of {})",
            self.images
        )
    }
}
