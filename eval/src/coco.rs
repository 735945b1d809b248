//! COCO detection evaluation (box and mask AP/AR) identical to pycocotools 2.0.11.
//!
//! Matching and accumulation are `hotcoco`'s (chosen over `vernier-core` by measurement, see
//! `eval/README.md`). This module validates the input the way pycocotools would reject it,
//! turns pycocotools' silent quirks on malformed ground truth into clear errors, and adds the
//! per-category table (pycocotools' `summarize` formula applied to one category's slice).
//!
//! ```no_run
//! use mobileone_eval::coco::{evaluate_bbox, Detection, GroundTruth};
//! let gt = GroundTruth::from_path("instances_val2017.json".as_ref())?;
//! let dets = [Detection { image_id: 139, category_id: 1, bbox: [10.0, 20.0, 50.0, 80.0], score: 0.9 }];
//! let result = evaluate_bbox(&gt, &dets)?;
//! println!("AP = {:.3}", result.stats[0]);
//! # Ok::<(), mobileone_eval::coco::CocoError>(())
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use hotcoco::detection::AccumulatedEval;
use hotcoco::types::Annotation;
use hotcoco::{COCOeval, COCO};
use serde_json::json;

use crate::numpy_sum::pairwise_sum;

/// Names of the 12 summary statistics, in pycocotools' `stats` order.
pub const STAT_NAMES: [&str; 12] = [
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
];

/// What a detection is compared by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IouType {
    /// Box IoU on `bbox` (x, y, width, height).
    Bbox,
    /// Mask IoU on `segmentation` (polygons or RLE).
    Segm,
}

impl IouType {
    fn hotcoco(self) -> hotcoco::params::IouType {
        match self {
            IouType::Bbox => hotcoco::params::IouType::Bbox,
            IouType::Segm => hotcoco::params::IouType::Segm,
        }
    }

    fn geometry_field(self) -> &'static str {
        match self {
            IouType::Bbox => "bbox",
            IouType::Segm => "segmentation",
        }
    }
}

/// One detection, as a COCO result file entry: box in pixels `[x, y, width, height]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    pub image_id: u64,
    pub category_id: u64,
    pub bbox: [f64; 4],
    pub score: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum CocoError {
    #[error("cannot read {source_name}")]
    Read {
        source_name: String,
        source: std::io::Error,
    },
    #[error("{source_name}: not a valid COCO result list (a JSON array of detections)")]
    ResultJson {
        source_name: String,
        source: serde_json::Error,
    },
    #[error("{source_name}: {message}")]
    Load {
        source_name: String,
        message: String,
    },
    #[error(
        "{source_name}: {item}[{index}] (id {id}) has no `{field}` (pycocotools raises KeyError)"
    )]
    MissingField {
        source_name: String,
        item: &'static str,
        index: usize,
        id: u64,
        field: &'static str,
    },
    #[error(
        "{source_name}: annotations[{index}] has id 0; pycocotools stores matches as ids with 0 \
         meaning unmatched, so this object could never count as detected: renumber annotations from 1"
    )]
    AnnotationIdZero { source_name: String, index: usize },
    #[error(
        "{source_name}: annotations[{first}] and annotations[{second}] share id {id}; pycocotools \
         would silently evaluate the last of them twice: make annotation ids unique"
    )]
    DuplicateAnnotationId {
        source_name: String,
        id: u64,
        first: usize,
        second: usize,
    },
    /// An input shape that pycocotools refuses (`annToRLE`, `frPyObjects`, `loadRes`).
    #[error(
        "{source_name}: {item}[{index}] (id {id}): {message} (pycocotools raises {exception})"
    )]
    Refused {
        source_name: String,
        item: &'static str,
        index: usize,
        id: u64,
        message: String,
        exception: &'static str,
    },
    #[error("{source_name}: the ground truth has no images")]
    NoImages { source_name: String },
    #[error("{source_name}: no detections (pycocotools cannot evaluate an empty result list)")]
    NoDetections { source_name: String },
    #[error(
        "{source_name}: detection {index} is on image_id {image_id}, which is not in the ground \
         truth (pycocotools: \"Results do not correspond to current coco set\")"
    )]
    UnknownImage {
        source_name: String,
        index: usize,
        image_id: u64,
    },
    #[error("{source_name}: detection {index} has a non-finite {field} ({value})")]
    NonFinite {
        source_name: String,
        index: usize,
        field: &'static str,
        value: String,
    },
    #[error("evaluation failed: {0}")]
    Evaluate(String),
}

