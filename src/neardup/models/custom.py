"""Any ONNX image model as an embedder (`--model model.onnx`), described by a small JSON spec.

    {"name": "sscd-disc-mixup", "input_size": 288,
     "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}

Keys (only input_size is required):
  name        label shown in `neardup info` (default: the file's stem)
  input_size  side of the square model input, in pixels
  mean, std   per-channel normalisation of pixels scaled to 0..1: (x / 255 - mean) / std
              (defaults 0 and 1); CLIP and DINOv2 exports use their own published constants
  resize      "squash" (whole image to the square, the default model's choice) or "center-crop"
              (shorter side to input_size, then the centre square, as CLIP and DINOv2 are trained)
  resample    "bicubic" (default) or "bilinear"
  layout      "NCHW" (default) or "NHWC"
  output      name of the output to use (default: the first)
  pooling     how a feature output becomes a vector: "auto" (default: [n, d] as is, [n, c, h, w]
              averaged over h and w, [n, tokens, d] its first (CLS) token), "mean" or "cls"

The vector is always L2-normalised. The spec is read from --model-spec, else from the file beside
the model with the same name and a .json suffix. The model's identity, stored in every index built
with it, is the sha256 of the ONNX file plus the canonical spec, so another file, or the same file
with another normalisation, is refused by that index.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np

from .default_model import checked_batch
from .onnx_backend import ORT_BATCH, BackendError, make_session

SPEC_KEYS = {"name", "input_size", "mean", "std", "resize", "resample", "layout", "output", "pooling"}


def spec_path_for(model: Path) -> Path:
    return model.with_suffix(".json")


def read_spec(model: Path, spec: Path | str | dict | None) -> dict:
    """The validated, complete spec (defaults filled in). Raises BackendError with one line."""
    if isinstance(spec, dict):
        raw, where = spec, "model spec"
    else:
        path = Path(spec) if spec else spec_path_for(model)
        if not path.is_file():
            raise BackendError(f"no model spec for {model}: pass --model-spec FILE or write {path}")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BackendError(f"cannot read model spec {path}: {exc}") from None
        where = str(path)
    if not isinstance(raw, dict):
        raise BackendError(f"{where}: expected a JSON object")
    unknown = set(raw) - SPEC_KEYS
    if unknown:
        raise BackendError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(SPEC_KEYS))})")
    size = raw.get("input_size")
    if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= 4096:
        raise BackendError(f"{where}: input_size must be an integer from 8 to 4096, got {size!r}")
    spec = {
        "name": str(raw.get("name") or model.stem),
        "input_size": size,
        "mean": raw.get("mean", [0.0, 0.0, 0.0]),
        "std": raw.get("std", [1.0, 1.0, 1.0]),
        "resize": raw.get("resize", "squash"),
        "resample": raw.get("resample", "bicubic"),
        "layout": raw.get("layout", "NCHW"),
        "output": raw.get("output"),
        "pooling": raw.get("pooling", "auto"),
    }
    for key in ("mean", "std"):
        value = spec[key]
        if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise BackendError(f"{where}: {key} must be a list of 3 numbers, got {value!r}")
        spec[key] = [float(v) for v in value]
    if any(v <= 0 for v in spec["std"]):
        raise BackendError(f"{where}: std values must be positive")
    for key, allowed in (("resize", ("squash", "center-crop")), ("resample", ("bicubic", "bilinear")),
                         ("layout", ("NCHW", "NHWC")), ("pooling", ("auto", "mean", "cls"))):
        if spec[key] not in allowed:
            raise BackendError(f"{where}: {key} must be one of {', '.join(allowed)}, got {spec[key]!r}")
    return spec


class CustomOnnxEmbedder:
    """An Embedder over a user's ONNX file; runs on ONNX Runtime with the given providers."""

    def __init__(self, model: Path | str, spec: Path | str | dict | None = None, *, threads: int | None = None,
                 providers=None):
        model = Path(model)
        if not model.is_file():
            raise BackendError(f"model file not found: {model}")
        self.path = model
        self.spec = read_spec(model, spec)
        try:
            self.session = make_session(model, threads=threads, providers=providers)
        except Exception as exc:  # noqa: BLE001 (ORT raises several types for a file that is not a usable model)
            raise BackendError(f"cannot load ONNX model {model}: {str(exc).splitlines()[0][:200]}") from None
        self.backend = "onnx"
        self.providers = self.session.get_providers()
        self.name = self.spec["name"]
        self.input_size = self.spec["input_size"]
        first = self.session.get_inputs()[0]
        self._input_name = first.name
        self._one_at_a_time = first.shape and first.shape[0] == 1
        outputs = [o.name for o in self.session.get_outputs()]
        self._output = self.spec["output"] or outputs[0]
        if self._output not in outputs:
            raise BackendError(f"{model}: no output named {self._output!r} (outputs: {', '.join(outputs)})")
        self._mean = np.asarray(self.spec["mean"], np.float32) * 255
        self._scale = 1 / (np.asarray(self.spec["std"], np.float32) * 255)
        # a module function with the spec's settings bound: decoding processes can run it
        self.model_pixels = functools.partial(model_pixels, size=self.spec["input_size"], resize=self.spec["resize"],
                                              resample=self.spec["resample"])
        # one run on a grey image checks that the model accepts the spec's input and gives a vector
        probe = self._run(np.stack([self.preprocess_array(np.full((self.input_size, self.input_size, 3), 128, np.uint8))]))
        self.dim = int(probe.shape[1])
        canonical = json.dumps({k: v for k, v in self.spec.items() if k != "name"}, sort_keys=True, separators=(",", ":"))
        self.identity = {
            "name": self.name,
            "weights_sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
            "preprocessing": canonical,
            "dim": self.dim,
        }

    def preprocess(self, image) -> np.ndarray:
        return self.preprocess_array(self.model_pixels(image))

    def preprocess_array(self, pixels: np.ndarray) -> np.ndarray:
        return self.normalise(pixels[None])[0]

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels [n, s, s, 3] -> float32 model input [n, 3, s, s] per the spec's mean and std."""
        normalised = (pixels.astype(np.float32) - self._mean) * self._scale
        return np.ascontiguousarray(normalised.transpose(0, 3, 1, 2))

    def embed(self, batch: np.ndarray) -> np.ndarray:
        if batch.dtype == np.uint8 and batch.ndim == 4 and batch.shape[1:] == (self.input_size, self.input_size, 3):
            batch = self.normalise(batch)
        batch = checked_batch(batch, self.input_size)
        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._run(batch)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        step = 1 if self._one_at_a_time else ORT_BATCH
        if self.spec["layout"] == "NHWC":
            batch = np.ascontiguousarray(batch.transpose(0, 2, 3, 1))
        try:
            out = np.concatenate([self.session.run([self._output], {self._input_name: batch[i:i + step]})[0]
                                  for i in range(0, len(batch), step)])
        except Exception as exc:  # noqa: BLE001 (ORT's error types for a bad input are not public)
            raise BackendError(f"model {self.name} failed on a {list(batch.shape[1:])} input: "
                               f"{str(exc).splitlines()[0][:200]}") from None
        vectors = self._pool(np.asarray(out, dtype=np.float32))
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)

    def _pool(self, out: np.ndarray) -> np.ndarray:
        pooling = self.spec["pooling"]
        if out.ndim == 2 and pooling in ("auto", "mean"):
            return out
        if out.ndim == 4 and pooling in ("auto", "mean"):
            return out.mean(axis=(1, 2) if self.spec["layout"] == "NHWC" else (2, 3))
        if out.ndim == 3:
            return out[:, 0] if pooling in ("auto", "cls") else out.mean(axis=1)
        raise BackendError(f"model {self.name}: cannot make a vector from an output of shape {list(out.shape)} "
                           f"with pooling {pooling!r}")


def model_pixels(image, *, size: int, resize: str, resample: str) -> np.ndarray:
    """A PIL image -> uint8 pixels [size, size, 3] as a custom spec resizes it (see the module's keys)."""
    from PIL import Image

    if image.mode != "RGB":
        image = image.convert("RGB")
    method = Image.Resampling.BICUBIC if resample == "bicubic" else Image.Resampling.BILINEAR
    if resize == "center-crop":
        w, h = image.size
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), method)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    else:
        image = image.resize((size, size), method)
    return np.asarray(image)
