#!/usr/bin/env bash
# Install archalign with everything its tests, examples and checks need, into the current Python.
# torch/torchvision are pinned to the CPU-compatible builds these machines keep on local disk.
# Debian's chromium (for the HTML report's browser test) is installed when absent and possible.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check \
    "torch==2.14.1" "torchvision==0.29.1" -e ".[dev]"
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
        && [ "$(id -u)" = "0" ]; then
    echo "installing Debian's chromium for the browser test" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
