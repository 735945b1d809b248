"""Full-size parity: timm S0-S4 (random weights, calibrated BN) against the `mobileone features` binary.

Writes the reference cases with backbone_fixtures.py (tools/reference/out/full/, not committed), runs the
release binary on every weight form (timm/Apple naming, unfused/fused, and --fuse on unfused) and output
stride 32/16/8, and prints the largest relative error (max |diff| / max |ref|) per variant.

Usage: .venv/bin/python compare_full.py [--variants s0,s1,s2,s3,s4] [--skip-generate]
"""
import argparse
import os
import subprocess
import sys

from safetensors.numpy import load_file
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BIN = os.path.join(REPO, 'target/release/mobileone')


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--variants', default='s0,s1,s2,s3,s4')
    parser.add_argument('--skip-generate', action='store_true')
    args = parser.parse_args()
    out = os.path.join(HERE, 'out/full')
    if not args.skip_generate:
        subprocess.run([sys.executable, os.path.join(HERE, 'backbone_fixtures.py'), 'full', '--variants', args.variants], check=True)
    subprocess.run(['cargo', 'build', '--release', '-q', '-p', 'mobileone-cli', '--bin', 'mobileone'], cwd=REPO, check=True)
    print(f'{"variant":<8} {"weights":<24} {"os":>3} {"max rel err":>12}')
    worst = {}
    for variant in args.variants.split(','):
        case = os.path.join(out, variant)
        ref = load_file(os.path.join(case, 'reference.safetensors'))
        for weights, fuse in [('unfused.safetensors', False), ('unfused.safetensors', True),
                              ('unfused_apple.pth.tar', False), ('fused.safetensors', False),
                              ('fused_apple.pth.tar', False)]:
            for os_ in (32, 16, 8):
                got_path = os.path.join(case, 'ours.safetensors')
                cmd = [BIN, 'features', '--variant', variant, '--weights', os.path.join(case, weights),
                       '--input', os.path.join(case, 'input.npy'), '--out', got_path, '--output-stride', str(os_)]
                if fuse:
                    cmd.append('--fuse')
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                got = load_file(got_path)
                errs = []
                for i in range(5):
                    r = ref[f'os{os_}.features.{i}']
                    errs.append(np.abs(got[f'features.{i}'] - r).max() / np.abs(r).max())
                if os_ == 32:
                    errs.append(np.abs(got['logits'] - ref['logits']).max() / np.abs(ref['logits']).max())
                err = max(errs)
                label = weights + (' --fuse' if fuse else '')
                print(f'{variant:<8} {label:<24} {os_:>3} {err:>12.2e}', flush=True)
                worst[variant] = max(worst.get(variant, 0.0), err)
    print('\nlargest relative error per variant (every level, logits, all forms and output strides):')
    for v, e in worst.items():
        print(f'  {v}: {e:.2e}  {"ok" if e <= 1e-4 else "ABOVE 1e-4"}')


if __name__ == '__main__':
    main()
