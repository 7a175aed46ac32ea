"""Benchmark (not a test): the distributed duplicate search on a local Ray cluster against the local
`Index.duplicates`, on the same index of N synthetic unit vectors (default 100,000 x 1280-d) with
planted near-duplicates, in one run; or on an existing index (`--index`, e.g. the 1M photos variant that
`bench_scale.py --variants photos --keep` leaves). Both read the k-NN graph the index keeps; Ray runs the
join among crowded files.

Data: random unit vectors (unrelated cosine ~0; the index is centred at 0, so the join is planned for
that); G = N / 20 originals each get 2 copies at cosine U(0.8, 0.99). The vectors go through the real
index format (Store.commit: float16 segments + codes). Each search runs in a fresh subprocess that
reports its wall time, the pairs and groups it found, and peak memory: the local one its own peak RSS;
the Ray one the peak, sampled every 0.2 s, of the summed RSS of the driver and every process it
started (GCS, raylet, workers). Object-store pages shared between processes count once per process
that maps them, so the Ray figure is an upper bound. Both runs must give the same pairs and groups.

It also times the driver's side of distributed indexing, `Index.merge`, on --merge-rows synthetic
rows in shards of `distributed.SHARD_ROWS` (the real model's identity on synthetic unit vectors):
first merge, and a second merge of the same shards (which must add nothing).

    python benchmarks/bench_ray_dups.py [--n 100000 | --index DIR] [--threshold 0.97] [--cpus 2] [--merge-rows 100000]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from neardup import calibration, lsh
from neardup.index import DEFAULT_THRESHOLD, LSH_SEED, NUM_TABLES, STORED_BITS, Index, update_graph
from neardup.store import Record, Store

DIM = 1280
CHUNK = 50_000
COPIES = 2


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build(work: Path, n: int, seed: int = 1) -> int:
    """Write the index; returns the number of planted pairs."""
    rng = np.random.default_rng(seed)
    groups = n // 20
    planes = lsh.make_planes(DIM, NUM_TABLES, STORED_BITS, LSH_SEED)
    store = Store.open(work, create=True, write=True)
    store.save_planes(planes)
    store.set_meta("lsh", {"tables": NUM_TABLES, "bits": STORED_BITS, "seed": LSH_SEED, "center": [0.0] * DIM})
    store.set_meta("model", {"name": "synthetic-random", "dim": DIM})
    for start in range(0, n, CHUNK):
        rows = min(CHUNK, n - start)
        vectors = unit(rng.standard_normal((rows, DIM), dtype=np.float32))
        if start == 0:
            originals = vectors[:groups]
            for c in range(COPIES):
                cos = rng.uniform(0.8, 0.99, groups).astype(np.float32)
                noise = rng.standard_normal(originals.shape, dtype=np.float32)
                noise = unit(noise - np.sum(noise * originals, axis=1, keepdims=True) * originals)
                vectors[groups * (1 + c) : groups * (2 + c)] = unit(cos[:, None] * originals + np.sqrt(1 - cos**2)[:, None] * noise)
        codes = lsh.hash_vectors(vectors, planes, NUM_TABLES)
        store.commit(vectors=vectors, codes=codes,
                     indexed=[Record(f"/synthetic/{i}", 1, 1, None) for i in range(start, start + rows)])
    store.close()
    return groups * 3


class TreePeak:
    """Peak of the summed RSS of this process and all its descendants, sampled in a thread."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self._psutil, self._interval = psutil, interval
        self.peak = self.driver_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = self._psutil.Process()
        total = driver = me.memory_info().rss
        for child in me.children(recursive=True):
            try:
                total += child.memory_info().rss
            except self._psutil.Error:
                pass
        self.peak, self.driver_peak = max(self.peak, total), max(self.driver_peak, driver)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def child(mode: str, work: str, threshold: float, out: str, cpus: int) -> None:
    index = Index.open(work)
    if mode == "local":
        t0 = time.perf_counter()
        groups = index.duplicates(threshold)
        seconds = time.perf_counter() - t0
        raw = calibration.raw_threshold(threshold, aware=True)  # `threshold` is dups' copy probability
        a, b, _ = index.graph_pairs(raw, aware=True)  # the pairs behind those groups (timed above, not here)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        memory = {"peak_rss_mb": round(peak / 2**20)}
    else:
        import ray

        from neardup import distributed

        with TreePeak() as tree:
            t0 = time.perf_counter()
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
            ray.data.DataContext.get_current().enable_progress_bars = False
            started = time.perf_counter() - t0
            t1 = time.perf_counter()
            found = distributed.duplicates(index, threshold, pairs=True)
            seconds = time.perf_counter() - t1
            ray.shutdown()
        groups, (a, b, _) = found.groups, found.pairs
        memory = {"peak_rss_tree_mb": round(tree.peak / 2**20), "peak_rss_driver_mb": round(tree.driver_peak / 2**20),
                  "ray_start_s": round(started, 1), "join_tasks": found.blocks}
    import hashlib

    ids = index.snapshot().ids
    pairs = np.unique(np.sort(np.c_[ids[a], ids[b]], axis=1), axis=0)  # catalog ids, each pair once
    group_ids = sorted(sorted(g.ids) for g in groups)
    Path(out).write_text(json.dumps({"seconds": round(seconds, 2), **memory, "pairs": len(pairs),
                                     "pairs_sha256": hashlib.sha256(pairs.tobytes()).hexdigest(),
                                     "groups": len(group_ids),
                                     "groups_sha256": hashlib.sha256(json.dumps(group_ids).encode()).hexdigest()}))


