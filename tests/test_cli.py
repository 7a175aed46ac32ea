"""The `neardup` command as users run it: a subprocess, real photos, real model."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import jsonschema
import numpy as np
import pytest

from neardup.index import DEFAULT_THRESHOLD, Index
from neardup.schemas import DUPS, QUERY
from neardup.store import Store

from conftest import PEER_DATA, needs_peer_data


def neardup(*args, index=None, check=True, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "NEARDUP_INDEX": str(index)} if index else dict(os.environ)
    result = subprocess.run([sys.executable, "-m", "neardup.cli", *map(str, args)], capture_output=True,
                            text=True, env=env, timeout=600, **kwargs)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def cli_index(tmp_path_factory, collection) -> Path:
    index = tmp_path_factory.mktemp("cli") / "idx"
    root = Path(next(iter(collection["originals"].values()))).parents[1]
    result = neardup("index", root / "originals", root / "edited", "--index", index)
    assert "128 added" in result.stdout and "0 failed" in result.stdout
    return index


def test_query_json_validates_and_finds_the_original(cli_index, collection):
    copy = next(c for c in collection["copies"] if c["original"] == "coffee" and c["edit"] == "crop80")
    result = neardup("query", copy["path"], collection["originals"]["rocket"], "-k", "3", "--json", index=cli_index)
    payload = json.loads(result.stdout)
    jsonschema.validate(payload, QUERY)
    assert payload["threshold"] is None and [r["query"] for r in payload["results"]] == [copy["path"], collection["originals"]["rocket"]]
    first = payload["results"][0]["matches"]
    assert os.path.basename(first[0]["path"]).startswith("coffee") and all(os.path.isabs(m["path"]) for m in first)
    assert [m["score"] for m in first] == sorted((m["score"] for m in first), reverse=True)
    thresholded = json.loads(neardup("query", copy["path"], "--threshold", "0.99", "--json", index=cli_index).stdout)
    jsonschema.validate(thresholded, QUERY)
    assert thresholded["threshold"] == 0.99
    assert all(m["score"] >= 0.99 for m in thresholded["results"][0]["matches"])


def test_dups_json_and_csv(cli_index):
    payload = json.loads(neardup("dups", "--json", index=cli_index).stdout)
    jsonschema.validate(payload, DUPS)
    assert payload["threshold"] == DEFAULT_THRESHOLD and len(payload["groups"]) == 16
    rows = list(csv.DictReader(io.StringIO(neardup("dups", "--csv", index=cli_index).stdout)))
    assert list(rows[0]) == ["group", "path", "min_score", "max_score"]
    assert len(rows) == sum(len(g["files"]) for g in payload["groups"])
    text = neardup("dups", "--threshold", "0.9", index=cli_index)
    assert text.stdout.startswith("group 1:") and "(copy probability >= 0.9, from the" in text.stderr
    assert "note:" not in text.stderr
    # a loose threshold (a strict one when thresholds were raw scores) says what it means, once, on stderr
    loose = neardup("dups", "--threshold", "0.8", "--json", index=cli_index)
    assert json.loads(loose.stdout)["threshold"] == 0.8
    assert "note: --threshold 0.8 is a copy probability: pairs scoring so were true copies 80% of the time" in loose.stderr
    assert all(0 < g["min_score"] <= g["max_score"] <= 1 for g in payload["groups"])


def test_exit_codes_and_one_line_errors(tmp_path, cli_index, collection):
    missing = neardup("query", tmp_path / "nope.jpg", index=cli_index, check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    for bad in ("7", "0", "-0.5"):  # a copy probability lies in (0, 1]
        bad_option = neardup("dups", "--threshold", bad, index=cli_index, check=False)
        assert bad_option.returncode == 2 and "Traceback" not in bad_option.stderr
    no_index = neardup("dups", "--index", tmp_path / "empty", check=False)
    assert no_index.returncode == 1 and no_index.stderr.startswith("neardup: error: no index at")
    assert "Traceback" not in no_index.stderr and len(no_index.stderr.strip().splitlines()) == 1
    debug = neardup("--debug", "dups", "--index", tmp_path / "empty", check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    bad_query = neardup("query", broken, collection["originals"]["chelsea"], "--json", index=cli_index, check=False)
    assert bad_query.returncode == 1 and "cannot read query" in bad_query.stderr
    assert len(json.loads(bad_query.stdout)["results"]) == 1  # the good query still answered


@needs_peer_data
def test_index_reports_bad_files_and_exits_zero(tmp_path):
    index = tmp_path / "idx"
    result = neardup("index", PEER_DATA, "--failures", "--index", index)
    assert "2 failed" in result.stdout  # the corrupt JPEG sits in two folders
    assert "ukbench09268_corrupt.jpg: not an image" in result.stdout
    assert "skipped: " in result.stdout and "ukbench09380.svg" in result.stdout
    info = json.loads(neardup("info", "--json", "--failures", index=index).stdout)
    assert info["failed"] == 2 and info["images"] == 31
    assert all(f["reason"] for f in info["failures"])


def test_info_remove_and_progress(tmp_path, photo_folder):
    index = tmp_path / "idx"
    neardup("index", photo_folder, index=index)
    assert "8 indexed" in neardup("info", index=index).stdout
    assert "removed 2 files" in neardup("remove", photo_folder / "chelsea.jpg", photo_folder / "coffee.jpg", index=index).stdout
    assert json.loads(neardup("info", "--json", index=index).stdout)["images"] == 6


def test_sigkill_during_indexing_leaves_a_consistent_index(tmp_path, collection):
    """Kill `neardup index` right after it has committed some batches (watched through the catalog, so
    the kill lands mid-run however fast the machine is), and once at start-up; every time the index
    opens, catalog and segments agree, and a re-run completes the job."""
    root = Path(next(iter(collection["originals"].values()))).parents[1]
    index = tmp_path / "idx"
    command = [sys.executable, "-m", "neardup.cli", "index", root, "--index", index, "--commit-every", "8", "--batch-size", "4"]

    def indexed() -> int:
        if not (index / "catalog.sqlite").exists():
            return 0
        with Store.open(index) as store:
            try:
                return store.counts()["indexed"]
            except sqlite3.OperationalError:  # the child has created the catalog file, not yet its tables
                return 0

    committed = []
    for kill_after in (None, 8, 48, 96):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kill_after is None:
            time.sleep(0.5)
        else:
            while process.poll() is None and indexed() < kill_after:
                time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
        if not (index / "catalog.sqlite").exists():
            continue
        with Store.open(index) as store:
            assert store.verify() == []
            committed.append(store.counts()["indexed"])
            snapshot = store.snapshot()
            assert len(snapshot.vectors()) == len(snapshot) == committed[-1]
    assert committed and committed == sorted(committed), committed
    assert any(0 < c < 128 for c in committed), f"no kill landed mid-run: {committed}"
    finished = neardup("index", root, "--index", index)
    assert f"{128 - committed[-1]} added" in finished.stdout
    with Store.open(index, write=True) as store:  # a writer also clears orphan files of killed commits
        assert store.verify() == [] and store.counts()["indexed"] == 128
        registered = {f"{name}.{kind}.npy" for name in store.segment_names() for kind in ("vectors", "codes")}
        registered.add(f"{store.get_meta('graph')}.graph.npz")  # the k-NN graph the finished run saved
    assert set(os.listdir(index / "segments")) == registered


def test_names_that_are_not_utf8_are_failed_files_and_never_stop_a_run(tmp_path, collection):
    """Review 2026-12-04 defect 10: a Latin-1 file name and a folder name with a 0xff byte. The run indexes
    the rest, records both with a one-line reason under a printable spelling, and info, --prune and
    remove treat them like any failed file."""
    photos, originals = tmp_path / "photos", collection["originals"]
    (photos / os.fsdecode(b"dir\xff")).mkdir(parents=True)
    shutil.copy(originals["coffee"], photos / "ok.jpg")
    shutil.copy(originals["brick"], photos / os.fsdecode(b"caf\xe9.jpg"))
    shutil.copy(originals["camera"], photos / os.fsdecode(b"dir\xff") / "camera.jpg")
    index = tmp_path / "idx"
    result = neardup("index", photos, "--failures", index=index)
    assert "Traceback" not in result.stderr
    assert "1 added" in result.stdout and "2 failed" in result.stdout
    assert f"failed: {photos}/caf\\xe9.jpg: file name is not valid UTF-8" in result.stdout
    assert f"failed: {photos}/dir\\xff/camera.jpg: file name is not valid UTF-8" in result.stdout
    info = json.loads(neardup("info", "--json", "--failures", index=index).stdout)
    assert info["images"] == 1 and sorted(info["failures"], key=lambda f: f["path"]) == [
        {"path": f"{photos}/caf\\xe9.jpg", "reason": "file name is not valid UTF-8"},
        {"path": f"{photos}/dir\\xff/camera.jpg", "reason": "file name is not valid UTF-8"}]
    again = neardup("index", photos, "--prune", index=index)  # still there: nothing pruned
    assert "0 removed" in again.stdout and "2 failed" in again.stdout
    assert "removed 1 files" in neardup("remove", photos / os.fsdecode(b"caf\xe9.jpg"), index=index).stdout
    os.rename(photos / os.fsdecode(b"dir\xff"), photos / "dir")  # the user renames the folder
    renamed = neardup("index", photos, "--prune", index=index)
    assert "1 added" in renamed.stdout and "1 removed" in renamed.stdout
    info = json.loads(neardup("info", "--json", "--failures", index=index).stdout)
    assert info["images"] == 2 and info["failures"] == [
        {"path": f"{photos}/caf\\xe9.jpg", "reason": "file name is not valid UTF-8"}]  # re-indexed: seen again
    assert neardup("dups", "--action", "move", "--to", tmp_path / "moved", index=index).returncode == 0


def test_a_folder_indexed_again_through_a_symlink_is_not_a_copy_of_itself(tmp_path, collection):
    """Review 2026-12-04 defect 2 at index time: real/ indexed, then alias -> real indexed in a second run.
    The alias's files are the catalogued files (same device and inode): reported, not catalogued, so
    `dups` finds only the real copy, never a file paired with itself."""
    real = tmp_path / "B" / "real"
    real.mkdir(parents=True)
    shutil.copy(collection["originals"]["camera"], real / "camera.jpg")
    shutil.copy(collection["originals"]["rocket"], real / "rocket.jpg")
    shutil.copy(real / "rocket.jpg", real / "rocket-copy.jpg")  # a real copy: a duplicate
    (tmp_path / "B" / "alias").symlink_to("real")
    index = tmp_path / "idx"
    neardup("index", real, index=index)
    second = neardup("index", tmp_path / "B" / "alias", "--failures", index=index)
    assert "0 added" in second.stdout and "0 identical copies" in second.stdout
    assert "3 not added (same file as a catalogued path)" in second.stdout
    alias = tmp_path / "B" / "alias"
    assert f"not added: {alias}/camera.jpg: same file as {real}/camera.jpg" in second.stdout
    groups = json.loads(neardup("dups", "--json", index=index).stdout)["groups"]
    assert [sorted(g["files"]) for g in groups] == [[str(real / "rocket-copy.jpg"), str(real / "rocket.jpg")]]
    assert json.loads(neardup("info", "--json", index=index).stdout)["images"] == 3


def test_dups_names_the_score_it_thresholds_as_the_page_does(full_index):
    """Issue 19 #2 and issue 22 part 4: one score, one name everywhere: groups read 'copy probability a–b,
    cosine c–d', and the summary names the raw score the probability is of."""
    from click.testing import CliRunner

    from neardup.cli import main

    aware = CliRunner().invoke(main, ["dups", "--index", str(full_index.root)])
    assert aware.exit_code == 0, aware.output
    first = aware.output.splitlines()[0]
    assert ", copy probability " in first and ", cosine " in first
    assert f"(copy probability >= {DEFAULT_THRESHOLD}, from the collection-aware score)" in aware.output
    plain = CliRunner().invoke(main, ["dups", "--index", str(full_index.root), "--cosine"])
    assert plain.exit_code == 0 and f"(copy probability >= {DEFAULT_THRESHOLD}, from the cosine)" in plain.output


