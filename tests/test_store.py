"""The index folder's storage: commit protocol, readers beside writers, locks."""

from __future__ import annotations

import fcntl
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

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
