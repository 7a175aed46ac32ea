"""The index's k-nearest-neighbour graph (issue 18): each file's KEEP most similar other files, kept with
the index and brought up to date by every write, so `dups` reads its candidate pairs and every file's
background b (neighbourhood.py) instead of searching for them. Pure compute, no I/O: the store keeps it.

Two regimes, chosen by the collection's size:

* exact (n <= EXACT_MAX): every list is the true top list, by blockwise float32 scan. An add scans the new
  rows against all rows and merges them into the old rows' lists, so both directions stay exact; the
  work per added row is one scan of n rows (bounded by EXACT_MAX).
* clustered (IVF, above EXACT_MAX): rows are assigned to the nearest of ~n / CLUSTER_ROWS centroids
  (spherical k-means on a sample); a row's candidates are the members of the PROBES clusters whose
  centroids are nearest the row itself. Similarities are computed in bfloat16 where the CPU has bf16
  units (float32 elsewhere) and the kept entries re-scored in float32. A list may then miss a true
  neighbour: its similarities are true ones, so its K-th similarity is a lower bound of the true one.
  So every row whose b can matter (`_refine`) gets a true list by a full scan, and every new row is
  compared with those rows too, so they stay true. An added row costs PROBES x CLUSTER_ROWS comparisons,
  one per true-list row, and a full scan if it needs a true list itself (measured in
  benchmarks/RESULTS.md, "Scale").

Removals drop the removed rows from every list. A list is always a true prefix in the exact regime (the
kept entries of a sorted list minus removed ones are the top of what remains); a list left with fewer
than K entries while more files exist is searched again (`refill`). Lists hold KEEP = K + 4 entries so a
few removals cost no search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from . import neighbourhood

K = neighbourhood.K
#: Entries kept per row: K plus slack, so a row that loses a few neighbours to removals keeps its K-th.
KEEP = K + 4
#: Largest collection whose graph is exact (an add scans every row: 20,000 x 768 floats, ~10 ms a row).
EXACT_MAX = 20_000
#: Rows per cluster aimed at in the clustered regime, and clusters probed per row (measured:
#: benchmarks/bench_scale.py, variant photos).
CLUSTER_ROWS = 512
PROBES = 24
#: The clustered regime refits its centroids when the collection has doubled or halved since the fit.
REFIT_FACTOR = 2.0
KMEANS_ITERATIONS = 8
KMEANS_SAMPLE_PER_CLUSTER = 48
SEED = 20261206
#: Reader of normalised float32 rows at the given positions of the collection.
Rows = Callable[[np.ndarray], np.ndarray]
#: progress(stage, rows done, rows in the stage): "nearest files" (every new row's list), "true lists"
#: (the full scans of the rows whose b can matter, clustered regime)
Progress = Callable[[str, int, int], None]


@dataclass
class Graph:
    """ids[i] is the catalog id of row i (ascending: the snapshot's order) and stamps[i] when its vector
    was written (an id re-embedded since is a new row); neighbours[i] are row positions, most similar
    first, -1 where none; similarities[i] their cosines (-inf where none)."""

    ids: np.ndarray
    neighbours: np.ndarray
    similarities: np.ndarray
    stamps: np.ndarray  # float64 [n]: when each row's vector was written (Snapshot.stamps)
    exact_rows: np.ndarray  # bool [n]: the row's list is the true top list (all rows in the exact regime)
    centroids: np.ndarray | None = None  # clustered regime: float32 [C, d]
    clusters: np.ndarray | None = None  # clustered regime: int32 [n], each row's cluster
    fitted: int = 0  # rows when the centroids were fitted

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def exact(self) -> bool:
        return self.centroids is None

    def kth(self, k: int = K) -> np.ndarray:
        """Each row's cosine to its k-th nearest other row; 0 where it has fewer than k (no bound)."""
        if len(self) == 0:
            return np.zeros(0)
        column = self.similarities[:, k - 1].astype(np.float64)
        return np.where(np.isfinite(column), column, 0.0)

    def pairs(self, min_cosine: float, chunk: int = 1 << 16,
              keep: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every listed pair (a < b, row positions) with cosine >= min_cosine, each once, with its cosine;
        only those `keep(a, b, cosines)` marks, when given (see pair_chunks)."""
        return concatenated(self.pair_chunks(min_cosine, chunk, keep))

    def pair_chunks(self, min_cosine: float, chunk: int = 1 << 16,
                    keep: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """`pairs` a chunk of rows at a time (int64 positions, cosines), `keep` applied to each chunk, so the
        pairs it drops are never held together (a million crowded rows list ~20M pairs at 0.45). A pair
        both rows list is taken from the lower row's list, without a sort."""
        for first in range(0, len(self), chunk):
            sims = self.similarities[first:first + chunk]
            at, col = np.nonzero(sims >= min_cosine)
            a = (first + at).astype(np.int32)
            b = self.neighbours[first:first + chunk][at, col]
            s = sims[at, col]
            later = a < b
            # b < a: taken here unless b lists a at the same cosine cut (then b's list gave it)
            back = ~later
            listed = ((self.neighbours[b[back]] == a[back, None]) & (self.similarities[b[back]] >= min_cosine)).any(axis=1)
            once = later.copy()
            once[np.flatnonzero(back)[~listed]] = True
            a, b, s = np.minimum(a[once], b[once]), np.maximum(a[once], b[once]), s[once]
            if keep is not None:
                wanted = keep(a, b, s)
                a, b, s = a[wanted], b[wanted], s[wanted]
            yield a.astype(np.int64), b.astype(np.int64), s

    def lists(self, a: np.ndarray, b: np.ndarray, min_cosine: float, chunk: int = 1 << 18) -> np.ndarray:
        """Whether pair_chunks(min_cosine) yields each pair a[i]-b[i]: either row lists the other at a cosine
        >= min_cosine (a chunk of pairs at a time: their lists are KEEP wide)."""
        out = np.empty(len(a), dtype=bool)
        for start in range(0, len(a), chunk):
            pa, pb = a[start:start + chunk], b[start:start + chunk]
            out[start:start + chunk] = (
                ((self.neighbours[pa] == pb[:, None]) & (self.similarities[pa] >= min_cosine)).any(axis=1)
                | ((self.neighbours[pb] == pa[:, None]) & (self.similarities[pb] >= min_cosine)).any(axis=1))
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"ids": self.ids, "stamps": self.stamps, "exact_rows": self.exact_rows, "neighbours": self.neighbours,
               "similarities": self.similarities, "fitted": np.array(self.fitted)}
        if self.centroids is not None:
            out["centroids"], out["clusters"] = self.centroids, self.clusters
        return out

    @classmethod
    def from_arrays(cls, arrays) -> "Graph":
        graph = cls(np.asarray(arrays["ids"], dtype=np.int64), np.asarray(arrays["neighbours"], dtype=np.int32),
                    np.asarray(arrays["similarities"], dtype=np.float32),
                    np.asarray(arrays["stamps"], dtype=np.float64), np.asarray(arrays["exact_rows"], dtype=bool),
                    fitted=int(arrays["fitted"]))
        if "centroids" in arrays:
            graph.centroids = np.asarray(arrays["centroids"], dtype=np.float32)
            graph.clusters = np.asarray(arrays["clusters"], dtype=np.int32)
        n = len(graph.ids)
        if graph.neighbours.shape != (n, KEEP) or graph.similarities.shape != (n, KEEP) or graph.stamps.shape != (n,) or graph.exact_rows.shape != (n,) or (
                graph.clusters is not None and graph.clusters.shape != (n,)):
            raise ValueError("inconsistent neighbourhood graph arrays")
        return graph


def empty(ids: np.ndarray, stamps: np.ndarray | None = None) -> Graph:
    n = len(ids)
    return Graph(np.asarray(ids, dtype=np.int64), np.full((n, KEEP), -1, np.int32),
                 np.full((n, KEEP), -np.inf, np.float32),
                 np.zeros(n) if stamps is None else np.asarray(stamps, dtype=np.float64), np.ones(n, bool))


def build(ids: np.ndarray, stamps: np.ndarray, rows: Rows, *,
          progress: Progress | None = None) -> Graph:
    """The graph of the collection whose row i has catalog id ids[i] (ascending), written at stamps[i]."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) <= EXACT_MAX:
        graph = empty(ids, stamps)
        _scan(graph, np.arange(len(ids)), rows, progress=_stage(progress, NEAREST))
        return graph
    return _clustered_build(ids, stamps, rows, progress=progress)


def current(graph: Graph, ids: np.ndarray, stamps: np.ndarray) -> bool:
    return np.array_equal(ids, graph.ids) and np.array_equal(stamps, graph.stamps)


def update(graph: Graph, ids: np.ndarray, stamps: np.ndarray, rows: Rows, *,
           progress: Progress | None = None) -> Graph:
    """The graph brought to the collection `ids` (ascending catalog ids, written at `stamps`, rows read
    by `rows`): rows no longer there (or re-written since) leave every list, new ones get their lists and
    enter the old rows' lists. When the regime changes (the collection crosses EXACT_MAX, or has grown or
    shrunk REFIT_FACTOR times since the centroids were fitted) it is rebuilt instead."""
    ids, stamps = np.asarray(ids, dtype=np.int64), np.asarray(stamps, dtype=np.float64)
    n = len(ids)
    if current(graph, ids, stamps):
        return graph
    clustered_now = n > EXACT_MAX
    if clustered_now == graph.exact or (not graph.exact and not (
            graph.fitted / REFIT_FACTOR <= n <= graph.fitted * REFIT_FACTOR)):
        return build(ids, stamps, rows, progress=progress)
    at = np.minimum(np.searchsorted(ids, graph.ids), max(n - 1, 0))
    kept = (ids[at] == graph.ids) & (stamps[at] == graph.stamps) if n else np.zeros(len(graph), bool)
    added = np.ones(n, bool)
    added[at[kept]] = False
    # old position -> new position (-1: removed); positions keep their order since ids are sorted
    remap = np.full(len(graph) + 1, -1, dtype=np.int32)  # index -1 (no neighbour) maps to -1
    remap[:len(graph)][kept] = np.flatnonzero(~added).astype(np.int32)
    out = empty(ids, stamps)
    old_at = np.flatnonzero(~added)
    out.neighbours[old_at] = remap[graph.neighbours[kept]]
    out.similarities[old_at] = np.where(out.neighbours[old_at] >= 0, graph.similarities[kept], -np.inf)
    _sort_rows(out, old_at)
    if not graph.exact:
        out.centroids, out.fitted = graph.centroids, graph.fitted
        out.clusters = np.zeros(n, np.int32)
        out.clusters[old_at] = graph.clusters[kept]
        out.exact_rows[:] = False
        out.exact_rows[old_at] = graph.exact_rows[kept]
    new_at = np.flatnonzero(added)
    need = min(K, max(n - 1, 0))  # a row with fewer entries has no K-th: searched again

    def short(at: np.ndarray) -> np.ndarray:
        return at[np.isfinite(out.similarities[at]).sum(axis=1) < need] if need else at[:0]

    if out.exact:
        if len(new_at):  # an old row's list knew every other old row
            _scan(out, new_at, rows, merge=True, known_others=len(old_at) - 1, progress=_stage(progress, NEAREST))
        refill = short(old_at)
        if len(refill):
            _scan(out, refill, rows)
    else:
        refill = short(old_at)
        out.exact_rows[refill] = False
        if len(new_at):
            out.clusters[new_at] = _assign(rows(new_at), out.centroids)
        _clustered_rows(out, np.union1d(new_at, refill), rows, merge_from=new_at, progress=_stage(progress, NEAREST))
        exact_old = old_at[out.exact_rows[old_at]]
        if len(new_at) and len(exact_old):  # rows with true lists stay true: they see every new row
            _scan(out, new_at, rows, columns=exact_old, set_lists=False, merge=True, known_others=n)
        _refine(out, rows, progress)
    return out


def _stage(progress: Progress | None, stage: str):
    return None if progress is None else lambda done, total: progress(stage, done, total)


NEAREST, TRUE_LISTS = "nearest files", "true lists"


def _refine(graph: Graph, rows: Rows, progress: Progress | None = None) -> None:
    """Give the rows whose b can matter a true list by a full scan: a row in some pair at COSINE_FLOOR or
    above (it can link) whose listed K-th cosine is under B_MAX (a lower bound there: the true b may be
    higher). Elsewhere b is B_MAX already (a listed K-th >= B_MAX is a lower bound >= B_MAX) or unused."""
    doubtful = ~graph.exact_rows & (graph.similarities[:, 0] >= neighbourhood.COSINE_FLOOR) & (
        graph.kth() < neighbourhood.B_MAX)
    at = np.flatnonzero(doubtful)
    if len(at):
        _scan(graph, at, rows, low_precision=bf16_matmul(), block=8192, column_block=1 << 14,
              progress=_stage(progress, TRUE_LISTS))
        graph.exact_rows[at] = True


# ---- exact regime ------------------------------------------------------------------------------------


def _scan(graph: Graph, at: np.ndarray, rows: Rows, *, columns: np.ndarray | None = None,
          set_lists: bool = True, merge: bool = False, known_others: int | None = None,
          low_precision: bool = False, block: int = 2048, column_block: int = 1 << 15,
          progress: Callable[[int, int], None] | None = None) -> None:
    """Compare rows `at` with every row of `columns` (default: all). `set_lists`: their lists become the
    top of what was scanned (exact when every row was); `merge`: the scanned rows not in `at` take rows
    `at` into their lists where they belong (`_merge`; known_others counts the rows a column's list knew
    before the first chunk of `at`, each chunk adds its rows). `low_precision`: similarities in bfloat16,
    the kept entries re-scored in float32 (not with `merge`, whose values go straight into lists)."""
    n = len(graph)
    columns = np.arange(n) if columns is None else np.asarray(columns, dtype=np.int64)
    in_at = np.zeros(n, bool)
    in_at[at] = True
    dense = rows(columns) if len(columns) * 4 * 1024 <= (256 << 20) else None  # small: read once
    fast = low_precision and not merge
    for first in range(0, len(at), block):
        chunk = at[first:first + block]
        queries = rows(chunk)
        best_sims = np.full((len(chunk), KEEP), -np.inf, np.float32)
        best_rows = np.full((len(chunk), KEEP), -1, np.int64)
        for start in range(0, len(columns), column_block):
            where = columns[start:start + column_block]
            cols = dense[start:start + column_block] if dense is not None else rows(where)
            own_row, own_col = _own(chunk, where)
            if fast:  # bfloat16 product and its top in torch: no float32 copy of the block
                top_sims, top_cols = _block_top(queries, cols, own_row, own_col, True)
                best_sims, best_rows = _top(np.concatenate([best_sims, top_sims], axis=1),
                                            np.concatenate([best_rows, where[top_cols]], axis=1))
                continue
            sims = queries @ cols.T
            if set_lists:  # a file is not its own neighbour (its entries set to -inf here, for the merge too)
                top_sims, top_cols = _sims_top(sims, own_row, own_col)
                best_sims, best_rows = _top(np.concatenate([best_sims, top_sims], axis=1),
                                            np.concatenate([best_rows, where[top_cols]], axis=1))
            else:
                sims[own_row, own_col] = -np.inf
            if merge:
                old = ~in_at[where]
                _merge(graph, where[old], sims[:, old].T, chunk,
                       known_others=None if known_others is None else known_others + first)
        if set_lists:
            if fast:
                best_sims, best_rows = _top(_rescored(queries, best_rows, rows), best_rows)
            graph.similarities[chunk] = best_sims
            graph.neighbours[chunk] = np.where(np.isfinite(best_sims), best_rows, -1)
        if progress:
            progress(min(first + block, len(at)), len(at))


def _own(chunk: np.ndarray, where: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row in chunk, column in where) of each row of `chunk` that is also in `where` (ascending)."""
    at = np.minimum(np.searchsorted(where, chunk), len(where) - 1)
    hit = np.flatnonzero(where[at] == chunk)
    return hit, at[hit]


