"""`dups` scores as probabilities: the share of true copies among the pairs that score so.

`dups` links two files by a raw score: the collection-aware score of neardup.neighbourhood (about 0.3 to
1.1) in an index of neighbourhood.MIN_FILES files or more, else the plain cosine. Neither number reads as
anything, so every score `dups` shows, and its --threshold, is p: the probability that a pair with that
raw score is a true copy (an original and an edited copy of it, or two copies of one original). p is an
increasing, piecewise-linear curve per regime through the knots below, fitted by isotonic regression
(the monotone calibration of Zadrozny & Elkan, KDD 2002) on every pair that can link in the
`neardup eval build --seed 1` and `--seed 2` sets (benchmarks/calibrate_scores.py), checked on seeds 3
to 6 (docs/SCORES.md). The curve never decreases, so thresholding p links exactly the pairs that
thresholding the raw score at `raw_threshold(p)` links: the groups are the raw score's, read on a scale
that means something. `query` keeps plain cosines.

The probability is the one measured on those sets: 44 photos x 15 kinds of edit among 227 look-alike
distractors, about 4,400 true pairs against a handful of false ones above the cosine floor. A collection
with many more look-alike photos per true copy (one long photo shoot, say) has more false pairs at a
given p than those sets had. Pure numpy, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Lowest cosine a pair needs for p > 0 in the plain-cosine regime: the lowest cosine of the pairs the
#: curve is fitted on (the collection-aware regime has neighbourhood.COSINE_FLOOR).
COSINE_FIT_FLOOR = 0.30


@dataclass(frozen=True)
class Curve:
    """p of a raw score: 0 below the first knot's raw score (under the floor, where no pair links),
    linear between knots, flat at the last knot's p above it."""

    raw: tuple[float, ...]
    p: tuple[float, ...]

    def probability(self, raw) -> np.ndarray:
        """p of raw scores (an array or a number); -inf (a pair under the cosine floor) gives 0."""
        raw = np.asarray(raw, dtype=np.float64)
        return np.where(raw >= self.raw[0], np.interp(raw, self.raw, self.p), 0.0)

    def raw_at(self, probability: float) -> float:
        """The lowest raw score whose p reaches `probability` (in (0, 1]); +inf where none does."""
        if not 0.0 < probability <= 1.0:
            raise ValueError(f"a copy probability threshold lies in (0, 1], not {probability}")
        if probability <= self.p[0]:
            return self.raw[0]
        i = int(np.searchsorted(self.p, probability, side="left"))
        if i == len(self.p):
            return np.inf
        x0, x1, y0, y1 = self.raw[i - 1], self.raw[i], self.p[i - 1], self.p[i]
        return float(x0 + (probability - y0) * (x1 - x0) / (y1 - y0))


# Fitted on seeds 1-2 by benchmarks/calibrate_scores.py (benchmarks/RESULTS.md, "Copy probability").
COLLECTION_AWARE = Curve(raw=(0.3, 0.3244, 0.4212, 0.5073, 0.571, 0.8218),
                         p=(0.0, 0.0, 0.9437, 0.9626, 0.9931, 1.0))
COSINE = Curve(raw=(0.3, 0.3001, 0.3015, 0.3126, 0.327, 0.3301, 0.3305, 0.3348, 0.3483, 0.362, 0.3891, 0.4162,
                    0.4293, 0.4429, 0.4644, 0.4907, 0.5035, 0.5079, 0.5155, 0.535, 0.7725),
               p=(0.0, 0.0, 0.1143, 0.1391, 0.2045, 0.2727, 0.3333, 0.3385, 0.3589, 0.3984, 0.534, 0.57, 0.7285,
                  0.7327, 0.9203, 0.9401, 0.9412, 0.9459, 0.9762, 0.9784, 1.0))
CURVES = {True: COLLECTION_AWARE, False: COSINE}


def probability(raw, aware: bool) -> np.ndarray:
    """p of raw scores in the collection-aware (`aware`) or plain-cosine regime."""
    return CURVES[aware].probability(raw)


def raw_threshold(probability: float, aware: bool) -> float:
    """The lowest raw score a pair needs to reach `probability` (in (0, 1]) in the regime."""
    return CURVES[aware].raw_at(probability)
