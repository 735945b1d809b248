"""MobileOne reference fixtures from timm (pinned in requirements.txt).

Builds timm MobileOne models with random weights and calibrated, then randomised, BatchNorm statistics,
patches output stride 16/8 by dilation as torchvision's `replace_stride_with_dilation` does, and writes:

  tiny   (committed, backbone/tests/fixtures/): a tiny config with every branch type, k = 2, SE and two
         blocks per stage; weights in timm and Apple naming, unfused and fused; an odd-sized input; timm's
         features (strides 2..32) and logits for output strides 32/16/8.
  manifest (committed): key -> shape for S0-S4 in timm and Apple naming, unfused and fused.
  full   (not committed, tools/reference/out/full/): the same for the real S0-S4 at 224x224, compared
         against the `mobileone features` binary by compare_full.py.

Usage: .venv/bin/python backbone_fixtures.py {tiny,manifest,full} [--out DIR]
"""
import argparse
import copy
import json
import os
import re

import numpy as np
import torch
import timm
from timm.models.byobnet import ByobNet, ByoModelCfg, _mobileone_bcfg, MobileOneBlock
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

# Tiny MobileOne: widths 16/32/64/64 (stem 16), two block pairs per stage, k = 2, SE in the last pair of
# stage 3 and both pairs of stage 4. Mirrors `MobileOneConfig` in backbone/tests/parity.rs.
TINY_CFG = ByoModelCfg(
    blocks=_mobileone_bcfg(d=(2, 2, 2, 2), wf=(0.25, 0.25, 0.25, 0.125), se_blocks=(0, 0, 1, 2), num_conv_branches=2),
    stem_type='one',
    stem_chs=16,
)
TINY_CLASSES = 10


def build(variant, num_classes):
    if variant == 'tiny':
        return ByobNet(TINY_CFG, num_classes=num_classes)
    return timm.create_model(f'mobileone_{variant}', pretrained=False, num_classes=num_classes)


