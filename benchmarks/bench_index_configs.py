"""End to end `Index.add` on one folder under several configurations, interleaved round by round (so a
neighbour's load falls on all alike), in one process: img/s, CPU ms per image and the indexing thread's
stages (neardup.bench.index_run). Written for issue 20 #2 (decode stage on 2 cores).

    .venv/bin/python benchmarks/bench_index_configs.py [--folder DIR] [--rounds 3] CONFIG...

CONFIG = backend:model_threads:decode_workers:mode[:PROP=VALUE,...], mode t (decode threads), p (decode
processes) or auto (neardup's rule); PROP=VALUE pairs are added to OpenVINO's compile config (e.g.
ENABLE_CPU_PINNING=False). Example:

    bench_index_configs.py onnx-int8:2:2:t openvino:2:2:t openvino:1:1:t openvino:2:2:p
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    from neardup import bench, decode
    from neardup.models import load_embedder
    from neardup.models import openvino_backend as ovb

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default="/tmp/mixed20")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("configs", nargs="+")
    args = parser.parse_args()
    paths = bench.image_files(Path(args.folder), 10**6)
    core = ovb._core()
    compile_model, extra = core.compile_model, {}

    def with_extra(model, device, config):
        config = {**config, **extra}
        config.pop("CACHE_DIR", None)  # a blob compiled with other properties is not cached
        return compile_model(model, device, config)

    embedders: dict = {}
    results: dict = {config: [] for config in args.configs}
    for round_ in range(args.rounds):
        for config in args.configs:
            parts = config.split(":")
            backend, threads, workers, mode = parts[0], int(parts[1]), int(parts[2]), parts[3]
            props = dict(kv.split("=", 1) for kv in parts[4].split(",")) if len(parts) > 4 else {}
            key = (backend, threads, tuple(sorted(props.items())))
            if key not in embedders:
                extra.clear()
                extra.update({k: {"True": True, "False": False}.get(v, v) for k, v in props.items()})
                core.compile_model = with_extra
                try:
                    embedders[key] = load_embedder(backend, threads=threads)
                finally:
                    core.compile_model = compile_model
            decode.PROCESS_MIN_CORES = {"t": 10**6, "p": 1, "auto": int(os.environ.get(
                "NEARDUP_DECODE_PROCESS_MIN_CORES", "3"))}[mode]
            with tempfile.TemporaryDirectory() as work:
                rate, cpu, _, stages = bench.index_run(embedders[key], paths, Path(work) / "index", workers)
            results[config].append((rate, cpu))
            print(f"round {round_} {config:40s} {rate:7.1f} img/s  CPU {cpu:5.2f} ms/img  decode CPU "
                  f"{stages['decode_cpu_ms_per_file']:.2f} ms/file  model+rest {stages['model_cpu_ms_per_image']:.2f} "
                  f"ms/img  load {os.getloadavg()[0]:.1f}", flush=True)
    first = statistics.median(rate for rate, _ in results[args.configs[0]])
    print(f"--- {len(paths)} files; median img/s (ratio to the first config), median CPU ms/img, best img/s")
    for config, runs in results.items():
        rate = statistics.median(r for r, _ in runs)
        print(f"{config:40s} {rate:7.1f} ({rate / first:.2f}x)  CPU {statistics.median(c for _, c in runs):5.2f}  "
              f"best {max(r for r, _ in runs):.1f}")


if __name__ == "__main__":
    main()
