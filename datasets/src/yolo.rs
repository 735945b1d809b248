//! The YOLO detection layout (ultralytics): a `data.yaml` naming the split image folders (or `.txt`
//! lists of images) and the class names, and per image a `labels/…/<stem>.txt` beside `images/…` with
//! one object per line, `class cx cy w h` normalised to [0, 1] by the image's width and height (a line
//! with more than four coordinates is a polygon `class x1 y1 x2 y2 …`, whose enclosing box is used, as
//! ultralytics does). An image without a label file has no objects.
//!
//! A split is read into a [`CocoFile`] so that training, evaluation and `dataset convert` share the COCO
//! code: class `i` becomes category id `i + 1` (0 stays free for the background), boxes become COCO
//! `[x, y, w, h]` in pixels (image sizes read from the files), `area = w·h`, annotation ids run 1, 2, …
//! in file order, and image ids are the file names when every one is a number (COCO's
//! `000000000139.jpg` → 139), otherwise 1, 2, … in sorted order ([`ImageIds`] says which).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::coco::{CocoAnnotation, CocoCategory, CocoDataset, CocoFile, CocoImage};
use crate::error::{DatasetError, Result};

/// File extensions read as images (ultralytics' list, lower-case).
pub const IMAGE_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff", "pgm"];

/// `names:` as a list (`[person, car]`) or a map (`{0: person, 1: car}`).
#[derive(Deserialize)]
#[serde(untagged)]
enum Names {
    List(Vec<String>),
    Map(BTreeMap<usize, String>),
}

/// A split entry: one folder or list file, or several.
#[derive(Deserialize)]
#[serde(untagged)]
enum SplitEntry {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct DataYaml {
    path: Option<String>,
    train: Option<SplitEntry>,
    val: Option<SplitEntry>,
    test: Option<SplitEntry>,
    nc: Option<usize>,
    names: Names,
}

/// How image ids were assigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageIds {
    /// Every file stem is a distinct number: the id is that number.
    FromFileNames,
    /// 1, 2, … over the images sorted by path.
    Sequential,
}

/// A YOLO dataset described by its `data.yaml`.
#[derive(Debug, Clone)]
pub struct YoloDataset {
    /// The `data.yaml` file.
    pub yaml: PathBuf,
    /// Folder the split paths are relative to (`path:`, itself relative to the YAML's folder).
    pub root: PathBuf,
    /// Class names, index = class id in the label files.
    pub names: Vec<String>,
    splits: BTreeMap<String, Vec<PathBuf>>,
}

/// One split read into COCO form.
#[derive(Debug, Clone)]
pub struct YoloSplit {
    /// Images (file names relative to `image_root`), annotations and categories, indexed; its `path`
    /// names the YAML and the split ("…/data.yaml → `val` split") in errors.
    pub dataset: CocoDataset,
    /// Folder the images' `file_name`s are relative to.
    pub image_root: PathBuf,
    pub image_ids: ImageIds,
    /// Label lines whose box has no area (w or h ≤ 0): left out, as torchvision's pipeline drops them.
    pub dropped_empty: usize,
}

