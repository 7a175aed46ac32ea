"""The default model's cached ONNX export run by OpenVINO on the CPU (``neardup[openvino]``, issue 20).

What runs. One of neardup's cached ONNX files, compiled by OpenVINO's CPU plugin at a precision:

* ``bf16``: the fp32 export (onnx_backend.fp32_model_path: cached by weights hash, its sha256 checked on
  every load) with OpenVINO's bf16 inference precision, where the CPU has AMX or AVX-512 bf16
  (``amx_bf16`` / ``avx512_bf16`` in its flags; OpenVINO's own default precision there): activations and
  weights in bfloat16, accumulation in fp32;
* ``int8``: the int8 model the ``onnx-int8`` backend runs (onnx_backend.guarded_int8_model: static QDQ,
  passed its own guard, sha256 checked), whose quantised convolutions OpenVINO runs with its integer kernels
  (AMX / VNNI where the CPU has them) and everything else in f32 (the f32 hint: with bf16 around the
  integer kernels the textureless hard cases fall to a cosine of 0.40, measured). Same scales as ORT's int8,
  so the same vectors to within a cosine of 0.994 (worst) on the guard photos, 2.3x as fast here;
* ``f32``: the fp32 export at full precision, where neither of the others passes its guard.

The compiled model is cached by OpenVINO itself (its CACHE_DIR property) in ``<neardup cache>/openvino``,
keyed by OpenVINO on the model file's content, the device and the properties, so a one-image query
imports the blob instead of compiling.

The guard. A precision is used only when, on the photos shipped with neardup and their edited copies
(onnx_backend.guard_set, the int8 guard's set) plus HARD_CASES (synthetic images of the kinds bf16 moves
most: see RESULTS, "OpenVINO backend"), its vectors keep a mean cosine to the fp32 ONNX vectors >=
OV_MIN_MEAN_COSINE, *every* vector a cosine >= OV_MIN_COSINE (the worst vectors, not only the mean; int8:
OV_INT8_MIN_MEAN_COSINE, the bar ORT's int8 is held to, and a worst-vector bar no stricter than what ORT's int8,
the fallback running the same integer model, reaches on the same images: int8_worst_bar), the hard cases a worst
cosine >= OV_HARD_MIN_COSINE, and every copy's nearest original unchanged (onnx_backend.accuracy_guard).

What ``auto`` picks (auto_choice). For each candidate precision in turn (candidate_precisions: bf16 first
where the CPU has it, then int8 where a guarded int8 model exists, then f32): guard it, then time it against what ``auto`` ran before OpenVINO (the
guarded ORT int8 model, else ORT fp32) on the same inputs, interleaved, best of SPEED_ROUNDS; the first
candidate that passes its guard and is at least MIN_SPEEDUP times as fast is chosen. Otherwise ``auto``
runs ORT int8, then ORT fp32, as before: a CPU where OpenVINO is not measurably faster never gets a slower
default. The verdict (guard reports, speeds, why) is cached as JSON in the neardup cache, keyed by the
ONNX export, the OpenVINO version, this recipe (OV_VERSION) and the CPU (model name, flags that matter,
cores), and shown by ``neardup info``, ``neardup bench`` and the index summary (describe_choice).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from . import onnx_backend as ob
from .default_model import DIM, INPUT_SIZE, NAME, embed_in_batches, identity, lsh_center, model_pixels
from .default_model import preprocess as lite0_preprocess
from ..errors import BackendError

#: Bump when the choice's recipe (candidates, guard set, bars, timing) changes: cached verdicts are then ignored.
OV_VERSION = 3
#: The bars of OpenVINO's guard (OpenVINO f32 scores 1.0 everywhere). bf16 here: on the shipped photos and
#: their copies mean 0.9987, worst 0.9946; on the seed-1 evaluation set (931 images) mean 0.9973, worst 0.972
#: (ORT int8, today's default: 0.990 / 0.877). The textureless hard cases: bf16 worst 0.750, ORT int8 0.722;
#: their bar asks for no more than today's default moves them, less a margin for other CPUs' kernels.
OV_MIN_MEAN_COSINE = 0.995
OV_MIN_COSINE = 0.98
OV_HARD_MIN_COSINE = 0.7
#: int8's bars: the int8 guard's mean (what ORT's int8, today's default, is held to) plus a worst-vector
#: bar. Copy-trained weights, Sapphire Rapids: ORT int8 mean 0.9943, worst 0.9883, hard cases 0.733;
#: OpenVINO int8 0.9942 / 0.9884 / 0.743 (RESULTS, "OpenVINO int8").
OV_INT8_MIN_MEAN_COSINE = ob.INT8_MIN_MEAN_COSINE
OV_INT8_MIN_COSINE = 0.97
#: ...but never a stricter worst-vector bar than ORT's int8 itself, the fallback, clears on the same images less
#: this margin: both run the same integer model, and where the CPU has no VNNI both round its products alike
#: (an AVX2 EPYC: ORT int8 worst 0.950, OpenVINO int8 0.947, both within 0.005 of fp32 on eval seeds 1-3; RESULTS,
#: "A CPU without AMX or VNNI"). Refusing OpenVINO there would run the same vectors, slower. Never below the floor.
OV_INT8_FALLBACK_MARGIN = 0.01
OV_INT8_MIN_COSINE_FLOOR = 0.9
#: OpenVINO is chosen over today's default only when at least this much faster, measured here (noise margin).
MIN_SPEEDUP = 1.1
SPEED_ROUNDS = 3
SPEED_IMAGES = 64
#: Images per OpenVINO inference on the CPU (as fast per image as larger batches on 2 cores, measured).
OV_BATCH = 32
#: CPU flags that give OpenVINO's CPU plugin a bf16 path.
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
#: CPU flags of integer dot-product units (named in the int8 verdict's reason; the timing decides).
INT8_FLAGS = frozenset({"amx_int8", "avx512_vnni", "avx_vnni"})
#: CPU flags recorded in the verdict's key: a verdict measured on another CPU is not reused.
KEY_FLAGS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2", "avx_vnni")
PRECISIONS = ("bf16", "int8", "f32")


# ---- what this machine has --------------------------------------------------------------------------


def available() -> bool:
    """Whether the openvino package is installed (neardup[openvino])."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and not model:
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = frozenset(value.split())
    return model, flags


