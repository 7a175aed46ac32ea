"""Accuracy the way the copy-detection field measures it, for neardup and two baselines.

    neardup eval run SET [--json OUT] [--plot PR.png] [-k 10]

SET is a folder with truth.json (schema neardup.schemas.EVAL_SET; `neardup eval build` writes one) or the
JSON file itself. The run indexes the gallery with the public Index API, searches every query, and scores:

* per query: top-1 (the best match is a true match), recall@k, AP@k (mean over queries: mAP);
* micro-AP (DISC21): every (query, candidate, score) triple of every query's top k pooled, sorted by
  score, average precision against the total number of true (query, original) pairs, so one threshold
  has to serve every query;
* `dups`: every gallery image and query indexed together, groups at a threshold, pairwise
  precision/recall (a predicted pair is two files in one group; a true pair is an original and its copy,
  or two copies of one original; two distractors with the same `source`, tiles of one image, are a pair
  counted neither way), and per edit kind the fraction of copies grouped with their original; pairs are
  scored as `dups` scores them (the copy probability, neardup.calibration, of the collection-aware
  score, neardup.neighbourhood, in a set of MIN_FILES or more, else of the cosine);
* the threshold, per method, that keeps group-pair precision >= TARGET_PRECISION on this set.

Baselines, scored identically: the seed's published recipe (8-bit codes x 10 tables from random
projections of the same CNN vectors; score = colliding tables / 10, candidates = at least one collision)
and pHash (imagehash.phash, score = 1 - hamming / 64).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import calibration, neighbourhood
from .benchmark_set import TRUTH_FILE

from .errors import EvalSetError, NeardupError  # noqa: F401 (re-exported)

TARGET_PRECISION = 0.99
SEED_TABLES, SEED_BITS, SEED_PLANES_SEED = 10, 8, 0
METHODS = ("neardup", "seed_lsh", "phash")
#: Pairs scoring below these never enter the `dups` curves (unrelated photos score ~0.2 cosine and
#: ~0.5 pHash): it keeps the pair list linear in practice, and no useful threshold lies below them.
PAIR_FLOOR = {"neardup": 0.3, "phash": 0.6}


# ---- metrics (pure) ------------------------------------------------------------------------------

def average_precision(relevant: np.ndarray, n_positives: int) -> float:
    """AP of one ranked list: `relevant[i]` says whether rank i is a true match; positives missing
    from the list count as never found. 0 when there are no positives."""
    relevant = np.asarray(relevant, dtype=bool)
    if n_positives <= 0:
        return 0.0
    hits = np.cumsum(relevant)
    ranks = np.arange(1, len(relevant) + 1)
    return float(np.sum((hits / ranks)[relevant]) / n_positives)


def micro_average_precision(scores: np.ndarray, relevant: np.ndarray, n_positives: int) -> float:
    """DISC21's micro-AP: pooled triples sorted by score (ties in the given order), AP against every
    true pair, found or not."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return average_precision(np.asarray(relevant, dtype=bool)[order], n_positives)