/// Validated COCO ground truth (an instances JSON), shared cheaply between evaluations.
pub struct GroundTruth {
    coco: Arc<COCO>,
    source_name: String,
    image_ids: HashSet<u64>,
}

impl GroundTruth {
    /// Load and validate an instances JSON: every annotation needs a unique non-zero `id` and an
    /// `area`. A missing `iscrowd` reads as 0 (pycocotools raises KeyError instead).
    pub fn from_path(path: &Path) -> Result<Self, CocoError> {
        let source_name = path.display().to_string();
        let coco = COCO::new(path).map_err(|e| CocoError::Load {
            source_name: source_name.clone(),
            message: e.to_string(),
        })?;
        Self::validated(coco, source_name)
    }

    /// Ground truth from an instances JSON held in memory (e.g. a YOLO dataset converted on the fly);
    /// `source_name` names it in errors. Validated as [`GroundTruth::from_path`].
    pub fn from_json(json: &[u8], source_name: &str) -> Result<Self, CocoError> {
        let dataset = serde_json::from_slice(json).map_err(|e| CocoError::Load {
            source_name: source_name.to_string(),
            message: e.to_string(),
        })?;
        Self::validated(COCO::from_dataset(dataset), source_name.to_string())
    }

    fn validated(coco: COCO, source_name: String) -> Result<Self, CocoError> {
        let mut first_index: HashMap<u64, usize> = HashMap::new();
        for (index, ann) in coco.dataset.annotations.iter().enumerate() {
            if ann.id == 0 {
                return Err(CocoError::AnnotationIdZero { source_name, index });
            }
            if let Some(first) = first_index.insert(ann.id, index) {
                return Err(CocoError::DuplicateAnnotationId {
                    source_name,
                    id: ann.id,
                    first,
                    second: index,
                });
            }
            if ann.area.is_none() {
                return Err(CocoError::MissingField {
                    source_name,
                    item: "annotations",
                    index,
                    id: ann.id,
                    field: "area",
                });
            }
        }
        if coco.dataset.images.is_empty() {
            return Err(CocoError::NoImages { source_name });
        }
        let image_ids = coco.dataset.images.iter().map(|i| i.id).collect();
        Ok(Self {
            coco: Arc::new(coco),
            source_name,
            image_ids,
        })
    }

    /// Category ids and names, sorted by id (pycocotools' category order).
    pub fn categories(&self) -> Vec<(u64, String)> {
        let mut cats: Vec<_> = self
            .coco
            .dataset
            .categories
            .iter()
            .map(|c| (c.id, c.name.clone()))
            .collect();
        cats.sort_unstable_by_key(|c| c.0);
        cats
    }

    pub fn num_images(&self) -> usize {
        self.image_ids.len()
    }

