//! Presenting detections: the per-image table, COCO result entries and labelled boxes drawn on the photo.
use image::{Rgb, RgbImage};
use serde::Serialize;
use ssdlite::{Detection, Labels};

use crate::draw::{draw_text, fill_rect, text_px_for, text_size};

/// One entry of a COCO results file; `file_name` is extra (pycocotools ignores unknown fields).
#[derive(Debug, Clone, Serialize)]
pub struct CocoResult {
    pub image_id: u64,
    pub file_name: String,
    pub category_id: u64,
    /// `[x, y, width, height]` in original-image pixels.
    pub bbox: [f64; 4],
    pub score: f64,
}

/// COCO result entries of one image's detections.
pub fn coco_results(
    detections: &[Detection],
    labels: &Labels,
    image_id: u64,
    file_name: &str,
) -> Vec<CocoResult> {
    detections
        .iter()
        .map(|d| {
            let [x1, y1, x2, y2] = d.bbox.map(|v| v as f64);
            CocoResult {
                image_id,
                file_name: file_name.to_string(),
                category_id: labels.category_id(d.label),
                bbox: [x1, y1, x2 - x1, y2 - y1],
                score: d.score as f64,
            }
        })
        .collect()
}

/// "2 persons, 1 dog" (counts per class, most frequent first), or "no detections".
pub fn summary(detections: &[Detection], labels: &Labels) -> String {
    if detections.is_empty() {
        return "no detections".into();
    }
    let mut counts: Vec<(String, usize)> = Vec::new();
    for d in detections {
        let name = labels.name(d.label);
        match counts.iter_mut().find(|(n, _)| n == name) {
            Some((_, c)) => *c += 1,
            None => counts.push((name.to_string(), 1)),
        }
    }
    counts.sort_by_key(|&(_, n)| std::cmp::Reverse(n));
    counts
        .iter()
        .map(|(name, n)| {
            if *n == 1 {
                format!("1 {name}")
            } else {
                format!("{n} {name}s")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A readable table: rank, class, score and the box corners in image pixels; at most `max_rows`
/// rows, then a line counting the rest (the JSON keeps all).
pub fn table(detections: &[Detection], labels: &Labels, max_rows: usize) -> String {
    if detections.is_empty() || max_rows == 0 {
        return String::new();
    }
    let name_width = detections
        .iter()
        .map(|d| labels.name(d.label).len())
        .max()
        .unwrap_or(5)
        .max(5);
    let mut out = format!(
        "  {:>3}  {:<name_width$}  {:>5}  {:>7} {:>7} {:>7} {:>7}\n",
        "#", "class", "score", "x1", "y1", "x2", "y2"
    );
    for (i, d) in detections.iter().take(max_rows).enumerate() {
        let [x1, y1, x2, y2] = d.bbox;
        out += &format!(
            "  {:>3}  {:<name_width$}  {:>5.3}  {x1:>7.1} {y1:>7.1} {x2:>7.1} {y2:>7.1}\n",
            i + 1,
            labels.name(d.label),
            d.score
        );
    }
    if detections.len() > max_rows {
        out += &format!(
            "  … and {} more (all in --json)\n",
            detections.len() - max_rows
        );
    }
    out
}

/// A distinct, saturated colour per label.
fn color(label: usize) -> Rgb<u8> {
    const PALETTE: [[u8; 3]; 10] = [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
    ];
    Rgb(PALETTE[label % PALETTE.len()])
}

/// Draws each detection as a box outline with "class score" on a filled tag above it.
pub fn draw(image: &mut RgbImage, detections: &[Detection], labels: &Labels) {
    let thickness = (image.width().max(image.height()) / 300).max(2);
    let scale = text_px_for(image.width(), image.height());
    if detections.is_empty() {
        // Say so on the picture, so it is not mistaken for the input.
        let (tw, th) = text_size("no detections", scale);
        fill_rect(image, 0, 0, tw + 8, th + 8, Rgb([0, 0, 0]));
        draw_text(image, 4, 4, "no detections", scale, Rgb([255, 255, 255]));
        return;
    }
    // Tags are placed best score first, each at the first spot that overlaps no placed tag: above the
    // box, else inside it, stepping down one tag height at a time (the box's top if none is free).
    let pad = 2u32;
    let mut placed: Vec<(i64, i64, i64, i64)> = Vec::new();
    let mut tags = Vec::with_capacity(detections.len());
    for d in detections {
        let [x1, y1, _, y2] = d.bbox.map(|v| v.round() as i64);
        let text = format!("{} {:.2}", labels.name(d.label), d.score);
        let (tw, th) = text_size(&text, scale);
        let (tag_w, tag_h) = ((tw + 2 * pad) as i64, (th + 2 * pad) as i64);
        // Keep the tag inside the picture.
        let x = x1.min(image.width() as i64 - tag_w).max(0);
        let free = |y: i64| {
            placed.iter().all(|&(px, py, pw, ph)| {
                x + tag_w <= px || px + pw <= x || y + tag_h <= py || py + ph <= y
            })
        };
        let above = y1 - tag_h;
        let candidates = std::iter::once(above).filter(|&y| y >= 0).chain(
            (0..)
                .map(|k| y1.max(0) + k * tag_h)
                .take_while(|&y| y + tag_h <= y2.max(y1 + tag_h)),
        );
        let y = candidates
            .clone()
            .find(|&y| free(y))
            .unwrap_or(if above >= 0 { above } else { y1.max(0) });
        placed.push((x, y, tag_w, tag_h));
        tags.push((text, x, y, tag_w as u32, tag_h as u32));
    }
    // Lowest scores first so the best boxes and tags end up on top.
    for (d, (text, x, y, tag_w, tag_h)) in detections.iter().zip(tags).rev() {
        let c = color(d.label);
        let [x1, y1, x2, y2] = d.bbox.map(|v| v.round() as i64);
        let (w, h) = ((x2 - x1).max(1) as u32, (y2 - y1).max(1) as u32);
        fill_rect(image, x1, y1, w, thickness, c);
        fill_rect(image, x1, y2 - thickness as i64, w, thickness, c);
        fill_rect(image, x1, y1, thickness, h, c);
        fill_rect(image, x2 - thickness as i64, y1, thickness, h, c);
        fill_rect(image, x, y, tag_w, tag_h, c);
        let luma = 0.299 * c[0] as f32 + 0.587 * c[1] as f32 + 0.114 * c[2] as f32;
        let ink = if luma > 140.0 {
            Rgb([0, 0, 0])
        } else {
            Rgb([255, 255, 255])
        };
        draw_text(image, x + pad as i64, y + pad as i64, &text, scale, ink);
    }
}
