#!/usr/bin/env bash
# ImageNet evaluation of Apple's S0 on $MOBILEONE_DATA/imagenet-val-1300, ours and timm's side by side
# in one run (2 threads each, one after the other, twice, alternating), with the machine named.
# Needs tools/reference/.venv (tools/reference/setup.sh) and a release build of `mobileone`.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${MOBILEONE_DATA:-../shared/data}
W=$DATA/weights/mobileone_s0_fused_apple_in1k.safetensors
lscpu | grep -E "Model name" ; echo "SIMD: $(grep -o -w -E 'avx2|avx512f|avx512_bf16|amx_tile|fma' /proc/cpuinfo | sort -u | tr '\n' ' ')"
uptime
for round in 1 2; do
  echo "== round $round: ours"
  RAYON_NUM_THREADS=2 target/release/mobileone classify --dataset imagenet --data-root "$DATA/imagenet-val-1300" \
      --weights "$W" --threads 2 --batch 32 --json "/tmp/imagenet_ours_$round.json" 2>/dev/null
  echo "== round $round: timm + torch DataLoader"
  MOBILEONE_DATA=$DATA OMP_WAIT_POLICY=PASSIVE tools/reference/.venv/bin/python tools/reference/classify_fixtures.py --imagenet 2>/dev/null | tail -1
done
uptime