def randomise(model, seed, calib_size):
    """Random weights; BN running stats calibrated on random images, then perturbed so that no stat is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif name.endswith('weight'):
                p.copy_(torch.rand(p.shape, generator=g) * 1.0 + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        model.train()
        calib = [torch.randn((2, 3, calib_size, calib_size), generator=g) for _ in range(3)]
        # Random SE layers see pooled activations in the hundreds, so their sigmoids saturate, silence
        # channels that the next BN then amplifies, and the network turns chaotic (rounding noise grows 10x per
        # block: no tolerance could compare it). Scale each fc1 so the gate's input is O(1) and keep the gates
        # within sigmoid(±1), as in a trained network, before calibrating BN.
        pooled_rms = {}

        def record(module, inputs):
            pooled_rms[module] = float(inputs[0].mean((2, 3)).pow(2).mean().sqrt())

        hooks = [m.register_forward_pre_hook(record) for m in model.modules() if m.__class__.__name__ == 'SEModule']
        model(calib[0])
        for h in hooks:
            h.remove()
        for m, rms in pooled_rms.items():
            m.fc1.weight.div_(max(rms, 1e-6))
            m.fc2.weight.mul_(0.25)
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
        for x in calib:
            model(x)
        for m in bns:
            m.running_mean.mul_(1 + 0.2 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.mul_(torch.empty(m.running_var.shape).uniform_(0.8, 1.25, generator=g))
            # Channels left dead by random ReLUs calibrate to a variance near 0; BN then multiplies rounding
            # noise by 1/sqrt(eps) and even timm's own fused and unfused S4 disagree by 1e-2. A floor at 25%
            # of the layer's median keeps the random network as well-conditioned as a trained one.
            m.running_var.clamp_(min=0.25 * float(m.running_var.median()))
            m.momentum = 0.1
    model.eval()
    return model


def dilate(model, output_stride):
    """torchvision's replace_stride_with_dilation on timm's MobileOne: in a dilated stage the stride-2 first
    layer becomes stride 1 and keeps the previous dilation; its later 3x3 layers use the new dilation."""
    dilated = {32: 0, 16: 1, 8: 2}[output_stride]
    dilation = 1
    for s, stage in enumerate(model.stages):
        if s < 4 - dilated:
            continue
        previous, dilation = dilation, dilation * 2
        for b, block in enumerate(stage):
            convs = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1]
            for m in block.modules():
                if isinstance(m, torch.nn.Conv2d) and m.stride != (1, 1):
                    m.stride = (1, 1)
            if b == 0:
                d = previous
            else:
                d = dilation
            for m in convs:
                m.dilation = (d, d)
                m.padding = (d, d)
    return model


def features(model, x):
    """Features at strides 2, 4, 8, 16, 32 (timm features_only order) and logits."""
    out = []
    y = model.stem(x)
    out.append(y)
    for stage in model.stages:
        y = stage(y)
        out.append(y)
    logits = model.forward_head(model.final_conv(y)) if model.num_classes else None
    return out, logits


def fuse(model):
    fused = copy.deepcopy(model)
    for m in fused.modules():
        if isinstance(m, MobileOneBlock):
            m.reparameterize()
    return fused


TIMM_TO_APPLE = [
    (r'^stem\.', 'stage0.'),
    (r'^stages\.(\d+)\.', lambda m: f'stage{int(m.group(1)) + 1}.'),
    (r'\.conv_kxk\.', '.rbr_conv.'),
    (r'\.conv_scale\.', '.rbr_scale.'),
    (r'\.identity\.', '.rbr_skip.'),
    (r'\.attn\.fc1\.', '.se.reduce.'),
    (r'\.attn\.fc2\.', '.se.expand.'),
    (r'^head\.fc\.', 'linear.'),
]


def to_apple(key):
    for pattern, repl in TIMM_TO_APPLE:
        key = re.sub(pattern, repl, key)
    return key


def state(model, apple=False):
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return {to_apple(k): v for k, v in sd.items()} if apple else sd


def save_weights(model, out, stem):
    """timm safetensors and Apple .pth.tar (a torch.save zip) for the same weights."""
    save_file({k: v for k, v in state(model).items() if v.dtype.is_floating_point}, os.path.join(out, f'{stem}.safetensors'))
    torch.save(state(model, apple=True), os.path.join(out, f'{stem}_apple.pth.tar'))


def write_case(variant, out, size, seed, num_classes):
    os.makedirs(out, exist_ok=True)
    h, w = size if isinstance(size, tuple) else (size, size)
    base = randomise(build(variant, num_classes), seed, min(h, 128))
    save_weights(base, out, 'unfused')
    save_weights(fuse(base), out, 'fused')
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn((1, 3, h, w), generator=g)
    tensors = {'input': x}
    errors = {}
    with torch.no_grad():
        for os_ in (32, 16, 8):
            model = dilate(copy.deepcopy(base), os_)
            feats, logits = features(model, x)
            ffeats, _ = features(fuse(model), x)
            for i, f in enumerate(feats):
                tensors[f'os{os_}.features.{i}'] = f.contiguous()
                errors[f'os{os_}.features.{i}'] = float((ffeats[i] - f).abs().max() / f.abs().max())
            if logits is not None and os_ == 32:
                tensors['logits'] = logits.contiguous()
    save_file(tensors, os.path.join(out, 'reference.safetensors'))
    np.save(os.path.join(out, 'input.npy'), x.numpy())
    with open(os.path.join(out, 'timm_fused_vs_unfused.json'), 'w') as f:
        json.dump(errors, f, indent=1)
    print(f'{variant}: wrote {out}; timm fused vs unfused max rel err {max(errors.values()):.2e}')


def manifest(out):
    result = {}
    for variant in ('s0', 's1', 's2', 's3', 's4'):
        model = build(variant, 1000)
        fused = fuse(model)
        entry = {}
        for form, m in (('unfused', model), ('fused', fused)):
            for naming, apple in (('timm', False), ('apple', True)):
                entry[f'{naming}_{form}'] = {k: list(v.shape) for k, v in state(m, apple).items()
                                            if not k.endswith('num_batches_tracked')}
        entry['params_fused'] = sum(p.numel() for p in fused.parameters())
        result[variant] = entry
    path = os.path.join(out, 'manifest.json')
    with open(path, 'w') as f:
        json.dump(result, f, separators=(',', ':'), sort_keys=True)
    print(f'wrote {path}')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('what', choices=['tiny', 'manifest', 'full'])
    parser.add_argument('--out', default=None)
    parser.add_argument('--variants', default='s0,s1,s2,s3,s4')
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.what == 'tiny':
        write_case('tiny', args.out or os.path.join(REPO, 'backbone/tests/fixtures/tiny'), (45, 51), 0, TINY_CLASSES)
    elif args.what == 'manifest':
        manifest(args.out or os.path.join(REPO, 'backbone/tests/fixtures'))
    else:
        for i, v in enumerate(args.variants.split(',')):
            write_case(v, os.path.join(args.out or os.path.join(HERE, 'out/full'), v), 224, 100 + i, 1000)


if __name__ == '__main__':
    main()
