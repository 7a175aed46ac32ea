"""Sign-random-projection LSH over unit vectors: pure numpy, no I/O.

Every vector gets one stored code per word. Bit ``b`` of word ``t`` (value ``1 << b``) is set when the
vector, minus ``center``, has a positive dot product with hyperplane ``t * bits + b``; read as one bit
string (``code_words``: 512 bits = 8 uint64 a vector), bit p is hyperplane p. For two vectors at angle θ
one bit agrees with probability p = 1 − θ/π, a table of k bits collides with probability p^k, and L
tables give 1 − (1 − p^k)^L (``collision_probability``). The same stored bits serve every size:

* queries (``LSHTables``): the bit string cut into 512 // k tables of k contiguous bits (k ~ log2 n),
  each a CSR table with direct addressing, probed at the query's likeliest buckets
  (``directed_probes``); candidates ranked by Hamming distance over all 512 bits (``hamming``,
  ``nearest_by_hamming``) before any vector is read. (`dups` needs no pair join over the codes: it
  reads the k-NN graph the index keeps, neardup.graph.)

Scores are never derived from codes: candidates are always re-ranked by the exact cosine of the stored
vectors (``cosines``, ``row_cosines``: each row's norm divided out, so float16 storage moves a score by
at most ~1e-3 and leaves a self-match at 1.0), which is the score neardup reports.
"""

from __future__ import annotations

import functools
import itertools
import math
import time

import numpy as np

CODE_DTYPE = np.uint32
MAX_BITS = 32
#: Largest k for a direct-addressed query table (2^k + 1 offsets per table).
MAX_TABLE_BITS = 20


def make_planes(dim: int, num_tables: int, bits: int, seed: int) -> np.ndarray:
    """Random hyperplanes, shape (num_tables * bits, dim), rows grouped by table."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits per table must be in 1..{MAX_BITS}, got {bits}")
    rng = np.random.default_rng(seed)
    return rng.standard_normal((num_tables * bits, dim), dtype=np.float32)


def project(vectors: np.ndarray, planes: np.ndarray, center: np.ndarray | None = None) -> np.ndarray:
    """Projections (n, hyperplanes) float32 of the vectors, minus `center`, on every hyperplane."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if center is not None:
        vectors = vectors - center
    return vectors @ planes.T


def hash_vectors(
    vectors: np.ndarray, planes: np.ndarray, num_tables: int, center: np.ndarray | None = None,
    projections: np.ndarray | None = None,
) -> np.ndarray:
    """Codes of shape (n, num_tables), dtype uint32; bit b of table t = sign of projection t*bits+b.
    Bit p of the stored bit string (`code_words`, little-endian) is hyperplane p."""
    vectors = np.asarray(vectors, dtype=np.float32)
    bits = planes.shape[0] // num_tables
    positive = (project(vectors, planes, center) if projections is None else projections) > 0
    positive = positive.reshape(len(vectors), num_tables, bits)
    weights = np.left_shift(CODE_DTYPE(1), np.arange(bits, dtype=CODE_DTYPE))
    return (positive * weights).sum(axis=2, dtype=CODE_DTYPE)


def collision_probability(cosine: float, k: int, num_tables: int, multiprobe: bool = False) -> float:
    """P(a pair at this cosine lands in one bucket of some table) = 1 − (1 − p^k)^L, p = 1 − θ/π."""
    p = 1.0 - math.acos(max(-1.0, min(1.0, cosine))) / math.pi
    per_table = p**k
    if multiprobe:
        per_table += k * p ** (k - 1) * (1 - p)
    return 1.0 - (1.0 - per_table) ** num_tables


