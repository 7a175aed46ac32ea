"""Parquet shards: what a distributed indexing run hands to `neardup merge`.

A shard is one Parquet file with the columns of ``neardup.schemas.SHARD_COLUMNS`` and two key-value
metadata entries: ``neardup.shard`` (format version) and ``neardup.model`` (the JSON identity of the
embedder that made the vectors). Shards carry vectors, not LSH codes: the index hashes them at merge
time with its own planes, so the planes stay the one source of truth.

Shards are written under a temporary name and renamed (local files are fsynced first), so a crashed
job leaves either a whole shard or a ``.tmp-`` file that readers ignore. Local paths and fsspec URLs
(``s3://...``, ``file://...``) are both accepted; URLs need ``fsspec`` and the filesystem's package.
pyarrow is imported lazily (the ``ray`` extra).
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .schemas import SHARD_COLUMNS, SHARD_VERSION
from .store import Record, fsync_dir
from .errors import NeardupError, ShardError  # noqa: F401 (re-exported)

VERSION_KEY = b"neardup.shard"
MODEL_KEY = b"neardup.model"
SUFFIX = ".parquet"
TMP_PREFIX = ".tmp-"


@dataclass
class Shard:
    """One shard read into memory: its records (row i <-> records[i]) and the vectors of indexed rows."""

    path: str
    model: dict
    records: list[Record]
    vectors: np.ndarray  # float32 [len(records), dim]; rows of failed records are zeros


def is_url(path: str) -> bool:
    return "://" in str(path)


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL; a one-line error when fsspec is missing."""
    try:
        import fsspec
    except ImportError:
        raise NeardupError(f"{url}: reading URLs needs fsspec (pip install fsspec, plus s3fs/gcsfs/adlfs)") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise NeardupError(f"{url}: no filesystem for this URL ({exc})") from None


def arrow_schema(dim: int, model: dict | None = None):
    import pyarrow as pa

    types = {"string": pa.string(), "int64": pa.int64(), "int32": pa.int32(),
             "float32[dim]": pa.list_(pa.float32(), dim)}
    fields = [pa.field(name, types[kind], nullable=nullable) for name, (kind, nullable, _) in SHARD_COLUMNS.items()]
    metadata = {VERSION_KEY: str(SHARD_VERSION).encode()}
    if model is not None:
        metadata[MODEL_KEY] = json.dumps(model, sort_keys=True).encode()
    return pa.schema(fields, metadata=metadata)


def write_shard(records: Sequence[Record], vectors: np.ndarray, model: dict, folder: str, name: str) -> str:
    """Write one shard atomically as folder/name.parquet; returns its path (or URL)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = int(model["dim"])
    if vectors.shape != (len(records), dim):
        raise ValueError(f"expected vectors of shape ({len(records)}, {dim}), got {vectors.shape}")
    failed = np.array([r.status != "indexed" for r in records], dtype=bool)
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    vector_column = pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(failed))
    columns = {
        "path": [r.path for r in records],
        "size": [r.size for r in records],
        "mtime_ns": [r.mtime_ns for r in records],
        "sha256": [r.sha256 for r in records],
        "width": [r.width for r in records],
        "height": [r.height for r in records],
        "status": [r.status for r in records],
        "error": [r.error for r in records],
    }
    schema = arrow_schema(dim, model)
    arrays = [pa.array(columns[f.name], type=f.type) for f in schema if f.name != "vector"] + [vector_column]
    table = pa.Table.from_arrays(arrays, schema=schema)
    final_name, tmp_name = name + SUFFIX, TMP_PREFIX + name + SUFFIX
    if is_url(folder):
        fs, base = filesystem(folder)
        fs.makedirs(base, exist_ok=True)
        tmp, final = posixpath.join(base, tmp_name), posixpath.join(base, final_name)
        with fs.open(tmp, "wb") as f:
            pq.write_table(table, f)
        fs.mv(tmp, final)
        return fs.unstrip_protocol(final)
    os.makedirs(folder, exist_ok=True)
    tmp, final = os.path.join(folder, tmp_name), os.path.join(folder, final_name)
    with open(tmp, "wb") as f:
        pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(folder)
    return final


def shard_files(sources: Iterable[str]) -> list[str]:
    """The shard files named, or found (non-recursively, *.parquet, no .tmp- files) in named folders."""
    found: list[str] = []
    for source in map(str, sources):
        if is_url(source):
            fs, base = filesystem(source)
            if not fs.exists(base):
                raise FileNotFoundError(f"no such shard or folder: {source}")
            if fs.isdir(base):
                names = sorted(p for p in fs.ls(base, detail=False) if _is_shard_name(posixpath.basename(p)))
                found.extend(fs.unstrip_protocol(p) for p in names)
            else:
                found.append(source)
        elif os.path.isdir(source):
            found.extend(os.path.join(source, name) for name in sorted(os.listdir(source)) if _is_shard_name(name))
        elif os.path.exists(source):
            found.append(source)
        else:
            raise FileNotFoundError(f"no such shard or folder: {source}")
    return found


def _is_shard_name(name: str) -> bool:
    return name.endswith(SUFFIX) and not name.startswith(TMP_PREFIX)


def _open(path: str):
    if is_url(path):
        fs, inner = filesystem(path)
        return fs.open(inner, "rb")
    return open(path, "rb")


@dataclass
class Footer:
    """A shard's footer, read and checked once: the model it declares, and the Parquet metadata that
    reading the shard's columns then reuses instead of reading the footer again."""

    model: dict
    metadata: object  # pyarrow.parquet.FileMetaData


