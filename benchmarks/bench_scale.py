"""Scale benchmark (not a test): query and the default `dups` over N synthetic unit vectors (default
1,000,000) with planted near-duplicates, against exact search and FAISS, in one run.

Data, per variant (`--variants random,cone,photos`):
  * random: base vectors uniform on the sphere (unrelated cosine ~0), 1280-d;
  * cone:   base vectors normalise(0.5 * mu + g), g ~ N(0, I/d): unrelated cosine ~0.2, like the
            EfficientNet GAP vectors users have (the index is not centred, as for real photos);
  * cone-centred: the same data hashed after subtracting a center estimated from 10,000 vectors;
  * photos: 768-d vectors whose neighbourhoods look like real photos' descriptors (photos_variant.py,
            PHOTOS_VARIANT.md), 1 % more held back for the k-NN graph's incremental update.
  Planted: G = min(10,000, N / 20) originals, each with 2 indexed copies at cosine U(0.8, 0.99) to it;
  queries are fresh copies (not indexed) of random originals at cosine U(0.8, 0.99).

The vectors go chunk by chunk (float32, 50,000 rows) through the real index format (Store.commit:
float16 segments + codes), so the queries run `Index.query_vector` on memory-mapped segments. The
exact oracle is computed on the float32 vectors during generation (blocked brute force), never all
in memory. Recall of a query = share of the vectors with exact cosine >= 0.8 in its exact top 10 that
the method returns in its top 10. The k-NN graph is built as `neardup index` builds it (timed), then
updated for the held-back rows (timed). `dups` (`Index.duplicates` at the default threshold) runs in a
subprocess that reports its wall time, CPU time and peak RSS (VmHWM, mapped file pages included); its
oracles: every planted pair, every pair >= 0.8 between 1,000 sampled rows and the whole collection, and
(`--oracle-rows`) the links of sampled rows against exact b by brute force. The run ends with one
`scale:` line per variant.

    python benchmarks/bench_scale.py [--n 1000000] [--queries 200] [--variants random,cone,photos]
        [--no-baselines] [--oracle-rows 100] [--keep | --reuse] [--json out.json]
"""

from __future__ import annotations

import os
import sys

# single-query latency with one BLAS thread (as FAISS below): on 2 shared cores a multi-threaded BLAS
# call for one vector waits on a descheduled sibling thread and costs milliseconds. The dups child runs
# with the machine's own threads, as a user's `neardup dups` does (unless the caller set them).
CHILD_ENV = dict(os.environ)
if "--pairs-child" not in sys.argv:
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json
import platform
import resource
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np  # noqa: E402

from neardup import calibration, lsh  # noqa: E402
from neardup.index import (DEFAULT_THRESHOLD, LSH_SEED, NUM_TABLES, QUERY_PROBES, QUERY_PROBES_UNCENTRED, SHORTLIST,  # noqa: E402
                           STORED_BITS, Index, query_bits)
from neardup.store import Record, Store  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import photos_variant  # noqa: E402

DIM = 1280
CHUNK = 50_000
K = 10
RELEVANT = 0.8
COPIES = 2
SAMPLE = 1_000


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


copies_of = photos_variant.copies_of  # one copy of each original at cosine U(0.8, 0.99)


def base_chunk(rng, rows: int, variant: str, mu: np.ndarray) -> np.ndarray:
    g = rng.standard_normal((rows, DIM), dtype=np.float32) / np.float32(np.sqrt(DIM))
    return unit(g if variant == "random" else 0.5 * mu + g)


