"""Issue 12, routes 1 and 2 measured on the `neardup eval` sets: collection-aware scores and multi-view
embeddings of today's descriptor, against plain cosine.

    python benchmarks/recall_experiments.py /tmp/evalset1 /tmp/evalset2 /tmp/evalset3 /tmp/evalset4 [--cache DIR]

Build the sets first (`neardup eval build /tmp/evalsetN --seed N`). The first two sets calibrate (the
lowest threshold whose `dups` groups keep pair precision >= 0.99, the larger of the two, rounded up to
two decimals, as the shipped default is chosen); every set is then scored at that threshold.

Each image is decoded once; the views are made from that decode, border-trimmed first (as the default
preprocessing does), and each view goes through the default embedder:

* whole: the image;
* grey: its luminance as RGB;
* low: shrunk to LOW_SIDE px on the long side (box filter), which preprocessing scales back up to 224;
* crop: the centre CROP_FRACTION of each side.

A multi-view vector is the sum of the views' unit vectors, renormalised. The collection-aware score of a
pair is s' = s - 0.5 (b_i + b_j) + BETA, b = a file's cosine to its k-th nearest neighbour among every
other file of the collection (gallery and queries, as `dups` sees them), by exact search here; BETA, a
constant, only shifts the scale (it changes no ranking and no calibration's recall); it is
neighbourhood.OFFSET, chosen so that the default threshold of the normalised score is the same number as
for plain cosine. "clipped" variants clip b to [neighbourhood.B_MIN, neighbourhood.B_MAX] as `dups` does.

Ranking metrics (top-1, micro-AP) are those of `query`: queries against the gallery by plain cosine of
the variant's vectors. `dups` figures group every file of the collection by the variant's pair score.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from neardup.evaluation import (calibrate, group_pair_curve, load_set, micro_average_precision, ranking_metrics,
                                at_threshold)
from neardup.groups import connected_components
from neardup.images import load_image
from neardup.models import load_embedder
from neardup.models.default_model import trim_border
from neardup import neighbourhood

VIEWS = ("whole", "grey", "low", "crop")
LOW_SIDE = 100
CROP_FRACTION = 0.7
TARGET = 0.99
PAIR_FLOOR = 0.15  # cosine below which no pair is listed (unrelated photos score ~0)
FOCUS = ("thumbnail", "logo", "text", "grey", "rotate15")


def views_of(image: Image.Image) -> dict[str, Image.Image]:
    image = trim_border(image.convert("RGB"))
    w, h = image.size
    scale = LOW_SIDE / max(w, h)
    low = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX) if scale < 1 else image
    cw, ch = round(w * CROP_FRACTION), round(h * CROP_FRACTION)
    left, top = (w - cw) // 2, (h - ch) // 2
    return {"whole": image, "grey": image.convert("L").convert("RGB"), "low": low,
            "crop": image.crop((left, top, left + cw, top + ch))}


def embed_views(paths: list[str], embedder, cache: Path) -> dict[str, np.ndarray]:
    """[len(paths), dim] per view; cached per file content (the gallery repeats across seeds)."""
    cache.mkdir(parents=True, exist_ok=True)
    out = {v: np.zeros((len(paths), embedder.dim), np.float32) for v in VIEWS}
    for i, path in enumerate(paths):
        data = Path(path).read_bytes()
        key = cache / (hashlib.sha256(data).hexdigest()[:24] + ".npy")
        if key.exists():
            rows = np.load(key)
        else:
            image = load_image(data, min_side=embedder.input_size).image
            views = views_of(image)
            rows = embedder.embed(np.stack([embedder.preprocess(views[v]) for v in VIEWS]))
            np.save(key, rows)
        for j, v in enumerate(VIEWS):
            out[v][i] = rows[j]
    return out


def combine(per_view: dict[str, np.ndarray], views: tuple[str, ...]) -> np.ndarray:
    total = sum(per_view[v] for v in views)
    return total / np.linalg.norm(total, axis=1, keepdims=True)


def kth_neighbour(vectors: np.ndarray, k: int) -> np.ndarray:
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    return -np.partition(-sims, k - 1, axis=1)[:, k - 1]


class Collection:
    """One set's files: gallery then queries, with the truth `dups` is scored against."""

    def __init__(self, set_path: str, embedder, cache: Path):
        self.evalset = load_set(set_path)
        es = self.evalset
        self.seed = es.truth.get("seed")
        self.gallery_ids = [g["id"] for g in es.gallery]
        self.ng = len(es.gallery)
        paths = [es.path(g) for g in es.gallery] + [es.path(q) for q in es.queries]
        started = time.perf_counter()
        self.views = embed_views(paths, embedder, cache)
        self.embed_s = time.perf_counter() - started
        self.truths = [set(q["matches"]) for q in es.queries]
        self.edits = [q.get("edit", "?") for q in es.queries]
        labels = list(self.gallery_ids)
        labels += [q["matches"][0] if len(q["matches"]) == 1 else f"query:{q['id']}" for q in es.queries]
        self.labels = labels
        self.parts = [g.get("source") if g.get("role") == "distractor" else None for g in es.gallery] + [None] * len(es.queries)
        self.position = {gid: i for i, gid in enumerate(self.gallery_ids)}

    def ranking(self, vectors: np.ndarray, k: int = 10) -> dict:
        g, q = vectors[:self.ng], vectors[self.ng:]
        scores = q @ g.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        rankings = [[(self.gallery_ids[j], float(scores[i, j])) for j in row] for i, row in enumerate(order)]
        return ranking_metrics(rankings, self.truths, k)

    def pairs(self, vectors: np.ndarray, b: np.ndarray | None, beta: float):
        sims = vectors @ vectors.T
        a, c = np.nonzero(np.triu(sims >= PAIR_FLOOR, 1))
        s = sims[a, c].astype(np.float64)
        if b is not None:
            s = s - 0.5 * (b[a] + b[c]) + beta
        return a, c, s

    def grouped_fraction(self, a, c, s, threshold: float) -> dict:
        keep = s >= threshold
        comp = connected_components(len(self.labels), a[keep], c[keep])
        per = defaultdict(list)
        for i, (q, edit) in enumerate(zip(self.evalset.queries, self.edits)):
            per[edit].append(comp[self.ng + i] == comp[self.position[q["matches"][0]]])
        return {edit: float(np.mean(v)) for edit, v in sorted(per.items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sets", nargs="+", help="calibration sets first (two), then held-out sets")
    parser.add_argument("--cache", default="/tmp/neardup-views-cache")
    parser.add_argument("--calibrate-on", type=int, default=2, help="how many of the first sets calibrate")
    args = parser.parse_args()

    embedder = load_embedder()
    print(f"embedder: {type(embedder).__name__}, identity preprocessing {embedder.identity['preprocessing']}")
    cache = Path(args.cache) / embedder.identity["whitening_sha256"][:12]
    collections = []
    for path in args.sets:
        col = Collection(path, embedder, cache)
        print(f"{path}: seed {col.seed}, {len(col.labels)} files, views embedded in {col.embed_s:.1f} s", flush=True)
        collections.append(col)

    beta = neighbourhood.OFFSET
    median = float(np.median(np.concatenate([kth_neighbour(combine(c.views, ("whole",)), 20) for c in collections])))
    print(f"offset {beta}; median b at k = 20, one view, all seeds = {median:.4f}")
    for c in collections:
        b = kth_neighbour(combine(c.views, ("whole",)), 20)
        print(f"  seed {c.seed}: b percentiles 5/50/95/max {np.percentile(b, 5):.3f} / {np.median(b):.3f} / "
              f"{np.percentile(b, 95):.3f} / {b.max():.3f}")

    view_sets = [("whole",), ("whole", "grey", "low", "crop"), ("whole", "grey", "low"), ("whole", "low"),
                 ("whole", "grey"), ("whole", "crop"), ("whole", "low", "crop")]
    variants = []
    for views in view_sets:
        variants.append((views, None, False))
        for k in (10, 20, 30):
            if views == ("whole",) or k == 20:
                variants.append((views, k, False))
        variants.append((views, 20, True))

    rows = []
    for views, k, clipped in variants:
        name = "+".join(views) + (f", cosine" if k is None else f", collection-aware k={k}") + (", clipped" if clipped else "")
        per_seed = []
        for c in collections:
            vectors = combine(c.views, views)
            b = None if k is None else kth_neighbour(vectors, k)
            if clipped:
                b = neighbourhood.backgrounds(b)
            a, cc, s = c.pairs(vectors, b, beta)
            curve = group_pair_curve(a, cc, s, c.labels, c.parts)
            per_seed.append({"col": c, "rank": c.ranking(vectors), "curve": curve, "cal": calibrate(curve, TARGET),
                             "pairs": (a, cc, s)})
        cal = [p["cal"]["threshold"] for p in per_seed[:args.calibrate_on]]
        threshold = math.ceil(max(cal) * 100 - 1e-9) / 100 if None not in cal else None
        print(f"\n## {name}: calibrated thresholds {', '.join('%.4f' % p['cal']['threshold'] for p in per_seed)}"
              f" -> default {threshold}")
        print(f"{'seed':>4} {'top-1':>6} {'uAP':>6} {'cal thr':>8} {'R@cal':>6} {'P@T':>7} {'R@T':>6}  grouped at T: "
              + " ".join(f"{e[:9]:>9}" for e in FOCUS) + "   all-kinds-min")
        for p in per_seed:
            c = p["col"]
            at = at_threshold(p["curve"], threshold)
            grouped = c.grouped_fraction(*p["pairs"], threshold)
            print(f"{c.seed:>4} {p['rank']['top1']:>6.3f} {p['rank']['micro_AP']:>6.3f} {p['cal']['threshold']:>8.4f} "
                  f"{p['cal']['recall']:>6.3f} {at['precision']:>7.4f} {at['recall']:>6.3f}  {'':13}"
                  + " ".join(f"{grouped[e]:>9.3f}" for e in FOCUS)
                  + f"   {min(grouped.values()):.3f} ({min(grouped, key=grouped.get)})")
            rows.append((name, c.seed, p, at, grouped))
        print("    per kind (mean over seeds): " + ", ".join(
            f"{e} {np.mean([r[4][e] for r in rows if r[0] == name]):.3f}" for e in sorted(rows[-1][4])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
