//! Image decoding and resampling that reproduce what PyTorch pipelines see: Pillow's JPEG decoding
//! (libjpeg-turbo: integer IDCT, fancy upsampling) and Pillow's `Image.resize` convolution filters,
//! so that `classify`, `detect`, `segment` and training get the same pixels as timm / torchvision
//! transforms on PIL images.
//!
//! - JPEG goes through `mozjpeg` (a libjpeg-turbo fork built from its bundled C sources; its decoder is
//!   libjpeg-turbo's): bit-identical to Pillow 13 on the shared real photos, where the `image` crate's
//!   decoder differs by up to 4 levels on 1–12 % of pixels. A file that ends before its image data does
//!   (libjpeg's "Premature end of JPEG file", where Pillow raises "image file is truncated") or whose
//!   entropy-coded data is corrupt is refused, not decoded into grey rows.
//! - Other formats (PNG, BMP, WebP) go through the `image` crate (lossless formats decode the same
//!   everywhere).
//! - [`resize`] is Pillow's `ImagingResample` for 8-bit images (`Resample.c`): separable filters whose
//!   support widens with the downscale factor (so downscaling antialiases), coefficients normalised and
//!   rounded to 22-bit fixed point, horizontal pass then vertical pass, each rounded back to 8 bits.
//!   `fast_image_resize`'s bilinear filter was measured first: it differs from Pillow by 1 level on
//!   11–24 % of pixels of the same photos.

use std::path::Path;

use image::RgbImage;

use crate::error::{DatasetError, Result};

/// Decodes an image file (format from its content) to 8-bit RGB, as Pillow's `Image.open(p).convert("RGB")`.
///
/// # Errors
/// The file cannot be read, is not a known image format, or is truncated or corrupt; the message names
/// the file.
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| DatasetError::io(path, e))?;
    decode_rgb(&bytes).map_err(|message| DatasetError::image(path, message))
}

/// Decodes encoded image bytes to 8-bit RGB; JPEG exactly as libjpeg-turbo (see the module docs).
pub fn decode_rgb(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return decode_jpeg(bytes);
    }
    let image = image::load_from_memory(bytes).map_err(|e| e.to_string())?;
    Ok(image.to_rgb8())
}

fn decode_jpeg(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    let run = || -> std::io::Result<(usize, usize, Vec<u8>)> {
        let decompress = mozjpeg::Decompress::with_err(strict_error_mgr()).from_mem(bytes)?;
        let mut started = decompress.rgb()?;
        let (width, height) = (started.width(), started.height());
        let pixels: Vec<u8> = started.read_scanlines()?;
        started.finish()?;
        Ok((width, height, pixels))
    };
    // libjpeg reports errors by unwinding through the decoder (mozjpeg's error manager, and ours below).
    let (width, height, pixels) = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
    {
        Ok(Ok(decoded)) => decoded,
        Ok(Err(e)) => return Err(format!("cannot decode JPEG: {e}")),
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "libjpeg error".into());
            return Err(message.replace("libjpeg fatal error: ", ""));
        }
    };
    RgbImage::from_raw(width as u32, height as u32, pixels)
        .ok_or_else(|| "JPEG decoder returned fewer pixels than the image has".to_string())
}

/// libjpeg's error manager with warnings made fatal, bar "extraneous bytes before marker" (harmless
/// padding that many cameras write, and that Pillow also ignores).
fn strict_error_mgr() -> mozjpeg_sys::jpeg_error_mgr {
    // SAFETY: `jpeg_std_error` fills every field of a zeroed manager.
    let mut err: mozjpeg_sys::jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { mozjpeg_sys::jpeg_std_error(&mut err) };
    err.emit_message = Some(fail_on_warning);
    err.error_exit = Some(unwind_with_message);
    err
}

fn libjpeg_message(cinfo: &mut mozjpeg_sys::jpeg_common_struct) -> String {
    // SAFETY: `err` points at the manager installed above; `format_message` writes at most
    // JMSG_LENGTH_MAX (200) bytes, NUL included.
    unsafe {
        let err = &*cinfo.err;
        let mut buffer = [0u8; 256];
        match err.format_message {
            Some(format) => {
                let format: unsafe extern "C-unwind" fn(
                    &mut mozjpeg_sys::jpeg_common_struct,
                    *mut u8,
                ) = std::mem::transmute(format);
                format(cinfo, buffer.as_mut_ptr());
                let end = buffer.iter().position(|&c| c == 0).unwrap_or(buffer.len());
                String::from_utf8_lossy(&buffer[..end]).into_owned()
            }
            None => format!("libjpeg message {}", err.msg_code),
        }
    }
}