impl YoloDataset {
    /// Reads `path`: a `data.yaml` file, or a folder holding `data.yaml` (or `dataset.yaml`).
    pub fn open(path: &Path) -> Result<Self> {
        let yaml = if path.is_dir() {
            ["data.yaml", "dataset.yaml", "data.yml"]
                .iter()
                .map(|n| path.join(n))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    DatasetError::invalid(
                        path,
                        "no data.yaml in this folder (YOLO layout expected)",
                    )
                })?
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&yaml).map_err(|e| DatasetError::io(&yaml, e))?;
        let data: DataYaml = serde_yaml_ng::from_str(&text)
            .map_err(|e| DatasetError::invalid(&yaml, format!("not a YOLO data.yaml: {e}")))?;
        let names = match data.names {
            Names::List(v) => v,
            Names::Map(m) => {
                let n = m.len();
                if m.keys().copied().ne(0..n) {
                    return Err(DatasetError::invalid(
                        &yaml,
                        format!(
                            "`names` keys must be 0..{}, found {:?}",
                            n,
                            m.keys().collect::<Vec<_>>()
                        ),
                    ));
                }
                m.into_values().collect()
            }
        };
        if names.is_empty() {
            return Err(DatasetError::invalid(&yaml, "`names` lists no class"));
        }
        if let Some(nc) = data.nc {
            if nc != names.len() {
                return Err(DatasetError::invalid(
                    &yaml,
                    format!("`nc` is {nc} but `names` lists {} classes", names.len()),
                ));
            }
        }
        let base = yaml.parent().unwrap_or(Path::new("."));
        let root = match data.path {
            Some(p) => base.join(p),
            None => base.to_path_buf(),
        };
        let mut splits = BTreeMap::new();
        for (name, entry) in [
            ("train", data.train),
            ("val", data.val),
            ("test", data.test),
        ] {
            if let Some(entry) = entry {
                let list = match entry {
                    SplitEntry::One(s) => vec![s],
                    SplitEntry::Many(v) => v,
                };
                splits.insert(
                    name.to_string(),
                    list.iter().map(|s| root.join(s)).collect(),
                );
            }
        }
        Ok(Self {
            yaml,
            root,
            names,
            splits,
        })
    }

    /// Names of the splits the YAML lists (`train`, `val`, `test`).
    pub fn split_names(&self) -> Vec<String> {
        self.splits.keys().cloned().collect()
    }

    /// The image files of `split`, sorted, and the folder their names are relative to.
    pub fn images(&self, split: &str) -> Result<(Vec<PathBuf>, PathBuf)> {
        let sources = self.splits.get(split).ok_or_else(|| {
            DatasetError::invalid(
                &self.yaml,
                format!(
                    "no `{split}` split (it lists: {})",
                    self.split_names().join(", ")
                ),
            )
        })?;
        let mut files = Vec::new();
        for source in sources {
            if source.is_dir() {
                collect_images(source, &mut files)?;
            } else if source.extension().is_some_and(|e| e == "txt") {
                let text =
                    std::fs::read_to_string(source).map_err(|e| DatasetError::io(source, e))?;
                let dir = source.parent().unwrap_or(Path::new("."));
                files.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(|l| dir.join(l)),
                );
            } else {
                return Err(DatasetError::invalid(
                    &self.yaml,
                    format!(
                        "`{split}`: {} is neither a folder nor a .txt list",
                        source.display()
                    ),
                ));
            }
        }
        files.sort();
        files.dedup();
        let image_root = match sources.as_slice() {
            [one] if one.is_dir() => one.clone(),
            _ => self.root.clone(),
        };
        Ok((files, image_root))
    }

    /// Reads `split` into COCO form (see the module docs). Reads each image's size from its header.
    pub fn split(&self, split: &str) -> Result<YoloSplit> {
        let (files, image_root) = self.images(split)?;
        if files.is_empty() {
            return Err(DatasetError::invalid(
                &self.yaml,
                format!("the `{split}` split has no images"),
            ));
        }
        let numeric: Option<Vec<u64>> = files
            .iter()
            .map(|f| f.file_stem()?.to_str()?.parse::<u64>().ok())
            .collect();
        let (ids, image_ids) = match numeric {
            Some(ids) if ids.iter().collect::<HashSet<_>>().len() == ids.len() => {
                (ids, ImageIds::FromFileNames)
            }
            _ => ((1..=files.len() as u64).collect(), ImageIds::Sequential),
        };
        let mut coco = CocoFile {
            info: None,
            images: Vec::with_capacity(files.len()),
            annotations: Vec::new(),
            categories: self
                .names
                .iter()
                .enumerate()
                .map(|(i, name)| CocoCategory {
                    id: i as u64 + 1,
                    name: name.clone(),
                    supercategory: None,
                })
                .collect(),
        };
        let mut dropped_empty = 0;
        for (file, id) in files.iter().zip(ids) {
            let (width, height) = crate::io::image_size(file)?;
            let file_name = file
                .strip_prefix(&image_root)
                .unwrap_or(file)
                .to_string_lossy()
                .into_owned();
            coco.images.push(CocoImage {
                id,
                file_name,
                width,
                height,
            });
            let label_path = label_path(file);
            let text = match std::fs::read_to_string(&label_path) {
                Ok(text) => text,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(DatasetError::io(&label_path, e)),
            };
            for (line_index, line) in text.lines().enumerate() {
                let object = parse_line(line, self.names.len()).map_err(|m| {
                    DatasetError::invalid(&label_path, format!("line {}: {m}", line_index + 1))
                })?;
                let Some((class, [cx, cy, w, h])) = object else {
                    continue;
                };
                let (wf, hf) = (width as f64, height as f64);
                let bbox = [(cx - w / 2.0) * wf, (cy - h / 2.0) * hf, w * wf, h * hf];
                if !(bbox[2] > 0.0 && bbox[3] > 0.0) {
                    dropped_empty += 1;
                    continue;
                }
                coco.annotations.push(CocoAnnotation {
                    id: coco.annotations.len() as u64 + 1,
                    image_id: id,
                    category_id: class as u64 + 1,
                    bbox,
                    area: bbox[2] * bbox[3],
                    iscrowd: false,
                    segmentation: None,
                });
            }
        }
        let name = self.yaml.with_file_name(format!("{split} split"));
        Ok(YoloSplit {
            dataset: CocoDataset::from_file(coco, &name)?,
            image_root,
            image_ids,
            dropped_empty,
        })
    }
}

