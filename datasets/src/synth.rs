//! A synthetic "shapes" dataset written in the real formats, so every command can be run and
//! tested end to end without downloads.
//!
//! Conventions (checked by the tests):
//! - Shapes are painted in order, later shapes over earlier ones. An annotation describes the
//!   *visible* part: `area` = visible pixel count, `bbox` = tight box of the visible pixels.
//! - Fully visible shapes are stored as one polygon, rasterised with pycocotools' algorithm, so
//!   pycocotools' mask of the polygon equals the painted pixels. Partly hidden shapes are stored
//!   as a compressed RLE of their visible pixels (`iscrowd` 0).
//! - Shapes with less than `MIN_VISIBLE_FRACTION` of their pixels (or fewer than
//!   `MIN_VISIBLE_PIXELS`) visible get no annotation; their pixels keep their class in the
//!   semantic masks.
//! - Crowd regions (a cluster of tiny shapes of one class) are one `iscrowd` 1 annotation with an
//!   uncompressed RLE (`counts` as a list), as COCO stores crowds.
//! - Semantic masks: 0 background, 1..=7 shape classes (VOC palette PNG; ADE20K-style greyscale
//!   PNG where 0 is "other" and is ignored after `reduce_zero_label`).

use crate::coco::{CocoAnnotation, CocoCategory, CocoFile, CocoImage, RleCounts, Segmentation};
use crate::error::{DatasetError, Result};
use crate::io::{encode_label_png, voc_palette, write_atomic, LabelMap};
use crate::mask::Rle;
use crate::segmentation::CLASS_NAMES_FILE;
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::f64::consts::PI;
use std::path::Path;

/// Shape classes; label `i + 1` (and COCO category id `i + 1`) is `SHAPE_CLASSES[i]`.
pub const SHAPE_CLASSES: [&str; 7] = [
    "circle", "square", "triangle", "star", "hexagon", "ellipse", "cross",
];
pub const MIN_VISIBLE_FRACTION: f64 = 0.3;
pub const MIN_VISIBLE_PIXELS: u64 = 20;
const MAX_SHAPE_FRACTION: f64 = 0.8;
const CROWD_PROBABILITY: f64 = 0.12;

#[derive(Clone, Debug)]
pub struct SynthConfig {
    pub images: usize,
    pub seed: u64,
    /// Width and height of every image.
    pub size: u32,
    /// Share of images in the validation split (the last ones).
    pub val_fraction: f64,
    /// Smallest shape diameter in pixels (sizes are log-uniform up to 0.8 of the image).
    pub min_object_size: f64,
    /// Shapes per image are uniform in 1..=max_objects (plus, sometimes, one crowd region).
    pub max_objects: u32,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            images: 100,
            seed: 0,
            size: 320,
            val_fraction: 0.2,
            min_object_size: 12.0,
            max_objects: 10,
        }
    }
}

impl SynthConfig {
    pub fn num_val(&self) -> usize {
        ((self.images as f64 * self.val_fraction).round() as usize).min(self.images)
    }
}

/// One annotated object of a synthetic image.
#[derive(Clone, Debug)]
pub struct SynthObject {
    /// 1..=7, index into `SHAPE_CLASSES` plus one.
    pub label: u32,
    pub iscrowd: bool,
    /// Visible pixels.
    pub mask: Rle,
    pub segmentation: Segmentation,
    pub area: u64,
    /// `[x, y, w, h]` of the visible pixels.
    pub bbox: [f64; 4],
}

/// A generated image with its annotations and semantic labels (0 background, 1..=7).
#[derive(Clone, Debug)]
pub struct SynthImage {
    pub image: RgbImage,
    pub labels: LabelMap,
    pub objects: Vec<SynthObject>,
}