def cpu_flags() -> frozenset[str] | None:
    """The CPU's flags (/proc/cpuinfo), or None where they cannot be read (then OpenVINO's own
    OPTIMIZATION_CAPABILITIES decide about bf16). Tests replace this function to fake a CPU."""
    info = _cpuinfo()
    return info[1] if info else None


def cpu_model() -> str:
    info = _cpuinfo()
    return (info[0] if info else "") or os.uname().machine


def bf16_capable(flags: frozenset[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        with contextlib.suppress(Exception):
            return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        return False
    return bool(BF16_FLAGS & flags)


def candidate_precisions(flags: frozenset[str] | None = None, *, int8: bool = True) -> list[str]:
    """The precisions to try, closest to fp32 first among the fast ones: bf16 only where the CPU computes
    it natively (elsewhere OpenVINO would emulate it, slowly), then int8 where a guarded int8 model exists
    (`int8`; the timing decides whether OpenVINO's integer kernels win on this CPU), then f32."""
    return (["bf16"] if bf16_capable(flags) else []) + (["int8"] if int8 else []) + ["f32"]


def why_precision(precision: str, flags: frozenset[str] | None = None) -> str:
    flags = cpu_flags() if flags is None else flags
    if precision == "bf16":
        have = sorted(BF16_FLAGS & (flags or frozenset())) or ["OpenVINO's BF16 capability"]
        return f"the CPU has {' and '.join(have)}"
    if precision == "int8":
        have = sorted(INT8_FLAGS & (flags or frozenset()))
        return "the guarded int8 model" + (f", the CPU has {', '.join(have)}" if have else "")
    return "the CPU has no AMX/AVX-512 bf16" if not bf16_capable(flags) else "bf16 and int8 were not chosen"


# ---- the embedder -----------------------------------------------------------------------------------------


@functools.cache
def _core():
    import openvino as ov

    return ov.Core()


def compiled_cache_dir() -> Path:
    return ob.cache_dir() / "openvino"


def compile_model(path: Path, precision: str, threads: int | None = None):
    """The ONNX file compiled for the CPU at this precision. The compiled blob is cached by OpenVINO in
    compiled_cache_dir() (not where that cannot be written) and, like every file of the neardup cache,
    checked against the sha256 recorded when it was written: OpenVINO loads a damaged blob without an
    error and gives wrong vectors (measured: cosine -0.1 to fp32 after 4 KB were changed), so a blob that
    differs from its record, or has none, is removed (OpenVINO compiles again) before OpenVINO looks."""
    if precision not in PRECISIONS:
        raise BackendError(f"unknown OpenVINO precision {precision!r} (choose from {', '.join(PRECISIONS)})")
    # int8: the QDQ model's quantised operations run in int8 whatever the hint; the rest in f32 (see the module)
    hint = "f32" if precision == "int8" else precision
    config = {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads or ob.default_threads(),
              "PERFORMANCE_HINT": "LATENCY"}
    folder = compiled_cache_dir()
    if not ob._writable_folder(folder):
        return _core().compile_model(str(path), "CPU", config)
    config["CACHE_DIR"] = str(folder)
    with ob.build_lock(ob.cache_dir()):  # no blob is half written while it is checked, none unrecorded after
        _remove_unverified_blobs(folder)
        before = _blob_stats(folder)
        # compiled from the path, not a read model: with a cached blob OpenVINO then skips parsing the ONNX file
        compiled = _core().compile_model(str(path), "CPU", config)
        _record_blobs(folder, before)
    return compiled


def _blob_stats(folder: Path) -> dict[Path, tuple[int, int]]:
    stats = {}
    for blob in folder.glob("*.blob"):
        with contextlib.suppress(OSError):
            stat = blob.stat()
            stats[blob] = (stat.st_size, stat.st_mtime_ns)
    return stats


def _remove_unverified_blobs(folder: Path) -> None:
    for blob in folder.glob("*.blob"):
        fault = ob._fault(blob, ob._recorded_sha256(blob))
        if fault is not None:
            if fault != ob.UNRECORDED:
                ob._notice(f"the cached compiled OpenVINO model {blob.name} {fault}; compiling it again")
            with contextlib.suppress(OSError):
                blob.unlink()
                ob._sha256_path(blob).unlink(missing_ok=True)


def _record_blobs(folder: Path, before: dict[Path, tuple[int, int]]) -> None:
    """Record the sha256 of every blob without a record, and of every blob OpenVINO wrote while it compiled
    under the lock (`before`: the blobs' sizes and times before): it rewrites a blob in place when the model
    file behind it was rebuilt (the int8 model after its guard report was damaged), whose old record would
    call it damaged at the next start."""
    for blob, stat in _blob_stats(folder).items():
        if ob._recorded_sha256(blob) is None or before.get(blob) != stat:
            digest = ob._sha256(blob)
            with contextlib.suppress(OSError):  # unrecorded: removed and compiled again next time
                ob._atomic_write(ob._sha256_path(blob), lambda temp: temp.write_text(f"{digest}  {blob.name}\n"))


class OpenVinoEmbedder:
    """EfficientNet-Lite0 run by OpenVINO's CPU plugin at `precision` (bf16 and f32: the cached fp32 ONNX
    export; int8: the guarded int8 model); same preprocessing, identity and vector space as the other
    backends (guarded, see the module)."""

    name = NAME
    dim = DIM
    input_size = INPUT_SIZE

    def __init__(self, precision: str = "bf16", *, path: Path | None = None, threads: int | None = None,
                 choice: dict | None = None):
        self.path = path or (int8_model_path(threads) if precision == "int8" else ob.fp32_model_path())
        self.precision = precision
        self.compiled = compile_model(self.path, precision, threads)
        # an infer request runs one inference at a time ("Infer Request is busy" otherwise) while the
        # compiled model serves any number: one request per thread (the web page's searches run in a pool)
        self._requests = threading.local()
        self.backend = "openvino"
        self.providers = [f"OpenVINO CPU {precision}"]
        self.choice = choice  # auto's verdict, when auto chose this embedder
        self.identity = identity()
        self.center = lsh_center()
        self.model_pixels = model_pixels  # a module function: decoding processes can run it

    def preprocess(self, image):
        return lite0_preprocess(image)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self.compiled.create_infer_request()
        return embed_in_batches(batch, self.input_size, self.dim, OV_BATCH,
                                lambda part: np.array(request.infer({0: part})[0], dtype=np.float32))


def int8_model_path(threads: int | None = None) -> Path:
    """The int8 model that `onnx-int8` runs: the guarded one built here, else built now (BackendError where
    its own guard refuses it)."""
    return ob.guarded_int8_model() or ob.int8_model(threads=threads)


# ---- the guard ---------------------------------------------------------------------------------------------


def hard_cases() -> list:
    """Synthetic textureless images, the kind whose vectors reduced precision moves most (RESULTS, "OpenVINO
    backend"): a flat colour with faint noise and a smooth gradient of it, in a saturated red, blue and
    yellow and a grey. Their features are near zero, so rounding (bf16 keeps 8 bits of mantissa, int8 256
    levels) is large beside them and the whitening magnifies it: the smooth gradients score 0.72-0.81 for
    ORT int8 and 0.75-0.86 for OpenVINO bf16 here, fp32 OpenVINO 1.0. Deterministic (fixed seed)."""
    from PIL import Image

    rng = np.random.default_rng(20)
    size = INPUT_SIZE
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    images = []
    for colour in ((200, 40, 30), (20, 60, 190), (240, 230, 20), (128, 128, 128)):
        base = np.empty((size, size, 3), np.float32)
        base[:] = colour
        faint = base + rng.normal(0, 3, base.shape)
        gradient = base * (0.6 + 0.4 * ramp[None, :, None])
        for array in (faint, gradient):
            images.append(Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)))
    return images


