"""DeepLabV3 reference fixtures from torchvision (pinned in requirements.txt).

Builds torchvision's `DeepLabV3` with a timm MobileOne trunk under `backbone.body` (dilated as torchvision's
`replace_stride_with_dilation` does, via backbone_fixtures.dilate), a `DeepLabHead` made of torchvision's
`ASPP` and the same layer sequence but a narrower width (torchvision fixes 256; the tiny width keeps the
committed files small), and an `FCNHead` auxiliary classifier on the stride-16 features. Random weights,
BatchNorm statistics calibrated on real photos and then randomised. Writes to heads/deeplabv3/tests/fixtures/:

  tiny.safetensors        the model's weights (torchvision keys) with segmenter metadata
  reference.safetensors   per case (output strides 32/16/8, each its own photo of odd size and its own atrous
                          rates): `{case}.image` (H, W, 3) uint8, `{case}.logits` (1, C, H, W) float32,
                          `{case}.aux_logits` for the stride-8 case; plus `resize.*` cases of F.interpolate
  cases.json              per case: output stride, atrous rates, photo, size

  full (not committed, tools/reference/out/deeplabv3_full/): a real-size DeepLabV3-MobileOne (torchvision's
       256-wide head, 21 classes, aux head) per variant with random calibrated weights, a photo as PNG (so both
       sides decode identical pixels) and torchvision's logits at output strides 16 and 8; `compare` then runs
       the `segment` binary on them and prints max |diff| / max |ref| and the argmax agreement.

Usage: .venv/bin/python deeplabv3_fixtures.py {tiny,full,compare} [--out DIR] [--variants s0,s1]
"""
import argparse
import json
import os
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from PIL import Image
from safetensors.torch import save_file
import timm
from timm.models.byobnet import ByobNet
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabV3
from torchvision.models.segmentation.fcn import FCNHead

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from backbone_fixtures import TINY_CFG, dilate  # noqa: E402  (same tiny trunk and dilation as the backbone)

PHOTOS = os.environ.get('MOBILEONE_DATA', os.path.join(REPO, '..', 'shared', 'data')) + '/photos'
NUM_CLASSES = 4
HEAD_CHANNELS = 16
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
# (name, output stride, atrous rates, photo, (height, width)): odd sizes, both orientations, small rates
# where the feature maps are small and torchvision's defaults where dilation reaches past them.
CASES = [
    ('os32', 32, (1, 2, 3), 'pets.jpg', (97, 131)),
    ('os16', 16, (2, 4, 6), 'parrot.jpg', (113, 83)),
    ('os8', 8, (12, 24, 36), 'owl.jpg', (75, 101)),
]


class Trunk(nn.Module):
    """IntermediateLayerGetter-like wrapper: keys `body.*`, returns {'out': last features, 'aux': stride-16 features}."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        y = self.body.stem(x)
        feats = []
        for stage in self.body.stages:
            y = stage(y)
            feats.append(y)
        return OrderedDict(out=feats[3], aux=feats[2])


def deeplab_head(in_channels, num_classes, rates, width):
    """torchvision's DeepLabHead with the width as a parameter (DeepLabHead itself hard-codes 256)."""
    return nn.Sequential(
        ASPP(in_channels, rates, out_channels=width),
        nn.Conv2d(width, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, num_classes, 1),
    )


def build(output_stride, rates, variant='tiny', num_classes=NUM_CLASSES, width=HEAD_CHANNELS):
    if variant == 'tiny':
        body = ByobNet(TINY_CFG, num_classes=0)
    else:
        body = timm.create_model(f'mobileone_{variant}', pretrained=False, num_classes=0)
    body = dilate(body, output_stride)
    channels = [info['num_chs'] for info in body.feature_info][-4:]
    return DeepLabV3(Trunk(body), deeplab_head(channels[3], num_classes, rates, width),
                     FCNHead(channels[2], num_classes))


def photo(name, size):
    h, w = size
    img = Image.open(os.path.join(PHOTOS, name)).convert('RGB').resize((w, h), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img).copy())


def normalise(image):
    x = image.permute(2, 0, 1).float() / 255.0
    return ((x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]).unsqueeze(0)


