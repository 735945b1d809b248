"""Checks a `dataset synth` output with pycocotools: every annotation's mask (annToRLE) has
exactly its `area` and `bbox`, and evaluating the ground truth against itself gives AP 1.

Run: target/release/dataset synth --out /tmp/synth_check --images 200 --seed 3
     tools/reference/.venv/bin/python tools/reference/datasets_synth_check.py /tmp/synth_check
"""
import contextlib
import io
import sys

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

root = sys.argv[1]
for split in ("train", "val"):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(f"{root}/annotations/instances_{split}.json")
    anns = gt.loadAnns(gt.getAnnIds())
    for ann in anns:
        rle = gt.annToRLE(ann)
        assert int(mask_utils.area(rle)) == ann["area"], ann["id"]
        assert list(mask_utils.toBbox(rle)) == ann["bbox"], ann["id"]
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in anns
        if not a["iscrowd"]
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    print(f"{split}: {len(gt.imgs)} images, {len(anns)} annotations, areas and boxes match; "
          f"self-eval AP {ev.stats[0]:.4f} AP50 {ev.stats[1]:.4f}")
    assert np.isclose(ev.stats[0], 1.0)
