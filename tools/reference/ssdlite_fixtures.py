"""SSDLite reference fixtures from torchvision's `SSD` on a timm MobileOne trunk (pinned in requirements.txt).

Builds torchvision's SSD with SSDLite heads and extra blocks (torchvision's own `_extra_block` and
`SSDLiteHead`) on a tiny timm MobileOne, with random weights and calibrated, randomised BatchNorm statistics,
and writes into heads/ssdlite/tests/fixtures/:

  tiny_ssdlite.safetensors  the model as a project checkpoint: torchvision key names, header metadata
  reference.safetensors     anchors, box-coder round trips, bilinear resizes, matcher assignments, losses,
                            head outputs and final detections
  pets_213x160.png          the real photo the model runs on (from /work/shared/data/photos, resized)

Usage: .venv/bin/python ssdlite_fixtures.py [tiny] [--out DIR]     committed fixtures
       .venv/bin/python ssdlite_fixtures.py full                  S0, 91 classes -> out/ssdlite/ (not committed)
       .venv/bin/python ssdlite_fixtures.py compare RESULTS.json  top-100 match of `detect --json` on out/ssdlite/pets.png
"""
import argparse
import copy
import json
import os
from collections import OrderedDict
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from timm.models.byobnet import ByobNet, ByoModelCfg, _mobileone_bcfg
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.ssdlite import SSDLiteHead, _extra_block
from torchvision.ops import boxes as box_ops

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PHOTO = os.path.join(REPO, '..', 'shared', 'data', 'photos', 'pets.jpg')
if not os.path.exists(PHOTO):
    PHOTO = '/work/shared/data/photos/pets.jpg'

# Tiny MobileOne trunk: widths 16/32/64/128 (stem 16), blocks 1/2/2/1, k = 2, SE in the last stage.
# Mirrors `tiny_config()` in heads/ssdlite/tests/parity.rs (and the checkpoint metadata below).
TRUNK = dict(stem_channels=16, stage_channels=[16, 32, 64, 128], stage_blocks=[1, 2, 2, 1],
             num_conv_branches=2, se_blocks=[0, 0, 0, 1])
TRUNK_CFG = ByoModelCfg(
    blocks=_mobileone_bcfg(d=tuple(TRUNK['stage_blocks']), wf=(0.25, 0.25, 0.25, 0.25),
                           se_blocks=tuple(TRUNK['se_blocks']), num_conv_branches=TRUNK['num_conv_branches']),
    stem_type='one',
    stem_chs=TRUNK['stem_channels'],
)
EXTRA_CHANNELS = [64, 32, 32, 16]  # torchvision's SSDLite uses 512, 256, 256, 128
NUM_CLASSES = 11
SIZE = 320
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
BN = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)


class MobileOneSsdBackbone(nn.Module):
    """`backbone.body` = timm MobileOne (taps at strides 16 and 32), `backbone.extra` = SSDLite extra blocks."""

    def __init__(self, body, in_ch, extra_channels):
        super().__init__()
        self.body = body
        blocks = []
        for out_ch in extra_channels:
            blocks.append(_extra_block(in_ch, out_ch, BN))
            in_ch = out_ch
        self.extra = nn.ModuleList(blocks)

    def forward(self, x):
        x = self.body.stem(x)
        feats = []
        for i, stage in enumerate(self.body.stages):
            x = stage(x)
            if i >= 2:
                feats.append(x)
        x = self.body.final_conv(x)
        feats[-1] = x
        for block in self.extra:
            x = block(x)
            feats.append(x)
        return OrderedDict((str(i), f) for i, f in enumerate(feats))


def build_model(body=None, taps=None, extra_channels=EXTRA_CHANNELS, num_classes=NUM_CLASSES):
    if body is None:
        body = ByobNet(TRUNK_CFG, num_classes=0)
        taps = TRUNK['stage_channels'][2:]
    backbone = MobileOneSsdBackbone(body, taps[1], extra_channels)
    anchors = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    out_channels = list(taps) + list(extra_channels)
    head = SSDLiteHead(out_channels, anchors.num_anchors_per_location(), num_classes, BN)
    return SSD(backbone, anchors, (SIZE, SIZE), num_classes, image_mean=MEAN, image_std=STD, head=head,
               score_thresh=0.001, nms_thresh=0.55, detections_per_img=300, topk_candidates=300)


