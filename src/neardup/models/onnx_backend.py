"""The default model exported to ONNX and run in ONNX Runtime: fp32, int8, and GPU providers.

Export. The embedding function (features -> GeM pool -> L2 normalise -> whitening -> L2 normalise) is
exported once with the TorchScript exporter (``dynamo=False``, opset 17, dynamic batch axis) and cached
in the user cache dir under a name that holds the weights' sha256, the pooling, the whitening's hash and
EXPORT_VERSION, so new weights, another pooling or whitening or a changed export wrapper give a new file
and a stale one (such as an export of an earlier descriptor) is never used. The file is
written to a temporary name and renamed, so a killed export leaves no half file. torch 2.13 still
has the TorchScript exporter (``dynamo=False``); it is used because it exports in ~1 s here, where the
dynamo exporter (onnxscript, opset 18) took 68 s (under load) for a graph whose outputs agree with it
to 3e-7 on the sample photos.

int8. Static quantisation (QDQ, per-channel int8 weights, uint8 activations, MinMax
calibration) on the real photos shipped with neardup (calibration_photos), of part of the network (mixed precision, see INT8_FLOAT_BLOCKS): the stem
and the first MBConv block, where nearly all the int8 error arises, the GeM pooling and the whitening stay
in float;
the other 15 blocks and the head conv run in int8. It is kept only when it passes the accuracy guard
*where it is built*: mean cosine to the fp32 vectors >= INT8_MIN_MEAN_COSINE on the guard photos and their
edited copies, and every copy's nearest original unchanged. The quantised file and its guard
report are cached by (weights hash, calibration hash); a refused model is not kept, and its
report says why, so ``auto`` never picks it. ``auto`` builds it the first time it runs on a CPU
(auto_int8_model): the photos are the same everywhere, so the work is fixed (INT8_BUILD_SECONDS).

The cache. Every file in it is checked before use against the sha256 recorded when it was built (the
export's in a ``.sha256`` file beside it, the int8 model's in its guard report): a damaged or unreadable
file is built again (with one line on stderr), never loaded, so it never gives wrong vectors under the
model's identity. Builds take the cache's lock (``.build.lock``): one process builds, the others wait and
then use its file. Everything a build writes (its work folder, ONNX Runtime's quantisation files) lies in
the cache under TEMP_PREFIX until it is renamed into place, so whoever holds the lock removes what builds
killed mid-way left. A cache that cannot be written raises CacheError; ``auto`` then runs the torch
backend (see ``neardup.models``).

Vectors of every backend live in one vector space and share the model's identity (see
``neardup.models``), so an index may be built by one backend and queried by another.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .default_model import (
    CALIBRATION_FILE,
    DIM,
    INPUT_SIZE,
    NAME,
    descriptor_key,
    embed_in_batches,
    identity,
    lsh_center,
    model_pixels,
    weights_sha256,
)
from .default_model import preprocess as lite0_preprocess
from ..errors import BackendError, NeardupError  # noqa: F401 (re-exported)

#: Bump when the exported graph changes (wrapper, opset, exporter options): old cache files are then ignored.
EXPORT_VERSION = 3
OPSET = 17
#: Bump when the quantisation recipe changes. (v1 quantised every node and was refused by the guard.)
INT8_VERSION = 3
#: Leading MBConv blocks of the default model (after the float stem) kept in float in its int8 model.
#: Measured on the guard set (mean cosine to fp32; model ms per image, batch 8, 2 threads, fp32 ~4.0-4.6):
#: every node int8 0.986 (2.4-2.7 ms); stem + block 0 float 0.994 (2.2-2.6 ms); stem + blocks 0-1 float
#: 0.996 (3.0 ms); stem float only 0.986; int8 only a prefix (stem + first N blocks) fails from N = 3 on.
INT8_FLOAT_BLOCKS = 1
#: The guard's bar on the shipped photos (benchmarks/RESULTS.md, "int8 by default"). The mean cosine is a
#: property of the photo set as much as of the model: the same recipe scores 0.991 on scikit-image's samples
#: (textures, grey photos) and 0.981 on the shipped gcompris photos, where int8's `neardup eval run` figures
#: on the seed-1 set stay with fp32's (top-1 0.994 vs 0.991, micro-AP 0.976 vs 0.972, dups precision 1.000
#: vs 0.9995, recall 0.731 vs 0.737). A broken quantisation (saturating kernels, collapsed ranges) scores far
#: lower, and the nearest-original check catches a model that reorders photos.
INT8_MIN_MEAN_COSINE = 0.98
#: What building the int8 model costs (quantise 96 calibration inputs, guard on 192 images): 12-18 s on 2
#: quiet cores, 55 s under heavy load.
INT8_BUILD_SECONDS = 15
#: Images per ORT run. Unlike torch eager, ORT's fused kernels keep their speed per image up to
#: batches of 8-16 on 2 cores (measured, see benchmarks/RESULTS.md); larger batches only add latency.
ORT_BATCH = 8
#: The TensorRT engine for the dynamic batch axis is built for batches up to this size.
TRT_MAX_BATCH = 64
#: How the names of everything a build writes into the cache begin (then the writer's pid, for people).
#: Written only under the build lock, so whoever holds the lock knows each such item is a dead build's.
TEMP_PREFIX = ".building-"
LOCK_NAME = ".build.lock"
#: Temporary items of releases that wrote them without the lock (`tmpXXXXXXXX` folders, `NAME.XXXXXXXX.tmp`
#: files): removed only when this old, far beyond any build (INT8_BUILD_SECONDS), so never a live one's.
LEGACY_TEMP_AGE_S = 3600
_LEGACY_TEMP = re.compile(r"tmp[a-z0-9_]{8}|.+\.[a-z0-9_]{8}\.tmp")


class CacheError(BackendError):
    """The model cache cannot be written, so a model file it lacks cannot be built there."""


def cache_dir() -> Path:
    """$NEARDUP_CACHE, else $XDG_CACHE_HOME/neardup, else ~/.cache/neardup."""
    if os.environ.get("NEARDUP_CACHE"):
        return Path(os.environ["NEARDUP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "neardup"


def _temp_prefix() -> str:
    return f"{TEMP_PREFIX}{os.getpid()}-"


def _atomic_write(path: Path, write) -> None:
    """Call write(temp_path) and move the result to path: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f"{_temp_prefix()}{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(temp))
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