def guard_inputs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(originals, copies, extra): the int8 guard's photos and copies, and hard_cases() as extra inputs."""
    originals, copies = ob.guard_set(ob.calibration_photos())
    extra = np.stack([lite0_preprocess(p) for p in hard_cases()])
    return originals, copies, extra


def int8_worst_bar(fallback_worst: float | None) -> float:
    """OpenVINO int8's worst-vector bar, given the worst cosine to fp32 of ORT's int8 (the fallback) on the
    same images: OV_INT8_MIN_COSINE, lowered to the fallback's worst less OV_INT8_FALLBACK_MARGIN, never
    below OV_INT8_MIN_COSINE_FLOOR."""
    if fallback_worst is None:
        return OV_INT8_MIN_COSINE
    return round(max(OV_INT8_MIN_COSINE_FLOOR, min(OV_INT8_MIN_COSINE, fallback_worst - OV_INT8_FALLBACK_MARGIN)), 6)


def fidelity(reference, candidate, inputs=None) -> dict:
    """The guard's figures of ORT's int8 (the fallback) on the guard's inputs, under its own bars."""
    originals, copies, extra = inputs or guard_inputs()
    return ob.accuracy_guard(reference, candidate, originals, copies, ob.INT8_MIN_MEAN_COSINE, extra=extra)


