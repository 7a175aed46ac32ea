"""The Ray path on a real local Ray cluster: shards, merge, and the distributed duplicate search.

One session-scoped `ray.init(num_cpus=2)`; the distributed indexing run happens once per module and
every test checks it against the local path on the same files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

ray = pytest.importorskip("ray")

from neardup import distributed, shards
from neardup.cli import main
from neardup.index import Index
from neardup.store import Record

CORRUPT = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 40  # a JPEG header and nothing after it


@pytest.fixture(scope="session")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=600 * 1024**2, log_to_driver=False,
             logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, collection) -> Path:
    """Four originals, four edited copies of two of them, and a corrupt JPEG."""
    folder = tmp_path_factory.mktemp("ray-photos")
    for name in ("chelsea", "coffee", "rocket", "astronaut"):
        shutil.copy(collection["originals"][name], folder / f"{name}.jpg")
    for copy in collection["copies"]:
        if copy["original"] in ("chelsea", "coffee") and copy["edit"] in ("half", "flip"):
            shutil.copy(copy["path"], folder / Path(copy["path"]).name)
    (folder / "broken.jpg").write_bytes(CORRUPT)
    return folder


@pytest.fixture(scope="module")
def local_index(tmp_path_factory, folder, embedder):
    index = Index.open(tmp_path_factory.mktemp("ray-local") / "idx", create=True, embedder=embedder)
    index.add([folder])
    yield index
    index.close()


@pytest.fixture(scope="module")
def ray_index(tmp_path_factory, folder, embedder, ray_cluster):
    """`neardup index FOLDER --ray --shards DIR`: the pipeline on the cluster, then the merge."""
    root = tmp_path_factory.mktemp("ray-dist")
    result = CliRunner().invoke(main, ["index", str(folder), "--ray", "--index", str(root / "idx"),
                                       "--shards", str(root / "shards"), "--backend", "torch"])
    assert result.exit_code == 0, result.output
    index = Index.open(root / "idx", embedder=embedder)
    # a second run sends nothing: the index has every file with this size and mtime
    again = CliRunner().invoke(main, ["index", str(folder), "--ray", "--index", str(root / "idx"), "--backend", "torch"])
    assert again.exit_code == 0, again.output
    assert "0 files embedded on Ray" in again.output and "9 unchanged (not sent)" in again.output
    yield index, root / "shards", result.output
    index.close()


def _by_path(index: Index) -> dict[str, np.ndarray]:
    snap = index.snapshot()
    return dict(zip(snap.paths, snap.vectors()))


def _groups(groups) -> list[list[str]]:
    return sorted(sorted(g.files) for g in groups)


def _pair_set(snap, a, b) -> set[tuple[str, str]]:
    return {tuple(sorted((snap.paths[i], snap.paths[j]))) for i, j in zip(a.tolist(), b.tolist())}


def test_distributed_index_gives_the_local_vectors_groups_and_failures(ray_index, local_index):
    index, shard_dir, output = ray_index
    assert "9 files embedded on Ray" in output and "8 added" in output and "1 failed" in output
    local, merged = _by_path(local_index), _by_path(index)
    assert sorted(merged) == sorted(local) and len(local) == 8
    worst = max(float(np.abs(merged[p] - local[p]).max()) for p in local)
    # the same decode and model; batches of another size move float32 sums by ~1e-7, which can move a
    # float16 stored component by one step (measured: 1.5e-5)
    assert worst <= 1e-4, worst
    assert _groups(index.duplicates()) == _groups(local_index.duplicates())
    assert len(_groups(index.duplicates())) == 2
    assert index.failures() == local_index.failures()
    (path, reason), = index.failures()
    assert path.endswith("broken.jpg") and reason
    assert index.stats()["model"] == local_index.stats()["model"]
    # before float16 storage the shard's vectors are the local model's to float32 precision
    shard = shards.read_shard(next(p for p in shards.shard_files([shard_dir])))
    checked = [float(np.abs(vector - local_index.embed(record.path)).max())
               for record, vector in zip(shard.records, shard.vectors)
               if record.status == "indexed" and Path(record.path).stem in ("coffee", "chelsea__flip")]
    assert len(checked) == 2 and max(checked) <= 1e-5, checked


def test_merge_is_idempotent_and_newer_rows_win(ray_index, tmp_path, embedder):
    _, shard_dir, _ = ray_index
    target = Index.open(tmp_path / "again", create=True, embedder=embedder)
    first = target.merge([shard_dir])
    counts = target.stats()
    second = target.merge([shard_dir])
    assert (first.added, first.failed) == (8, 1)
    assert (second.added, second.updated, second.failed, second.unchanged) == (0, 0, 0, 9)
    assert target.stats()["images"] == counts["images"] == 8
    assert target.stats()["segments"] == counts["segments"]

    # a newer shard row for a changed file replaces the old vector; an older one is ignored
    shard = shards.read_shard(shards.shard_files([shard_dir])[0])
    i = next(i for i, r in enumerate(shard.records) if r.status == "indexed")
    old = shard.records[i]
    other = next(j for j, r in enumerate(shard.records) if r.status == "indexed" and r.sha256 != old.sha256)
    newer = Record(old.path, old.size + 1, old.mtime_ns + 1, "0" * 64, old.width, old.height)
    older = Record(old.path, old.size, old.mtime_ns - 1, "1" * 64, old.width, old.height)
    shards.write_shard([newer], shard.vectors[[other]], shard.model, str(tmp_path / "newer"), "n")
    shards.write_shard([older], shard.vectors[[other]], shard.model, str(tmp_path / "older"), "o")
    assert target.merge([tmp_path / "newer"]).updated == 1
    assert target.merge([tmp_path / "older"]).stale == 1
    vectors = _by_path(target)
    assert np.allclose(vectors[old.path], shard.vectors[other], atol=1e-3)
    assert target.stats()["images"] == 8
    target.close()

    # the same three shards in one merge call (one commit): the newest row of the path still wins
    together = Index.open(tmp_path / "together", create=True, embedder=embedder)
    summary = together.merge([shard_dir, tmp_path / "older", tmp_path / "newer"])
    assert (summary.added, summary.stale, summary.updated) == (8, 1, 1)
    assert together.image(together.snapshot().ids[together.snapshot().paths.index(old.path)]).sha256 == "0" * 64
    assert together.stats()["images"] == 8 and together.stats()["segments"] == 1
    together.close()


def test_bad_shards_fail_with_one_line_and_change_nothing(ray_index, tmp_path, embedder):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, shard_dir, _ = ray_index
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"path": ["x"], "vector": [[0.0]]}), foreign)
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 this is not parquet")
    target_dir = tmp_path / "target"
    for bad, words in ((foreign, "not a neardup shard"), (garbage, "not a readable Parquet file")):
        result = CliRunner().invoke(main, ["merge", str(shard_dir), str(bad), "--index", str(target_dir), "--backend", "torch"])
        assert result.exit_code == 1
        message = result.output.strip()
        assert words in message and "\n" not in message and "Traceback" not in message
    assert not target_dir.exists()  # refused before any index folder was made
    target = Index.open(target_dir, create=True, embedder=embedder)
    target.merge([shard_dir])
    with pytest.raises(shards.ShardError, match="not a neardup shard"):
        target.merge([foreign])
    assert target.stats()["images"] == 8 and len(target.failures()) == 1
    # a half-written shard from a crashed job is never read
    (shard_dir / ".tmp-crashed.parquet").write_bytes(b"PAR1")
    assert all(".tmp-" not in p for p in shards.shard_files([shard_dir]))
    os.unlink(shard_dir / ".tmp-crashed.parquet")
    target.close()


@pytest.mark.parametrize("plain", [False, True], ids=["collection-aware", "cosine"])
def test_distributed_dups_equal_local_and_exact(tmp_path, ray_cluster, monkeypatch, plain):
    """Ray runs the crowded files' join (the pairs no k-NN list holds: two bursts of 40 near-identical
    vectors bridged at cosine ~0.8), one task per block of rows; the listed pairs and b come from the
    stored graph: the local pairs and groups, which are the exact path's."""
    from conftest import copy_probability, write_index
    from test_graph import crowded

    from neardup import graph as knn

    monkeypatch.setattr(knn, "PAIR_BLOCK", 32)  # several tasks
    write_index(tmp_path / "idx", crowded(seed=2))
    from neardup import calibration

    raw = 0.58  # under the bridge's score: cosine 0.8 - B_MAX + OFFSET = 0.60
    threshold = copy_probability(raw, aware=not plain)
    with Index.open(tmp_path / "idx") as index:
        snap = index.snapshot()
        found = distributed.duplicates(index, threshold, collection_aware=not plain, pairs=True)
        a, b, scores = found.pairs
        local = index.graph_pairs(calibration.raw_threshold(threshold, not plain), aware=not plain)
        assert len(set(zip(a.tolist(), b.tolist()))) == len(a)  # each pair once
        assert _pair_set(snap, a, b) == _pair_set(snap, *local[:2])
        local_scores = {(i, j): s for i, j, s in zip(*(x.tolist() for x in local))}
        assert all(local_scores[(i, j)] == s for i, j, s in zip(a.tolist(), b.tolist(), scores.tolist()))
        assert found.blocks >= 2
        groups = _groups(found.groups)
        assert groups == _groups(index.duplicates(threshold, collection_aware=not plain)) == _groups(
            index.duplicates(threshold, exact=True, collection_aware=not plain))
        assert max(len(g) for g in groups) >= 80  # the bridge between the crowded bursts was found
        # what `dups --ray` runs: the tasks' pairs folded into the groups as they finish, none kept
        streamed = distributed.duplicates(index, threshold, collection_aware=not plain)
        assert streamed.pairs is None and streamed.blocks == found.blocks
        ranges = lambda gs: [(g.files, g.min_score, g.max_score, g.min_cosine, g.max_cosine) for g in gs]  # noqa: E731
        assert ranges(streamed.groups) == ranges(found.groups) == ranges(index.duplicates(threshold, collection_aware=not plain))


