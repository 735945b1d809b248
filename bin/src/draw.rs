//! Drawing on RGB images for the visual outputs of the tools: filled rectangles and legible text with
//! an embedded 8x8 bitmap font (public-domain glyphs from the `font8x8` crate, scaled up by an integer).
use image::{Rgb, RgbImage};

/// Side of one glyph cell in font pixels; text is `GLYPH * scale` pixels tall.
pub const GLYPH: u32 = 8;

/// Width and height in pixels of `text` drawn at `scale`.
pub fn text_size(text: &str, scale: u32) -> (u32, u32) {
    (text.chars().count() as u32 * GLYPH * scale, GLYPH * scale)
}

/// Fills the rectangle, clipped to the image.
pub fn fill_rect(image: &mut RgbImage, x: i64, y: i64, width: u32, height: u32, color: Rgb<u8>) {
    let (w, h) = (image.width() as i64, image.height() as i64);
    for py in y.max(0)..(y + height as i64).min(h) {
        for px in x.max(0)..(x + width as i64).min(w) {
            image.put_pixel(px as u32, py as u32, color);
        }
    }
}

/// Draws `text` with its top-left corner at (x, y), clipped to the image; characters outside ASCII
/// are drawn as `?`.
pub fn draw_text(image: &mut RgbImage, x: i64, y: i64, text: &str, scale: u32, color: Rgb<u8>) {
    let scale = scale.max(1) as i64;
    for (i, ch) in text.chars().enumerate() {
        let code = if ch.is_ascii() {
            ch as usize
        } else {
            '?' as usize
        };
        let glyph = font8x8::legacy::BASIC_LEGACY[code];
        let left = x + i as i64 * GLYPH as i64 * scale;
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                // Bit 0 is the leftmost pixel of the row.
                if bits >> col & 1 == 1 {
                    let (px, py) = (left + col * scale, y + row as i64 * scale);
                    fill_rect(image, px, py, scale as u32, scale as u32, color);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_drawn_inside_its_box_and_clipped() {
        let mut image = RgbImage::new(40, 20);
        draw_text(&mut image, 2, 2, "Hi", 2, Rgb([255, 255, 255]));
        let (w, h) = text_size("Hi", 2);
        assert_eq!((w, h), (32, 16));
        let lit: Vec<(u32, u32)> = image
            .enumerate_pixels()
            .filter(|(_, _, p)| p.0 != [0, 0, 0])
            .map(|(x, y, _)| (x, y))
            .collect();
        assert!(!lit.is_empty());
        assert!(lit
            .iter()
            .all(|&(x, y)| (2..2 + w).contains(&x) && (2..2 + h).contains(&y)));
        // Drawing past the edges must not panic.
        draw_text(&mut image, -5, 15, "clipped text", 3, Rgb([1, 2, 3]));
    }
}