# ---- export ----------------------------------------------------------------------------------------


def fp32_model_name() -> Path:
    """Where the ONNX export of the default model lies in the cache (unchecked: see fp32_model_path)."""
    return cache_dir() / f"{NAME}-{weights_sha256()[:16]}-{descriptor_key()}-v{EXPORT_VERSION}-opset{OPSET}.onnx"


def fp32_model_path() -> Path:
    """The cached ONNX export of the default model, checked against the sha256 recorded when it was
    exported; exported now if missing or damaged. Raises CacheError when the cache cannot take it."""
    path = fp32_model_name()
    if _fault(path, _recorded_sha256(path)) is None:
        return path
    with build_lock(path.parent):
        fault = _fault(path, _recorded_sha256(path))
        if fault is None:  # exported by another process while this one waited for the lock
            return path
        if fault not in (MISSING, UNRECORDED):  # a surprise worth a line; a first export is not
            _notice(f"the cached ONNX model {path.name} {fault}; exporting it again")
        try:
            _atomic_write(path, export_default_model)
            _atomic_write(_sha256_path(path), lambda temp: temp.write_text(f"{_sha256(path)}  {path.name}\n"))
        except OSError as exc:  # a full disk, a quota: the cache cannot hold the export
            raise CacheError(f"cannot write the model cache {path.parent} ({exc.strerror or exc})") from exc
    return path


def export_default_model(path: Path) -> None:
    import torch
    from torch import nn

    from .efficientnet_lite0 import load_pretrained

    class Embedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = load_pretrained().fix_padding(INPUT_SIZE)

        def forward(self, x):
            return self.model.embedding(x)

    example = torch.zeros(2, 3, INPUT_SIZE, INPUT_SIZE)
    # the TorchScript exporter's deprecation and constant-folding notices are about torch, not the user's run
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Embedding().eval(), (example,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["pixels"], output_names=["embedding"],
                          dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}})