def test_file_url_goes_through_fsspec(folder, tmp_path, ray_cluster, local_index):
    pytest.importorskip("fsspec")
    sub = tmp_path / "two"
    sub.mkdir()
    for name in ("coffee.jpg", "broken.jpg"):
        shutil.copy(folder / name, sub / name)
    run = distributed.index_to_shards([sub.as_uri()], (tmp_path / "out").as_uri(), embedder={"backend": "torch"})
    assert run.files == 2 and run.failed == 1 and len(run.shards) == 1 and run.shards[0].startswith("file://")
    shard = shards.read_shard(run.shards[0])
    rows = {Path(r.path.removeprefix("file://")).name: (r, v) for r, v in zip(shard.records, shard.vectors)}
    assert rows["broken.jpg"][0].status == "failed" and rows["broken.jpg"][0].error
    assert rows["coffee.jpg"][0].path == (sub / "coffee.jpg").as_uri()
    assert rows["coffee.jpg"][0].mtime_ns == os.stat(sub / "coffee.jpg").st_mtime_ns
    reference = _by_path(local_index)[str(folder / "coffee.jpg")]
    assert np.abs(rows["coffee.jpg"][1] - reference).max() <= 2e-3


def test_dups_ray_command_prints_the_local_groups(full_index, ray_cluster):
    runner = CliRunner()
    local = runner.invoke(main, ["dups", "--index", str(full_index.root), "--json"])
    spread = runner.invoke(main, ["dups", "--ray", "--index", str(full_index.root), "--json"])
    assert local.exit_code == spread.exit_code == 0, spread.output
    assert json.loads(spread.stdout) == json.loads(local.stdout)
    assert len(json.loads(local.stdout)["groups"]) >= 10
    both = runner.invoke(main, ["dups", "--ray", "--exact", "--index", str(full_index.root)])
    assert both.exit_code == 2 and "choose one of --exact and --ray" in both.output


