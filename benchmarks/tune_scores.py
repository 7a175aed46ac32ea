"""Re-tune the collection-aware score's constants and the default threshold for the shipped descriptor on
the `neardup eval` sets (issue 22 part 3: calibrate on seeds 1-2, check on the others).

    python benchmarks/tune_scores.py /tmp/evalsets/seed1 /tmp/evalsets/seed2 --check /tmp/evalsets/seed3 ... [--cache DIR]

Every gallery and query file of a set is embedded once by the default backend (what `neardup eval run` and
`dups` use; cached per set and model) and labelled as `neardup.evaluation.run` labels them. For each
setting of (COSINE_FLOOR, B_MIN, B_MAX) of neardup.neighbourhood, the group-pair precision/recall curve of
`dups` groups is computed exactly (evaluation.group_pair_curve); the calibration sets give the lowest
threshold keeping precision >= 0.99 on each, the larger one rounded up to two decimals is the candidate
default, and every set is scored at it. The plain-cosine regime (collections under 80 files) is scored
the same way. Prints one line per setting, best calibration recall first.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np

from neardup import evaluation, neighbourhood
from neardup.models import load_embedder


def set_vectors(set_path: str, embedder, cache: Path) -> tuple[np.ndarray, list, list]:
    evalset = evaluation.load_set(set_path)
    gallery = [evalset.path(g) for g in evalset.gallery]
    queries = [evalset.path(q) for q in evalset.queries]
    cluster = {p: g["id"] for p, g in zip(gallery, evalset.gallery)}
    for p, q in zip(queries, evalset.queries):
        cluster[p] = q["matches"][0] if len(q["matches"]) == 1 else f"query:{q['id']}"
    part_of = {p: g["source"] for p, g in zip(gallery, evalset.gallery) if g.get("role") == "distractor" and g.get("source")}
    paths = gallery + queries
    key = hashlib.sha256(json.dumps([str(Path(set_path).resolve()), embedder.identity, getattr(embedder, "backend", "")],
                                    sort_keys=True).encode()).hexdigest()[:16]
    file = cache / f"vectors-{Path(set_path).name}-{key}.npy"
    if file.is_file():
        vectors = np.load(file)
    else:
        import tempfile

        from neardup.images import ImageError
        from neardup.index import Index

        vectors = np.zeros((len(paths), embedder.dim), np.float32)
        with tempfile.TemporaryDirectory() as tmp, Index.open(Path(tmp) / "index", create=True, embedder=embedder) as index:
            for i, p in enumerate(paths):  # the index's own decode and embedding, as `neardup eval run`
                try:
                    vectors[i] = index.embed(p)
                except ImageError:
                    pass
        cache.mkdir(parents=True, exist_ok=True)
        np.save(file, vectors)
    labels = [cluster[p] if np.any(v) else f"unreadable:{p}" for p, v in zip(paths, vectors)]
    return vectors, labels, [part_of.get(p) for p in paths]


def curve_of(vectors, labels, parts, floor, b_min, b_max, aware=True) -> dict:
    if not aware:
        a, b, s = evaluation.pairs_above(vectors, floor)
        return evaluation.group_pair_curve(a, b, s, labels, parts)
    kth = neighbourhood.kth_exact(vectors)
    bg = np.clip(kth, b_min, b_max)
    pair_floor = floor
    a, b, s = evaluation.pairs_above(vectors, pair_floor)
    scores = s - 0.5 * (bg[a] + bg[b]) + neighbourhood.OFFSET
    return evaluation.group_pair_curve(a, b, scores, labels, parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("calibration", nargs="+")
    parser.add_argument("--check", nargs="*", default=[])
    parser.add_argument("--cache", default="/tmp/neardup-tune-scores")
    parser.add_argument("--floors", type=float, nargs="+", default=[0.40, 0.45, 0.50, 0.55])
    parser.add_argument("--b-mins", type=float, nargs="+", default=[0.10, 0.15])
    parser.add_argument("--b-maxes", type=float, nargs="+", default=[0.45])
    args = parser.parse_args()
    embedder = load_embedder()
    print(f"backend {getattr(embedder, 'backend', '?')}, model {embedder.identity['name']} "
          f"{embedder.identity['weights_sha256'][:12]}", file=sys.stderr)
    data = {s: set_vectors(s, embedder, Path(args.cache)) for s in args.calibration + args.check}
    rows = []
    settings = [("plain", f, None, None) for f in args.floors] + \
               [("aware", f, lo, hi) for f, lo, hi in itertools.product(args.floors, args.b_mins, args.b_maxes)]
    for regime, floor, b_min, b_max in settings:
        curves = {s: curve_of(*data[s], floor, b_min, b_max, aware=regime == "aware") for s in data}
        calibrated = [evaluation.calibrate(curves[s]) for s in args.calibration]
        if any(c["threshold"] is None for c in calibrated):
            continue
        threshold = math.ceil(max(c["threshold"] for c in calibrated) * 100) / 100
        scored = {Path(s).name: evaluation.at_threshold(curves[s], threshold) for s in data}
        rows.append({"regime": regime, "floor": floor, "b_min": b_min, "b_max": b_max, "threshold": threshold,
                     "calibrated": [round(c["threshold"], 4) for c in calibrated],
                     "sets": {n: (round(r["precision"], 4), round(r["recall"], 4)) for n, r in scored.items()}})
    rows.sort(key=lambda r: (r["regime"], -min(v[1] for k, v in r["sets"].items())))
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
