"""Fixtures for mobileone-datasets' RLE port: pycocotools polygon rasterisation, area, toBbox and
compressed strings on random polygons and masks.

Run: tools/reference/.venv/bin/python tools/reference/datasets_rle.py
Writes datasets/tests/fixtures/rle_pycocotools.json.
"""
import json
import pathlib

import numpy as np
from pycocotools import mask as mask_utils

rng = np.random.default_rng(1234)
cases = []
for i in range(60):
    h, w = int(rng.integers(5, 90)), int(rng.integers(5, 90))
    k = int(rng.integers(3, 12))
    if i % 3 == 0:
        # vertices partly outside the image and on pixel corners
        xy = rng.uniform(-10, max(h, w) + 10, size=2 * k)
    elif i % 3 == 1:
        xy = np.round(rng.uniform(0, min(h, w), size=2 * k))
    else:
        xy = rng.uniform(0, min(h, w), size=2 * k)
    poly = [float(v) for v in xy]
    rles = mask_utils.frPyObjects([poly], h, w)
    rle = mask_utils.merge(rles)
    dense = mask_utils.decode(rle)
    cases.append({
        "height": h, "width": w, "polygon": poly,
        "counts": rle["counts"].decode(),
        "area": int(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "mask_rows": ["".join(str(int(v)) for v in row) for row in dense],
    })

masks = []
for i in range(20):
    h, w = int(rng.integers(1, 60)), int(rng.integers(1, 60))
    dense = (rng.uniform(size=(h, w)) < rng.uniform(0.05, 0.95)).astype(np.uint8)
    if i == 0:
        dense[:] = 0
    if i == 1:
        dense[:] = 1
    rle = mask_utils.encode(np.asfortranarray(dense))
    masks.append({
        "height": h, "width": w,
        "mask_rows": ["".join(str(int(v)) for v in row) for row in dense],
        "counts": rle["counts"].decode(),
        "area": int(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
    })

out = pathlib.Path(__file__).resolve().parents[2] / "datasets/tests/fixtures/rle_pycocotools.json"
out.write_text(json.dumps({"polygons": cases, "masks": masks}))
print("wrote", out, out.stat().st_size, "bytes")
