"""The index folder: a SQLite catalog plus immutable numpy segment files.

Layout of an index folder::

    catalog.sqlite        images (one row per file seen), segments, meta — WAL mode
    planes.npy            the LSH hyperplanes (written once, at creation)
    segments/<name>.vectors.npy   float16 [rows, dim] unit vectors (format 2; float32 in format 1)
    segments/<name>.codes.npy     uint32  [rows, tables] LSH codes
    segments/<name>.graph.npz     the k-nearest-neighbour graph (neardup.graph) of the images indexed
                                  when it was written; the catalog's meta 'graph' names the current one
    lock                  held (flock) by the one writer

Commit protocol: segment files are written under a temporary name, fsynced, renamed and the folder
fsynced; only then one SQLite transaction registers the segment and points catalog rows at it. That
transaction is the commit point: a crash before it leaves orphan files (removed by the next writer),
a crash after it leaves a complete segment. Segment files are never modified. A removed or re-embedded
image simply stops pointing at its old row (a tombstone); compaction copies the live rows into a new
segment and drops the old ones, whose files are deleted once no reader can still be
mapping them (`Store._remove_orphans`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import sqlite3
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .errors import IndexLocked, IndexWriteError, StoreError  # noqa: F401 (re-exported)

#: 2: vectors stored as float16 (half the disk and page cache; scores move by <= ~1e-3, see lsh.cosines).
SCHEMA_VERSION = 2
VECTOR_DTYPE = np.float16
CATALOG = "catalog.sqlite"
SEGMENTS = "segments"
# the only names the store writes in SEGMENTS (see commit, compact and _write_array); the orphan sweep
# deletes nothing else, whatever a user or another program put there
_SEGMENT_FILE = re.compile(r"(?P<tmp>\.tmp-)?(?P<name>\d{14}-[0-9a-f]{8})\.(?:vectors\.npy|codes\.npy|graph\.npz)")
GRAPH_META = "graph"
PLANES = "planes.npy"
LOCK = "lock"
MADV_POPULATE_READ = 22  # Linux's value; Python's mmap module names it only from 3.13

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS segments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT UNIQUE NOT NULL,
    rows INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    path TEXT UNIQUE NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT,
    width INTEGER,
    height INTEGER,
    status TEXT NOT NULL CHECK (status IN ('indexed', 'failed')),
    error TEXT,
    segment INTEGER REFERENCES segments(id),
    row INTEGER,
    updated REAL NOT NULL,
    CHECK ((status = 'indexed') = (segment IS NOT NULL AND row IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS images_sha256 ON images(sha256);
CREATE INDEX IF NOT EXISTS images_segment ON images(segment, row);
"""