def test_an_index_of_the_imagenet_descriptor_is_refused_with_a_rebuild_line(tmp_path, collection, embedder):
    # the identity every index stored before the copy-trained weights shipped
    from neardup.models import default_model

    with np.load(Path(__file__).resolve().parents[1] / "benchmarks" / "imagenet_lite0_whitening.npz") as data:
        mean, projection = data["mean"].astype(np.float32), data["projection"].astype(np.float32)
    earlier = {"name": "efficientnet-lite0", "weights_sha256": default_model.imagenet_weights_sha256(),
               "preprocessing": default_model.PREPROCESSING,
               "whitening_sha256": hashlib.sha256(mean.tobytes() + projection.tobytes()).hexdigest(), "dim": 768}
    imagenet = SimpleNamespace(name="efficientnet-lite0", dim=768, input_size=embedder.input_size,
                               preprocess=embedder.preprocess, identity=earlier,
                               embed=lambda batch: np.full((len(batch), 768), 768 ** -0.5, np.float32))
    photo = collection["originals"]["coffee"]
    with Index.open(tmp_path / "old", create=True, embedder=imagenet) as index:
        index.add([photo])
    for command in (["query", photo], ["dups"], ["index", photo]):
        result = neardup(*command, index=tmp_path / "old", check=False)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        line, = [line for line in result.stderr.splitlines() if "Rebuild it" in line]
        assert "name efficientnet-lite0 (here: efficientnet-lite0-copy)" in line
    with Index.open(tmp_path / "old", embedder=imagenet) as index:
        assert index.stats()["images"] == 1  # refused, never touched