def guard(reference, candidate, inputs=None, *, precision: str | None = None,
          fallback_worst: float | None = None) -> dict:
    """onnx_backend.accuracy_guard with OpenVINO's bars for the candidate's precision: on the shipped photos
    and their copies the mean cosine and the worst one, and no nearest original changed; on the textureless
    hard cases, the worst. int8's worst-vector bar follows ORT int8's `fallback_worst` (int8_worst_bar)."""
    originals, copies, extra = inputs or guard_inputs()
    precision = precision or getattr(candidate, "precision", None)
    mean_bar, worst_bar = ((OV_INT8_MIN_MEAN_COSINE, int8_worst_bar(fallback_worst)) if precision == "int8"
                           else (OV_MIN_MEAN_COSINE, OV_MIN_COSINE))
    return ob.accuracy_guard(reference, candidate, originals, copies, mean_bar, min_cosine=worst_bar,
                             extra=extra, extra_min_cosine=OV_HARD_MIN_COSINE)


def refusal(precision: str, report: dict) -> str:
    return (f"OpenVINO {precision} refused by its accuracy guard: cosine to fp32 on the guard photos mean "
            f"{report['mean_cosine']:.4f} (needs >= {report['min_mean_cosine']}), worst {report['min_cosine']:.4f} "
            f"(needs >= {report['min_min_cosine']}), on textureless images worst {report['extra_min_cosine']:.4f} "
            f"(needs >= {report['min_extra_min_cosine']}); {report['top1_changed']} of {report['copies']} edited "
            "copies changed their nearest original (needs 0)")