def _reporting_write_errors(method):
    """Turn a failed write (disk full, I/O error, read-only filesystem) into one clear IndexWriteError. The
    commit point was not reached, so the index keeps its last committed state; files written before the
    failure are orphans the next writer removes."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (OSError, sqlite3.OperationalError) as exc:  # sqlite: "database or disk is full", "disk I/O error"
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            with contextlib.suppress(OSError):  # numpy reports a short write without errno: say why
                stat = os.statvfs(self.root)
                if "space" not in reason and stat.f_bavail * stat.f_frsize < 1 << 20:
                    reason = f"no space left on device ({reason})"
            raise IndexWriteError(f"cannot write the index at {self.root}: {reason}; it keeps its last committed "
                                  "state (free some space and run the command again)") from exc

    return wrapper


@dataclass(frozen=True)
class Record:
    """What the catalog knows of one file. `status` is 'indexed' or 'failed' (then `error` says why)."""

    path: str
    size: int
    mtime_ns: int
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    status: str = "indexed"
    error: str | None = None
    id: int | None = None
    segment: int | None = None
    row: int | None = None


_RECORD_COLUMNS = "path, size, mtime_ns, sha256, width, height, status, error, id, segment, row"


class Snapshot:
    """The live (indexed) images at one moment: ids, paths, codes, and vectors read from segments."""

    def __init__(self, ids: np.ndarray, paths: list[str], segment_ids: np.ndarray, rows: np.ndarray,
                 segments: dict[int, "_Segment"], stamps: np.ndarray | None = None):
        self.ids, self.paths = ids, paths
        # when each image's row was last written (catalog `updated`): a vector changes only with it, and a
        # compaction moves rows without changing it, so (id, stamp) names a vector (neardup.graph)
        self.stamps = np.zeros(len(ids)) if stamps is None else stamps
        self._segment_ids, self._rows, self._segments = segment_ids, rows, segments

    def __len__(self) -> int:
        return len(self.ids)

    def vectors(self, positions: np.ndarray | None = None, dtype=np.float32) -> np.ndarray:
        """[len(positions), dim] vectors of the given snapshot positions (all when None), as `dtype`
        (None: as stored, float16)."""
        stored = self._gather("vectors", positions)
        return stored if dtype is None else stored.astype(dtype, copy=False)

    def codes(self, positions: np.ndarray | None = None) -> np.ndarray:
        return self._gather("codes", positions)

    def map_vectors(self) -> threading.Thread | None:
        """Map every page of the snapshot's vector segments into this process, where Linux can
        (MADV_POPULATE_READ, 5.14+) and they take at most half the memory available. A query at 1M reads
        ~36 rows scattered over 1.5 GB, and the first touch of each page costs a page fault: in a fresh
        process that was a third of the query's time (RESULTS, "Mapped rows"). The segments already in the
        page cache are mapped now (0.13–0.44 s for 1.5 GB on an EPYC); the others, read from the disk, by a
        background thread (returned), so a one-image query never waits for the whole index to be read."""
        if not sys.platform.startswith("linux"):  # 22 is Linux's MADV_POPULATE_READ only
            return None
        with _MAPPING_LOCK:
            unmapped = [s for s in self._segments.values() if not s.mapping_claimed]
            if sum(s.vectors.nbytes for s in unmapped) > _available_memory() // 2:
                return None
            for segment in unmapped:
                segment.mapping_claimed = True
        cached, cold = [], []
        for segment in unmapped:
            (cached if _in_page_cache(segment.vectors_path) else cold).append(segment)
        _map_segments(cached)
        if not cold:
            return None
        thread = threading.Thread(target=_map_segments, args=(cold,), name="neardup-map-vectors", daemon=True)
        thread.start()
        return thread

    def read_vectors(self, positions: np.ndarray) -> np.ndarray:
        """Stored (float16) vectors of scattered positions read from the files, not through the mappings:
        touching a few percent of the rows of a mapping maps nearly all of it (the kernel maps the pages
        around each fault), which a process's peak RSS then counts (`dups` reads its crowded files so)."""
        positions = np.asarray(positions, dtype=np.int64)
        template = next(iter(self._segments.values()), None)
        if template is None or len(positions) == 0:
            return self.vectors(positions, dtype=None)
        dim, dtype = template.vectors.shape[1], template.vectors.dtype
        width = dim * dtype.itemsize
        out = np.empty((len(positions), dim), dtype=dtype)
        view = out.view(np.uint8).reshape(len(positions), width)
        segment_ids, rows = self._segment_ids[positions], self._rows[positions]
        for seg_id in np.unique(segment_ids).tolist():
            segment = self._segments[seg_id]
            here = np.flatnonzero(segment_ids == seg_id)
            fd = os.open(segment.vectors_path, os.O_RDONLY)
            try:
                for i, row in zip(here.tolist(), rows[here].tolist()):
                    view[i] = np.frombuffer(os.pread(fd, width, segment.vectors_offset + row * width), np.uint8)
            finally:
                os.close(fd)
        return out

    def _gather(self, kind: str, positions: np.ndarray | None) -> np.ndarray:
        positions = np.arange(len(self.ids)) if positions is None else np.asarray(positions, dtype=np.int64)
        segment_ids, rows = self._segment_ids[positions], self._rows[positions]
        template = next(iter(self._segments.values()), None)
        if template is None:
            return np.empty((0, 0), dtype=np.float32)
        if len(self._segments) == 1:
            return np.take(getattr(template, kind), rows, axis=0)
        source = getattr(template, kind)
        if 0 < len(positions) <= 256:  # a query's shortlist: row by row beats grouping by segment
            picked = [getattr(self._segments[s], kind)[r] for s, r in zip(segment_ids.tolist(), rows.tolist())]
            return np.concatenate(picked).reshape((len(positions),) + source.shape[1:])  # np.stack: +40 % here
        out = np.empty((len(positions),) + source.shape[1:], dtype=source.dtype)
        if len(positions) == 0:
            return out
        order = np.argsort(segment_ids, kind="stable")
        ordered = segment_ids[order]
        bounds = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1], True])
        for start, end in zip(bounds[:-1], bounds[1:]):
            here = order[start:end]
            out[here] = np.take(getattr(self._segments[int(ordered[start])], kind), rows[here], axis=0)
        return out