# ---- the cache: checksums, the build lock, leftovers ------------------------------------------------------

#: _fault()'s answers for a file that was never completely built (no line is printed for those).
MISSING = "is missing"
UNRECORDED = "has no recorded sha256 (an interrupted build, or an older neardup's)"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _sha256_path(model: Path) -> Path:
    """Where the export's sha256 is recorded: `sha256sum -c` reads it."""
    return model.with_name(model.name + ".sha256")


def _recorded_sha256(model: Path) -> str | None:
    with contextlib.suppress(OSError, UnicodeError):
        words = _sha256_path(model).read_text().split()
        if words and re.fullmatch(r"[0-9a-f]{64}", words[0]):
            return words[0]
    return None


def _fault(path: Path, recorded) -> str | None:
    """None when `path` holds the file whose sha256 was `recorded` when it was built, else what is wrong
    (MISSING or UNRECORDED when it was never completely built). Checked on every load: a cached model
    that changed on disk would load without an error and give wrong vectors under the model's identity."""
    if not path.exists():
        return MISSING
    if not isinstance(recorded, str) or not recorded:
        return UNRECORDED
    try:
        actual = _sha256(path)
    except OSError as exc:
        return f"is unreadable ({exc.strerror or exc})"
    return None if actual == recorded else "is damaged (its sha256 differs from the one recorded when it was built)"


_held_locks = threading.local()  # per thread: cache folders whose build lock this thread holds, and how often


@contextlib.contextmanager
def build_lock(cache: Path):
    """Held while building a file into the cache: one process builds, the others wait, then find its file
    (every builder re-checks the cache under the lock). Taking it first removes what builds killed
    mid-way left (the lock died with them). Raises CacheError when the cache cannot be written.

    Re-entrant within a thread: a build that needs another cached file (OpenVINO's verdict compiles a model
    and builds the int8 model it is timed against) takes the lock again, and a second flock on a new
    descriptor of the same file would wait for the first forever."""
    key = os.path.realpath(cache)
    held = _held_locks.__dict__.setdefault("counts", {})
    if held.get(key):
        held[key] += 1
        try:
            yield
        finally:
            held[key] -= 1
        return
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise CacheError(f"cannot write the model cache {cache} ({exc.strerror or exc})") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some NFS): build unserialised and remove nothing
            pass
        else:
            _remove_leftovers(cache)
        held[key] = 1
        yield
    finally:
        held.pop(key, None)
        os.close(fd)


