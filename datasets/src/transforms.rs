//! Training transforms that move boxes and label masks together with the image. Every random
//! choice comes from the `SampleRng` passed in, so a pipeline is deterministic given a seed.

use crate::io::LabelMap;
use crate::segmentation::IGNORE_INDEX;
use image::RgbImage;
use rand::{Rng, SeedableRng};

/// The RNG of the transforms and the loader.
pub type SampleRng = rand_chacha::ChaCha8Rng;

/// A seeded RNG for one sample: independent of thread scheduling and batch composition.
pub fn sample_rng(seed: u64, epoch: u64, index: u64) -> SampleRng {
    let mut rng = SampleRng::seed_from_u64(seed);
    rng.set_stream(epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index);
    rng
}

/// An RGB image in HWC order with values in 0..=255 as f32 (so photometric changes are not
/// quantised between steps).
#[derive(Clone, Debug, PartialEq)]
pub struct ImageF32 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

impl ImageF32 {
    pub fn from_rgb(image: &RgbImage) -> Self {
        Self {
            width: image.width() as usize,
            height: image.height() as usize,
            data: image.as_raw().iter().map(|&v| v as f32).collect(),
        }
    }

    pub fn to_rgb(&self) -> RgbImage {
        let data = self
            .data
            .iter()
            .map(|&v| v.round().clamp(0.0, 255.0) as u8)
            .collect();
        RgbImage::from_raw(self.width as u32, self.height as u32, data)
            .expect("buffer matches the size")
    }

    fn pixel(&self, x: usize, y: usize) -> &[f32] {
        let i = (y * self.width + x) * 3;
        &self.data[i..i + 3]
    }
}

/// One training example: image, boxes `[x1, y1, x2, y2]` in pixels with their labels, and an
/// optional label map (segmentation; 255 = ignored).
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub image: ImageF32,
    pub boxes: Vec<[f32; 4]>,
    pub labels: Vec<u32>,
    pub mask: Option<LabelMap>,
}

impl Sample {
    pub fn new(image: &RgbImage) -> Self {
        Self {
            image: ImageF32::from_rgb(image),
            boxes: Vec::new(),
            labels: Vec::new(),
            mask: None,
        }
    }

    pub fn width(&self) -> usize {
        self.image.width
    }

    pub fn height(&self) -> usize {
        self.image.height
    }
}

/// A step of an augmentation pipeline.
pub trait Transform: Send + Sync {
    fn apply(&self, sample: Sample, rng: &mut SampleRng) -> Sample;
}

/// Transforms applied in order.
#[derive(Default)]
pub struct Compose(pub Vec<Box<dyn Transform>>);

impl Compose {
    /// torchvision's SSDLite training recipe: photometric distortion, zoom-out (canvas filled
    /// with `fill`, RGB in 0..=255, e.g. the dataset mean), IoU crop, horizontal flip, then a
    /// resize to `size` x `size`.
    pub fn ssd_train(size: usize, fill: [f32; 3]) -> Self {
        Self(vec![
            Box::new(PhotometricDistort::default()),
            Box::new(RandomZoomOut {
                fill,
                ..RandomZoomOut::default()
            }),
            Box::new(RandomIoUCrop::default()),
            Box::new(RandomHorizontalFlip { p: 0.5 }),
            Box::new(Resize {
                width: size,
                height: size,
            }),
        ])
    }

    /// mmsegmentation's training recipe: random rescale (ratio 0.5..2 of `scale`), random crop
    /// of `crop` x `crop` (padded with 0 / 255), flip, photometric distortion.
    pub fn seg_train(scale: (usize, usize), crop: usize) -> Self {
        Self(vec![
            Box::new(RandomScaleCrop {
                scale,
                crop: (crop, crop),
                ..RandomScaleCrop::default()
            }),
            Box::new(RandomHorizontalFlip { p: 0.5 }),
            Box::new(PhotometricDistort::default()),
        ])
    }
}

impl Transform for Compose {
    fn apply(&self, mut sample: Sample, rng: &mut SampleRng) -> Sample {
        for transform in &self.0 {
            sample = transform.apply(sample, rng);
        }
        sample
    }
}

/// Resizes to exactly `width` x `height` (bilinear, `align_corners=False`, no antialias; masks
/// nearest), scaling boxes.
#[derive(Clone, Copy, Debug)]
pub struct Resize {
    pub width: usize,
    pub height: usize,
}

