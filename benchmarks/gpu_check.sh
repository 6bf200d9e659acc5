#!/usr/bin/env bash
# GPU check (make gpu-check): the CUDA-only kernel tests, the whole kernel suite natively on CUDA,
# the distiller under accelerate's FSDP2, then the kernel benchmark. Results land in runs/ and are
# echoed. About 5-8 minutes on one H100.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PYTHON="${PYTHON:-.venv/bin/python}"; else PYTHON="${PYTHON:-python3}"; fi
mkdir -p runs
export PYTHONUNBUFFERED=1

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device here; the CPU suite is 'make test'" >&2
    exit 1
fi
"$PYTHON" -c "import torch, triton; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| triton', triton.__version__)"

status=0  # a failing step is reported at the end; the later steps still run
echo "== pytest -m gpu tests/kernels (bf16, Sana sizes, CUDA graphs)"
"$PYTHON" -m pytest -m gpu tests/kernels -q -rs -p no:cacheprovider 2>&1 | tee runs/gpu_check_pytest_gpu.txt || status=1
echo "== pytest -m 'not gpu' tests/kernels (the interpreter suite, natively on CUDA)"
"$PYTHON" -m pytest -m "not gpu" tests/kernels -q -rs -p no:cacheprovider 2>&1 | tee runs/gpu_check_pytest_rest.txt || status=1

echo "== pytest -m gpu tests/distill (accelerate FSDP2: train, checkpoint, resume)"
"$PYTHON" -m pytest -m gpu tests/distill -q -rs -p no:cacheprovider 2>&1 | tee runs/gpu_check_pytest_distill.txt || status=1

echo "== benchmarks/bench_kernels.py"
"$PYTHON" -m benchmarks.bench_kernels --json runs/bench_kernels.json 2>&1 | tee runs/bench_kernels.txt || status=1
echo "== runs/bench_kernels.json"
cat runs/bench_kernels.json || status=1
exit $status