# ---- speed ---------------------------------------------------------------------------------------------------


def measure(embedders: dict, inputs: np.ndarray, rounds: int = SPEED_ROUNDS) -> dict:
    """Images/s of each embedder on the same inputs, interleaved round by round (so a neighbour's load
    falls on all of them alike), best round of each."""
    for embedder in embedders.values():
        embedder.embed(inputs[:8])  # warm-up
    best = dict.fromkeys(embedders, 0.0)
    for _ in range(rounds):
        for name, embedder in embedders.items():
            start = time.perf_counter()
            embedder.embed(inputs)
            best[name] = max(best[name], len(inputs) / (time.perf_counter() - start))
    return {name: round(rate, 1) for name, rate in best.items()}


# ---- auto's choice ---------------------------------------------------------------------------------------


def _openvino_version() -> str:
    """OpenVINO's version from its package metadata: importing openvino to ask costs 0.2 s, which a one-image
    query on a CPU where auto runs ONNX Runtime would pay only to find its cached verdict."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("openvino")
    except PackageNotFoundError:
        import openvino as ov

        return ov.__version__


def _choice_path() -> Path:
    key = json.dumps({"cpu": cpu_model(), "flags": sorted(set(KEY_FLAGS) & (cpu_flags() or frozenset())),
                      "cores": os.cpu_count(), "openvino": _openvino_version(), "bf16": bf16_capable()}, sort_keys=True)
    export = ob.fp32_model_name().name.removesuffix(".onnx")
    return ob.cache_dir() / f"{export}-openvino{OV_VERSION}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.choice.json"


def _read_choice(path: Path) -> dict | None:
    with contextlib.suppress(OSError, ValueError):
        choice = json.loads(path.read_text())
        if (isinstance(choice, dict) and choice.get("backend") in ("openvino", "onnx-int8", "onnx")
                and (choice["backend"] != "openvino" or choice.get("precision") in PRECISIONS)):
            return choice
    return None


def cached_choice() -> dict | None:
    """auto's verdict on this machine if it was reached before (nothing is built or measured)."""
    if not available():
        return None
    try:
        return _read_choice(_choice_path())
    except Exception:  # noqa: BLE001 (no export yet, an unreadable cache: no verdict)
        return None


def auto_choice(threads: int | None = None) -> dict:
    """What `auto` runs on this CPU, and why: {"backend": "openvino"|"onnx-int8"|"onnx", "precision",
    "reason", "guards", "speed"}. Cached (see the module); reached the first time by guarding and timing
    the candidates (a few seconds, plus building the int8 model it is measured against, as before)."""
    path = _choice_path()
    choice = _read_choice(path)
    if choice is not None:
        return choice
    with ob.build_lock(path.parent):
        choice = _read_choice(path)
        if choice is None:
            ob._notice("measuring OpenVINO against ONNX Runtime on this CPU (once, a few seconds)")
            choice = decide(threads)
            ob._atomic_write(path, lambda temp: temp.write_text(json.dumps(choice, indent=1)))
    return choice


