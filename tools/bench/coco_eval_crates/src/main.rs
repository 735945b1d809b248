//! Run hotcoco and vernier-core on one (gt, dt) pair: `coco-eval-crates GT DT OUT_PREFIX [both|hotcoco|vernier] [bbox|segm]`.
//! Prints their 12 stats and wall time as JSON and writes each precision array to OUT_PREFIX.<crate>.prec (f64 LE).
use std::time::Instant;

fn write_f64(path: &str, v: &[f64]) {
    let mut bytes = Vec::with_capacity(v.len() * 8);
    for x in v { bytes.extend_from_slice(&x.to_le_bytes()); }
    std::fs::write(path, bytes).unwrap();
}

fn run_hotcoco(gt: &str, dt: &str, out: &str, segm: bool) -> serde_json::Value {
    use hotcoco::{params::IouType, COCO, COCOeval};
    let t = Instant::now();
    let r = (|| -> Result<(Vec<f64>, Vec<f64>, Vec<u64>), String> {
        let g = COCO::new(std::path::Path::new(gt)).map_err(|e| e.to_string())?;
        let d = g.load_res(std::path::Path::new(dt)).map_err(|e| e.to_string())?;
        let mut ev = COCOeval::new(g, d, if segm { IouType::Segm } else { IouType::Bbox });
        ev.evaluate().map_err(|e| e.to_string())?;
        ev.accumulate();
        let _ = ev.summarize_lines();
        let acc = ev.accumulated().unwrap();
        Ok((ev.stats().unwrap().to_vec(), acc.precision.clone(), acc.cat_ids.clone()))
    })();
    let secs = t.elapsed().as_secs_f64();
    match r {
        Ok((stats, prec, cats)) => {
            write_f64(&format!("{out}.hotcoco.prec"), &prec);
            serde_json::json!({"stats": stats, "cat_ids": cats, "time_s": secs})
        }
        Err(e) => serde_json::json!({"error": e, "time_s": secs}),
    }
}

fn run_vernier(gt: &str, dt: &str, out: &str, segm: bool) -> serde_json::Value {
    use vernier_core::accumulate::{accumulate_grid, GridAccumulateParams};
    use vernier_core::parity::{iou_thresholds, recall_thresholds};
    use vernier_core::summarize::summarize_detection;
    use vernier_core::*;
    let t = Instant::now();
    let r = (|| -> Result<(Vec<f64>, Vec<f64>, Vec<usize>), String> {
        let g = CocoDataset::from_json_bytes(&std::fs::read(gt).unwrap()).map_err(|e| e.to_string())?;
        let d = CocoDetections::from_json_bytes(&std::fs::read(dt).unwrap()).map_err(|e| e.to_string())?;
        let area = AreaRange::coco_default();
        let params = EvaluateParams { iou_thresholds: iou_thresholds(), area_ranges: &area,
            max_dets_per_image: 100, use_cats: true, retain_iou: false, retain_meta: false };
        let grid = if segm { evaluate_segm(&g, &d, params, ParityMode::Strict) } else { evaluate_bbox(&g, &d, params, ParityMode::Strict) }.map_err(|e| e.to_string())?;
        let md = [1usize, 10, 100];
        let acc = accumulate_grid(&grid, GridAccumulateParams { iou_thresholds: iou_thresholds(),
            recall_thresholds: recall_thresholds(), max_dets: &md }, ParityMode::Strict).map_err(|e| e.to_string())?;
        let s = summarize_detection(&acc, iou_thresholds(), &md, ParityMode::Strict).map_err(|e| e.to_string())?;
        let shape = acc.precision.shape().to_vec();
        Ok((s.stats(), acc.precision.iter().copied().collect(), shape))
    })();
    let secs = t.elapsed().as_secs_f64();
    match r {
        Ok((stats, prec, shape)) => {
            write_f64(&format!("{out}.vernier.prec"), &prec);
            serde_json::json!({"stats": stats, "shape": shape, "time_s": secs})
        }
        Err(e) => serde_json::json!({"error": e, "time_s": secs}),
    }
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (gt, dt, out) = (&a[1], &a[2], &a[3]);
    let which = a.get(4).map(String::as_str).unwrap_or("both");
    let segm = a.get(5).is_some_and(|s| s == "segm");
    let mut res = serde_json::Map::new();
    if which != "vernier" { res.insert("hotcoco".into(), run_hotcoco(gt, dt, out, segm)); }
    if which != "hotcoco" { res.insert("vernier".into(), run_vernier(gt, dt, out, segm)); }
    println!("{}", serde_json::Value::Object(res));
}
