"""Training throughput of the same models in PyTorch (CPU), to set beside
`cargo run --release -p mobileone-train --example throughput -- det|seg SIZE BATCH STEPS`.

Train-time MobileOne-S0 (timm, random init), SSDLite (torchvision `SSD` + `SSDLiteHead`, extras
512/256/256/128, 8 classes) or DeepLabV3 (ASPP rates 12/24/36, output stride 16, no aux head, 8 classes);
one SGD step per batch: forward in training mode with the loss, backward, optimizer step.

    tools/reference/.venv/bin/python tools/reference/train_throughput.py det --size 160 --batch 8 --steps 4
"""
import argparse
import os
import sys
import time

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ssdlite_fixtures as ssd  # noqa: E402
import deeplabv3_fixtures as dl  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument('what', choices=['det', 'seg'])
    p.add_argument('--size', type=int, default=160)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--steps', type=int, default=4)
    p.add_argument('--threads', type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x = torch.randn(a.batch, 3, a.size, a.size)
    if a.what == 'det':
        body = timm.create_model('mobileone_s0', pretrained=False, num_classes=0)
        ssd.SIZE = a.size
        model = ssd.build_model(body=body, taps=[256, 1024], extra_channels=[512, 256, 256, 128],
                                num_classes=8)
        half = a.size / 2
        targets = [{'boxes': torch.tensor([[10.0, 12.0, half, half + 5]]), 'labels': torch.tensor([3])}
                   for _ in range(a.batch)]

        def loss_fn():
            losses = model(list(x), targets)
            return sum(losses.values())
    else:
        model = dl.build(16, [12, 24, 36], variant='s0', num_classes=8, width=256)
        model.aux_classifier = None
        labels = torch.zeros(a.batch, a.size, a.size, dtype=torch.long)

        def loss_fn():
            out = model(x)['out']
            return torch.nn.functional.cross_entropy(out, labels, ignore_index=255)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    for step in range(a.steps):
        t0 = time.perf_counter()
        loss = loss_fn()
        t1 = time.perf_counter()
        opt.zero_grad()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        print(f'pytorch {a.what} step {step}: forward {t1 - t0:.3f} s, backward {t2 - t1:.3f} s, '
              f'optimizer {t3 - t2:.3f} s, {a.batch / (t3 - t0):.2f} img/s')


if __name__ == '__main__':
    main()