// The codes' Rust type follows the target's C enum type (i32 here), hence the casts.
#[allow(clippy::unnecessary_cast)]
unsafe extern "C-unwind" fn fail_on_warning(
    cinfo: &mut mozjpeg_sys::jpeg_common_struct,
    level: i32,
) {
    // SAFETY: as above.
    let code = unsafe { (*cinfo.err).msg_code };
    if level < 0 && code != mozjpeg_sys::JWRN_EXTRANEOUS_DATA as i32 {
        let mut message = libjpeg_message(cinfo);
        if code == mozjpeg_sys::JWRN_JPEG_EOF as i32 {
            message = format!("image file is truncated ({message})");
        } else {
            message = format!("corrupt JPEG data ({message})");
        }
        std::panic::resume_unwind(Box::new(message));
    }
}

unsafe extern "C-unwind" fn unwind_with_message(cinfo: &mut mozjpeg_sys::jpeg_common_struct) {
    let message = libjpeg_message(cinfo);
    std::panic::resume_unwind(Box::new(format!("cannot decode JPEG: {message}")));
}

/// Resampling filters of Pillow's `Image.resize` (`Resample.c`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Filter {
    /// `Image.NEAREST` is not a convolution; not offered.
    Box,
    /// `Image.BILINEAR` (torchvision's and timm's default for PIL images).
    Bilinear,
    /// `Image.BICUBIC` (a = -0.5).
    Bicubic,
    /// `Image.LANCZOS` (a = 3).
    Lanczos,
}

