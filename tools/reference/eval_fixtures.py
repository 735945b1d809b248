"""Fixtures for `mobileone-eval`: pycocotools 2.0.11 results on generated COCO cases and an
mmsegmentation-formula (IoUMetric) reference for mIoU, written under eval/tests/fixtures/.

Run from the repository root with the pinned venv:
    tools/reference/.venv/bin/python tools/reference/eval_fixtures.py

COCO cases: eval/tests/fixtures/coco/<case>/{gt.json, dt.json, expected.json}. `expected.json` holds
either {"stats": [12], "per_category": {cat_id: [12]}} or {"error": "<pycocotools exception>"}.
Per-category stats apply pycocotools' own `summarize` formula to one category's slice of
`eval['precision']` / `eval['recall']`.
Segmentation cases: eval/tests/fixtures/seg/<case>.json with pred/gt label maps and the metric.
"""

import contextlib
import io
import json
import math
import os
import shutil
import sys

import numpy as np
from importlib.metadata import version

from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
OUT = os.path.join(ROOT, "eval", "tests", "fixtures")

assert version("pycocotools") == "2.0.11", version("pycocotools")


def summarize_stats(ev, k=None):
    """pycocotools `COCOeval.summarize` (bbox/segm), optionally for one category index k."""
    p = ev.params

    def one(ap, iou_thr=None, area="all", max_dets=100):
        aind = [i for i, a in enumerate(p.areaRngLbl) if a == area]
        mind = [i for i, m in enumerate(p.maxDets) if m == max_dets]
        if ap:
            s = ev.eval["precision"]
            if iou_thr is not None:
                s = s[np.where(iou_thr == p.iouThrs)[0]]
            s = s[:, :, :, aind, mind]
            if k is not None:
                s = s[:, :, k : k + 1]
        else:
            s = ev.eval["recall"]
            if iou_thr is not None:
                s = s[np.where(iou_thr == p.iouThrs)[0]]
            s = s[:, :, aind, mind]
            if k is not None:
                s = s[:, k : k + 1]
        return -1.0 if len(s[s > -1]) == 0 else float(np.mean(s[s > -1]))

    md = p.maxDets
    return [
        one(1),
        one(1, iou_thr=0.5, max_dets=md[2]),
        one(1, iou_thr=0.75, max_dets=md[2]),
        one(1, area="small", max_dets=md[2]),
        one(1, area="medium", max_dets=md[2]),
        one(1, area="large", max_dets=md[2]),
        one(0, max_dets=md[0]),
        one(0, max_dets=md[1]),
        one(0, max_dets=md[2]),
        one(0, area="small", max_dets=md[2]),
        one(0, area="medium", max_dets=md[2]),
        one(0, area="large", max_dets=md[2]),
    ]


def run_pycocotools(gt_path, dt_path, iou_type):
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet):
            gt = COCO(gt_path)
            dt = gt.loadRes(dt_path)
            ev = COCOeval(gt, dt, iou_type)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
    except Exception as e:  # the error itself is the expected result of a bad-input case
        return {"error": f"{type(e).__name__}: {e}"}
    stats = [float(s) for s in ev.stats]
    assert np.allclose(stats, summarize_stats(ev), rtol=0, atol=0)
    per_category = {str(c): summarize_stats(ev, k) for k, c in enumerate(ev.params.catIds)}
    return {"stats": stats, "per_category": per_category, "summary": quiet.getvalue()}