def bench_merge(folder: Path, rows: int) -> dict:
    from neardup import shards
    from neardup.distributed import SHARD_ROWS
    from neardup.models import default_embedder

    embedder = default_embedder()
    rng = np.random.default_rng(2)
    t0 = time.perf_counter()
    for start in range(0, rows, SHARD_ROWS):
        count = min(SHARD_ROWS, rows - start)
        records = [Record(f"/synthetic/{i}.jpg", 1000 + i, 10**18 + i, f"{i:064x}", 640, 480)
                   for i in range(start, start + count)]
        shards.write_shard(records, unit(rng.standard_normal((count, embedder.dim), dtype=np.float32)),
                           embedder.identity, str(folder / "shards"), f"bench-{start:09d}")
    written = time.perf_counter() - t0
    with Index.open(folder / "merged", create=True, embedder=embedder) as index:
        t1 = time.perf_counter()
        first = index.merge([folder / "shards"])
        t2 = time.perf_counter()
        second = index.merge([folder / "shards"])
        t3 = time.perf_counter()
    assert first.added == rows and second.added == second.updated == 0 and second.unchanged == rows
    return {"rows": rows, "shards": first.shards, "write_shards_s": round(written, 1),
            "merge_s": round(t2 - t1, 1), "merge_rows_per_s": round(rows / (t2 - t1)),
            "remerge_s": round(t3 - t2, 1), "remerge_added": second.added}


def run_child(mode: str, work: Path, threshold: float, cpus: int, folder: Path) -> dict:
    out = folder / f"{mode}.json"
    subprocess.run([sys.executable, __file__, "--child", mode, str(work), str(threshold), str(out), str(cpus)], check=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    parser.add_argument("--index", type=Path, help="an existing index to search (no synthetic index, no merge timing)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--merge-rows", type=int, default=100_000, help="rows for the merge timing (0: skip)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/neardup-bench-ray"))
    parser.add_argument("--json", type=Path, default=Path("bench_ray_dups.json"))
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, work, threshold, out, cpus = args.child
        child(mode, work, float(threshold), out, int(cpus))
        return
    if args.index:
        work, planted, args.merge_rows = args.index, None, 0
        args.n = len(Index.open(work).snapshot())
        args.workdir.mkdir(parents=True, exist_ok=True)
    else:
        work = args.workdir / "index"
        shutil.rmtree(args.workdir, ignore_errors=True)
        work.parent.mkdir(parents=True)
        t0 = time.perf_counter()
        planted = build(work, args.n)
        with Store.open(work, write=True) as store:
            update_graph(store)  # as `neardup index` leaves it
        print(f"index of {args.n:,} vectors written in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    local = run_child("local", work, args.threshold, args.cpus, args.workdir)
    ray_run = run_child("ray", work, args.threshold, args.cpus, args.workdir)
    same_pairs = local["pairs_sha256"] == ray_run["pairs_sha256"]
    same_groups = local["groups_sha256"] == ray_run["groups_sha256"]
    figures = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}",
        "n": args.n, "index": str(work), "threshold": args.threshold, "planted_pairs": planted, "ray_cpus": args.cpus,
        "local": local, "ray": ray_run,
        "pairs": local["pairs"], "groups": local["groups"],
        "same_pairs": same_pairs, "same_groups": same_groups,
        "ray_over_local_time": round(ray_run["seconds"] / max(local["seconds"], 1e-9), 2),
        "merge": bench_merge(args.workdir, args.merge_rows) if args.merge_rows else None,
    }
    args.json.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    if not (same_pairs and same_groups):
        sys.exit("the distributed search and the local one disagree")


if __name__ == "__main__":
    main()