def tidy_cache() -> None:
    """Remove what killed builds left in the cache, at start-up, unless a build holds the lock now (its
    items are live) or the cache cannot be written (nothing can be removed then)."""
    cache = cache_dir()
    try:  # (is_dir() raises, not answers False, where a parent folder cannot be searched)
        if not cache.is_dir():
            return
        fd = os.open(cache / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _remove_leftovers(cache)
    except OSError:  # held by a live build, or no locks here
        pass
    finally:
        os.close(fd)


def _remove_leftovers(cache: Path) -> None:
    """Call only under the build lock: every TEMP_PREFIX item is then a dead build's."""
    now = time.time()
    for item in cache.iterdir():
        with contextlib.suppress(OSError):
            legacy = _LEGACY_TEMP.fullmatch(item.name) and now - item.lstat().st_mtime > LEGACY_TEMP_AGE_S
            if item.name.startswith(TEMP_PREFIX) or legacy:
                if item.is_dir() and not item.is_symlink():
                    shutil.rmtree(item)
                else:
                    item.unlink()


_TEMPDIR_LOCK = threading.Lock()


@contextlib.contextmanager
def _temporary_files_in(folder: Path):
    """Make `folder` tempfile's default while ONNX Runtime's quantiser runs: it writes 17 MB models into
    folders of its own (pre.quant.*, ort.quant.*), which a killed build would leave in the system's temp
    folder, where nothing cleans them. (Process-wide: other threads' temporary files land there too
    meanwhile, and go when the build's folder goes; builds happen while a backend loads, before work.)"""
    with _TEMPDIR_LOCK:
        previous = tempfile.tempdir
        tempfile.tempdir = str(folder)
        try:
            yield
        finally:
            tempfile.tempdir = previous


# ---- sessions --------------------------------------------------------------------------------------


def default_threads() -> int:
    """ORT intra-op threads: every core. Decoding threads overlap with it (ORT and Pillow release the
    GIL); spinning is switched off so idle ORT threads give their core to the decoders."""
    return os.cpu_count() or 1


def gpu_providers(cache: Path | None = None) -> list:
    """ORT's GPU providers present here, best first: TensorRT (FP16, engines cached), then CUDA."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    providers: list = []
    if available & {"TensorrtExecutionProvider", "CUDAExecutionProvider"}:
        _preload_cuda_libraries()
    if "TensorrtExecutionProvider" in available and _writable_folder((cache or cache_dir()) / "tensorrt"):
        engines = (cache or cache_dir()) / "tensorrt"
        shape = f"pixels:{{}}x3x{INPUT_SIZE}x{INPUT_SIZE}"
        providers.append(("TensorrtExecutionProvider", {
            "trt_fp16_enable": True,
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(engines),
            "trt_timing_cache_enable": True,
            "trt_timing_cache_path": str(engines),
            "trt_profile_min_shapes": shape.format(1),
            "trt_profile_opt_shapes": shape.format(ORT_BATCH),
            "trt_profile_max_shapes": shape.format(TRT_MAX_BATCH),
        }))
    if "CUDAExecutionProvider" in available:
        providers.append(("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"}))
    return providers


def _writable_folder(folder: Path) -> bool:
    """Made if missing; False when it cannot be (then TensorRT, which would build its engines again in
    every run without a cache for them, is left out and CUDA runs the model)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


@functools.cache
def _preload_cuda_libraries() -> None:
    """onnxruntime-gpu from PyPI finds CUDA and cuDNN in the nvidia-* wheels (those torch's CUDA build
    installs) only when asked to load them; without them the session silently falls back to CPU."""
    import onnxruntime as ort

    with contextlib.suppress(Exception):
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()


def make_session(path: Path, *, threads: int | None = None, providers: Sequence | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or default_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))


class OnnxEmbedder:
    """EfficientNet-Lite0 run by ONNX Runtime; same preprocessing, identity and vectors as torch
    (fp32: max abs difference < 1e-4 on unit vectors, tested)."""

    name = NAME
    dim = DIM
    input_size = INPUT_SIZE

    def __init__(self, path: Path | None = None, *, threads: int | None = None, providers: Sequence | None = None,
                 backend: str = "onnx"):
        self.path = path or fp32_model_path()
        self.session = make_session(self.path, threads=threads, providers=providers)
        self.backend = backend
        self.providers = self.session.get_providers()
        # a GPU wants big batches; on CPU ORT is as fast per image at 8 and keeps activations in cache
        self._batch = ORT_BATCH if self.providers[0] == "CPUExecutionProvider" else TRT_MAX_BATCH
        self.identity = identity()
        self.center = lsh_center()
        self.model_pixels = model_pixels  # a module function: decoding processes can run it

    def preprocess(self, image):
        return lite0_preprocess(image)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return embed_in_batches(batch, self.input_size, self.dim, self._batch,
                                lambda part: self.session.run(None, {"pixels": part})[0])


# ---- int8 --------------------------------------------------------------------------------------------


def calibration_photos(path: Path | None = None) -> list:
    """The photos int8 is calibrated and guarded on, shipped with neardup (default_model.CALIBRATION_FILE,
    made by benchmarks/make_calibration.py): the same everywhere, whatever the user has installed."""
    from PIL import Image

    with np.load(path or CALIBRATION_FILE) as data:
        photos = data["photos"]
    return [Image.fromarray(photo) for photo in photos]


def guard_set(photos: Sequence, preprocess=lite0_preprocess) -> tuple[np.ndarray, np.ndarray]:
    """(originals, copies) model inputs: the photos, and each photo under every demo edit (copy i*E+e
    is photo i under edit e). The guard checks that each copy keeps its nearest original."""
    from ..demo import EDITS

    originals = np.stack([preprocess(p) for p in photos])
    copies = np.stack([preprocess(edit(p)) for p in photos for edit in EDITS.values()])
    return originals, copies