def decide(threads: int | None = None, flags: frozenset[str] | None = None) -> dict:
    """Guard and time every candidate precision against today's default (see the module)."""
    fp32 = ob.OnnxEmbedder(threads=threads)
    int8_path = ob.auto_int8_model(threads)
    if int8_path is not None:
        baseline_name, baseline = "onnx-int8", ob.OnnxEmbedder(int8_path, threads=threads, backend="onnx-int8")
    else:
        baseline_name, baseline = "onnx", fp32
    inputs = guard_inputs()
    timing = np.concatenate([inputs[0], inputs[1]])[:SPEED_IMAGES]
    guards, speeds, reasons, passed_over = {}, {}, [], []
    for precision in candidate_precisions(flags, int8=int8_path is not None):
        candidate = OpenVinoEmbedder(precision, path=int8_path if precision == "int8" else fp32.path, threads=threads)
        fallback_worst = None
        if precision == "int8":  # the same integer model as the baseline: held to the baseline's own fidelity
            fallback_worst = (guards.setdefault("onnx-int8", fidelity(fp32, baseline, inputs)))["min_cosine"]
        report = guards[precision] = guard(fp32, candidate, inputs, precision=precision, fallback_worst=fallback_worst)
        if not report["passed"]:
            reasons.append(refusal(precision, report))
            passed_over.append(f"{precision} refused by its accuracy guard")
            continue
        speed = measure({f"openvino-{precision}": candidate, baseline_name: baseline}, timing)
        speeds.update(speed)
        ratio = speed[f"openvino-{precision}"] / max(speed[baseline_name], 1e-9)
        if ratio >= MIN_SPEEDUP:
            return {"backend": "openvino", "precision": precision, "guards": guards, "speed": speeds,
                    "reason": (f"OpenVINO {precision} ({why_precision(precision, flags)}): {ratio:.1f}x {baseline_name} "
                               f"here ({speed[f'openvino-{precision}']:.0f} vs {speed[baseline_name]:.0f} img/s), "
                               f"cosine to fp32 mean {report['mean_cosine']:.4f}, worst {report['min_cosine']:.4f}"
                               + "".join(f"; {why}" for why in passed_over))}
        reasons.append(f"OpenVINO {precision} not faster than {baseline_name} here ({ratio:.2f}x, needs {MIN_SPEEDUP}x)")
        passed_over.append(f"{precision} not faster")
    return {"backend": baseline_name, "precision": None, "guards": guards, "speed": speeds,
            "reason": "; ".join(reasons) + f"; running {baseline_name}"}


def describe_choice(choice: dict | None) -> str:
    if choice is None:
        return "not measured yet on this machine"
    return f"{choice['backend']}" + (f" {choice['precision']}" if choice.get("precision") else "") + f": {choice['reason']}"


def explicit_precision(threads: int | None = None) -> str:
    """--backend openvino: the cached verdict's precision where auto chose OpenVINO, else the best candidate
    precision that passes its guard (checked now; BackendError when none does)."""
    choice = cached_choice()
    if choice and choice.get("backend") == "openvino":
        return choice["precision"]
    fp32 = ob.OnnxEmbedder(threads=threads)
    inputs, reasons = guard_inputs(), []
    for precision in candidate_precisions():
        path, fallback_worst = fp32.path, None
        if precision == "int8":  # built (once) only when bf16 did not pass first
            path = ob.auto_int8_model(threads)
            if path is None:
                continue
            fallback_worst = fidelity(fp32, ob.OnnxEmbedder(path, threads=threads, backend="onnx-int8"), inputs)["min_cosine"]
        report = guard(fp32, OpenVinoEmbedder(precision, path=path, threads=threads), inputs, precision=precision,
                       fallback_worst=fallback_worst)
        if report["passed"]:
            return precision
        reasons.append(refusal(precision, report))
    raise BackendError("; ".join(reasons) + "; use --backend onnx")


__all__ = ["OpenVinoEmbedder", "auto_choice", "available", "candidate_precisions", "cached_choice", "decide",
           "describe_choice", "guard"]

