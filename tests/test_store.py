"""The index folder's storage: commit protocol, readers beside writers, locks."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from neardup.index import Index
from neardup.store import IndexLocked, Record, Store


def unit(i: int, dim: int = 4) -> np.ndarray:
    return np.eye(dim, dtype=np.float32)[i]


def add(store: Store, path: str, vector: np.ndarray) -> None:
    store.commit(vectors=vector[None], codes=np.zeros((1, 2), np.uint32), indexed=[Record(path, 1, 1, path)])


def test_long_lived_reader_sees_new_segments_after_compaction_reuses_nothing(tmp_path):
    writer = Store.open(tmp_path / "idx", create=True, write=True)
    add(writer, "/a", unit(0))
    add(writer, "/b", unit(1))
    reader = Store.open(tmp_path / "idx")
    assert len(reader.snapshot()) == 2
    writer.commit(removed=["/a", "/b"])
    writer.compact()
    add(writer, "/c", unit(2))
    snap = reader.snapshot()
    assert snap.paths == ["/c"]
    np.testing.assert_array_equal(snap.vectors()[0], unit(2))
    assert writer.verify() == [] and reader.verify() == []
    reader.close(), writer.close()


def test_concurrent_snapshots_from_threads(tmp_path):
    with Store.open(tmp_path / "idx", create=True, write=True) as writer:
        for i in range(4):
            add(writer, f"/{i}", unit(i))
    reader = Store.open(tmp_path / "idx")
    with ThreadPoolExecutor(4) as pool:
        sizes = list(pool.map(lambda _: len(reader.snapshot()), range(400)))
    assert sizes == [4] * 400
    reader.close()


def test_second_writer_fails_fast_with_no_wait(tmp_path, photo_folder):
    Store.open(tmp_path / "idx", create=True, write=True).close()
    with open(tmp_path / "idx" / "lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(IndexLocked):
            Store.open(tmp_path / "idx", write=True, wait=False)
        result = subprocess.run([sys.executable, "-m", "neardup.cli", "index", str(photo_folder), "--index",
                                 str(tmp_path / "idx"), "--no-wait"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "being written by another process" in result.stderr


def test_commit_rejects_mismatched_rows_and_leaves_the_catalog_unchanged(tmp_path):
    with Store.open(tmp_path / "idx", create=True, write=True) as store:
        with pytest.raises(ValueError):
            store.commit(vectors=np.zeros((2, 4), np.float32), codes=np.zeros((2, 2), np.uint32),
                         indexed=[Record("/x", 1, 1)])
        assert store.counts()["indexed"] == 0 and store.verify() == []


# ---- compaction under readers (review 2026-12-04, defect 9) -----------------------------------------

# A writer process: re-commits 5 images and compacts, `rounds` times; it starts once every reader has
# written its ready file, and marks the end with a committed meta row the readers wait for.
WRITER = textwrap.dedent("""
    import os, sys
    import numpy as np
    from neardup.store import Record, Store
    root, rounds, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    while not all(os.path.exists(f) for f in ready):
        os.sched_yield()
    with Store.open(root, write=True) as store:
        records = store.records("indexed")
        rng = np.random.default_rng(0)
        for n in range(rounds):
            batch = records[(n * 5) % 40:(n * 5) % 40 + 5]
            store.commit(vectors=rng.standard_normal((5, 8)).astype(np.float32),
                         codes=np.zeros((5, 2), np.uint32), indexed=batch)
            store.compact()
        store.set_meta("writer_done", rounds)
    print("compactions", rounds)
""")

# A reader process: snapshot + vectors, or Index.similarity, in a loop until the writer's end row is
# committed; prints its count of reads and of failures.
READER = textwrap.dedent("""
    import collections, sys
    from pathlib import Path
    from neardup.index import Index
    root, kind, ready = sys.argv[1:4]
    errors, reads = collections.Counter(), 0
    with Index.open(root) as index:
        Path(ready).touch()
        while True:
            done = index._reader.get_meta("writer_done") is not None
            try:
                if kind == "snapshot":
                    snap = index.snapshot()
                    assert len(snap.vectors()) == 40
                else:
                    assert index.similarity(1, 2) is not None
            except Exception as exc:
                errors[f"{type(exc).__name__}: {exc}"[:120]] += 1
            reads += 1
            if done:
                break
    print(reads, sum(errors.values()), dict(errors.most_common(3)))
""")


def forty_images(root) -> None:
    rng = np.random.default_rng(1)
    with Store.open(root, create=True, write=True) as store:
        for start in range(0, 40, 5):  # 8 segments
            store.commit(vectors=rng.standard_normal((5, 8)).astype(np.float32), codes=np.zeros((5, 2), np.uint32),
                         indexed=[Record(f"/img/{i:02}.jpg", 1, 1, str(i)) for i in range(start, start + 5)])


def child(script: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, what: str, deadline_s: float = 120) -> None:
    """Poll observable state; the deadline only turns a hang into a failure."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)


@pytest.mark.parametrize("read", ["snapshot", "similarity"])
def test_a_reader_mapping_segments_while_a_compaction_commits_reads_the_state_it_began_with(tmp_path, read):
    """The race of defect 9, forced: the reader has read the catalog (old segment names) and is about to
    map the files when a compaction in another process commits. The reader still gets its vectors, and
    the compaction deletes the old files only after the reader is done."""
    root = tmp_path / "idx"
    forty_images(root)
    (tmp_path / "go").touch()
    reader = Index.open(root)
    before = reader._reader.segment_names()
    watcher = sqlite3.connect(root / "catalog.sqlite")
    real_segment, writers = reader._reader._segment, []

    def segment_after_the_compaction_committed(seg_id, name, rows):
        if not writers:  # first file to map: let a compaction commit before mapping it
            writers.append(child(WRITER, root, 1, tmp_path / "go"))
            wait_for(lambda: not watcher.execute("SELECT count(*) FROM segments WHERE name IN (%s)" % ",".join(
                "?" * len(before)), before).fetchone()[0], "the compaction committed")
        return real_segment(seg_id, name, rows)

    reader._reader._segment = segment_after_the_compaction_committed
    if read == "snapshot":
        snap = reader.snapshot()
        assert len(snap.vectors()) == 40 and set(np.unique(snap._segment_ids)) <= set(range(1, 9))
    else:
        assert reader.similarity(1, 2) is not None
    out, err = writers[0].communicate(timeout=120)
    assert writers[0].returncode == 0, err
    watcher.close(), reader.close()
    with Store.open(root) as store:  # the old files are gone once the reader let go
        assert store.verify() == [] and len(store.segment_names()) == 1
        assert len(os.listdir(root / "segments")) == 2


def test_readers_in_other_processes_never_fail_while_a_writer_compacts_120_times(tmp_path):
    root = tmp_path / "idx"
    forty_images(root)
    ready = [tmp_path / "ready-snapshot", tmp_path / "ready-similarity"]
    writer = child(WRITER, root, 120, *ready)
    readers = [child(READER, root, kind, marker) for kind, marker in zip(("snapshot", "similarity"), ready)]
    _, err = writer.communicate(timeout=600)
    assert writer.returncode == 0, err
    results = []
    for reader in readers:
        out, err = reader.communicate(timeout=120)
        assert reader.returncode == 0, err
        reads, failures, kinds = out.split(maxsplit=2)
        results.append((int(reads), int(failures), kinds.strip()))
    print(f"\nreads and failures (snapshot, similarity) during 120 compactions: {results}")
    assert [failures for _, failures, _ in results] == [0, 0], results
    assert all(reads > 1 for reads, _, _ in results)
