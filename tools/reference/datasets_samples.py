"""Reference facts about the real samples in $MOBILEONE_DATA, read with PIL and pycocotools, for
mobileone-datasets' reader tests.

Run: MOBILEONE_DATA=/path/to/shared/data tools/reference/.venv/bin/python tools/reference/datasets_samples.py
Writes datasets/tests/fixtures/samples_reference.json.
"""
import json
import os
import pathlib

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

root = pathlib.Path(os.environ["MOBILEONE_DATA"])
out = {"label_pngs": {}, "coco": {}}

for rel in ["voc2012-sample/SegmentationClass/2007_000063.png"] + [
    f"ade20k-samples/annotations/ADE_val_0000000{i}.png" for i in (1, 2, 3)
]:
    img = Image.open(root / rel)
    arr = np.array(img)  # palette PNGs give indices, as mmseg/torchvision read them
    hist = np.bincount(arr.ravel(), minlength=256)
    out["label_pngs"][rel] = {
        "mode": img.mode,
        "width": img.width,
        "height": img.height,
        "histogram": {str(v): int(c) for v, c in enumerate(hist) if c},
    }

for rel in ["coco-val2017-samples/instances_val2017_5.json", "coco-val2014-100/instances_val2014_100.json"]:
    coco = COCO(str(root / rel))
    anns = coco.loadAnns(coco.getAnnIds())
    per_ann = {}
    for ann in anns:
        img = coco.imgs[ann["image_id"]]
        rle = coco.annToRLE(ann)
        per_ann[str(ann["id"])] = {
            "mask_area": int(mask_utils.area(rle)),
            "mask_bbox": [float(v) for v in mask_utils.toBbox(rle)],
        }
    out["coco"][rel] = {
        "images": len(coco.imgs),
        "annotations": len(anns),
        "crowd": sum(a["iscrowd"] for a in anns),
        "categories": sorted(coco.cats),
        "annotations_per_image": {str(i): len(coco.getAnnIds(imgIds=[i])) for i in sorted(coco.imgs)},
        "masks": per_ann,
    }

path = pathlib.Path(__file__).resolve().parents[2] / "datasets/tests/fixtures/samples_reference.json"
path.write_text(json.dumps(out))
print("wrote", path, path.stat().st_size, "bytes")