def _block_top(queries, columns, own_row: np.ndarray, own_col: np.ndarray, low_precision: bool,
               keep: int = KEEP) -> tuple[np.ndarray, np.ndarray]:
    """The `keep` highest similarities of each query to the columns, with their column numbers (-inf / 0
    where there are fewer columns); a query's own column excluded. In bfloat16 (torch: product and top,
    no float32 copy of the block; `queries`/`columns` may already be bfloat16 tensors), else float32."""
    if not low_precision:
        return _sims_top(queries @ columns.T, own_row, own_col, keep)
    import torch

    sims = _bf16(queries) @ _bf16(columns).T
    if len(own_row):
        sims[torch.from_numpy(own_row), torch.from_numpy(own_col)] = -float("inf")
    k = min(keep, sims.shape[1])
    values, cols = torch.topk(sims, k, dim=1)
    values, cols = values.float().numpy(), cols.numpy().astype(np.int64)
    if k < keep:
        values = np.concatenate([values, np.full((len(values), keep - k), -np.inf, np.float32)], axis=1)
        cols = np.concatenate([cols, np.zeros((len(cols), keep - k), np.int64)], axis=1)
    return values, cols


def _sims_top(sims: np.ndarray, own_row: np.ndarray, own_col: np.ndarray, keep: int = KEEP
              ) -> tuple[np.ndarray, np.ndarray]:
    """_block_top of float32 similarities already computed (overwritten where a query meets itself). A large
    block's top goes through torch.topk (both cores; numpy's argpartition is one: 0.14 against 0.34 s for
    4,096 x 16,384 on an AVX2 EPYC, where the float32 path runs: no bf16 units)."""
    sims[own_row, own_col] = -np.inf
    if sims.shape[1] > keep and sims.size >= TORCH_TOP_MIN:
        import torch

        values, cols = torch.topk(torch.from_numpy(sims), keep, dim=1)  # highest first
        return values.numpy(), cols.numpy().astype(np.int64)
    values, cols = _top(sims, np.broadcast_to(np.arange(sims.shape[1]), sims.shape), keep)
    return values, np.maximum(cols, 0)


