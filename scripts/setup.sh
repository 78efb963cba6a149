#!/usr/bin/env bash
# Install archalign with everything its tests, examples and checks need, into the current Python.
# torch/torchvision are pinned to the CPU-compatible builds these machines keep on local disk.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check \
    "torch==2.14.1" "torchvision==0.29.1" -e ".[dev]"