def randomise(model, calib_images, g):
    """Random weights, BN statistics calibrated on real images then perturbed; logits scaled to be peaked."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif name.endswith('weight'):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batch
        model.train()
        images, _ = model.transform(calib_images)
        model.head(list(model.backbone(images.tensors).values()))
        for m in bns:
            m.running_mean.add_(torch.randn(m.running_mean.shape, generator=g) * 0.05)
            m.running_var.mul_(torch.rand(m.running_var.shape, generator=g) * 0.4 + 0.8)
            m.momentum = 0.03 if m.eps == 0.001 else 0.1
        model.eval()
        # Peaked class scores and moderate box offsets, as a trained detector has.
        cls = model.head.classification_head.module_list
        reg = model.head.regression_head.module_list
        feats = list(model.backbone(images.tensors).values())
        for i, f in enumerate(feats):
            c = cls[i](f)
            cls[i][1].weight.mul_(2.5 / c.std())
            cls[i][1].bias.copy_(torch.randn(cls[i][1].bias.shape, generator=g))
            r = reg[i](f)
            reg[i][1].weight.mul_(0.8 / r.std())


def to_tensor(img):
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


def anchors_for(gen, grids, image_size):
    feats = [torch.zeros(1, 1, h, w) for h, w in grids]
    images = ImageList(torch.zeros(1, 3, *image_size), [image_size])
    return gen(images, feats)[0]


def full(out):
    """SSDLite320 on a random MobileOne-S0 with 91 classes (not committed): checkpoint, a PNG of a real photo
    and torchvision's detections on it, for `compare` against `detect --json` and for benchmarks."""
    import timm
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    photos = os.path.dirname(PHOTO)
    Image.open(PHOTO).convert('RGB').save(os.path.join(out, 'pets.png'))
    img = to_tensor(Image.open(os.path.join(out, 'pets.png')).convert('RGB'))
    body = timm.create_model('mobileone_s0', pretrained=False, num_classes=0)
    model = build_model(body, (256, 1024), [512, 256, 256, 128], 91)
    calib = [to_tensor(Image.open(os.path.join(photos, n)).convert('RGB').resize((256, 192)))
             for n in ['pets.jpg', 'parrot.jpg', 'owl.jpg', 'hot_dog.jpg', 'cat_720p.jpg', 'grace_hopper.jpg']]
    randomise(model, calib, g)
    with torch.no_grad():
        det = model([img])[0]
    save_file({'boxes': det['boxes'].contiguous(), 'scores': det['scores'].contiguous(),
               'labels': det['labels'].contiguous()}, os.path.join(out, 'ssdlite_s0_detections.safetensors'))
    metadata = {'task': 'detection', 'architecture': 'ssdlite', 'variant': 's0', 'num_classes': '91',
                'image_size': str(SIZE), 'mean': json.dumps(MEAN), 'std': json.dumps(STD)}
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out, 'ssdlite_s0.safetensors'), metadata=metadata)
    print(f'wrote {out}: {len(det["scores"])} detections, top score {det["scores"][0]:.4f}')


