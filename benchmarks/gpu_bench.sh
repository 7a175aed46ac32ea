#!/usr/bin/env bash
# `neardup bench` on a CUDA machine, in one command:
#
#   benchmarks/gpu_bench.sh [OUT.json] [more `neardup bench` options]
#
# Makes a separate venv (.venv-gpu) with torch's CUDA build and onnxruntime-gpu (CUDA and TensorRT
# providers; TensorRT's libraries come from the `tensorrt-cu12` wheel), checks which providers really
# start, then runs the bench with torch (CUDA), onnx (TensorRT FP16 -> CUDA) and onnx-int8, writing the
# figures to OUT.json (default benchmarks/gpu_bench.json, schema neardup.schemas.BENCH) and the table
# to the terminal. Environment: TORCH_VERSION (2.13.0), TORCH_INDEX (PyTorch's CUDA 12.8 wheels),
# VENV (.venv-gpu), PYTHON (python3), TENSORRT ("tensorrt-cu12>=10,<11": ONNX Runtime's TensorRT provider
# is built against TensorRT 10; if it cannot start, ORT falls back to the CUDA provider, and the check
# below prints which providers really started).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/gpu_bench.json}
shift || true
VENV=${VENV:-.venv-gpu}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}
TENSORRT=${TENSORRT:-tensorrt-cu12>=10,<11}

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_bench.sh: no NVIDIA GPU visible (nvidia-smi); run benchmarks on CPU with: neardup bench" >&2
    exit 2
fi
nvidia-smi -L

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install --quiet --upgrade pip
"$PIP" install --quiet "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX"
"$PIP" install --quiet -e '.[demo,bench]'
# neardup depends on the CPU `onnxruntime`; the GPU build provides the same module, so swap them
"$PIP" uninstall --quiet -y onnxruntime onnxruntime-gpu || true
"$PIP" install --quiet onnxruntime-gpu "$TENSORRT"

# TensorRT's shared libraries live inside the tensorrt_libs wheel; the provider loads them by name
TRT_LIBS=$("$VENV/bin/python" -c 'import os, tensorrt_libs; print(os.path.dirname(tensorrt_libs.__file__))' 2>/dev/null || true)
if [ -n "$TRT_LIBS" ]; then
    export LD_LIBRARY_PATH="$TRT_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

"$VENV/bin/python" - <<'PY'
import numpy as np, onnxruntime as ort, torch
from neardup.models import onnx_backend as ob, resolve_backend
print("torch", torch.__version__, "cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("onnxruntime", ort.__version__, "available providers:", ort.get_available_providers())
embedder = ob.OnnxEmbedder(providers=[*ob.gpu_providers(), "CPUExecutionProvider"])
print("providers that started for the default model:", embedder.providers, "| auto ->", resolve_backend("auto"))
embedder.embed(np.zeros((2, 3, 224, 224), np.float32))
PY

"$VENV/bin/neardup" bench --backends torch,onnx,onnx-int8 --json "$OUT" "$@"
echo "wrote $OUT"
