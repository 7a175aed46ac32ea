"""Collection-aware pair scores for `dups` (issue 12): a pair of files scores its cosine, lowered by how
crowded the two files' neighbourhoods are.

    s' = s - (b_i + b_j) / 2 + OFFSET,  b = clip(cosine to the K-th nearest other file, B_MIN, B_MAX)

Two look-alike photos of a crowded subject (skies, meadows, a photo shoot) have close neighbours all around
and are pushed down; a copy of a photo that nothing else resembles keeps its score, so true copies pass at
a lower cosine without letting look-alikes through. Measured on the `neardup eval` seeds 1-4
(benchmarks/recall_experiments.py, benchmarks/RESULTS.md "Collection-aware scores"): at pair precision
>= 0.99, `dups` recall 0.74-0.77 -> 0.86-0.89 on every seed.

* K = 20: larger than the copies of one photo in the calibration sets (15); at K = 10 those copies are
  each other's background and recall collapses. B_MAX bounds what a burst of more than K copies can lose:
  a pair scoring cosine >= threshold + B_MAX - OFFSET is always linked.
* B_MIN bounds the other way: no pair below cosine threshold + B_MIN - OFFSET can link, which is the
  cosine the LSH pair join has to reach (`join_threshold`).
* COSINE_FLOOR: no pair below this cosine links whatever its score. In a collection of very different
  photos every b sits at B_MIN and the score adds OFFSET - B_MIN = 0.10 to every cosine, so the floor is
  what keeps two unrelated look-alikes apart there. Tuned for the copy-trained descriptor (issue 22, blocks
  5-15 trained) on `neardup eval` seeds 1-6 through both ONNX int8 and torch fp32 vectors
  (benchmarks/tune_scores.py, benchmarks/RESULTS.md "Copy-trained descriptor, second run"): at 0.45 and
  the raw default 0.50, group-pair precision >= 0.996 and recall 0.963-0.980 on every seed and backend;
  at 0.50 the best precision-keeping threshold gave recall 0.949-0.980 (two sets under 0.95). In fp32 two
  groups merge (precision 0.950) when the raw threshold falls under 0.49: the default keeps 0.01 above it.
* OFFSET fixes the scale only (it changes no ranking): chosen so that the raw thresholds calibrated for
  both regimes are about the same number (0.50 and 0.55 for the copy-trained descriptor; 0.37 was the
  ImageNet descriptor's, at 0.67). Users never see it: `dups` thresholds the copy probability of the raw
  score (neardup.calibration), fitted per regime.
* Collections of fewer than MIN_FILES files have no meaningful K-th neighbour: plain cosine is used there
  (`applies`).

Pure numpy; the K-th neighbour similarities come from the caller's search (exact or LSH).
"""

from __future__ import annotations

import numpy as np

K = 20
OFFSET = 0.25
B_MIN = 0.15
B_MAX = 0.45
COSINE_FLOOR = 0.45
MIN_FILES = 4 * K


def applies(n_files: int) -> bool:
    """Whether a collection is large enough for collection-aware scores."""
    return n_files >= MIN_FILES


def backgrounds(kth_similarity: np.ndarray) -> np.ndarray:
    """b of each file from its cosine to its K-th nearest other file (clipped to [B_MIN, B_MAX])."""
    return np.clip(np.asarray(kth_similarity, dtype=np.float64), B_MIN, B_MAX)


def normalised(scores: np.ndarray, b_a: np.ndarray, b_b: np.ndarray) -> np.ndarray:
    """s' of pairs with cosines `scores` between files whose backgrounds are b_a and b_b; -inf for a pair
    under COSINE_FLOOR (it never links)."""
    cosines = np.asarray(scores, dtype=np.float64)
    out = cosines - 0.5 * (np.asarray(b_a) + np.asarray(b_b)) + OFFSET
    return np.where(cosines >= COSINE_FLOOR, out, -np.inf)


def links_whatever_b(cosines: np.ndarray, threshold: float) -> np.ndarray:
    """Pairs whose score reaches `threshold` for every b in [B_MIN, B_MAX]: their link needs no b."""
    cosines = np.asarray(cosines, dtype=np.float64)
    return (cosines >= COSINE_FLOOR) & (cosines - B_MAX + OFFSET >= threshold)


def join_threshold(threshold: float) -> float:
    """The lowest cosine a pair can have and still reach `threshold` after normalisation (b >= B_MIN).
    It needs no background, so the pair join runs first and backgrounds are computed only for the files
    it returns: in a large collection most files are in no candidate pair at all."""
    return max(COSINE_FLOOR, threshold - OFFSET + B_MIN)


def kth_exact(vectors: np.ndarray, k: int = K, block: int = 2048, rows: np.ndarray | None = None) -> np.ndarray:
    """Cosine of each unit row (or of the rows at positions `rows`) to its k-th nearest other row, by
    blockwise exact scan (O(len(rows) n d))."""
    n = len(vectors)
    rows = np.arange(n) if rows is None else np.asarray(rows, dtype=np.int64)
    out = np.zeros(len(rows), dtype=np.float64)
    if n <= k:
        return out
    for start in range(0, len(rows), block):
        chunk = rows[start:start + block]
        sims = vectors[chunk] @ vectors.T
        sims[np.arange(len(chunk)), chunk] = -np.inf  # a file is not its own neighbour
        out[start:start + block] = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
    return out