def precision_recall_curve(scores: np.ndarray, relevant: np.ndarray, n_positives: int):
    """(precision, recall, threshold) after each distinct score, from the highest down."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    s, rel = scores[order], np.asarray(relevant, dtype=bool)[order]
    hits = np.cumsum(rel)
    last = np.r_[s[1:] != s[:-1], True] if len(s) else np.zeros(0, bool)  # end of each tie block
    n = np.arange(1, len(s) + 1)[last]
    return hits[last] / n, hits[last] / max(n_positives, 1), s[last]


def ranking_metrics(rankings: list[list[tuple[str, float]]], truths: list[set[str]], k: int) -> dict:
    """top-1, recall@k, mAP and micro-AP over queries that have at least one true match; queries without
    one only add false triples to micro-AP."""
    rankings = [ranked[:k] for ranked in rankings]
    top1, recall, aps = [], [], []
    for ranked, truth in zip(rankings, truths):
        relevant = np.array([gid in truth for gid, _ in ranked], dtype=bool)
        if not truth:
            continue
        top1.append(bool(relevant[:1].any()))
        recall.append(relevant.sum() / len(truth))
        aps.append(average_precision(relevant, len(truth)))
    return {
        "queries": len(top1),
        "top1": float(np.mean(top1)) if top1 else 0.0,
        f"recall@{k}": float(np.mean(recall)) if recall else 0.0,
        "mAP": float(np.mean(aps)) if aps else 0.0,
        "micro_AP": micro_average_precision(*_pooled(rankings, truths)),
    }


def pair_counts(groups: list[list[str]], cluster: dict[str, str], part_of: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(predicted pairs, true positive pairs, true pairs) for groups of items; `cluster` maps every item
    to its true cluster (an item alone in its cluster has no true pair). Two items with the same
    `part_of` key (tiles of one distractor image) form a pair that is not counted at all."""
    part_of = part_of or {}
    predicted = sum(len(g) * (len(g) - 1) // 2 - _same_part_pairs(g, part_of) for g in groups)
    correct = sum(c * (c - 1) // 2 for g in groups for c in Counter(cluster[x] for x in g).values())
    true = sum(c * (c - 1) // 2 for c in Counter(cluster.values()).values())
    return predicted, correct, true


def grouped_with_original(groups: list[list[str]], copies: list[str], originals: list[str], kinds: list[str]) -> dict:
    """Per edit kind (and "all"), the fraction of copies that share a group with their original."""
    group_of = {path: number for number, group in enumerate(groups) for path in group}
    per = defaultdict(list)
    for copy, original, kind in zip(copies, originals, kinds):
        together = copy in group_of and group_of.get(original) == group_of[copy]
        per[kind].append(together)
        per["all"].append(together)
    return {kind: float(np.mean(flags)) for kind, flags in sorted(per.items())}


def survivors_kept(index, groups, originals: set[str]) -> tuple[int, int]:
    """(groups whose survivor under the default --keep is their original, groups holding exactly one
    original): the figure issue 19 asks for. A survivor byte-identical to the original (the grey copy
    of a grey photo) counts as the original."""
    from . import actions
    from .store import Store

    kept = judged = 0
    with Store.open(index.root) as store:
        for group in groups:
            held = [p for p in group.files if p in originals]
            if len(held) != 1:
                continue
            survivor = actions.catalogued_survivor(store, group.files)
            judged += 1
            kept += survivor.sha256 == store.record(held[0]).sha256
    return kept, judged


def _same_part_pairs(items, part_of) -> int:
    counts = Counter(part_of[x] for x in items if part_of.get(x) is not None)
    return sum(c * (c - 1) // 2 for c in counts.values())


def group_pair_curve(a: np.ndarray, b: np.ndarray, scores: np.ndarray, labels: list, parts: list | None = None) -> dict:
    """Pairwise precision/recall of union-find groups as the threshold falls through every pair score.

    Items 0..n-1 have true cluster `labels[i]`; (a, b, scores) are the candidate pairs; pairs of items
    with the same non-None `parts[i]` are not counted (see pair_counts). Returns arrays `threshold`,
    `precision`, `recall` (one entry per distinct score, highest first) and `true_pairs`."""
    n = len(labels)
    parts = parts or [None] * n
    parent = list(range(n))
    members: list[Counter] = [Counter([labels[i]]) for i in range(n)]
    in_part: list[Counter] = [Counter([parts[i]] if parts[i] is not None else []) for i in range(n)]
    size = [1] * n
    true_pairs = sum(c * (c - 1) // 2 for c in Counter(labels).values())

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    predicted = correct = 0
    thresholds, precision, recall = [], [], []
    for i, p in enumerate(order):
        ra, rb = find(int(a[p])), find(int(b[p]))
        if ra != rb:
            if size[ra] < size[rb]:
                ra, rb = rb, ra
            predicted += size[ra] * size[rb] - sum(count * in_part[ra][key] for key, count in in_part[rb].items())
            correct += sum(count * members[ra][label] for label, count in members[rb].items())
            members[ra].update(members[rb])
            in_part[ra].update(in_part[rb])
            members[rb], in_part[rb] = Counter(), Counter()
            parent[rb], size[ra] = ra, size[ra] + size[rb]
        if i + 1 == len(order) or scores[order[i + 1]] != scores[p]:
            thresholds.append(float(scores[p]))
            precision.append(correct / predicted if predicted else 1.0)
            recall.append(correct / true_pairs if true_pairs else 0.0)
    return {"threshold": np.array(thresholds), "precision": np.array(precision), "recall": np.array(recall),
            "true_pairs": true_pairs}


def calibrate(curve: dict, target: float = TARGET_PRECISION) -> dict:
    """The lowest threshold such that every threshold at or above it keeps precision >= target."""
    precision = curve["precision"]
    bad = np.nonzero(precision < target)[0]
    last_ok = (bad[0] - 1) if len(bad) else len(precision) - 1
    if last_ok < 0:
        return {"threshold": None, "precision": None, "recall": 0.0, "target_precision": target}
    return {"threshold": float(curve["threshold"][last_ok]), "precision": float(precision[last_ok]),
            "recall": float(curve["recall"][last_ok]), "target_precision": target}


def at_threshold(curve: dict, threshold: float) -> dict:
    """Precision and recall of groups formed by every pair scoring >= threshold."""
    above = np.nonzero(curve["threshold"] >= threshold)[0]
    if not len(above):
        return {"threshold": threshold, "precision": 1.0, "recall": 0.0}
    i = above[-1]
    return {"threshold": threshold, "precision": float(curve["precision"][i]), "recall": float(curve["recall"][i])}


def pairs_above(vectors: np.ndarray, floor: float, block: int = 2048):
    """(a, b, cosine) for every pair a < b of unit vectors with cosine >= floor, blockwise."""
    found_a, found_b, found_s = [], [], []
    n = len(vectors)
    for start in range(0, n, block):
        scores = vectors[start:start + block] @ vectors.T
        a, b = np.nonzero(scores >= floor)
        keep = b > a + start
        found_a.append(a[keep] + start), found_b.append(b[keep]), found_s.append(scores[a[keep], b[keep]])
    return np.concatenate(found_a), np.concatenate(found_b), np.concatenate(found_s).astype(np.float64)


# ---- baselines -----------------------------------------------------------------------------------

def seed_codes(vectors: np.ndarray, dim: int) -> np.ndarray:
    """The seed's recipe: SEED_TABLES codes of SEED_BITS sign bits of Gaussian random projections."""
    planes = np.random.default_rng(SEED_PLANES_SEED).standard_normal((dim, SEED_TABLES * SEED_BITS))
    bits = (vectors @ planes > 0).reshape(len(vectors), SEED_TABLES, SEED_BITS)
    return (bits * (1 << np.arange(SEED_BITS))).sum(axis=2)


def seed_scores(query_codes: np.ndarray, gallery_codes: np.ndarray) -> np.ndarray:
    """Colliding tables / SEED_TABLES, [queries, gallery]."""
    return (query_codes[:, None, :] == gallery_codes[None, :, :]).mean(axis=2)


def phash_bits(paths: list[str]) -> np.ndarray:
    import imagehash
    from PIL import Image

    out = np.zeros((len(paths), 64), dtype=bool)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as im:
                out[i] = imagehash.phash(im.convert("RGB")).hash.ravel()
        except (OSError, ValueError):
            out[i] = False  # an unreadable file hashes to all zeros: it matches nothing in particular
    return out


def phash_scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 - hamming / 64, [len(a), len(b)]."""
    fa, fb = a.astype(np.float32), b.astype(np.float32)
    hamming = fa @ (1 - fb).T + (1 - fa) @ fb.T
    return 1.0 - hamming / 64.0


def top_k(scores: np.ndarray, ids: list[str], k: int, candidates: np.ndarray | None = None) -> list[tuple[str, float]]:
    """Best k (id, score), ties kept in gallery order; only `candidates` (a mask) when given."""
    positions = np.arange(len(ids)) if candidates is None else np.nonzero(candidates)[0]
    order = positions[np.argsort(-scores[positions], kind="stable")[:k]]
    return [(ids[p], float(scores[p])) for p in order]


# ---- the set -------------------------------------------------------------------------------------

@dataclass
class EvalSet:
    root: Path
    truth: dict

    @property
    def gallery(self) -> list[dict]:
        return self.truth["gallery"]

    @property
    def queries(self) -> list[dict]:
        return self.truth["queries"]

    def path(self, item: dict) -> str:
        return str((self.root / item["path"]).resolve())


def load_set(path: str | os.PathLike) -> EvalSet:
    path = Path(path)
    truth_path = path / TRUTH_FILE if path.is_dir() else path
    if not truth_path.is_file():
        raise EvalSetError(f"{truth_path}: no such file (a set is a folder with {TRUTH_FILE}; `neardup eval build OUT` makes one)")
    try:
        truth = json.loads(truth_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvalSetError(f"{truth_path}: not valid JSON: {exc}") from exc
    try:
        import jsonschema

        from .schemas import EVAL_SET

        jsonschema.validate(truth, EVAL_SET)
    except ImportError:
        pass
    except jsonschema.ValidationError as exc:
        raise EvalSetError(f"{truth_path}: does not follow the set schema: {exc.message}") from exc
    ids = {g["id"] for g in truth["gallery"]}
    if len(ids) != len(truth["gallery"]):
        raise EvalSetError(f"{truth_path}: gallery ids are not unique")
    unknown = sorted({m for q in truth["queries"] for m in q["matches"]} - ids)
    if unknown:
        raise EvalSetError(f"{truth_path}: queries name matches that are not in the gallery: {unknown[:5]}")
    return EvalSet(truth_path.parent.resolve(), truth)


# ---- the run -------------------------------------------------------------------------------------

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def _by_edit(rankings, truths, edits, k) -> dict:
    per = defaultdict(list)
    for i, edit in enumerate(edits):
        per[edit].append(i)
    return {edit: ranking_metrics([rankings[i] for i in idx], [truths[i] for i in idx], k)
            for edit, idx in sorted(per.items())}


def _curve_summary(curve: dict, points: int = 200) -> dict:
    """A thinned copy of a curve for the JSON (every point would be one per distinct pair score)."""
    n = len(curve["threshold"])
    keep = np.unique(np.linspace(0, n - 1, min(points, n)).astype(int)) if n else np.zeros(0, int)
    return {"threshold": curve["threshold"][keep].round(6).tolist(), "precision": curve["precision"][keep].round(6).tolist(),
            "recall": curve["recall"][keep].round(6).tolist()}


def run(set_path: str | os.PathLike, *, k: int = 10, baselines: bool = True, threshold: float | None = None,
        index_dir: str | os.PathLike | None = None, embedder=None, progress: Progress | None = None) -> dict:
    """Evaluate neardup (and the baselines) on a set; returns the result (schema neardup.schemas.EVAL_RESULT)."""
    from .images import ImageError
    from .index import DEFAULT_THRESHOLD, Index

    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    progress = progress or (lambda stage, done, total: None)
    evalset = load_set(set_path)
    gallery_ids = [g["id"] for g in evalset.gallery]
    gallery_paths = [evalset.path(g) for g in evalset.gallery]
    query_paths = [evalset.path(q) for q in evalset.queries]
    truths = [set(q["matches"]) for q in evalset.queries]
    edits = [q.get("edit", "unlabelled") for q in evalset.queries]
    id_of_path = dict(zip(gallery_paths, gallery_ids))
    id_to_path = dict(zip(gallery_ids, gallery_paths))
    timings = {}
    with tempfile.TemporaryDirectory(prefix="neardup-eval-") as tmp:
        root = Path(index_dir) if index_dir else Path(tmp) / "index"
        with Index.open(root, create=True, embedder=embedder) as index:
            started = time.perf_counter()
            summary = index.add(gallery_paths, progress=lambda d, t, f: progress("index gallery", d, t))
            timings["index_gallery_s"] = time.perf_counter() - started
            failed = {p for p, _ in summary.failures}

            def embed_all(paths: list[str], stage: str) -> tuple[np.ndarray, list[bool]]:
                vectors, ok = np.zeros((len(paths), index.embedder.dim), np.float32), []
                for i, p in enumerate(paths):
                    try:
                        vectors[i] = index.embed(p)
                        ok.append(True)
                    except ImageError:
                        ok.append(False)
                    progress(stage, i + 1, len(paths))
                return vectors, ok

            started = time.perf_counter()
            qvec, qok = embed_all(query_paths, "embed queries")
            timings["embed_queries_s"] = time.perf_counter() - started
            ranked = {"exact": [], "lsh": []}
            started = time.perf_counter()
            for v, ok in zip(qvec, qok):
                for mode, exact in (("exact", True), ("lsh", False)):
                    matches = index.query_vector(v, k, exact=exact) if ok else []
                    ranked[mode].append([(id_of_path[m.path], m.score) for m in matches])
            timings["search_s"] = time.perf_counter() - started
            gvec, gok = embed_all(gallery_paths, "embed gallery")
            gok = [ok and p not in failed for ok, p in zip(gok, gallery_paths)]

            # dups: queries join the gallery in the index; ground truth clusters by original
            cluster = dict(id_of_path)
            part_of = {p: g["source"] for p, g in zip(gallery_paths, evalset.gallery)
                       if g.get("role") == "distractor" and g.get("source")}
            for p, q in zip(query_paths, evalset.queries):
                cluster[p] = q["matches"][0] if len(q["matches"]) == 1 else f"query:{q['id']}"
            index.add(query_paths, progress=lambda d, t, f: progress("index queries", d, t))
            dups = {}
            originals = [id_to_path[q["matches"][0]] for q in evalset.queries]
            original_paths = {id_to_path[g["id"]] for g in evalset.gallery if g.get("role") == "original"}
            for mode, exact in (("lsh", False), ("exact", True)):
                started = time.perf_counter()
                found = index.duplicates(threshold, exact=exact)
                elapsed = time.perf_counter() - started
                groups = [g.files for g in found]
                kept, judged = survivors_kept(index, found, original_paths)
                predicted, correct, true = pair_counts(groups, cluster, part_of)
                dups[mode] = {"threshold": threshold, "groups": len(groups), "predicted_pairs": predicted,
                              "correct_pairs": correct, "true_pairs": true,
                              "precision": correct / predicted if predicted else 1.0,
                              "recall": correct / true if true else 0.0, "seconds": elapsed,
                              "collection_aware": neighbourhood.applies(len(index.snapshot())),
                              "grouped_with_original": grouped_with_original(groups, query_paths, originals, edits),
                              "survivor_is_original": kept / judged if judged else None, "survivor_groups": judged}

    all_paths = gallery_paths + query_paths
    all_ok = np.array(gok + qok)
    labels = [cluster[p] if ok else f"unreadable:{p}" for p, ok in zip(all_paths, all_ok)]
    parts = [part_of.get(p) for p in all_paths]
    methods: dict = {}
    curves: dict = {}

    # neardup: exact search ranks and cosine pairs
    allvec = np.concatenate([gvec, qvec])
    a, b, s = pairs_above(_masked(allvec, all_ok), PAIR_FLOOR["neardup"])
    aware = neighbourhood.applies(int(all_ok.sum()))
    if aware:  # the raw score `dups` reads (see neighbourhood), then its copy probability (calibration)
        backgrounds = neighbourhood.backgrounds(neighbourhood.kth_exact(_masked(allvec, all_ok)))
        s = neighbourhood.normalised(s, backgrounds[a], backgrounds[b])
    s = calibration.probability(s, aware)
    curve = group_pair_curve(a, b, s, labels, parts)
    methods["neardup"] = _method_result(ranked["exact"], truths, edits, k, curve, threshold)
    methods["neardup"]["lsh_search"] = ranking_metrics(ranked["lsh"], truths, k)
    methods["neardup"]["dups"] = dups
    curves["neardup"] = (ranked["exact"], curve)

    if baselines:
        gcodes, qcodes = seed_codes(gvec, gvec.shape[1]), seed_codes(qvec, qvec.shape[1])
        sq = seed_scores(qcodes, gcodes)
        seed_ranked = [top_k(sq[i], gallery_ids, k, sq[i] > 0) if qok[i] else [] for i in range(len(query_paths))]
        allcodes = np.concatenate([gcodes, qcodes])
        ss = seed_scores(allcodes, allcodes)
        a, b = np.nonzero(np.triu(ss > 0, 1) & all_ok[:, None] & all_ok[None, :])
        curve = group_pair_curve(a, b, ss[a, b], labels, parts)
        methods["seed_lsh"] = _method_result(seed_ranked, truths, edits, k, curve, None)
        curves["seed_lsh"] = (seed_ranked, curve)

        started = time.perf_counter()
        progress("phash", 0, len(all_paths))
        bits = phash_bits(all_paths)
        timings["phash_s"] = time.perf_counter() - started
        ng = len(gallery_paths)
        ps = phash_scores(bits, bits)
        ph_ranked = [top_k(ps[ng + i, :ng], gallery_ids, k) if qok[i] else [] for i in range(len(query_paths))]
        a, b = np.nonzero(np.triu(ps >= PAIR_FLOOR["phash"], 1) & all_ok[:, None] & all_ok[None, :])
        curve = group_pair_curve(a, b, ps[a, b], labels, parts)
        methods["phash"] = _method_result(ph_ranked, truths, edits, k, curve, None)
        curves["phash"] = (ph_ranked, curve)

    result = {
        "set": str(evalset.root), "k": k, "default_threshold": threshold,
        "gallery": len(gallery_paths), "originals": sum(1 for g in evalset.gallery if g.get("role") == "original"),
        "distractors": sum(1 for g in evalset.gallery if g.get("role") == "distractor"),
        "queries": len(query_paths), "unreadable": [p for p, ok in zip(all_paths, all_ok) if not ok],
        "edits": sorted(set(edits)), "methods": methods,
        "timings": {key: round(v, 3) for key, v in timings.items()},
    }
    result["_curves"] = curves  # for the plot; dropped before writing JSON
    result["_truths"] = truths
    return result


def _masked(vectors: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Unreadable files get a vector orthogonal to everything (they pair with nothing above 0)."""
    out = vectors.copy()
    out[~ok] = 0.0
    return out


def _method_result(rankings, truths, edits, k, curve, threshold) -> dict:
    out = {"overall": ranking_metrics(rankings, truths, k), "per_edit": _by_edit(rankings, truths, edits, k),
           "calibration": calibrate(curve), "pairs_curve": _curve_summary(curve)}
    if threshold is not None:
        out["at_default_threshold"] = at_threshold(curve, threshold)
    return out


def public(result: dict) -> dict:
    """The result without the in-memory curves (what --json writes)."""
    return {key: value for key, value in result.items() if not key.startswith("_")}


# ---- output --------------------------------------------------------------------------------------

LABELS = {"neardup": "neardup (CNN, cosine)", "seed_lsh": "seed recipe (8 bit x 10 tables)", "phash": "pHash"}


def table(result: dict) -> str:
    """A plain-text report: per method and per edit kind, then the `dups` figures."""
    k = result["k"]
    rows = [(f"set {result['set']}: {result['originals']} originals, {result['distractors']} distractors, "
             f"{result['queries']} queries, k = {k}")]
    methods = [m for m in METHODS if m in result["methods"]]
    head = f"{'edit':<26}" + "".join(f"{m + ' top1/R@k/mAP/uAP':>36}" for m in methods)
    rows.append(head)

    def cells(metrics: dict) -> str:
        return f"{metrics['top1']:.3f} / {metrics[f'recall@{k}']:.3f} / {metrics['mAP']:.3f} / {metrics['micro_AP']:.3f}"

    edits = result["edits"]
    ours = result["methods"]["neardup"]
    grouped = ours["dups"]["lsh"].get("grouped_with_original", {})
    rows[-1] += f"{'grouped at ' + str(result['default_threshold']):>20}"
    for edit in edits:
        rows.append(f"{edit:<26}" + "".join(f"{cells(result['methods'][m]['per_edit'][edit]):>36}" for m in methods)
                    + f"{grouped.get(edit, float('nan')):>20.3f}")
    rows.append(f"{'ALL':<26}" + "".join(f"{cells(result['methods'][m]['overall']):>36}" for m in methods)
                + f"{grouped.get('all', float('nan')):>20.3f}")
    rows.append(f"neardup through the LSH tables: {cells(ours['lsh_search'])}")
    for mode, d in ours["dups"].items():
        rows.append(f"dups ({mode}) at threshold {d['threshold']}: {d['groups']} groups, pair precision "
                    f"{d['precision']:.4f}, recall {d['recall']:.4f} ({d['correct_pairs']}/{d['predicted_pairs']} "
                    f"predicted pairs right, {d['true_pairs']} true pairs)")
        if d.get("survivor_groups"):
            rows.append(f"  survivor (default --keep) is the original in {d['survivor_is_original']:.3f} of the "
                        f"{d['survivor_groups']} groups holding one original")
    for m in methods:
        c = result["methods"][m]["calibration"]
        if c["threshold"] is None:
            rows.append(f"{m}: no threshold reaches pair precision {c['target_precision']}")
        else:
            rows.append(f"{m}: lowest threshold with group-pair precision >= {c['target_precision']}: "
                        f"{c['threshold']:.4f} (precision {c['precision']:.4f}, recall {c['recall']:.4f})")
    return "\n".join(rows)


def plot(result: dict, out: str | os.PathLike) -> None:
    """Precision-recall of the pooled query triples (micro-AP) and of `dups` groups, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for m, (rankings, curve) in result["_curves"].items():
        scores, relevant, n_true = _pooled(rankings, result["_truths"])
        p, r, _ = precision_recall_curve(scores, relevant, n_true)
        uap = result["methods"][m]["overall"]["micro_AP"]
        left.plot(r, p, label=f"{LABELS[m]}: micro-AP {uap:.3f}")
        right.plot(curve["recall"], curve["precision"], label=LABELS[m])
    default = result["methods"]["neardup"].get("at_default_threshold")
    if default:
        right.plot([default["recall"]], [default["precision"]], "o", color="black",
                   label=f"neardup at threshold {default['threshold']}")
    left.set(title="queries: pooled (query, match, score) triples", xlabel="recall", ylabel="precision",
             xlim=(0, 1.01), ylim=(0, 1.01))
    right.set(title="dups: pairwise precision/recall of groups", xlabel="recall", ylabel="precision",
              xlim=(0, 1.01), ylim=(0, 1.01))
    left.legend(loc="lower left"), right.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _pooled(rankings, truths):
    """Every (score, is-true) of the rankings pooled over queries, and the number of true pairs."""
    scores, relevant, n_true = [], [], 0
    for ranked, truth in zip(rankings, truths):
        scores += [s for _, s in ranked]
        relevant += [gid in truth for gid, _ in ranked]
        n_true += len(truth)
    return np.array(scores), np.array(relevant, bool), n_true
