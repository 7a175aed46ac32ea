"""Fit the map from `dups`' raw scores to the probability that a pair is a true copy (issue 22 part 4),
on the `neardup eval` sets of seeds 1-2, and check it on the others.

    python benchmarks/calibrate_scores.py /tmp/evalsets/seed1 /tmp/evalsets/seed2 \
        --check /tmp/evalsets/seed3 ... [--cache DIR] [--json OUT]

Every file of a set is embedded by the default backend (cached, as benchmarks/tune_scores.py does) and
labelled as `neardup.evaluation.run` labels them: a pair is true when both files show one original (the
original and a copy, or two copies); pairs of tiles cut from one distractor photo are left out. For each
regime of neardup.calibration, every pair that can link (collection-aware: cosine >= COSINE_FLOOR; plain
cosine: cosine >= calibration.COSINE_FIT_FLOOR) gets its raw score, and an isotonic regression of
"true?" on the raw score (scipy.optimize.isotonic_regression) is fitted on the calibration sets pooled; its
blocks become the knots of calibration.Curve (each block's mean raw score and its share of true pairs, plus
a first knot at the lowest raw score that can link). Printed per set: log loss, Brier score, expected calibration error over ten bins of p,
the reliability table, and the group precision / recall of `dups` at the default threshold. The printed
knots are what neardup/calibration.py ships.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import isotonic_regression

from neardup import calibration, evaluation, neighbourhood
from neardup.index import DEFAULT_THRESHOLD
from neardup.models import load_embedder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tune_scores import set_vectors  # noqa: E402  (the same vectors and labels as the score tuning)

BINS = np.linspace(0.0, 1.0, 11)


def regime_pairs(vectors: np.ndarray, labels: list, parts: list, aware: bool):
    """(a, b, raw scores, true?) of every labelled pair that can link in the regime."""
    floor = neighbourhood.COSINE_FLOOR if aware else calibration.COSINE_FIT_FLOOR
    a, b, cosines = evaluation.pairs_above(vectors, floor)
    raw = cosines
    if aware:
        backgrounds = neighbourhood.backgrounds(neighbourhood.kth_exact(vectors))
        raw = neighbourhood.normalised(cosines, backgrounds[a], backgrounds[b])
    counted = np.array([parts[i] is None or parts[i] != parts[j] for i, j in zip(a, b)], dtype=bool)
    truth = np.array([labels[i] == labels[j] for i, j in zip(a, b)], dtype=bool)
    return a[counted], b[counted], raw[counted], truth[counted]


def lowest_raw(aware: bool) -> float:
    """The lowest raw score a pair that can link has in the regime."""
    if aware:
        return round(neighbourhood.COSINE_FLOOR - neighbourhood.B_MAX + neighbourhood.OFFSET, 4)
    return calibration.COSINE_FIT_FLOOR


def fit_isotonic(raw: np.ndarray, truth: np.ndarray, aware: bool) -> calibration.Curve:
    """Knots of the monotone curve P(true | raw): one per isotonic block (its mean raw score, its share of
    true pairs), after a first knot at the lowest raw score that can link."""
    order = np.argsort(raw, kind="stable")
    x, y = raw[order], truth[order].astype(np.float64)
    fit = isotonic_regression(y, increasing=True)
    starts = fit.blocks[:-1]
    ends = fit.blocks[1:]
    centres = [float(x[s:e].mean()) for s, e in zip(starts, ends)]
    values = [float(fit.x[s]) for s in starts]
    knots_raw = [lowest_raw(aware)] + [round(c, 4) for c in centres]
    knots_p = [round(values[0], 4)] + [round(v, 4) for v in values]
    keep = [0] + [i for i in range(1, len(knots_raw)) if knots_raw[i] > knots_raw[i - 1]]
    return calibration.Curve(tuple(knots_raw[i] for i in keep), tuple(knots_p[i] for i in keep))


def reliability(p: np.ndarray, truth: np.ndarray) -> dict:
    which = np.clip(np.digitize(p, BINS) - 1, 0, len(BINS) - 2)
    rows, ece = [], 0.0
    for k in range(len(BINS) - 1):
        inside = which == k
        if not inside.any():
            continue
        predicted, observed = float(p[inside].mean()), float(truth[inside].mean())
        ece += inside.sum() / len(p) * abs(predicted - observed)
        rows.append({"bin": f"{BINS[k]:.1f}-{BINS[k + 1]:.1f}", "pairs": int(inside.sum()),
                     "predicted": round(predicted, 4), "observed": round(observed, 4)})
    eps = 1e-12
    log_loss = float(-np.mean(truth * np.log(p + eps) + (~truth) * np.log(1 - p + eps)))
    return {"pairs": int(len(p)), "true": int(truth.sum()), "log_loss": round(log_loss, 4),
            "brier": round(float(np.mean((p - truth) ** 2)), 4), "ece": round(float(ece), 4), "bins": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("calibration", nargs="+")
    parser.add_argument("--check", nargs="*", default=[])
    parser.add_argument("--cache", default="/tmp/neardup-tune-scores")
    parser.add_argument("--json", help="write the fit and every set's figures here")
    args = parser.parse_args()
    embedder = load_embedder()
    print(f"backend {getattr(embedder, 'backend', '?')}, model {embedder.identity['name']} "
          f"{embedder.identity['weights_sha256'][:12]}", file=sys.stderr)
    data = {s: set_vectors(s, embedder, Path(args.cache)) for s in args.calibration + args.check}
    out = {"backend": getattr(embedder, "backend", "?"), "default_threshold": DEFAULT_THRESHOLD, "regimes": {}}
    for regime, aware in (("collection_aware", True), ("cosine", False)):
        pairs = {s: regime_pairs(*data[s], aware) for s in data}
        raw = np.concatenate([pairs[s][2] for s in args.calibration])
        truth = np.concatenate([pairs[s][3] for s in args.calibration])
        fitted = fit_isotonic(raw, truth, aware)
        shipped = calibration.CURVES[aware]
        entry = {"fitted": {"raw": fitted.raw, "p": fitted.p}, "shipped": {"raw": shipped.raw, "p": shipped.p},
                 "sets": {}}
        for s in data:
            a, b, r, t = pairs[s]
            p = shipped.probability(r)
            curve = evaluation.group_pair_curve(a, b, p, data[s][1], data[s][2])
            entry["sets"][Path(s).name] = {"role": "calibration" if s in args.calibration else "check",
                                           **reliability(p, t),
                                           "dups_at_default": evaluation.at_threshold(curve, DEFAULT_THRESHOLD),
                                           "lowest_p_with_precision_0.99": evaluation.calibrate(curve)["threshold"]}
        out["regimes"][regime] = entry
        print(f"{regime}: fitted {fitted}\n  shipped {shipped}")
        for name, figures in entry["sets"].items():
            at = figures["dups_at_default"]
            print(f"  {name} ({figures['role']}): {figures['pairs']} pairs, {figures['true']} true, "
                  f"log loss {figures['log_loss']}, Brier {figures['brier']}, ECE {figures['ece']}; "
                  f"dups at p >= {DEFAULT_THRESHOLD}: P {at['precision']:.4f} R {at['recall']:.4f}; "
                  f"lowest p keeping P >= 0.99: {figures['lowest_p_with_precision_0.99']}")
            for row in figures["bins"]:
                print(f"      p {row['bin']}: {row['pairs']:6d} pairs, predicted {row['predicted']:.3f}, "
                      f"observed {row['observed']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