#: Similarity blocks from this many entries up take their top in torch (see _sims_top).
TORCH_TOP_MIN = 1 << 20


def _bf16(vectors):
    import torch

    if isinstance(vectors, torch.Tensor):
        return vectors
    return torch.from_numpy(np.ascontiguousarray(vectors)).to(torch.bfloat16)


def _top(sims: np.ndarray, rows: np.ndarray, keep: int = KEEP) -> tuple[np.ndarray, np.ndarray]:
    """The `keep` highest of each row of sims (with their rows), highest first; padded with -inf / -1."""
    if sims.shape[1] < keep:
        pad = keep - sims.shape[1]
        sims = np.concatenate([sims, np.full((len(sims), pad), -np.inf, sims.dtype)], axis=1)
        rows = np.concatenate([rows, np.full((len(rows), pad), -1, np.int64)], axis=1)
    if sims.shape[1] > keep:
        part = np.argpartition(-sims, keep - 1, axis=1)[:, :keep]
        sims, rows = np.take_along_axis(sims, part, axis=1), np.take_along_axis(rows, part, axis=1)
    order = np.argsort(-sims, axis=1, kind="stable")
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(rows, order, axis=1)


def _merge(graph: Graph, targets: np.ndarray, sims: np.ndarray, sources: np.ndarray, *,
           known_others: int | None = None) -> None:
    """Merge candidates `sources` (similarities sims[t, s] to targets[t]) into the targets' lists. A list
    that is full, or shorter than the `known_others` rows it was compared with (removals shortened it),
    is a true prefix only down to its last entry: a candidate below it could be ranked wrongly among rows
    the list does not hold, so it is not taken. known_others=None (clustered regime, approximate
    anyway): only full lists refuse candidates below their last entry."""
    if len(targets) == 0 or sims.shape[1] == 0:
        return
    current = graph.similarities[targets]
    filled = np.isfinite(current).sum(axis=1)
    complete = filled < KEEP if known_others is None else (filled < KEEP) & (filled >= known_others)
    last = current[np.arange(len(targets)), np.maximum(filled, 1) - 1]
    floor = np.where(complete, -np.inf, np.where(filled == 0, np.inf, last))
    hopeful = (sims > floor[:, None]).any(axis=1)  # most full lists take nothing: skip them early
    if not hopeful.any():
        return
    targets, sims, current, floor = targets[hopeful], sims[hopeful], current[hopeful], floor[hopeful]
    cand_sims, cand_rows = _top(sims, np.broadcast_to(sources, sims.shape), min(KEEP, sims.shape[1]))
    listed = (cand_rows[:, :, None] == graph.neighbours[targets][:, None, :]).any(axis=2)
    cand_sims = np.where(listed, -np.inf, cand_sims)  # already there (compared twice): not again
    accept = cand_sims > floor[:, None]
    if not accept.any():
        return
    sims_all, rows_all = _top(np.concatenate([current, np.where(accept, cand_sims, -np.inf)], axis=1),
                              np.concatenate([graph.neighbours[targets].astype(np.int64), cand_rows], axis=1))
    graph.similarities[targets] = sims_all
    graph.neighbours[targets] = np.where(np.isfinite(sims_all), rows_all, -1)


