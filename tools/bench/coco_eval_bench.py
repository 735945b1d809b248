"""COCO bbox evaluation benchmark (not a test): pycocotools vs faster-coco-eval vs `evaluate coco`.

Generates a COCO-val-sized case (5000 images, ~36000 ground-truth boxes in 80 categories, 500000
detections, seeded), runs the three evaluators on the same files in one run, checks that their 12
stats agree, and prints wall times (load + evaluate + accumulate + summarize, each in its own
process) and ratios.

    cargo build --release -p mobileone-cli --bin evaluate
    tools/reference/.venv/bin/python tools/bench/coco_eval_bench.py [--out tools/bench/out]
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PY = sys.executable

PYCOCOTOOLS = """
import sys, json, contextlib, io
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO(sys.argv[1]); dt = gt.loadRes(sys.argv[2])
    ev = COCOeval(gt, dt, "bbox"); ev.evaluate(); ev.accumulate(); ev.summarize()
print(json.dumps([float(s) for s in ev.stats]))
"""

FASTER_COCO_EVAL = """
import sys, json, contextlib, io
from faster_coco_eval import COCO, COCOeval_faster
with contextlib.redirect_stdout(io.StringIO()):
    gt = COCO(sys.argv[1]); dt = gt.loadRes(sys.argv[2])
    ev = COCOeval_faster(gt, dt, "bbox"); ev.evaluate(); ev.accumulate(); ev.summarize()
print(json.dumps([float(s) for s in ev.stats]))
"""


def generate(out_dir, seed=0, n_images=5000, n_gt=36000, n_dt=500000, n_cats=80):
    gt_path, dt_path = os.path.join(out_dir, "bench_gt.json"), os.path.join(out_dir, "bench_dt.json")
    if os.path.exists(gt_path) and os.path.exists(dt_path):
        return gt_path, dt_path
    rng = np.random.default_rng(seed)
    cats = [{"id": int(c), "name": f"c{c}"} for c in np.sort(rng.choice(np.arange(1, 91), n_cats, replace=False))]
    cat_ids = np.array([c["id"] for c in cats])
    images = [{"id": i + 1, "width": 640, "height": 480} for i in range(n_images)]
    # ground truth: log-uniform sizes over all three area ranges, 1% crowd
    g_img = rng.integers(1, n_images + 1, n_gt)
    g_cat = rng.choice(cat_ids, n_gt)
    g_wh = np.exp(rng.uniform(np.log(4), np.log(400), (n_gt, 2)))
    g_xy = rng.uniform(0, 1, (n_gt, 2)) * (np.array([640, 480]) - g_wh).clip(1)
    g_crowd = rng.random(n_gt) < 0.01
    anns = [
        {
            "id": i + 1,
            "image_id": int(g_img[i]),
            "category_id": int(g_cat[i]),
            "bbox": [round(float(v), 2) for v in (*g_xy[i], *g_wh[i])],
            "area": round(float(g_wh[i, 0] * g_wh[i, 1] * 0.8), 2),
            "iscrowd": int(g_crowd[i]),
        }
        for i in range(n_gt)
    ]
    # detections: ~5 jittered copies per ground truth (some with a wrong class), rest random
    n_tp = min(n_dt, 5 * n_gt)
    src = rng.integers(0, n_gt, n_tp)
    jit = rng.normal(0, 0.12, (n_tp, 4))
    d_xy = g_xy[src] + jit[:, :2] * g_wh[src]
    d_wh = (g_wh[src] * (1 + jit[:, 2:])).clip(0.5)
    d_cat = np.where(rng.random(n_tp) < 0.9, g_cat[src], rng.choice(cat_ids, n_tp))
    d_img = g_img[src]
    n_fp = n_dt - n_tp
    f_wh = np.exp(rng.uniform(np.log(4), np.log(300), (n_fp, 2)))
    d_xy = np.concatenate([d_xy, rng.uniform(0, 1, (n_fp, 2)) * (np.array([640, 480]) - f_wh).clip(1)])
    d_wh = np.concatenate([d_wh, f_wh])
    d_cat = np.concatenate([d_cat, rng.choice(cat_ids, n_fp)])
    d_img = np.concatenate([d_img, rng.integers(1, n_images + 1, n_fp)])
    scores = rng.random(n_dt)
    order = rng.permutation(n_dt)
    dets = [
        {
            "image_id": int(d_img[i]),
            "category_id": int(d_cat[i]),
            "bbox": [round(float(d_xy[i, 0]), 2), round(float(d_xy[i, 1]), 2), round(float(d_wh[i, 0]), 2), round(float(d_wh[i, 1]), 2)],
            "score": round(float(scores[i]), 5),
        }
        for i in order
    ]
    with open(gt_path, "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": cats}, f)
    with open(dt_path, "w") as f:
        json.dump(dets, f)
    return gt_path, dt_path


def timed(cmd):
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"error: {' '.join(cmd[:3])} failed:\n{r.stderr}")
    return elapsed, json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "tools", "bench", "out"), help="where the generated case is written")
    ap.add_argument("--evaluate", default=os.path.join(ROOT, "target", "release", "evaluate"), help="the `evaluate` binary")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    gt, dt = generate(args.out)
    with open(gt) as f:
        g = json.load(f)
    print(f"case: {len(g['images'])} images, {len(g['annotations'])} GT boxes, {len(g['categories'])} categories, "
          f"{os.path.getsize(dt) // 2**20} MiB of detections; {os.cpu_count()} CPU threads")

    results = {}
    results["pycocotools 2.0.11"] = timed([PY, "-c", PYCOCOTOOLS, gt, dt])
    results["faster-coco-eval 1.8.0"] = timed([PY, "-c", FASTER_COCO_EVAL, gt, dt])
    t, out = timed([args.evaluate, "coco", "--gt", gt, "--dt", dt, "--json"])
    results["evaluate coco (ours)"] = (t, out["stats"])

    ref_time, ref_stats = results["pycocotools 2.0.11"]
    print(f"\n| evaluator | wall time (s) | speed-up vs pycocotools | max abs stat diff vs pycocotools |")
    print("|---|---:|---:|---:|")
    for name, (t, stats) in results.items():
        diff = max(abs(a - b) for a, b in zip(stats, ref_stats))
        print(f"| {name} | {t:.2f} | {ref_time / t:.1f}x | {diff:.1e} |")
    print(f"\npycocotools AP = {ref_stats[0]:.6f}")


if __name__ == "__main__":
    main()
