"""Core benchmark (not a test): index a ≥1,000-image real-photo-derived collection, then query every
edited copy against the originals with LSH and with exact search.

Prints indexing rate, query latency (p50/p99, LSH vs exact, embedding excluded and included) and the
top-1 agreement; `--json` for the figures. Run: `make bench` or `python benchmarks/bench_core.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from neardup.demo import build_large_collection
from neardup.index import Index, query_bits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="neardup-bench-"))
    manifest = build_large_collection(work / "photos")
    originals = {name: os.path.abspath(p) for name, p in manifest["originals"].items()}
    copies = manifest["copies"]
    total = len(originals) + len(copies)

    index = Index.open(work / "index", create=True)
    _ = index.embedder  # load the model outside the timed region
    started = time.perf_counter()
    summary = index.add(list(originals.values()) + [c["path"] for c in copies])
    index_seconds = time.perf_counter() - started
    assert summary.failed == 0, summary.failures

    vectors = {c["path"]: index.embed(c["path"]) for c in copies}
    full_ms = {"lsh": [], "exact": []}
    for copy in copies:
        for method, exact in (("lsh", False), ("exact", True)):
            t0 = time.perf_counter()
            index.query_vector(vectors[copy["path"]], k=10, exact=exact)
            full_ms[method].append((time.perf_counter() - t0) * 1e3)
    t0 = time.perf_counter()
    groups = index.duplicates()
    dups_seconds = time.perf_counter() - t0

    # the question users ask: for each edited copy, which image is its original?
    index.remove([c["path"] for c in copies])
    lsh_ms, exact_ms, agree, correct = [], [], 0, 0
    misses: dict[str, int] = {}
    for copy in copies:
        vector = vectors[copy["path"]]
        t0 = time.perf_counter()
        lsh = index.query_vector(vector, k=10, exact=False)
        t1 = time.perf_counter()
        exact = index.query_vector(vector, k=10, exact=True)
        t2 = time.perf_counter()
        lsh_ms.append((t1 - t0) * 1e3)
        exact_ms.append((t2 - t1) * 1e3)
        agree += lsh[0].path == exact[0].path
        hit = lsh[0].path == originals[copy["original"]]
        correct += hit
        if not hit:
            kind = f"{'tile' if '-r' in copy['original'] else 'photo'} {copy['edit']}"
            misses[kind] = misses.get(kind, 0) + 1
    t0 = time.perf_counter()
    for copy in copies[:100]:
        index.query(copy["path"], k=10)
    end_to_end_ms = (time.perf_counter() - t0) * 1e3 / 100

    figures = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_implementation()} {platform.python_version()}",
        "images_indexed": total,
        "index_seconds": round(index_seconds, 2),
        "index_images_per_second": round(total / index_seconds, 1),
        "full_index_query_ms_lsh_p50": round(float(np.percentile(full_ms["lsh"], 50)), 3),
        "full_index_query_ms_exact_p50": round(float(np.percentile(full_ms["exact"], 50)), 3),
        "full_index_dups_seconds": round(dups_seconds, 2),
        "full_index_dups_groups": len(groups),
        "originals": len(originals),
        "queries": len(copies),
        "query_bits": query_bits(len(originals)),
        "top1_correct": correct / len(copies),
        "top1_lsh_equals_exact": agree / len(copies),
        "query_ms_lsh_p50": round(float(np.percentile(lsh_ms, 50)), 3),
        "query_ms_lsh_p99": round(float(np.percentile(lsh_ms, 99)), 3),
        "query_ms_exact_p50": round(float(np.percentile(exact_ms, 50)), 3),
        "query_ms_exact_p99": round(float(np.percentile(exact_ms, 99)), 3),
        "query_ms_end_to_end_with_embedding": round(end_to_end_ms, 2),
        "top1_misses_by_kind": dict(sorted(misses.items())),
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for key, value in figures.items():
            print(f"{key:38s} {value}")


if __name__ == "__main__":
    main()
