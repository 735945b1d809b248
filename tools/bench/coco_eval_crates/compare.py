"""Exactness of hotcoco and vernier-core against pycocotools 2.0.11, case by case (markdown table).

    CARGO_TARGET_DIR=tools/bench/out/crates cargo build --release --manifest-path tools/bench/coco_eval_crates/Cargo.toml
    MOBILEONE_DATA=../shared/data tools/reference/.venv/bin/python tools/bench/coco_eval_crates/compare.py

Cases: the real val2014 100-image case and the generated fixtures of tools/reference/eval_fixtures.py.
Columns: max |stat difference| over the 12 stats and max |difference| over the whole
precision array [T, R, K, A, M] (pycocotools' eval['precision']), or what went wrong.
"""

import contextlib
import io
import json
import os
import subprocess

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
BIN = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "tools/bench/out/crates")), "release", "coco-eval-crates")
OUT = os.path.join(ROOT, "tools", "bench", "out")
FIX = os.path.join(ROOT, "eval", "tests", "fixtures", "coco")


def pycocotools(gt, dt, iou_type):
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            g = COCO(gt)
            ev = COCOeval(g, g.loadRes(dt), iou_type)
            ev.evaluate(), ev.accumulate(), ev.summarize()
        return np.array(ev.stats), ev.eval["precision"]
    except Exception as e:
        return f"{type(e).__name__}", None


def main():
    data = os.environ["MOBILEONE_DATA"]
    cases = [("val2014_100 (real)", f"{data}/coco-val2014-100/instances_val2014_100.json", f"{data}/coco-val2014-100/fakebbox100_results.json", "bbox")]
    for c in sorted(os.listdir(FIX)):
        iou_type = json.load(open(f"{FIX}/{c}/expected.json"))["iou_type"]
        gt = f"{FIX}/{c}/gt.json"
        if not os.path.exists(gt):  # a generated result file for the real ground truth
            gt = cases[0][1]
        cases.append((c, gt, f"{FIX}/{c}/dt.json", iou_type))
    print("| case | pycocotools | hotcoco 1.3.1 | vernier-core 0.6.0 |")
    print("|---|---|---|---|")
    for name, gt, dt, iou_type in cases:
        stats, prec = pycocotools(gt, dt, iou_type)
        prefix = os.path.join(OUT, f"crates_{name.split()[0]}")
        res = json.loads(subprocess.run([BIN, gt, dt, prefix, "both", iou_type], capture_output=True, text=True).stdout)
        row = [f"{name} ({iou_type})", f"raises {stats}" if prec is None else f"AP {stats[0]:.4f}"]
        for lib in ("hotcoco", "vernier"):
            r = res[lib]
            if "error" in r:
                row.append("error: " + r["error"].split(" at line")[0][:60])
            elif prec is None:
                row.append(f"no error (AP {r['stats'][0]:.4f})")
            else:
                ds = np.abs(np.array(r["stats"]) - stats).max()
                p = np.fromfile(f"{prefix}.{lib}.prec", dtype="<f8")
                dp = np.abs(p.reshape(prec.shape) - prec).max() if p.size == prec.size else float("nan")
                row.append("identical" if ds == 0 and dp == 0 else f"stats {ds:.1e}, precision {dp:.1e}")
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