def write_case(name, gt, dt, iou_type="bbox"):
    d = os.path.join(OUT, "coco", name)
    os.makedirs(d, exist_ok=True)
    gt_path, dt_path = os.path.join(d, "gt.json"), os.path.join(d, "dt.json")
    with open(gt_path, "w") as f:
        json.dump(gt, f, separators=(",", ":"))
    with open(dt_path, "w") as f:
        json.dump(dt, f, separators=(",", ":"))
    expected = run_pycocotools(gt_path, dt_path, iou_type)
    expected["iou_type"] = iou_type
    if "summary" in expected:
        # Keep only pycocotools' summary lines (the 12 " Average ..." lines), not its progress text.
        lines = [l for l in expected["summary"].splitlines() if l.startswith(" Average")]
        expected["summary"] = lines
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    status = expected.get("error") or f"AP={expected['stats'][0]:.4f}"
    print(f"{name:28s} gt={len(gt['annotations']):5d} dt={len(dt) if isinstance(dt, list) else '-':>5} {status}")


def r2(x):
    return round(float(x), 2)


CATEGORIES = [{"id": c, "name": f"class{c}", "supercategory": "shape"} for c in (1, 3, 7, 12, 20, 33, 41)]


def images(n, start=1):
    return [{"id": i, "width": 640, "height": 480, "file_name": f"{i:06d}.jpg"} for i in range(start, start + n)]


def random_gt(rng, img_ids, cat_ids, per_image=(0, 12), crowd_frac=0.05):
    anns = []
    for img in img_ids:
        for _ in range(rng.integers(*per_image)):
            # log-uniform sizes: from a few pixels to most of the image, across all three area ranges
            w, h = np.exp(rng.uniform(np.log(3), np.log(400), size=2))
            x, y = rng.uniform(0, 640 - min(w, 639)), rng.uniform(0, 480 - min(h, 479))
            area = w * h * rng.uniform(0.5, 1.0)  # a polygon's area, smaller than its box
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": int(img),
                    "category_id": int(rng.choice(cat_ids)),
                    "bbox": [r2(x), r2(y), r2(w), r2(h)],
                    "area": r2(area),
                    "iscrowd": int(rng.random() < crowd_frac),
                }
            )
    return anns


def jittered_dets(rng, anns, cat_ids, img_ids, copies=(0, 4), false_pos=(0, 6), score_decimals=2):
    dets = []
    for a in anns:
        x, y, w, h = a["bbox"]
        for _ in range(rng.integers(*copies)):
            j = rng.normal(0, 0.15, size=4)
            cat = a["category_id"] if rng.random() < 0.9 else int(rng.choice(cat_ids))
            dets.append(
                {
                    "image_id": a["image_id"],
                    "category_id": cat,
                    "bbox": [r2(x + j[0] * w), r2(y + j[1] * h), r2(max(w * (1 + j[2]), 0.5)), r2(max(h * (1 + j[3]), 0.5))],
                    "score": round(float(rng.random()), score_decimals),
                }
            )
    for img in img_ids:
        for _ in range(rng.integers(*false_pos)):
            w, h = np.exp(rng.uniform(np.log(4), np.log(300), size=2))
            dets.append(
                {
                    "image_id": int(img),
                    "category_id": int(rng.choice(cat_ids)),
                    "bbox": [r2(rng.uniform(0, 600)), r2(rng.uniform(0, 440)), r2(w), r2(h)],
                    "score": round(float(rng.random()), score_decimals),
                }
            )
    rng.shuffle(dets)
    return dets