@dataclass
class _Segment:
    id: int
    name: str
    rows: int
    vectors: np.ndarray
    codes: np.ndarray
    vectors_path: str = ""
    vectors_offset: int = 0  # where the rows start in the .npy file (after its header)
    mapping: object = None  # the vectors' mmap.mmap (Snapshot.map_vectors)
    mapping_claimed: bool = False  # a map_vectors call maps it (or found no way to)
    mapped: bool = False


class Store:
    """One open index folder. Opened for writing, it holds the folder's lock until `close()`."""

    def __init__(self, root: Path, conn: sqlite3.Connection, lock_file=None):
        self.root = root
        self._conn = conn
        self._lock_file = lock_file
        self._segment_cache: dict[str, _Segment] = {}  # by name: ids of dropped segments can come back
        self._read_lock = threading.Lock()  # one connection serves every query thread

    # ---- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, root: str | os.PathLike, *, create: bool = False, write: bool = False,
             wait: bool = True, on_wait: Callable[[], None] | None = None) -> "Store":
        root = Path(root)
        catalog = root / CATALOG
        if not catalog.exists():
            if not create:
                raise StoreError(f"no index at {root} (create one with `neardup index PATH --index {root}`)")
            if root.exists() and not root.is_dir():
                raise StoreError(f"{root} exists and is not a folder")
            (root / SEGMENTS).mkdir(parents=True, exist_ok=True)
            write = True
        lock_file = _acquire_lock(root, wait, on_wait) if write else None
        conn = None
        try:
            if write and not catalog.exists():
                _create_catalog(catalog)
            conn = sqlite3.connect(catalog, timeout=60, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            if write:
                conn.executescript(_SCHEMA)
            store = cls(root, conn, lock_file)
            version = store.get_meta("schema_version")
            if version is None and write:
                store.set_meta("schema_version", SCHEMA_VERSION)
            elif version not in (None, SCHEMA_VERSION):
                raise StoreError(f"index at {root} has format version {version}; this neardup reads format "
                                 f"{SCHEMA_VERSION} only: rebuild it (delete {root} and run `neardup index` again)")
            if write:
                store._remove_orphans()
            return store
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if lock_file:
                lock_file.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise StoreError(f"cannot open the index catalog {catalog}: {exc}") from exc
            raise

    def close(self) -> None:
        self._conn.close()
        self._segment_cache.clear()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def writable(self) -> bool:
        return self._lock_file is not None

    # ---- meta --------------------------------------------------------------------------------

    def get_meta(self, key: str):
        try:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.OperationalError:  # a brand-new catalog opened read-only has no tables yet
            return None
        return None if row is None else json.loads(row[0])

    def set_meta(self, key: str, value) -> None:
        self._require_write()
        self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def save_planes(self, planes: np.ndarray) -> None:
        self._require_write()
        _write_array(self.root / PLANES, planes)
        fsync_dir(self.root)

    def load_planes(self) -> np.ndarray:
        try:
            return np.load(self.root / PLANES)
        except (OSError, ValueError, EOFError) as exc:
            raise StoreError(f"the LSH planes of the index at {self.root} are unreadable: {exc}") from exc

    # ---- catalog reads -------------------------------------------------------------------------

    def record(self, path: str) -> Record | None:
        row = self._conn.execute(f"SELECT {_RECORD_COLUMNS} FROM images WHERE path = ?", (path,)).fetchone()
        return None if row is None else Record(*row)

    def records(self, status: str | None = None) -> list[Record]:
        query = f"SELECT {_RECORD_COLUMNS} FROM images"
        args: tuple = ()
        if status:
            query, args = query + " WHERE status = ?", (status,)
        return [Record(*row) for row in self._conn.execute(query + " ORDER BY path", args)]

    def record_by_id(self, image_id: int) -> Record | None:
        row = self._conn.execute(f"SELECT {_RECORD_COLUMNS} FROM images WHERE id = ?", (image_id,)).fetchone()
        return None if row is None else Record(*row)

    def indexed_with_sha256(self, sha256: str) -> Record | None:
        row = self._conn.execute(
            f"SELECT {_RECORD_COLUMNS} FROM images WHERE sha256 = ? AND status = 'indexed' LIMIT 1", (sha256,)
        ).fetchone()
        return None if row is None else Record(*row)

    def paths_with_sha256(self, sha256: str) -> list[str]:
        """Paths of the indexed images with these bytes."""
        return [path for (path,) in self._conn.execute(
            "SELECT path FROM images WHERE sha256 = ? AND status = 'indexed' ORDER BY id", (sha256,))]

    def paths_under(self, folders: Iterable[str]) -> list[str]:
        """Catalogued paths equal to or below any of the given absolute paths."""
        found: set[str] = set()
        for folder in folders:
            prefix = folder.rstrip(os.sep) + os.sep
            rows = self._conn.execute(
                "SELECT path FROM images WHERE path = ? OR substr(path, 1, ?) = ?", (folder, len(prefix), prefix)
            )
            found.update(path for (path,) in rows)
        return sorted(found)

    def data_version(self) -> int:
        """Changes whenever another connection commits (SQLite's PRAGMA data_version)."""
        return self._conn.execute("PRAGMA data_version").fetchone()[0]

    def segment_names(self) -> list[str]:
        return [name for (name,) in self._conn.execute("SELECT name FROM segments ORDER BY id")]

    def counts(self) -> dict[str, int]:
        counts = dict(self._conn.execute("SELECT status, count(*) FROM images GROUP BY status").fetchall())
        total_rows = self._conn.execute("SELECT coalesce(sum(rows), 0), count(*) FROM segments").fetchone()
        return {
            "indexed": counts.get("indexed", 0),
            "failed": counts.get("failed", 0),
            "segments": total_rows[1],
            "segment_rows": total_rows[0],
        }

    def snapshot(self) -> Snapshot:
        """The live images, read in one transaction so a concurrent commit is seen whole or not at all."""
        with self._read_transaction():
            segments = self._conn.execute("SELECT id, name, rows FROM segments").fetchall()
            rows = self._conn.execute(
                "SELECT id, path, segment, row, updated FROM images WHERE status = 'indexed' ORDER BY id"
            ).fetchall()
            # map the files while the read transaction pins this state: a compaction may commit
            # meanwhile (WAL), but it deletes the old files only once no reader holds an older
            # state (_remove_orphans), and a mapping stays valid after its file is unlinked
            loaded = {seg_id: self._segment(seg_id, name, n) for seg_id, name, n in segments}
            live = {name for _, name, _ in segments}
            for stale in set(self._segment_cache) - live:
                del self._segment_cache[stale]
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        paths = [r[1] for r in rows]
        segment_ids = np.fromiter((r[2] for r in rows), dtype=np.int64, count=len(rows))
        seg_rows = np.fromiter((r[3] for r in rows), dtype=np.int64, count=len(rows))
        stamps = np.fromiter((r[4] for r in rows), dtype=np.float64, count=len(rows))
        return Snapshot(ids, paths, segment_ids, seg_rows, loaded, stamps)

    def vector(self, image_id: int) -> np.ndarray | None:
        """The stored vector of one image id (None unless it is indexed). The image's row, its segment and
        the segment's file are read in one transaction, so a compaction committing meanwhile (which moves
        the row to a new segment) is seen whole or not at all."""
        with self._read_transaction():
            found = self._conn.execute(
                "SELECT s.id, s.name, s.rows, i.row FROM images i JOIN segments s ON s.id = i.segment"
                " WHERE i.id = ? AND i.status = 'indexed'", (int(image_id),)
            ).fetchone()
            if found is None:
                return None
            seg_id, name, rows, row = found
            return np.array(self._segment(seg_id, name, rows).vectors[row], dtype=np.float32)

    @contextlib.contextmanager
    def _read_transaction(self):
        """One read transaction on this connection (one at a time: the connection is shared by threads)."""
        with self._read_lock:
            self._conn.execute("BEGIN")
            try:
                yield
            finally:
                self._conn.execute("COMMIT")

    def _segment(self, seg_id: int, name: str, rows: int) -> _Segment:
        cached = self._segment_cache.get(name)
        if cached is None:
            base = self.root / SEGMENTS / name
            try:
                # plain ndarray views of the mappings: indexing a np.memmap costs ~0.25 ms of bookkeeping
                mapped = np.load(f"{base}.vectors.npy", mmap_mode="r")
                vectors = np.asarray(mapped)
                codes = np.asarray(np.load(f"{base}.codes.npy", mmap_mode="r"))
            except (OSError, ValueError) as exc:
                raise StoreError(f"segment {name} of the index at {self.root} is unreadable: {exc}") from exc
            if len(vectors) != rows or len(codes) != rows:
                raise StoreError(f"segment {name} has {len(vectors)} rows, the catalog says {rows}")
            cached = self._segment_cache[name] = _Segment(seg_id, name, rows, vectors, codes,
                                                          f"{base}.vectors.npy", int(mapped.offset),
                                                          getattr(mapped, "_mmap", None))
        return cached

    def load_graph(self) -> dict[str, np.ndarray] | None:
        """The arrays of the current neighbourhood graph (`Store.save_graph`), None if none was saved."""
        for _ in range(2):  # a writer may replace (and sweep) the graph between reading its name and opening it
            name = self.get_meta(GRAPH_META)
            if name is None:
                return None
            path = self.root / SEGMENTS / f"{name}.graph.npz"
            try:
                with np.load(path) as arrays:
                    return {key: arrays[key] for key in arrays.files}
            except FileNotFoundError:
                continue
            except (OSError, ValueError, EOFError) as exc:
                raise StoreError(f"the neighbourhood graph {path} is unreadable: {exc}") from exc
        return None

    # ---- writes --------------------------------------------------------------------------------

    @_reporting_write_errors
    def save_graph(self, arrays: dict[str, np.ndarray]) -> None:
        """Make `arrays` the current neighbourhood graph: written under a new name (temporary file, fsync,
        rename), then named in one transaction, the commit point; the replaced file goes with the orphans."""
        self._require_write()
        name = _new_segment_name()
        _write_durably(self.root / SEGMENTS / f"{name}.graph.npz", lambda f: np.savez(f, **arrays))
        fsync_dir(self.root / SEGMENTS)
        self.set_meta(GRAPH_META, name)
        self._remove_orphans()

    @_reporting_write_errors
    def commit(self, *, vectors: np.ndarray | None = None, codes: np.ndarray | None = None,
               indexed: Sequence[Record] = (), failed: Sequence[Record] = (),
               touched: Sequence[Record] = (), removed: Sequence[str] = ()) -> None:
        """Apply one batch atomically: new vectors for `indexed` (row i ↔ indexed[i]), failures,
        metadata-only updates (`touched`) and removals."""
        self._require_write()
        n = len(indexed)
        if n and (vectors is None or codes is None or len(vectors) != n or len(codes) != n):
            raise ValueError("vectors and codes must have one row per indexed record")
        name = None
        if n:
            name = _new_segment_name()
            base = self.root / SEGMENTS / name
            _write_array(Path(f"{base}.vectors.npy"), np.ascontiguousarray(vectors, dtype=VECTOR_DTYPE))
            _write_array(Path(f"{base}.codes.npy"), np.ascontiguousarray(codes))
            fsync_dir(self.root / SEGMENTS)
        now = time.time()
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            segment_id = None
            if name:
                segment_id = conn.execute(
                    "INSERT INTO segments (name, rows, created) VALUES (?, ?, ?)", (name, n, now)
                ).lastrowid
            upsert = (
                "INSERT INTO images (path, size, mtime_ns, sha256, width, height, status, error, segment, row, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(path) DO UPDATE SET"
                " size = excluded.size, mtime_ns = excluded.mtime_ns, sha256 = excluded.sha256,"
                " width = excluded.width, height = excluded.height, status = excluded.status,"
                " error = excluded.error, segment = excluded.segment, row = excluded.row, updated = excluded.updated"
            )
            conn.executemany(upsert, [
                (r.path, r.size, r.mtime_ns, r.sha256, r.width, r.height, "indexed", None, segment_id, row, now)
                for row, r in enumerate(indexed)
            ])
            conn.executemany(upsert, [
                (r.path, r.size, r.mtime_ns, r.sha256, r.width, r.height, "failed", r.error, None, None, now)
                for r in failed
            ])
            conn.executemany(
                "UPDATE images SET size = ?, mtime_ns = ?, updated = ? WHERE path = ?",
                [(r.size, r.mtime_ns, now, r.path) for r in touched],
            )
            conn.executemany("DELETE FROM images WHERE path = ?", [(p,) for p in removed])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite may have rolled back already (disk full)
                conn.execute("ROLLBACK")
            raise

    def dead_fraction(self) -> float:
        total, live = self._conn.execute(
            "SELECT (SELECT coalesce(sum(rows), 0) FROM segments), (SELECT count(*) FROM images WHERE status = 'indexed')"
        ).fetchone()
        return 0.0 if total == 0 else 1.0 - live / total

    @_reporting_write_errors
    def compact(self) -> int:
        """Copy the live rows of all segments into one new segment; returns the rows dropped."""
        self._require_write()
        before = self.counts()
        snap = self.snapshot()
        if before["segments"] <= 1 and before["segment_rows"] == len(snap):
            return 0
        order = np.argsort(snap.ids)
        old = self.segment_names()
        vectors, codes = snap.vectors(order, dtype=None), snap.codes(order)
        name = _new_segment_name()
        base = self.root / SEGMENTS / name
        if len(snap):
            _write_array(Path(f"{base}.vectors.npy"), vectors)
            _write_array(Path(f"{base}.codes.npy"), codes)
            fsync_dir(self.root / SEGMENTS)
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            if len(snap):
                new_id = conn.execute(
                    "INSERT INTO segments (name, rows, created) VALUES (?, ?, ?)", (name, len(snap), time.time())
                ).lastrowid
                conn.executemany("UPDATE images SET segment = ?, row = ? WHERE id = ?",
                                 [(new_id, row, int(i)) for row, i in enumerate(snap.ids[order])])
            conn.executemany("DELETE FROM segments WHERE name = ?", [(n,) for n in old])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # SQLite may have rolled back already (disk full)
                conn.execute("ROLLBACK")
            raise
        self._segment_cache.clear()
        self._remove_orphans()
        return before["segment_rows"] - len(snap)

    def verify(self) -> list[str]:
        """Problems found by checking the catalog against the segment files (empty when consistent)."""
        problems = []
        segments = {sid: (name, rows) for sid, name, rows in self._conn.execute("SELECT id, name, rows FROM segments")}
        for sid, (name, rows) in segments.items():
            try:
                self._segment(sid, name, rows)
            except StoreError as exc:
                problems.append(str(exc))
        for path, segment, row in self._conn.execute(
            "SELECT path, segment, row FROM images WHERE status = 'indexed'"
        ):
            if segment not in segments or not 0 <= row < segments[segment][1]:
                problems.append(f"{path} points at a missing row {segment}:{row}")
        shared = self._conn.execute(
            "SELECT count(*) FROM (SELECT segment, row FROM images WHERE status = 'indexed'"
            " GROUP BY segment, row HAVING count(*) > 1)"
        ).fetchone()[0]
        if shared:
            problems.append(f"{shared} segment rows are claimed by more than one image")
        return problems

    # ---- internals -----------------------------------------------------------------------------

    def _require_write(self) -> None:
        if not self.writable:
            raise StoreError("the index was opened read-only")

    def _remove_orphans(self) -> None:
        """Delete segment files no committed segment owns: left by a crash before a commit point, or
        dropped by a compaction.

        A reader maps a segment's files inside its read transaction, and in WAL mode that transaction
        does not stop a writer from committing a compaction. So the files are deleted only once no reader
        holds a state older than the current one: a FULL checkpoint waits (busy timeout) until every
        reader reads the latest state, in which these segments no longer exist. A reader that started
        earlier has by then mapped its files (a mapping outlives the unlink). If readers stay busy past
        the timeout, the files are left for the next writer."""
        busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(FULL)").fetchone()
        if busy:
            return
        known = set(self.segment_names()) | {self.get_meta(GRAPH_META)}
        with os.scandir(self.root / SEGMENTS) as entries:
            for entry in entries:
                made = _SEGMENT_FILE.fullmatch(entry.name)
                if made is None or not entry.is_file(follow_symlinks=False):
                    continue  # not a file this store wrote: never ours to delete
                if made["tmp"] or made["name"] not in known:
                    os.unlink(entry.path)


def _available_memory() -> int:
    """Bytes of memory available without swapping (Linux's MemAvailable, which counts the page cache the
    segments may already sit in); 0 where it is not known."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


_MAPPING_LOCK = threading.Lock()


def _map_segments(segments: list[_Segment]) -> None:
    for segment in segments:
        try:
            segment.mapping.madvise(MADV_POPULATE_READ)  # the GIL is released while the kernel works
        except (AttributeError, OSError, ValueError):  # no mapping, no madvise, or a kernel without it
            return
        segment.mapped = True


def _in_page_cache(path: str, samples: int = 32) -> bool:
    """Whether a file sits in the page cache, judged from one byte of each of `samples` places spread over
    it, read with RWF_NOWAIT (which fails rather than wait for the disk); False where that is not known."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        size, byte = os.fstat(fd).st_size, bytearray(1)
        return all(os.preadv(fd, [byte], offset, os.RWF_NOWAIT) == 1
                   for offset in np.linspace(0, max(size - 1, 0), samples).astype(np.int64).tolist())
    except (AttributeError, OSError):  # not Linux, or BlockingIOError: that byte is on the disk only
        return False
    finally:
        os.close(fd)


def _new_segment_name() -> str:
    """A new segment's file stem: time then randomness, the shape `_SEGMENT_FILE` matches."""
    return f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"


def _create_catalog(catalog: Path) -> None:
    """A new catalog with its whole schema, made under a temporary name and renamed into place (under
    the writer lock): a catalog that exists always has its tables, even when the first `index` was killed
    while creating it (readers of a half-made catalog failed with "no such table")."""
    tmp = catalog.with_name(f".{catalog.name}.{uuid.uuid4().hex[:8]}.tmp")
    conn = sqlite3.connect(tmp, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(_SCHEMA)
        conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (json.dumps(SCHEMA_VERSION),))
    finally:
        conn.close()  # the last connection checkpoints its WAL into the file
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, catalog)
    fsync_dir(catalog.parent)


def _acquire_lock(root: Path, wait: bool, on_wait: Callable[[], None] | None):
    lock_file = open(root / LOCK, "a+")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not wait:
            lock_file.close()
            raise IndexLocked(f"the index at {root} is being written by another process") from None
        if on_wait:
            on_wait()
        fcntl.flock(lock_file, fcntl.LOCK_EX)
    return lock_file


def _write_array(path: Path, array: np.ndarray) -> None:
    """Write a .npy durably under its final name: temp file, fsync, atomic rename."""
    _write_durably(path, lambda f: np.save(f, array))


def _write_durably(path: Path, write: Callable) -> None:
    """`write(file)` into a temporary file beside `path`, fsync, atomic rename to `path`."""
    tmp = path.with_name(f".tmp-{path.name}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # give the space back now (disk full), not at the next open
            os.unlink(tmp)
        raise


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or unlink inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
