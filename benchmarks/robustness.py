"""Descriptor robustness experiments on an evaluation set (issue 4, item 5).

    python benchmarks/robustness.py SET [--cache DIR] [--out RESULTS.md-fragment]

Every variant is scored like `neardup eval run` scores neardup (exact search, k = 10): top-1, micro-AP,
and the `dups` operating point: the lowest threshold whose groups keep pair precision >= 0.99, and the
recall there. The EfficientNet-Lite0 feature maps (1280 x h x w, before pooling) of every image, of its
mirror, and at a second, smaller input size (160) are computed once and cached per file, so variants only re-pool.
Collection-fitted transforms (centring, PCA whitening) are fitted on the gallery (what an index holds),
never on the queries. Indexing cost is the measured forward time per image of what a variant needs at
indexing time (query-side tricks cost nothing there).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from neardup import evaluation
from neardup.images import load_image
from neardup.models.efficientnet_lite0 import PIXEL_MEAN, PIXEL_SCALE, TorchEmbedder


def pixels(image: Image.Image, size: int) -> torch.Tensor:
    resized = image.resize((size, size), Image.Resampling.BICUBIC)
    arr = (np.asarray(resized, dtype=np.float32) - PIXEL_MEAN) / PIXEL_SCALE
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


class Features:
    """Cached feature maps: key -> [n, 1280, h, w] float16 for every image of the set."""

    def __init__(self, paths: list[str], cache: Path):
        self.paths, self.cache = paths, cache
        self.model = TorchEmbedder()._model
        self.seconds: dict[str, float] = {}
        cache.mkdir(parents=True, exist_ok=True)

    def get(self, key: str, size: int, mirrored: bool) -> np.ndarray:
        tag = hashlib.sha1("\n".join(self.paths).encode()).hexdigest()[:12]
        path = self.cache / f"{tag}-{key}.npy"
        if path.exists():
            return np.load(path)
        out, started = [], time.perf_counter()
        forward = 0.0
        for i in range(0, len(self.paths), 8):
            batch = []
            for p in self.paths[i:i + 8]:
                image = load_image(p, min_side=size).image.convert("RGB")
                if mirrored:
                    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                batch.append(pixels(image, size))
            t = time.perf_counter()
            with torch.inference_mode():
                maps = torch.cat([self.model.forward_features(c.contiguous(memory_format=torch.channels_last))
                                  for c in torch.stack(batch).split(4)])
            forward += time.perf_counter() - t
            out.append(maps.numpy().astype(np.float16))
        maps = np.concatenate(out)
        np.save(path, maps)
        self.seconds[key] = forward / len(self.paths)
        print(f"  {key}: {len(self.paths)} images, {time.perf_counter() - started:.1f} s "
              f"({1000 * forward / len(self.paths):.1f} ms/image forward)", flush=True)
        return maps


def l2(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def gap(maps: np.ndarray) -> np.ndarray:
    return l2(maps.astype(np.float32).mean(axis=(2, 3)))


def gem(maps: np.ndarray, p: float = 3.0) -> np.ndarray:
    x = np.clip(maps.astype(np.float32), 1e-6, None)
    return l2((x ** p).mean(axis=(2, 3)) ** (1 / p))


def maxpool(maps: np.ndarray) -> np.ndarray:
    return l2(maps.astype(np.float32).max(axis=(2, 3)))


def centre(gallery: np.ndarray):
    mean = gallery.mean(axis=0)
    return lambda v: l2(v - mean)


def pca_whiten(gallery: np.ndarray, dims: int, shrink: float = 0.0):
    """PCA whitening fitted on the gallery: project on the top `dims` components, divide by
    sqrt(eigenvalue + shrink * mean eigenvalue) (shrinkage keeps tiny components from dominating)."""
    mean = gallery.mean(axis=0)
    _, s, vt = np.linalg.svd(gallery - mean, full_matrices=False)
    eig = s ** 2 / len(gallery)
    dims = min(dims, len(eig))
    scale = 1.0 / np.sqrt(eig[:dims] + shrink * eig[:dims].mean())
    proj = vt[:dims].T * scale
    return lambda v: l2((v - mean) @ proj)


def score(evalset, gvec: np.ndarray, qvec: np.ndarray, qvec_alt: np.ndarray | None = None, k: int = 10) -> dict:
    gallery_ids = [g["id"] for g in evalset.gallery]
    truths = [set(q["matches"]) for q in evalset.queries]
    sims = qvec @ gvec.T
    if qvec_alt is not None:  # query-side trick: the better of the query and its mirror
        sims = np.maximum(sims, qvec_alt @ gvec.T)
    rankings = [evaluation.top_k(sims[i], gallery_ids, k) for i in range(len(qvec))]
    metrics = evaluation.ranking_metrics(rankings, truths, k)
    # dups: every gallery image and query together; with the mirror trick a pair scores its best orientation
    allv = np.concatenate([gvec, qvec])
    labels = [g["id"] for g in evalset.gallery] + [q["matches"][0] if q["matches"] else q["id"] for q in evalset.queries]
    parts = [g.get("source") if g.get("role") == "distractor" else None for g in evalset.gallery] + [None] * len(qvec)
    full = allv @ allv.T
    if qvec_alt is not None:
        alt = np.concatenate([gvec_mirror_placeholder(gvec), qvec_alt])
        full = np.maximum(full, allv @ alt.T)
        full = np.maximum(full, full.T)
    a, b = np.nonzero(np.triu(full >= 0.2, 1))
    curve = evaluation.group_pair_curve(a, b, full[a, b].astype(np.float64), labels, parts)
    cal = evaluation.calibrate(curve)
    return {**metrics, "threshold": cal["threshold"], "dups_recall": cal["recall"],
            "per_edit": evaluation._by_edit(rankings, truths, [q.get("edit", "") for q in evalset.queries], k)}


def gvec_mirror_placeholder(gvec: np.ndarray) -> np.ndarray:
    return gvec  # gallery images are not mirrored at indexing time: the trick is query-side only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("set")
    parser.add_argument("--cache", default=None, help="feature cache folder (default: SET/.features)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # 2 cores shared with other jobs: one thread avoids OpenMP spin contention
    evalset = evaluation.load_set(args.set)
    ng = len(evalset.gallery)
    paths = [evalset.path(g) for g in evalset.gallery] + [evalset.path(q) for q in evalset.queries]
    feats = Features(paths, Path(args.cache or Path(args.set) / ".features"))
    print(f"set {args.set}: {ng} gallery images, {len(paths) - ng} queries")
    m224 = feats.get("224", 224, False)
    m224f = feats.get("224-mirror", 224, True)
    m160 = feats.get("160", 160, False)

    base = gap(m224)
    variants: dict[str, tuple[np.ndarray, np.ndarray | None, str]] = {}
    variants["GAP 224 (current)"] = (base, None, "1.0x")
    variants["GeM p=3"] = (gem(m224), None, "1.0x")
    variants["max pooling"] = (maxpool(m224), None, "1.0x")
    variants["GAP + query mirror (max)"] = (base, gap(m224f)[ng:], "1.0x (query 2x)")
    variants["GAP, mirror-symmetric (v + v(mirror))"] = (l2(base + gap(m224f)), None, "2.0x")
    variants["GAP 224+160 (multi-scale)"] = (l2(base + gap(m160)), None, "~1.5x")
    c = centre(base[:ng])
    variants["GAP, centred (gallery mean)"] = (c(base), None, "1.0x")
    variants["GAP, centred + query mirror"] = (c(base), c(gap(m224f))[ng:], "1.0x (query 2x)")
    for dims in (128, 256, 512):
        for shrink in (0.0, 1.0):
            w = pca_whiten(base[:ng], dims, shrink)
            variants[f"GAP, PCA-whitened {dims}-d, shrink {shrink}"] = (w(base), None, "1.0x")
    # does the gain need the originals in the fit? fit on the distractors alone
    distractor = np.array([g.get("role") == "distractor" for g in evalset.gallery])
    for dims in (128, 256):
        w = pca_whiten(base[:ng][distractor], dims, 1.0)
        variants[f"GAP, PCA-whitened {dims}-d shrink 1, fitted on distractors only"] = (w(base), None, "1.0x")
    w = pca_whiten(base[:ng], 256, 1.0)
    variants["GAP, PCA-whitened 256-d shrink 1 + query mirror"] = (w(base), w(gap(m224f))[ng:], "1.0x (query 2x)")

    # split check: fit on the distractors and half of the originals, score only the queries of the other half
    originals = sorted(g["id"] for g in evalset.gallery if g.get("role") == "original")
    held_out = set(originals[1::2])
    in_fit = np.array([g["id"] not in held_out for g in evalset.gallery])
    keep = [i for i, q in enumerate(evalset.queries) if set(q["matches"]) & held_out]
    half = evaluation.EvalSet(evalset.root, {**evalset.truth, "queries": [evalset.queries[i] for i in keep]})
    qsel = ng + np.array(keep)
    for dims in (128, 256):
        w = pca_whiten(base[:ng][in_fit], dims, 1.0)
        for name, vec in (("GAP (current), held-out half", base), (f"PCA {dims}-d shrink 1 fitted without the held-out half", w(base))):
            r = score(half, vec[:ng], vec[qsel])
            print(f"| split: {name} | {r['top1']:.3f} | {r['micro_AP']:.3f} | {r['mAP']:.3f} | {r['threshold']:.3f} | {r['dups_recall']:.3f} | 1.0x |", flush=True)

    rows = []
    for name, (vec, alt, cost) in variants.items():
        r = score(evalset, vec[:ng], vec[ng:], alt)
        rows.append((name, r, cost))
        thr = "none" if r["threshold"] is None else f"{r['threshold']:.3f}"
        print(f"| {name} | {r['top1']:.3f} | {r['micro_AP']:.3f} | {r['mAP']:.3f} | {thr} | {r['dups_recall']:.3f} | {cost} |",
              flush=True)
    print("\nforward ms/image:", {k: round(1000 * v, 1) for k, v in feats.seconds.items()})
    print("\nper edit micro-AP (first 4 variants):")
    for name, r, _ in rows[:4] + rows[7:9]:
        print(name, {e: round(m["micro_AP"], 3) for e, m in r["per_edit"].items()})


if __name__ == "__main__":
    main()