def _sort_rows(graph: Graph, at: np.ndarray) -> None:
    if len(at):
        sims, rows = _top(graph.similarities[at], graph.neighbours[at].astype(np.int64))
        graph.similarities[at], graph.neighbours[at] = sims, np.where(np.isfinite(sims), rows, -1)


# ---- clustered regime --------------------------------------------------------------------------------


def bf16_matmul() -> bool:
    """Whether similarities may be computed in bfloat16: the CPU has bf16 units (AMX or AVX-512 bf16).
    Elsewhere bf16 is emulated and slower than float32."""
    from .models import openvino_backend

    flags = openvino_backend.cpu_flags()
    return bool(flags and openvino_backend.BF16_FLAGS & flags)


def _similarities(queries: np.ndarray, columns: np.ndarray, low_precision: bool) -> np.ndarray:
    if not low_precision:
        return queries @ columns.T
    return (_bf16(queries) @ _bf16(columns).T).float().numpy()


def _fit_centroids(rows: Rows, n: int, clusters: int, low_precision: bool) -> np.ndarray:
    """Spherical k-means on a sample of rows (fixed seed)."""
    rng = np.random.default_rng(SEED)
    sample = np.sort(rng.choice(n, size=min(n, clusters * KMEANS_SAMPLE_PER_CLUSTER), replace=False))
    vectors = rows(sample)
    centroids = vectors[rng.choice(len(vectors), size=clusters, replace=False)].copy()
    for _ in range(KMEANS_ITERATIONS):
        nearest = _assign(vectors, centroids, low_precision)
        sums = np.zeros_like(centroids)
        np.add.at(sums, nearest, vectors)
        counts = np.bincount(nearest, minlength=clusters)
        empty_ones = np.flatnonzero(counts == 0)  # re-seed an empty cluster with a random sample row
        sums[empty_ones] = vectors[rng.choice(len(vectors), size=len(empty_ones), replace=False)]
        centroids = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return centroids.astype(np.float32)


