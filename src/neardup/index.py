"""The Index API: the one entry point every adapter (CLI, web, Ray) uses.

    index = Index.open("photos/.neardup", create=True)
    summary = index.add(["photos"])
    index.query("photos/cat.jpg", k=5)          # [Match(path, score, id), ...] best first
    index.duplicates(threshold=0.85)            # [DuplicateGroup(files, ids, min_score, max_score), ...]

Scores are cosine similarities of the model's unit vectors: 1.0 for identical pixels, about 0.9 and up
for resized, re-encoded, cropped or recoloured copies, and much lower for different photos.
Thread-safety: queries may run concurrently with each other; writes (`add`, `remove`, `compact`) take
the index folder's lock, so one writer at a time across processes.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from . import calibration, graph as knn, lsh, neighbourhood
from .files import FileCheckError, open_regular, same_file
from .groups import GroupBuilder
from .images import NOT_UTF8, ImageError, discover, load_image, printable_path
from .store import CATALOG, Record, Snapshot, Store
from .errors import ModelMismatch, NeardupError  # noqa: F401 (re-exported)

DEFAULT_INDEX_DIR = ".neardup"
#: Images per model call on a CPU (an embedder with a `batch` attribute, the GPU one, brings its own).
DEFAULT_BATCH = 32
#: Default `duplicates` threshold: a copy probability (neardup.calibration: the share of true copies among
#: the pairs whose raw score, collection-aware or plain cosine, is as high). 0.97 is the collection-aware
#: score 0.51 and the plain cosine 0.532. The lowest raw thresholds whose groups keep pairwise precision
#: >= 0.99 on the `neardup eval` sets of seeds 1 / 2 are 0.446 / 0.450 (int8) and 0.449 / 0.489 (fp32,
#: which merges two groups under 0.49). Checked on seeds 3-6 through both: precision >= 0.996, recall
#: >= 0.958 (benchmarks/tune_scores.py, calibrate_scores.py, docs/SCORES.md). Re-calibrate if the
#: descriptor, backend or score changes.
DEFAULT_THRESHOLD = 0.97
#: Names of the built-in model's identities, earlier ones included (neardup.models.default_model.NAME).
DEFAULT_MODEL_FAMILY = "efficientnet-lite0"
NUM_TABLES = 16
STORED_BITS = lsh.MAX_BITS
LSH_SEED = 20240601
#: Buckets probed per query table (query-directed multiprobe, `lsh.directed_probes`). Measured on 200k
#: synthetic 1280-d vectors, copies planted at cosine 0.8-0.99, k = 20 (25 tables): recall 1.000 with
#: ~800 candidates per 1M vectors for centred data at 32 probes; for uncentred "cone" data (unrelated
#: cosine 0.2, like GAP vectors) 0.992 at 32 probes, 0.998 at 64 (~11,000 candidates per 1M).
#: A query starts at QUERY_PROBES and probes DEEPEN times as many buckets only when its best match stays
#: under DEEPEN_BELOW: at 1M photo-like vectors every copy 16 probes missed was in a query whose best match
#: was 0.43-0.67 (RESULTS, "The query in one pass"); a query that finds its copy reads half the buckets.
QUERY_PROBES = 16
QUERY_PROBES_UNCENTRED = 64
DEEPEN = 2
DEEPEN_BELOW = 0.8
#: Up to this many images a query scans every vector (exact, and about as fast as the tables).
EXACT_SCAN_MAX = 10_000
#: Candidates closest in Hamming distance that a query re-ranks by exact cosine, with the nearest files
#: (k-NN graph) of the QUERY_EXPAND closest: a copy missed by the tables is found through its original.
#: Every row read is one random read and a float16 conversion, so they are read and scored in one pass
#: (benchmarks/RESULTS.md, "The query in one pass"). The first pass reads the closest SHORTLIST (at least
#: k; the long shortlist where the index has no current graph). The deeper pass of a query with no
#: convincing match reads SHORTLIST_PER_MATCH per match asked for: with 1 or 2, a hard query of the seed-3
#: eval set lost its original (recall@10 0.997). A query that found a convincing match has its copies in
#: that match's graph neighbourhood, so 12 rows do (RESULTS, "A short first pass": 1M photos, 0.87 -> 0.78
#: ms p50 at the same recall).
SHORTLIST = 12
SHORTLIST_PER_MATCH = 4
QUERY_EXPAND = 1
#: Stored vectors are kept in memory as normalised float32 for exact scans up to this many bytes.
DENSE_CACHE_BYTES = 128 << 20
COMPACT_DEAD_FRACTION = 0.3
COMPACT_MAX_SEGMENTS = 64


@dataclass(frozen=True, slots=True)
class Match:
    path: str
    score: float
    id: int


@dataclass(frozen=True)
class DuplicateGroup:
    files: list[str]
    ids: list[int]
    # the weakest and strongest link's copy probability (neardup.calibration), what the threshold applied
    # to; min/max_cosine are the same links' plain cosines
    min_score: float
    max_score: float
    min_cosine: float
    max_cosine: float


@dataclass
class AddSummary:
    """Counts of one `add` run; `failures` lists (path, reason) for every file that could not be indexed."""

    discovered: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    identical: int = 0
    failed: int = 0
    removed: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    aliases: list[tuple[str, str]] = field(default_factory=list)
    """(new path, catalogued path) of new paths that reach an already catalogued file (same device and
    inode: a symlinked folder, a bind mount or a hard link): not catalogued a second time."""


@dataclass
class MergeSummary:
    """Counts of one `merge` run: rows read, and what they did to the catalog."""

    shards: int = 0
    rows: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    stale: int = 0
    failed: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)


ProgressCallback = Callable[[int, int, int], None]  # (done, total, failed)


@dataclass
class _Prepared:
    """One file after the worker looked at it. action: 'unchanged' (same size and mtime), 'touch' (new
    mtime, same bytes), 'embed' (new or changed content: `pixels` holds the model input) or 'failed'."""

    action: str
    record: Record
    known: Record | None
    pixels: np.ndarray | None = None


class Index:
    def __init__(self, root: Path, embedder=None):
        self.root = root
        self._embedder = embedder
        self._reader = Store.open(root)
        self._search_cache: _SearchState | None = None
        self._search_lock = threading.Lock()
        self._planes: np.ndarray | None = None
        self._center: np.ndarray | None = None

    # ---- lifecycle -------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike | None = None, *, create: bool = False, embedder=None) -> "Index":
        """Open the index folder (default: $NEARDUP_INDEX or ./.neardup); `create` makes it if missing."""
        root = Path(path or os.environ.get("NEARDUP_INDEX") or DEFAULT_INDEX_DIR).absolute()
        if create and not (root / CATALOG).exists():
            Store.open(root, create=True, write=True).close()
        return cls(root, embedder)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> "Index":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def embedder(self):
        if self._embedder is None:
            from .models import load_embedder

            # $NEARDUP_BACKEND or auto: every backend gives vectors of the same identity (neardup.models)
            self._embedder = load_embedder()
        return self._embedder

    # ---- writing -------------------------------------------------------------------------------

    def add(self, paths: Iterable[str | os.PathLike], *, batch_size: int | None = None, prune: bool = False,
            progress: ProgressCallback | None = None, workers: int | None = None,
            commit_every: int = 512, wait: bool = True, on_wait: Callable[[], None] | None = None,
            graph_progress: knn.Progress | None = None) -> AddSummary:
        """Index image files and folders (recursively). Unchanged files are skipped (size + mtime, then
        sha256), changed ones re-embedded, byte-identical copies share the already computed vector, and
        undecodable files are recorded with a reason. With `prune`, catalogued files under the given
        folders that no longer exist are removed. `batch_size` images go to the model per call (default:
        the embedder's own `batch`, e.g. 256 on a GPU, else 32). Then the k-NN graph is brought up to date
        (`graph_progress(stage, done, total)`). Raises FileNotFoundError for a missing path."""
        batch_size = batch_size or getattr(self.embedder, "batch", None) or DEFAULT_BATCH
        roots = [os.path.abspath(p) for p in paths]
        found = discover(roots)
        summary = AddSummary(discovered=len(found.files), skipped=len(found.skipped),
                             skipped_files=[printable_path(str(p)) for p in found.skipped],
                             failures=[(printable_path(str(folder)), f"cannot list folder: {reason}")
                                       for folder, reason in found.errors])
        summary.failed = len(summary.failures)
        files, misnamed = [], []
        for path in found.files:  # names that are not valid UTF-8 are recorded as failed, never read
            (files if printable_path(str(path)) == str(path) else misnamed).append(path)
        with Store.open(self.root, create=True, write=True, wait=wait, on_wait=on_wait) as store:
            self._check_model(store, initialise=True)
            planes, center = self._lsh_state(store)
            batch = _Batch(store, self.embedder, planes, center, commit_every)
            total = len(found.files)
            for path in map(str, misnamed):
                summary.failed += 1
                summary.failures.append((printable_path(path), NOT_UTF8))
                failure = _misnamed_record(path)
                if failure is not None:
                    batch.failed.append(failure)
            done = len(misnamed)
            for item in self._prepare_all(store, files, workers, lookahead=2 * batch_size):
                done += 1
                record, known = item.record, item.known
                if item.action == "failed":
                    summary.failed += 1
                    summary.failures.append((record.path, record.error or "unknown error"))
                    batch.failed.append(record)
                elif item.action == "unchanged":
                    summary.unchanged += 1
                elif item.action == "touch":
                    summary.unchanged += 1
                    batch.touched.append(record)
                elif known is None and (alias := batch.alias_of(record)) is not None:
                    summary.aliases.append((record.path, alias))
                else:
                    copy_of = batch.vector_for_sha256(record.sha256)
                    if copy_of is not None:
                        summary.identical += 1
                        batch.add_vector(record, copy_of)
                    else:
                        batch.add_pixels(record, item.pixels, batch_size)
                    if known is None or known.status == "failed":
                        summary.added += 1
                    else:
                        summary.updated += 1
                batch.maybe_commit()
                if progress:
                    progress(done, total, summary.failed)
            if prune:  # catalog spellings: a misnamed file is catalogued under its printable path
                existing = {printable_path(str(f)) for f in found.files}
                unlisted = tuple(printable_path(str(folder)).rstrip(os.sep) + os.sep for folder, _ in found.errors)
                gone = [p for p in store.paths_under(map(printable_path, roots))
                        if p not in existing and not p.startswith(unlisted) and not os.path.exists(p)]
                batch.removed.extend(gone)
                summary.removed = len(gone)
            batch.flush()
            finish_write(store, graph_progress)
        return summary

    def remove(self, paths: Iterable[str | os.PathLike], *, wait: bool = True,
               on_wait: Callable[[], None] | None = None) -> int:
        """Forget the given files, or every catalogued file under the given folders. Returns the count."""
        targets = [printable_path(os.path.abspath(p)) for p in paths]  # the catalog's spelling
        with Store.open(self.root, write=True, wait=wait, on_wait=on_wait) as store:
            gone = store.paths_under(targets)
            store.commit(removed=gone)
            finish_write(store)
        return len(gone)

    def compact(self) -> int:
        with Store.open(self.root, write=True) as store:
            dropped = store.compact()
            update_graph(store)
            return dropped

    def merge(self, shards: Iterable[str], *, progress: ProgressCallback | None = None, wait: bool = True,
              on_wait: Callable[[], None] | None = None, commit_rows: int = 1 << 16) -> "MergeSummary":
        """Import Parquet shards written by a distributed run (neardup.shards): idempotent, so merging
        the same shards again adds nothing. Whole shards are committed together once `commit_rows`
        rows changed (one segment each time, not one per shard); a crash loses only the uncommitted
        shards, which the next merge imports. Every shard's format and model are checked before
        anything is written; vectors are hashed here with the index's own planes.
        progress(done_shards, total_shards, failed_rows)."""
        from . import shards as shard_io

        files = shard_io.shard_files(shards)
        footers = [shard_io.read_footer(path) for path in files]  # the one read of each footer
        summary = MergeSummary(shards=len(files))
        with Store.open(self.root, create=True, write=True, wait=wait, on_wait=on_wait) as store:
            self._check_model(store, initialise=True)
            identity = store.get_meta("model")
            for path, model in zip(files, (footer.model for footer in footers)):
                if model != identity:
                    raise shard_io.ShardError(f"{path} was made with another model than the index at {self.root}: "
                                              f"{identity_difference(model, identity)}")
            planes, center = self._lsh_state(store)
            pending: list = []  # plans of shards read since the last commit
            waiting: dict[str, Record] = {}  # their rows by path: what the catalog will say once committed

            def commit() -> None:
                indexed = [r for plan in pending for r in plan.indexed]
                vectors = np.concatenate([plan.vectors for plan in pending]) if indexed else None
                codes = lsh.hash_vectors(vectors, planes, NUM_TABLES, center) if indexed else None
                store.commit(vectors=vectors, codes=codes, indexed=indexed,
                             failed=[r for plan in pending for r in plan.failed],
                             touched=[r for plan in pending for r in plan.touched])
                pending.clear(), waiting.clear()

            for done, (path, footer) in enumerate(zip(files, footers), 1):
                shard = shard_io.read_shard(path, footer)
                plan = shard_io.plan_merge(shard, lambda p: waiting.get(p) or store.record(p))
                pending.append(plan)
                waiting.update((r.path, r) for r in plan.indexed + plan.failed + plan.touched)
                summary.rows += len(shard.records)
                summary.added += plan.added
                summary.updated += plan.updated
                summary.unchanged += plan.unchanged
                summary.stale += plan.stale
                summary.failed += len(plan.failed)
                summary.failures.extend((r.path, r.error or "unknown error") for r in plan.failed)
                if sum(len(plan.indexed) + len(plan.failed) + len(plan.touched) for plan in pending) >= commit_rows:
                    commit()
                if progress:
                    progress(done, len(files), summary.failed)
            if pending:
                commit()
            finish_write(store)
        return summary

    def snapshot(self) -> Snapshot:
        """The indexed images (ids, paths, vectors, codes) as of now, for adapters that move them elsewhere."""
        return self._reader.snapshot()

    def record(self, path: str) -> Record | None:
        """The catalog record of one path (as given: absolute path or URL), indexed or failed; None if unknown."""
        return self._reader.record(path)

    # ---- reading -------------------------------------------------------------------------------

    def embed(self, source) -> np.ndarray:
        """The unit vector of one image (a path, raw bytes, or a PIL image). Raises ImageError."""
        from PIL import Image

        image = source if isinstance(source, Image.Image) else load_image(source, min_side=self.embedder.input_size).image
        return self.embedder.embed(self.embedder.preprocess(image.convert("RGB"))[None])[0]

    def query(self, image, k: int = 10, threshold: float | None = None, *, exact: bool | None = None,
              exclude_self: bool = True) -> list[Match]:
        """The k indexed images most similar to `image` (path, bytes or PIL image), best first.
        With a threshold only matches scoring at least that much are kept. A path that is itself indexed
        is left out of its own results unless `exclude_self` is False. `exact`: None picks (a full scan
        up to EXACT_SCAN_MAX images, the LSH tables above), True scans every vector, False always uses
        the LSH tables."""
        self._check_model(self._reader, initialise=False)
        vector = self.embed(image)
        exclude = os.path.abspath(image) if exclude_self and isinstance(image, (str, os.PathLike)) else None
        return self.query_vector(vector, k + (exclude is not None), threshold, exact=exact, exclude=exclude)[:k]

    def query_vector(self, vector: np.ndarray, k: int = 10, threshold: float | None = None, *,
                     exact: bool | None = None, exclude: str | None = None) -> list[Match]:
        """The k indexed images whose stored vectors are most similar to `vector`, best first.
        LSH path: each query table probed at its likeliest buckets (query-directed multiprobe, one
        vectorised CSR lookup for all tables), the candidates ranked by Hamming distance over all 512
        stored bits, the closest SHORTLIST (at least k) and the graph's nearest files of the closest one
        re-ranked by exact cosine of the stored (float16) vectors; twice the buckets and a longer shortlist
        when no match reaches DEEPEN_BELOW. `exact`: as in `query`."""
        state = self._search_state()
        snap = state.snap
        if len(snap) == 0:
            return []
        vector = np.asarray(vector, dtype=np.float32)
        norm = float(np.sqrt(vector @ vector))
        vector = vector / norm if norm > 0 else vector
        if exact is None:
            exact = len(snap) <= EXACT_SCAN_MAX
        if not exact and state.tables is None:
            state = self._search_state(build_tables=True)  # snapshot and tables of one moment
            snap = state.snap
        if exact or state.tables is None:
            positions, scores = _exact_top_k(state, vector, k)
        else:
            planes, center = self._lsh_state(self._reader)
            projections = lsh.project(vector[None], planes, center)[0]
            probes = QUERY_PROBES if center is not None else QUERY_PROBES_UNCENTRED
            graph = self._query_graph(state)
            long_shortlist = max(SHORTLIST, SHORTLIST_PER_MATCH * k)
            # without the graph's neighbourhoods, a convincing match's other copies come from the shortlist alone
            first = max(SHORTLIST, k) if graph is not None and QUERY_EXPAND else long_shortlist
            positions, scores = _lsh_scored(state, graph, vector, projections, probes, first)
            best = lsh.top_k(scores, k)
            if not len(best) or scores[best[0]] < DEEPEN_BELOW:  # no convincing match: the tables may have missed it
                positions, scores = _lsh_scored(state, graph, vector, projections, probes * DEEPEN, long_shortlist,
                                                scored=(positions, scores))
                best = lsh.top_k(scores, k)
            positions, scores = positions[best], scores[best]
        positions, ids = np.asarray(positions), snap.ids[positions].tolist()
        scores = np.asarray(scores, dtype=np.float64).tolist()
        matches = [Match(snap.paths[p], s, i) for p, s, i in zip(positions.tolist(), scores, ids)]
        return [m for m in matches if (threshold is None or m.score >= threshold) and m.path != exclude]

    def _query_graph(self, state: "_SearchState") -> knn.Graph | None:
        """The stored k-NN graph for the query path, if it is current (a stale one is not brought up to
        date for a query: that is a writer's work); read once per committed state."""
        with self._search_lock:
            if state.graph is None and not state.graph_checked:
                state.graph_checked = True
                stored = stored_graph(self._reader)
                if stored is not None and knn.current(stored, state.snap.ids, state.snap.stamps):
                    state.graph = stored
            return state.graph

    def duplicates(self, threshold: float = DEFAULT_THRESHOLD, *, exact: bool = False,
                   collection_aware: bool = True, snapshot: Snapshot | None = None,
                   join: "PairJoin | None" = None) -> list[DuplicateGroup]:
        """Groups of indexed images linked by pairs whose copy probability (neardup.calibration) is >=
        threshold, in (0, 1]; largest groups first. The probability is that of the raw score: collection-
        aware (`neighbourhood`: cosine lowered by both files' K-th neighbour similarity) in a collection of
        at least neighbourhood.MIN_FILES files, else the cosine (also with `collection_aware=False`).
        Pairs and b come from the k-NN graph the index keeps (`graph_pairs`, neardup.graph), merged with
        union-find; `exact` compares every pair instead (the oracle; O(n²)). `join`: the crowded files' join
        (see graph_pairs; the Ray path passes its own). `snapshot`, when given, must be current."""
        self._check_threshold_model()
        state = self._current_state(snapshot)  # one committed state throughout, whatever a writer commits meanwhile
        snap = state.snap
        aware = collection_aware and neighbourhood.applies(len(snap))
        raw = raw_threshold(threshold, aware)
        if not exact:
            # the links are folded into the groups as found: at a million crowded photos they are tens of millions
            backgrounds = neighbourhood.backgrounds(self._graph_of(state).kth()) if aware else None
            return duplicate_groups(snap, self._link_chunks(state, raw, aware, join), backgrounds=backgrounds, raw=raw)
        a, b, cosines = _exact_pairs(snap, neighbourhood.join_threshold(raw) if aware else raw)
        backgrounds = self.backgrounds(np.union1d(a, b), exact=True, snapshot=snap) if aware else None
        return duplicate_groups(snap, [(a, b, cosines)], backgrounds=backgrounds, raw=raw)

    def graph(self, snapshot: Snapshot | None = None) -> knn.Graph:
        """The k-NN graph (neardup.graph) of the current images: the one `index` stored, brought up to date
        in memory if a writer was interrupted before saving it. `snapshot`, when given, must be current
        (else NeardupError: the index changed meanwhile)."""
        return self._graph_of(self._current_state(snapshot))

    def _current_state(self, snapshot: Snapshot | None) -> "_SearchState":
        """The search state, which must be the one of `snapshot` when one is given."""
        state = self._search_state()
        if snapshot is not None and snapshot is not state.snap and not np.array_equal(snapshot.ids, state.snap.ids):
            raise NeardupError("the index changed while dups ran; run it again")
        return state

    def _graph_of(self, state: "_SearchState") -> knn.Graph:
        with self._search_lock:
            if state.graph is None:
                state.graph = current_graph(state.snap, stored_graph(self._reader))
            return state.graph

    def graph_pairs(self, threshold: float, *, aware: bool, snapshot: Snapshot | None = None,
                    join: "PairJoin | None" = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every pair (snapshot positions a < b, cosine) that links at the raw score `threshold` (see
        raw_threshold; a probability is `duplicates`' threshold, not this one; collection-aware: its score
        with the graph's b reaches the threshold, dropped as found so they never pile up): the pairs the graph
        lists at the join cosine, plus the pairs no list can hold. A pair is missing from both lists only
        when each file has KEEP neighbours at least as close; such a pair links only if its cosine c
        reaches c* = the threshold (plain cosine) or max(COSINE_FLOOR, threshold + B_MAX - OFFSET) (the
        collection-aware score, whose b is then B_MAX for both), so the "crowded" files, those whose
        KEEP-th neighbour reaches c*, are joined among themselves at c* by an exact scan (`join(vectors, c*)`,
        default graph.pair_chunks_above: chunks of pairs of rows of their normalised vectors; the Ray path
        passes its own). In the exact regime this gives every pair `--exact` links. `snapshot`, when given,
        must be current."""
        return knn.concatenated(self._link_chunks(self._current_state(snapshot), threshold, aware, join))

    def _link_chunks(self, state: "_SearchState", threshold: float, aware: bool, join=None
                     ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """graph_pairs' pairs a chunk at a time (a < b, cosine), each once: a pair the graph lists comes
        with the graph's cosine, the crowded join's finding of it dropped (its product may differ in the
        last bits, and the score ranges must not depend on which path found a pair)."""
        snap, graph = state.snap, self._graph_of(state)
        listed = neighbourhood.join_threshold(threshold) if aware else threshold
        hidden = max(neighbourhood.COSINE_FLOOR, threshold + neighbourhood.B_MAX - neighbourhood.OFFSET) if aware else threshold
        links = None
        if aware:  # only the pairs whose collection-aware score reaches the threshold are kept, as found
            backgrounds = neighbourhood.backgrounds(graph.kth())

            def links(a, b, cosines):
                return neighbourhood.normalised(cosines, backgrounds[a], backgrounds[b]) >= threshold

        yield from graph.pair_chunks(listed, keep=links)
        crowded = np.flatnonzero(graph.similarities[:, knn.KEEP - 1] >= hidden) if len(graph) else np.empty(0, np.int64)
        if len(crowded) < 2:
            return
        join = join or knn.pair_chunks_above
        for ca, cb, cs in join(lsh.normalise_rows(snap.read_vectors(crowded)), hidden):
            ca, cb, cs = crowded[ca], crowded[cb], cs.astype(np.float32)
            new = ~graph.lists(ca, cb, listed)
            ca, cb, cs = ca[new], cb[new], cs[new]
            if links is not None:
                wanted = links(ca, cb, cs)
                ca, cb, cs = ca[wanted], cb[wanted], cs[wanted]
            yield ca, cb, cs

    def backgrounds(self, positions: np.ndarray | None = None, *, exact: bool = False,
                    snapshot: Snapshot | None = None) -> np.ndarray:
        """b (neighbourhood.backgrounds: the cosine to the K-th nearest other file, clipped) of the snapshot
        positions asked for, in an array over every position. From the stored k-NN graph: exact in its exact
        regime (up to graph.EXACT_MAX files), else a lower bound of the exact b; with `exact`, such values
        are replaced by an exact scan's (kept with the search state until the collection changes).
        `snapshot`, when given, must be the state's (else NeardupError: the index changed meanwhile)."""
        values, _ = self._backgrounds(positions, exact=exact, snapshot=snapshot)
        return values

    def _backgrounds(self, positions: np.ndarray | None, *, exact: bool,
                     snapshot: Snapshot | None) -> tuple[np.ndarray, np.ndarray]:
        """(b over every position, NaN where unknown; which of them are exact)."""
        state = self._current_state(snapshot)
        graph = self._graph_of(state)
        snap = state.snap
        positions = np.arange(len(snap)) if positions is None else np.asarray(positions, dtype=np.int64)
        with self._search_lock:
            if state.exact_backgrounds is None:
                state.exact_backgrounds = np.full(len(snap), np.nan)
                if graph.exact:
                    state.exact_backgrounds[:] = neighbourhood.backgrounds(graph.kth())
            missing = positions[np.isnan(state.exact_backgrounds[positions])] if exact else positions[:0]
        if len(missing):
            kth = self._kth_exact(state, missing)
            with self._search_lock:
                state.exact_backgrounds[missing] = neighbourhood.backgrounds(kth)
        with self._search_lock:
            is_exact = ~np.isnan(state.exact_backgrounds)
            values = np.where(is_exact, state.exact_backgrounds,
                              np.nan if exact else neighbourhood.backgrounds(graph.kth()))
        return values, is_exact

    @staticmethod
    def _kth_exact(state: "_SearchState", rows: np.ndarray) -> np.ndarray:
        dense = state.dense()
        if dense is not None:
            return neighbourhood.kth_exact(dense, neighbourhood.K, rows=rows)
        # too large to hold as float32: scan the mapped float16 vectors, a block of columns at a time
        snap, k = state.snap, neighbourhood.K
        out = np.zeros(len(rows))
        row_block, column_block = 2048, 1 << 15
        for first in range(0, len(rows), row_block):
            chunk = rows[first:first + row_block]
            queries = lsh.normalise_rows(snap.vectors(chunk, dtype=None)).astype(np.float32)
            best = np.full((len(chunk), k), -np.inf, dtype=np.float32)
            for start in range(0, len(snap), column_block):
                columns = np.arange(start, min(start + column_block, len(snap)))
                sims = queries @ lsh.normalise_rows(snap.vectors(columns, dtype=None)).astype(np.float32).T
                own = (chunk >= start) & (chunk < start + len(columns))
                sims[np.flatnonzero(own), chunk[own] - start] = -np.inf  # a file is not its own neighbour
                best = -np.partition(-np.concatenate([best, sims], axis=1), k - 1, axis=1)[:, :k]
            kth = best.min(axis=1)
            out[first:first + len(chunk)] = np.where(np.isfinite(kth), kth, 0.0)
        return out

    def stats(self) -> dict:
        counts = self._reader.counts()
        return {
            "index": str(self.root),
            "images": counts["indexed"],
            "failed": counts["failed"],
            "segments": counts["segments"],
            "dead_rows": counts["segment_rows"] - counts["indexed"],
            "model": self._reader.get_meta("model"),
            "lsh": self._reader.get_meta("lsh"),
            "bytes_on_disk": sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file()),
        }

    def failures(self) -> list[tuple[str, str]]:
        return [(r.path, r.error or "") for r in self._reader.records(status="failed")]

    def image(self, image_id: int) -> Record | None:
        """The catalog record (path, size, dimensions, status) of one image id; None if unknown."""
        return self._reader.record_by_id(int(image_id))

    def similarity(self, a: int, b: int) -> float | None:
        """Cosine of the stored vectors of two indexed image ids; None unless both are indexed."""
        va, vb = (self._reader.vector(int(i)) for i in (a, b))
        if va is None or vb is None:
            return None
        # float16 on disk: renormalise like the search does
        return float(np.dot(va, vb) / max(float(np.linalg.norm(va) * np.linalg.norm(vb)), 1e-12))

    def version(self) -> int:
        """Changes whenever a writer commits: the key for caching anything derived from the index."""
        return self._reader.data_version()

    # ---- internals -----------------------------------------------------------------------------

    def _check_threshold_model(self) -> None:
        """The default threshold and every score's meaning belong to one model: `dups` on an index of the
        default model's earlier weights is refused as a query is, without loading the model. (An index
        of a custom model is checked against its embedder where one is given.)"""
        stored = self._reader.get_meta("model") or {}
        if self._embedder is not None:
            self._check_model(self._reader, initialise=False)
        elif str(stored.get("name", "")).startswith(DEFAULT_MODEL_FAMILY):
            from .models import default_model

            self._check_model(self._reader, initialise=False, identity=default_model.identity())

    def _check_model(self, store: Store, *, initialise: bool, identity: dict | None = None) -> None:
        stored = store.get_meta("model")
        identity = identity or self.embedder.identity
        if stored is None:
            if initialise:
                planes = lsh.make_planes(identity["dim"], NUM_TABLES, STORED_BITS, LSH_SEED)
                store.save_planes(planes)
                center = getattr(self.embedder, "center", None)
                store.set_meta("lsh", {"tables": NUM_TABLES, "bits": STORED_BITS, "seed": LSH_SEED,
                                       "center": None if center is None else [float(x) for x in center]})
                store.set_meta("model", identity)
            return
        if stored != identity:
            raise ModelMismatch(
                f"the index at {self.root} was built with another model than this run uses: "
                f"{identity_difference(stored, identity)}. Rebuild it: run `neardup index` with a new --index "
                f"folder (or delete {self.root} first); vectors of two models are never mixed."
            )

    def _lsh_state(self, store: Store) -> tuple[np.ndarray, np.ndarray | None]:
        """The hyperplanes and center, fixed when the index was created (read once: queries need them)."""
        if self._planes is None:
            center = (store.get_meta("lsh") or {}).get("center")
            self._center = None if center is None else np.asarray(center, dtype=np.float32)
            self._planes = store.load_planes()
        return self._planes, self._center

    def _search_state(self, build_tables: bool = False) -> "_SearchState":
        """The live snapshot and (on demand) its query tables, rebuilt only when a writer committed since."""
        with self._search_lock:
            version = self._reader.data_version()
            if self._search_cache is None or self._search_cache.version != version:
                self._search_cache = _SearchState(version, self._reader.snapshot())
            state = self._search_cache
            if build_tables and state.tables is None and len(state.snap):
                codes = state.snap.codes()
                state.words = lsh.code_words(codes)
                state.tables = lsh.LSHTables(codes, query_bits(len(state.snap)))
                state.dense()  # the rows the queries read, held or mapped now, not by the first query
            return state

    def _prepare_all(self, store: Store, files: Sequence[Path], workers: int | None, lookahead: int = 0):
        """Yield a _Prepared per file, in order; reading, hashing and decoding run in worker processes or
        threads (neardup.decode), overlapping inference. `lookahead` files (at least two model batches)
        are kept in flight so the workers never wait for the model to finish."""
        from .decode import prepare_files

        yield from prepare_files(files, store.record, self.embedder, _prepare_file, _failed, workers, lookahead)


def finish_write(store: Store, graph_progress: knn.Progress | None = None) -> None:
    """What every writer (add, remove, merge, actions) does before it lets go of the index: compact if the
    write left too many dead rows or segments, then bring the neighbourhood graph up to date."""
    if store.dead_fraction() > COMPACT_DEAD_FRACTION or store.counts()["segments"] > COMPACT_MAX_SEGMENTS:
        store.compact()
    update_graph(store, graph_progress)


def update_graph(store: Store, progress: knn.Progress | None = None) -> knn.Graph:
    """Bring the stored k-NN graph (neardup.graph) to the store's current images and save it, unless it
    is current. It is saved after the images' own commit: a crash between the two leaves the previous
    graph, which every reader brings up to date in memory (`current_graph`) and the next writer saves."""
    snap = store.snapshot()
    stored = stored_graph(store)
    graph = current_graph(snap, stored, progress)
    if graph is not stored:
        store.save_graph(graph.arrays())
    return graph


def stored_graph(store: Store) -> knn.Graph | None:
    arrays = store.load_graph()
    try:
        return None if arrays is None else knn.Graph.from_arrays(arrays)
    except (KeyError, ValueError):  # written by another version of neardup: rebuilt
        return None


def current_graph(snap: Snapshot, graph: knn.Graph | None, progress: knn.Progress | None = None) -> knn.Graph:
    """`graph` (or nothing) brought to the snapshot's images: incremental when there is one."""
    def rows(positions: np.ndarray) -> np.ndarray:
        return lsh.normalise_rows(snap.vectors(positions, dtype=None))

    if graph is None:
        return knn.build(snap.ids, snap.stamps, rows, progress=progress)
    return knn.update(graph, snap.ids, snap.stamps, rows, progress=progress)


def query_bits(n: int) -> int:
    """Bits per query table: about log2 n (8 to 20), so a table holds ~1 row per bucket and a probe
    costs ~1 random candidate: (512 // k) tables x QUERY_PROBES probes, ~800 random candidates for
    centred vectors whatever n (8 buckets per row more for uncentred GAP vectors)."""
    return min(lsh.MAX_TABLE_BITS, max(8, math.ceil(math.log2(max(n, 2)))))


def raw_threshold(probability: float, aware: bool) -> float:
    """The raw score (collection-aware, or plain cosine) a pair needs to reach copy probability
    `probability`; NeardupError outside (0, 1]."""
    try:
        return calibration.raw_threshold(probability, aware)
    except ValueError as exc:
        raise NeardupError(str(exc)) from None


#: The crowded files' join: (their normalised vectors, cosine) -> chunks of (row a, row b, cosine), a < b.
PairJoin = Callable[[np.ndarray, float], Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]]


def duplicate_groups(snap: Snapshot, chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], *,
                     backgrounds: np.ndarray | None = None, raw: float | None = None) -> list[DuplicateGroup]:
    """Verified pairs (snapshot positions a, b and their cosines, a chunk at a time; a pair may come twice)
    merged into groups of paths and catalog ids, largest first, each link scored by its copy probability.
    With `backgrounds` the pairs are scored collection-aware and those under the raw score `raw` dropped;
    without, they are plain-cosine pairs already at the threshold."""
    aware = backgrounds is not None
    builder = GroupBuilder(len(snap))
    for a, b, cosines in chunks:
        scores = cosines
        if aware:
            scores = neighbourhood.normalised(cosines, backgrounds[a], backgrounds[b])
            keep = scores >= raw
            a, b, scores, cosines = a[keep], b[keep], scores[keep], cosines[keep]
        builder.add(a, b, calibration.probability(scores, aware), cosines)
    return [
        DuplicateGroup([snap.paths[p] for p in g.members], [int(snap.ids[p]) for p in g.members],
                       g.min_score, g.max_score, g.min_cosine, g.max_cosine)
        for g in builder.groups()
    ]


def identity_difference(theirs: dict, ours: dict) -> str:
    """The model identity entries that differ, as 'key: theirs (here: ours)', hashes shortened."""
    def shown(value) -> str:
        text = str(value)
        return text[:12] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text

    keys = [k for k in dict.fromkeys([*theirs, *ours]) if theirs.get(k) != ours.get(k)]
    return "; ".join(f"{k} {shown(theirs.get(k, 'absent'))} (here: {shown(ours.get(k, 'absent'))})" for k in keys)


def _misnamed_record(path: str) -> Record | None:
    """The failure record of a file whose name is not valid UTF-8, under its printable spelling; None
    (reported in the summary only) when that spelling is itself the name of a file, which must not be
    confused with this one."""
    spelling = printable_path(path)
    if os.path.lexists(spelling):
        return None
    try:
        stat = os.stat(path)
    except OSError:
        return Record(spelling, 0, 0, status="failed", error=NOT_UTF8)
    return Record(spelling, stat.st_size, stat.st_mtime_ns, status="failed", error=NOT_UTF8)


def _failed(path: str, known: Record | None, reason: str, size: int = 0, mtime_ns: int = 0,
            sha256: str | None = None) -> _Prepared:
    return _Prepared("failed", Record(path, size, mtime_ns, sha256, status="failed", error=reason), known)


def _prepare_file(path: str, known: Record | None, input_size: int, preprocess) -> _Prepared:
    try:
        stat = os.stat(path)
        if known is not None and known.size == stat.st_size and known.mtime_ns == stat.st_mtime_ns:
            return _Prepared("unchanged", known, known)
        # the safe open: a FIFO or device swapped in since discovery is refused, never waited on;
        # symlinked files are followed on purpose (discovery includes them)
        with open_regular(path, follow_symlinks=True) as f:
            stat = os.fstat(f.fileno())  # the file read is the file whose size and mtime are recorded
            data = f.read()
    except FileCheckError as exc:
        return _failed(path, known, str(exc))
    except OSError as exc:
        return _failed(path, known, f"cannot read file: {exc.strerror or exc}")
    return _prepare_bytes(path, data, stat.st_mtime_ns, known, input_size, preprocess)


def _prepare_bytes(path: str, data: bytes, mtime_ns: int, known: Record | None, input_size: int,
                   preprocess) -> _Prepared:
    """The bytes of one file -> its record and model input (shared with the Ray path, which reads
    files from other filesystems, so both decode and hash exactly alike)."""
    size = len(data)
    sha256 = hashlib.sha256(data).hexdigest()
    if known is not None and known.sha256 == sha256 and known.status == "indexed":
        return _Prepared("touch", Record(path, size, mtime_ns, sha256, known.width, known.height), known)
    try:
        decoded = load_image(data, min_side=input_size)
        pixels = preprocess(decoded.image)
    except ImageError as exc:
        return _failed(path, known, exc.reason, size, mtime_ns, sha256)
    return _Prepared("embed", Record(path, size, mtime_ns, sha256, decoded.width, decoded.height), known, pixels)


class _Batch:
    """Work waiting for the next commit: embedded rows, failures, metadata updates, removals."""

    def __init__(self, store: Store, embedder, planes, center, commit_every: int):
        self.store, self.embedder, self.planes, self.center = store, embedder, planes, center
        self.commit_every = commit_every
        self.records: list[Record] = []
        self.vectors: list[np.ndarray | None] = []  # None until the pixels waiting at that slot are embedded
        self.waiting: list[tuple[int, np.ndarray]] = []
        self.by_sha256: dict[str, int] = {}
        self.failed: list[Record] = []
        self.touched: list[Record] = []
        self.removed: list[str] = []

    def vector_for_sha256(self, sha256: str) -> np.ndarray | int | None:
        """A vector (or a slot of this batch) already computed for identical bytes, if any."""
        if sha256 in self.by_sha256:
            return self.by_sha256[sha256]
        existing = self.store.indexed_with_sha256(sha256)
        return None if existing is None else self.store.vector(existing.id)

    def alias_of(self, record: Record) -> str | None:
        """A catalogued path (or one waiting in this batch) that is the same file as `record.path`
        (same device and inode). Such a path has the same bytes, so only paths with its sha256 are
        compared."""
        waiting = [r.path for r in self.records if r.sha256 == record.sha256] if record.sha256 in self.by_sha256 else []
        candidates = waiting + self.store.paths_with_sha256(record.sha256)
        return next((path for path in candidates if path != record.path and same_file(path, record.path)), None)

    def add_vector(self, record: Record, vector: np.ndarray | int) -> None:
        self.by_sha256.setdefault(record.sha256, len(self.records))
        self.records.append(record)
        self.vectors.append(vector)

    def add_pixels(self, record: Record, pixels: np.ndarray, batch_size: int) -> None:
        self.by_sha256[record.sha256] = len(self.records)
        self.waiting.append((len(self.records), pixels))
        self.records.append(record)
        self.vectors.append(None)
        if len(self.waiting) >= batch_size:
            self._embed_waiting()

    def _embed_waiting(self) -> None:
        if not self.waiting:
            return
        slots, pixels = zip(*self.waiting)
        embedded = self.embedder.embed(np.stack(pixels))
        for slot, vector in zip(slots, embedded):
            self.vectors[slot] = vector
        self.waiting = []

    def maybe_commit(self) -> None:
        if len(self.records) + len(self.failed) + len(self.touched) >= self.commit_every:
            self.flush()

    def flush(self) -> None:
        self._embed_waiting()
        # slots that copy an earlier slot of this batch resolve now that every slot is embedded
        vectors = [self.vectors[v] if isinstance(v, int) else v for v in self.vectors]
        stacked = np.stack(vectors) if vectors else None
        codes = lsh.hash_vectors(stacked, self.planes, NUM_TABLES, self.center) if vectors else None
        self.store.commit(vectors=stacked, codes=codes, indexed=self.records, failed=self.failed,
                          touched=self.touched, removed=self.removed)
        self.records, self.vectors, self.by_sha256 = [], [], {}
        self.failed, self.touched, self.removed = [], [], []


@dataclass
class _SearchState:
    """What queries of one committed state share: the snapshot, and built on demand the query tables,
    the stored codes as uint64 words (64 bytes a vector, in memory) and, for a small index, the
    vectors as normalised float32. Large collections read float16 vectors from the mapped segments,
    every page mapped up front where memory allows (Snapshot.map_vectors)."""

    version: int
    snap: Snapshot
    tables: lsh.LSHTables | None = None
    words: np.ndarray | None = None
    # exact b (Index.backgrounds) of this snapshot, NaN until computed (all at once in the graph's exact
    # regime); and the k-NN graph
    exact_backgrounds: np.ndarray | None = None
    graph: knn.Graph | None = None
    graph_checked: bool = False
    _dense: np.ndarray | None = None
    _dense_checked: bool = False

    def dense(self) -> np.ndarray | None:
        if self._dense is None and not self._dense_checked and len(self.snap):
            self._dense_checked = True  # decided once: a large index keeps reading its mapped segments
            dim = self.snap.vectors(np.arange(1), dtype=None).shape[1]
            if len(self.snap) * dim * 4 <= DENSE_CACHE_BYTES:
                self._dense = lsh.normalise_rows(self.snap.vectors())
            else:
                self.snap.map_vectors()
        return self._dense

    def vectors(self, positions: np.ndarray) -> np.ndarray:
        dense = self.dense()
        return np.take(dense, positions, axis=0) if dense is not None else self.snap.vectors(positions, dtype=None)


def _lsh_scored(state: "_SearchState", graph: knn.Graph | None, vector: np.ndarray, projections: np.ndarray,
                probes: int, shortlist: int, scored: tuple[np.ndarray, np.ndarray] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """The rows a query reads and scores at `probes` buckets per table, as (positions, cosines): the closest
    `shortlist` of its LSH candidates in Hamming distance and the graph's nearest files of the closest, read
    and scored in one pass. `scored`: rows an earlier pass scored, kept and not read again."""
    candidates = state.tables.candidates(None, projections=projections, probes=probes)
    if len(candidates):
        distances = lsh.hamming(np.take(state.words, candidates, axis=0), lsh.sign_words(projections > 0))
        # the closest in Hamming distance stand in for the best cosine matches, so the graph's nearest
        # files join the shortlist before any row is read: one read and one scoring pass
        closest = None
        if graph is not None and QUERY_EXPAND:
            closest = candidates[np.argmin(distances) if QUERY_EXPAND == 1 else
                                 np.argpartition(distances, min(QUERY_EXPAND, len(candidates)) - 1)[:QUERY_EXPAND]]
        if len(candidates) > shortlist:
            candidates = candidates[lsh.nearest_by_hamming(distances, shortlist)]
        if closest is not None:
            near = np.ravel(graph.neighbours[closest])
            candidates = lsh.unique_rows(np.concatenate([candidates, near[near >= 0]]))
    if scored is None:
        return candidates, lsh.cosines(state.vectors(candidates), vector)
    known, known_scores = scored
    fresh = candidates[~(candidates[:, None] == known).any(axis=1)]  # a few dozen each: cheaper than np.isin
    positions = np.concatenate([known, fresh])
    order = np.argsort(positions)  # ascending rows, as one pass gives: equal scores rank by row, as exact
    return positions[order], np.concatenate([known_scores, lsh.cosines(state.vectors(fresh), vector)])[order]


def _exact_top_k(state: _SearchState, vector: np.ndarray, k: int, block: int = 1 << 16):
    best_positions, best_scores = np.empty(0, np.int64), np.empty(0, np.float32)
    snap, dense = state.snap, state.dense()
    if dense is not None:
        scores = dense @ vector
        keep = lsh.top_k(scores, k)
        return keep, scores[keep]
    for start in range(0, len(snap), block):
        positions = np.arange(start, min(start + block, len(snap)))
        scores = lsh.cosines(snap.vectors(positions, dtype=None), vector)
        positions, scores = np.r_[best_positions, positions], np.r_[best_scores, scores]
        keep = lsh.top_k(scores, k)
        best_positions, best_scores = positions[keep], scores[keep]
    return best_positions, best_scores


def _exact_pairs(snap: Snapshot, threshold: float, block: int = 2048):
    """Every pair (a < b) of the snapshot with cosine >= threshold, by blockwise scan (the O(n²) oracle)."""
    found_a, found_b, found_s = [], [], []
    n = len(snap)

    def normalised(first: int) -> np.ndarray:
        return lsh.normalise_rows(snap.vectors(np.arange(first, min(first + block, n)), dtype=None))

    for start in range(0, n, block):
        rows = normalised(start)
        for other in range(start, n, block):
            cols = normalised(other)
            scores = rows @ cols.T
            a, b = np.nonzero(scores >= threshold)
            a, b = a + start, b + other
            keep = a < b
            found_a.append(a[keep]), found_b.append(b[keep]), found_s.append(scores[a[keep] - start, b[keep] - other])
    return knn.concatenated(zip(found_a, found_b, found_s))


def _no_pairs():
    return knn.concatenated(())