def build(work: Path, n: int, queries: int, variant: str, seed: int, extra: int = 0) -> dict:
    """Write the index, return the queries, the exact oracle and the planted pairs; for the photos
    variant also `extra` more rows of the same collection, held back (the incremental step)."""
    rng = np.random.default_rng(seed)
    dim = photos_variant.DIM if variant == "photos" else DIM
    mu = unit(rng.standard_normal((1, DIM), dtype=np.float32))[0]
    groups = min(10_000, n // 20)
    chunk = max(CHUNK, groups * (1 + COPIES))
    planes = lsh.make_planes(dim, NUM_TABLES, STORED_BITS, LSH_SEED)
    photos = photos_variant.PhotosVariant(seed, n + extra, planted=groups).chunks(chunk) if variant == "photos" else None
    held: list[np.ndarray] = []
    store = Store.open(work, create=True, write=True)
    store.save_planes(planes)
    center = None
    query_vectors = sample = None
    top_rows = np.zeros((queries, 0), np.int64)
    top_scores = np.zeros((queries, 0), np.float32)
    sample_list: list[tuple[int, int]] = []
    planted = None
    hash_seconds = commit_seconds = 0.0
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        if photos is not None:  # the model's rows, planted copies included; rows past n are held back
            vectors = next(photos)[1]
            held.append(vectors[rows:])
            vectors = vectors[:rows]
        else:
            vectors = base_chunk(rng, rows, variant, mu)
        if start == 0:
            originals = vectors[:groups]
            for c in range(COPIES if photos is None else 0):
                vectors[groups * (1 + c) : groups * (2 + c)] = copies_of(rng, originals)
            # planted pairs: original-copy and copy-copy, with their exact float32 cosine
            a = np.r_[np.arange(groups), np.arange(groups), groups + np.arange(groups)]
            b = np.r_[groups + np.arange(groups), 2 * groups + np.arange(groups), 2 * groups + np.arange(groups)]
            planted = (a, b, lsh.row_dots(vectors[a], vectors[b]))
            picks = rng.integers(0, groups, queries)
            query_vectors = copies_of(rng, originals[picks])
            sample_rows = rng.choice(np.arange(groups * (1 + COPIES), rows), min(SAMPLE, rows - groups * 3), replace=False)
            sample = vectors[sample_rows]
            if variant == "cone-centred":
                center = vectors[groups * 3 : groups * 3 + 10_000].mean(axis=0)
            elif photos is not None:  # whitened descriptors are centred: the default model's center is the origin
                center = np.zeros(dim, np.float32)
            store.set_meta("lsh", {"tables": NUM_TABLES, "bits": STORED_BITS, "seed": LSH_SEED,
                                   "center": None if center is None else [float(x) for x in center]})
            store.set_meta("model", {"name": f"synthetic-{variant}", "dim": dim})
        t0 = time.perf_counter()
        codes = lsh.hash_vectors(vectors, planes, NUM_TABLES, center)
        t1 = time.perf_counter()
        records = [Record(f"/synthetic/{i}", 1, 1, None) for i in range(start, start + rows)]
        store.commit(vectors=vectors, codes=codes, indexed=records)
        t2 = time.perf_counter()
        hash_seconds += t1 - t0
        commit_seconds += t2 - t1
        # exact oracle, float32, blocked: running top-K of every query, pairs of the sample
        scores = query_vectors @ vectors.T
        cand_rows = np.c_[top_rows, np.broadcast_to(np.arange(start, start + rows), (queries, rows))]
        cand_scores = np.c_[top_scores, scores]
        best = np.argsort(-cand_scores, axis=1)[:, :K]
        top_rows = np.take_along_axis(cand_rows, best, axis=1)
        top_scores = np.take_along_axis(cand_scores, best, axis=1)
        sample_hits = np.argwhere(sample @ vectors.T >= RELEVANT)
        sample_list += [(int(sample_rows[i]), start + int(j)) for i, j in sample_hits if sample_rows[i] != start + j]
        print(f"  {variant}: {start + rows:,} / {n:,} vectors written", file=sys.stderr, flush=True)
    if photos is not None:
        held.extend(vectors for _, vectors in photos)
    store.close()
    return {"held_back": np.concatenate(held)[:extra] if held else None,"queries": query_vectors, "top_rows": top_rows, "top_scores": top_scores, "planted": planted,
            "sample_pairs": sample_list, "hash_seconds": hash_seconds, "commit_seconds": commit_seconds,
            "groups": groups}


def reused(work: Path, queries: int, seed: int) -> dict:
    """The queries, their exact oracle and the planted pairs of an index a `--keep` run left (rows 0..G-1
    originals, G..3G-1 their copies, as `build` writes them); the sampled pairs are not recomputed."""
    snap = Index.open(work).snapshot()
    n = len(snap)
    rows_of = np.array([row_of(p) for p in snap.paths])
    groups = min(10_000, n // 20)
    rng = np.random.default_rng(seed + 100)
    originals = lsh.normalise_rows(snap.vectors(np.searchsorted(rows_of, rng.integers(0, groups, queries)), dtype=None))
    query_vectors = copies_of(rng, originals)
    top_rows, top_scores = np.zeros((queries, 0), np.int64), np.zeros((queries, 0), np.float32)
    for start in range(0, n, CHUNK):
        at = np.arange(start, min(start + CHUNK, n))
        scores = query_vectors @ lsh.normalise_rows(snap.vectors(at, dtype=None)).T
        cand_rows = np.c_[top_rows, np.broadcast_to(rows_of[at], scores.shape)]
        cand_scores = np.c_[top_scores, scores]
        best = np.argsort(-cand_scores, axis=1)[:, :K]
        top_rows, top_scores = np.take_along_axis(cand_rows, best, axis=1), np.take_along_axis(cand_scores, best, axis=1)
    g = np.arange(groups)
    a, b = np.r_[g, g, groups + g], np.r_[groups + g, 2 * groups + g, 2 * groups + g]
    pos = np.searchsorted(rows_of, np.r_[a, b])
    vectors = lsh.normalise_rows(snap.vectors(pos, dtype=None))
    cos = lsh.row_dots(vectors[: len(a)], vectors[len(a):])
    return {"queries": query_vectors, "top_rows": top_rows, "top_scores": top_scores, "planted": (a, b, cos),
            "sample_pairs": [], "hash_seconds": 0.0, "held_back": None, "groups": groups}


def recall(found: list[np.ndarray], top_rows: np.ndarray, top_scores: np.ndarray) -> float:
    hit = total = 0
    for rows, exact_rows, exact_scores in zip(found, top_rows, top_scores):
        relevant = set(exact_rows[exact_scores >= RELEVANT].tolist())
        hit += len(relevant & set(np.asarray(rows).tolist()))
        total += len(relevant)
    return hit / total if total else float("nan")


def percentiles(ms: list[float]) -> dict:
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def row_of(path: str) -> int:
    return int(path.rsplit("/", 1)[1])


def bench_queries(work: Path, data: dict, exact_queries: int, baselines: bool = True) -> dict:
    import faiss

    faiss.omp_set_num_threads(1)  # single-query latency; FAISS' default threads are erratic on 2 cores
    queries, top_rows, top_scores = data["queries"], data["top_rows"], data["top_scores"]
    results = {}
    index = Index.open(work)
    t0 = time.perf_counter()
    state = index._search_state(build_tables=True)
    build_seconds = time.perf_counter() - t0
    n = len(state.snap)
    ms, found = [], []
    for q in queries:
        t = time.perf_counter()
        matches = index.query_vector(q, k=K, exact=False)
        ms.append((time.perf_counter() - t) * 1e3)
        found.append([row_of(m.path) for m in matches])
    planes, center = index._lsh_state(index._reader)
    probes = QUERY_PROBES if center is not None else QUERY_PROBES_UNCENTRED
    candidates = []
    for q in queries[:50]:
        projections = lsh.project(q[None], planes, center)
        codes = lsh.hash_vectors(q[None], planes, NUM_TABLES, projections=projections)
        candidates.append(len(state.tables.candidates(codes[0], projections=projections[0], probes=probes)))
    results["neardup LSH (Index.query_vector)"] = {
        **percentiles(ms), "recall": round(recall(found, top_rows, top_scores), 4),
        "build_s": round(build_seconds, 2), "k_bits": state.tables.k, "tables": state.tables.num_tables,
        "probes": probes,
        "mean_candidates": int(np.mean(candidates)),
        "memory_mb": round((state.tables.rows.nbytes + state.tables.offsets.nbytes + state.words.nbytes) / 2**20, 1)}
    if not baselines:
        index.close()
        return results
    ms, found = [], []
    for q in queries[:exact_queries]:
        t = time.perf_counter()
        matches = index.query_vector(q, k=K, exact=True)
        ms.append((time.perf_counter() - t) * 1e3)
        found.append([row_of(m.path) for m in matches])
    results["neardup exact scan (float16 segments)"] = {
        **percentiles(ms), "recall": round(recall(found, top_rows[:exact_queries], top_scores[:exact_queries]), 4),
        "queries": exact_queries}
    # FAISS IndexBinaryFlat over the same 512-bit codes: Hamming top SHORTLIST, then the same cosine re-rank
    words = state.words
    binary = faiss.IndexBinaryFlat(words.shape[1] * 64)
    t0 = time.perf_counter()
    binary.add(np.ascontiguousarray(words).view(np.uint8))
    binary_build = time.perf_counter() - t0
    ms, found = [], []
    query_words = lsh.code_words(lsh.hash_vectors(queries, planes, NUM_TABLES, center)).view(np.uint8)
    for q, qw in zip(queries, query_words):
        t = time.perf_counter()
        _, rows = binary.search(qw[None], SHORTLIST)
        rows = rows[0][rows[0] >= 0]
        scores = lsh.cosines(state.snap.vectors(rows, dtype=None), q)
        best = rows[lsh.top_k(scores, K)]
        ms.append((time.perf_counter() - t) * 1e3)
        found.append(best)
    results[f"FAISS IndexBinaryFlat (512-bit codes, top {SHORTLIST} re-ranked)"] = {
        **percentiles(ms), "recall": round(recall(found, top_rows, top_scores), 4), "build_s": round(binary_build, 2),
        "memory_mb": round(words.nbytes / 2**20, 1)}
    del binary
    # FAISS IndexFlatIP, exact float32: in blocks of 125,000 rows (the whole float32 matrix, 5.1 GB at 1M,
    # is over this machine's shared memory budget); a query's time is the sum over blocks
    flat_queries = queries[:exact_queries * 4]
    block = 125_000
    per_query = np.zeros(len(flat_queries))
    best_rows = np.zeros((len(flat_queries), 0), np.int64)
    best_scores = np.zeros((len(flat_queries), 0), np.float32)
    flat_build = 0.0
    for start in range(0, n, block):
        positions = np.arange(start, min(start + block, n))
        t0 = time.perf_counter()
        flat = faiss.IndexFlatIP(queries.shape[1])
        flat.add(lsh.normalise_rows(state.snap.vectors(positions, dtype=None)))
        flat_build += time.perf_counter() - t0
        for i, q in enumerate(flat_queries):
            t = time.perf_counter()
            flat.search(q[None], K)
            per_query[i] += time.perf_counter() - t
        scores, rows = flat.search(flat_queries, K)
        best_rows = np.c_[best_rows, rows + start]
        best_scores = np.c_[best_scores, scores]
        del flat
    order = np.argsort(-best_scores, axis=1)[:, :K]
    found = list(np.take_along_axis(best_rows, order, axis=1))
    results["FAISS IndexFlatIP (exact, float32, 1 thread)"] = {
        **percentiles(list(per_query * 1e3)), "recall": round(recall(found, top_rows[: len(flat_queries)],
                                                                     top_scores[: len(flat_queries)]), 4),
        "build_s": round(flat_build, 2), "queries": len(flat_queries)}
    index.close()
    return results


def bench_pairs(work: Path, data: dict, threshold: float) -> dict:
    """Run Index.duplicates in a fresh process: wall time and peak RSS of the whole call."""
    out = work.parent / "pairs.json"
    subprocess.run([sys.executable, __file__, "--pairs-child", str(work), str(threshold), str(out)], check=True,
                   env=CHILD_ENV)
    child = json.loads(out.read_text())
    group_of = {}
    for g, members in enumerate(child["groups"]):
        for m in members:
            group_of[m] = g
    # `threshold` is dups' copy probability, not a cosine: the planted pairs that must be grouped are the ones
    # a plain cosine at that probability would link (all of them: planted copies are at cosine >= 0.8)
    a, b, s = data["planted"]
    floor = calibration.raw_threshold(threshold, aware=False)
    planted = [(int(x), int(y)) for x, y, c in zip(a, b, s) if c >= floor]
    sampled = data["sample_pairs"]
    together = lambda x, y: x in group_of and group_of.get(x) == group_of.get(y)  # noqa: E731
    return {"threshold": threshold, "seconds": child["seconds"], "cpu_s": child["cpu_s"], "peak_rss_mb": child["peak_rss_mb"],
            "groups": len(child["groups"]),
            "planted_pairs": len(planted), "planted_recall": round(sum(together(*p) for p in planted) / max(1, len(planted)), 4),
            "sample_pairs": len(sampled), "sample_recall": round(sum(together(*p) for p in sampled) / max(1, len(sampled)), 4)
            if sampled else None}


def pairs_child(work: str, threshold: float, out: str) -> None:
    """`dups` as a fresh process runs it: Index.duplicates over the stored graph (issue 18)."""
    index = Index.open(work)
    t0 = time.perf_counter()
    groups = index.duplicates(threshold)
    seconds = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # VmHWM, not ru_maxrss: Linux carries the parent's RSS at fork into the child's ru_maxrss
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    figures = {"seconds": round(seconds, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
               "peak_rss_mb": round(int(status["VmHWM"].split()[0]) / 1024)}
    print(f"  dups child: {figures}", file=sys.stderr, flush=True)
    Path(out).write_text(json.dumps({**figures, "groups": [[row_of(f) for f in g.files] for g in groups]}))


def bench_graph(work: Path, held: np.ndarray | None = None) -> dict:
    """The k-NN graph as `neardup index` keeps it: with `held` None its full build over the written rows,
    else the incremental update after `held` more rows are committed (1 % of the collection)."""
    from neardup.index import update_graph

    with Store.open(work, write=True) as store:
        n = store.counts()["indexed"]
        if held is not None:
            codes = lsh.hash_vectors(held, store.load_planes(), NUM_TABLES)
            store.commit(vectors=held, codes=codes, indexed=[Record(f"/synthetic/{n + i}", 1, 1, None) for i in range(len(held))])
        t0 = time.perf_counter()
        graph = update_graph(store)
        seconds = round(time.perf_counter() - t0, 1)
    what = "built" if held is None else f"updated for {len(held):,} more rows"
    print(f"  graph over {len(graph):,} rows {what} in {seconds} s", file=sys.stderr, flush=True)
    return {"seconds": seconds, "rows": len(graph), "clustered": not graph.exact,
            "rows_with_true_lists": int(graph.exact_rows.sum())}


def link_oracle(work: Path, threshold: float, sample: int, seed: int = 3) -> dict:
    """Links of `sample` random rows: the ones `dups` makes (graph pairs scored with the graph's b) against
    a brute-force oracle (every row's cosine to them, exact b of them and of their partners by a full
    scan: bfloat16 product, top 40 re-scored in float32, independent of neardup.graph)."""
    import torch

    from neardup import neighbourhood

    index = Index.open(work)
    snap = index.snapshot()
    n = len(snap)
    graph = index.graph()
    b_graph = neighbourhood.backgrounds(graph.kth())
    raw = calibration.raw_threshold(threshold, aware=True)  # `threshold` is dups' copy probability
    a, b, s = index.graph_pairs(raw, aware=True)
    linked = neighbourhood.normalised(s, b_graph[a], b_graph[b]) >= raw
    a, b = a[linked], b[linked]
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, sample, replace=False))
    everything = torch.empty((n, snap.vectors(np.arange(1), dtype=None).shape[1]), dtype=torch.bfloat16)
    for start in range(0, n, 1 << 16):
        at = np.arange(start, min(start + (1 << 16), n))
        everything[start:start + len(at)] = torch.from_numpy(lsh.normalise_rows(snap.vectors(at, dtype=None)))

    def exact_kth(at: np.ndarray) -> np.ndarray:
        out = np.zeros(len(at))
        for first in range(0, len(at), 512):  # 512 x n bfloat16 similarities at a time
            part = at[first:first + 512]
            sims = everything[torch.from_numpy(part)] @ everything.T
            sims[torch.arange(len(part)), torch.from_numpy(part)] = -float("inf")
            top = torch.topk(sims, 40, dim=1).indices.numpy()
            q = lsh.normalise_rows(snap.vectors(part, dtype=None))
            exact = np.einsum("id,ikd->ik", q, lsh.normalise_rows(snap.vectors(top.ravel(), dtype=None)).reshape(*top.shape, -1))
            out[first:first + len(part)] = -np.sort(-exact, axis=1)[:, neighbourhood.K - 1]
        return out

    q = lsh.normalise_rows(snap.vectors(rows, dtype=None))
    partners = []
    for start in range(0, n, 1 << 16):
        at = np.arange(start, min(start + (1 << 16), n))
        sims = q @ lsh.normalise_rows(snap.vectors(at, dtype=None)).T
        i, j = np.nonzero(sims >= neighbourhood.COSINE_FLOOR)
        keep = rows[i] != at[j]
        partners.append((rows[i[keep]], at[j[keep]], sims[i[keep], j[keep]]))
    pa, pb, ps = (np.concatenate(x) for x in zip(*partners))
    whatever = neighbourhood.links_whatever_b(ps, raw)
    need = np.union1d(rows, pb[~whatever])
    b_true = np.full(n, np.nan)
    b_true[need] = neighbourhood.backgrounds(exact_kth(need))
    truly = whatever.copy()
    truly[~whatever] = neighbourhood.normalised(ps[~whatever], b_true[pa[~whatever]], b_true[pb[~whatever]]) >= raw
    oracle = {(int(x), int(y)) for x, y in zip(pa[truly], pb[truly])}
    in_sample = np.isin(a, rows) | np.isin(b, rows)
    made = set()
    sampled = set(rows.tolist())
    for x, y in zip(a[in_sample].tolist(), b[in_sample].tolist()):
        for r, other in ((x, y), (y, x)):
            if r in sampled:
                made.add((r, other))
    groups = {}
    for g, members in enumerate(index.duplicates(threshold)):
        for m in members.ids:
            groups[m] = g
    ids = snap.ids
    same_group = sum(groups.get(int(ids[x]), -1) == groups.get(int(ids[y]), -2) for x, y in oracle)
    index.close()
    return {"sample_rows": sample, "oracle_links": len(oracle), "dups_links": len(made),
            "false_links": len(made - oracle), "missed_links": len(oracle - made),
            "oracle_links_in_one_group": round(same_group / max(1, len(oracle)), 4),
            "b_exact_for": len(need)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--exact-queries", type=int, default=5, help="queries timed with the (slow) exact scans")
    parser.add_argument("--variants", default="random,cone")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="dups threshold (default: dups' own)")
    parser.add_argument("--no-pairs", action="store_true")
    parser.add_argument("--no-baselines", action="store_true", help="skip the FAISS and exact-scan query baselines")
    parser.add_argument("--oracle-rows", type=int, default=100, help="rows whose links are checked by brute force (0: none)")
    parser.add_argument("--keep", action="store_true", help="keep the index folder")
    parser.add_argument("--reuse", action="store_true", help="run queries, dups and the oracle on the index a --keep run left")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/neardup-bench-scale"))
    parser.add_argument("--json", type=Path, default=Path("bench_scale.json"))
    parser.add_argument("--pairs-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.pairs_child:
        pairs_child(args.pairs_child[0], float(args.pairs_child[1]), args.pairs_child[2])
        return
    figures = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} "
                          f"{platform.python_version()}, numpy {np.__version__}",
               "n": args.n, "dim": DIM, "queries": args.queries, "query_bits": query_bits(args.n), "variants": {}}
    for variant in args.variants.split(","):
        work = args.workdir / variant / "index"
        t0 = time.perf_counter()
        if args.reuse:  # the index and graph a --keep run left: queries, dups and the oracle again
            data = reused(work, args.queries, seed=1)
            entry = {"reused": str(work)}
        else:
            shutil.rmtree(work.parent, ignore_errors=True)
            work.parent.mkdir(parents=True)
            data = build(work, args.n, args.queries, variant, seed=1, extra=args.n // 100 if variant == "photos" else 0)
            entry = {"write_s": round(time.perf_counter() - t0, 1), "hash_s": round(data["hash_seconds"], 1)}
            if variant == "photos":
                print(photos_variant.PhotosVariant(1, args.n + args.n // 100, planted=data["groups"]).describe())
            entry["graph"] = bench_graph(work)
        entry["query"] = bench_queries(work, data, args.exact_queries, baselines=not args.no_baselines)
        print_table(variant, entry)
        if data["held_back"] is not None:
            entry["graph_update"] = bench_graph(work, data["held_back"])
            entry["graph_update"]["over_build"] = round(entry["graph_update"]["seconds"] / max(entry["graph"]["seconds"], 1e-9), 4)
        if not args.no_pairs:
            entry["dups"] = bench_pairs(work, data, args.threshold)
            print_pairs(entry["dups"])
            if args.oracle_rows:
                entry["links"] = link_oracle(work, args.threshold, args.oracle_rows)
                print(f"links of {args.oracle_rows} sampled rows against the brute-force oracle: {entry['links']}")
        figures["variants"][variant] = entry
        print(json.dumps({k: v for k, v in entry.items() if k != "query"}))
        if "dups" in entry:
            lsh_query = entry["query"]["neardup LSH (Index.query_vector)"]
            d = entry["dups"]
            print(f"scale: variant={variant} n={args.n} query_p50_ms={lsh_query['p50_ms']} query_recall={lsh_query['recall']} "
                  f"dups_wall_s={d['seconds']} dups_peak_rss_mb={d['peak_rss_mb']} dups_planted_recall={d['planted_recall']}")
        if not (args.keep or args.reuse):
            shutil.rmtree(work.parent, ignore_errors=True)
    args.json.write_text(json.dumps(figures, indent=2))
    print(f"figures written to {args.json}")


def print_table(variant: str, entry: dict) -> None:
    if "write_s" in entry:
        print(f"\n{variant}: index written in {entry['write_s']} s (hashing {entry['hash_s']} s)")
    print(f"{'method':58} {'p50 ms':>8} {'p99 ms':>8} {'recall':>7}  notes")
    for method, r in entry["query"].items():
        notes = ", ".join(f"{k}={v}" for k, v in r.items() if k not in ("p50_ms", "p99_ms", "recall"))
        print(f"{method:58} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {r['recall']:7.4f}  {notes}")


def print_pairs(p: dict) -> None:
    print(f"dups at {p['threshold']}: {p['seconds']} s ({p['cpu_s']} s CPU), peak RSS {p['peak_rss_mb']} MB, "
          f"{p['groups']} groups; planted pairs {p['planted_pairs']} recall {p['planted_recall']}; "
          f"sample pairs {p['sample_pairs']} recall {p['sample_recall']}")


if __name__ == "__main__":
    main()
