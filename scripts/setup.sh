#!/usr/bin/env bash
# Idempotent setup for a fresh machine: a venv in .venv with pinned torch, this package
# in editable mode with all extras, and Debian's Fashion-MNIST when we are root.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# Never newer than 2.14.1: that is the newest build this project is tested on.
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
# compat: the checkout is on sys.path (a .pth), so a user's own shards/ or jobs/ folder in the
# working directory cannot shadow the package the way the default editable finder lets it
.venv/bin/python -m pip install -q -e '.[pretrained,deploy,tflite,serve,test,bench]' --config-settings editable_mode=compat

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null
    else
        echo "note: Fashion-MNIST is missing; run 'sudo apt-get install dataset-fashion-mnist'" >&2
    fi
fi
# the serve page's test drives Debian's chromium through chromedriver (skipped without them)
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null
    else
        echo "note: chromium is missing; run 'sudo apt-get install chromium chromium-driver'" >&2
    fi
fi
echo "setup done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
