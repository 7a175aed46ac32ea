"""Image embedders: the protocol the rest of neardup codes against, the default model, and the
backends that run it.

Backends (``load_embedder(backend)``, CLI ``--backend``, env NEARDUP_BACKEND):

* ``torch``      the model in torch eager mode (on CUDA when torch sees a GPU).
* ``torch-fp16``  the model on a CUDA GPU in fp16, channels_last, batches of 256, uint8 pixels sent from
                 pinned buffers and normalised on the device (neardup.models.cuda); guarded (mean cosine
                 to fp32 >= 0.999, every guard copy's nearest original unchanged), else fp32 on the GPU.
* ``onnx``       the model exported to ONNX (cached by weights hash) in ONNX Runtime: on a GPU
                 through TensorRT (FP16) or CUDA when onnxruntime-gpu provides them, else on CPU.
* ``onnx-int8``  statically quantised on the photos shipped with neardup (mixed precision: stem, first
                 block and GeM pooling in float); used only if it passes its accuracy guard where it
                 is built (mean cosine to fp32 >= INT8_MIN_MEAN_COSINE, nearest original of every
                 guard copy unchanged).
* ``openvino``   OpenVINO's CPU plugin (neardup[openvino]) on the fp32 export at bf16 where the CPU has AMX or
                 AVX-512 bf16, else on the guarded int8 model, else on the fp32 export at f32; each guarded
                 (mean and worst cosine to fp32, textureless hard cases, nearest originals); compiled model
                 cached (neardup.models.openvino_backend).
* ``auto``       the fastest that is usable here: torch-fp16 where torch sees a CUDA device, else
                 ONNX Runtime's GPU providers (onnxruntime-gpu), else OpenVINO where installed, guarded and
                 measured faster than ORT int8 here (verdict cached), else int8 (built, guarded and cached the first time it is needed, about half a
                 minute; a refusal falls back to fp32 ONNX with one line on stderr saying why). A model cache
                 that cannot be written (and lacks the ONNX export) falls back to torch, with one line: the
                 same model and vectors, without the cache's files.

Identity. An index stores the identity of the model that built it (name, weights sha256,
preprocessing, dim) and refuses any other. The identity names the *vector space*, not the
backend: torch and fp32 ONNX agree to ~1e-6 per component, so an index built with one is queried
with the other. int8 and TensorRT FP16 are approximations of the same vectors (int8: cosine to
fp32 >= 0.99 on average, guarded), so they share the identity too: mixing them shifts scores by
about as much as re-encoding a JPEG does, far less than the gap between copies and different
photos (see docs/BACKENDS.md, "Identity across backends"). A custom ONNX model is a different vector space and gets its own
identity (file sha256 + spec).
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..errors import BackendError

if TYPE_CHECKING:
    from PIL import Image

BACKENDS = ("auto", "torch", "onnx", "onnx-int8", "openvino", "torch-fp16")


class Embedder(Protocol):
    name: str
    dim: int
    input_size: int
    # JSON-serialisable {"name", "weights_sha256", "preprocessing", "dim"} (the default model adds
    # "whitening_sha256"); an index stores it
    # and refuses to be opened by an embedder whose identity differs.
    identity: dict

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image of any size -> float32 [3, input_size, input_size]. Pure and
        thread-safe, so it can run in decoding workers."""

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """float32 [n, 3, input_size, input_size] -> float32 [n, dim] with unit rows;
        n may be 0, giving shape (0, dim)."""


def default_embedder(threads: int | None = None) -> Embedder:
    """The EfficientNet-Lite0 torch embedder, loaded once per process (the reference backend).

    ``threads`` sets torch's intra-op thread count, which is process-wide, so it applies
    even when the embedder is already loaded.
    """
    # torch is imported lazily so that code needing only the protocol starts fast.
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return _shared_torch_embedder()


@functools.cache
def _shared_torch_embedder() -> Embedder:
    from neardup.models.efficientnet_lite0 import TorchEmbedder

    return TorchEmbedder()


def backend_from_env(backend: str | None = None) -> str:
    chosen = backend or os.environ.get("NEARDUP_BACKEND") or "auto"
    if chosen not in BACKENDS:
        raise BackendError(f"unknown backend {chosen!r} (choose from {', '.join(BACKENDS)})")
    return chosen


def torch_cuda_available() -> bool:
    # without an NVIDIA driver there is no CUDA device: answer without paying torch's import (seconds)
    if sys.platform.startswith("linux") and not os.path.exists("/proc/driver/nvidia/version"):
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


#: A job of at most this many images (`load_embedder(images=...)`: a one-image `query`) starts faster than
#: OpenVINO can: where auto's verdict is OpenVINO, it runs ONNX Runtime on the model OpenVINO would run (the
#: int8 model for int8, the fp32 export otherwise: the same vectors within each one's guard). OpenVINO's start
#: (import 0.15 s, loading its compiled blob 0.12 s, measured on an AVX2 EPYC) is more than a few images cost.
QUICK_JOB_IMAGES = 8


