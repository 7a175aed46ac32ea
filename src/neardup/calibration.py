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

#: Lowest cosine of the pairs the plain-cosine curve is fitted on: p is 0 below it (the collection-aware
#: regime has neighbourhood.COSINE_FLOOR).
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
COLLECTION_AWARE = Curve(raw=(0.25, 0.2721, 0.2967, 0.3096, 0.3201, 0.3382, 0.3464, 0.4135, 0.4697, 0.5092, 0.563,
                              0.8191),
                         p=(0.0, 0.0, 0.125, 0.25, 0.3158, 0.7, 0.75, 0.9118, 0.9286, 0.9697, 0.9906, 1.0))
COSINE = Curve(raw=(0.3, 0.3023, 0.3071, 0.3117, 0.316, 0.3272, 0.3428, 0.3494, 0.3602, 0.3949, 0.4309,
                    0.4448, 0.4478, 0.4604, 0.4723, 0.4726, 0.4812, 0.492, 0.5035, 0.5166, 0.524, 0.5299,
                    0.534, 0.5422, 0.7781),
               p=(0.0571, 0.0571, 0.0714, 0.1622, 0.2368, 0.25, 0.2617, 0.3256, 0.4213, 0.5775, 0.578,
                  0.6, 0.6667, 0.7879, 0.8, 0.8333, 0.8606, 0.8955, 0.9016, 0.9241, 0.9483, 0.95, 0.9885,
                  0.992, 1.0))
CURVES = {True: COLLECTION_AWARE, False: COSINE}


def probability(raw, aware: bool) -> np.ndarray:
    """p of raw scores in the collection-aware (`aware`) or plain-cosine regime."""
    return CURVES[aware].probability(raw)


def raw_threshold(probability: float, aware: bool) -> float:
    """The lowest raw score a pair needs to reach `probability` (in (0, 1]) in the regime."""
    return CURVES[aware].raw_at(probability)