def compare(out, results_json):
    """Share of torchvision's top-100 detections that `detect --json` reproduces (same class, IoU >= 0.99,
    |score diff| <= 1e-4)."""
    from safetensors.torch import load_file
    ref = load_file(os.path.join(out, 'ssdlite_s0_detections.safetensors'))
    ours = json.load(open(results_json))
    ob = torch.tensor([[d['bbox'][0], d['bbox'][1], d['bbox'][0] + d['bbox'][2], d['bbox'][1] + d['bbox'][3]]
                       for d in ours])
    os_ = torch.tensor([d['score'] for d in ours])
    ol = torch.tensor([d['category_id'] for d in ours])
    iou = box_ops.box_iou(ref['boxes'][:100], ob)
    ok = (iou >= 0.99) & (ref['labels'][:100, None] == ol[None]) & \
         ((ref['scores'][:100, None] - os_[None]).abs() <= 1e-4)
    hit = ok.any(1)
    print(f'top-100 matched: {int(hit.sum())}/100; ours {len(ours)} vs torchvision {len(ref["scores"])} detections')
    best = torch.where(ok, iou, torch.zeros_like(iou)).max(1).values[hit]
    print(f'min IoU of matches {float(best.min()):.6f}')


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('mode', nargs='?', default='tiny', choices=['tiny', 'full', 'compare'])
    ap.add_argument('results', nargs='?', help='detect --json output (compare mode)')
    ap.add_argument('--out', default=None)
    args = ap.parse_args()
    if args.mode != 'tiny':
        out = args.out or os.path.join(HERE, 'out', 'ssdlite')
        return full(out) if args.mode == 'full' else compare(out, args.results)
    args.out = args.out or os.path.join(REPO, 'heads', 'ssdlite', 'tests', 'fixtures')
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(20260127)
    fx = {}

    # Default boxes for several input sizes (grids as the network produces them, and a rectangular case).
    gen = DefaultBoxGenerator([[2, 3] for _ in range(6)], min_ratio=0.2, max_ratio=0.95)
    cases = {
        '320': ([(20, 20), (10, 10), (5, 5), (3, 3), (2, 2), (1, 1)], (320, 320)),
        '160': ([(10, 10), (5, 5), (3, 3), (2, 2), (1, 1), (1, 1)], (160, 160)),
        '150x200': ([(10, 13), (5, 7), (3, 4), (2, 2), (1, 1), (1, 1)], (150, 200)),
    }
    for name, (grids, size) in cases.items():
        fx[f'anchors.{name}'] = anchors_for(gen, grids, size)

    # Box coder: encode random boxes against random anchors, decode back, and decode extreme codes.
    coder = det_utils.BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    xy = torch.rand(64, 2, generator=g) * 300
    anchors = torch.cat([xy, xy + torch.rand(64, 2, generator=g) * 100 + 1], 1)
    xy = torch.rand(64, 2, generator=g) * 300
    boxes = torch.cat([xy, xy + torch.rand(64, 2, generator=g) * 100 + 1], 1)
    codes = coder.encode_single(boxes, anchors)
    fx['coder.anchors'] = anchors
    fx['coder.boxes'] = boxes
    fx['coder.encoded'] = codes
    wild = torch.randn(64, 4, generator=g) * 30  # exercises the log(1000/16) clamp
    fx['coder.wild_codes'] = wild
    fx['coder.wild_decoded'] = coder.decode_single(wild, anchors)

    # Bilinear resize exactly as F.interpolate(align_corners=False): up, down and mixed.
    photo = Image.open(PHOTO).convert('RGB')
    small = photo.resize((213, 160), Image.BILINEAR)
    small.save(os.path.join(args.out, 'pets_213x160.png'))
    small = Image.open(os.path.join(args.out, 'pets_213x160.png')).convert('RGB')
    x = torch.rand(3, 17, 23, generator=g)
    fx['resize.random_in'] = x
    fx['resize.random_out_40x31'] = F.interpolate(x[None], size=(40, 31), mode='bilinear', align_corners=False)[0]
    img = to_tensor(small)
    fx['resize.photo_out_48x64'] = F.interpolate(img[None], size=(48, 64), mode='bilinear', align_corners=False)[0]

    # The model.
    model = build_model()
    calib = [to_tensor(Image.open(os.path.join(os.path.dirname(PHOTO), n)).convert('RGB').resize((256, 192)))
             for n in ['pets.jpg', 'parrot.jpg', 'owl.jpg', 'hot_dog.jpg', 'cat_720p.jpg', 'grace_hopper.jpg']]
    randomise(model, calib, g)
    with torch.no_grad():
        images, _ = model.transform([img])
        fx['transform.photo_corner'] = images.tensors[0, :, :32, :32].contiguous()
        feats = list(model.backbone(images.tensors).values())
        head = model.head(feats)
        # Every other anchor keeps the fixture small; the detections below cover the rest.
        fx['head.cls_logits'] = head['cls_logits'][0, ::2]
        fx['head.bbox_regression'] = head['bbox_regression'][0, ::2]
        for i, f in enumerate(feats):
            fx[f'features.{i}.mean'] = f.mean(dim=(0, 2, 3))
        det = model([img])[0]
    fx['detections.boxes'] = det['boxes']
    fx['detections.scores'] = det['scores']
    fx['detections.labels'] = det['labels']

    # Matcher and loss on given targets at 160x160 input (840 anchors): a normal image, a crowded one with
    # a tiny box (forced low-quality match) and two boxes sharing a best anchor, and an empty one.
    anchors160 = fx['anchors.160']
    targets = [
        {'boxes': torch.tensor([[10., 20., 90., 120.], [60., 60., 150., 140.], [0., 0., 40., 30.]]),
         'labels': torch.tensor([3, 7, 1])},
        {'boxes': torch.tensor([[70., 70., 74., 73.], [30., 40., 110., 100.], [31., 41., 109., 101.],
                                [5., 100., 60., 158.]]),
         'labels': torch.tensor([2, 10, 4, 5])},
        {'boxes': torch.zeros(0, 4), 'labels': torch.zeros(0, dtype=torch.int64)},
    ]
    matcher = det_utils.SSDMatcher(0.5)
    matched = []
    for i, t in enumerate(targets):
        if t['boxes'].numel() == 0:
            m = torch.full((anchors160.size(0),), -1, dtype=torch.int64)
        else:
            m = matcher(box_ops.box_iou(t['boxes'], anchors160))
        matched.append(m)
        fx[f'loss.target{i}.boxes'] = t['boxes']
        fx[f'loss.target{i}.labels'] = t['labels']
        fx[f'loss.matched{i}'] = m
    head_out = {'cls_logits': torch.randn(3, 840, NUM_CLASSES, generator=g) * 2,
                'bbox_regression': torch.randn(3, 840, 4, generator=g)}
    losses = model.compute_loss(targets, head_out, [anchors160] * 3, matched)
    fx['loss.cls_logits'] = head_out['cls_logits']
    fx['loss.bbox_regression'] = head_out['bbox_regression']
    fx['loss.bbox_value'] = losses['bbox_regression'].reshape(1)
    fx['loss.cls_value'] = losses['classification'].reshape(1)

    # End to end in training mode (BatchNorm on batch statistics): the photo and its mirror image, with
    # targets in original pixels that the transform rescales to the 320x320 input.
    train_targets = [
        {'boxes': torch.tensor([[20., 30., 120., 150.], [100., 60., 200., 140.]]), 'labels': torch.tensor([5, 2])},
        {'boxes': torch.tensor([[93., 30., 193., 150.]]), 'labels': torch.tensor([9])},
    ]
    train_model = copy.deepcopy(model)
    train_model.train()
    train_losses = train_model([img, img.flip(-1)], train_targets)
    for i, t in enumerate(train_targets):
        fx[f'train.target{i}.boxes'] = t['boxes']
        fx[f'train.target{i}.labels'] = t['labels']
    fx['train.bbox_value'] = train_losses['bbox_regression'].detach().reshape(1)
    fx['train.cls_value'] = train_losses['classification'].detach().reshape(1)

    fx = {k: v.contiguous() for k, v in fx.items()}
    save_file(fx, os.path.join(args.out, 'reference.safetensors'))

    metadata = {
        'task': 'detection',
        'architecture': 'ssdlite',
        'variant': 'custom',
        'mobileone_config': json.dumps(TRUNK),
        'extra_channels': json.dumps(EXTRA_CHANNELS),
        'num_classes': str(NUM_CLASSES),
        'image_size': str(SIZE),
        'mean': json.dumps(MEAN),
        'std': json.dumps(STD),
        'class_names': json.dumps(['background'] + [f'class{i}' for i in range(1, NUM_CLASSES)]),
        'label_to_category_id': json.dumps(list(range(NUM_CLASSES))),
    }
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(args.out, 'tiny_ssdlite.safetensors'), metadata=metadata)
    n = sum(v.numel() for v in state.values())
    print(f'{len(state)} tensors, {n} values; {len(det["scores"])} detections, top score {det["scores"][0]:.4f}')
    print('losses', {k: float(v) for k, v in losses.items()}, 'train', {k: float(v) for k, v in train_losses.items()})
    print('matched foreground per image', [int((m >= 0).sum()) for m in matched])


if __name__ == '__main__':
    main()
