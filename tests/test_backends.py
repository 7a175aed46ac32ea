"""Backends of the default model (torch, ONNX fp32, int8), custom ONNX models, and `neardup bench`:
real weights, real photos, real ONNX Runtime sessions."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jsonschema
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from torch import nn

from neardup import models, schemas
from neardup.cli import main
from neardup.index import Index, ModelMismatch
from neardup.models import load_embedder, resolve_backend
from neardup.models import onnx_backend as ob
from neardup.models import openvino_backend as ovb
from neardup.models.custom import CustomOnnxEmbedder
from neardup.models.default_model import DIM
from neardup.models.efficientnet_lite0 import (
    TorchEmbedder,
    load_pretrained,
    weights_sha256,
)

#: Asserted bound on |onnx - torch| per component of the unit vectors (measured: 5e-7).
ONNX_TOLERANCE = 1e-4
TRIMMED_SIZE = 128
TRIMMED_SPEC = {"name": "lite0-trimmed", "input_size": TRIMMED_SIZE, "mean": [127 / 255] * 3, "std": [128 / 255] * 3}

needs_cuda_ort = pytest.mark.skipif(
    not {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(ort.get_available_providers()),
    reason="onnxruntime has no CUDA/TensorRT provider here (CPU-only build or no GPU)")
needs_torch_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private export cache for this module ($NEARDUP_CACHE), so the tests see exports they made."""
    folder = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("NEARDUP_CACHE")
    os.environ["NEARDUP_CACHE"] = str(folder)
    yield folder
    if previous is None:
        del os.environ["NEARDUP_CACHE"]
    else:
        os.environ["NEARDUP_CACHE"] = previous


@pytest.fixture(scope="module")
def onnx_embedder(cache):
    return ob.OnnxEmbedder(threads=2)


@pytest.fixture(scope="module")
def photos(collection):
    return {name: Image.open(path).convert("RGB") for name, path in collection["originals"].items()}


@pytest.fixture(scope="module")
def guard_inputs(photos):
    return ob.guard_set(list(photos.values()))


# ---- ONNX fp32 ---------------------------------------------------------------------------------------


def test_onnx_matches_torch_on_photos(embedder, onnx_embedder, guard_inputs):
    originals, copies = guard_inputs
    batch = np.concatenate([originals, copies[::7]])
    reference, exported = embedder.embed(batch), onnx_embedder.embed(batch)
    assert exported.shape == reference.shape == (len(batch), DIM)
    assert np.abs(exported - reference).max() < ONNX_TOLERANCE
    assert np.allclose(np.linalg.norm(exported, axis=1), 1, atol=1e-5)
    assert onnx_embedder.identity == embedder.identity
    assert onnx_embedder.embed(batch[:0]).shape == (0, DIM)


def test_export_is_cached_by_weights_hash(cache, onnx_embedder):
    path = ob.fp32_model_path()
    assert path == onnx_embedder.path and path.parent == cache
    assert weights_sha256()[:16] in path.name and ob.descriptor_key() in path.name  # an export of another pooling or whitening is never reused
    before = path.stat()
    again = ob.fp32_model_path()
    ob.OnnxEmbedder(threads=1)
    after = again.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not exported again
    assert not list(cache.glob("*.tmp")) and not list(cache.glob(ob.TEMP_PREFIX + "*"))


def test_exported_graph_has_constant_padding(onnx_embedder):
    import onnx

    ops = [node.op_type for node in onnx.load(onnx_embedder.path).graph.node]
    assert "Shape" not in ops[: ops.index("Conv")]  # padding computed at export, not from the input's shape
    assert ops.count("Conv") == 49
    pooling = [op for op in ops[len(ops) - ops[::-1].index("Conv"):] if op in ("Pow", "ReduceMean")]
    assert pooling == ["Pow", "ReduceMean", "Pow"]  # GeM: (mean of x^3)^(1/3), not the plain mean


# ---- int8 --------------------------------------------------------------------------------------------


def test_int8_of_default_model_obeys_its_guard(cache, onnx_embedder, monkeypatch):
    monkeypatch.setattr(ovb, "available", lambda: False)  # ORT's choice alone (OpenVINO's: tests below)
    # calibrated and guarded on the photos shipped with neardup; whichever way the guard goes here, the
    # verdict must follow the figures
    try:
        path = ob.int8_model(threads=2)
    except ob.BackendError as exc:
        report = json.loads(next(cache.glob("*int8*.guard.json")).read_text())
        assert not report["passed"]
        assert report["mean_cosine"] < ob.INT8_MIN_MEAN_COSINE or report["top1_changed"] > 0
        assert "refused by its accuracy guard" in str(exc) and "--backend onnx" in str(exc)
        assert not list(cache.glob("*int8*.onnx"))  # a refused model is not kept
        assert ob.guarded_int8_model() is None
        with pytest.raises(ob.BackendError, match="refused"):  # the refusal is remembered, not rebuilt
            ob.int8_model(threads=2)
    else:
        report = ob.int8_report(path)
        assert report["passed"] and report["mean_cosine"] >= ob.INT8_MIN_MEAN_COSINE and report["top1_changed"] == 0
        assert report["images"] == 8 * len(ob.calibration_photos())  # each photo and its 7 edited copies
        assert ob.guarded_int8_model() == path
        built = path.stat().st_mtime_ns
        assert ob.int8_model(threads=2) == path and path.stat().st_mtime_ns == built  # cached
        # mixed precision: the stem conv reads float weights, the head conv int8 ones
        import onnx

        graph = onnx.load(path).graph
        produced_by = {out: node for node in graph.node for out in node.output}
        convs = [node for node in graph.node if node.op_type == "Conv"]
        weight_source = [produced_by.get(conv.input[1]) for conv in (convs[0], convs[-1])]
        assert weight_source[0] is None or weight_source[0].op_type != "DequantizeLinear"
        assert weight_source[1] is not None and weight_source[1].op_type == "DequantizeLinear"
    # auto never picks an int8 model that failed, and on a CPU-only machine picks ONNX
    if not ob.gpu_providers() and not torch.cuda.is_available():
        assert resolve_backend("auto") == ("onnx-int8" if report["passed"] else "onnx")


def test_shipped_calibration_photos_are_distinct_model_inputs():
    photos = ob.calibration_photos()
    assert len(photos) >= 16 and all(p.size == (224, 224) and p.mode == "RGB" for p in photos)
    assert ob.CALIBRATION_FILE.stat().st_size < 4_000_000
    # no two are near-duplicates, or the guard's "nearest original unchanged" would test a coin toss
    fp32 = ob.OnnxEmbedder(threads=2)
    vectors = fp32.embed(np.stack([fp32.preprocess(p) for p in photos]))
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -1)
    assert similarity.max() < 0.6


