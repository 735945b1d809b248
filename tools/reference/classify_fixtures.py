"""timm's ImageNet eval pipeline on real photos and ImageNet val images, with Apple's MobileOne-S0 weights,
for the `classify` parity tests (bin/tests/classify_cli.rs) and the pixel tests of
mobileone-datasets' Pillow-exact decoding and resizing (datasets/tests/imaging.rs).

Run: MOBILEONE_DATA=/path/to/shared/data tools/reference/.venv/bin/python tools/reference/classify_fixtures.py [--imagenet]
Writes datasets/tests/fixtures/pillow_reference.json and bin/tests/fixtures/classify_reference.json
(--imagenet also evaluates imagenet-val-1300 with a DataLoader, 2 threads, and writes
bin/tests/fixtures/imagenet1300_reference.json with the per-image top-5 and the throughput).
"""
import glob
import hashlib
import json
import os
import pathlib
import sys
import time

import numpy as np
import safetensors.torch as st
import timm
import torch
from PIL import Image
from timm.utils.model import reparameterize_model

root = pathlib.Path(os.environ["MOBILEONE_DATA"])
repo = pathlib.Path(__file__).resolve().parents[2]
torch.set_num_threads(2)


def sha(a):
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


photos = sorted(glob.glob(str(root / "photos/*.jpg")) + glob.glob(str(root / "coco-val2017-samples/images/*.jpg")))
rel = lambda p: str(pathlib.Path(p).relative_to(root))

# Pixels: Pillow's decoding, and Image.resize with each filter, up and down.
pillow = {"pillow": Image.__version__, "images": {}}
filters = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS, "box": Image.BOX}
for i, p in enumerate(photos):
    im = Image.open(p).convert("RGB")
    entry = {"width": im.width, "height": im.height, "decoded_sha256": sha(np.asarray(im)), "resized": []}
    sizes = [(256, 256), (im.width // 3, im.height // 2 + 1), (im.width + 37, im.height * 2 - 5)]
    for j, (w, h) in enumerate(sizes):
        name = list(filters)[(i + j) % len(filters)] if j else "bilinear"
        entry["resized"].append({"width": w, "height": h, "filter": name,
                                 "sha256": sha(np.asarray(im.resize((w, h), filters[name])))})
    pillow["images"][rel(p)] = entry
out = repo / "datasets/tests/fixtures/pillow_reference.json"
out.write_text(json.dumps(pillow, indent=1) + "\n")
print("wrote", out)

# timm's eval transform and the S0 weights.
model = reparameterize_model(timm.create_model("mobileone_s0", pretrained=False))
model.load_state_dict(st.load_file(str(root / "weights/mobileone_s0_fused_apple_in1k.safetensors")))
model.eval()
config = timm.data.resolve_data_config({}, model=model)
transform = timm.data.create_transform(**config)
print("timm data config:", config)
print(transform)

result = {"timm": timm.__version__, "torch": torch.__version__, "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}, "images": {}}
with torch.no_grad():
    for p in photos:
        x = transform(Image.open(p).convert("RGB")).unsqueeze(0)
        prob = model(x).softmax(-1)[0].double()
        top = prob.topk(5)
        result["images"][rel(p)] = {
            "input_sha256_f32": sha(x.numpy().astype(np.float32)),
            "top5": [{"class_index": int(i), "probability": float(v)} for v, i in zip(top.values, top.indices)],
        }
out = repo / "bin/tests/fixtures/classify_reference.json"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(result, indent=1) + "\n")
print("wrote", out)

if "--imagenet" in sys.argv:
    d = root / "imagenet-val-1300"
    items = [line.split() for line in (d / "labels.txt").read_text().splitlines() if line.strip()]

    class Val(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return transform(Image.open(d / "images" / items[i][0]).convert("RGB")), int(items[i][1])

    loader = torch.utils.data.DataLoader(Val(), batch_size=32, num_workers=1)
    t0 = time.time()
    per_image, top1, top5 = [], 0, 0
    with torch.no_grad():
        for x, y in loader:
            t5 = model(x).topk(5).indices
            for k in range(len(y)):
                row = t5[k].tolist()
                per_image.append(row)
                top1 += row[0] == int(y[k])
                top5 += int(y[k]) in row
    seconds = time.time() - t0
    n = len(items)
    summary = {"images": n, "top1": top1 / n, "top5": top5 / n, "seconds": seconds, "images_per_s": n / seconds,
               "threads": 2, "loader": "torch DataLoader, 1 worker, batch 32",
               "per_image_top5": {items[i][0]: per_image[i] for i in range(n)}}
    out = repo / "bin/tests/fixtures/imagenet1300_reference.json"
    out.write_text(json.dumps(summary) + "\n")
    print(f"imagenet-val-1300: top1 {top1 / n:.4f} top5 {top5 / n:.4f}, {n / seconds:.1f} img/s; wrote {out}")
