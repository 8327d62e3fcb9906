#!/usr/bin/env bash
# Download the wheels bench/gpu_check.py needs on a lent GPU machine into .gpu-wheels/ (ignored
# by git; carried to the machine beside the working tree). Run it here, where pip has an index.
#
# The machine has no internet and a Python 3.12 venv holding torch 2.11, torchvision 0.26,
# numpy, pillow, pyyaml, fsspec, filelock, tqdm, matplotlib, onnx and onnxruntime (the device
# notes' package list). Of what gpu_check imports, in itself and in every process it starts
# (found by running `PYTHONPROFILEIMPORTTIME=1 python bench/gpu_check.py --device cpu` and
# listing the modules in its logs), only tenacity and simplejpeg are missing there: two wheels,
# under 1 MB. botocore and aiohttp are imported only when present (storage's retry rules);
# wandb, s3fs, submitit and optuna are not imported at all (wandb disabled, local files).
#
# The one command on the machine, in the repo root, with .gpu-wheels carried (it keeps the
# report and the logs in $OUT, not the checkpoints):
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu-wheels/*.whl && PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --output /tmp/gc; rc=$?; cp /tmp/gc/gpu_check.json "$OUT"/; (cd /tmp/gc && tar czf "$OUT"/logs.tgz *.log); exit $rc
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu-wheels
PY=${PYTHON:-python3}
# Versions as in this project's venv (setup.cfg's floors: tenacity>=8.3)
WHEELS=(tenacity==9.2.1 simplejpeg==1.9.0)
rm -rf "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"
ls -l "$DEST"
du -sh "$DEST"