/// Generates image `index` of the dataset described by `config` (the same image
/// `write_dataset` writes), entirely in memory.
pub fn generate_image(config: &SynthConfig, index: u64) -> SynthImage {
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    rng.set_stream(index);
    let size = config.size;
    let s = size as f64;
    let mut painted: Vec<(u32, bool, Vec<Vec<f64>>, Paint)> = Vec::new();
    let count = rng.random_range(1..=config.max_objects.max(1));
    let crowd_at = (rng.random::<f64>() < CROWD_PROBABILITY).then(|| rng.random_range(0..=count));
    let background = Background::random(&mut rng);
    for i in 0..=count {
        if crowd_at == Some(i) {
            let label = rng.random_range(1..=SHAPE_CLASSES.len() as u32);
            let (cx, cy) = (
                rng.random_range(0.2 * s..0.8 * s),
                rng.random_range(0.2 * s..0.8 * s),
            );
            let spread = rng.random_range(0.06 * s..0.15 * s);
            let polygons = (0..rng.random_range(8..=16))
                .map(|_| {
                    let d = rng.random_range(5.0..10.0);
                    let x = (cx + rng.random_range(-spread..spread)).clamp(d, s - d);
                    let y = (cy + rng.random_range(-spread..spread)).clamp(d, s - d);
                    let angle = rng.random_range(0.0..2.0 * PI);
                    shape_polygon(label, x, y, d, angle, &mut rng)
                })
                .collect();
            painted.push((label, true, polygons, Paint::random(&mut rng, &background)));
        }
        if i == count {
            break;
        }
        let label = rng.random_range(1..=SHAPE_CLASSES.len() as u32);
        let min = config.min_object_size.max(1.0);
        let max = (MAX_SHAPE_FRACTION * s).max(min + 1.0);
        // Log-uniform sizes: as many small shapes as large ones.
        let d = (rng.random_range(min.ln()..max.ln())).exp();
        let r = d / 2.0;
        let x = rng.random_range(r..=s - r);
        let y = rng.random_range(r..=s - r);
        let angle = rng.random_range(0.0..2.0 * PI);
        let polygon = shape_polygon(label, x, y, d, angle, &mut rng);
        painted.push((
            label,
            false,
            vec![polygon],
            Paint::random(&mut rng, &background),
        ));
    }

    // Paint: the owner of each pixel is the last shape covering it.
    let n = size as usize;
    let mut owner = vec![0u16; n * n];
    let mut full_areas = Vec::with_capacity(painted.len());
    for (k, (_, _, polygons, _)) in painted.iter().enumerate() {
        let parts: Vec<Rle> = polygons
            .iter()
            .map(|p| Rle::from_polygon(p, size, size))
            .collect();
        let mask = Rle::union(&parts).expect("at least one polygon").to_mask();
        let mut area = 0u64;
        for (o, &m) in owner.iter_mut().zip(&mask) {
            if m != 0 {
                *o = k as u16 + 1;
                area += 1;
            }
        }
        full_areas.push(area);
    }

    let mut image = RgbImage::new(size, size);
    let mut labels = LabelMap::new(size, size, 0);
    let noise = rng.random_range(0.0..12.0);
    for y in 0..n {
        for x in 0..n {
            let k = owner[y * n + x] as usize;
            let colour = if k == 0 {
                background.colour(x as f64, y as f64)
            } else {
                labels.data[y * n + x] = painted[k - 1].0 as u8;
                painted[k - 1].3.colour(x as f64, y as f64)
            };
            let pixel = colour.map(|c| {
                let jitter = (rng.random::<f64>() - 0.5) * 2.0 * noise;
                (c + jitter).round().clamp(0.0, 255.0) as u8
            });
            image.put_pixel(x as u32, y as u32, image::Rgb(pixel));
        }
    }

    let mut objects = Vec::new();
    for (k, (label, iscrowd, polygons, _)) in painted.into_iter().enumerate() {
        let visible: Vec<u8> = owner.iter().map(|&o| (o as usize == k + 1) as u8).collect();
        let mask = Rle::from_mask(&visible, size, size);
        let area = mask.area();
        let full = full_areas[k];
        if area < MIN_VISIBLE_PIXELS || (area as f64) < MIN_VISIBLE_FRACTION * full as f64 {
            continue;
        }
        let segmentation = if iscrowd {
            Segmentation::Rle {
                size: [size, size],
                counts: RleCounts::Runs(mask.counts.clone()),
            }
        } else if area == full {
            Segmentation::Polygons(polygons)
        } else {
            Segmentation::Rle {
                size: [size, size],
                counts: RleCounts::Compressed(mask.to_compressed()),
            }
        };
        objects.push(SynthObject {
            label,
            iscrowd,
            bbox: mask.bbox(),
            mask,
            segmentation,
            area,
        });
    }
    SynthImage {
        image,
        labels,
        objects,
    }
}