def _assign(vectors: np.ndarray, centroids: np.ndarray, low_precision: bool | None = None,
            block: int = 1 << 14) -> np.ndarray:
    low_precision = bf16_matmul() if low_precision is None else low_precision
    out = np.empty(len(vectors), np.int32)
    for start in range(0, len(vectors), block):
        out[start:start + block] = _similarities(vectors[start:start + block], centroids, low_precision).argmax(axis=1)
    return out


def _probe_lists(vectors: np.ndarray, centroids: np.ndarray, low_precision: bool) -> np.ndarray:
    """Each row's PROBES nearest centroids, in no order (per row: a row near a cluster's edge also
    searches the clusters across it)."""
    sims = _similarities(vectors, centroids, low_precision)
    probes = min(PROBES, len(centroids))
    part = np.argpartition(-sims, probes - 1, axis=1)[:, :probes]
    return part


def _clustered_build(ids: np.ndarray, stamps: np.ndarray, rows: Rows, *, progress: Progress | None = None) -> Graph:
    n = len(ids)
    low_precision = bf16_matmul()
    clusters = max(1, math.ceil(n / CLUSTER_ROWS))
    centroids = _fit_centroids(rows, n, clusters, low_precision)
    graph = replace(empty(ids, stamps), centroids=centroids, fitted=n, clusters=np.empty(n, np.int32))
    graph.exact_rows[:] = False
    for start in range(0, n, 1 << 16):
        at = np.arange(start, min(start + (1 << 16), n))
        graph.clusters[at] = _assign(rows(at), centroids, low_precision)
    _clustered_rows(graph, np.arange(n), rows, progress=_stage(progress, NEAREST), low_precision=low_precision)
    _refine(graph, rows, progress)
    return graph