impl Transform for Resize {
    fn apply(&self, sample: Sample, _rng: &mut SampleRng) -> Sample {
        resize(sample, self.width, self.height)
    }
}

pub fn resize(mut sample: Sample, width: usize, height: usize) -> Sample {
    if (width, height) == (sample.width(), sample.height()) {
        return sample;
    }
    let sx = width as f32 / sample.width() as f32;
    let sy = height as f32 / sample.height() as f32;
    for b in sample.boxes.iter_mut() {
        *b = [b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy];
    }
    sample.image = resize_bilinear(&sample.image, width, height);
    sample.mask = sample
        .mask
        .map(|m| resize_nearest(&m, width as u32, height as u32));
    sample
}

/// `F.interpolate(mode="bilinear", align_corners=False)` without antialias.
pub fn resize_bilinear(image: &ImageF32, width: usize, height: usize) -> ImageF32 {
    let taps = |out: usize, input: usize| -> Vec<(usize, usize, f32)> {
        let scale = input as f32 / out as f32;
        (0..out)
            .map(|o| {
                let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (src.floor() as usize).min(input - 1);
                let i1 = (i0 + 1).min(input - 1);
                (i0, i1, src - i0 as f32)
            })
            .collect()
    };
    let xs = taps(width, image.width);
    let ys = taps(height, image.height);
    let mut data = Vec::with_capacity(width * height * 3);
    for &(y0, y1, fy) in &ys {
        for &(x0, x1, fx) in &xs {
            let (a, b) = (image.pixel(x0, y0), image.pixel(x1, y0));
            let (c, d) = (image.pixel(x0, y1), image.pixel(x1, y1));
            for ch in 0..3 {
                let top = a[ch] + (b[ch] - a[ch]) * fx;
                let bottom = c[ch] + (d[ch] - c[ch]) * fx;
                data.push(top + (bottom - top) * fy);
            }
        }
    }
    ImageF32 {
        width,
        height,
        data,
    }
}

/// Nearest-neighbour resize of a label map (`F.interpolate(mode="nearest")`).
pub fn resize_nearest(map: &LabelMap, width: u32, height: u32) -> LabelMap {
    let sx = map.width as f64 / width as f64;
    let sy = map.height as f64 / height as f64;
    let mut out = LabelMap::new(width, height, 0);
    for y in 0..height {
        let src_y = ((y as f64 * sy).floor() as u32).min(map.height - 1);
        for x in 0..width {
            let src_x = ((x as f64 * sx).floor() as u32).min(map.width - 1);
            out.data[(y * width + x) as usize] = map.get(src_x, src_y);
        }
    }
    out
}

/// Mirrors left-right with probability `p`.
#[derive(Clone, Copy, Debug)]
pub struct RandomHorizontalFlip {
    pub p: f64,
}

impl Transform for RandomHorizontalFlip {
    fn apply(&self, sample: Sample, rng: &mut SampleRng) -> Sample {
        if rng.random::<f64>() < self.p {
            horizontal_flip(sample)
        } else {
            sample
        }
    }
}

pub fn horizontal_flip(mut sample: Sample) -> Sample {
    let w = sample.width();
    for row in sample.image.data.chunks_exact_mut(w * 3) {
        row.reverse();
        // Reversing the row reversed each pixel's channels too; restore RGB order.
        for pixel in row.chunks_exact_mut(3) {
            pixel.swap(0, 2);
        }
    }
    let wf = w as f32;
    for b in sample.boxes.iter_mut() {
        *b = [wf - b[2], b[1], wf - b[0], b[3]];
    }
    if let Some(mask) = sample.mask.as_mut() {
        for row in mask.data.chunks_mut(mask.width as usize) {
            row.reverse();
        }
    }
    sample
}