/// A polygon for a shape of class `label` with overall size `d` (circumscribed diameter),
/// centred at (x, y), rotated by `angle`; coordinates rounded to 0.01 px as COCO stores them.
fn shape_polygon(label: u32, x: f64, y: f64, d: f64, angle: f64, rng: &mut ChaCha8Rng) -> Vec<f64> {
    let r = d / 2.0;
    let smooth = ((r * 1.5) as usize).clamp(20, 96);
    let points: Vec<(f64, f64)> = match SHAPE_CLASSES[label as usize - 1] {
        "circle" => regular(smooth, r, 0.0),
        "square" => regular(4, r, PI / 4.0),
        "triangle" => regular(3, r, -PI / 2.0),
        "hexagon" => regular(6, r, 0.0),
        "star" => (0..10)
            .map(|i| {
                let radius = if i % 2 == 0 { r } else { 0.42 * r };
                let t = -PI / 2.0 + i as f64 * PI / 5.0;
                (radius * t.cos(), radius * t.sin())
            })
            .collect(),
        "ellipse" => {
            let minor = rng.random_range(0.35..0.6) * r;
            (0..smooth)
                .map(|i| {
                    let t = i as f64 * 2.0 * PI / smooth as f64;
                    (r * t.cos(), minor * t.sin())
                })
                .collect()
        }
        "cross" => {
            let t = 0.3 * r;
            [(t, r), (t, t), (r, t), (r, -t), (t, -t), (t, -r)]
                .into_iter()
                .chain([(-t, -r), (-t, -t), (-r, -t), (-r, t), (-t, t), (-t, r)])
                .collect()
        }
        other => unreachable!("unknown shape {other}"),
    };
    let (sin, cos) = angle.sin_cos();
    points
        .into_iter()
        .flat_map(|(px, py)| {
            let rx = x + px * cos - py * sin;
            let ry = y + px * sin + py * cos;
            [(rx * 100.0).round() / 100.0, (ry * 100.0).round() / 100.0]
        })
        .collect()
}

fn regular(n: usize, r: f64, phase: f64) -> Vec<(f64, f64)> {
    (0..n)
        .map(|i| {
            let t = phase + i as f64 * 2.0 * PI / n as f64;
            (r * t.cos(), r * t.sin())
        })
        .collect()
}

fn random_colour(rng: &mut ChaCha8Rng) -> [f64; 3] {
    [0; 3].map(|_| rng.random_range(0.0..255.0))
}

