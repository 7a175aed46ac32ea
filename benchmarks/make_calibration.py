"""Make the photos neardup calibrates and guards its int8 model on
(src/neardup/models/efficientnet_lite0_calibration.npz, shipped in the package).

    .venv/bin/python benchmarks/make_calibration.py [--out PATH] [--photos 24] [--seed 0]

The photos come from gcompris-qt-data (real photos of monuments, animals, instruments and paintings,
stored as WebP inside Qt resource bundles), fetched with `apt-get download` and carved out by
benchmarks/fit_whitening.py's own collection code. That package is no `neardup eval` source (the same
guard as fit_whitening's refuses evaluation packages). The whitening was fitted on this package too (it used
every usable photo of it); that matters little here: the guard compares int8 with fp32 vectors of the same
descriptor, and the whitening runs in float after the quantised convolutions. Each photo is stored as the default model sees it (border trim, 224x224 bicubic),
uint8 HWC, so calibrating needs nothing the user may or may not have installed; the guard's edited copies
are derived from them at build time (neardup.models.onnx_backend.guard_set). The guard asks that every copy
keep its nearest original, so no two photos may be near-duplicates of each other (the package holds a few
pairs of the same subject): photos are taken in a seeded random order, and one whose descriptor has a
cosine above MAX_COSINE to a photo already taken is skipped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import fit_whitening  # noqa: E402

from neardup import benchmark_set  # noqa: E402
from neardup.models import default_model  # noqa: E402

PACKAGE = "gcompris-qt-data"
#: Largest cosine (fp32 descriptor) allowed between two shipped photos: well below the duplicate threshold.
MAX_COSINE = 0.5


def usable_photos(package: str) -> tuple[list[tuple[str, Image.Image]], dict]:
    """fit_whitening's usable photos of `package`, in its order, and the package summary."""
    if package in {source.package for source in benchmark_set.DEB_SOURCES}:
        raise SystemExit(f"{package} is an evaluation source; calibrating on it would tune to the benchmark")
    (_, short, licence, patterns, cap, min_colours), = [s for s in fit_whitening.SOURCES if s[0] == package]
    root, why = benchmark_set.deb_root(benchmark_set.DebSource(package, short, licence, ()), download=True)
    if root is None:
        raise SystemExit(f"{package}: {why}")
    usable = list(fit_whitening.usable_rgb(root, patterns, min_colours))
    return usable, {"deb": (root / ".complete").read_text().strip(), "licence": licence, "cap": cap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(default_model.CALIBRATION_FILE))
    parser.add_argument("--photos", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    usable, summary = usable_photos(PACKAGE)
    from neardup.models.onnx_backend import OnnxEmbedder

    size = default_model.INPUT_SIZE
    fp32 = OnnxEmbedder()
    order = random.Random(args.seed).sample(usable, len(usable))
    chosen, pixels, vectors = [], [], np.zeros((0, default_model.DIM), np.float32)
    for name, rgb in order:
        photo = np.asarray(default_model.trim_border(rgb).resize((size, size), Image.Resampling.BICUBIC))
        vector = fp32.embed(fp32.preprocess(Image.fromarray(photo))[None])
        if len(vectors) and float((vectors @ vector[0]).max()) > MAX_COSINE:
            continue
        chosen.append(name), pixels.append(photo)
        vectors = np.concatenate([vectors, vector])
        if len(chosen) == args.photos:
            break
    photos = np.stack(pixels)
    meta = {"package": PACKAGE, **summary, "usable": len(usable),
            "photos": chosen, "max_cosine": MAX_COSINE, "seed": args.seed, "stored": f"trim-border, {size}x{size} bicubic, uint8 HWC",
            "made": datetime.date.today().isoformat(), "script": "benchmarks/make_calibration.py"}
    np.savez_compressed(args.out, photos=photos, meta=np.array(json.dumps(meta)))
    print(f"wrote {args.out}: {len(photos)} photos of {len(usable)} usable ({Path(args.out).stat().st_size / 1e6:.1f} MB)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