/// Crops `[left, left + width) x [top, top + height)`; the region may extend past the image, the
/// outside is filled with `fill` (image) and 255 (mask). Boxes are shifted and clamped; boxes
/// left with no area are removed.
pub fn crop(
    mut sample: Sample,
    left: i64,
    top: i64,
    width: usize,
    height: usize,
    fill: [f32; 3],
) -> Sample {
    let (w, h) = (sample.width() as i64, sample.height() as i64);
    // Source columns [x0, x1) land at destination columns [x0 - left, x1 - left).
    let x0 = left.clamp(0, w);
    let x1 = (left + width as i64).clamp(0, w);
    let columns = (x1 - x0).max(0) as usize;
    let dst_x = (x0 - left).max(0) as usize;
    let mut data: Vec<f32> = fill
        .iter()
        .copied()
        .cycle()
        .take(width * height * 3)
        .collect();
    for y in 0..height {
        let sy = y as i64 + top;
        if sy < 0 || sy >= h || columns == 0 {
            continue;
        }
        let src = (sy as usize * w as usize + x0 as usize) * 3;
        let dst = (y * width + dst_x) * 3;
        data[dst..dst + columns * 3].copy_from_slice(&sample.image.data[src..src + columns * 3]);
    }
    sample.image = ImageF32 {
        width,
        height,
        data,
    };
    if let Some(mask) = sample.mask.take() {
        let mut out = LabelMap::new(width as u32, height as u32, IGNORE_INDEX);
        for y in 0..height {
            let sy = y as i64 + top;
            if sy < 0 || sy >= h || columns == 0 {
                continue;
            }
            let src = sy as usize * w as usize + x0 as usize;
            let dst = y * width + dst_x;
            out.data[dst..dst + columns].copy_from_slice(&mask.data[src..src + columns]);
        }
        sample.mask = Some(out);
    }
    let (l, t) = (left as f32, top as f32);
    let (cw, ch) = (width as f32, height as f32);
    let mut boxes = Vec::with_capacity(sample.boxes.len());
    let mut labels = Vec::with_capacity(sample.labels.len());
    for (b, &label) in sample.boxes.iter().zip(&sample.labels) {
        let moved = [
            (b[0] - l).clamp(0.0, cw),
            (b[1] - t).clamp(0.0, ch),
            (b[2] - l).clamp(0.0, cw),
            (b[3] - t).clamp(0.0, ch),
        ];
        if moved[2] > moved[0] && moved[3] > moved[1] {
            boxes.push(moved);
            labels.push(label);
        }
    }
    sample.boxes = boxes;
    sample.labels = labels;
    sample
}

/// SSD's "expand": with probability `p`, places the image at a random spot of a canvas
/// `ratio` in `side_range` times larger, filled with `fill` (torchvision `RandomZoomOut`).
#[derive(Clone, Copy, Debug)]
pub struct RandomZoomOut {
    pub fill: [f32; 3],
    pub side_range: (f32, f32),
    pub p: f64,
}

impl Default for RandomZoomOut {
    fn default() -> Self {
        Self {
            fill: [0.0; 3],
            side_range: (1.0, 4.0),
            p: 0.5,
        }
    }
}

impl Transform for RandomZoomOut {
    fn apply(&self, sample: Sample, rng: &mut SampleRng) -> Sample {
        if rng.random::<f64>() >= self.p {
            return sample;
        }
        let (w, h) = (sample.width(), sample.height());
        let ratio =
            self.side_range.0 + rng.random::<f32>() * (self.side_range.1 - self.side_range.0);
        let (canvas_w, canvas_h) = ((w as f32 * ratio) as usize, (h as f32 * ratio) as usize);
        let left = ((canvas_w - w) as f32 * rng.random::<f32>()) as i64;
        let top = ((canvas_h - h) as f32 * rng.random::<f32>()) as i64;
        crop(sample, -left, -top, canvas_w, canvas_h, self.fill)
    }
}

/// SSD's random crop with a minimum IoU, with torchvision's `RandomIoUCrop` semantics: pick a
/// minimum IoU from `sampler_options` (1.0 = keep the image); try `trials` crops of scale
/// `scale` and aspect `aspect`; a crop is accepted when some box centre lies strictly inside it
/// and the best IoU of those boxes with the crop reaches the minimum; only boxes whose centre is
/// inside are kept, clamped to the crop.
#[derive(Clone, Debug)]
pub struct RandomIoUCrop {
    pub scale: (f32, f32),
    pub aspect: (f32, f32),
    pub sampler_options: Vec<f32>,
    pub trials: usize,
}

impl Default for RandomIoUCrop {
    fn default() -> Self {
        Self {
            scale: (0.3, 1.0),
            aspect: (0.5, 2.0),
            sampler_options: vec![0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0],
            trials: 40,
        }
    }
}

/// torchvision loops until a crop is found; this bound only guards images without boxes.
const IOU_CROP_MAX_ROUNDS: usize = 1000;