fn distance(a: [f64; 3], b: [f64; 3]) -> f64 {
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Textured background: a gradient, stripes, smooth blobs or a checkerboard between two colours.
struct Background {
    kind: u32,
    a: [f64; 3],
    b: [f64; 3],
    angle: f64,
    period: f64,
}

impl Background {
    fn random(rng: &mut ChaCha8Rng) -> Self {
        Self {
            kind: rng.random_range(0..4),
            a: random_colour(rng),
            b: random_colour(rng),
            angle: rng.random_range(0.0..PI),
            period: rng.random_range(6.0..60.0),
        }
    }

    fn mean(&self) -> [f64; 3] {
        [0, 1, 2].map(|c| 0.5 * (self.a[c] + self.b[c]))
    }

    fn colour(&self, x: f64, y: f64) -> [f64; 3] {
        let (sin, cos) = self.angle.sin_cos();
        let u = x * cos + y * sin;
        let v = -x * sin + y * cos;
        let t = match self.kind {
            0 => (u / 400.0).clamp(0.0, 1.0),
            1 => ((u / self.period * 2.0 * PI).sin() > 0.0) as u8 as f64,
            2 => 0.5 + 0.25 * ((u / self.period).sin() + (v / (1.3 * self.period)).cos()),
            _ => (((u / self.period).floor() + (v / self.period).floor()) as i64).rem_euclid(2)
                as f64,
        };
        [0, 1, 2].map(|c| self.a[c] + (self.b[c] - self.a[c]) * t)
    }
}

/// A shape's fill: a colour that stands out from the background, with a soft linear shading.
struct Paint {
    colour: [f64; 3],
    shade: f64,
    angle: f64,
}

impl Paint {
    fn random(rng: &mut ChaCha8Rng, background: &Background) -> Self {
        let mut colour = random_colour(rng);
        for _ in 0..20 {
            if distance(colour, background.mean()) > 90.0 {
                break;
            }
            colour = random_colour(rng);
        }
        Self {
            colour,
            shade: rng.random_range(0.0..0.25),
            angle: rng.random_range(0.0..2.0 * PI),
        }
    }

    fn colour(&self, x: f64, y: f64) -> [f64; 3] {
        let (sin, cos) = self.angle.sin_cos();
        let factor = 1.0 + self.shade * ((x * cos + y * sin) / 60.0).sin();
        self.colour.map(|c| c * factor)
    }
}

/// What `write_dataset` wrote.
#[derive(Clone, Debug, Default)]
pub struct SynthSummary {
    pub train_images: usize,
    pub val_images: usize,
    pub annotations: usize,
    pub crowd: usize,
}

/// Writes the dataset under `out`:
/// - COCO: `annotations/instances_{train,val}.json`, `train/*.jpg`, `val/*.jpg`;
/// - VOC: `VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation/{train,val}.txt}`;
/// - ADE20K: `ADEChallengeData2016/{images,annotations}/{training,validation}`;
/// - `synth.json` with the configuration.
///
/// Images are JPEG (quality 95); the VOC and ADE20K copies are hard links where possible.
/// Every file is written atomically. `progress` is called once per image.
pub fn write_dataset(
    out: &Path,
    config: &SynthConfig,
    progress: &(dyn Fn() + Sync),
) -> Result<SynthSummary> {
    if config.images == 0 || config.size < 32 {
        return Err(DatasetError::invalid(
            out,
            "synthetic dataset needs at least one image of at least 32x32 pixels",
        ));
    }
    if !(config.min_object_size >= 1.0
        && config.min_object_size < MAX_SHAPE_FRACTION * config.size as f64)
    {
        return Err(DatasetError::invalid(
            out,
            format!(
                "minimum object size {} must be in [1, {}) for {} px images",
                config.min_object_size,
                MAX_SHAPE_FRACTION * config.size as f64,
                config.size
            ),
        ));
    }
    let num_train = config.images - config.num_val();
    let voc = out.join("VOC2012");
    let ade = out.join("ADEChallengeData2016");
    let palette = voc_palette();
    let results: Vec<Result<(CocoImage, Vec<SynthObject>)>> = (0..config.images)
        .into_par_iter()
        .map(|index| {
            let id = index as u64 + 1;
            let (split, ade_split) = if index < num_train {
                ("train", "training")
            } else {
                ("val", "validation")
            };
            let stem = format!("{id:012}");
            let file_name = format!("{stem}.jpg");
            let synth = generate_image(config, index as u64);
            let jpeg = out.join(split).join(&file_name);
            write_atomic(&jpeg, &encode_jpeg(&synth.image, &jpeg)?)?;
            link_or_copy(&jpeg, &voc.join("JPEGImages").join(&file_name))?;
            link_or_copy(&jpeg, &ade.join("images").join(ade_split).join(&file_name))?;
            let png_name = format!("{stem}.png");
            write_atomic(
                &voc.join("SegmentationClass").join(&png_name),
                &encode_label_png(&synth.labels, Some(&palette))?,
            )?;
            write_atomic(
                &ade.join("annotations").join(ade_split).join(&png_name),
                &encode_label_png(&synth.labels, None)?,
            )?;
            progress();
            Ok((
                CocoImage {
                    id,
                    file_name,
                    width: config.size,
                    height: config.size,
                },
                synth.objects,
            ))
        })
        .collect();

    let categories: Vec<CocoCategory> = SHAPE_CLASSES
        .iter()
        .enumerate()
        .map(|(i, name)| CocoCategory {
            id: i as u64 + 1,
            name: name.to_string(),
            supercategory: Some("shape".into()),
        })
        .collect();
    let mut splits = [CocoFile::default(), CocoFile::default()];
    let mut summary = SynthSummary::default();
    let mut next_id = 1u64;
    for (index, result) in results.into_iter().enumerate() {
        let (image, objects) = result?;
        let split = usize::from(index >= num_train);
        for object in objects {
            summary.annotations += 1;
            summary.crowd += object.iscrowd as usize;
            splits[split].annotations.push(CocoAnnotation {
                id: next_id,
                image_id: image.id,
                category_id: object.label as u64,
                bbox: object.bbox,
                area: object.area as f64,
                iscrowd: object.iscrowd,
                segmentation: Some(object.segmentation),
            });
            next_id += 1;
        }
        splits[split].images.push(image);
    }
    summary.train_images = splits[0].images.len();
    summary.val_images = splits[1].images.len();
    let info = serde_json::json!({
        "description": "mobileone synthetic shapes",
        "seed": config.seed,
        "size": config.size,
        "images": config.images,
        "val_fraction": config.val_fraction,
    });
    for ((split, ade_split), mut file) in [("train", "training"), ("val", "validation")]
        .into_iter()
        .zip(splits)
    {
        file.info = Some(info.clone());
        file.categories = categories.clone();
        let ids: String = file
            .images
            .iter()
            .map(|image| format!("{:012}\n", image.id))
            .collect();
        write_atomic(
            &voc.join("ImageSets")
                .join("Segmentation")
                .join(format!("{split}.txt")),
            ids.as_bytes(),
        )?;
        std::fs::create_dir_all(ade.join("images").join(ade_split))
            .map_err(|e| DatasetError::io(&ade, e))?;
        std::fs::create_dir_all(ade.join("annotations").join(ade_split))
            .map_err(|e| DatasetError::io(&ade, e))?;
        std::fs::create_dir_all(out.join(split)).map_err(|e| DatasetError::io(out, e))?;
        let json = serde_json::to_vec(&file).expect("COCO types serialise");
        write_atomic(
            &out.join("annotations")
                .join(format!("instances_{split}.json")),
            &json,
        )?;
    }
    let voc_names: String = std::iter::once("background")
        .chain(SHAPE_CLASSES)
        .map(|n| format!("{n}\n"))
        .collect();
    write_atomic(&voc.join(CLASS_NAMES_FILE), voc_names.as_bytes())?;
    let ade_names: String = SHAPE_CLASSES.iter().map(|n| format!("{n}\n")).collect();
    write_atomic(&ade.join(CLASS_NAMES_FILE), ade_names.as_bytes())?;
    let manifest = serde_json::to_vec_pretty(&serde_json::json!({
        "generator": "mobileone dataset synth",
        "seed": config.seed,
        "size": config.size,
        "images": config.images,
        "val_fraction": config.val_fraction,
        "min_object_size": config.min_object_size,
        "max_objects": config.max_objects,
        "classes": SHAPE_CLASSES,
    }))
    .expect("manifest serialises");
    write_atomic(&out.join(SYNTH_MANIFEST), &manifest)?;
    Ok(summary)
}

/// File at the root of a synthetic dataset recording how it was generated.
pub const SYNTH_MANIFEST: &str = "synth.json";

fn encode_jpeg(image: &RgbImage, path: &Path) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 95)
        .encode_image(image)
        .map_err(|e| DatasetError::image(path, e))?;
    Ok(bytes)
}

/// Hard-links `from` to `to` (replacing `to`), copying when links are not possible.
fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if let Some(dir) = to.parent() {
        std::fs::create_dir_all(dir).map_err(|e| DatasetError::io(dir, e))?;
    }
    if to.exists() {
        std::fs::remove_file(to).map_err(|e| DatasetError::io(to, e))?;
    }
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    let bytes = std::fs::read(from).map_err(|e| DatasetError::io(from, e))?;
    write_atomic(to, &bytes)
}
