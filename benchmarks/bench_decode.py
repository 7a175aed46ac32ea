"""The decode stage alone (neardup.decode, no model): worker threads against worker processes, and the
resize shortcut for large PNG/WebP/TIFF files (default_model.REDUCING_GAP) against the plain resize.

    .venv/bin/python benchmarks/bench_decode.py FOLDER [--workers N] [--repeat 3]

Prints files/s of each mode over the folder (read, hash, decode, border trim, 224x224 uint8), best of
--repeat runs, alternating the modes so load on a shared machine hits them alike; then, for files over
4 MP, the time of the resize with and without the shortcut and the cosine between their vectors.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from PIL import Image

from neardup import decode
from neardup.images import discover, load_image
from neardup.index import _failed, _prepare_file
from neardup.models import default_model
from neardup.models.onnx_backend import OnnxEmbedder


class Recipe:
    """What the decode stage needs of an embedder, without loading a model."""

    input_size = default_model.INPUT_SIZE
    model_pixels = staticmethod(default_model.model_pixels)
    preprocess = staticmethod(default_model.preprocess)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    files = [str(f) for f in discover([args.folder]).files]
    best = {"threads": 0.0, "processes": 0.0}
    for _ in range(args.repeat):
        for mode in best:
            start = time.perf_counter()
            done = list(decode.prepare_files(files, lambda path: None, Recipe, _prepare_file, _failed,
                                             workers=args.workers, processes=mode == "processes"))
            rate = len(done) / (time.perf_counter() - start)
            best[mode] = max(best[mode], rate)
            print(f"{mode}: {rate:.1f} files/s", flush=True)
    print(f"{len(files)} files, {args.workers} workers: threads {best['threads']:.1f} files/s, "
          f"processes {best['processes']:.1f} files/s (best of {args.repeat})")
    large = [f for f in files if np.prod(Image.open(f).size) > 4e6]
    if not large:
        return
    embedder = OnnxEmbedder()
    timings = {"shortcut": 0.0, "plain": 0.0}
    cosines = []
    for path in large:
        image = default_model.trim_border(load_image(path).image)
        pixels = {}
        for mode, gap in (("shortcut", default_model.REDUCING_GAP), ("plain", None)):
            start = time.perf_counter()
            pixels[mode] = np.asarray(image.resize((224, 224), Image.Resampling.BICUBIC, reducing_gap=gap))
            timings[mode] += time.perf_counter() - start
        a, b = embedder.embed(np.stack([pixels["shortcut"], pixels["plain"]]))
        cosines.append(float(a @ b))
    print(f"{len(large)} files over 4 MP: resize {timings['plain'] / len(large) * 1000:.0f} ms plain, "
          f"{timings['shortcut'] / len(large) * 1000:.0f} ms with the shortcut; cosine of their vectors "
          f"min {min(cosines):.5f}, mean {np.mean(cosines):.5f}")


if __name__ == "__main__":
    main()
