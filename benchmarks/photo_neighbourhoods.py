"""Neighbourhoods of real photos' descriptors (issue 18 item 1): the figures the "photos" scale variant
(benchmarks/photos_variant.py) is fitted to. Derivation and results: benchmarks/PHOTOS_VARIANT.md.

    .venv/bin/python benchmarks/photo_neighbourhoods.py [--work /tmp/photo-neighbourhoods] [--json out.json]
        [--evalset /tmp/evalsets/seed1] [--no-download] [--reuse]

1. Gathers every distinct real photo this machine can obtain (byte-identical files once), never from the
   Debian packages reserved for independent evaluation (opencv-doc, darknet):
   * the whole originals and distractors of a `neardup eval build` gallery (OUT/gallery/*.jpg without the
     `-tN` tiles: tiles are crops of one distractor, an artificial burst; the gallery is the same for
     every seed): photos of lomiri-wallpapers-16.04/-20.04, mate-backgrounds, plasma-workspace-wallpapers,
     ukui-wallpapers, gnome-backgrounds, scikit-image and scikit-learn;
   * the whitening's training packages (benchmarks/fit_whitening.py SOURCES, its own fetching and carving
     code; not capped here): gcompris-qt-data, stellarium-data, tuxpaint-stamps-default,
     extremetuxracer-data, mypaint-data-extras;
   * more Debian packages with photos: scratch (Media backgrounds and costumes), tuxpaint-data (starters,
     templates), palapeli-data (puzzle photos), jigzo-data, stellarium-data's textures and sky cultures;
   * /work/shared/peer-data/imagededup (base_images, and formats_images' Iggy and baboon).
   Kept: short side >= 128 px, aspect <= 3, and (except stellarium nebulae/landscapes and mypaint papers,
   which fit_whitening also takes whole) >= 2,000 distinct colours in a 128-px thumbnail (drawings out).
2. Writes them under WORK/photos and indexes them with `neardup index`'s code path (Index.add, the
   default model and backend) into WORK/index; the unit vectors are read back from the snapshot and kept
   in WORK/vectors.npz (--reuse starts from there).
3. Measures (photos_variant.neighbourhood_stats): b = cosine to the 20th nearest other photo (quantiles,
   also on random subsets of 500 and 1,000), share of pairs above 0.4 ... 0.7, the random-pair cosine
   distribution with its upper tail, and structure (photos with a neighbour above 0.55 / 0.7, component
   sizes of the graph of pairs above 0.55), for all photos and per source group.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fit_whitening  # noqa: E402
import photos_variant  # noqa: E402

from neardup import benchmark_set  # noqa: E402

RESERVED = {"opencv-doc", "darknet"}  # independent evaluation only
MIN_SIDE = 128
MAX_ASPECT = 3.0
MIN_COLOURS = 2000  # distinct colours in a 128-px thumbnail
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".ppm", ".pgm", ".bmp", ".tif", ".tiff")
PEER = Path("/work/shared/peer-data/imagededup")

#: extra Debian packages: (package, glob patterns inside it, colour filter)
EXTRA_DEBS = (
    ("scratch", ("usr/share/scratch/Media/Backgrounds/**/*", "usr/share/scratch/Media/Costumes/**/*"), True),
    ("tuxpaint-data", ("usr/share/tuxpaint/starters/*", "usr/share/tuxpaint/templates/*"), True),
    ("palapeli-data", ("usr/share/palapeli/collection/*", "usr/share/palapeli/backgrounds/*"), True),
    ("jigzo-data", ("usr/share/games/jigzo/image/*",), True),
    ("stellarium-data", ("usr/share/stellarium/textures/**/*", "usr/share/stellarium/skycultures/**/*"), True),
)


def _files(root: Path, patterns):
    for pattern in patterns:
        for name in sorted(glob.glob(str(root / pattern), recursive=True)):
            path = Path(name)
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                yield str(path.relative_to(root)), path.read_bytes()


def _usable(data: bytes, colour_filter: bool) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = fit_whitening.default_model_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError):
        return False
    w, h = rgb.size
    if min(w, h) < MIN_SIDE or max(w, h) / min(w, h) > MAX_ASPECT:
        return False
    if colour_filter:
        small = rgb.copy()
        small.thumbnail((128, 128))
        if small.getcolors(MIN_COLOURS) is not None:  # fewer than MIN_COLOURS colours: a drawing
            return False
    return True


def _deb(package: str, download: bool) -> Path | None:
    assert package not in RESERVED, package
    root, why = benchmark_set.deb_root(benchmark_set.DebSource(package, package, "", ()), download=download)
    if root is None:
        print(f"  {package}: skipped ({why})", file=sys.stderr)
    return root


def candidates(evalset: Path, download: bool):
    """(group, source label, bytes, colour filter) for every candidate image, in a fixed order."""
    gallery = sorted(p for p in (evalset / "gallery").glob("*.jpg") if not re.search(r"-t\d+$", p.stem))
    for path in gallery:
        yield "evalset", f"evalset:{path.name}", path.read_bytes(), False
    for package, short, _licence, patterns, _cap, _min_colours in fit_whitening.SOURCES:
        root = _deb(package, download)
        if root is None:
            continue
        whole = package in ("stellarium-data", "mypaint-data-extras")
        for name, data in fit_whitening._candidates(root, patterns):
            yield "training", f"deb:{package}:{name}", data, not whole
    for package, patterns, colour_filter in EXTRA_DEBS:
        root = _deb(package, download)
        if root is None:
            continue
        for name, data in _files(root, patterns):
            yield "extra", f"deb:{package}:{name}", data, colour_filter
    for name, data in _files(PEER, ("base_images/*", "formats_images/Iggy.1024.ppm", "formats_images/baboon.pgm")):
        yield "extra", f"imagededup:{name}", data, False


def gather(work: Path, evalset: Path, download: bool) -> list[dict]:
    out = work / "photos"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    seen, kept, considered = set(), [], 0
    for group, label, data, colour_filter in candidates(evalset, download):
        considered += 1
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen or not _usable(data, colour_filter):
            continue
        seen.add(digest)
        with Image.open(io.BytesIO(data)) as image:
            suffix = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif"}.get(image.format, ".png")
        if suffix == ".png" and not data.startswith(b"\x89PNG"):  # ppm/pgm/bmp: store as PNG
            buffer = io.BytesIO()
            with Image.open(io.BytesIO(data)) as image:
                image.convert("RGB").save(buffer, "PNG")
            data = buffer.getvalue()
        path = out / f"{len(kept):05d}{suffix}"
        path.write_bytes(data)
        kept.append({"file": path.name, "group": group, "source": label, "sha256": digest})
    print(f"gathered {len(kept)} distinct usable photos of {considered} candidates", file=sys.stderr)
    (work / "photos.json").write_text(json.dumps(kept, indent=1))
    return kept


def embed(work: Path, kept: list[dict]) -> np.ndarray:
    from neardup.index import Index

    shutil.rmtree(work / "index", ignore_errors=True)
    t0 = time.perf_counter()
    with Index.open(work / "index", create=True) as index:
        summary = index.add([work / "photos"])
        snap = index.snapshot()
        by_name = {Path(p).name: i for i, p in enumerate(snap.paths)}
        vectors = snap.vectors()
        backend = getattr(index.embedder, "name", "?")
    print(f"embedded {len(snap)} photos in {time.perf_counter() - t0:.0f} s ({summary.failed} failed), {backend}",
          file=sys.stderr)
    rows = [by_name[k["file"]] for k in kept if k["file"] in by_name]
    missing = [k["file"] for k in kept if k["file"] not in by_name]
    if missing:
        print(f"  not indexed: {missing[:10]}", file=sys.stderr)
    vectors = vectors[rows].astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    groups = np.array([k["group"] for k in kept if k["file"] in by_name])
    sources = np.array([k["source"] for k in kept if k["file"] in by_name])
    np.savez(work / "vectors.npz", vectors=vectors, groups=groups, sources=sources)
    return vectors


def predict(n: int, seed: int, sample: int, params) -> dict:
    """Figures of the generator at n rows (e.g. 1M) by exact blockwise scan: `sample` random model rows of
    the first chunk (the urn is exchangeable: any rows are as good) against every row (torch bfloat16
    matmul when torch is installed, else numpy float32), keeping each sampled row's top 21."""
    gen = photos_variant.PhotosVariant(seed, n, None, params)
    try:
        import torch
    except ImportError:
        torch = None
    rng = np.random.default_rng(seed)
    top = best_rows = queries = None
    above = {t: 0 for t in photos_variant.PAIR_THRESHOLDS}
    t0 = time.perf_counter()
    gen_seconds = 0.0
    chunks = gen.chunks(max(photos_variant.CHUNK, 3 * gen.planted))
    while True:
        t1 = time.perf_counter()
        item = next(chunks, None)
        gen_seconds += time.perf_counter() - t1
        if item is None:
            break
        start, vectors = item
        if start == 0:
            pick = rng.choice(np.arange(3 * gen.planted, len(vectors)), sample, replace=False)
            queries = vectors[pick].copy()
            top = np.full((sample, photos_variant.B_RANK + 1), -np.inf, np.float32)
        if torch is not None:
            scores = (torch.from_numpy(queries).bfloat16() @ torch.from_numpy(vectors).bfloat16().T).float().numpy()
        else:
            scores = queries @ vectors.T
        if start == 0:
            scores[np.arange(sample), pick] = -np.inf  # not its own neighbour
        for t in above:
            above[t] += int((scores > t).sum())
        k = photos_variant.B_RANK + 1
        cand = np.c_[top, -np.partition(-scores, k - 1, axis=1)[:, :k]]
        top = -np.partition(-cand, k - 1, axis=1)[:, :k]
        print(f"  predict: {start + len(vectors):,} / {n:,} rows", file=sys.stderr, flush=True)
    top = -np.sort(-top, axis=1)
    b = top[:, photos_variant.B_RANK - 1]
    return {"n": n, "sample": sample, "seed": seed, "seconds": round(time.perf_counter() - t0, 1),
            "generate_seconds": round(gen_seconds, 1),
            "b_quantiles": {f"{q:g}": round(float(np.quantile(b, q)), 4) for q in photos_variant.QUANTILES},
            "b_mean": round(float(b.mean()), 4),
            "pairs_above": {f"{t:g}": float(f"{c / (sample * (n - 1)):.3g}") for t, c in above.items()},
            "with_neighbour_above": {"0.55": float(np.mean(top[:, 0] > 0.55)), "0.7": float(np.mean(top[:, 0] > 0.7))},
            "describe": gen.describe()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/photo-neighbourhoods"))
    parser.add_argument("--evalset", type=Path, default=Path("/tmp/evalsets/seed1"),
                        help="a `neardup eval build` set (its gallery's whole images are used)")
    parser.add_argument("--no-download", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="start from WORK/vectors.npz")
    parser.add_argument("--json", type=Path, default=Path("photo_neighbourhoods.json"))
    parser.add_argument("--fit", type=int, metavar="EVALS", help="fit the generator's parameters (Nelder-Mead, EVALS evaluations)")
    parser.add_argument("--predict", type=int, metavar="N", help="the fitted generator's figures at N rows (exact scan of --sample rows)")
    parser.add_argument("--sample", type=int, default=500)
    args = parser.parse_args()
    if args.predict:
        figures = predict(args.predict, 1, args.sample, photos_variant.FITTED)
        print(json.dumps(figures, indent=1))
        args.json.write_text(json.dumps(figures, indent=1))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if args.reuse and (args.work / "vectors.npz").exists():
        saved = np.load(args.work / "vectors.npz")
        vectors, groups, sources = saved["vectors"], saved["groups"], saved["sources"]
    else:
        kept = gather(args.work, args.evalset, download=not args.no_download)
        vectors = embed(args.work, kept)
        saved = np.load(args.work / "vectors.npz")
        groups, sources = saved["groups"], saved["sources"]
    figures = {"n": len(vectors), "dim": int(vectors.shape[1]),
               "sources": {g: int((groups == g).sum()) for g in np.unique(groups)},
               "packages": {}, "all": photos_variant.neighbourhood_stats(vectors, subsets=(500, 1000), seed=0)}
    for label in sources:
        key = label.split(":")[0] if not label.startswith("deb:") else label.split(":")[1]
        figures["packages"][key] = figures["packages"].get(key, 0) + 1
    for g in np.unique(groups):
        figures[f"group:{g}"] = photos_variant.neighbourhood_stats(vectors[groups == g], subsets=(), seed=0)
    if args.fit:
        fitted = photos_variant.fit(figures["all"], len(vectors), iterations=args.fit,
                                    log=lambda line: print(line, file=sys.stderr, flush=True))
        figures["fitted"] = fitted.__dict__
        print(f"fitted: {fitted}")
    gen = {f"seed{s}": photos_variant.neighbourhood_stats(photos_variant.photos_vectors(len(vectors), s), subsets=(500, 1000), seed=s)
           for s in (1, 2, 3)}
    figures["generator_fitted"] = gen
    args.json.write_text(json.dumps(figures, indent=1))
    for s, stats in gen.items():
        print(photos_variant.format_stats(stats, f"generator (FITTED), {s}, n={len(vectors)}"))
    print(photos_variant.format_stats(figures["all"], f"real photos (n={len(vectors)})"))
    for g in np.unique(groups):
        print(photos_variant.format_stats(figures[f"group:{g}"], f"{g} (n={int((groups == g).sum())})"))
    print(f"figures written to {args.json}")


if __name__ == "__main__":
    main()
