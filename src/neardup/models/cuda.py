"""The default model on a CUDA GPU the way a GPU wants it (backend ``torch-fp16``; what `auto` picks where
torch sees a CUDA device).

* fp16 weights and activations, channels_last, batches of GPU_BATCH: measured on an H200, 23,900 images/s
  against 11,000 for fp32 NCHW, cosine to fp32 >= 0.9995 on every image (issue 13). The GeM pooling and
  the whitening run in float32 (the cube of GeM and the 1280 -> 768 projection gain nothing from fp16).
* The pixels travel as uint8 NHWC (150 KB an image, not 600 KB of float32), from pinned host buffers with
  non-blocking copies, two buffers taking turns so filling one overlaps the copy and the model on the other;
  the (x - 127) / 128 normalisation runs on the device (`device_input`).
* Guarded like int8: on the shipped calibration photos and their edited copies (onnx_backend.guard_set) the
  fp16 vectors must have a mean cosine >= FP16_MIN_MEAN_COSINE to the fp32 ones of the same device and
  leave every copy's nearest original unchanged; a refused fp16 model falls back to fp32 on the GPU.

Everything but the device itself runs on a CPU too (device="cpu", dtype=float32), which is how the tests
check the batching, the uint8 transfer and the guard's verdicts on machines without a GPU.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from .default_model import DIM, INPUT_SIZE, NAME, PIXEL_MEAN, PIXEL_SCALE, checked_batch, identity, lsh_center, model_pixels
from .default_model import preprocess as lite0_preprocess
from ..errors import BackendError

#: Images per forward pass on the GPU: 256 reaches ~95 % of the fp16 throughput of 1024 (issue 13).
GPU_BATCH = 256
FP16_MIN_MEAN_COSINE = 0.999


def device_input(pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 pixels [n, h, w, 3] (on the device) -> the model input [n, 3, h, w] in `dtype`, channels_last,
    (x - 127) / 128. The NHWC buffer seen as NCHW *is* channels_last, so no copy reorders it."""
    x = pixels.permute(0, 3, 1, 2).to(dtype)
    return x.sub_(PIXEL_MEAN).mul_(1 / PIXEL_SCALE)


class CudaEmbedder:
    """The neardup.models.Embedder of EfficientNet-Lite0 on a GPU (see the module notes)."""

    name = NAME
    dim = DIM
    input_size = INPUT_SIZE

    def __init__(self, device: str = "cuda", dtype: torch.dtype = torch.float16, batch: int = GPU_BATCH):
        from .efficientnet_lite0 import load_pretrained

        self.device, self.dtype, self.batch = torch.device(device), dtype, batch
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise BackendError("torch sees no CUDA device here; use --backend onnx or onnx-int8")
        self.backend = f"torch-{self.device.type}-{str(dtype).removeprefix('torch.')}"
        # the whitening stays float32, outside the model that is cast to `dtype`
        from .default_model import whitening

        model = load_pretrained().fix_padding(INPUT_SIZE).to(self.device, memory_format=torch.channels_last)
        self._features = model.to(dtype)
        mean, projection = whitening()
        self._whitening = (torch.from_numpy(mean).to(self.device), torch.from_numpy(projection).to(self.device))
        pinned = self.device.type == "cuda"
        self._host = [torch.empty((batch, INPUT_SIZE, INPUT_SIZE, 3), dtype=torch.uint8, pin_memory=pinned)
                      for _ in range(2)]
        self._copied = [torch.cuda.Event() if pinned else None for _ in range(2)]
        # the pinned buffers are shared: two threads embedding at once (the web page's search pool) could
        # refill one while the other's copy from it is still queued; the GPU runs one batch at a time anyway
        self._lock = threading.Lock()
        self.identity = identity()
        self.center = lsh_center()
        self.model_pixels = model_pixels  # a module function: decoding processes can run it

    def preprocess(self, image) -> np.ndarray:
        return lite0_preprocess(image)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """uint8 pixels [n, 224, 224, 3] (the fast path) or float32 [n, 3, 224, 224] -> float32 [n, DIM]."""
        if not (batch.dtype == np.uint8 and batch.shape[1:] == (INPUT_SIZE, INPUT_SIZE, 3)):
            # float model inputs: back to the pixels they came from ((x * 128) + 127 is exact for them)
            batch = checked_batch(batch, INPUT_SIZE)
            batch = np.clip(np.rint(batch * PIXEL_SCALE + PIXEL_MEAN), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        outputs = []
        with self._lock, torch.inference_mode():
            for number, start in enumerate(range(0, len(batch), self.batch)):
                chunk = torch.from_numpy(np.ascontiguousarray(batch[start:start + self.batch]))
                outputs.append(self._embed_on_device(self._upload(chunk, number % 2)))
            return torch.cat(outputs).cpu().numpy()

    def embed_on_device(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels [n, 224, 224, 3] already on the device -> unit vectors [n, DIM] on the device (what
        `neardup bench` times as "model only": no host transfer)."""
        with torch.inference_mode():
            return self._embed_on_device(pixels)

    def _upload(self, chunk: torch.Tensor, slot: int) -> torch.Tensor:
        if self.device.type != "cuda":
            return chunk.to(self.device)
        # the copy that last read this pinned buffer must be done before it is refilled
        self._copied[slot].synchronize()
        host = self._host[slot][:len(chunk)]
        host.copy_(chunk)
        on_device = host.to(self.device, non_blocking=True)
        self._copied[slot].record()
        return on_device

    def _embed_on_device(self, pixels: torch.Tensor) -> torch.Tensor:
        from .efficientnet_lite0 import gem

        features = self._features.forward_features(device_input(pixels, self.dtype)).float()
        pooled = torch.nn.functional.normalize(gem(features), dim=1)
        mean, projection = self._whitening
        return torch.nn.functional.normalize(torch.nn.functional.linear(pooled - mean, projection), dim=1)


def fp16_guard(reference, candidate, originals: np.ndarray, copies: np.ndarray,
               min_mean_cosine: float | None = None) -> dict:
    """The int8 guard's test (onnx_backend.accuracy_guard) at the fp16 bar."""
    from .onnx_backend import accuracy_guard

    return accuracy_guard(reference, candidate, originals, copies,
                          FP16_MIN_MEAN_COSINE if min_mean_cosine is None else min_mean_cosine)


def guarded_cuda_embedder(device: str = "cuda", dtype: torch.dtype = torch.float16,
                          min_mean_cosine: float | None = None) -> CudaEmbedder:
    """The fp16 embedder if it passes its guard against fp32 on the same device, else the fp32 one with one
    line on stderr saying why (both are CudaEmbedders: uint8 transfer and big batches either way). The
    guard takes about a second on a GPU, so it runs each time the backend is loaded. (`dtype`: the tests
    run the guard on a CPU with bfloat16, which torch's CPU convolutions support.)"""
    from .onnx_backend import _notice, calibration_photos, guard_set

    fp32 = CudaEmbedder(device, torch.float32)
    fp16 = CudaEmbedder(device, dtype)
    originals, copies = guard_set(calibration_photos())
    report = fp16_guard(fp32, fp16, originals, copies, min_mean_cosine)
    fp16.guard = fp32.guard = report
    if report["passed"]:
        return fp16
    _notice(f"{str(dtype).removeprefix('torch.')} refused by its accuracy guard: mean cosine to fp32 {report['mean_cosine']:.5f} (needs >= "
            f"{report['min_mean_cosine']}), {report['top1_changed']} nearest originals changed; using fp32 on the GPU")
    return fp32
