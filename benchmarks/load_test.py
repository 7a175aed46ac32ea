"""Load test of `neardup serve`: N concurrent image searches on loopback, latency percentiles and errors.

    python benchmarks/load_test.py [--requests 200] [--concurrency 200] [--index DIR --images DIR]

First --sequential searches go one at a time (latency without queueing), then the burst. Without
--index it builds the demo collection (16 photos + 112 edited copies) in a temporary folder and
indexes it. The server runs as its own process (`neardup serve --port 0`), as users run it. Every
request uploads one of the collection's files; the run is bounded (a fixed number of requests, each with
a timeout) and stops by itself. Prints one JSON line of results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


async def _fire(url: str, payloads: list[tuple[str, bytes]], total: int, concurrency: int,
                timeout: float, headers: dict | None) -> dict:
    import httpx

    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits, headers=headers) as client:

        async def one(i: int) -> None:
            name, data = payloads[i % len(payloads)]
            async with gate:
                started = time.perf_counter()
                try:
                    response = await client.post("/api/search", params={"k": 5}, files={"file": (name, data)})
                    body = response.json()
                    if response.status_code != 200 or not body["results"][0]["matches"]:
                        errors.append(f"{response.status_code}: {body}")
                        return
                except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    return
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(total)))
        wall = time.perf_counter() - started
    latencies.sort()

    def percentile(p: float) -> float | None:
        return round(1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))], 1) if latencies else None

    return {"requests": total, "concurrency": concurrency, "ok": len(latencies), "errors": len(errors),
            "first_errors": errors[:3], "wall_s": round(wall, 2), "throughput_per_s": round(len(latencies) / wall, 1),
            "p50_ms": percentile(0.50), "p99_ms": percentile(0.99), "max_ms": percentile(1.0)}


def fire(url: str, payloads: list[tuple[str, bytes]], total: int = 200, concurrency: int = 200,
         timeout: float = 120.0, headers: dict | None = None) -> dict:
    """Send `total` searches, at most `concurrency` at once, each uploading one of `payloads`."""
    return asyncio.run(_fire(url, payloads, total, concurrency, timeout, headers))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--sequential", type=int, default=20, help="searches sent one at a time before the burst")
    parser.add_argument("--index", help="an existing index folder (default: build the demo collection)")
    parser.add_argument("--images", help="folder of query images (with --index)")
    args = parser.parse_args(argv)
    neardup = [sys.executable, "-m", "neardup.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        if args.index:
            index, folder = Path(args.index), Path(args.images or ".")
        else:
            from neardup.demo import build_collection

            folder, index = Path(tmp) / "photos", Path(tmp) / "index"
            build_collection(folder)
            subprocess.run(neardup + ["index", str(folder), "--index", str(index)], check=True, capture_output=True)
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:64]
        if not files:
            parser.error(f"no .jpg/.png query images under {folder}")
        payloads = [(p.name, p.read_bytes()) for p in files]
        server = subprocess.Popen(neardup + ["serve", "--index", str(index), "--port", "0"],
                                  stderr=subprocess.PIPE, text=True,
                                  env={k: v for k, v in os.environ.items() if k != "NEARDUP_TOKEN"})
        try:
            line = server.stderr.readline()
            match = re.search(r"(http://\S+/)", line)
            if not match:
                raise SystemExit(f"the server did not start: {line}{server.stderr.read() if server.poll() is not None else ''}")
            # one at a time first: the latency of a search without queueing, measured beside the burst
            alone = fire(match.group(1), payloads, args.sequential, 1, args.timeout)
            result = fire(match.group(1), payloads, args.requests, args.concurrency, args.timeout)
        finally:
            server.terminate()
            server.wait(30)
    result["query_images"] = len(payloads)
    result["alone"] = {key: alone[key] for key in ("requests", "errors", "p50_ms", "p99_ms")}
    result["errors"] += alone["errors"]
    print(json.dumps(result))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
