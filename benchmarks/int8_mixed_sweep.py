"""Which parts of the default model can run in int8: quantise only the blocks in each range, report the
int8 guard's figures (mean/min cosine to fp32, nearest originals changed) and the model's ms per image
(batch 8, median of 80 runs) beside fp32 measured in the same run.

    .venv/bin/python benchmarks/int8_mixed_sweep.py [LO:HI ...]

LO:HI quantises MBConv blocks LO..HI-1; block -1 is the stem, 16 the head conv, 17 and up the GeM pooling
and normalisation (default ranges: -1:3 -1:6 -1:100 0:100 1:17 2:17; 1:17 is what onnx-int8 builds).
Same calibration inputs, guard set and recipe as neardup.models.onnx_backend.quantise.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from neardup.models import onnx_backend as ob


def block_of(node) -> int:
    if node.name.startswith("/_conv_stem/") or node.name in ("/Clip", "/Constant", "/Constant_1"):
        return -1
    if node.name.startswith("/_conv_head/") or node.name == "/Clip_1":
        return 16
    match = re.match(r"/_blocks\.(\d+)/", node.name)
    return int(match.group(1)) if match else 99


def ms_per_image(embedder, batch: np.ndarray, rounds: int = 80) -> float:
    for _ in range(3):
        embedder.session.run(None, {"pixels": batch})
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        embedder.session.run(None, {"pixels": batch})
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times)) / len(batch)


def main(specs: list[str]) -> None:
    originals, copies = ob.guard_set(ob.calibration_photos())
    calibration = np.ascontiguousarray(ob.calibration_inputs(originals, copies), dtype=np.float32)
    fp32 = ob.OnnxEmbedder(threads=2)
    batch = np.ascontiguousarray(originals[:8])
    with tempfile.TemporaryDirectory() as work:
        for spec in specs:
            lo, hi = map(int, spec.split(":"))

            def select(model, lo=lo, hi=hi):
                return [node.name for node in model.graph.node if lo <= block_of(node) < hi]

            out = Path(work) / "int8.onnx"
            ob.quantise(fp32.path, calibration, out, select_nodes=select)
            report = ob.int8_guard(fp32, ob.OnnxEmbedder(out, threads=2), originals, copies)
            int8_ms = ms_per_image(ob.OnnxEmbedder(out, threads=2), batch)
            print(f"blocks {spec:>7}: mean cosine {report['mean_cosine']:.4f} (min {report['min_cosine']:.4f}), "
                  f"{report['top1_changed']} nearest changed, {'passed' if report['passed'] else 'REFUSED'}; "
                  f"{int8_ms:.2f} ms/image vs fp32 {ms_per_image(fp32, batch):.2f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["-1:3", "-1:6", "-1:100", "0:100", "1:17", "2:17"])
