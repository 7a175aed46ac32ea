"""Ray adapter: index and deduplicate collections larger than one machine (extra ``neardup[ray]``).

This module only moves data. Decoding and hashing files (`index._prepare_file` / `_prepare_bytes`),
the embedder (`models.load_embedder`), the crowded files' join (`graph.block_pairs`) and grouping
(`Index.duplicates`, `groups.GroupBuilder`) are the functions the local index runs; Ray only ships their
inputs and outputs between machines.

Indexing (``neardup index PATH --ray [ADDRESS]``)::

    list files (driver) -> read, sha256, decode, uint8 model pixels (CPU tasks)
        -> embed (map_batches over an actor pool: the model is loaded once per actor; a GPU each
           when the cluster has GPUs) -> Parquet shards (neardup.shards, written atomically)
        -> Index.merge (on the driver: hashes vectors with the index's planes, commits, brings the
           k-NN graph up to date)

Duplicates (``neardup dups --ray``)::

    the stored k-NN graph (driver): listed pairs at the join cosine, every file's b
        -> the crowded files' vectors once into the object store -> one task per block of rows:
           exact scan against the later rows (graph.block_pairs) -> pairs no list holds
        -> driver: scores, union-find groups
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from . import lsh, neighbourhood, shards
from .images import IMAGE_EXTENSIONS, discover
from .index import (
    DuplicateGroup,
    Index,
    NeardupError,
    _failed,
    _no_pairs,
    _prepare_bytes,
    _prepare_file,
    duplicate_groups,
    raw_threshold,
)
from .store import Record
from .errors import RayError  # noqa: F401 (re-exported)

#: Rows per Parquet shard: ~13 MB of 768-d float32 vectors.
SHARD_ROWS = 4096


def _ray():
    try:
        import ray
    except ImportError:
        raise RayError("the distributed path needs Ray: pip install 'neardup[ray]'") from None
    return ray


def connect(address: str | None = None):
    """Join the Ray cluster at `address` (else $RAY_ADDRESS, else a local one); returns the ray module.
    An already initialised Ray (a notebook, the tests) is used as it is."""
    ray = _ray()
    if not ray.is_initialized():
        try:
            ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise RayError(f"cannot connect to the Ray cluster at {address or os.environ.get('RAY_ADDRESS') or 'local'}: "
                           f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    return ray


# ---- indexing ------------------------------------------------------------------------------------

@dataclass
class ShardRun:
    """What a distributed indexing run wrote: shard paths, rows, and the files it could not use."""

    shards: list[str] = field(default_factory=list)
    files: int = 0
    unchanged: int = 0  # left out: the index already has them with this size and mtime
    failed: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # folders that could not be listed


def list_files(paths: Iterable[str]) -> tuple[list[dict], list[tuple[str, str]], int]:
    """(files as {"path", "size", "mtime_ns"}, folders that could not be listed, files skipped).

    Local paths are found like `neardup index` finds them (`images.discover`, then one stat each: the
    decoding task reads them again with the bytes); URLs are listed through fsspec (recursively, hidden
    names and non-image extensions left out) with the size and mtime the listing reports."""
    local = [str(p) for p in paths if not shards.is_url(str(p))]
    files: list[dict] = []
    errors: list[tuple[str, str]] = []
    skipped = 0
    if local:
        found = discover(local)
        for f in found.files:
            try:
                stat = os.stat(f)
            except OSError:  # the decoding task records why
                files.append({"path": str(f), "size": -1, "mtime_ns": -1})
            else:
                files.append({"path": str(f), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
        errors += [(str(folder), f"cannot list folder: {reason}") for folder, reason in found.errors]
        skipped += len(found.skipped)
    for url in (str(p) for p in paths if shards.is_url(str(p))):
        fs, base = shards.filesystem(url)
        if not fs.exists(base):
            raise FileNotFoundError(f"no such file or folder: {url}")
        is_dir = fs.isdir(base)
        on_local_disk = "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))
        listing = fs.find(base, detail=True) if is_dir else {base: fs.info(base)}
        for name, info in sorted(listing.items()):
            parts = name[len(base):].split("/") if is_dir else []
            if any(part.startswith(".") for part in parts):
                continue
            if is_dir and os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                skipped += 1
                continue
            files.append({"path": fs.unstrip_protocol(name), "size": int(info.get("size") or 0),
                          # fsspec reports float seconds; a local file keeps the exact ns `neardup index` stores
                          "mtime_ns": os.stat(name).st_mtime_ns if on_local_disk else _mtime_ns(info)})
    return files, errors, skipped


def _mtime_ns(info: dict) -> int:
    """Modification time from an fsspec listing entry (each filesystem names and types it its own way)."""
    import datetime

    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return int(value * 1e9) if value < 1e12 else int(value)
        if isinstance(value, str):
            value = datetime.datetime.fromisoformat(value)
        if isinstance(value, datetime.datetime):
            if value.tzinfo is None:  # naive times in listings are UTC
                value = value.replace(tzinfo=datetime.UTC)
            return int(value.timestamp() * 1e9)
    return 0


def _load_embedder(choice: dict, threads: int | None = None):
    """The embedder `choice` names ({"backend", "model", "spec"}: `models.load_embedder`'s arguments),
    loaded once per worker process."""
    from .models import load_embedder

    return load_embedder(choice.get("backend"), model=choice.get("model"), spec=choice.get("spec"), threads=threads)


def _unchanged(record: Record | None, listed: dict) -> bool:
    return record is not None and listed["size"] >= 0 and (record.size, record.mtime_ns) == (
        listed["size"], listed["mtime_ns"])


def _decode_batch(batch: dict, embedder: dict) -> dict:
    """CPU task: read, hash, decode and prepare each file exactly as `Index.add`'s decode stage does
    (neardup.decode): the embedder's uint8 pixel recipe where it has one (150 KB an image through the
    object store instead of 600 KB of float32; the embedding actor normalises), else its float input."""
    embedder = _load_embedder(embedder, threads=1)  # only its pixel recipe runs here
    size = embedder.input_size
    uint8 = getattr(embedder, "model_pixels", None) is not None
    preprocess = embedder.model_pixels if uint8 else embedder.preprocess
    records, pixels = [], []
    for path, listed_mtime in zip(batch["path"], batch["mtime_ns"]):
        path = str(path)
        if shards.is_url(path):
            prepared = _prepare_url(path, int(listed_mtime), size, preprocess)
        else:  # local files are stat-ed and read here, exactly as `neardup index` does
            prepared = _prepare_file(path, None, size, preprocess)
        records.append(prepared.record)
        pixels.append(prepared.pixels)
    empty = np.zeros((size, size, 3), np.uint8) if uint8 else np.zeros((3, size, size), np.float32)
    template = next((p for p in pixels if p is not None), empty)  # every batch of one run has one layout
    stacked = np.zeros((len(records),) + template.shape, dtype=template.dtype)
    for i, p in enumerate(pixels):
        if p is not None:
            stacked[i] = p
    out = _record_columns(records)
    out["pixels"] = stacked
    return out


def _prepare_url(url: str, mtime_ns: int, input_size: int, preprocess):
    fs, inner = shards.filesystem(url)
    try:
        data = fs.cat_file(inner)
    except OSError as exc:
        return _failed(url, None, f"cannot read file: {exc.strerror or exc}")
    return _prepare_bytes(url, data, mtime_ns, None, input_size, preprocess)


def _record_columns(records: list[Record]) -> dict:
    """Records as numpy columns (-1 and "" stand for null: Ray's numpy batches have no nulls)."""
    return {
        "path": np.array([r.path for r in records], dtype=object),
        "size": np.array([r.size for r in records], dtype=np.int64),
        "mtime_ns": np.array([r.mtime_ns for r in records], dtype=np.int64),
        "sha256": np.array([r.sha256 or "" for r in records], dtype=object),
        "width": np.array([-1 if r.width is None else r.width for r in records], dtype=np.int64),
        "height": np.array([-1 if r.height is None else r.height for r in records], dtype=np.int64),
        "status": np.array([r.status for r in records], dtype=object),
        "error": np.array([r.error or "" for r in records], dtype=object),
    }


def _records(batch: dict) -> list[Record]:
    return [
        Record(str(p), int(s), int(m), str(h) or None, None if w < 0 else int(w), None if hh < 0 else int(hh),
               str(st), str(e) or None)
        for p, s, m, h, w, hh, st, e in zip(batch["path"], batch["size"], batch["mtime_ns"], batch["sha256"],
                                           batch["width"], batch["height"], batch["status"], batch["error"])
    ]


class _Embed:
    """Actor: loads the model once, then embeds batch after batch (failed rows get zero vectors)."""

    def __init__(self, embedder: dict, threads: int):
        self.embedder = _load_embedder(embedder, threads)
        self.model = json.dumps(self.embedder.identity, sort_keys=True)

    def __call__(self, batch: dict) -> dict:
        ok = batch["status"] == "indexed"
        vectors = np.zeros((len(ok), self.embedder.dim), dtype=np.float32)
        if ok.any():
            vectors[ok] = self.embedder.embed(np.ascontiguousarray(batch["pixels"][ok]))  # uint8 or float32
        out = {key: value for key, value in batch.items() if key != "pixels"}
        out["vector"] = vectors
        out["model"] = np.full(len(ok), self.model, dtype=object)
        return out


def _write_batch(batch: dict, folder: str, run: str) -> dict:
    """Task: one batch -> one shard, written atomically; returns the shard's path and counts."""
    models = set(batch["model"])
    if len(models) != 1:
        raise RuntimeError(f"one shard got vectors from {len(models)} different models")
    records = _records(batch)
    path = shards.write_shard(records, np.asarray(batch["vector"], dtype=np.float32), json.loads(models.pop()),
                              folder, f"{run}-{uuid.uuid4().hex[:12]}")
    return {"shard": np.array([path], dtype=object), "rows": np.array([len(records)]),
            "failed": np.array([sum(r.status == "failed" for r in records)])}


def index_to_shards(paths: Iterable[str], out: str, *, batch_size: int = 32, shard_rows: int = SHARD_ROWS,
                    embedders: int | None = None, embedder: dict | None = None, known=None) -> ShardRun:
    """Run the distributed indexing pipeline over `paths` on the connected cluster, writing Parquet
    shards into `out` (a folder every worker can write: shared disk or an fsspec URL). Ray Data shows
    its own progress bars. `embedders`: actor pool size (default: one per GPU, else half the CPUs).
    `embedder`: `models.load_embedder` arguments {"backend", "model", "spec"} (default: auto); a
    custom model file must be readable at the same path on every worker. `known(path)`: the index's
    record of a path, if any; files it has with the same size and mtime are left out, as `neardup index`
    leaves them."""
    embedder = dict(embedder or {})
    ray = connect()
    files, errors, skipped = list_files(paths)
    listed = len(files)
    if known is not None:
        files = [f for f in files if not _unchanged(known(f["path"]), f)]
    run = ShardRun(files=len(files), unchanged=listed - len(files), skipped=skipped, failures=errors)
    if not files:
        return run
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    if embedders is None:
        embedders = gpus or max(1, cpus // 2)
    threads = 1 if gpus else max(1, cpus // (2 * embedders))
    import pyarrow as pa

    listing = pa.table({"path": [f["path"] for f in files], "size": [f["size"] for f in files],
                        "mtime_ns": [f["mtime_ns"] for f in files]})
    blocks = max(1, min(len(files) // batch_size, 4 * cpus))
    dataset = (
        ray.data.from_arrow(listing).repartition(blocks)
        .map_batches(_decode_batch, fn_kwargs={"embedder": embedder}, batch_size=batch_size, batch_format="numpy",
                     num_cpus=1)
        .map_batches(_Embed, fn_constructor_kwargs={"embedder": embedder, "threads": threads}, batch_size=batch_size,
                     batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=embedders),
                     num_gpus=1 if gpus else None,
                     num_cpus=threads)
        .map_batches(_write_batch, fn_kwargs={"folder": out, "run": time.strftime("%Y%m%d%H%M%S")},
                     batch_size=shard_rows, batch_format="numpy", num_cpus=1)
    )
    for row in dataset.take_all():
        run.shards.append(str(row["shard"]))
        run.failed += int(row["failed"])
    run.shards.sort()
    return run


# ---- duplicates ----------------------------------------------------------------------------------

@dataclass
class DuplicateSearch:
    groups: list[DuplicateGroup]
    # snapshot positions a < b and their cosine, each pair once; None unless asked for (`pairs=True`: then
    # the driver holds every pair at once, as the local path no longer does)
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    blocks: int  # Ray tasks of the crowded files' join (0: no crowded files)


def duplicates(index: Index, threshold: float, *, collection_aware: bool = True, pairs: bool = False) -> DuplicateSearch:
    """`index.duplicates(threshold)` with the connected Ray cluster doing the one part of it that grows
    with how crowded the collection is: the exact join among the "crowded" files, whose pairs no k-NN
    list can hold (Index.graph_pairs), one task per block of rows (graph.block_pairs, the local scan's
    own code) over their vectors, put once in the object store. The listed pairs and every file's b come
    from the k-NN graph the index keeps (neardup.graph), read by the driver as the local path reads
    them, and the tasks' pairs are folded into the groups as they finish. So the groups are the local
    ones. `pairs`: also return every linking pair (tests and benchmarks compare them with the local ones)."""
    from . import graph as knn

    ray = connect()
    snap = index.snapshot()
    n = len(snap)
    if n < 2:
        return DuplicateSearch([], _no_pairs() if pairs else None, 0)
    aware = collection_aware and neighbourhood.applies(n)
    tasks = {"blocks": 0}

    def join(vectors: np.ndarray, cosine: float):
        ref = ray.put(vectors)
        task = ray.remote(_block_pairs)
        blocks = knn.pair_blocks(len(vectors))
        tasks["blocks"] = len(blocks)
        waiting = [task.remote(ref, first, rows, cosine) for first, rows in blocks]
        try:
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                yield ray.get(done[0])
        finally:  # an error or an early stop while folding: the blocks not yet done are not needed
            for pending in waiting:
                ray.cancel(pending)

    raw = raw_threshold(threshold, aware)
    try:
        if not pairs:
            groups = index.duplicates(threshold, collection_aware=collection_aware, snapshot=snap, join=join)
            return DuplicateSearch(groups, None, tasks["blocks"])
        a, b, s = index.graph_pairs(raw, aware=aware, snapshot=snap, join=join)
        backgrounds = neighbourhood.backgrounds(index.graph(snap).kth()) if aware else None
    except NeardupError as exc:
        raise RayError(str(exc)) from None
    groups = duplicate_groups(snap, [(a, b, s)], backgrounds=backgrounds, raw=raw)
    return DuplicateSearch(groups, (a, b, s), tasks["blocks"])


def _block_pairs(vectors: np.ndarray, first: int, rows: int, threshold: float):
    """Task: graph.block_pairs on one block of the crowded files' rows."""
    from . import graph as knn

    return knn.block_pairs(vectors, first, rows, threshold)
