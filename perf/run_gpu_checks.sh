#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one command (a few minutes on an H100-class GPU):
#   1. perf/gpu_path.py at full size: training epoch vs a bare loop (fp32 and --amp bf16), NGPlus vs VarGrad vs
#      NGPlus+focus_opt steps, and whether the targets are met (JSON in gpu_path.json);
#   2. the CUDA-only tests: no synchronisation per step on the GPU (PyTorch's sync detector), channels_last with bf16,
#      and the masks' CUDA results against the CPU's;
#   3. perf/fashion_mnist_gpu.py: the Fashion-MNIST GPU recipe with --amp bf16 (original model, Retrain, NGPlus,
#      VarGrad, SalUn on one seed; JSON in fashion_mnist_gpu.json), reading the four .gz files from $FASHION_MNIST
#      (default /usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist); skipped, and said so, without them.
# Logs go to $OUT when it is set, else to perf/gpu_checks/. Exit status: non-zero when a step failed (a missed
# performance target is reported in the log and the JSON, not as a failure).
#
#   bash perf/run_gpu_checks.sh
#   FASHION_MNIST=/path/to/folder-with-the-gz-files bash perf/run_gpu_checks.sh
set -uo pipefail

cd "$(dirname "$0")/.."
LOGS="${OUT:-perf/gpu_checks}"
mkdir -p "$LOGS"
if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=python3
fi

status=0
{
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
} > "$LOGS/environment.txt" 2>&1
cat "$LOGS/environment.txt"

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device visible to $PY: nothing to check here" | tee "$LOGS/summary.txt"
    exit 1
fi

echo "== perf/gpu_path.py (full size)"
"$PY" perf/gpu_path.py --device cuda --out "$LOGS/gpu_path.json" 2>&1 | tee "$LOGS/gpu_path.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== CUDA-only tests"
"$PY" -m pytest -q -rs -p no:cacheprovider tests/test_sync_free.py tests/test_amp.py tests/test_masks.py -k cuda \
    2>&1 | tee "$LOGS/pytest_cuda.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

FMNIST="${FASHION_MNIST:-/usr/share/datasets/fashion-mnist}"
echo "== perf/fashion_mnist_gpu.py ($FMNIST)"
if [ -f "$FMNIST/train-images-idx3-ubyte.gz" ] || [ -f "$FMNIST/FashionMNIST/raw/train-images-idx3-ubyte" ]; then
    # models and results go to a temporary folder (full-width checkpoints are large); the numbers to the JSON
    "$PY" perf/fashion_mnist_gpu.py "$FMNIST" --device cuda --json "$LOGS/fashion_mnist_gpu.json" 2>&1 \
        | tee "$LOGS/fashion_mnist_gpu.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
    echo "skipped: no Fashion-MNIST files in $FMNIST (set FASHION_MNIST=DIR)" | tee "$LOGS/fashion_mnist_gpu.log"
fi

{
    echo "gpu_path.py: $(grep -E '^targets met' "$LOGS/gpu_path.log" || echo 'no result')"
    echo "fashion_mnist_gpu.py: $(grep -E '^(targets|skipped)' "$LOGS/fashion_mnist_gpu.log" || echo 'no result')"
    echo "CUDA tests: $(tail -n 1 "$LOGS/pytest_cuda.log")"
    echo "exit status: $status"
} | tee "$LOGS/summary.txt"
exit "$status"
