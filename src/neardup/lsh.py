"""Sign-random-projection LSH over unit vectors: pure numpy, no I/O.

Every vector gets one stored code per word. Bit ``b`` of word ``t`` (value ``1 << b``) is set when the
vector, minus ``center``, has a positive dot product with hyperplane ``t * bits + b``. Lookups cut the
stored words into k-bit slices (``slices``), each slice one hash table, so the same stored codes serve a
100-image folder and a million-image collection: for two vectors at angle θ one bit agrees with
probability p = 1 − θ/π, a table of k bits collides with probability p^k, and L tables give
1 − (1 − p^k)^L (``collision_probability``).

Scores are never derived from codes: candidates are always re-ranked by the exact cosine similarity
of the unit vectors (their dot product), which is the score neardup reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

CODE_DTYPE = np.uint32
MAX_BITS = 32


def make_planes(dim: int, num_tables: int, bits: int, seed: int) -> np.ndarray:
    """Random hyperplanes, shape (num_tables * bits, dim), rows grouped by table."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits per table must be in 1..{MAX_BITS}, got {bits}")
    rng = np.random.default_rng(seed)
    return rng.standard_normal((num_tables * bits, dim), dtype=np.float32)


def hash_vectors(
    vectors: np.ndarray, planes: np.ndarray, num_tables: int, center: np.ndarray | None = None
) -> np.ndarray:
    """Codes of shape (n, num_tables), dtype uint32; bit b of table t = sign of projection t*bits+b."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if center is not None:
        vectors = vectors - center
    bits = planes.shape[0] // num_tables
    positive = (vectors @ planes.T) > 0
    positive = positive.reshape(len(vectors), num_tables, bits)
    weights = np.left_shift(CODE_DTYPE(1), np.arange(bits, dtype=CODE_DTYPE))
    return (positive * weights).sum(axis=2, dtype=CODE_DTYPE)


def slices(codes: np.ndarray, k: int) -> np.ndarray:
    """Cut every stored code into MAX_BITS // k independent k-bit codes: (n, tables) -> (n, tables * (MAX_BITS // k)).

    Fewer bits per table means more, coarser tables from the same stored hyperplanes: the knob that
    trades recall against random candidates without re-hashing anything.
    """
    codes = np.asarray(codes, dtype=CODE_DTYPE)
    if k >= MAX_BITS:
        return codes
    low = CODE_DTYPE((1 << k) - 1)
    return np.concatenate([(codes >> CODE_DTYPE(j * k)) & low for j in range(MAX_BITS // k)], axis=1)


def collision_probability(cosine: float, k: int, num_tables: int, multiprobe: bool = False) -> float:
    """P(a pair at this cosine lands in one bucket of some table) = 1 − (1 − p^k)^L, p = 1 − θ/π."""
    p = 1.0 - math.acos(max(-1.0, min(1.0, cosine))) / math.pi
    per_table = p**k
    if multiprobe:
        per_table += k * p ** (k - 1) * (1 - p)
    return 1.0 - (1.0 - per_table) ** num_tables


@dataclass(frozen=True)
class BucketTable:
    """One hash table as sorted arrays: rows[offsets[i]:offsets[i+1]] hold the rows whose code is keys[i]."""

    keys: np.ndarray
    offsets: np.ndarray
    rows: np.ndarray

    @classmethod
    def build(cls, codes: np.ndarray, rows: np.ndarray | None = None) -> "BucketTable":
        if rows is None:
            rows = np.arange(len(codes), dtype=np.int64)
        order = np.argsort(codes, kind="stable")
        sorted_codes = codes[order]
        starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]]) if len(codes) else np.empty(0, np.int64)
        offsets = np.r_[starts, len(codes)].astype(np.int64)
        return cls(keys=sorted_codes[starts], offsets=offsets, rows=np.asarray(rows, dtype=np.int64)[order])

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Rows of every bucket whose key is in `keys` (missing keys contribute nothing)."""
        keys = np.asarray(keys, dtype=self.keys.dtype)
        slots = np.searchsorted(self.keys, keys)
        inside = slots < len(self.keys)
        slots, keys = slots[inside], keys[inside]
        slots = slots[self.keys[slots] == keys]
        return self.rows[_concat_ranges(self.offsets[slots], self.offsets[slots + 1])]

    def pairs(self, chunk: int = 1 << 20) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All pairs of rows sharing a bucket, as (a, b) row arrays with a < b, in chunks.

        Pairs at distance d inside the sorted order are emitted together, so memory stays O(n + chunk)
        whatever the bucket sizes; the loop runs (largest bucket − 1) times.
        """
        ends = np.repeat(self.offsets[1:], np.diff(self.offsets))
        active = np.flatnonzero(ends - np.arange(len(ends)) > 1)
        distance = 1
        while len(active):
            for start in range(0, len(active), chunk):
                left = active[start : start + chunk]
                a, b = self.rows[left], self.rows[left + distance]
                yield np.minimum(a, b), np.maximum(a, b)
            distance += 1
            active = active[active + distance < ends[active]]


def _concat_ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) without the Python loop."""
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    shifts = np.repeat(starts - np.cumsum(np.r_[0, lengths[:-1]]), lengths)
    return np.arange(total, dtype=np.int64) + shifts


def probe_keys(code: int, k: int, multiprobe: bool) -> np.ndarray:
    """The bucket keys to visit for one table: the code itself and, with multiprobe, its k one-bit neighbours."""
    code = CODE_DTYPE(code)
    if not multiprobe:
        return np.array([code], dtype=CODE_DTYPE)
    flips = np.left_shift(CODE_DTYPE(1), np.arange(k, dtype=CODE_DTYPE))
    return np.r_[code, code ^ flips].astype(CODE_DTYPE)


class LSHTables:
    """Bucket tables over k-bit slices of stored codes, for candidate lookup and all-pairs joins."""

    def __init__(self, codes: np.ndarray, k: int, rows: np.ndarray | None = None):
        self.k = k
        sliced = slices(codes, k)
        self.tables = [BucketTable.build(sliced[:, t], rows) for t in range(sliced.shape[1])]

    def candidates(self, query_codes: np.ndarray, multiprobe: bool = True) -> np.ndarray:
        """Unique rows colliding with the query in any table (query_codes: its stored codes, one per word)."""
        sliced = slices(np.asarray(query_codes)[None], self.k)[0]
        found = [table.lookup(probe_keys(code, self.k, multiprobe)) for table, code in zip(self.tables, sliced)]
        return np.unique(np.concatenate(found)) if found else np.empty(0, dtype=np.int64)

    def candidate_pairs(self, chunk: int = 1 << 20) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Pairs of rows sharing a bucket in some table; a pair may repeat across tables."""
        for table in self.tables:
            yield from table.pairs(chunk)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k highest scores, highest first (ties broken by position)."""
    k = min(k, len(scores))
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    part = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return part[np.lexsort((part, -scores[part]))]


def exact_search(vectors: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k by cosine over unit rows: the oracle for LSH recall. Returns (rows, scores)."""
    scores = np.asarray(vectors, dtype=np.float32) @ np.asarray(query, dtype=np.float32)
    rows = top_k(scores, k)
    return rows, scores[rows]


def row_dots(vectors_a: np.ndarray, vectors_b: np.ndarray) -> np.ndarray:
    """Cosine of each pair of unit rows (a[i] · b[i])."""
    return np.einsum("ij,ij->i", vectors_a, vectors_b, dtype=np.float32)