def _clustered_rows(graph: Graph, at: np.ndarray, rows: Rows, *, merge_from: np.ndarray | None = None,
                    progress=None, low_precision: bool | None = None, batch: int = 1 << 15) -> None:
    """Set the lists of rows `at` from the members of the PROBES clusters nearest each row; rows
    `merge_from` (new ones) also enter the lists of the members they were compared with. An update
    (`merge_from`) computes each cluster's similarities once, in float32, for both directions; a build
    ranks in bfloat16 where the CPU has it and re-scores the kept entries in float32."""
    low_precision = bf16_matmul() if low_precision is None else low_precision
    rank_low = low_precision and merge_from is None
    if len(at) == 0:
        return
    order = np.argsort(graph.clusters, kind="stable")
    starts = np.searchsorted(graph.clusters[order], np.arange(len(graph.centroids) + 1))
    is_new = np.zeros(len(graph), bool)
    if merge_from is not None:
        is_new[merge_from] = True
    done = 0
    for first in range(0, len(at), batch):
        chunk = at[first:first + batch]
        queries = rows(chunk)
        fast_queries = _bf16(queries) if rank_low else queries
        probes = _probe_lists(queries, graph.centroids, low_precision)
        found_sims = np.full((len(chunk), probes.shape[1], KEEP), -np.inf, np.float32)
        found_rows = np.full((len(chunk), probes.shape[1], KEEP), -1, np.int64)
        flat = probes.ravel()
        by_cluster = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[by_cluster], np.arange(len(graph.centroids) + 1))
        for cluster in np.flatnonzero(np.diff(bounds)):
            members = order[starts[cluster]:starts[cluster + 1]]
            if len(members) == 0:
                continue
            slots = by_cluster[bounds[cluster]:bounds[cluster + 1]]
            local, probe = slots // probes.shape[1], slots % probes.shape[1]
            columns = rows(members)
            own_row, own_col = _own_unsorted(chunk[local], members)
            if merge_from is None:
                top_sims, top_cols = _block_top(fast_queries[local], columns, own_row, own_col, rank_low)
            else:
                sims = queries[local] @ columns.T
                new_here = is_new[chunk[local]]
                old_members = ~is_new[members] & ~graph.exact_rows[members]  # true lists: merged by a full scan
                if new_here.any() and old_members.any():  # before _sims_top marks the queries' own columns
                    _merge(graph, members[old_members], sims[np.ix_(new_here, old_members)].T, chunk[local][new_here])
                top_sims, top_cols = _sims_top(sims, own_row, own_col)
            found_sims[local, probe] = top_sims
            found_rows[local, probe] = np.where(np.isfinite(top_sims), members[top_cols], -1)
        best_sims, best_rows = _top(found_sims.reshape(len(chunk), -1), found_rows.reshape(len(chunk), -1))
        if rank_low:  # the kept entries re-scored in float32
            best_sims, best_rows = _top(_rescored(queries, best_rows, rows), best_rows)
        graph.similarities[chunk] = best_sims
        graph.neighbours[chunk] = np.where(np.isfinite(best_sims), best_rows, -1)
        done += len(chunk)
        if progress:
            progress(done, len(at))