def _concat_ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) without the Python loop."""
    lengths = ends - starts
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    before = np.cumsum(lengths) - lengths  # where each range starts in the output
    shifts = np.repeat(starts - before, lengths)
    return np.arange(total, dtype=np.int64) + shifts


def probe_masks(k: int, radius: int) -> np.ndarray:
    """XOR masks of every k-bit pattern with at most `radius` bits set (0 first, then by weight)."""
    masks = [0]
    for weight in range(1, radius + 1):
        masks += [sum(1 << b for b in bits) for bits in itertools.combinations(range(k), weight)]
    return np.array(masks, dtype=CODE_DTYPE)


def range_keys(codes: np.ndarray, k: int) -> np.ndarray:
    """Cut the stored bit string of every row into bits // k tables of k contiguous bits:
    (n, words) uint32 codes -> (n, bits // k) uint32 keys; bit i of table t's key is stored bit
    (hyperplane) t * k + i; k need not divide 32, so no stored bit is wasted."""
    words = code_words(np.atleast_2d(codes))
    num_tables = words.shape[1] * 64 // k
    if len(words) == 1:  # one query: slice one Python integer (a numpy loop over tables costs ~0.1 ms)
        bits = int.from_bytes(words.tobytes(), "little")
        return np.array([[(bits >> (t * k)) & ((1 << k) - 1) for t in range(num_tables)]], dtype=CODE_DTYPE)
    padded = np.concatenate([words, np.zeros((len(words), 1), np.uint64)], axis=1)
    out = np.empty((len(words), num_tables), dtype=CODE_DTYPE)
    mask = np.uint64((1 << k) - 1)
    for t in range(num_tables):
        word, shift = divmod(t * k, 64)
        value = padded[:, word] >> np.uint64(shift)
        if shift + k > 64:
            value |= padded[:, word + 1] << np.uint64(64 - shift)
        out[:, t] = (value & mask).astype(CODE_DTYPE)
    return out


def table_keys(signs: np.ndarray, k: int) -> np.ndarray:
    """One vector's keys in tables of k contiguous bits straight from its hyperplane signs (bool, one per
    stored hyperplane): range_keys of its stored codes, without building them."""
    num_tables = len(signs) // k
    return (signs[: num_tables * k].reshape(num_tables, k) @ _powers(k)).astype(CODE_DTYPE)


def sign_words(signs: np.ndarray) -> np.ndarray:
    """One vector's stored bit string as uint64 words straight from its hyperplane signs:
    code_words of its stored codes (bit p is hyperplane p)."""
    return np.packbits(signs, bitorder="little").view(np.uint64)


@functools.cache
def _powers(k: int) -> np.ndarray:
    return np.left_shift(np.int64(1), np.arange(k, dtype=np.int64))


def directed_probes(projections: np.ndarray, k: int, probes: int, flippable: int | None = None) -> np.ndarray:
    """Query-directed multiprobe (Lv et al., VLDB 2007) for sign bits: XOR masks (tables, probes) of
    the most likely buckets of a near neighbour, per table of k contiguous hyperplanes. A bit whose
    projection is close to zero is the likeliest to differ, so masks flip subsets of the `flippable`
    least confident bits of each table, cheapest first by the sum of their squared projections
    (mask 0, the query's own bucket, always first). Default: the fewest bits whose subsets number at least
    `probes` (5 for 32 probes: every subset of the 5 least confident bits, no ranking). Measured on 1M
    photo-like vectors (RESULTS, "1M on the EPYC"): recall 1.000 as with the best 32 subsets of 8 bits by
    cost, and 0.09 against 0.18 ms a query."""
    projections = np.asarray(projections, dtype=np.float32)
    num_tables = len(projections) // k
    weight = projections[: num_tables * k].reshape(num_tables, k) ** 2
    m = min(max(1, (probes - 1).bit_length()) if flippable is None else flippable, k)
    weakest = np.argpartition(weight, m - 1, axis=1)[:, :m] if m < k else np.tile(np.arange(k), (num_tables, 1))
    # every subset's mask per table as one float64 product (sums of distinct powers of two < 2^32: exact)
    masks = np.ldexp(1.0, weakest) @ _subsets_t64(m)  # (tables, 2^m)
    if probes >= 1 << m:  # every subset is probed
        return masks.astype(CODE_DTYPE)
    cost = np.take_along_axis(weight, weakest, axis=1) @ _subsets_t32(m)  # (tables, 2^m)
    # the set of probes matters, not their order; mask 0 (cost 0) is always among the cheapest
    best = np.argpartition(cost, probes - 1, axis=1)[:, :probes]
    return np.take_along_axis(masks, best, axis=1).astype(CODE_DTYPE)


@functools.cache
def _subsets_t32(m: int) -> np.ndarray:
    return np.ascontiguousarray(_subsets(m).T.astype(np.float32))


@functools.cache
def _subsets_t64(m: int) -> np.ndarray:
    return np.ascontiguousarray(_subsets(m).T.astype(np.float64))


@functools.cache
def _subsets(m: int) -> np.ndarray:
    return ((np.arange(1 << m)[:, None] >> np.arange(m)[None, :]) & 1).astype(np.uint8)


class LSHTables:
    """The stored bit string cut into tables of k contiguous bits (`range_keys`), each a CSR bucket
    table with direct addressing.

    Table t keeps the rows sorted by their key, and `rows.ravel()[offsets[t, key]:offsets[t, key + 1]]` is
    the bucket of `key` (the offsets count from the first table's start). With 2^k + 1 offsets per table a
    lookup is two array reads, and the buckets of every probe of every table come out of one vectorised
    gather (no per-table Python loop). Memory: 4 bytes per row per table plus 4 * 2^k per table
    (k <= MAX_TABLE_BITS).
    """

    def __init__(self, codes: np.ndarray, k: int, rows: np.ndarray | None = None):
        if not 1 <= k <= MAX_TABLE_BITS:
            raise ValueError(f"bits per query table must be in 1..{MAX_TABLE_BITS}, got {k}")
        self.k = k
        sliced = range_keys(codes, k)
        n, self.num_tables = sliced.shape
        ids = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        index_dtype = np.int32 if max(n, int(ids.max(initial=0)) + 1) < 2**31 else np.int64
        self.rows = np.empty((self.num_tables, n), dtype=index_dtype)
        offset_dtype = np.int32 if self.num_tables * n < 2**31 else np.int64
        self.offsets = np.zeros((self.num_tables, (1 << k) + 1), dtype=offset_dtype)
        key_dtype = np.uint16 if k <= 16 else CODE_DTYPE  # a stable sort of uint16 is a radix sort
        for t in range(self.num_tables):
            keys = sliced[:, t].astype(key_dtype)
            self.rows[t] = ids[np.argsort(keys, kind="stable")]
            np.cumsum(np.bincount(keys, minlength=1 << k), out=self.offsets[t, 1:])
            self.offsets[t] += t * n  # into the flat rows: a lookup adds no table start per query
        self._flat_rows = self.rows.reshape(-1)
        self._flat_offsets = self.offsets.reshape(-1)
        self._slot_base = np.arange(self.num_tables, dtype=np.int64)[:, None] * ((1 << k) + 1)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Rows of the buckets `keys[t, j]` of table t, for every table t and probe j, concatenated
        (a row appears once per bucket it sits in). keys: (num_tables, probes) integer array."""
        slots = (np.asarray(keys, dtype=np.int64) + self._slot_base).ravel()
        return self._flat_rows[_concat_ranges(self._flat_offsets[slots], self._flat_offsets[slots + 1])]

    def candidates(self, query_codes: np.ndarray | None, multiprobe: bool = True, radius: int | None = None,
                   projections: np.ndarray | None = None, probes: int = 32) -> np.ndarray:
        """Unique rows (ascending) colliding with the query in any table. With the query's
        `projections` (then `query_codes` may be None: the keys are their signs), each table is probed
        at its `probes` likeliest buckets (`directed_probes`); otherwise at every bucket within Hamming
        distance `radius` (default 1 with multiprobe, else 0)."""
        if projections is not None:
            keys = table_keys(np.asarray(projections) > 0, self.k)
            masks = directed_probes(projections, self.k, probes)
        else:
            keys = range_keys(np.asarray(query_codes)[None], self.k)[0]
            radius = (1 if multiprobe else 0) if radius is None else radius
            masks = np.tile(probe_masks(self.k, radius), (self.num_tables, 1))
        return unique_rows(self.lookup(keys[:, None] ^ masks))


def unique_rows(rows: np.ndarray) -> np.ndarray:
    """np.unique for a 1-d integer array, without its bookkeeping (several times faster on small arrays)."""
    if len(rows) == 0:
        return rows.astype(np.int64)
    ordered = np.sort(rows)
    keep = np.empty(len(ordered), dtype=bool)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    return ordered[keep]


def code_words(codes: np.ndarray) -> np.ndarray:
    """The stored codes of each row as uint64 words, (n, tables) uint32 -> (n, tables / 2) uint64:
    64 bytes per vector for the 512 stored bits. Hamming distances do not depend on the grouping."""
    codes = np.ascontiguousarray(codes, dtype=CODE_DTYPE)
    if codes.shape[1] % 2:
        codes = np.concatenate([codes, np.zeros((len(codes), 1), CODE_DTYPE)], axis=1)
    return codes.view(np.uint64)


def hamming(words: np.ndarray, query_words: np.ndarray) -> np.ndarray:
    """Hamming distance (int64) between each row of `words` (n, w) uint64 and `query_words` (w,) or (n, w)."""
    counts = np.bitwise_count(np.bitwise_xor(words, query_words))
    if counts.shape[1] == 8:
        # the 8 byte counts (each <= 64) of a row, summed inside one uint64 by two lane additions
        lanes = counts.view(np.uint64)[:, 0]
        pairs = (lanes & np.uint64(0x00FF00FF00FF00FF)) + ((lanes >> np.uint64(8)) & np.uint64(0x00FF00FF00FF00FF))
        return ((pairs * np.uint64(0x0001000100010001)) >> np.uint64(48)).astype(np.int64)
    return counts.sum(axis=1, dtype=np.int64)


def nearest_by_hamming(distances: np.ndarray, count: int) -> np.ndarray:
    """Positions of the `count` smallest distances (all ties at the cut kept, so possibly more), ascending
    positions. A histogram of the (<= 512) distances finds the cut without sorting."""
    if len(distances) <= count:
        return np.arange(len(distances))
    histogram = np.cumsum(np.bincount(distances))
    cut = int(np.searchsorted(histogram, count))
    return np.flatnonzero(distances <= cut)


def as_float32(vectors: np.ndarray) -> np.ndarray:
    """Stored (float16) or float32 rows as float32: the same floats as numpy's cast, through integer bit
    operations where that is faster on this CPU (numpy 2.4 casts half to float one value at a time where it
    has no AVX-512 path: 1.9 ns a value on an AVX2 EPYC, the bit operations ~0.5 ns; _half_by_bits)."""
    vectors = np.asarray(vectors)
    if vectors.dtype != np.float16:
        return np.asarray(vectors, dtype=np.float32)
    if _half_by_bits():
        return _half_to_float_by_bits(vectors)
    return vectors.astype(np.float32)


# keeps the sign (bit 31) and the half's exponent and mantissa (bits 13-27); clears bits 28-30, the sign's copies
_HALF_TO_FLOAT_MASK = np.uint32(0x8FFFE000).view(np.int32)
_HALF_TO_FLOAT_SCALE = np.float32(2.0**112)  # float32's exponent bias less half's: 127 - 15
_FLOAT32_SUBNORMAL = np.float32(1e-40)


def _half_to_float_by_bits(halves: np.ndarray) -> np.ndarray:
    """numpy's half-to-float cast, bit for bit, in three vectorised integer/float passes. A half's bits
    shifted left by 13 are a float32 of the same sign and mantissa whose exponent lacks the bias difference
    (for a subnormal half, a subnormal float32 of the same relative scale), so one multiplication by 2^112
    finishes it, zeros and subnormals included. The sign-extended copy's high bits are masked off. Infinity
    and NaN (never stored: vectors are unit) would come out finite, so they take numpy's cast, as does a
    thread that flushes subnormal floats to zero (torch.set_flush_denormal, some runtimes), where the
    scaling would zero the subnormal halves."""
    if _FLOAT32_SUBNORMAL * _HALF_TO_FLOAT_SCALE == 0:  # the thread's FTZ/DAZ state now (a scalar product)
        return halves.astype(np.float32)
    bits = halves.view(np.int16).astype(np.int32)
    np.left_shift(bits, 13, out=bits)
    np.bitwise_and(bits, _HALF_TO_FLOAT_MASK, out=bits)
    floats = bits.view(np.float32)
    np.multiply(floats, _HALF_TO_FLOAT_SCALE, out=floats)
    if floats.size and (floats.max() >= 65536 or floats.min() <= -65536):  # beyond the largest half, 65504
        return halves.astype(np.float32)
    return floats


@functools.cache
def _half_by_bits() -> bool:
    """Whether the bit operations beat numpy's cast here, timed once per process on a query shortlist's worth
    of rows (best of 5 each, about a millisecond). Both give identical floats, so only speed depends on it."""
    sample = np.random.default_rng(0).standard_normal((64, 768)).astype(np.float16)

    def best(convert) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            convert()
            times.append(time.perf_counter() - start)
        return min(times)

    return best(lambda: _half_to_float_by_bits(sample)) < best(lambda: sample.astype(np.float32))


def cosines(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Cosine (float32) of each stored row with a unit query. Each row's own norm is divided out, so the
    float16 rounding of stored vectors leaves a self-match at 1.0 and moves other scores by <= ~1e-3."""
    rows = as_float32(vectors)
    if rows.ndim != 2 or len(rows) == 0:
        return np.zeros(len(rows), dtype=np.float32)
    return (rows @ np.asarray(query, dtype=np.float32)) / _norms(rows)


def row_cosines(vectors_a: np.ndarray, vectors_b: np.ndarray) -> np.ndarray:
    """Cosine (float32) of each pair of stored rows a[i], b[i], norms divided out as in `cosines`."""
    a, b = as_float32(vectors_a), as_float32(vectors_b)
    if len(a) == 0:
        return np.zeros(0, dtype=np.float32)
    return np.einsum("ij,ij->i", a, b) / (_norms(a) * _norms(b))


def normalise_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows as float32 of norm 1 (zero rows stay zero)."""
    rows = as_float32(vectors)
    return rows / _norms(rows)[:, None] if len(rows) else rows


def _norms(rows: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.vecdot(rows, rows))  # half einsum's time on a query's few rows, and faster on blocks too
    norms[norms == 0] = 1.0
    return norms


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


# ---- the all-pairs join cut into pure steps, for a join spread over many machines ------------------
