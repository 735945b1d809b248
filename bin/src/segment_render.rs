//! Outputs of `segment`: the class-index PNG and a coloured overlay with a legend of the classes present.
use std::io::Cursor;
use std::path::Path;

use anyhow::{bail, Context, Result};
use image::{ImageBuffer, ImageFormat, Luma, Rgb, RgbImage};

use crate::draw::{draw_text, fill_rect, text_px_for, text_size};

/// A per-pixel class map, row-major.
pub struct ClassMap {
    pub width: u32,
    pub height: u32,
    pub classes: Vec<u32>,
}

impl ClassMap {
    /// (class, pixel count) of every class present, most frequent first.
    pub fn histogram(&self) -> Vec<(u32, usize)> {
        let mut counts = std::collections::BTreeMap::new();
        for &c in &self.classes {
            *counts.entry(c).or_insert(0usize) += 1;
        }
        let mut present: Vec<(u32, usize)> = counts.into_iter().collect();
        present.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        present
    }
}

/// Writes the class indices as a palette PNG, atomically: each pixel's byte is its class index (as
/// VOC's `SegmentationClass` masks; `np.array(Image.open(p))` gives the indices) and `palette` colours
/// them in any viewer (unlisted indices black). A class above 255 needs 16-bit greyscale, which has
/// no palette.
pub fn write_class_png(path: &Path, map: &ClassMap, palette: &[[u8; 3]]) -> Result<()> {
    crate::output::create_parent(path)?;
    let bytes = if map.classes.iter().all(|&c| c <= u8::MAX as u32) {
        let labels = mobileone_datasets::LabelMap {
            width: map.width,
            height: map.height,
            data: map.classes.iter().map(|&c| c as u8).collect(),
        };
        let mut full = palette.to_vec();
        full.resize(256, [0, 0, 0]);
        mobileone_datasets::io::encode_label_png(&labels, Some(&full))?
    } else {
        let mut bytes = Cursor::new(Vec::new());
        let data = map
            .classes
            .iter()
            .map(|&c| c.min(u16::MAX as u32) as u16)
            .collect();
        let image: ImageBuffer<Luma<u16>, Vec<u16>> =
            ImageBuffer::from_raw(map.width, map.height, data)
                .context("class map has the wrong size")?;
        image.write_to(&mut bytes, ImageFormat::Png)?;
        bytes.into_inner()
    };
    write_file(path, &bytes)
}

/// Encodes an RGB image as PNG and writes it atomically.
pub fn write_rgb_png(path: &Path, image: &RgbImage) -> Result<()> {
    let mut bytes = Cursor::new(Vec::new());
    image.write_to(&mut bytes, ImageFormat::Png)?;
    write_file(path, bytes.get_ref())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    mobileone::checkpoint::write_atomic(path, bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The photo with each pixel's class colour blended in at `alpha`, and a legend panel on the right listing
/// the classes present (colour swatch, name, share of the pixels), most frequent first.
pub fn overlay_with_legend(
    image: &RgbImage,
    map: &ClassMap,
    color: impl Fn(u32) -> [u8; 3],
    name: impl Fn(u32) -> String,
    alpha: f32,
) -> Result<RgbImage> {
    if (image.width(), image.height()) != (map.width, map.height) {
        bail!(
            "class map is {}x{} but the image is {}x{}",
            map.width,
            map.height,
            image.width(),
            image.height()
        );
    }
    let present = map.histogram();
    let total = map.classes.len().max(1) as f64;
    // Background stays the photo: only the classes found are tinted, and the legend lists exactly
    // those (classes under 0.05 % of the pixels, which would read "0.0 %", are left out).
    let untinted: std::collections::HashSet<u32> = present
        .iter()
        .map(|&(c, _)| c)
        .filter(|&c| name(c) == "background")
        .collect();
    let lines: Vec<(u32, String)> = present
        .iter()
        .filter(|&&(c, n)| !untinted.contains(&c) && n as f64 / total >= 0.0005)
        .map(|&(c, n)| (c, format!("{} {:.1}%", name(c), 100.0 * n as f64 / total)))
        .collect();
    let scale = text_px_for(image.width(), image.height());
    let (_, line_height) = text_size("Ag", scale);
    let row = line_height + line_height / 4;
    let swatch = line_height;
    let pad = (line_height / 3).max(3);
    let legend_width = pad * 3
        + swatch
        + lines
            .iter()
            .map(|(_, text)| text_size(text, scale).0)
            .max()
            .unwrap_or(0);
    let legend_height = pad + row * (lines.len() as u32 + 1) + pad;
    let height = image.height().max(legend_height);
    let mut out = RgbImage::from_pixel(image.width() + legend_width, height, Rgb([255, 255, 255]));
    for (x, y, pixel) in image.enumerate_pixels() {
        let class = map.classes[(y * map.width + x) as usize];
        if untinted.contains(&class) {
            out.put_pixel(x, y, *pixel);
            continue;
        }
        let c = color(class);
        let mixed = [0, 1, 2]
            .map(|i| ((1.0 - alpha) * pixel[i] as f32 + alpha * c[i] as f32).round() as u8);
        out.put_pixel(x, y, Rgb(mixed));
    }
    let left = image.width() as i64 + pad as i64;
    let black = Rgb([0, 0, 0]);
    draw_text(&mut out, left, pad as i64, "classes", scale, black);
    for (i, (class, text)) in lines.iter().enumerate() {
        let top = (pad + row * (i as u32 + 1)) as i64;
        let c = Rgb(color(*class));
        fill_rect(&mut out, left, top, swatch, swatch, black);
        fill_rect(&mut out, left + 1, top + 1, swatch - 2, swatch - 2, c);
        draw_text(
            &mut out,
            left + (swatch + pad) as i64,
            top,
            text,
            scale,
            black,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legend_lists_present_classes_by_frequency() {
        let map = ClassMap {
            width: 3,
            height: 2,
            classes: vec![2, 2, 2, 0, 0, 5],
        };
        assert_eq!(map.histogram(), vec![(2, 3), (0, 2), (5, 1)]);
        let image = RgbImage::from_pixel(3, 2, Rgb([100, 100, 100]));
        let out = overlay_with_legend(
            &image,
            &map,
            |c| [c as u8 * 40, 0, 0],
            |c| format!("c{c}"),
            0.5,
        )
        .unwrap();
        assert!(out.width() > 3 && out.height() >= 2);
        assert_eq!(out.get_pixel(0, 0).0, [90, 50, 50]);
    }

    #[test]
    fn mismatched_sizes_are_errors() {
        let map = ClassMap {
            width: 2,
            height: 2,
            classes: vec![0; 4],
        };
        let image = RgbImage::new(3, 2);
        assert!(overlay_with_legend(&image, &map, |_| [0; 3], |c| c.to_string(), 0.5).is_err());
    }
}