def randomise(model, seed, images):
    """Random weights; BN statistics calibrated on the photos (cumulative average), then perturbed."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the dropout layers draw from the global generator during calibration
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
            elif name.endswith('weight'):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        for image in images:
            model(torch.cat([image, image.flip(3)]))
        for m in bns:
            m.running_mean.mul_(1 + 0.2 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.mul_(torch.empty(m.running_var.shape).uniform_(0.8, 1.25, generator=g))
            m.momentum = 0.1
    return model.eval()


def resize_cases():
    g = torch.Generator().manual_seed(7)
    out = {}
    for i, (shape, size) in enumerate([((1, 2, 7, 5), (13, 11)), ((1, 1, 9, 12), (4, 5)), ((2, 1, 5, 6), (5, 17)),
                                       ((1, 3, 1, 1), (6, 4)), ((1, 2, 6, 8), (97, 131)), ((1, 1, 31, 29), (3, 30))]):
        x = torch.randn(shape, generator=g)
        out[f'resize.{i}.input'] = x
        out[f'resize.{i}.output'] = F.interpolate(x, size=size, mode='bilinear', align_corners=False)
    return out


FULL_PHOTO = ('pets.jpg', (430, 512))
FULL_STRIDES = (16, 8)


def full(out, variants):
    """Real-size models: weights + metadata, the photo as PNG, torchvision's logits per output stride."""
    file, (h, w) = FULL_PHOTO
    image = photo(file, (h, w))
    os.makedirs(out, exist_ok=True)
    Image.fromarray(image.numpy()).save(os.path.join(out, 'photo.png'))
    x = normalise(image)
    for i, variant in enumerate(variants):
        base = randomise(build(16, (12, 24, 36), variant, 21, 256), 10 + i, [x, normalise(photo('owl.jpg', (384, 512)))])
        state = {k: v.contiguous() for k, v in base.state_dict().items() if not k.endswith('num_batches_tracked')}
        save_file(state, os.path.join(out, f'{variant}.safetensors'),
                  metadata={'task': 'segmentation', 'variant': variant, 'num_classes': '21', 'aux_stride': '16'})
        with torch.no_grad():
            for os_ in FULL_STRIDES:
                model = build(os_, (12, 24, 36), variant, 21, 256)
                model.load_state_dict(base.state_dict())
                logits = model.eval()(x)['out']
                np.save(os.path.join(out, f'{variant}_os{os_}.npy'), logits.numpy())
        print(f'{variant}: wrote weights and logits at output strides {FULL_STRIDES} to {out}')


def compare(out, variants):
    """Runs `segment` (built with cargo build --release) on the full fixtures and prints the errors."""
    binary = os.path.join(REPO, 'target/release/segment')
    for variant in variants:
        for os_ in FULL_STRIDES:
            for fuse in ([], ['--fuse']):
                ours_path = os.path.join(out, f'ours_{variant}_os{os_}.npy')
                subprocess.run([binary, os.path.join(out, 'photo.png'), '--weights', os.path.join(out, f'{variant}.safetensors'),
                                '--output-stride', str(os_), '--out-dir', out, '--logits-out', ours_path] + fuse,
                               check=True, capture_output=True)
                ref = np.load(os.path.join(out, f'{variant}_os{os_}.npy'))
                ours = np.load(ours_path)
                err = np.abs(ours - ref).max() / np.abs(ref).max()
                agree = (ours.argmax(1) == ref.argmax(1)).mean()
                print(f'{variant} os{os_}{" fused" if fuse else ""}: logits {ref.shape}, max rel err {err:.2e}, '
                      f'argmax agreement {100 * agree:.4f}%')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('what', choices=['tiny', 'full', 'compare'], nargs='?', default='tiny')
    parser.add_argument('--out', default=None)
    parser.add_argument('--variants', default='s0,s4')
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.what != 'tiny':
        out = args.out or os.path.join(HERE, 'out/deeplabv3_full')
        (full if args.what == 'full' else compare)(out, args.variants.split(','))
        return
    args.out = args.out or os.path.join(REPO, 'heads/deeplabv3/tests/fixtures')
    os.makedirs(args.out, exist_ok=True)
    images = {name: photo(file, size) for name, _, _, file, size in CASES}
    # Weights do not depend on the output stride or the rates: calibrate once at stride 16, share them.
    base = randomise(build(16, (2, 4, 6)), 0, [normalise(im) for im in images.values()])
    state = {k: v.contiguous() for k, v in base.state_dict().items() if not k.endswith('num_batches_tracked')}
    metadata = {'task': 'segmentation', 'num_classes': str(NUM_CLASSES), 'head_channels': str(HEAD_CHANNELS),
                'aux_stride': '16', 'class_names': json.dumps(['sky', 'tree', 'cat', 'parrot']),
                'mean': json.dumps(MEAN), 'std': json.dumps(STD)}
    save_file(state, os.path.join(args.out, 'tiny.safetensors'), metadata=metadata)
    tensors = resize_cases()
    cases = {}
    with torch.no_grad():
        for name, os_, rates, file, size in CASES:
            model = build(os_, rates)
            model.load_state_dict(base.state_dict())
            model.eval()
            result = model(normalise(images[name]))
            tensors[f'{name}.image'] = images[name]
            tensors[f'{name}.logits'] = result['out'].contiguous()
            if os_ == 8:
                tensors[f'{name}.aux_logits'] = result['aux'].contiguous()
            cases[name] = {'output_stride': os_, 'atrous_rates': list(rates), 'photo': file, 'size': list(size)}
            top2 = result['out'].topk(2, dim=1).values
            print(f'{name}: logits max |{result["out"].abs().max():.3f}|, classes present '
                  f'{sorted(result["out"].argmax(1).unique().tolist())}, min top-2 margin {(top2[:, 0] - top2[:, 1]).min():.2e}')
    save_file(tensors, os.path.join(args.out, 'reference.safetensors'))
    with open(os.path.join(args.out, 'cases.json'), 'w') as f:
        json.dump(cases, f, indent=1)
    sizes = {f: os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out)}
    print(f'wrote {args.out}: {sizes}')


if __name__ == '__main__':
    main()