def calibration_inputs(originals: np.ndarray, copies: np.ndarray) -> np.ndarray:
    """Every other photo and its copies: the guard then also sees photos the calibration never saw."""
    per_photo = copies.reshape(len(originals), -1, *copies.shape[1:])
    return np.concatenate([originals[::2], per_photo[::2].reshape(-1, *copies.shape[1:])])


def int8_guard(fp32, int8, originals: np.ndarray, copies: np.ndarray) -> dict:
    return accuracy_guard(fp32, int8, originals, copies, INT8_MIN_MEAN_COSINE)


def accuracy_guard(reference, candidate, originals: np.ndarray, copies: np.ndarray, min_mean_cosine: float, *,
                   min_cosine: float | None = None, extra: np.ndarray | None = None,
                   extra_min_cosine: float | None = None) -> dict:
    """Compare a faster embedder with the fp32 reference on the guard set: cosine of each vector to its
    reference vector (mean >= min_mean_cosine; with `min_cosine`, the worst vector's too: a few photos
    moved far do not show in a mean), and the nearest original of each copy (none changed). `extra`
    inputs (hard cases, with no originals) are judged apart: their worst cosine >= extra_min_cosine."""
    expected = np.concatenate([reference.embed(originals), reference.embed(copies)])
    actual = np.concatenate([candidate.embed(originals), candidate.embed(copies)])
    cosines = np.sum(expected * actual, axis=1)
    n = len(originals)
    top1_expected = np.argmax(expected[n:] @ expected[:n].T, axis=1)
    top1_actual = np.argmax(actual[n:] @ actual[:n].T, axis=1)
    changed = int(np.sum(top1_expected != top1_actual))
    report = {
        "images": len(cosines),
        "copies": len(copies),
        "mean_cosine": round(float(cosines.mean()), 6),
        "min_cosine": round(float(cosines.min()), 6),
        "top1_changed": changed,
        "min_mean_cosine": min_mean_cosine,
    }
    passed = report["mean_cosine"] >= min_mean_cosine and changed == 0
    if min_cosine is not None:
        report["min_min_cosine"] = min_cosine
        report["worst"] = [{"image": int(i), "cosine": round(float(cosines[i]), 6)} for i in np.argsort(cosines)[:3]]
        passed = passed and report["min_cosine"] >= min_cosine
    if extra is not None and len(extra):
        hard = np.sum(reference.embed(extra) * candidate.embed(extra), axis=1)
        report["extra_images"] = len(extra)
        report["extra_cosines"] = [round(float(c), 4) for c in hard]
        report["extra_min_cosine"] = round(float(hard.min()), 6)
        if extra_min_cosine is not None:
            report["min_extra_min_cosine"] = extra_min_cosine
            passed = passed and report["extra_min_cosine"] >= extra_min_cosine
    report["passed"] = passed
    return report


def _refusal(report: dict) -> str:
    return (f"int8 model refused by its accuracy guard: mean cosine to fp32 {report['mean_cosine']:.4f} "
            f"(needs >= {report.get('min_mean_cosine', INT8_MIN_MEAN_COSINE)}), {report['top1_changed']} of "
            f"{report.get('copies', '?')} edited copies changed their nearest original (needs 0)")


def default_model_int8_nodes(model) -> list[str]:
    """The nodes of the exported default model (an onnx.ModelProto) to quantise: MBConv blocks from
    INT8_FLOAT_BLOCKS on and the head conv with its activation. The node names come from the torch
    module paths (`/_blocks.3/_expand_conv/Conv`, `/_conv_head/Conv`), fixed by EXPORT_VERSION."""
    import re

    nodes, head_outputs = [], set()
    for node in model.graph.node:
        block = re.match(r"/_blocks\.(\d+)/", node.name)
        if block and int(block.group(1)) >= INT8_FLOAT_BLOCKS:
            nodes.append(node.name)
        elif node.name.startswith("/_conv_head/") and node.op_type == "Conv":
            nodes.append(node.name)
            head_outputs.update(node.output)
        elif node.op_type == "Clip" and head_outputs & set(node.input):
            nodes.append(node.name)  # the head's ReLU6
    if not head_outputs or len(nodes) < 10:
        raise BackendError("the default model's ONNX graph does not have the expected node names; "
                           f"bump EXPORT_VERSION and re-export ({len(nodes)} nodes selected for int8)")
    return nodes


