#!/usr/bin/env bash
# The GPU checks in one go, for a GPU node set up with scripts/setup.sh (plus the `gpu` extra for xformers and
# faiss-gpu): the GPU-marked tests, then every benchmark with a CUDA mode (one JSON object each), then 30 iterations of
# the real trainer on one GPU (torchrun, synthetic data) with its step log. Logs go to ${OUT_DIR:-gpu-check}/.
#
#     bash scripts/gpu_check.sh            # about 5 minutes on one H100
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT_DIR=${OUT_DIR:-gpu-check}
mkdir -p "$OUT_DIR"
status=0
step() {  # step NAME COMMAND...: run, keep the log, remember a failure, go on
    local name=$1; shift
    echo "== $name: $*"
    if "$@" > "$OUT_DIR/$name.log" 2>&1; then tail -n 3 "$OUT_DIR/$name.log"; else status=1; tail -n 30 "$OUT_DIR/$name.log"; fi
}
step gpu-tests "$PY" -m pytest -q -m gpu -rs tests
step train-step-vits14 "$PY" bench/train_step.py --preset vits14 --device cuda --steps 8 --warmup 2 --batch-size 64 --profile 8
step train-step-vitl14 "$PY" bench/train_step.py --preset long_vitl14 --device cuda --steps 4 --warmup 1 --batch-size 32 --profile 8
step sinkhorn "$PY" bench/sinkhorn.py --device cuda --rows 5000 --prototypes 131072 --repeats 10
step dino-loss "$PY" bench/dino_loss.py --device cuda --repeats 10
step trainer-one-gpu "$PY" -m torch.distributed.run --nproc-per-node 1 --standalone -m trainer.train --recipe vits14 \
    --override data.dataset=synthetic --override data.num_workers=12 --override optim.global_batch_size=64 \
    --override optim.iterations=30 --override optim.warmup_iterations=10 --override optim.freeze_last_layer_iterations=5 \
    --override loss.warmup_teacher_temp_iterations=10 --override checkpoint.interval_iterations=30 \
    --override checkpoint.dir="$OUT_DIR/trainer" --override metrics.port=-1 --override metrics.log_interval=5
[ -f "$OUT_DIR/trainer/train_log.jsonl" ] && grep '"event": "step"' "$OUT_DIR/trainer/train_log.jsonl" | tail -n 2
exit $status