/// `…/images/…/x.jpg` → `…/labels/…/x.txt` (the last `images` folder of the path, as ultralytics).
pub fn label_path(image: &Path) -> PathBuf {
    let parts: Vec<_> = image.components().collect();
    let mut out = PathBuf::new();
    let last_images = parts
        .iter()
        .rposition(|c| c.as_os_str() == "images")
        .filter(|&i| i + 1 < parts.len());
    for (i, c) in parts.iter().enumerate() {
        if Some(i) == last_images {
            out.push("labels");
        } else {
            out.push(c.as_os_str());
        }
    }
    out.set_extension("txt");
    out
}

/// One label line: `None` for a blank line, else the class and the normalised (cx, cy, w, h).
fn parse_line(
    line: &str,
    num_classes: usize,
) -> std::result::Result<Option<(usize, [f64; 4])>, String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.is_empty() {
        return Ok(None);
    }
    let class: usize = fields[0]
        .parse()
        .map_err(|_| format!("class `{}` is not a non-negative integer", fields[0]))?;
    if class >= num_classes {
        return Err(format!(
            "class {class} is out of range: data.yaml names {num_classes} class(es)"
        ));
    }
    let values = fields[1..]
        .iter()
        .map(|v| match v.parse::<f64>() {
            Ok(x) if x.is_finite() => Ok(x),
            _ => Err(format!("`{v}` is not a finite number")),
        })
        .collect::<std::result::Result<Vec<f64>, String>>()?;
    let box4 = match values.len() {
        4 => [values[0], values[1], values[2], values[3]],
        n if n >= 6 && n % 2 == 0 => {
            let xs = values.iter().step_by(2);
            let ys = values.iter().skip(1).step_by(2);
            let (x1, x2) = xs.fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
            let (y1, y2) = ys.fold((f64::MAX, f64::MIN), |(a, b), &y| (a.min(y), b.max(y)));
            [(x1 + x2) / 2.0, (y1 + y2) / 2.0, x2 - x1, y2 - y1]
        }
        n => {
            return Err(format!(
                "expected `class cx cy w h` or a polygon `class x1 y1 x2 y2 …`, found {n} number(s) after the class"
            ))
        }
    };
    if box4[2] < 0.0 || box4[3] < 0.0 {
        return Err(format!(
            "negative width or height ({}, {})",
            box4[2], box4[3]
        ));
    }
    Ok(Some((class, box4)))
}

fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| DatasetError::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| DatasetError::io(dir, e))?.path();
        if path.is_dir() {
            collect_images(&path, out)?;
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        {
            out.push(path);
        }
    }
    Ok(())
}

