//! Drawing on RGB images for the visual outputs of the tools: filled rectangles and anti-aliased text
//! in a vector font (IBM Plex Sans, SIL Open Font License, embedded from `train/assets/`, rasterised
//! by `ab_glyph`), so labels stay legible at any image size.
use std::sync::OnceLock;

use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
use image::{Rgb, RgbImage};

fn font() -> &'static FontRef<'static> {
    static FONT: OnceLock<FontRef<'static>> = OnceLock::new();
    FONT.get_or_init(|| {
        FontRef::try_from_slice(include_bytes!("../../train/assets/IBMPlexSans-Regular.ttf"))
            .expect("the embedded font parses")
    })
}

/// Text height in pixels suited to an image: about 1/40 of its shorter side, at least 12 px.
pub fn text_px_for(width: u32, height: u32) -> f32 {
    (width.min(height) as f32 / 40.0).max(12.0)
}

/// Width and height in pixels of `text` drawn `px` pixels tall.
pub fn text_size(text: &str, px: f32) -> (u32, u32) {
    let scaled = font().as_scaled(PxScale::from(px));
    let width: f32 = text
        .chars()
        .map(|c| scaled.h_advance(font().glyph_id(c)))
        .sum();
    (
        width.ceil() as u32,
        (scaled.ascent() - scaled.descent()).ceil() as u32,
    )
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

/// Draws `text` `px` pixels tall with its top-left corner at (x, y), blending glyph coverage into the
/// image (anti-aliased) and clipping to it.
pub fn draw_text(image: &mut RgbImage, x: i64, y: i64, text: &str, px: f32, color: Rgb<u8>) {
    let scale = PxScale::from(px);
    let scaled = font().as_scaled(scale);
    let mut pen = x as f32;
    let baseline = y as f32 + scaled.ascent();
    let (w, h) = (image.width() as i64, image.height() as i64);
    for c in text.chars() {
        let id = font().glyph_id(c);
        let glyph = id.with_scale_and_position(scale, ab_glyph::point(pen, baseline));
        pen += scaled.h_advance(id);
        let Some(outline) = font().outline_glyph(glyph) else {
            continue;
        };
        let bounds = outline.px_bounds();
        outline.draw(|gx, gy, coverage| {
            let (px, py) = (
                bounds.min.x as i64 + gx as i64,
                bounds.min.y as i64 + gy as i64,
            );
            if px < 0 || py < 0 || px >= w || py >= h {
                return;
            }
            let pixel = image.get_pixel_mut(px as u32, py as u32);
            let a = coverage.clamp(0.0, 1.0);
            for i in 0..3 {
                pixel[i] = ((1.0 - a) * pixel[i] as f32 + a * color[i] as f32).round() as u8;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_drawn_inside_its_box_and_clipped() {
        let mut image = RgbImage::new(60, 30);
        draw_text(&mut image, 2, 2, "Hi", 16.0, Rgb([255, 255, 255]));
        let (w, h) = text_size("Hi", 16.0);
        assert!(w > 8 && h >= 16, "{w}x{h}");
        let lit: Vec<(u32, u32)> = image
            .enumerate_pixels()
            .filter(|(_, _, p)| p.0 != [0, 0, 0])
            .map(|(x, y, _)| (x, y))
            .collect();
        assert!(!lit.is_empty());
        assert!(lit
            .iter()
            .all(|&(x, y)| (2..2 + w).contains(&x) && (2..2 + h).contains(&y)));
        // Drawing past the edges must not panic; non-ASCII text is drawn.
        draw_text(
            &mut image,
            -5,
            25,
            "clipped text – ünïcode",
            30.0,
            Rgb([1, 2, 3]),
        );
    }
}