def coco_cases():
    rng = np.random.default_rng(20261127)
    cat_ids = [c["id"] for c in CATEGORIES]
    with_gt = cat_ids[:5]  # class 33 has detections only, class 41 has neither

    # A general case: non-contiguous category ids, crowd, empty images, ties (2-decimal scores),
    # a category with detections but no ground truth and one with neither.
    imgs = images(40)
    gt_anns = random_gt(rng, [i["id"] for i in imgs[:36]], with_gt)
    dts = jittered_dets(rng, gt_anns, cat_ids[:6], [i["id"] for i in imgs[30:]])
    write_case("random", {"images": imgs, "annotations": gt_anns, "categories": CATEGORIES}, dts)

    # Crowd-heavy: crowd regions matched by many detections, detections on crowd only.
    imgs = images(12)
    gt_anns = random_gt(rng, [i["id"] for i in imgs], with_gt[:2], per_image=(2, 8), crowd_frac=0.4)
    dts = jittered_dets(rng, gt_anns, with_gt[:2], [i["id"] for i in imgs], copies=(1, 6))
    write_case("crowd", {"images": imgs, "annotations": gt_anns, "categories": CATEGORIES[:2]}, dts)

    # Every detection has the same score: AP depends on the (stable) order in the file.
    imgs = images(10)
    gt_anns = random_gt(rng, [i["id"] for i in imgs], with_gt[:3], per_image=(1, 8))
    dts = jittered_dets(rng, gt_anns, with_gt[:3], [i["id"] for i in imgs])
    for d in dts:
        d["score"] = 0.5
    write_case("score_ties", {"images": imgs, "annotations": gt_anns, "categories": CATEGORIES[:3]}, dts)

    # More than 100 detections per image: maxDets 1/10/100 truncation by score.
    imgs = images(4)
    gt_anns = random_gt(rng, [i["id"] for i in imgs], with_gt[:2], per_image=(20, 40))
    dts = jittered_dets(rng, gt_anns, with_gt[:2], [i["id"] for i in imgs], copies=(2, 6), false_pos=(60, 120), score_decimals=6)
    write_case("max_dets", {"images": imgs, "annotations": gt_anns, "categories": CATEGORIES[:2]}, dts)

    # Ground-truth areas exactly on the small/medium/large bounds (both bounds are inclusive).
    imgs = images(2)
    areas = [0.0, 1.0, 1024.0, 1024.0001, 9216.0, 9216.0001, 1e10, 1e10 + 1]
    gt_anns = []
    for i, area in enumerate(areas):
        gt_anns.append({"id": i + 1, "image_id": 1 + i % 2, "category_id": 1, "bbox": [10.0 + 60 * i, 10.0, 50.0, 50.0], "area": area, "iscrowd": 0})
    dts = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 0.9 - 0.05 * k} for k, a in enumerate(gt_anns)]
    dts.append({"image_id": 1, "category_id": 1, "bbox": [0.0, 300.0, 32.0, 32.0], "score": 0.95})  # FP, area 1024
    dts.append({"image_id": 2, "category_id": 1, "bbox": [0.0, 300.0, 96.0, 96.0], "score": 0.2})  # FP, area 9216
    write_case("area_bounds", {"images": imgs, "annotations": gt_anns, "categories": CATEGORIES[:1]}, dts)

    # Annotation id 0 is stored as "unmatched" by pycocotools: it never counts as a match.
    imgs = images(3)
    gt_anns = random_gt(rng, [i["id"] for i in imgs], with_gt[:2], per_image=(3, 6), crowd_frac=0.0)
    dts = jittered_dets(rng, gt_anns, with_gt[:2], [i["id"] for i in imgs], copies=(1, 3), false_pos=(0, 2))
    for a in gt_anns:
        a["id"] -= 1  # ids 0..n-1
    write_case("ann_id_zero", {"images": imgs, "annotations": gt_anns, "categories": CATEGORIES[:2]}, dts)

    # Duplicate annotation ids: pycocotools' id lookup keeps the last annotation with an id.
    imgs = images(3)
    gt_anns = random_gt(rng, [i["id"] for i in imgs], with_gt[:2], per_image=(3, 6), crowd_frac=0.0)
    dts = jittered_dets(rng, gt_anns, with_gt[:2], [i["id"] for i in imgs], copies=(1, 3), false_pos=(0, 2))
    for a in gt_anns[1::3]:
        a["id"] = gt_anns[0]["id"] if a["image_id"] == gt_anns[0]["image_id"] else a["id"] + 1000
    gt_anns[-1]["id"] = gt_anns[-2]["id"]  # same image, same id
    write_case("duplicate_ann_ids", {"images": imgs, "annotations": gt_anns, "categories": CATEGORIES[:2]}, dts)

    # Detections with a category id that is not in the ground truth: ignored by pycocotools.
    imgs = images(3)
    gt_anns = random_gt(rng, [i["id"] for i in imgs], with_gt[:2], per_image=(3, 6))
    dts = jittered_dets(rng, gt_anns, with_gt[:2], [i["id"] for i in imgs], copies=(1, 3))
    for d in dts[::4]:
        d["category_id"] = 999
    write_case("unknown_category", {"images": imgs, "annotations": gt_anns, "categories": CATEGORIES[:2]}, dts)

    # Detections with negative width or height: pycocotools computes a negative area, which puts
    # an unmatched one outside every area range (ignored), and IoU 0 with everything.
    imgs = images(3)
    gt_anns = random_gt(rng, [i["id"] for i in imgs], with_gt[:2], per_image=(3, 6))
    dts = jittered_dets(rng, gt_anns, with_gt[:2], [i["id"] for i in imgs], copies=(1, 3))
    for d in dts[::3]:
        d["bbox"][2] = -d["bbox"][2]
    for d in dts[1::5]:
        d["bbox"][3] = -d["bbox"][3]
    write_case("negative_boxes", {"images": imgs, "annotations": gt_anns, "categories": CATEGORIES[:2]}, dts)

    # Bad input pycocotools rejects.
    imgs = images(2)
    gt_anns = random_gt(rng, [1, 2], with_gt[:2], per_image=(2, 4), crowd_frac=0.0)
    dts = jittered_dets(rng, gt_anns, with_gt[:2], [1, 2], copies=(1, 2))
    gt = {"images": imgs, "annotations": gt_anns, "categories": CATEGORIES[:2]}
    write_case("bad_input_base", gt, dts)  # the valid case the bad ones below are derived from
    write_case("dt_image_not_in_gt", gt, dts + [dict(dts[0], image_id=77)])
    write_case("empty_results", gt, [])
    write_case("gt_missing_area", dict(gt, annotations=[{k: v for k, v in a.items() if k != "area"} for a in gt_anns]), dts)
    write_case("gt_missing_iscrowd", dict(gt, annotations=[{k: v for k, v in a.items() if k != "iscrowd"} for a in gt_anns]), dts)

    # Segmentation (mask) AP: polygon ground truth, one crowd region as uncompressed RLE, and
    # compressed-RLE detections from jittered polygons.
    h, w = 120, 160
    imgs = [{"id": i, "width": w, "height": h, "file_name": f"{i:06d}.jpg"} for i in range(1, 7)]
    gt_anns, dts = [], []
    for img in imgs:
        for _ in range(rng.integers(1, 6)):
            cx, cy, rad = rng.uniform(20, w - 20), rng.uniform(20, h - 20), rng.uniform(3, 40)
            ang = np.sort(rng.uniform(0, 2 * np.pi, size=int(rng.integers(3, 8))))
            poly = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).clip(0, [w - 1, h - 1])
            rle = mask_utils.merge(mask_utils.frPyObjects([poly.ravel().tolist()], h, w))
            cat = int(rng.choice(with_gt[:3]))
            gt_anns.append(
                {
                    "id": len(gt_anns) + 1,
                    "image_id": img["id"],
                    "category_id": cat,
                    "segmentation": [[r2(v) for v in poly.ravel()]],
                    "area": float(mask_utils.area(rle)),
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
            for _ in range(rng.integers(0, 3)):
                jp = poly + rng.normal(0, rad * 0.15, size=poly.shape)
                drle = mask_utils.merge(mask_utils.frPyObjects([jp.clip(0, [w - 1, h - 1]).ravel().tolist()], h, w))
                drle["counts"] = drle["counts"].decode()
                dts.append({"image_id": img["id"], "category_id": cat, "segmentation": drle, "score": round(float(rng.random()), 3)})
        # one crowd region per image, as an uncompressed RLE (list counts)
        m = np.zeros((h, w), dtype=np.uint8, order="F")
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        m[y0 : y0 + 30, x0 : x0 + 40] = 1
        counts, prev, run = [], 0, 0
        for v in m.ravel(order="F"):
            if v != prev:
                counts.append(run)
                run, prev = 0, v
            run += 1
        counts.append(run)
        gt_anns.append(
            {
                "id": len(gt_anns) + 1,
                "image_id": img["id"],
                "category_id": with_gt[0],
                "segmentation": {"counts": counts, "size": [h, w]},
                "area": 1200.0,
                "bbox": [float(x0), float(y0), 40.0, 30.0],
                "iscrowd": 1,
            }
        )
    write_case("segm_random", {"images": imgs, "annotations": gt_anns, "categories": CATEGORIES[:3]}, dts, iou_type="segm")


def data_dir():
    return os.environ.get("MOBILEONE_DATA", os.path.join(ROOT, "..", "shared", "data"))


def real_segm_case():
    """Mask AP on the real val2014 100-image ground truth (official polygons and crowd RLEs, read
    from MOBILEONE_DATA by the test, not copied): detections are the GT masks shifted by a few
    pixels, some relabelled, as compressed RLE without `bbox` (pycocotools derives it)."""
    rng = np.random.default_rng(100)
    gt_path = os.path.join(data_dir(), "coco-val2014-100", "instances_val2014_100.json")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_path)
    cat_ids = gt.getCatIds()
    dts = []
    for ann in gt.dataset["annotations"]:
        if ann["iscrowd"] or rng.random() < 0.2:
            continue
        mask = gt.annToMask(ann)
        dy, dx = rng.integers(-4, 5, size=2)
        mask = np.roll(mask, (int(dy), int(dx)), axis=(0, 1))
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode()
        cat = ann["category_id"] if rng.random() < 0.9 else int(rng.choice(cat_ids))
        dts.append({"image_id": ann["image_id"], "category_id": cat, "segmentation": rle, "score": round(float(rng.random()), 3)})
    d = os.path.join(OUT, "coco", "val2014_100_segm")
    os.makedirs(d, exist_ok=True)
    dt_path = os.path.join(d, "dt.json")
    with open(dt_path, "w") as f:
        json.dump(dts, f, separators=(",", ":"))
    expected = run_pycocotools(gt_path, dt_path, "segm")
    expected["iou_type"] = "segm"
    expected["summary"] = [l for l in expected["summary"].splitlines() if l.startswith(" Average")]
    with open(os.path.join(d, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    print(f"{'val2014_100_segm':28s} gt=(real)  dt={len(dts):5d} AP={expected['stats'][0]:.4f}")


# ---- mmsegmentation IoUMetric formula -------------------------------------------------------------


def mmseg_intersect_and_union(pred, label, num_classes, ignore_index):
    """mmseg IoUMetric.intersect_and_union, in numpy (int64 histograms)."""
    mask = label != ignore_index
    pred, label = pred[mask], label[mask]
    inter = pred[pred == label]
    area_inter = np.histogram(inter, bins=num_classes, range=(0, num_classes - 1))[0]
    area_pred = np.histogram(pred, bins=num_classes, range=(0, num_classes - 1))[0]
    area_label = np.histogram(label, bins=num_classes, range=(0, num_classes - 1))[0]
    return area_inter, area_pred + area_label - area_inter, area_pred, area_label


def mmseg_metrics(pairs, num_classes, ignore_index):
    totals = [np.zeros(num_classes, dtype=np.int64) for _ in range(4)]
    for pred, label in pairs:
        for t, v in zip(totals, mmseg_intersect_and_union(pred, label, num_classes, ignore_index)):
            t += v
    inter, union, _, label = totals
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
        acc = inter / label
    return {
        "aAcc": float(inter.sum() / label.sum()),
        "mIoU": float(np.nanmean(iou)),
        "mAcc": float(np.nanmean(acc)),
        "per_class_iou": [None if math.isnan(v) else float(v) for v in iou],
        "per_class_acc": [None if math.isnan(v) else float(v) for v in acc],
        "area_intersect": inter.tolist(),
        "area_union": union.tolist(),
        "area_label": label.tolist(),
    }


def perturbed(label, num_classes):
    """A deterministic wrong prediction, reproduced by the Rust test: every 5th pixel in a
    diagonal pattern gets the next class; ignored pixels get a class from their position."""
    h, w = label.shape
    y, x = np.mgrid[0:h, 0:w]
    pred = label.astype(np.int64).copy()
    shift = (x * 7 + y * 13) % 5 == 0
    pred[shift] = (pred[shift] + 1) % num_classes
    ignored = label == 255
    pred[ignored] = (x[ignored] + y[ignored]) % num_classes
    return pred


def real_seg_cases():
    """mIoU of real annotation maps against a perturbed copy (reads MOBILEONE_DATA; writes only
    the expected numbers)."""
    from PIL import Image

    data = data_dir()
    cases = {
        "ade20k": (os.path.join(data, "ade20k-samples", "annotations"), 150, True),
        "voc2012": (os.path.join(data, "voc2012-sample", "SegmentationClass"), 21, False),
    }
    out = {}
    for name, (folder, num_classes, reduce_zero) in cases.items():
        files = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
        pairs = []
        for f in files:
            img = Image.open(os.path.join(folder, f))
            assert img.mode in ("L", "P"), (f, img.mode)
            label = np.array(img).astype(np.int64)  # palette indices for "P", not colours
            if reduce_zero:  # mmseg LoadAnnotations(reduce_zero_label=True)
                label[label == 0] = 255
                label = label - 1
                label[label == 254] = 255
            pairs.append((perturbed(label, num_classes), label))
        out[name] = {
            "files": files,
            "num_classes": num_classes,
            "reduce_zero_label": reduce_zero,
            "expected": mmseg_metrics(pairs, num_classes, 255),
        }
        print(f"seg {name}: {len(files)} maps, perturbed mIoU={out[name]['expected']['mIoU']:.6f}")
    with open(os.path.join(OUT, "seg", "real_perturbed.json"), "w") as f:
        json.dump(out, f, indent=1)


def seg_cases():
    rng = np.random.default_rng(7)
    d = os.path.join(OUT, "seg")
    os.makedirs(d, exist_ok=True)
    num_classes = 6
    pairs = []
    for shape in [(17, 23), (9, 31), (20, 20)]:
        gt = rng.integers(0, num_classes - 1, size=shape).astype(np.uint8)  # class 5 never in gt
        gt[rng.random(shape) < 0.1] = 255
        pred = np.where(rng.random(shape) < 0.7, gt, rng.integers(0, num_classes - 2, size=shape)).astype(np.uint8)
        pred[pred == 255] = 0  # predictions never carry the ignore label
        pairs.append((pred, gt))
    expected = mmseg_metrics(pairs, num_classes, 255)
    case = {
        "num_classes": num_classes,
        "ignore_index": 255,
        "images": [{"shape": list(p.shape), "pred": p.ravel().tolist(), "gt": g.ravel().tolist()} for p, g in pairs],
        "expected": expected,
    }
    with open(os.path.join(d, "random.json"), "w") as f:
        json.dump(case, f, separators=(",", ":"))
    print(f"seg random: mIoU={expected['mIoU']:.6f} (class 5 absent from both: NaN)")


if __name__ == "__main__":
    shutil.rmtree(os.path.join(OUT, "coco"), ignore_errors=True)
    coco_cases()
    real_segm_case()
    seg_cases()
    real_seg_cases()
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(OUT) for f in fs)
    print(f"fixtures: {total / 1024:.0f} KiB in {OUT}", file=sys.stderr)