/// Writes `coco` in the YOLO layout under `out`: `images/<split>/` (copies of the images found in
/// `image_root`), `labels/<split>/<stem>.txt` and `data.yaml`. Categories become classes 0, 1, … in
/// id order; crowd annotations are left out (YOLO has no crowd flag) and counted in the return value.
pub fn write_split(
    coco: &CocoDataset,
    image_root: &Path,
    out: &Path,
    split: &str,
) -> Result<usize> {
    let mut categories: Vec<&CocoCategory> = coco.categories.iter().collect();
    categories.sort_by_key(|c| c.id);
    let class_of: std::collections::HashMap<u64, usize> = categories
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id, i))
        .collect();
    let images_dir = out.join("images").join(split);
    let labels_dir = out.join("labels").join(split);
    for dir in [&images_dir, &labels_dir] {
        std::fs::create_dir_all(dir).map_err(|e| DatasetError::io(dir, e))?;
    }
    let mut lines: std::collections::HashMap<u64, String> = std::collections::HashMap::new();
    let mut crowd = 0;
    for ann in &coco.annotations {
        if ann.iscrowd {
            crowd += 1;
            continue;
        }
        let image = coco
            .images
            .iter()
            .find(|i| i.id == ann.image_id)
            .ok_or_else(|| {
                DatasetError::invalid(
                    out,
                    format!("annotation {} names unknown image {}", ann.id, ann.image_id),
                )
            })?;
        let class = class_of.get(&ann.category_id).ok_or_else(|| {
            DatasetError::invalid(
                out,
                format!(
                    "annotation {} names unknown category {}",
                    ann.id, ann.category_id
                ),
            )
        })?;
        let (w, h) = (image.width as f64, image.height as f64);
        let [x, y, bw, bh] = ann.bbox;
        lines.entry(image.id).or_default().push_str(&format!(
            "{class} {} {} {} {}\n",
            (x + bw / 2.0) / w,
            (y + bh / 2.0) / h,
            bw / w,
            bh / h
        ));
    }
    for image in &coco.images {
        let name = Path::new(&image.file_name);
        let file = name.file_name().unwrap_or(name.as_os_str());
        let src = image_root.join(name);
        let dst = images_dir.join(file);
        std::fs::copy(&src, &dst).map_err(|e| DatasetError::io(&src, e))?;
        let label = labels_dir.join(Path::new(file).with_extension("txt"));
        crate::io::write_atomic(
            &label,
            lines.get(&image.id).map_or("", String::as_str).as_bytes(),
        )?;
    }
    let names: Vec<String> = categories
        .iter()
        .map(|c| format!("  {}: {}", class_of[&c.id], c.name))
        .collect();
    let yaml = out.join("data.yaml");
    let mut text = String::from("path: .\n");
    for s in ["train", "val", "test"] {
        if out.join("images").join(s).is_dir() {
            text.push_str(&format!("{s}: images/{s}\n"));
        }
    }
    text.push_str(&format!("names:\n{}\n", names.join("\n")));
    crate::io::write_atomic(&yaml, text.as_bytes())?;
    Ok(crowd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_path_replaces_the_last_images_folder() {
        assert_eq!(
            label_path(Path::new("/d/images/x/images/train/a.jpg")),
            PathBuf::from("/d/images/x/labels/train/a.txt")
        );
    }

    #[test]
    fn lines_boxes_polygons_and_errors() {
        assert_eq!(parse_line("  ", 1), Ok(None));
        assert_eq!(
            parse_line("0 0.5 0.5 0.2 0.4", 1),
            Ok(Some((0, [0.5, 0.5, 0.2, 0.4])))
        );
        let (c, b) = parse_line("1 0.1 0.2 0.3 0.2 0.2 0.6", 2).unwrap().unwrap();
        assert_eq!(c, 1);
        assert!(
            (b[0] - 0.2).abs() < 1e-12 && (b[2] - 0.2).abs() < 1e-12 && (b[3] - 0.4).abs() < 1e-12
        );
        assert!(parse_line("2 0.5 0.5 0.2 0.4", 2)
            .unwrap_err()
            .contains("out of range"));
        assert!(parse_line("0 0.5 nan 0.2 0.4", 1)
            .unwrap_err()
            .contains("finite"));
        assert!(parse_line("0 0.5 0.5 0.2", 1)
            .unwrap_err()
            .contains("found 3"));
        assert!(parse_line("x 0.5 0.5 0.2 0.4", 1)
            .unwrap_err()
            .contains("class"));
    }
}