_OPENED: list[str] | None = None  # files opened while a test records them (see _record_opens)


def _record_opens(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], str):
        _OPENED.append(args[0])


def test_merge_reads_each_shard_footer_once(full_index, tmp_path, embedder):
    """Index.merge checks every shard's footer before writing, then reads its columns: the footer is
    read once (it used to be read again for the columns, twice: three opens of each shard)."""
    global _OPENED
    snap = full_index.snapshot()
    records = [full_index.record(p) for p in snap.paths]
    vectors = snap.vectors()
    model = full_index.stats()["model"]
    written = [shards.write_shard(records[i::3], vectors[i::3], model, str(tmp_path / "shards"), f"part-{i}")
               for i in range(3)]
    target = Index.open(tmp_path / "idx", create=True, embedder=embedder)
    sys.addaudithook(_record_opens)  # audit hooks stay for the process; it records only while _OPENED is set
    _OPENED = []
    try:
        summary = target.merge([tmp_path / "shards"])
    finally:
        opened, _OPENED = _OPENED, None
    assert (summary.shards, summary.added, summary.failed) == (3, len(records), 0)
    assert target.stats()["images"] == len(records)
    for path in written:  # once for the footer (checked before anything is written), once for the columns
        assert opened.count(path) == 2, (path, opened)
    # the merged index holds the same vectors (float16 storage, so to ~1e-3) under the same paths
    merged = dict(zip(target.snapshot().paths, target.snapshot().vectors()))
    assert max(float(np.abs(merged[p] - v).max()) for p, v in zip(snap.paths, vectors)) < 2e-3
    target.close()


def test_decode_tasks_ship_the_decode_stages_uint8_pixels(folder):
    """Issue 20 #3: the Ray decode tasks run the decode stage's recipe (`model_pixels`: uint8 [224, 224, 3],
    a quarter of float32's bytes through the object store), as `neardup index` does; a failed file gets
    zeros of the same layout, so every batch of a run stacks."""
    paths = sorted(str(p) for p in folder.iterdir())
    out = distributed._decode_batch({"path": np.array(paths, dtype=object), "mtime_ns": np.zeros(len(paths), np.int64)},
                                    {"backend": "torch"})
    assert out["pixels"].dtype == np.uint8 and out["pixels"].shape == (len(paths), 224, 224, 3)
    broken = paths.index(str(folder / "broken.jpg"))
    assert out["status"][broken] == "failed" and not out["pixels"][broken].any()
    assert all(out["pixels"][i].any() for i in range(len(paths)) if i != broken)
