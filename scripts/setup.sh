#!/usr/bin/env bash
# Install archalign with everything its tests, examples and checks need, into the current Python.
# torch/torchvision are pinned to the CPU-compatible builds these machines keep on local disk.
# Debian's chromium (for the HTML report's browser test) is installed when absent and possible.
# Says what it does on stderr; idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo "scripts/setup.sh: $*" >&2; }
say "installing archalign (editable) with torch 2.14.1, torchvision 0.29.1 and the dev extras"
say "into $(command -v python) (the first run takes about 2 minutes)"
python -m pip install --quiet --disable-pip-version-check \
    "torch==2.14.1" "torchvision==0.29.1" -e ".[dev]"
if command -v chromium >/dev/null 2>&1; then
    say "chromium found: the review page's browser test will run"
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    say "installing Debian's chromium with apt-get, for the review page's browser test"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
else
    say "no chromium and no root apt-get: the review page's browser test will be skipped"
fi
say "done: $(python -c 'import archalign; print("archalign", archalign.__version__, "from", archalign.__file__)')"
