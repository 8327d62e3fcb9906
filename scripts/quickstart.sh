#!/usr/bin/env bash
# The main job on the embedded default dataset: Fashion-MNIST (Debian's dataset-fashion-mnist)
# -> verified shards -> 2-process torchrun training -> test-set evaluation report.
# Extra arguments are config overrides for the training, e.g. train.epochs=2.
# Re-running resumes the run in runs/fashion_mnist (or does nothing when it is done).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DATA=${DATA:-data/fashion-mnist}
RUN_DIR=${RUN_DIR:-runs/fashion_mnist}

if [ ! -f "$DATA/manifest.json" ]; then
    # the official 10k test split stays; 10% of the 60k training images are held out as val
    "$PY" -m shards build fashion-mnist "$DATA" --split 0.9,0.1,0 --shard-samples 1000 --no-progress
fi
"$PY" -m shards verify "$DATA"
"$PY" -m shards inspect "$DATA"
OMP_NUM_THREADS=1 .venv/bin/torchrun --standalone --nproc-per-node 2 jobs/train.py \
    --config configs/fashion_mnist.yaml data.url="$DATA" run.dir="$RUN_DIR" "$@"
"$PY" jobs/evaluate.py "$RUN_DIR/checkpoints/best.pt" --split test
echo "run dir: $RUN_DIR (metrics.jsonl, training_curves.png, eval/test/)"
