"""torchvision's COCO -> VOC semantic masks on $MOBILEONE_DATA/coco-mini, for datasets/tests/coco_voc.rs.

The conversion is torchvision's segmentation reference (references/segmentation/coco_utils.py at
pytorch/vision 030d27a: FilterAndRemapCocoCategories(CAT_LIST), ConvertCocoPolysToMask,
_coco_remove_images_without_annotations); that folder is not part of the pip package, so its three
functions are reproduced below line for line, over torchvision's CocoDetection and pycocotools.

Run: MOBILEONE_DATA=/path/to/shared/data tools/reference/.venv/bin/python tools/reference/coco_voc_fixtures.py
Writes datasets/tests/fixtures/coco_voc_reference.json (per image: SHA-256 of the uint8 mask, its
histogram; per split: the image ids the training filter keeps).
"""
import copy
import hashlib
import json
import os
import pathlib

import numpy as np
import torch
import torchvision
from pycocotools import mask as coco_mask

CAT_LIST = [0, 5, 2, 16, 9, 44, 6, 3, 17, 62, 21, 67, 18, 19, 4, 1, 64, 20, 63, 7, 72]


class FilterAndRemapCocoCategories:
    def __init__(self, categories, remap=True):
        self.categories = categories
        self.remap = remap

    def __call__(self, image, anno):
        anno = [obj for obj in anno if obj["category_id"] in self.categories]
        if not self.remap:
            return image, anno
        anno = copy.deepcopy(anno)
        for obj in anno:
            obj["category_id"] = self.categories.index(obj["category_id"])
        return image, anno


def convert_coco_poly_to_mask(segmentations, height, width):
    masks = []
    for polygons in segmentations:
        rles = coco_mask.frPyObjects(polygons, height, width)
        mask = coco_mask.decode(rles)
        if len(mask.shape) < 3:
            mask = mask[..., None]
        mask = torch.as_tensor(mask, dtype=torch.uint8)
        mask = mask.any(dim=2)
        masks.append(mask)
    if masks:
        masks = torch.stack(masks, dim=0)
    else:
        masks = torch.zeros((0, height, width), dtype=torch.uint8)
    return masks


class ConvertCocoPolysToMask:
    def __call__(self, image, anno):
        w, h = image.size
        segmentations = [obj["segmentation"] for obj in anno]
        cats = [obj["category_id"] for obj in anno]
        if segmentations:
            masks = convert_coco_poly_to_mask(segmentations, h, w)
            cats = torch.as_tensor(cats, dtype=masks.dtype)
            target, _ = (masks * cats[:, None, None]).max(dim=0)
            target[masks.sum(0) > 1] = 255
        else:
            target = torch.zeros((h, w), dtype=torch.uint8)
        return image, target


def has_valid_annotation(anno):
    if len(anno) == 0:
        return False
    return sum(obj["area"] for obj in anno) > 1000


root = pathlib.Path(os.environ["MOBILEONE_DATA"]) / "coco-mini"
repo = pathlib.Path(__file__).resolve().parents[2]
out = {"torchvision": torchvision.__version__, "splits": {}}
for split in ["train", "val"]:
    ds = torchvision.datasets.CocoDetection(str(root / f"{split}2017"), str(root / f"annotations/instances_{split}2017.json"))
    images, kept = {}, []
    for idx, img_id in enumerate(ds.ids):
        image, anno = ds[idx]
        _, anno_f = FilterAndRemapCocoCategories(CAT_LIST, remap=True)(image, anno)
        _, target = ConvertCocoPolysToMask()(image, anno_f)
        t = target.numpy().astype(np.uint8)
        hist = np.bincount(t.ravel(), minlength=256)
        images[str(img_id)] = {"sha256": hashlib.sha256(np.ascontiguousarray(t).tobytes()).hexdigest(),
                               "histogram": {str(v): int(c) for v, c in enumerate(hist) if c}}
        raw = ds.coco.loadAnns(ds.coco.getAnnIds(imgIds=img_id, iscrowd=None))
        if has_valid_annotation([o for o in raw if o["category_id"] in CAT_LIST]):
            kept.append(img_id)
    out["splits"][split] = {"images": images, "kept_for_training": kept}
    print(split, len(images), "images,", len(kept), "kept for training")
target = repo / "datasets/tests/fixtures/coco_voc_reference.json"
target.write_text(json.dumps(out) + "\n")
print("wrote", target, target.stat().st_size, "bytes")
