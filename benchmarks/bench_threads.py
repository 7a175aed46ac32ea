"""Thread settings for indexing on this machine: ONNX Runtime intra-op threads x decoding workers.

    python benchmarks/bench_threads.py [-n 300] [--backend onnx]

Writes n ~2-MP JPEGs (neardup.bench.make_images) to a temp folder and times Index.add end to end (read,
hash, draft-decode, preprocess, embed, store) into a fresh index for each setting, printing images/s.
The defaults of neardup (threads = workers = every core) were chosen from this table.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from neardup import bench
from neardup.models import load_embedder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300)
    parser.add_argument("--backend", default="onnx")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="neardup-threads-") as work:
        work = Path(work)
        paths = bench.make_images(work / "images", args.n)
        print(f"{args.n} JPEGs {bench.LARGE_SIZE[0]}x{bench.LARGE_SIZE[1]}, backend {args.backend}, {cores} cores")
        print("model threads  decode workers  images/s  CPU ms/image")
        for threads in sorted({1, cores}):
            embedder = load_embedder(args.backend, threads=threads)
            for workers in sorted({1, cores, cores + 1, 2 * cores}):
                rate, cpu_ms, _ = bench.index_run(embedder, paths, work / f"idx-{threads}-{workers}", workers)
                print(f"{threads:>13}  {workers:>14}  {rate:8.1f}  {cpu_ms:6.2f}", flush=True)


if __name__ == "__main__":
    main()