def load_embedder(backend: str | None = None, *, model: str | os.PathLike | None = None,
                  spec: str | os.PathLike | dict | None = None, threads: int | None = None,
                  images: int | None = None) -> Embedder:
    """The embedder for a backend name (None: $NEARDUP_BACKEND or auto), or for a custom ONNX
    ``model`` with its ``spec``. ``images``: how many images the caller will embed, when known (see
    QUICK_JOB_IMAGES). Loaded once per process for each distinct set of arguments.
    Raises BackendError (a NeardupError) with one line when the choice cannot be used here."""
    backend = backend_from_env(backend)
    if model is not None:
        if backend not in ("auto", "onnx"):
            raise BackendError(f"a custom --model runs in ONNX Runtime; --backend {backend} applies only to the built-in model")
        # a dict spec is passed as canonical JSON so that the loaded model can be cached by value
        key = json.dumps(spec, sort_keys=True) if isinstance(spec, dict) else (None if spec is None else str(spec))
        return _load_custom(str(Path(model).absolute()), key, isinstance(spec, dict), threads)
    if backend == "auto" and images is not None and images <= QUICK_JOB_IMAGES:
        return _quick_start(threads)
    return _load_builtin(backend, threads)


def _quick_start(threads: int | None) -> Embedder:
    """auto for a handful of images: ONNX Runtime where auto's verdict is OpenVINO (QUICK_JOB_IMAGES)."""
    if resolve_backend("auto", threads) != "openvino":
        return _load_builtin("auto", threads)
    choice = _openvino_choice(threads, build=False) or {}
    return _load_builtin("onnx-int8" if choice.get("precision") == "int8" else "onnx", threads)


@functools.cache
def _load_custom(model: str, spec: str | None, spec_is_json: bool, threads: int | None) -> Embedder:
    from .custom import CustomOnnxEmbedder
    from .onnx_backend import gpu_providers

    providers = [*gpu_providers(), "CPUExecutionProvider"]
    return CustomOnnxEmbedder(model, json.loads(spec) if spec_is_json else spec, threads=threads, providers=providers)


def resolve_backend(backend: str | None = None, threads: int | None = None) -> str:
    """The concrete backend a name stands for here: `auto` becomes torch-fp16 where torch sees a CUDA
    device, onnx where only ORT has GPU providers, or, on a CPU, onnx-int8 when its guarded model
    passes (built now the first time, then cached) and onnx when the guard refused it; torch when the
    model cache cannot be written and lacks the ONNX export (one line on stderr says so)."""
    backend = backend_from_env(backend)
    if backend != "auto":
        return backend
    from . import onnx_backend as ob

    if torch_cuda_available():
        return "torch-fp16"
    if ob.gpu_providers():
        return "onnx"
    try:
        choice = _openvino_choice(threads, build=False)
        if choice is not None:  # reached earlier: needs no write
            return choice["backend"]
        if ob.guarded_int8_model() is not None and not (AUTO_PICKS_OPENVINO and _openvino_installed()):  # built earlier
            return "onnx-int8"
        ob.fp32_model_path()  # what int8 is built from, and what auto falls back to
    except (ob.CacheError, OSError) as exc:  # cannot be written, or not even read (a parent folder closed to us)
        reason = str(exc) if isinstance(exc, ob.CacheError) else (
            f"cannot use the model cache {ob.cache_dir()} ({exc.strerror or exc})")
        # torch shares the model's identity (torch and ONNX vectors agree to 1e-6): the index stays one
        ob._notice(f"{reason}; using the torch backend (the same model and vectors, slower)")
        return "torch"
    choice = _openvino_choice(threads, build=True)
    if choice is not None:
        return choice["backend"]
    if ob.guarded_int8_model() is not None:
        return "onnx-int8"
    return "onnx-int8" if ob.auto_int8_model(threads) is not None else "onnx"


#: Whether `auto` considers OpenVINO (its measured verdict, `openvino_backend.auto_choice`, then decides).
#: On, measured on this 2-core Sapphire Rapids (benchmarks/RESULTS.md, "OpenVINO backend", "Decode stage on
#: 2 cores"): `neardup index` 1.22x ORT int8 end to end, a one-image `query` 0.51 s, and eval seeds 1-4 within
#: 0.0055 of fp32 on every figure (ORT int8: within 0.0081). A switch, so a deployment can pin ORT int8.
AUTO_PICKS_OPENVINO = os.environ.get("NEARDUP_AUTO_OPENVINO", "1") != "0"


def _openvino_installed() -> bool:
    from . import openvino_backend as ovb

    return ovb.available()