def quantise(fp32_path: Path, calibration: np.ndarray, out: Path, input_name: str = "pixels",
             select_nodes=None, **options) -> None:
    """Static QDQ quantisation: per-channel symmetric int8 weights, asymmetric uint8 activations with
    MinMax ranges over the calibration inputs. `select_nodes(model)` names the nodes to quantise
    (default: all). (Measured on the default model, all nodes int8: Percentile and Entropy calibration,
    reduced range, s8/u8 variants and keeping the head or the noisiest project convs in float all gave
    the same or a lower cosine to fp32, 0.94-0.987; keeping the stem and block 0 in float gave 0.994.)"""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{input_name: calibration[i:i + 8]} for i in range(0, len(calibration), 8)])

        def get_next(self):
            return next(self.batches, None)

    # every intermediate file beside `out` (in the cache when building the cached model), none in /tmp
    with tempfile.TemporaryDirectory(prefix=_temp_prefix(), dir=out.parent) as work, _temporary_files_in(Path(work)):
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        nodes = None
        if select_nodes is not None:
            import onnx

            nodes = select_nodes(onnx.load(str(prepared)))
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                        **{"extra_options": {"ActivationSymmetric": False, "WeightSymmetric": True}, **options})


def build_guarded_int8(fp32, load, originals: np.ndarray, copies: np.ndarray, out: Path, *,
                       calibration: np.ndarray | None = None, input_name: str = "pixels",
                       select_nodes=None) -> dict:
    """Quantise the ONNX file of the `fp32` embedder, load the result with `load(path)`, and guard it
    against fp32 on (originals, copies). Writes `out` only when the guard passes, and the report beside
    it (out with .guard.json) either way, with the sha256 of the file it passed (checked on every load).
    Returns the report; raises BackendError on refusal.
    `calibration` overrides the calibration inputs (default: calibration_inputs(originals, copies));
    `select_nodes` picks the nodes to quantise (see quantise)."""
    if calibration is None:
        calibration = calibration_inputs(originals, copies)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=_temp_prefix(), dir=out.parent) as work:
        candidate = Path(work) / "int8.onnx"
        quantise(fp32.path, np.ascontiguousarray(calibration, dtype=np.float32), candidate, input_name, select_nodes)
        report = int8_guard(fp32, load(candidate), originals, copies)
        report["calibration_images"] = len(calibration)
        if report["passed"]:
            report["model_sha256"] = _sha256(candidate)
            os.chmod(candidate, 0o644)
            os.replace(candidate, out)
    _atomic_write(_report_path(out), lambda temp: temp.write_text(json.dumps(report, indent=1)))
    if not report["passed"]:
        raise BackendError(_refusal(report) + "; use --backend onnx")
    return report


def _report_path(model: Path) -> Path:
    return model.with_name(model.name.removesuffix(".onnx") + ".guard.json")


def int8_model(photos: Sequence | None = None, *, threads: int | None = None) -> Path:
    """The guarded int8 model of the default model for these calibration photos (default: the shipped
    calibration_photos()), from the cache or built and guarded now (one line on stderr says so). Raises
    BackendError when it fails its guard, now or in an earlier run under the same guard threshold (the
    refusal is cached too), and CacheError when the cache cannot be written."""
    photos = calibration_photos() if photos is None else list(photos)
    originals, copies = guard_set(photos)
    calibration = calibration_inputs(originals, copies)
    calibration_hash = hashlib.sha256(calibration.tobytes()).hexdigest()[:16]
    path = cache_dir() / f"{_int8_prefix()}{calibration_hash}.onnx"
    if _cached_int8(path):
        return path
    fp32 = OnnxEmbedder(threads=threads)
    with build_lock(path.parent):
        if _cached_int8(path):  # built by another process while this one waited for the lock
            return path
        _notice(_int8_build_line(path))
        build_guarded_int8(fp32, lambda p: OnnxEmbedder(p, threads=threads, backend="onnx-int8"), originals, copies,
                           path, calibration=calibration, select_nodes=default_model_int8_nodes)
    return path


