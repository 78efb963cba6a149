#!/usr/bin/env bash
# Set up (idempotent) and run the bundled demo: a torchvision ViT ported into timm's ViT.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python examples/demo.py