impl Transform for RandomIoUCrop {
    fn apply(&self, sample: Sample, rng: &mut SampleRng) -> Sample {
        let (w, h) = (sample.width() as f32, sample.height() as f32);
        for _ in 0..IOU_CROP_MAX_ROUNDS {
            let min_iou = self.sampler_options[rng.random_range(0..self.sampler_options.len())];
            if min_iou >= 1.0 {
                return sample;
            }
            for _ in 0..self.trials {
                let rw = self.scale.0 + (self.scale.1 - self.scale.0) * rng.random::<f32>();
                let rh = self.scale.0 + (self.scale.1 - self.scale.0) * rng.random::<f32>();
                let new_w = (w * rw) as i64;
                let new_h = (h * rh) as i64;
                if new_h == 0 {
                    continue;
                }
                let aspect = new_w as f32 / new_h as f32;
                if !(self.aspect.0 <= aspect && aspect <= self.aspect.1) {
                    continue;
                }
                let left = ((w - new_w as f32) * rng.random::<f32>()) as i64;
                let top = ((h - new_h as f32) * rng.random::<f32>()) as i64;
                let (right, bottom) = (left + new_w, top + new_h);
                if left == right || top == bottom {
                    continue;
                }
                let region = [left as f32, top as f32, right as f32, bottom as f32];
                let inside: Vec<usize> = (0..sample.boxes.len())
                    .filter(|&i| {
                        let b = sample.boxes[i];
                        let (cx, cy) = (0.5 * (b[0] + b[2]), 0.5 * (b[1] + b[3]));
                        region[0] < cx && cx < region[2] && region[1] < cy && cy < region[3]
                    })
                    .collect();
                if inside.is_empty() {
                    continue;
                }
                let best = inside
                    .iter()
                    .map(|&i| box_iou(&sample.boxes[i], &region))
                    .fold(f32::MIN, f32::max);
                if best < min_iou {
                    continue;
                }
                let mut sample = sample;
                sample.boxes = inside.iter().map(|&i| sample.boxes[i]).collect();
                sample.labels = inside.iter().map(|&i| sample.labels[i]).collect();
                // A centre strictly inside keeps a positive area after clamping, so `crop` drops none.
                return crop(sample, left, top, new_w as usize, new_h as usize, [0.0; 3]);
            }
        }
        sample
    }
}

/// IoU of two `[x1, y1, x2, y2]` boxes (no +1).
pub fn box_iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union <= 0.0 {
        0.0
    } else {
        inter / union
    }
}

/// mmsegmentation's `RandomResize` + `RandomCrop`: rescale keeping the aspect ratio so the image
/// fits `scale` (long, short) times a ratio drawn from `ratio_range`, then crop `crop`
/// (width, height) at a random spot, retrying up to 10 times while one class covers more than
/// `cat_max_ratio` of the crop; smaller images are padded (image 0, mask 255).
#[derive(Clone, Copy, Debug)]
pub struct RandomScaleCrop {
    pub scale: (usize, usize),
    pub ratio_range: (f32, f32),
    pub crop: (usize, usize),
    pub cat_max_ratio: f32,
}

impl Default for RandomScaleCrop {
    fn default() -> Self {
        Self {
            scale: (2048, 512),
            ratio_range: (0.5, 2.0),
            crop: (512, 512),
            cat_max_ratio: 0.75,
        }
    }
}

impl Transform for RandomScaleCrop {
    fn apply(&self, sample: Sample, rng: &mut SampleRng) -> Sample {
        let ratio =
            self.ratio_range.0 + rng.random::<f32>() * (self.ratio_range.1 - self.ratio_range.0);
        let (long, short) = (self.scale.0 as f32 * ratio, self.scale.1 as f32 * ratio);
        let (w, h) = (sample.width() as f32, sample.height() as f32);
        let factor = (long / w.max(h)).min(short / w.min(h));
        let new_w = ((w * factor + 0.5) as usize).max(1);
        let new_h = ((h * factor + 0.5) as usize).max(1);
        let sample = resize(sample, new_w, new_h);
        let (crop_w, crop_h) = self.crop;
        let margin_w = new_w.saturating_sub(crop_w);
        let margin_h = new_h.saturating_sub(crop_h);
        let mut offset = (0, 0);
        for _ in 0..10 {
            offset = (
                rng.random_range(0..=margin_w),
                rng.random_range(0..=margin_h),
            );
            if self.cat_max_ratio >= 1.0
                || !dominated(&sample, offset, self.crop, self.cat_max_ratio)
            {
                break;
            }
        }
        crop(
            sample,
            offset.0 as i64,
            offset.1 as i64,
            crop_w,
            crop_h,
            [0.0; 3],
        )
    }
}