def read_model(path: str) -> dict:
    """Check a shard's format from its footer alone and return the model identity it declares."""
    return read_footer(path).model


def read_footer(path: str) -> Footer:
    """Read a shard's footer (only the footer) and check its format: version, model identity, columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with _open(path) as f:
            parquet = pq.ParquetFile(f)
            schema, file_metadata = parquet.schema_arrow, parquet.metadata
    except (pa.ArrowException, OSError) as exc:
        raise ShardError(f"{path} is not a readable Parquet file: {_first_line(exc)}") from None
    metadata = schema.metadata or {}
    if VERSION_KEY not in metadata:
        raise ShardError(f"{path} is not a neardup shard (no '{VERSION_KEY.decode()}' metadata)")
    version = metadata[VERSION_KEY].decode(errors="replace")
    if version != str(SHARD_VERSION):
        raise ShardError(f"{path} is a neardup shard of version {version}; this neardup reads {SHARD_VERSION}")
    try:
        model = json.loads(metadata[MODEL_KEY])
        expected = arrow_schema(int(model["dim"]))
    except (KeyError, TypeError, ValueError):
        raise ShardError(f"{path}: the shard's model identity is missing or malformed") from None
    for field in expected:
        if field.name not in schema.names:
            raise ShardError(f"{path}: column '{field.name}' is missing")
        if not schema.field(field.name).type.equals(field.type):
            raise ShardError(f"{path}: column '{field.name}' has type {schema.field(field.name).type}, "
                             f"expected {field.type}")
    return Footer(model, file_metadata)


def read_shard(path: str, footer: Footer | None = None) -> Shard:
    """Read and validate a whole shard (given its `footer` when already read: it is not read again).
    Raises ShardError with one line for anything wrong."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    footer = footer or read_footer(path)
    model = footer.model
    dim = int(model["dim"])
    try:
        with _open(path) as f:
            table = pq.ParquetFile(f, metadata=footer.metadata).read(columns=list(SHARD_COLUMNS))
    except (pa.ArrowException, OSError) as exc:
        raise ShardError(f"{path} is damaged: {_first_line(exc)}") from None
    columns = {name: table.column(name).to_pylist() for name in SHARD_COLUMNS if name != "vector"}
    vector_column = table.column("vector").combine_chunks()
    statuses = np.array(columns["status"], dtype=object)
    if not np.isin(statuses, ["indexed", "failed"]).all():
        raise ShardError(f"{path}: a row has a status other than 'indexed' or 'failed'")
    indexed = statuses == "indexed"
    present = ~np.asarray(vector_column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if (indexed & ~present).any():
        raise ShardError(f"{path}: an indexed row has no vector")
    vectors = np.zeros((len(table), dim), dtype=np.float32)
    if len(table):
        values = vector_column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        vectors[present] = values.reshape(-1, dim)
    vectors[~indexed] = 0
    norms = np.linalg.norm(vectors[indexed], axis=1)
    if len(norms) and not (np.isfinite(norms).all() and np.abs(norms - 1).max() < 1e-3):
        raise ShardError(f"{path}: an indexed row's vector is not a finite unit vector")
    sha = columns["sha256"]
    if any(sha[i] is None for i in np.flatnonzero(indexed)):
        raise ShardError(f"{path}: an indexed row has no sha256")
    records = [
        Record(path=p, size=s, mtime_ns=m, sha256=h, width=w, height=hh, status=st, error=e)
        for p, s, m, h, w, hh, st, e in zip(columns["path"], columns["size"], columns["mtime_ns"], columns["sha256"],
                                             columns["width"], columns["height"], columns["status"], columns["error"])
    ]
    return Shard(path, model, records, vectors)


@dataclass
class MergePlan:
    """What one shard changes in the catalog."""

    indexed: list[Record]
    vectors: np.ndarray
    failed: list[Record]
    touched: list[Record]
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    stale: int = 0


def plan_merge(shard: Shard, known: Callable[[str], Record | None]) -> MergePlan:
    """Decide, row by row, what merging `shard` does, given the catalog's current record of a path.

    A row is keyed by (path, size, mtime_ns, sha256, status): the same key is unchanged (so merging a
    shard twice adds nothing); an older mtime than the catalog's is stale and ignored; otherwise the
    row wins (new bytes: a new vector; same bytes, new mtime: a metadata update; a failure: recorded
    with its reason). Within one shard the newest row of a path wins.
    """
    newest: dict[str, int] = {}
    for i, record in enumerate(shard.records):
        previous = newest.get(record.path)
        if previous is None or shard.records[previous].mtime_ns <= record.mtime_ns:
            newest[record.path] = i
    plan = MergePlan([], np.empty((0, shard.vectors.shape[1]), np.float32), [], [])
    rows = []
    for path, i in newest.items():
        row, old = shard.records[i], known(path)
        if old is not None and (old.size, old.mtime_ns, old.sha256, old.status) == (
                row.size, row.mtime_ns, row.sha256, row.status):
            plan.unchanged += 1
            continue
        if old is not None and old.mtime_ns > row.mtime_ns:
            plan.stale += 1
            continue
        if old is None or old.status == "failed":
            plan.added += row.status == "indexed"
        else:
            plan.updated += row.status == "indexed"
        if row.status == "failed":
            plan.failed.append(row)
        elif old is not None and old.status == "indexed" and old.sha256 == row.sha256:
            plan.touched.append(row)
        else:
            plan.indexed.append(row)
            rows.append(i)
    plan.vectors = shard.vectors[rows]
    return plan


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