impl std::str::FromStr for Filter {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "box" => Ok(Self::Box),
            "bilinear" => Ok(Self::Bilinear),
            "bicubic" => Ok(Self::Bicubic),
            "lanczos" => Ok(Self::Lanczos),
            _ => Err(format!(
                "unknown interpolation `{s}` (expected bilinear, bicubic, lanczos or box)"
            )),
        }
    }
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Self::Box => 0.5,
            Self::Bilinear => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let sinc = |x: f64| {
            if x == 0.0 {
                1.0
            } else {
                let x = x * std::f64::consts::PI;
                x.sin() / x
            }
        };
        match self {
            Self::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Self::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Self::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Self::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fixed-point precision of Pillow's 8-bit resampling: 32 bits less 8 for the result and 2 for
/// overshoot of filters with negative lobes.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: the first input index and the fixed-point weights of the inputs it reads.
struct Coefficients {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the whole input range `0..in_size`.
fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero; both bounds are then clamped to the input.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let mut ww = 0.0;
        for (x, slot) in k.iter_mut().enumerate().take(xmax) {
            let w = filter.weight((x as f64 + xmin as f64 - center + 0.5) * ss);
            *slot = w;
            ww += w;
        }
        for x in 0..ksize {
            let w = if x < xmax && ww != 0.0 {
                k[x] / ww
            } else if x < xmax {
                k[x]
            } else {
                0.0
            };
            let fixed = w * (1u32 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if w < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coefficients {
        ksize,
        bounds,
        weights,
    }
}

/// Pillow's `clip8`: the fixed-point sum shifted back (arithmetic shift) and clamped to 0..=255.
#[inline]
fn clip8(sum: i32) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Horizontal pass over rows `first_row..first_row + rows` of an RGB buffer `in_w` wide.
fn horizontal_pass(
    src: &[u8],
    in_w: usize,
    first_row: usize,
    rows: usize,
    c: &Coefficients,
) -> Vec<u8> {
    let out_w = c.bounds.len();
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut out = vec![0u8; rows * out_w * 3];
    for y in 0..rows {
        let row = &src[(y + first_row) * in_w * 3..][..in_w * 3];
        let out_row = &mut out[y * out_w * 3..][..out_w * 3];
        for (xx, &(xmin, xmax)) in c.bounds.iter().enumerate() {
            let k = &c.weights[xx * c.ksize..][..xmax];
            let mut ss = [half; 3];
            for (x, &w) in k.iter().enumerate() {
                let p = &row[(x + xmin) * 3..][..3];
                for ch in 0..3 {
                    ss[ch] += p[ch] as i32 * w;
                }
            }
            for ch in 0..3 {
                out_row[xx * 3 + ch] = clip8(ss[ch]);
            }
        }
    }
    out
}

/// Vertical pass of an RGB buffer `width` wide whose row 0 is input row `row_offset`.
fn vertical_pass(src: &[u8], width: usize, row_offset: usize, c: &Coefficients) -> Vec<u8> {
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut out = vec![0u8; c.bounds.len() * width * 3];
    for (yy, &(ymin, ymax)) in c.bounds.iter().enumerate() {
        let k = &c.weights[yy * c.ksize..][..ymax];
        let out_row = &mut out[yy * width * 3..][..width * 3];
        for (i, value) in out_row.iter_mut().enumerate() {
            let mut ss = half;
            for (y, &w) in k.iter().enumerate() {
                ss += src[(y + ymin - row_offset) * width * 3 + i] as i32 * w;
            }
            *value = clip8(ss);
        }
    }
    out
}

/// `image.resize((width, height), filter)` of Pillow (13) for an RGB image, bit for bit, including its
/// choice of pass order (vertical first when the height shrinks by more than twice what the width
/// does), which changes the rounding of the intermediate image.
pub fn resize(image: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    if (in_w, in_h) == (out_w, out_h) {
        return image.clone();
    }
    let src = image.as_raw();
    let (need_h, need_v) = (out_w != in_w, out_h != in_h);
    let (dw, dh) = (in_w as i64 - out_w as i64, in_h as i64 - out_h as i64);
    let horizontal_first = !(dh > 0 && dh > dw * 2);
    let out = if horizontal_first {
        let vertical = coefficients(in_h, out_h, filter);
        // Only the rows the vertical pass reads are resampled horizontally.
        let first_row = vertical.bounds[0].0;
        let last_row = vertical.bounds[out_h - 1].0 + vertical.bounds[out_h - 1].1;
        let (temp, temp_w, offset) = if need_h {
            let horizontal = coefficients(in_w, out_w, filter);
            (
                horizontal_pass(src, in_w, first_row, last_row - first_row, &horizontal),
                out_w,
                first_row,
            )
        } else {
            (src.clone(), in_w, 0)
        };
        if need_v {
            vertical_pass(&temp, temp_w, offset, &vertical)
        } else {
            temp
        }
    } else {
        let temp = vertical_pass(src, in_w, 0, &coefficients(in_h, out_h, filter));
        if need_h {
            horizontal_pass(&temp, in_w, 0, out_h, &coefficients(in_w, out_w, filter))
        } else {
            temp
        }
    };
    RgbImage::from_raw(width, height, out).expect("sizes match")
}

/// torchvision's `Resize(size)` for an int `size` on a PIL image: the shorter side becomes `size`, the
/// longer `int(size * long / short)`; returns (width, height).
pub fn shorter_side_size(width: u32, height: u32, size: u32) -> (u32, u32) {
    let (short, long) = (width.min(height), width.max(height));
    let long = (size as f64 * long as f64 / short as f64) as u32;
    if width <= height {
        (size, long)
    } else {
        (long, size)
    }
}

/// torchvision's `CenterCrop` offsets: `int(round((in - out) / 2))`, Python's round (half to even).
/// Returns (left, top). Callers pad first when the image is smaller than the crop.
pub fn center_crop_offsets(width: u32, height: u32, crop_w: u32, crop_h: u32) -> (u32, u32) {
    let offset =
        |size: u32, crop: u32| ((size as f64 - crop as f64) / 2.0).round_ties_even() as u32;
    (offset(width, crop_w), offset(height, crop_h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn center_crop_rounds_half_to_even() {
        // (341 - 224) / 2 = 58.5 → 58, (343 - 224) / 2 = 59.5 → 60.
        assert_eq!(center_crop_offsets(341, 343, 224, 224), (58, 60));
        assert_eq!(center_crop_offsets(256, 256, 224, 224), (16, 16));
    }

    #[test]
    fn shorter_side_truncates_as_python_int() {
        assert_eq!(shorter_side_size(640, 427, 256), (383, 256));
        assert_eq!(shorter_side_size(427, 640, 256), (256, 383));
    }

    #[test]
    fn resize_of_a_constant_image_is_constant() {
        let image = RgbImage::from_pixel(37, 23, image::Rgb([200, 7, 255]));
        for filter in [
            Filter::Box,
            Filter::Bilinear,
            Filter::Bicubic,
            Filter::Lanczos,
        ] {
            let out = resize(&image, 11, 50, filter);
            assert!(out.pixels().all(|p| p.0 == [200, 7, 255]), "{filter:?}");
        }
    }
}