/// Whether one non-ignored class covers more than `max_ratio` of the crop window.
fn dominated(
    sample: &Sample,
    (left, top): (usize, usize),
    (cw, ch): (usize, usize),
    max_ratio: f32,
) -> bool {
    let Some(mask) = &sample.mask else {
        return false;
    };
    let mut counts = [0u64; 256];
    let (w, h) = (mask.width as usize, mask.height as usize);
    for y in top..(top + ch).min(h) {
        for &v in &mask.data[y * w + left..y * w + (left + cw).min(w)] {
            counts[v as usize] += 1;
        }
    }
    counts[IGNORE_INDEX as usize] = 0;
    let present: Vec<u64> = counts.iter().copied().filter(|&c| c > 0).collect();
    let total: u64 = present.iter().sum();
    present.len() > 1 && (*present.iter().max().unwrap() as f32) / (total as f32) >= max_ratio
}

/// mmsegmentation's `PhotoMetricDistortion` (SSD's recipe): each with probability 0.5, random
/// brightness (+-`brightness_delta`), contrast (`contrast_range`, before or after the colour
/// steps), saturation (`saturation_range`) and hue (+-`hue_delta` degrees; mmseg's 18 is in
/// OpenCV's 0..180 hue units, i.e. 36 degrees). Values stay f32 between steps (mmseg rounds to
/// u8 after each), so it matches mmseg in distribution, not bit for bit.
#[derive(Clone, Copy, Debug)]
pub struct PhotometricDistort {
    pub brightness_delta: f32,
    pub contrast_range: (f32, f32),
    pub saturation_range: (f32, f32),
    pub hue_delta: f32,
}

impl Default for PhotometricDistort {
    fn default() -> Self {
        Self {
            brightness_delta: 32.0,
            contrast_range: (0.5, 1.5),
            saturation_range: (0.5, 1.5),
            hue_delta: 36.0,
        }
    }
}

impl Transform for PhotometricDistort {
    fn apply(&self, mut sample: Sample, rng: &mut SampleRng) -> Sample {
        let data = &mut sample.image.data;
        if rng.random::<f64>() < 0.5 {
            let delta = rng.random_range(-self.brightness_delta..=self.brightness_delta);
            data.iter_mut()
                .for_each(|v| *v = (*v + delta).clamp(0.0, 255.0));
        }
        let contrast_first = rng.random::<f64>() < 0.5;
        let contrast = |data: &mut Vec<f32>, rng: &mut SampleRng| {
            if rng.random::<f64>() < 0.5 {
                let alpha = rng.random_range(self.contrast_range.0..=self.contrast_range.1);
                data.iter_mut()
                    .for_each(|v| *v = (*v * alpha).clamp(0.0, 255.0));
            }
        };
        if contrast_first {
            contrast(data, rng);
        }
        let saturation = (rng.random::<f64>() < 0.5)
            .then(|| rng.random_range(self.saturation_range.0..=self.saturation_range.1));
        let hue =
            (rng.random::<f64>() < 0.5).then(|| rng.random_range(-self.hue_delta..=self.hue_delta));
        if saturation.is_some() || hue.is_some() {
            for pixel in data.chunks_mut(3) {
                let (mut hh, mut s, v) = rgb_to_hsv(pixel[0], pixel[1], pixel[2]);
                if let Some(factor) = saturation {
                    s = (s * factor).clamp(0.0, 1.0);
                }
                if let Some(delta) = hue {
                    hh = (hh + delta).rem_euclid(360.0);
                }
                let (r, g, b) = hsv_to_rgb(hh, s, v);
                pixel.copy_from_slice(&[r, g, b]);
            }
        }
        if !contrast_first {
            contrast(data, rng);
        }
        sample
    }
}

/// RGB (0..255) to HSV with hue in degrees, saturation in 0..1, value in 0..255.
fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let delta = max - min;
    let s = if max > 0.0 { delta / max } else { 0.0 };
    let h = if delta == 0.0 {
        0.0
    } else if max == r {
        60.0 * ((g - b) / delta).rem_euclid(6.0)
    } else if max == g {
        60.0 * ((b - r) / delta + 2.0)
    } else {
        60.0 * ((r - g) / delta + 4.0)
    };
    (h, s, max)
}

fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let c = v * s;
    let x = c * (1.0 - ((h / 60.0).rem_euclid(2.0) - 1.0).abs());
    let m = v - c;
    let (r, g, b) = match (h / 60.0) as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    (r + m, g + m, b + m)
}
