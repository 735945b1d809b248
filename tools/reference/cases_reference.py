"""pycocotools' behaviour on the failing inputs of ../shared/cases (and variants of the same kind), for
eval/tests/pycocotools_refusals.rs: the 12 stats where it evaluates, the exception where it raises.

Run: MOBILEONE_DATA=/path/to/shared/data tools/reference/.venv/bin/python tools/reference/cases_reference.py
Writes eval/tests/fixtures/cases_reference.json.
"""
import copy
import json
import os
import pathlib
import tempfile

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

cases = pathlib.Path(os.environ["MOBILEONE_DATA"]).resolve().parent / "cases"
repo = pathlib.Path(__file__).resolve().parents[2]


def run(gt_json, dt_json, iou_type):
    try:
        with tempfile.TemporaryDirectory() as d:
            g, r = pathlib.Path(d) / "gt.json", pathlib.Path(d) / "dt.json"
            g.write_text(json.dumps(gt_json)); r.write_text(json.dumps(dt_json))
            gt = COCO(str(g)); dt = gt.loadRes(str(r))
            e = COCOeval(gt, dt, iou_type); e.evaluate(); e.accumulate(); e.summarize()
            return {"stats": [float(v) for v in e.stats]}
    except Exception as exc:
        return {"raises": type(exc).__name__, "message": str(exc)}


load = lambda p: json.loads((cases / p).read_text())
out = {}
gt4, dt4 = load("04-polygon-4-coords/gt.json"), load("04-polygon-4-coords/dt.json")
out["04/segm"] = run(gt4, dt4, "segm")
out["04/bbox"] = run(gt4, dt4, "bbox")
# Same kind: a first polygon of 2 numbers, an empty polygon list, a 4-number polygon after a good one.
for name, segm in [("first_polygon_2_numbers", [[10, 10]]), ("empty_polygon_list", []),
                   ("second_polygon_4_numbers", [[10, 10, 50, 10, 50, 40, 10, 40], [1, 1, 2, 2]])]:
    g = copy.deepcopy(gt4); g["annotations"][0]["segmentation"] = segm
    out[f"04/{name}/segm"] = run(g, dt4, "segm")
gt21 = load("21-rle-counts-list-in-results/gt_poly.json")
out["21/rle_str/segm"] = run(gt21, load("21-rle-counts-list-in-results/dt_rle_str.json"), "segm")
out["21/rle_list/segm"] = run(gt21, load("21-rle-counts-list-in-results/dt_rle_list.json"), "segm")
poly_dt = [{"image_id": d["image_id"], "category_id": d["category_id"], "score": d["score"],
            "segmentation": [[10, 10, 50, 10, 50, 40, 10, 40]]} for d in load("21-rle-counts-list-in-results/dt_rle_str.json")]
out["21/polygon_results/segm"] = run(gt21, poly_dt, "segm")
# loadRes picks its branch by the first result, whatever the IoU type: without a `bbox` it reads every
# `segmentation` as compressed RLE (refusing lists and polygons) and derives the boxes from the masks.
out["21/rle_str/bbox"] = run(gt21, load("21-rle-counts-list-in-results/dt_rle_str.json"), "bbox")
out["21/rle_list/bbox"] = run(gt21, load("21-rle-counts-list-in-results/dt_rle_list.json"), "bbox")
out["21/polygon_results/bbox"] = run(gt21, poly_dt, "bbox")
# With a `bbox` in the first result loadRes takes the box branch and never reads the masks there.
with_box = [dict(d, bbox=[10, 10, 40, 30]) for d in load("21-rle-counts-list-in-results/dt_rle_list.json")]
out["21/rle_list_with_bbox/bbox"] = run(gt21, with_box, "bbox")
target = repo / "eval/tests/fixtures/cases_reference.json"
target.write_text(json.dumps(out, indent=1) + "\n")
print(json.dumps(out, indent=1))
