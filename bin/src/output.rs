//! Where prediction tools save what they draw, as ultralytics' `yolo predict` does: a fresh numbered
//! run folder per run (`runs/detect/predict`, `predict2`, …) unless `--out-dir` names one, so a rerun
//! never overwrites earlier results; pictures keep their input's format (a JPEG gives a JPEG).
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use image::RgbImage;

/// The folder this run saves into: `out_dir` when given, `None` with `--no-save`, else the first free
/// `runs/<tool>/<name>`, `<name>2`, `<name>3`, … under the current folder. Nothing is created here:
/// the first file written creates it, so a run that writes nothing leaves no empty folder.
pub fn save_dir(tool: &str, name: &str, out_dir: Option<&Path>, no_save: bool) -> Option<PathBuf> {
    if no_save {
        return None;
    }
    Some(match out_dir {
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
    })
}

/// Creates `path`'s folder if it is missing.
pub fn create_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Prints where the run's files are, when it wrote any.
pub fn print_saved(dir: Option<&Path>) {
    if let Some(dir) = dir.filter(|d| d.is_dir()) {
        println!("results saved to {}", dir.display());
    }
}

/// Refuses inputs whose outputs would overwrite each other in one folder (same file stem).
pub fn distinct_stems(files: &[PathBuf]) -> Result<()> {
    let mut seen = std::collections::HashMap::new();
    for file in files {
        let stem = file.file_stem().unwrap_or_default();
        if let Some(first) = seen.insert(stem, file) {
            anyhow::bail!(
                "{} and {} are both named {}: their outputs would overwrite each other in one folder \
                 (rename one, or run them separately)",
                first.display(),
                file.display(),
                stem.to_string_lossy()
            );
        }
    }
    Ok(())
}

/// The file name of `path` as the console lines and failure lists show it (the whole path when it
/// has none).
pub fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
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

/// Writes a picture atomically, as JPEG (quality 95) or PNG by its extension, creating its folder.
pub fn write_picture(path: &Path, image: &RgbImage) -> Result<()> {
    create_parent(path)?;
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

/// The end of a run over several images: an error naming those that failed (they were reported and
/// skipped as they came), or `Ok` when none did.
pub fn failures(failed: &[String], total: usize) -> Result<()> {
    if failed.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "{} of {total} image(s) failed: {}",
        failed.len(),
        failed.join(", ")
    )
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