    /// pycocotools reads `bbox` (box IoU) or `segmentation` (mask IoU) of every ground truth.
    fn check_geometry(&self, iou_type: IouType) -> Result<(), CocoError> {
        let missing = self
            .coco
            .dataset
            .annotations
            .iter()
            .position(|a| match iou_type {
                IouType::Bbox => a.bbox.is_none(),
                IouType::Segm => a.segmentation.is_none(),
            });
        match missing {
            Some(index) => Err(CocoError::MissingField {
                source_name: self.source_name.clone(),
                item: "annotations",
                index,
                id: self.coco.dataset.annotations[index].id,
                field: iou_type.geometry_field(),
            }),
            None => Ok(()),
        }?;
        if iou_type == IouType::Segm {
            for (index, ann) in self.coco.dataset.annotations.iter().enumerate() {
                if let Some(segmentation) = &ann.segmentation {
                    check_gt_segmentation(segmentation).map_err(|(message, exception)| {
                        CocoError::Refused {
                            source_name: self.source_name.clone(),
                            item: "annotations",
                            index,
                            id: ann.id,
                            message,
                            exception,
                        }
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// What `annToRLE` → `frPyObjects(segm, h, w)` refuses in a ground-truth segmentation: its first
/// element decides the type, so a list whose first polygon has exactly 4 numbers is taken for a list
/// of boxes (and a plain list then fails the ndarray argument check: `TypeError`), a first polygon of
/// fewer numbers matches no input type (`Exception: input type is not supported`), and an empty
/// list has no first element (`IndexError`). Polygons after the first may have any length.
fn check_gt_segmentation(
    segmentation: &hotcoco::types::Segmentation,
) -> Result<(), (String, &'static str)> {
    use hotcoco::types::Segmentation;
    match segmentation {
        Segmentation::Polygon(polygons) => match polygons.first().map(Vec::len) {
            None => Err(("`segmentation` is an empty polygon list".into(), "IndexError")),
            Some(4) => Err((
                "the first polygon of `segmentation` has 4 numbers, which pycocotools reads as a box list"
                    .into(),
                "TypeError",
            )),
            Some(n) if n < 4 => Err((
                format!("the first polygon of `segmentation` has {n} number(s); a polygon needs at least 3 points"),
                "Exception: input type is not supported",
            )),
            Some(_) => Ok(()),
        },
        _ => Ok(()),
    }
}

/// Per-category results: pycocotools' 12 statistics restricted to one category.
#[derive(Debug, Clone, PartialEq)]
pub struct CategoryStats {
    pub id: u64,
    pub name: String,
    /// Same order as [`STAT_NAMES`]; -1 where pycocotools has nothing to average.
    pub stats: [f64; 12],
    /// Non-crowd ground-truth objects of this category.
    pub num_gt: usize,
    pub num_detections: usize,
}

/// Input that pycocotools accepts and handles in a defined way, counted so callers can report it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InputReport {
    /// Detections evaluated (after dropping unknown categories).
    pub num_detections: usize,
    /// Detections whose category id is not in the ground truth: pycocotools ignores them.
    pub unknown_category: usize,
    /// Detections with a negative width or height: pycocotools gives them IoU 0 and a negative
    /// area, so they never match and, unmatched, fall outside every area range (ignored).
    pub negative_size: usize,
}

/// The result of one COCO evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct CocoStats {
    pub iou_type: IouType,
    /// pycocotools' `COCOeval.stats`, in [`STAT_NAMES`] order.
    pub stats: [f64; 12],
    /// Sorted by category id.
    pub per_category: Vec<CategoryStats>,
    pub input: InputReport,
}

/// Box AP/AR of in-memory detections (what `detect` and `train` produce).
pub fn evaluate_bbox(gt: &GroundTruth, detections: &[Detection]) -> Result<CocoStats, CocoError> {
    let anns = detections
        .iter()
        .map(|d| Annotation {
            image_id: d.image_id,
            category_id: d.category_id,
            bbox: Some(d.bbox),
            score: Some(d.score),
            ..Default::default()
        })
        .collect();
    evaluate_annotations(gt, anns, IouType::Bbox, "detections")
}

/// AP/AR of a COCO result file (a JSON array of `{image_id, category_id, bbox|segmentation, score}`).
pub fn evaluate_file(
    gt: &GroundTruth,
    results: &Path,
    iou_type: IouType,
) -> Result<CocoStats, CocoError> {
    let source_name = results.display().to_string();
    let bytes = std::fs::read(results).map_err(|source| CocoError::Read {
        source_name: source_name.clone(),
        source,
    })?;
    let entries: Vec<ResultEntry> =
        serde_json::from_slice(&bytes).map_err(|source| CocoError::ResultJson {
            source_name: source_name.clone(),
            source,
        })?;
    let anns = entries
        .into_iter()
        .map(|e| Annotation {
            image_id: e.image_id,
            category_id: e.category_id,
            bbox: e.bbox,
            segmentation: e.segmentation,
            score: e.score,
            ..Default::default()
        })
        .collect();
    evaluate_annotations(gt, anns, iou_type, &source_name)
}

/// The fields of a result-file entry that evaluation reads; other keys are skipped. (Parsing
/// into hotcoco's `Annotation` directly would keep unknown keys through a slow serde `flatten`.)
#[derive(serde::Deserialize)]
struct ResultEntry {
    image_id: u64,
    category_id: u64,
    #[serde(default)]
    bbox: Option<[f64; 4]>,
    #[serde(default)]
    segmentation: Option<hotcoco::types::Segmentation>,
    #[serde(default)]
    score: Option<f64>,
}

fn evaluate_annotations(
    gt: &GroundTruth,
    anns: Vec<Annotation>,
    iou_type: IouType,
    source_name: &str,
) -> Result<CocoStats, CocoError> {
    gt.check_geometry(iou_type)?;
    let (kept, input) = validate_detections(gt, anns, iou_type, source_name)?;
    let mut num_detections: HashMap<u64, usize> = HashMap::new();
    for ann in &kept {
        *num_detections.entry(ann.category_id).or_default() += 1;
    }
    let dt = gt.coco.load_res_anns(kept).map_err(|e| CocoError::Load {
        source_name: source_name.to_string(),
        message: e.to_string(),
    })?;
    let mut eval = COCOeval::new(Arc::clone(&gt.coco), dt, iou_type.hotcoco());
    eval.evaluate()
        .map_err(|e| CocoError::Evaluate(e.to_string()))?;
    eval.accumulate();
    eval.summarize_lines();
    let stats: [f64; 12] = eval
        .stats()
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| CocoError::Evaluate("no summary statistics were produced".into()))?;
    let accumulated = eval
        .accumulated()
        .ok_or_else(|| CocoError::Evaluate("accumulate() produced nothing".into()))?;

    let mut num_gt: HashMap<u64, usize> = HashMap::new();
    for ann in gt.coco.dataset.annotations.iter().filter(|a| !a.iscrowd) {
        *num_gt.entry(ann.category_id).or_default() += 1;
    }
    let names: HashMap<u64, String> = gt.categories().into_iter().collect();
    let per_category = accumulated
        .cat_ids
        .iter()
        .enumerate()
        .map(|(k, &id)| CategoryStats {
            id,
            name: names.get(&id).cloned().unwrap_or_default(),
            stats: category_stats(accumulated, k),
            num_gt: num_gt.get(&id).copied().unwrap_or(0),
            num_detections: num_detections.get(&id).copied().unwrap_or(0),
        })
        .collect();
    Ok(CocoStats {
        iou_type,
        stats,
        per_category,
        input,
    })
}

/// Reject what pycocotools rejects (or silently mis-evaluates); drop and count detections of
/// unknown categories, which pycocotools ignores.
fn validate_detections(
    gt: &GroundTruth,
    anns: Vec<Annotation>,
    iou_type: IouType,
    source_name: &str,
) -> Result<(Vec<Annotation>, InputReport), CocoError> {
    if anns.is_empty() {
        return Err(CocoError::NoDetections {
            source_name: source_name.to_string(),
        });
    }
    let categories: HashSet<u64> = gt.coco.dataset.categories.iter().map(|c| c.id).collect();
    let non_finite = |index, field, value: String| CocoError::NonFinite {
        source_name: source_name.to_string(),
        index,
        field,
        value,
    };
    let mut report = InputReport::default();
    let mut kept = Vec::with_capacity(anns.len());
    // `loadRes` picks its branch by the first result, whatever the IoU type: without a `bbox` it
    // reads every `segmentation` as compressed RLE (and derives the boxes from the masks).
    let masks_read = iou_type == IouType::Segm
        || anns
            .first()
            .is_some_and(|a| a.bbox.is_none() && a.segmentation.is_some());
    for (index, ann) in anns.into_iter().enumerate() {
        if !gt.image_ids.contains(&ann.image_id) {
            return Err(CocoError::UnknownImage {
                source_name: source_name.to_string(),
                index,
                image_id: ann.image_id,
            });
        }
        match ann.score {
            None => {
                return Err(CocoError::MissingField {
                    source_name: source_name.to_string(),
                    item: "detections",
                    index,
                    id: index as u64 + 1,
                    field: "score",
                })
            }
            Some(s) if !s.is_finite() => return Err(non_finite(index, "score", s.to_string())),
            Some(_) => {}
        }
        match ann.bbox {
            Some(b) if b.iter().any(|v| !v.is_finite()) => {
                return Err(non_finite(index, "bbox", format!("{b:?}")))
            }
            Some(b) if b[2] < 0.0 || b[3] < 0.0 => report.negative_size += 1,
            None if ann.segmentation.is_none() => {
                return Err(CocoError::MissingField {
                    source_name: source_name.to_string(),
                    item: "detections",
                    index,
                    id: index as u64 + 1,
                    field: "bbox",
                })
            }
            _ => {}
        }
        if masks_read {
            check_result_segmentation(ann.segmentation.as_ref()).map_err(
                |(message, exception)| CocoError::Refused {
                    source_name: source_name.to_string(),
                    item: "detections",
                    index,
                    id: index as u64 + 1,
                    message,
                    exception,
                },
            )?;
        }
        if categories.contains(&ann.category_id) {
            kept.push(ann);
        } else {
            report.unknown_category += 1;
        }
    }
    report.num_detections = kept.len();
    Ok((kept, report))
}

/// What `loadRes` refuses in a mask result: it reads every `segmentation` as compressed RLE
/// (`maskUtils.area` → `_frString`), so uncompressed `counts` (a list) fail with
/// `TypeError: Expected bytes, got list`, a polygon list fails indexing it as a dict, and a result
/// without `segmentation` fails with `KeyError`.
fn check_result_segmentation(
    segmentation: Option<&hotcoco::types::Segmentation>,
) -> Result<(), (String, &'static str)> {
    use hotcoco::types::Segmentation;
    match segmentation {
        Some(Segmentation::CompressedRle { .. }) => Ok(()),
        Some(Segmentation::UncompressedRle { .. }) => Err((
            "`segmentation.counts` is an uncompressed list; results must be compressed RLE (a string): \
             encode with pycocotools.mask.encode"
                .into(),
            "TypeError: Expected bytes, got list",
        )),
        Some(_) => Err((
            "`segmentation` is a polygon list; mask results must be compressed RLE".into(),
            "TypeError",
        )),
        None => Err(("no `segmentation`".into(), "KeyError")),
    }
}

/// pycocotools' `summarize` plan: (AP?, IoU-threshold index, area index, maxDets index).
/// IoU index 0 is 0.50 and 5 is 0.75; areas all/small/medium/large; maxDets 1/10/100.
const SUMMARY_PLAN: [(bool, Option<usize>, usize, usize); 12] = [
    (true, None, 0, 2),
    (true, Some(0), 0, 2),
    (true, Some(5), 0, 2),
    (true, None, 1, 2),
    (true, None, 2, 2),
    (true, None, 3, 2),
    (false, None, 0, 0),
    (false, None, 0, 1),
    (false, None, 0, 2),
    (false, None, 1, 2),
    (false, None, 2, 2),
    (false, None, 3, 2),
];

/// The 12 statistics of category index `k`: the mean of the valid (> -1) entries of its
/// precision (over IoU, then recall thresholds, numpy's flattening order) or recall slice,
/// summed in numpy's pairwise order; -1 when none is valid.
fn category_stats(acc: &AccumulatedEval, k: usize) -> [f64; 12] {
    let shape = acc.shape;
    let mut values = Vec::with_capacity(shape.t * shape.r);
    SUMMARY_PLAN.map(|(ap, iou, a, m)| {
        let thresholds = match iou {
            Some(t) => t..t + 1,
            None => 0..shape.t,
        };
        values.clear();
        for t in thresholds {
            if ap {
                values.extend(
                    (0..shape.r).map(|r| acc.precision[shape.precision_idx(t, r, k, a, m)]),
                );
            } else {
                values.push(acc.recall[shape.recall_idx(t, k, a, m)]);
            }
        }
        values.retain(|&v| v > -1.0);
        if values.is_empty() {
            -1.0
        } else {
            pairwise_sum(&values) / values.len() as f64
        }
    })
}

impl CocoStats {
    /// pycocotools' `summarize()` output, line for line.
    pub fn summary_lines(&self) -> Vec<String> {
        const AREAS: [&str; 4] = ["all", "small", "medium", "large"];
        const MAX_DETS: [usize; 3] = [1, 10, 100];
        SUMMARY_PLAN
            .iter()
            .zip(self.stats)
            .map(|(&(ap, iou, a, m), value)| {
                let (title, kind) = if ap {
                    ("Average Precision", "(AP)")
                } else {
                    ("Average Recall", "(AR)")
                };
                let iou = match iou {
                    Some(0) => "0.50",
                    Some(_) => "0.75",
                    None => "0.50:0.95",
                };
                format!(
                    " {title:<18} {kind} @[ IoU={iou:<9} | area={:>6} | maxDets={:>3} ] = {value:0.3}",
                    AREAS[a], MAX_DETS[m]
                )
            })
            .collect()
    }

    /// A readable per-category table: AP, AP50, AP75, APs/m/l, AR100, counts (in percent).
    pub fn per_category_table(&self) -> String {
        let width = self
            .per_category
            .iter()
            .map(|c| c.name.len())
            .max()
            .unwrap_or(0)
            .max(8);
        let mut out = format!(
            "{:>5}  {:<width$}  {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}  {:>6} {:>7}\n",
            "id", "category", "AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "gt", "dets"
        );
        let pct = |v: f64| {
            if v < 0.0 {
                "-".to_string()
            } else {
                format!("{:.1}", 100.0 * v)
            }
        };
        for c in &self.per_category {
            let s = &c.stats;
            let _ = writeln!(
                out,
                "{:>5}  {:<width$}  {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6}  {:>6} {:>7}",
                c.id,
                c.name,
                pct(s[0]),
                pct(s[1]),
                pct(s[2]),
                pct(s[3]),
                pct(s[4]),
                pct(s[5]),
                pct(s[8]),
                c.num_gt,
                c.num_detections
            );
        }
        out
    }

    /// `{"stats": [12], "per_category": {"<id>": {"name", "stats": [12], "num_gt", "num_detections"}}}`.
    pub fn to_json(&self) -> serde_json::Value {
        let per_category: serde_json::Map<String, serde_json::Value> = self
            .per_category
            .iter()
            .map(|c| {
                (
                    c.id.to_string(),
                    json!({"name": c.name, "stats": c.stats, "num_gt": c.num_gt, "num_detections": c.num_detections}),
                )
            })
            .collect();
        json!({"stats": self.stats, "per_category": per_category})
    }
}