def _openvino_choice(threads: int | None, *, build: bool) -> dict | None:
    """auto's verdict between OpenVINO and ONNX Runtime on this CPU (openvino_backend.auto_choice): the
    cached one, or with `build` reached now; None where OpenVINO is not installed or fails (one line)."""
    from . import onnx_backend as ob
    from . import openvino_backend as ovb

    if not AUTO_PICKS_OPENVINO or not ovb.available():
        return None
    if not build:
        return ovb.cached_choice()
    try:
        return ovb.auto_choice(threads)
    except ob.CacheError:
        return None
    except Exception as exc:  # noqa: BLE001 (OpenVINO raises RuntimeError and others; ORT still works)
        ob._notice(f"cannot use OpenVINO ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); "
                   "using ONNX Runtime")
        return None


def describe_embedder(embedder) -> str:
    """Which backend computes the vectors, and why (auto's verdict where it made one): for the index
    summary and `neardup bench`."""
    backend = getattr(embedder, "backend", None) or ("custom ONNX" if hasattr(embedder, "spec") else "torch")
    precision = getattr(embedder, "precision", None)
    line = backend + (f" {precision}" if precision else "")
    choice = getattr(embedder, "choice", None)
    if choice:
        line += f" (auto: {choice['reason']})"
    return line


def describe_auto() -> str:
    """What `auto` runs on this machine and why, from what is cached (nothing is built or measured): for
    `neardup info`."""
    from . import onnx_backend as ob
    from . import openvino_backend as ovb

    if torch_cuda_available():
        return "torch-fp16 (torch sees a CUDA GPU)"
    with _suppress():
        if ob.gpu_providers():
            return "onnx (ONNX Runtime's GPU providers)"
    if AUTO_PICKS_OPENVINO and ovb.available():
        choice = ovb.cached_choice()
        if choice is not None:
            return ovb.describe_choice(choice)
        return "openvino or onnx-int8: not measured on this CPU yet (the next index or query measures it)"
    why = ("OpenVINO is not installed: pip install 'neardup[openvino]'" if not ovb.available() else
           "auto leaves OpenVINO to --backend openvino: NEARDUP_AUTO_OPENVINO=0")
    if ob.guarded_int8_model() is not None:
        return f"onnx-int8 (its guarded model is cached; {why})"
    return f"onnx-int8 when its guard passes, else onnx (not built yet; {why})"


def _suppress():
    import contextlib

    return contextlib.suppress(Exception)


@functools.cache
def _load_builtin(backend: str, threads: int | None) -> Embedder:
    from . import onnx_backend as ob

    if backend not in ("torch", "torch-fp16"):
        ob.tidy_cache()  # what builds killed mid-way left in the model cache
    auto = backend_from_env(backend) == "auto"
    backend = resolve_backend(backend, threads)
    if auto and backend in ("onnx", "onnx-int8"):
        embedder = _load_builtin(backend, threads)  # the same object as asked for by name
        choice = _openvino_choice(threads, build=False)
        if choice is not None and choice["backend"] == backend:
            embedder.choice = choice  # why not OpenVINO
        return embedder
    if backend == "torch":
        return _torch_embedder(threads)
    if backend == "torch-fp16":
        if not torch_cuda_available():
            raise BackendError("--backend torch-fp16 needs a CUDA GPU that torch sees; use onnx or onnx-int8")
        from .cuda import guarded_cuda_embedder

        return guarded_cuda_embedder()
    if backend == "openvino":
        from . import openvino_backend as ovb

        if not ovb.available():
            raise BackendError("--backend openvino needs OpenVINO: pip install 'neardup[openvino]'")
        try:
            choice = ovb.cached_choice()
            if choice is not None and choice.get("backend") == "openvino":
                return ovb.OpenVinoEmbedder(choice["precision"], threads=threads, choice=choice if auto else None)
            return ovb.OpenVinoEmbedder(ovb.explicit_precision(threads), threads=threads)
        except ob.CacheError as exc:
            raise ob.CacheError(f"{exc}; set NEARDUP_CACHE to a writable folder, or use --backend torch") from exc
    try:
        if backend == "onnx-int8":
            return ob.OnnxEmbedder(ob.guarded_int8_model() or ob.int8_model(threads=threads), threads=threads,
                                   backend="onnx-int8")
        return ob.OnnxEmbedder(threads=threads, providers=[*ob.gpu_providers(), "CPUExecutionProvider"])
    except ob.CacheError as exc:  # asked for by name: say what would work rather than run another backend
        raise ob.CacheError(f"{exc}; set NEARDUP_CACHE to a writable folder, or use --backend torch") from exc
    except PermissionError as exc:
        raise ob.CacheError(f"cannot use the model cache {ob.cache_dir()} ({exc.strerror or exc}); set NEARDUP_CACHE "
                            "to a writable folder, or use --backend torch") from exc


def _torch_embedder(threads: int | None) -> Embedder:
    if torch_cuda_available():
        from .efficientnet_lite0 import TorchEmbedder

        return TorchEmbedder(threads=threads, device="cuda")
    return default_embedder(threads)


__all__ = ["BACKENDS", "Embedder", "default_embedder", "describe_auto", "describe_embedder", "load_embedder",
           "resolve_backend"]