@pytest.mark.skipif(bool(ob.gpu_providers()) or torch.cuda.is_available(), reason="auto picks a GPU backend here")
def test_auto_builds_guarded_int8_on_a_fresh_cache_and_falls_back_on_refusal(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(ovb, "available", lambda: False)  # ORT's choice alone (OpenVINO's: tests below)
    # the real build and the real guard, each time under a threshold the test sets: one the shipped photos
    # clear by far, then one no quantised model reaches
    monkeypatch.setenv("NEARDUP_CACHE", str(tmp_path / "fresh"))
    monkeypatch.setattr(ob, "INT8_MIN_MEAN_COSINE", 0.95)
    assert resolve_backend("auto", threads=2) == "onnx-int8"
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "building the int8 model" in lines[0]
    model = ob.guarded_int8_model()
    assert model is not None and model.parent == tmp_path / "fresh" and ob.int8_report(model)["passed"]
    assert resolve_backend("auto", threads=2) == "onnx-int8"  # cached: nothing built, nothing said
    assert capfd.readouterr().err == "" and ob.guarded_int8_model() == model

    monkeypatch.setenv("NEARDUP_CACHE", str(tmp_path / "strict"))
    monkeypatch.setattr(ob, "INT8_MIN_MEAN_COSINE", 0.99999)
    assert resolve_backend("auto", threads=2) == "onnx"
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "building the int8 model" in lines[0]
    assert lines[1].startswith("neardup: int8 model refused by its accuracy guard: mean cosine to fp32 0.")
    assert "(needs >= 0.99999)" in lines[1] and lines[1].endswith("; using fp32 ONNX")
    assert not list((tmp_path / "strict").glob("*int8*.onnx"))
    report = next((tmp_path / "strict").glob("*int8*.guard.json"))
    recorded = report.stat().st_mtime_ns
    assert resolve_backend("auto", threads=2) == "onnx"  # the refusal is cached: one line, no rebuild
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "refused by its accuracy guard" in lines[0]
    assert report.stat().st_mtime_ns == recorded
    # a model judged under a stricter rule than today's is used, one judged under a laxer one is not
    monkeypatch.setenv("NEARDUP_CACHE", str(tmp_path / "fresh"))
    assert ob.guarded_int8_model() is None


@pytest.fixture(scope="module")
def trimmed_model(tmp_path_factory):
    """A small real model exported by the test: the stem and first 6 blocks of EfficientNet-Lite0 with
    its ImageNet weights, 128-px input, a feature map output (the spec's pooling averages it)."""

    class Trimmed(nn.Module):
        def __init__(self):
            super().__init__()
            model = load_pretrained().fix_padding(TRIMMED_SIZE)
            self.stem, self.bn, self.blocks = model._conv_stem, model._bn0, model._blocks[:6]

        def forward(self, x):
            x = F.relu6(self.bn(self.stem(x)))
            for block in self.blocks:
                x = block(x)
            return x

    folder = tmp_path_factory.mktemp("custom")
    path = folder / "trimmed.onnx"
    with torch.inference_mode():
        torch.onnx.export(Trimmed().eval(), (torch.zeros(1, 3, TRIMMED_SIZE, TRIMMED_SIZE),), str(path), dynamo=False,
                          opset_version=17, input_names=["image"], output_names=["features"],
                          dynamic_axes={"image": {0: "n"}, "features": {0: "n"}})
    (folder / "trimmed.json").write_text(json.dumps(TRIMMED_SPEC))
    return path


def test_int8_guard_accepts_good_quantisation_and_refuses_broken_calibration(tmp_path, trimmed_model, photos):
    fp32 = CustomOnnxEmbedder(trimmed_model, TRIMMED_SPEC, threads=2)
    originals, copies = ob.guard_set(list(photos.values()), fp32.preprocess)

    def load(path):
        return CustomOnnxEmbedder(path, TRIMMED_SPEC, threads=2)

    def later_blocks(model):  # as for the default model: the stem and block 0 stay in float
        return [node.name for node in model.graph.node if re.match(r"/blocks\.[1-9]/", node.name)]

    good = tmp_path / "good.onnx"
    report = ob.build_guarded_int8(fp32, load, originals, copies, good, input_name="image",
                                   select_nodes=later_blocks)
    assert report["passed"] and report["mean_cosine"] >= ob.INT8_MIN_MEAN_COSINE and report["top1_changed"] == 0
    assert good.exists() and ob.int8_report(good) == report
    quantised = load(good)
    cosines = np.sum(quantised.embed(originals) * fp32.embed(originals), axis=1)
    assert cosines.mean() >= ob.INT8_MIN_MEAN_COSINE
    # calibrating on black frames collapses every activation range: the guard must refuse it
    broken = tmp_path / "broken.onnx"
    black = np.full((8, *originals.shape[1:]), -127 / 128, dtype=np.float32)
    with pytest.raises(ob.BackendError, match=r"refused by its accuracy guard: mean cosine to fp32 0\.\d+"):
        ob.build_guarded_int8(fp32, load, originals, copies, broken, calibration=black, input_name="image")
    assert not broken.exists()
    assert ob.int8_report(broken)["passed"] is False


# ---- the model cache: checked files, unwritable caches, leftovers of killed builds ------------------------


@pytest.fixture
def cache_copy(tmp_path, monkeypatch, cache):
    """A private copy of the module's cache holding the fp32 export and the guarded int8 model (built
    there once), as $NEARDUP_CACHE: a test may damage it."""
    try:
        model = ob.int8_model(threads=2)
    except ob.BackendError as exc:
        pytest.skip(f"the int8 model is refused here: {exc}")
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    monkeypatch.setenv("NEARDUP_CACHE", str(copy))
    return copy / model.name


def stderr_lines(capfd) -> list[str]:
    return capfd.readouterr().err.strip().splitlines()


def test_damaged_fp32_export_is_exported_again_with_one_line(cache_copy, capfd):
    path = ob.fp32_model_path()
    clean = path.read_bytes()
    path.write_bytes(clean[: len(clean) // 2])
    assert ob.fp32_model_path() == path
    lines = stderr_lines(capfd)
    assert len(lines) == 1 and f"the cached ONNX model {path.name} is damaged" in lines[0]
    assert lines[0].endswith("exporting it again")
    assert ob._sha256(path) == ob._recorded_sha256(path)  # the record is `sha256sum -c`'s format
    assert ob.OnnxEmbedder(threads=2).path == path and stderr_lines(capfd) == []  # checked, not exported again


def test_truncated_int8_model_is_rebuilt_with_one_line(cache_copy, capfd, guard_inputs):
    # the real rebuild: a truncated model made every `index` fail with an ONNX Runtime traceback
    model = cache_copy
    originals, _ = guard_inputs
    before = ob.OnnxEmbedder(model, threads=2).embed(originals)
    model.write_bytes(model.read_bytes()[:1_000_000])
    assert ob.guarded_int8_model() is None
    assert ob.auto_int8_model(threads=2) == model
    lines = stderr_lines(capfd)
    assert len(lines) == 1 and f"the cached int8 model {model.name} is damaged" in lines[0]
    assert "building it again" in lines[0]
    assert ob.int8_report(model)["model_sha256"] == ob._sha256(model) and ob.guarded_int8_model() == model
    # the same calibration gives the same model: the rebuilt one embeds as the one it replaces
    assert np.allclose(ob.OnnxEmbedder(model, threads=2).embed(originals), before, atol=1e-5)


def scramble_int8_weights(model: Path) -> None:
    """64 kB of random bytes inside the largest int8 weight tensor: the file still loads, its vectors are wrong."""
    import onnx

    tensor = max((t for t in onnx.load(model).graph.initializer if t.data_type == onnx.TensorProto.INT8),
                 key=lambda t: len(t.raw_data))
    data = model.read_bytes()
    at = data.find(tensor.raw_data)
    assert at > 0 and len(tensor.raw_data) > 65536
    model.write_bytes(data[:at] + np.random.default_rng(0).bytes(65536) + data[at + 65536:])


def test_scrambled_int8_model_is_never_loaded(cache_copy, monkeypatch, capfd):
    # the scrambled file loads without an error, so only its sha256 can tell; the rebuild is stubbed to fail
    # (a real one is tested above), which shows the other way out: fp32, with a line saying why
    model = cache_copy
    scramble_int8_weights(model)
    ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])  # still a valid model
    builds = []

    def failing_build(*args, **kwargs):
        builds.append(args)
        raise ob.BackendError("the quantiser failed (stub)")

    monkeypatch.setattr(ob, "build_guarded_int8", failing_build)
    assert ob.guarded_int8_model() is None
    assert ob.auto_int8_model(threads=2) is None and len(builds) == 1
    lines = stderr_lines(capfd)
    assert len(lines) == 2 and f"{model.name} is damaged" in lines[0] and "building it again" in lines[0]
    assert lines[1] == "neardup: the quantiser failed (stub); using fp32 ONNX"


def test_damaged_guard_report_means_a_rebuild_not_int8_disabled(cache_copy, monkeypatch, capfd):
    model = cache_copy
    report = ob._report_path(model)
    saved = {path: path.read_bytes() for path in (model, report)}
    report.write_text(saved[report].decode()[:60])
    assert ob.guarded_int8_model() is None

    def restoring_build(*args, **kwargs):  # the build's outcome is the saved one (the real build is tested above)
        for path, data in saved.items():
            path.write_bytes(data)
        return json.loads(saved[report])

    monkeypatch.setattr(ob, "build_guarded_int8", restoring_build)
    assert ob.int8_model(threads=2) == model and ob.guarded_int8_model() == model
    lines = stderr_lines(capfd)
    assert len(lines) == 1 and f"guard report {report.name} is damaged; building the model again" in lines[0]


def test_unwritable_cache_runs_torch_or_says_why_in_one_line(tmp_path, monkeypatch, capfd, photo_folder, embedder):
    # NEARDUP_CACHE under a regular file: unwritable even for root (a read-only folder is not)
    (tmp_path / "file").write_text("")
    unwritable = tmp_path / "file" / "cache"
    monkeypatch.setenv("NEARDUP_CACHE", str(unwritable))
    with pytest.raises(ob.BackendError, match=rf"^cannot write the model cache {re.escape(str(unwritable))} \(.+\)$"):
        ob.fp32_model_path()
    env = {**os.environ, "NEARDUP_CACHE": str(unwritable)}
    cli = [sys.executable, "-m", "neardup.cli"]
    done = subprocess.run([*cli, "index", str(photo_folder), "--index", str(tmp_path / "idx-onnx"),
                           "--backend", "onnx"], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (f"neardup: error: cannot write the model cache {unwritable} (Not a directory); "
                                   "set NEARDUP_CACHE to a writable folder, or use --backend torch")
    if ob.gpu_providers() or torch.cuda.is_available():
        return  # auto picks a GPU backend here, which needs no export
    assert resolve_backend("auto", threads=2) == "torch"
    assert stderr_lines(capfd) == [f"neardup: cannot write the model cache {unwritable} (Not a directory); "
                                   "using the torch backend (the same model and vectors, slower)"]
    done = subprocess.run([*cli, "index", str(photo_folder), "--index", str(tmp_path / "idx")], env=env,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert [line for line in done.stderr.splitlines() if "cache" in line] == [
        f"neardup: cannot write the model cache {unwritable} (Not a directory); "
        "using the torch backend (the same model and vectors, slower)"]
    with Index.open(tmp_path / "idx", embedder=embedder) as index:  # the same identity as every other backend
        assert index.stats()["images"] == len(list(photo_folder.iterdir()))


def test_int8_build_writes_its_temporary_files_in_the_cache(tmp_path, monkeypatch, capfd, cache):
    # ONNX Runtime's quantiser writes 17 MB models into temporary folders: a killed build left them in /tmp
    fp32 = ob.fp32_model_path()  # in the module's cache
    (tmp_path / "cache").mkdir()
    for path in (fp32, fp32.with_name(fp32.name + ".sha256")):
        shutil.copy(path, tmp_path / "cache")
    monkeypatch.setenv("NEARDUP_CACHE", str(tmp_path / "cache"))
    import onnxruntime.quantization

    seen = {}

    def quantize_static(model_input, model_output, *args, **kwargs):  # stands for a build killed here
        seen.update(model=Path(model_input), output=Path(model_output), temp=Path(tempfile.gettempdir()))
        raise RuntimeError("killed (stub)")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", quantize_static)
    assert ob.auto_int8_model(threads=2) is None
    lines = stderr_lines(capfd)
    assert len(lines) == 2 and "building the int8 model" in lines[0]
    assert lines[1] == "neardup: cannot build the int8 model (RuntimeError: killed (stub)); using fp32 ONNX"
    for path in seen.values():  # prepared.onnx, the candidate, ONNX Runtime's own folders: in the build's folder
        assert path.relative_to(tmp_path / "cache").parts[0].startswith(f"{ob.TEMP_PREFIX}{os.getpid()}-")
    assert not seen["model"].exists()  # removed with its folder when the build ended
    assert tempfile.gettempdir() != str(seen["temp"])  # the default is back
    left = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert left == sorted([ob.LOCK_NAME, fp32.name, fp32.name + ".sha256"])


KILLED_BUILD = """
import os, signal, sys, tempfile
from pathlib import Path
from neardup.models import onnx_backend as ob
with ob.build_lock(ob.cache_dir()):
    work = Path(tempfile.mkdtemp(prefix=ob._temp_prefix(), dir=ob.cache_dir()))
    (work / "prepared.onnx").write_bytes(bytes(1000))
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_next_start_removes_what_a_killed_build_left(tmp_path, monkeypatch, cache, photo_folder):
    folder = tmp_path / "cache"
    shutil.copytree(cache, folder)
    monkeypatch.setenv("NEARDUP_CACHE", str(folder))
    killed = subprocess.run([sys.executable, "-c", KILLED_BUILD], capture_output=True, text=True, check=False)
    assert killed.returncode == -9, killed.stderr
    (left,) = folder.glob(ob.TEMP_PREFIX + "*")
    old_release = [folder / "tmpabcd1234", folder / "model.onnx.abcd1234.tmp"]  # older neardups' names, no lock
    old_release[0].mkdir()
    old_release[1].write_bytes(b"x")
    for path in old_release:
        os.utime(path, (time.time() - 2 * ob.LEGACY_TEMP_AGE_S,) * 2)
    recent = folder / "tmpwxyz5678"  # could be an older neardup's build running now
    recent.mkdir()
    fd = os.open(folder / ob.LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a build running now: its folder and every other one is kept
        ob.tidy_cache()
        assert left.exists() and all(path.exists() for path in old_release)
    finally:
        os.close(fd)
    started = subprocess.run([sys.executable, "-m", "neardup.cli", "index", str(photo_folder), "--index",
                              str(tmp_path / "idx"), "--backend", "onnx"], capture_output=True, text=True, check=False)
    assert started.returncode == 0, started.stderr
    assert not left.exists() and not any(path.exists() for path in old_release) and recent.exists()


# ---- identity across backends ------------------------------------------------------------------------


def test_index_built_with_onnx_is_queried_with_torch(tmp_path, cache, onnx_embedder, embedder, collection):
    root = tmp_path / "idx"
    with Index.open(root, create=True, embedder=onnx_embedder) as index:
        index.add(collection["originals"].values())
    copies = [c for c in collection["copies"] if c["edit"] == "crop80"]
    with Index.open(root, embedder=embedder) as index, Index.open(root, embedder=onnx_embedder) as same:
        for copy in copies:
            by_torch, by_onnx = index.query(copy["path"], k=1), same.query(copy["path"], k=1)
            assert by_torch[0].path == collection["originals"][copy["original"]]
            assert by_torch[0].path == by_onnx[0].path
            assert abs(by_torch[0].score - by_onnx[0].score) < ONNX_TOLERANCE


def test_cli_index_with_onnx_query_with_torch(tmp_path, cache, photo_folder):
    runner = CliRunner()
    index_dir = str(tmp_path / "idx")
    result = runner.invoke(main, ["index", str(photo_folder), "--index", index_dir, "--backend", "onnx", "--workers", "2"])
    assert result.exit_code == 0, result.output
    query = str(photo_folder / "chelsea__half.jpg")
    result = runner.invoke(main, ["query", query, "--index", index_dir, "--backend", "torch", "--json", "-k", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["results"][0]["matches"][0]["path"] == str(photo_folder / "chelsea.jpg")
    result = runner.invoke(main, ["query", query, "--index", index_dir, "--json", "-k", "1"],
                           env={"NEARDUP_BACKEND": "onnx"})
    assert result.exit_code == 0, result.output


def test_backend_choice(cache):
    assert resolve_backend("torch") == "torch" and resolve_backend("onnx") == "onnx"
    with pytest.raises(ob.BackendError, match="unknown backend 'fast'"):
        resolve_backend("fast")
    chosen = resolve_backend("auto")
    if ob.gpu_providers():
        assert chosen == "onnx"
    elif torch.cuda.is_available():
        assert chosen == "torch"
    else:  # OpenVINO where its measured verdict says so (it was just reached), else guarded int8, else fp32
        verdict = ovb.cached_choice() if models.AUTO_PICKS_OPENVINO and ovb.available() else None
        assert verdict is not None or not (models.AUTO_PICKS_OPENVINO and ovb.available())
        assert chosen == (verdict["backend"] if verdict else "onnx-int8" if ob.guarded_int8_model() else "onnx")
    assert load_embedder("onnx", threads=2) is load_embedder("onnx", threads=2)  # loaded once per process


# ---- custom ONNX models --------------------------------------------------------------------------------


def test_custom_model_indexes_and_queries_and_refuses_other_models(tmp_path, trimmed_model, collection):
    runner = CliRunner()
    index_dir = str(tmp_path / "idx")
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, path in collection["originals"].items():
        shutil.copy(path, folder / f"{name}.jpg")
    result = runner.invoke(main, ["index", str(folder), "--index", index_dir, "--model", str(trimmed_model)])
    assert result.exit_code == 0, result.output
    stored = Index.open(index_dir).stats()["model"]
    assert stored["name"] == "lite0-trimmed" and stored["dim"] == 80
    assert load_embedder(model=trimmed_model, spec=dict(TRIMMED_SPEC)).identity == stored  # spec as a dict: same model
    copies = [c for c in collection["copies"] if c["edit"] in ("half", "jpeg30", "bright")]
    for copy in copies:
        result = runner.invoke(main, ["query", copy["path"], "--index", index_dir, "--model", str(trimmed_model),
                                      "--json", "-k", "1"])
        assert result.exit_code == 0, result.output
        assert Path(json.loads(result.output)["results"][0]["matches"][0]["path"]).stem == copy["original"]
    # the default model, or the same file with another normalisation, is a different vector space
    result = runner.invoke(main, ["query", copies[0]["path"], "--index", index_dir, "--backend", "onnx"])
    assert result.exit_code == 1 and "name lite0-trimmed (here: efficientnet-lite0-copy)" in result.output
    other_spec = tmp_path / "other.json"
    other_spec.write_text(json.dumps({**TRIMMED_SPEC, "mean": [0.5, 0.5, 0.5]}))
    with pytest.raises(ModelMismatch), Index.open(index_dir, embedder=CustomOnnxEmbedder(trimmed_model, other_spec)) as index:
        index.query(copies[0]["path"])


@pytest.mark.parametrize("spec, message", [
    ({"mean": [0, 0, 0]}, "input_size must be an integer"),
    ({"input_size": 128, "colour": "rgb"}, "unknown key(s) colour"),
    ({"input_size": 128, "std": [1, 0, 1]}, "std values must be positive"),
    ({"input_size": 128, "mean": [0.5]}, "mean must be a list of 3 numbers"),
    ({"input_size": 128, "layout": "CHW"}, "layout must be one of NCHW, NHWC"),
    ("{not json", "cannot read model spec"),
])
def test_bad_spec_is_one_line_error(tmp_path, trimmed_model, photo_folder, spec, message):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
    result = CliRunner().invoke(main, ["index", str(photo_folder), "--index", str(tmp_path / "idx"),
                                       "--model", str(trimmed_model), "--model-spec", str(spec_path)])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_onnx_file_and_missing_spec(tmp_path, photo_folder):
    runner = CliRunner()
    garbage = tmp_path / "model.onnx"
    garbage.write_bytes(os.urandom(4096))
    result = runner.invoke(main, ["index", str(photo_folder), "--index", str(tmp_path / "idx"), "--model", str(garbage)])
    assert result.exit_code == 1 and "no model spec for" in result.output and "model.json" in result.output
    (tmp_path / "model.json").write_text(json.dumps({"input_size": 64}))
    result = runner.invoke(main, ["index", str(photo_folder), "--index", str(tmp_path / "idx"), "--model", str(garbage)])
    assert result.exit_code == 1 and "cannot load ONNX model" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    result = runner.invoke(main, ["index", str(photo_folder), "--model-spec", str(tmp_path / "model.json")])
    assert result.exit_code == 2 and "--model-spec goes with --model" in result.output
    result = runner.invoke(main, ["index", str(photo_folder), "--model", str(garbage), "--backend", "torch"])
    assert result.exit_code == 1 and "runs in ONNX Runtime" in result.output
    assert not (tmp_path / "idx").exists() or Index.open(tmp_path / "idx").stats()["images"] == 0


def test_custom_model_with_wrong_input_size_is_refused(tmp_path, trimmed_model):
    # the trimmed graph accepts any size, so use a spec whose layout contradicts the graph instead
    with pytest.raises(ob.BackendError, match="failed on a"):
        CustomOnnxEmbedder(trimmed_model, {**TRIMMED_SPEC, "layout": "NHWC"})


# ---- GPU paths (skipped without CUDA) --------------------------------------------------------------------


def test_gpu_providers_follow_capabilities(cache):
    available = set(ort.get_available_providers())
    names = [p[0] for p in ob.gpu_providers()]
    assert names == [n for n in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if n in available]


@needs_cuda_ort
def test_onnx_on_gpu_matches_cpu(cache, onnx_embedder, guard_inputs):
    gpu = ob.OnnxEmbedder(providers=[*ob.gpu_providers(), "CPUExecutionProvider"])
    assert gpu.providers[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    originals, _ = guard_inputs
    cosines = np.sum(gpu.embed(originals) * onnx_embedder.embed(originals), axis=1)
    assert cosines.min() > 0.999  # TensorRT runs FP16


@needs_torch_cuda
def test_torch_on_gpu_matches_cpu(embedder, guard_inputs):
    gpu = TorchEmbedder(device="cuda")
    originals, _ = guard_inputs
    assert np.abs(gpu.embed(originals) - embedder.embed(originals)).max() < 1e-3


# ---- bench -------------------------------------------------------------------------------------------------


def test_bench_command_writes_valid_figures(tmp_path, cache, collection):
    out = tmp_path / "bench.json"
    images = Path(next(iter(collection["originals"].values()))).parent
    backends = ["onnx", "openvino"] if ovb.available() else ["onnx"]
    result = CliRunner().invoke(main, ["bench", "-n", "12", "--images", str(images), "--backends", ",".join(backends),
                                       "--queries", "20", "--json", str(out)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    jsonschema.validate(figures, schemas.BENCH)
    assert figures["images"]["count"] == 12 and figures["queries"]["count"] == 20
    assert [row["backend"] for row in figures["backends"]] == backends
    assert all(row["available"] and row["index_images_per_s"] > 0 and row["index_cpu_ms_per_image"] > 0
               for row in figures["backends"])
    assert 300e6 < figures["flops"]["macs_per_image"] < 450e6  # EfficientNet-Lite0 at 224 px: ~385 M
    assert figures["queries"]["lsh_recall_at_10"] > 0.5
    assert "seed-style" in result.output and "FLOPs bound" in result.output and "ms of CPU per image" in result.output
    result = CliRunner().invoke(main, ["bench", "--backends", "tpu"])
    assert result.exit_code == 2


# ---- OpenVINO (issue 20) -------------------------------------------------------------------------------------

needs_openvino = pytest.mark.skipif(not ovb.available(), reason="OpenVINO is not installed (neardup[openvino])")
SAPPHIRE_RAPIDS = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"})
COOPER_LAKE = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"})
SKYLAKE = frozenset({"avx2", "avx512f"})
ZEN3 = frozenset({"avx2", "fma"})


@pytest.mark.parametrize(("flags", "expected"), [
    (SAPPHIRE_RAPIDS, ["bf16", "int8", "f32"]), (COOPER_LAKE, ["bf16", "int8", "f32"]), (SKYLAKE, ["int8", "f32"]),
    (ZEN3, ["int8", "f32"]), (frozenset(), ["int8", "f32"])])
def test_openvino_precisions_follow_the_cpu_flags(monkeypatch, flags, expected):
    monkeypatch.setattr(ovb, "cpu_flags", lambda: flags)
    assert ovb.candidate_precisions() == expected == ovb.candidate_precisions(flags)
    # no guarded int8 model (its own guard refused it): OpenVINO has no int8 to run
    assert ovb.candidate_precisions(flags, int8=False) == [p for p in expected if p != "int8"]
    assert ("amx_bf16" in ovb.why_precision("bf16")) == ("amx_bf16" in flags)
    assert ("amx_int8" in ovb.why_precision("int8")) == ("amx_int8" in flags)


class _Fake:
    """An embedder that only has a name (the selection logic never runs it when guard and timing are faked)."""

    def __init__(self, name):
        self.name, self.path = name, Path("fake.onnx")


def fake_machine(monkeypatch, flags, *, speeds, passes=("bf16", "f32"), int8=True):
    """Fake the CPU's flags, the guard's verdicts and the measured speeds (img/s by embedder name)."""
    monkeypatch.setattr(ovb, "cpu_flags", lambda: flags)
    monkeypatch.setattr(ob, "OnnxEmbedder", lambda path=None, **kw: _Fake("onnx-int8" if path else "onnx"))
    monkeypatch.setattr(ob, "auto_int8_model", lambda threads=None: Path("int8.onnx") if int8 else None)
    monkeypatch.setattr(ovb, "OpenVinoEmbedder", lambda precision, **kw: _Fake(f"openvino-{precision}"))
    monkeypatch.setattr(ovb, "guard_inputs", lambda: (np.zeros((2, 1)), np.zeros((2, 1)), np.zeros((1, 1))))
    tried = []
    # ORT int8's own fidelity (its worst vector: what OpenVINO int8's worst-vector bar follows)
    monkeypatch.setattr(ovb, "fidelity", lambda reference, candidate, inputs=None: {"min_cosine": 0.95, "passed": True})

    def guard(reference, candidate, inputs=None, *, precision=None, fallback_worst=None):
        assert candidate.name == f"openvino-{precision}"
        assert fallback_worst == (0.95 if precision == "int8" else None)  # int8 is held to ORT int8's own worst
        tried.append(candidate.name)
        passed = candidate.name.removeprefix("openvino-") in passes
        return {"passed": passed, "mean_cosine": 0.999 if passed else 0.99, "min_cosine": 0.99 if passed else 0.9,
                "min_mean_cosine": ovb.OV_MIN_MEAN_COSINE, "min_min_cosine": ovb.OV_MIN_COSINE, "extra_min_cosine": 0.8,
                "min_extra_min_cosine": ovb.OV_HARD_MIN_COSINE, "top1_changed": 0, "copies": 2}

    monkeypatch.setattr(ovb, "guard", guard)
    monkeypatch.setattr(ovb, "measure", lambda embedders, inputs, rounds=3: {n: speeds[e.name] for n, e in embedders.items()})
    return tried


@pytest.mark.parametrize("flags", [SKYLAKE, ZEN3, frozenset()])
def test_cpu_without_bf16_never_gets_a_slower_default(monkeypatch, flags):
    # OpenVINO f32 no faster than today's int8 (within the noise margin): int8 stays the default
    tried = fake_machine(monkeypatch, flags, speeds={"openvino-f32": 180, "onnx-int8": 170, "onnx": 100})
    choice = ovb.decide()
    # bf16 is never tried without it; int8 (refused by its guard here) is
    assert choice["backend"] == "onnx-int8" and tried == ["openvino-int8", "openvino-f32"]
    assert "not faster than onnx-int8" in choice["reason"] and "OpenVINO int8 refused" in choice["reason"]
    # OpenVINO's int8 kernels guarded but no faster than ORT's on this CPU (no VNNI, say): not chosen
    fake_machine(monkeypatch, flags, passes=("int8", "f32"),
                 speeds={"openvino-int8": 175, "openvino-f32": 150, "onnx-int8": 170, "onnx": 100})
    assert ovb.decide()["backend"] == "onnx-int8"
    # guarded and measurably faster: OpenVINO int8, before f32 is tried
    tried = fake_machine(monkeypatch, flags, passes=("int8", "f32"),
                         speeds={"openvino-int8": 300, "openvino-f32": 250, "onnx-int8": 170, "onnx": 100})
    assert (ovb.decide()["precision"], tried) == ("int8", ["openvino-int8"])
    # measurably faster: OpenVINO f32
    fake_machine(monkeypatch, flags, speeds={"openvino-f32": 250, "onnx-int8": 170, "onnx": 100})
    choice = ovb.decide()
    assert (choice["backend"], choice["precision"]) == ("openvino", "f32")
    assert "no AMX/AVX-512 bf16" in choice["reason"]
    # int8 refused by its own guard: OpenVINO is measured against fp32 ORT, today's fallback
    tried = fake_machine(monkeypatch, flags, passes=("int8", "f32"), speeds={"openvino-f32": 90, "onnx": 100}, int8=False)
    assert ovb.decide()["backend"] == "onnx" and tried == ["openvino-f32"]  # no int8 model: no OpenVINO int8


@pytest.mark.parametrize("flags", [SAPPHIRE_RAPIDS, COOPER_LAKE])
def test_cpu_with_bf16_gets_bf16_only_where_guarded_and_faster(monkeypatch, flags):
    fake_machine(monkeypatch, flags, speeds={"openvino-bf16": 450, "openvino-f32": 170, "onnx-int8": 170})
    choice = ovb.decide()
    assert (choice["backend"], choice["precision"]) == ("openvino", "bf16")
    assert "2.6x onnx-int8" in choice["reason"] and "amx_bf16" in choice["reason"] or flags == COOPER_LAKE
    # the guard refuses bf16: f32 is tried next, and int8 stays where f32 is not faster
    tried = fake_machine(monkeypatch, flags, passes=("f32",), speeds={"openvino-f32": 170, "onnx-int8": 170})
    choice = ovb.decide()
    assert choice["backend"] == "onnx-int8" and tried == ["openvino-bf16", "openvino-int8", "openvino-f32"]
    assert "OpenVINO bf16 refused by its accuracy guard" in choice["reason"] and "worst 0.9000" in choice["reason"]
    # bf16 refused, int8 guarded and faster (the copy-trained weights on this machine): OpenVINO int8
    tried = fake_machine(monkeypatch, flags, passes=("int8", "f32"),
                         speeds={"openvino-int8": 570, "openvino-f32": 170, "onnx-int8": 250})
    choice = ovb.decide()
    assert (choice["backend"], choice["precision"], tried) == ("openvino", "int8", ["openvino-bf16", "openvino-int8"])
    assert "OpenVINO int8 (the guarded int8 model, the CPU has amx_int8" in choice["reason"] or flags == COOPER_LAKE
    assert "2.3x onnx-int8" in choice["reason"] and choice["reason"].endswith("; bf16 refused by its accuracy guard")
    # bf16 guarded but slower than int8 on this CPU (a bf16 CPU without AMX may be): int8
    fake_machine(monkeypatch, flags, speeds={"openvino-bf16": 150, "openvino-f32": 120, "onnx-int8": 170})
    assert ovb.decide()["backend"] == "onnx-int8"


def test_openvino_int8_worst_bar_follows_ort_int8_on_the_same_images():
    assert ovb.int8_worst_bar(None) == ovb.OV_INT8_MIN_COSINE == 0.97
    assert ovb.int8_worst_bar(0.9883) == 0.97  # ORT int8 exact in integers (VNNI, AMX): the fixed bar
    assert ovb.int8_worst_bar(0.9503) == 0.9403  # no VNNI: no stricter than the fallback's own worst, less 0.01
    assert ovb.int8_worst_bar(0.5) == ovb.OV_INT8_MIN_COSINE_FLOOR == 0.9  # never below the floor


def test_guard_refuses_a_few_vectors_moved_far_that_the_mean_hides():
    rng = np.random.default_rng(0)
    originals, copies = rng.normal(size=(20, 64)), rng.normal(size=(140, 64))

    class Unit:
        def __init__(self, moved=()):
            self.moved = moved

        def embed(self, x):
            x = np.array(x, dtype=np.float64)
            for row in self.moved:
                if row < len(x):
                    # noise of 0.25 times the row's norm: cosine ~0.97 to where it was
                    noise = np.random.default_rng(row).normal(size=x.shape[1])
                    x[row] = x[row] + 0.25 * noise / np.linalg.norm(noise) * np.linalg.norm(x[row])
            return x / np.linalg.norm(x, axis=1, keepdims=True)

    report = ob.accuracy_guard(Unit(), Unit(moved=(3,)), originals, copies, 0.995)
    assert report["passed"] and report["mean_cosine"] > 0.995 and report["min_cosine"] < 0.98  # the mean alone passes
    report = ob.accuracy_guard(Unit(), Unit(moved=(3,)), originals, copies, 0.995, min_cosine=0.98)
    assert not report["passed"] and report["worst"][0]["image"] in (3, 20 + 3)  # row 3 of either batch
    # hard cases are judged on their own bar
    hard = rng.normal(size=(4, 64))
    report = ob.accuracy_guard(Unit(), Unit(moved=(0,)), originals, copies, 0.995, min_cosine=0.98, extra=hard,
                               extra_min_cosine=0.999)
    assert not report["passed"] and report["extra_min_cosine"] < 0.999 and report["extra_images"] == 4


@needs_openvino
def test_openvino_vectors_match_fp32_onnx_within_the_guard_on_real_photos(cache, onnx_embedder, guard_inputs):
    originals, copies = guard_inputs  # the test collection's real photos and their 7 edited copies
    hard = np.stack([onnx_embedder.preprocess(p) for p in ovb.hard_cases()])
    batch = np.concatenate([originals, copies[::7]])
    f32 = ovb.OpenVinoEmbedder("f32", threads=2)
    assert np.abs(f32.embed(batch) - onnx_embedder.embed(batch)).max() < 1e-3
    assert f32.identity == onnx_embedder.identity and f32.embed(batch[:0]).shape == (0, DIM)
    for precision in ovb.candidate_precisions():  # bf16 where this CPU has it
        embedder = ovb.OpenVinoEmbedder(precision, threads=2)
        report = ovb.guard(onnx_embedder, embedder, (originals, copies, hard))
        # the copy-trained weights fail bf16's guard on these photos (worst cosine 0.956, hard cases 0.51:
        # benchmarks/RESULTS.md "Copy-trained descriptor"), so `auto` keeps int8; the verdict follows the figures
        within = (report["mean_cosine"] >= ovb.OV_MIN_MEAN_COSINE and report["min_cosine"] >= ovb.OV_MIN_COSINE
                  and report["extra_min_cosine"] >= ovb.OV_HARD_MIN_COSINE and report["top1_changed"] == 0)
        assert report["passed"] == within, report
        vectors = embedder.embed(batch)
        assert vectors.dtype == np.float32 and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
    assert list((cache / "openvino").glob("*.blob"))  # compiled once, cached


def test_every_embedder_gives_the_same_vectors_from_several_threads_at_once(embedder, onnx_embedder, guard_inputs):
    """The web page's searches embed uploads in a thread pool, so an embedder is called from several
    threads at once: OpenVINO's single infer request refused the second caller ("Infer Request is busy",
    a 500 for that search) until each thread got its own; the GPU embedder's shared pinned buffers are
    serialised by a lock (its CPU stand-in runs the same code around them)."""
    import threading

    from neardup.models.cuda import CudaEmbedder

    embedders = {"torch": embedder, "onnx": onnx_embedder, "gpu code on the CPU": CudaEmbedder("cpu", torch.float32)}
    if ovb.available():
        embedders["openvino"] = ovb.OpenVinoEmbedder("f32", threads=1)
    originals, copies = guard_inputs
    batches = [copies[i::6][:4] for i in range(6)]
    for name, candidate in embedders.items():
        alone = [candidate.embed(batch) for batch in batches]
        together, failures = [None] * len(batches), []
        start = threading.Barrier(len(batches))

        def run(i):
            start.wait()
            try:
                together[i] = candidate.embed(batches[i])
            except Exception as exc:  # noqa: BLE001 (collected and reported below)
                failures.append(repr(exc))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(batches))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, (name, failures)
        for i, vectors in enumerate(together):
            assert np.allclose(vectors, alone[i], atol=1e-5), (name, i)


@needs_openvino
def test_damaged_compiled_blob_is_compiled_again_with_one_line(cache_copy, capfd, onnx_embedder, guard_inputs):
    originals = guard_inputs[0]
    reference = onnx_embedder.embed(originals)
    ovb.OpenVinoEmbedder("f32", threads=2)
    blobs = list((cache_copy.parent / "openvino").glob("*.blob"))
    assert blobs and all(ob._recorded_sha256(b) for b in blobs)
    capfd.readouterr()
    for blob in blobs:
        os.chmod(blob, 0o644)
        data = bytearray(blob.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 4096] = bytes(b ^ 0x55 for b in data[middle:middle + 4096])
        blob.write_bytes(data)
    embedder = ovb.OpenVinoEmbedder("f32", threads=2)
    assert np.sum(embedder.embed(originals) * reference, axis=1).min() > 0.9999  # not the damaged blob's vectors
    lines = stderr_lines(capfd)
    assert len(lines) == len(blobs) and "is damaged" in lines[0] and "compiling it again" in lines[0]


def test_a_blob_openvino_rewrites_while_it_compiles_is_recorded_again_and_damage_later_is_not(tmp_path, monkeypatch):
    """OpenVINO rewrites a compiled blob in place when the model file behind it was rebuilt (the int8 model
    after its guard report was damaged): the old record called the new blob damaged at the next start and
    compiled it again. A blob written during the compile (under the build lock) is recorded anew; one
    changed at any other time still fails its check."""
    monkeypatch.setattr(ob, "cache_dir", lambda: tmp_path)
    folder = tmp_path / "openvino"
    folder.mkdir()
    rewritten, untouched = folder / "1.blob", folder / "2.blob"
    for blob in (rewritten, untouched):
        blob.write_bytes(b"compiled " + blob.name.encode())
    ovb._record_blobs(folder, {})
    before = ovb._blob_stats(folder)
    rewritten.write_bytes(b"compiled again, longer")  # OpenVINO's write inside the compile window
    ovb._record_blobs(folder, before)
    assert ob._fault(rewritten, ob._recorded_sha256(rewritten)) is None
    assert ob._fault(untouched, ob._recorded_sha256(untouched)) is None
    before = ovb._blob_stats(folder)
    ovb._record_blobs(folder, before)  # a compile that wrote nothing
    data = bytearray(untouched.read_bytes())
    data[0] ^= 0x55
    untouched.write_bytes(bytes(data))  # damage between runs, outside any compile
    assert ob._fault(untouched, ob._recorded_sha256(untouched)) is not None


@needs_openvino
def test_auto_reports_its_cached_openvino_choice(cache_copy, monkeypatch):
    from neardup.models import _load_builtin, describe_auto, describe_embedder

    choice = {"backend": "openvino", "precision": "f32", "guards": {}, "speed": {"openvino-f32": 2, "onnx-int8": 1},
              "reason": "OpenVINO f32 (faked): 2.0x onnx-int8 here"}
    ovb._choice_path().write_text(json.dumps(choice))
    if ob.gpu_providers() or torch.cuda.is_available():
        pytest.skip("auto picks a GPU backend here")
    # NEARDUP_AUTO_OPENVINO=0 (models.AUTO_PICKS_OPENVINO off) pins ORT, whatever was measured
    monkeypatch.setattr(models, "AUTO_PICKS_OPENVINO", False)
    assert resolve_backend("auto", threads=2) in ("onnx-int8", "onnx")
    assert "auto leaves OpenVINO to --backend openvino" in describe_auto()
    monkeypatch.setattr(models, "AUTO_PICKS_OPENVINO", True)  # the default: the measured verdict decides
    assert resolve_backend("auto", threads=2) == "openvino"
    _load_builtin.cache_clear()
    embedder = load_embedder("auto", threads=2)
    assert embedder.backend == "openvino" and embedder.precision == "f32"
    assert describe_embedder(embedder) == "openvino f32 (auto: OpenVINO f32 (faked): 2.0x onnx-int8 here)"
    assert describe_auto() == "openvino f32: OpenVINO f32 (faked): 2.0x onnx-int8 here"
    # a one-image query starts ONNX Runtime on the model OpenVINO runs (its start costs more than one image)
    quick = load_embedder("auto", threads=2, images=1)
    assert (quick.backend, quick.path) == ("onnx", ob.fp32_model_path())
    assert load_embedder("auto", threads=2, images=models.QUICK_JOB_IMAGES + 1) is embedder
    if ob.guarded_int8_model() is not None:
        ovb._choice_path().write_text(json.dumps({**choice, "precision": "int8"}))
        quick = load_embedder("auto", threads=2, images=1)
        assert (quick.backend, quick.path) == ("onnx-int8", ob.guarded_int8_model())
    # named backends are what they name, whatever the job's size
    assert load_embedder("onnx", threads=2, images=1).backend == "onnx"
    _load_builtin.cache_clear()


def test_the_build_lock_is_reentrant_within_a_thread_and_exclusive_across_processes(tmp_path):
    """auto's OpenVINO verdict holds the build lock while it compiles a model and builds the int8 model it
    is timed against, which take the lock again: a second flock on a new descriptor waited for the first
    forever (a fresh cache hung `neardup index`). Within a thread the lock is re-entrant; another process
    still waits for it."""
    import threading

    done = threading.Event()

    def nested():
        with ob.build_lock(tmp_path), ob.build_lock(tmp_path), ob.build_lock(tmp_path / "." ):
            pass
        done.set()

    worker = threading.Thread(target=nested, daemon=True)
    worker.start()
    worker.join(timeout=120)  # only turns a hang into a failure
    assert done.is_set()
    probe = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n"
             "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
             "except OSError:\n    print('held')")
    with ob.build_lock(tmp_path), ob.build_lock(tmp_path):
        held = subprocess.run([sys.executable, "-c", probe, str(tmp_path / ob.LOCK_NAME)], capture_output=True, text=True)
        assert held.stdout.strip() == "held"
    with ob.build_lock(tmp_path):
        pass
    free = subprocess.run([sys.executable, "-c", probe, str(tmp_path / ob.LOCK_NAME)], capture_output=True, text=True)
    assert free.stdout.strip() == "free"


def test_a_cache_that_cannot_even_be_read_runs_torch_or_says_why_in_one_line(monkeypatch, capfd):
    """Found by a clean-clone run as `nobody` with the cache under a root-only folder: Path.is_dir() and
    glob() raise PermissionError there (not CacheError), and `neardup index` died with a bare errno line.
    auto now runs torch with one line; a backend asked for by name gives one error line."""
    from neardup.models import _load_builtin

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(ob.cache_dir()))

    monkeypatch.setattr(models, "AUTO_PICKS_OPENVINO", False)
    monkeypatch.setattr(ob, "guarded_int8_model", unreadable)
    monkeypatch.setattr(ob, "fp32_model_path", unreadable)
    monkeypatch.setattr(ob, "gpu_providers", lambda: [])
    if torch.cuda.is_available():
        pytest.skip("auto picks torch-fp16 here")
    capfd.readouterr()
    assert resolve_backend("auto") == "torch"
    line = capfd.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and "cannot use the model cache" in line and "using the torch backend" in line
    _load_builtin.cache_clear()
    with pytest.raises(ob.CacheError, match="set NEARDUP_CACHE to a writable folder"):
        load_embedder("onnx", threads=1)
    _load_builtin.cache_clear()
