"""The `train det|seg` recipes in PyTorch on `dataset synth` data, to set loss curves beside ours.

Same models as `train` builds (train-time MobileOne-S0 from timm, random init; torchvision SSD with
SSDLite heads, or DeepLabV3 with the ASPP head), AdamW (weight decay 0.01 on conv/linear weights
only), fixed batch order per epoch, 160 px inputs, no augmentation; prints the mean training loss
per epoch (det) or every 25 steps (seg).

    # det: the overfitting check of a 32-image COCO folder (val = train), constant lr
    tools/reference/.venv/bin/python tools/reference/train_curve_reference.py det DATA --epochs 30
    # seg: a `dataset synth` VOC2012 folder, linear warm-up then cosine
    tools/reference/.venv/bin/python tools/reference/train_curve_reference.py seg DATA/VOC2012 \
        --steps 300 --head-channels 64 --rates 2,4,6
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import deeplabv3_fixtures as dl  # noqa: E402
import ssdlite_fixtures as ssd  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


def adamw(model, lr):
    decay = [q for q in model.parameters() if q.dim() > 1]
    no_decay = [q for q in model.parameters() if q.dim() <= 1]
    return torch.optim.AdamW([{'params': decay, 'weight_decay': 0.01},
                              {'params': no_decay, 'weight_decay': 0.0}], lr=lr)


def rgb(path):
    return torch.from_numpy(np.asarray(Image.open(path).convert('RGB')).copy()).permute(2, 0, 1).float() / 255


def det(a):
    ssd.SIZE = 160
    body = timm.create_model('mobileone_s0', pretrained=False, num_classes=0)
    d = json.load(open(os.path.join(a.root, 'annotations', 'instances_train.json')))
    cat_ids = sorted(c['id'] for c in d['categories'])
    model = ssd.build_model(body=body, taps=[256, 1024], extra_channels=[512, 256, 256, 128],
                            num_classes=len(cat_ids) + 1)
    data = []
    for im in d['images']:
        anns = [x for x in d['annotations'] if x['image_id'] == im['id'] and not x.get('iscrowd', 0)]
        boxes = torch.tensor([[x['bbox'][0], x['bbox'][1], x['bbox'][0] + x['bbox'][2],
                               x['bbox'][1] + x['bbox'][3]] for x in anns], dtype=torch.float32)
        labels = torch.tensor([cat_ids.index(x['category_id']) + 1 for x in anns], dtype=torch.int64)
        data.append((rgb(os.path.join(a.root, 'train', im['file_name'])),
                     {'boxes': boxes.reshape(-1, 4), 'labels': labels}))
    opt = adamw(model, a.lr)
    model.train()
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    steps = len(data) // a.batch
    for epoch in range(a.epochs):
        order = torch.randperm(len(data), generator=g).tolist()
        total = 0.0
        for s in range(steps):
            batch = [data[i] for i in order[s * a.batch:(s + 1) * a.batch]]
            loss = sum(model([b[0] for b in batch], [b[1] for b in batch]).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        print(f'epoch {epoch + 1} loss {total / steps:.4f} '
              f'{(epoch + 1) * steps * a.batch / (time.perf_counter() - t0):.1f} img/s', flush=True)


def seg(a):
    def load(name):
        x = (rgb(os.path.join(a.root, 'JPEGImages', name + '.jpg')) - MEAN) / STD
        y = np.asarray(Image.open(os.path.join(a.root, 'SegmentationClass', name + '.png')))
        return x, torch.from_numpy(y.astype(np.int64))

    split = lambda s: open(os.path.join(a.root, 'ImageSets', 'Segmentation', s + '.txt')).read().split()
    train = split('train')
    num_classes = len(open(os.path.join(a.root, 'class_names.txt')).read().split())
    model = dl.build(16, [int(r) for r in a.rates.split(',')], variant='s0', num_classes=num_classes,
                     width=a.head_channels)
    model.aux_classifier = None
    opt = adamw(model, a.lr)
    rng = np.random.default_rng(0)
    order = []
    model.train()
    t0 = time.perf_counter()
    for step in range(a.steps):
        if len(order) < a.batch:
            order = list(rng.permutation(len(train)))
        xs, ys = zip(*(load(train[order.pop()]) for _ in range(a.batch)))
        lr = a.lr * (step + 1) / a.warmup if step < a.warmup else \
            0.5 * a.lr * (1 + math.cos(math.pi * (step - a.warmup) / (a.total_steps - a.warmup)))
        for group in opt.param_groups:
            group['lr'] = lr
        loss = F.cross_entropy(model(torch.stack(xs))['out'], torch.stack(ys), ignore_index=255)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 25 == 0:
            print(f'step {step + 1} loss {loss.item():.4f} lr {lr:.2e} '
                  f'{(step + 1) * a.batch / (time.perf_counter() - t0):.1f} img/s', flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument('what', choices=['det', 'seg'])
    p.add_argument('root')
    p.add_argument('--epochs', type=int, default=30, help='det')
    p.add_argument('--steps', type=int, default=300, help='seg')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--lr', type=float, default=None, help='default: 1e-3 det, 2e-3 seg')
    p.add_argument('--warmup', type=int, default=150, help='seg: warm-up steps')
    p.add_argument('--total-steps', type=int, default=1800, help='seg: length of the cosine')
    p.add_argument('--head-channels', type=int, default=64)
    p.add_argument('--rates', default='2,4,6')
    p.add_argument('--threads', type=int, default=1)
    a = p.parse_args()
    a.lr = a.lr if a.lr is not None else (1e-3 if a.what == 'det' else 2e-3)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    det(a) if a.what == 'det' else seg(a)


if __name__ == '__main__':
    main()