def _own_unsorted(queries: np.ndarray, members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(query number, member number) where a query row is one of the members (any order)."""
    order = np.argsort(members, kind="stable")
    row, col = _own(queries, members[order])
    return row, order[col]


def _rescored(queries: np.ndarray, neighbours: np.ndarray, rows: Rows, block: int = 2048) -> np.ndarray:
    out = np.full(neighbours.shape, -np.inf, np.float32)
    for start in range(0, len(queries), block):
        part = neighbours[start:start + block]
        valid = part >= 0
        vectors = rows(np.where(valid, part, 0).ravel()).reshape(*part.shape, -1)
        out[start:start + block] = np.where(valid, np.einsum("id,ikd->ik", queries[start:start + block], vectors), -np.inf)
    return out


# ---- pairs above a cosine (the join among crowded files) ------------------------------------------

PAIR_BLOCK = 4096


def pair_blocks(n: int) -> list[tuple[int, int]]:
    """(first row, rows) of the row blocks `block_pairs` takes (one task each in the Ray path)."""
    return [(first, min(PAIR_BLOCK, n - first)) for first in range(0, n, PAIR_BLOCK)]


def block_pairs(vectors: np.ndarray, first: int, block: int, threshold: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (a < b) with a in rows [first, first + block) of the normalised float32 `vectors` and
    cosine >= threshold, with its cosine: float32 products, a block of columns at a time. (bfloat16 with
    a float32 re-check was slower here: crowded files have millions of pairs near the threshold.)"""
    queries = vectors[first:first + block]
    found_a, found_b, found_s = [], [], []
    for start in range(first, len(vectors), 1 << 14):
        sims = queries @ vectors[start:start + (1 << 14)].T
        i, j = sparse_nonzero(sims >= threshold)
        keep = first + i < start + j
        i, j = i[keep], j[keep]
        found_a.append(first + i), found_b.append(start + j), found_s.append(sims[i, j])
    return (np.concatenate(found_a).astype(np.int64), np.concatenate(found_b).astype(np.int64),
            np.concatenate(found_s).astype(np.float32))


def sparse_nonzero(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.nonzero of a 2-d boolean array with few True, in the same order: the 8-byte words that hold
    a True are found first (an eighth of the elements to scan), then the Trues inside them. On a block
    of the crowded join (0.4 % True) 4.4x faster than np.nonzero, which took a sixth of `dups` at 1M."""
    if mask.size == 0:
        return np.nonzero(mask)
    flat = mask.reshape(-1)
    whole = len(flat) // 8 * 8
    words = np.flatnonzero(flat[:whole].view(np.uint64))
    inside = (words[:, None] * 8 + np.arange(8)).ravel()
    found = np.concatenate([inside[flat[inside]], whole + np.flatnonzero(flat[whole:])])
    return np.divmod(found, mask.shape[1])


def pairs_above(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (a < b) of the normalised rows with cosine >= threshold: the exact blockwise scan of
    the upper triangle (O(n^2 d), for the few thousand to tens of thousands of crowded files)."""
    return concatenated(pair_chunks_above(vectors, threshold))


def pair_chunks_above(vectors: np.ndarray, threshold: float) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`pairs_above` a block of rows at a time (block_pairs), for callers that fold the pairs as they come."""
    for first, block in pair_blocks(len(vectors)):
        yield block_pairs(vectors, first, block, threshold)


def concatenated(chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chunks of pairs (a, b, cosines) as one (a, b, cosines): empty int64, int64 and float32 arrays when none."""
    found = list(chunks)
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return tuple(np.concatenate(column) for column in zip(*found))