def _cached_int8(path: Path) -> bool:
    """Whether the int8 model `path` is cached, passed its guard at today's threshold and is the very file
    that passed. Raises BackendError when its guard refused it at today's threshold (another threshold's
    verdict, a damaged report or a damaged model: False, it is built and judged again)."""
    report = _read_report(path)
    if report is None or report.get("min_mean_cosine") != INT8_MIN_MEAN_COSINE:
        return False
    if report.get("passed") is not True:
        raise BackendError(_refusal(report) + "; use --backend onnx")
    return _fault(path, report.get("model_sha256")) is None


def _int8_build_line(path: Path) -> str:
    """What building the int8 model now is, for the user who waits for it."""
    cost = f"about {INT8_BUILD_SECONDS} s on 2 cores"
    report = _read_report(path)
    if not _report_path(path).exists():
        return f"building the int8 model for this machine (once, {cost})"
    if report is None:
        return f"the int8 model's guard report {_report_path(path).name} is damaged; building the model again ({cost})"
    if report.get("min_mean_cosine") != INT8_MIN_MEAN_COSINE:
        return f"judging the int8 model under today's accuracy guard; building it again ({cost})"
    return f"the cached int8 model {path.name} {_fault(path, report.get('model_sha256'))}; building it again ({cost})"


def _read_report(model: Path) -> dict | None:
    """The guard report of the int8 model `model`, or None when there is none or it is damaged (then the
    model is built and judged again: a torn report must not disable int8 for good)."""
    with contextlib.suppress(OSError, ValueError):
        report = json.loads(_report_path(model).read_text())
        if isinstance(report, dict) and {"passed", "min_mean_cosine", "mean_cosine", "top1_changed"} <= report.keys():
            return report
    return None


def auto_int8_model(threads: int | None = None) -> Path | None:
    """What `auto` runs on a CPU: the guarded int8 model, built, guarded and cached the first time (a fixed
    amount of work: INT8_BUILD_SECONDS here), or None (fp32) with one line on stderr saying why."""
    model = guarded_int8_model()
    if model is not None:
        return model
    try:
        return int8_model(threads=threads)
    except BackendError as exc:  # a refusal, or a cache that cannot be written (CacheError)
        _notice(f"{str(exc).removesuffix('; use --backend onnx')}; using fp32 ONNX")
    except Exception as exc:  # noqa: BLE001 (the quantiser and ORT raise many types; fp32 still works)
        _notice(f"cannot build the int8 model ({type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}); "
                "using fp32 ONNX")
    return None


def _notice(line: str) -> None:
    print(f"neardup: {line}", file=sys.stderr, flush=True)


def _int8_prefix() -> str:
    return f"{NAME}-{weights_sha256()[:16]}-{descriptor_key()}-v{EXPORT_VERSION}-int8v{INT8_VERSION}-cal"


def guarded_int8_model() -> Path | None:
    """An int8 model of the current weights and recipe already built here that passed its guard at the
    current threshold or a stricter one and is still the file that passed (its sha256 checked), if any
    (what `auto` may use without calibrating at load time)."""
    for report_path in sorted(cache_dir().glob(f"{_int8_prefix()}*.guard.json")):
        model = report_path.with_name(report_path.name.removesuffix(".guard.json") + ".onnx")
        report = _read_report(model) or {}
        threshold = report.get("min_mean_cosine")
        if (report.get("passed") is True and isinstance(threshold, (int, float)) and threshold >= INT8_MIN_MEAN_COSINE
                and _fault(model, report.get("model_sha256")) is None):
            return model
    return None


def int8_report(model: Path) -> dict:
    return json.loads(_report_path(model).read_text())
