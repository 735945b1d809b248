//! File helpers: atomic writes and image/PNG decoding with errors that name the file.

use crate::error::{DatasetError, Result};
use image::RgbImage;
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, then a rename,
/// so a reader never sees a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| DatasetError::io(dir, e))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| DatasetError::io(dir, e))?;
    tmp.write_all(bytes)
        .map_err(|e| DatasetError::io(path, e))?;
    tmp.persist(path)
        .map_err(|e| DatasetError::io(path, e.error))?;
    Ok(())
}

/// Decodes an image file to 8-bit RGB exactly as Pillow does; truncated or corrupt files are refused
/// (see [`crate::imaging`]).
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    crate::imaging::read_rgb(path)
}

/// Reads the size of an image without decoding its pixels.
pub fn image_size(path: &Path) -> Result<(u32, u32)> {
    image::image_dimensions(path).map_err(|e| DatasetError::image(path, e))
}

/// A single-channel 8-bit label map, row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelMap {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

impl LabelMap {
    pub fn new(width: u32, height: u32, fill: u8) -> Self {
        Self {
            width,
            height,
            data: vec![fill; width as usize * height as usize],
        }
    }

    pub fn get(&self, x: u32, y: u32) -> u8 {
        self.data[y as usize * self.width as usize + x as usize]
    }
}

/// Reads a label PNG as raw 8-bit values: palette indices for palette PNGs (VOC), grey levels for
/// greyscale PNGs (ADE20K). The palette is deliberately not applied.
pub fn read_label_png(path: &Path) -> Result<LabelMap> {
    let file = std::fs::File::open(path).map_err(|e| DatasetError::io(path, e))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder
        .read_info()
        .map_err(|e| DatasetError::image(path, e))?;
    let info = reader.info();
    let (width, height) = (info.width, info.height);
    let (color, depth) = (info.color_type, info.bit_depth);
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| DatasetError::image(path, "image too large"))?;
    let mut buffer = vec![0; size];
    let frame = reader
        .next_frame(&mut buffer)
        .map_err(|e| DatasetError::image(path, e))?;
    buffer.truncate(frame.buffer_size());
    let pixels = width as usize * height as usize;
    let bits = match (color, depth) {
        (png::ColorType::Indexed | png::ColorType::Grayscale, png::BitDepth::Eight) => 8,
        (png::ColorType::Indexed | png::ColorType::Grayscale, png::BitDepth::Four) => 4,
        (png::ColorType::Indexed | png::ColorType::Grayscale, png::BitDepth::Two) => 2,
        (png::ColorType::Indexed | png::ColorType::Grayscale, png::BitDepth::One) => 1,
        _ => {
            return Err(DatasetError::image(
                path,
                format!(
                    "expected an 8-bit (or lower) palette or greyscale label PNG, found {color:?} at {depth:?} bits"
                ),
            ))
        }
    };
    // Rows are packed most significant bits first; values are raw (indices / grey levels).
    let per_byte = 8 / bits;
    let value_mask = ((1u16 << bits) - 1) as u8;
    let mut data = Vec::with_capacity(pixels);
    for row in buffer.chunks(frame.line_size).take(height as usize) {
        for x in 0..width as usize {
            let byte = row[x / per_byte];
            let shift = 8 - bits * (x % per_byte + 1);
            data.push((byte >> shift) & value_mask);
        }
    }
    Ok(LabelMap {
        width,
        height,
        data,
    })
}

/// The Pascal VOC colour map (also used for synthetic masks): class `i` gets the colour built from
/// the bits of `i`, 255 is the "void" colour.
pub fn voc_palette() -> Vec<[u8; 3]> {
    (0..256u32)
        .map(|index| {
            let (mut r, mut g, mut b) = (0u8, 0u8, 0u8);
            let mut c = index;
            for bit in 0..8 {
                r |= ((c & 1) as u8) << (7 - bit);
                g |= (((c >> 1) & 1) as u8) << (7 - bit);
                b |= (((c >> 2) & 1) as u8) << (7 - bit);
                c >>= 3;
            }
            [r, g, b]
        })
        .collect()
}

/// Encodes a label map as a PNG: a palette PNG when `palette` is given (VOC), greyscale otherwise.
pub fn encode_label_png(map: &LabelMap, palette: Option<&[[u8; 3]]>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, map.width, map.height);
        encoder.set_depth(png::BitDepth::Eight);
        match palette {
            Some(colors) => {
                encoder.set_color(png::ColorType::Indexed);
                encoder.set_palette(colors.iter().flatten().copied().collect::<Vec<u8>>());
            }
            None => encoder.set_color(png::ColorType::Grayscale),
        }
        let mut writer = encoder
            .write_header()
            .map_err(|e| DatasetError::image("<label png>", e))?;
        writer
            .write_image_data(&map.data)
            .map_err(|e| DatasetError::image("<label png>", e))?;
    }
    Ok(out)
}
