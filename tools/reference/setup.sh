#!/usr/bin/env bash
# Creates tools/reference/.venv with the pinned reference implementations (torch, timm, torchvision,
# pycocotools, ONNX Runtime). Needed only to regenerate fixtures or run benchmarks, never by CI.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python3 -m venv "$here/.venv"
"$here/.venv/bin/pip" install --quiet --upgrade pip
"$here/.venv/bin/pip" install --quiet -r "$here/requirements.txt"
echo "reference venv ready: $here/.venv"
