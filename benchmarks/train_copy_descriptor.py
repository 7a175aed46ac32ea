"""Fine-tune the default model (EfficientNet-Lite0) for copy detection, SSCD-style, on this machine's CPUs.

    .venv/bin/python benchmarks/train_copy_descriptor.py train --run NAME [--epochs 20] [--cut 5] [--seed 0] ...
    .venv/bin/python benchmarks/train_copy_descriptor.py eval  --run NAME [--weights FILE] [--sets /tmp/evalsets/seed1 ...]
    .venv/bin/python benchmarks/train_copy_descriptor.py speed [--cuts 8 11 13] [--batch 32]

Everything a run writes goes to training-runs/NAME/ (git-ignored): config.json, log.jsonl (one JSON line per
--log-every steps and per epoch), checkpoint.pt (the latest state), weights-epochNNN.pt (trained blocks only,
every --keep-every epochs and the last), eval-*.json. The photos and the whitening's pixel cache are shared
by runs in training-runs/_data/.

**Resume.** Run the same `train --run NAME` again: it reads training-runs/NAME/checkpoint.pt and continues at
the step it stopped (model, AdamW state, LR schedule, step, epoch and RNG states restored; the epoch's views
are re-made from their seeds, so the data is the same). A checkpoint is written every --checkpoint-minutes,
at the end of every epoch and on SIGTERM/SIGINT (SIGKILL loses at most --checkpoint-minutes). Settings that
change the result (seed, cut, views, batch, lr, loss, epochs...) must match the stored config.json; a
mismatch is refused.

**Data** (photos_for_training): photos from the Debian packages of benchmarks/fit_whitening.py's SOURCES
(every usable photo, not its caps) plus EXTRA_SOURCES, fetched with `apt-get download` into the cache
fit_whitening uses. The guard (check_training_package) refuses every package a `neardup eval` set draws
from (neardup.benchmark_set.DEB_SOURCES) and the packages reserved for independent evaluation (RESERVED:
opencv-doc, darknet). Photos are shrunk to PHOTO_SIDE px (long side) and near-duplicates among them (cosine
of the shipped descriptor >= DEDUP_COSINE) are dropped, so no two training photos are each other's copy.

**Recipe** (SSCD, Pizzi et al., CVPR 2022, on a CPU budget):
* route: the frozen part (stem + blocks[:cut]) runs once per epoch over that epoch's fresh views (bf16
  autocast, channels_last) and its activations are cached in memory; blocks[cut:] + the head conv/BN are
  trained on them (bf16 autocast, channels_last). `speed` measures every part;
* each epoch: every photo gets --views fresh augmented views (benchmarks/copy_augment.py, seeded by
  (seed, epoch, photo, view)); each view goes through the default model's own pixel path
  (default_model.model_pixels: border trim, 224x224 bicubic, (x-127)/128);
* batch: --photos-per-batch photos x --views views; descriptor exactly as the default pipeline before
  whitening: head features -> GeM (p = 3) -> L2; for the loss it is centred by the shipped whitening's
  mean (fixed) and L2-normalised again;
* loss: multi-positive InfoNCE with in-batch negatives (temperature --temperature, every other view of the
  same photo a positive) + --koleo x KoLeo (Sablayrolles et al. 2019: -mean log distance to the nearest
  view of another photo);
* BatchNorm statistics frozen (the trained part stays in eval mode; BN affine parameters train);
* AdamW (lr --lr, weight decay --weight-decay), linear warm-up then cosine decay over the run.

**Eval** (`eval`): the trained blocks are loaded into the default model, the learned whitening is refitted on
the trained features with fit_whitening's own photos, edits and neardup.models.whitening.fit (same seed,
copies, dim, shrinkage as the shipped fit), and `neardup eval run`'s code (neardup.evaluation.run, exact and
LSH search, dups at the default threshold, the calibrated threshold) runs on each set with that embedder,
beside the shipped default model (torch fp32; its figures kept per set under its identity) on the same
sets. Nothing in src/ changes; the trained model has its own identity, so its vectors never mix with an
index of the shipped model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import copy_augment  # noqa: E402
import fit_whitening  # noqa: E402

from neardup import benchmark_set  # noqa: E402
from neardup.models import default_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RUNS = REPO / "training-runs"
#: Reserved for an independent evaluation of whatever is trained here: never train or calibrate on them.
RESERVED = frozenset({"opencv-doc", "darknet"})
#: More photo packages (package, short, licence, patterns, min colours), beyond fit_whitening.SOURCES.
EXTRA_SOURCES = (
    ("sway-backgrounds", "sway", "CC0 / CC-BY-SA (debian/copyright)", ("usr/share/backgrounds/sway/*",), 0),
    ("kstars-data", "kstars", "GPL-2+ / CC (debian/copyright)",
     ("usr/share/kstars/textures/*", "usr/share/kstars/skycultures/**/*.png", "usr/share/kstars/*.jpg",
      "usr/share/kstars/*.png"), 8000),
)
#: The whitening the ImageNet model shipped with before the copy-trained blocks (the same file as
#: src/neardup/models/efficientnet_lite0_whitening.npz then): training centres its vectors by its mean and
#: drops near-duplicate training photos by its descriptor, so a run reproduces whatever ships later.
IMAGENET_WHITENING = Path(__file__).with_name("imagenet_lite0_whitening.npz")
PHOTO_SIDE = 512
DEDUP_COSINE = 0.85
INPUT = default_model.INPUT_SIZE


# ---- data ----------------------------------------------------------------------------------------

def check_training_package(package: str) -> None:
    """Refuse a package that an evaluation uses: SystemExit naming why."""
    if package in RESERVED:
        raise SystemExit(f"{package} is reserved for independent evaluation; never train or calibrate on it")
    if package in {source.package for source in benchmark_set.DEB_SOURCES}:
        raise SystemExit(f"{package} is a `neardup eval` source; training on it would tune to the benchmark")


def training_sources() -> list[tuple[str, str, str, tuple[str, ...], int]]:
    """(package, short, licence, patterns, min colours) of every training package, each one guarded."""
    sources = [(p, s, lic, pat, mc) for p, s, lic, pat, _cap, mc in fit_whitening.SOURCES] + list(EXTRA_SOURCES)
    for package, *_ in sources:
        check_training_package(package)
    return sources


def _shrunk(image: Image.Image, side: int = PHOTO_SIDE) -> Image.Image:
    if max(image.size) > side:
        image = image.copy()
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
    return image


def collect_photos(sources=None, download: bool = True) -> tuple[list[str], list[Image.Image], dict]:
    """(names, RGB photos shrunk to PHOTO_SIDE, per-package summary) of every usable photo of the sources
    (fit_whitening's usability rules: readable, short side >= MIN_SIDE, aspect <= MAX_ASPECT, enough colours)."""
    names, photos, summary = [], [], {}
    for package, short, licence, patterns, min_colours in sources or training_sources():
        check_training_package(package)
        root, why = benchmark_set.deb_root(benchmark_set.DebSource(package, short, licence, ()), download=download)
        if root is None:
            print(f"{package}: skipped ({why})", file=sys.stderr)
            summary[package] = {"skipped": why}
            continue
        used = 0
        for name, rgb in fit_whitening.usable_rgb(root, patterns, min_colours):
            names.append(f"{package}:{name}")
            photos.append(_shrunk(rgb))
            used += 1
        summary[package] = {"deb": (root / ".complete").read_text().strip(), "licence": licence, "usable": used}
        print(f"{package}: {used} usable photos", file=sys.stderr)
    return names, photos, summary


def photos_for_training(cache: Path) -> tuple[list[str], list[Image.Image], dict]:
    """collect_photos without near-duplicates, cached in `cache` (photos.npz + photos.json)."""
    meta_path, data_path = cache / "photos.json", cache / "photos.npz"
    if meta_path.is_file() and data_path.is_file():
        meta = json.loads(meta_path.read_text())
        with np.load(data_path) as data:
            photos = [Image.fromarray(data[f"p{i}"]) for i in range(len(meta["names"]))]
        return meta["names"], photos, meta
    names, photos, summary = collect_photos()
    vectors = imagenet_vectors(photos)
    keep = []
    for i in range(len(photos)):
        if not keep or float(np.max(vectors[keep] @ vectors[i])) < DEDUP_COSINE:
            keep.append(i)
    print(f"{len(photos)} photos, {len(photos) - len(keep)} near-duplicates dropped", file=sys.stderr)
    names, photos = [names[i] for i in keep], [photos[i] for i in keep]
    meta = {"names": names, "sources": summary, "photo_side": PHOTO_SIDE, "dedup_cosine": DEDUP_COSINE}
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(data_path.with_suffix(".tmp.npz"), **{f"p{i}": np.asarray(p) for i, p in enumerate(photos)})
    os.replace(data_path.with_suffix(".tmp.npz"), data_path)
    meta_path.write_text(json.dumps(meta, indent=1))
    return names, photos, meta


def imagenet_whitening() -> tuple[np.ndarray, np.ndarray]:
    with np.load(IMAGENET_WHITENING) as data:
        return data["mean"].astype(np.float32), data["projection"].astype(np.float32)


def imagenet_embedder():
    """A neardup Embedder of the descriptor before copy training (ImageNet weights, their whitening): the
    near-duplicate filter of the training photos."""
    from neardup.models.efficientnet_lite0 import load_pretrained

    return embedder_of(load_pretrained(whitened=False, copy_trained=False), *imagenet_whitening(),
                       "efficientnet-lite0", default_model.imagenet_weights_sha256())


def embedder_of(model, mean: np.ndarray, projection: np.ndarray, name: str, weights_sha256: str):
    """A neardup TorchEmbedder running `model` (unwhitened) with this whitening, under its own identity."""
    torch = _torch()
    from neardup.models.efficientnet_lite0 import TorchEmbedder

    model.whitening_mean.copy_(torch.from_numpy(mean))
    model.whitening_projection.copy_(torch.from_numpy(projection))
    embedder = TorchEmbedder()
    embedder._model = model.eval().to(memory_format=torch.channels_last)
    embedder.name = name
    embedder.identity = {"name": name, "weights_sha256": weights_sha256, "preprocessing": default_model.PREPROCESSING,
                         "whitening_sha256": hashlib.sha256(mean.tobytes() + projection.tobytes()).hexdigest(),
                         "dim": default_model.DIM}
    return embedder


def imagenet_vectors(photos: list[Image.Image]) -> np.ndarray:
    """imagenet_embedder's descriptors (torch, fp32) of PIL photos."""
    embedder = imagenet_embedder()
    out = [embedder.embed(np.stack([default_model.model_pixels(p) for p in photos[s:s + 64]]))
           for s in range(0, len(photos), 64)]
    return np.concatenate(out)


# ---- views ---------------------------------------------------------------------------------------

_WORKER_PHOTOS: list[Image.Image] = []


def view_pixels(photo: Image.Image, seed: int, epoch: int, photo_index: int, view: int,
                min_crop_area: float = copy_augment.MIN_AREA) -> np.ndarray:
    """One fresh augmented view as the default model sees it: uint8 [224, 224, 3]."""
    image = copy_augment.augmented_view(photo, copy_augment.view_rng(seed, epoch, photo_index, view),
                                        min_crop_area=min_crop_area)
    return default_model.model_pixels(image)


def _views_of(task: tuple[int, int, int, int, float]) -> np.ndarray:
    seed, epoch, index, views, min_crop_area = task
    return np.stack([view_pixels(_WORKER_PHOTOS[index], seed, epoch, index, v, min_crop_area) for v in range(views)])


def _worker_defaults() -> None:
    """Augmentation workers die on SIGTERM/SIGINT (the trainer's handlers only set a flag)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def epoch_views(photos: list[Image.Image], seed: int, epoch: int, views: int, workers: int,
                min_crop_area: float = copy_augment.MIN_AREA) -> np.ndarray:
    """uint8 [n_photos, views, 224, 224, 3]: this epoch's views (the same whatever `workers` is)."""
    global _WORKER_PHOTOS
    _WORKER_PHOTOS = photos
    tasks = [(seed, epoch, i, views, min_crop_area) for i in range(len(photos))]
    if workers <= 1:
        return np.stack([_views_of(t) for t in tasks])
    with multiprocessing.get_context("fork").Pool(workers, initializer=_worker_defaults) as pool:
        return np.stack(pool.map(_views_of, tasks, chunksize=8))


# ---- model ---------------------------------------------------------------------------------------

def _torch():
    import torch

    return torch


class Split:
    """The default model cut before block `cut`: `frozen` (stem + blocks[:cut]) and `trained`
    (blocks[cut:] + head conv + head BN), with the descriptor the default pipeline forms from them."""

    def __init__(self, cut: int):
        torch = _torch()
        from neardup.models.efficientnet_lite0 import load_pretrained

        self.cut = cut
        self.model = load_pretrained(whitened=False, copy_trained=False)
        if not 0 <= cut <= len(self.model._blocks):
            raise SystemExit(f"--cut must be in 0..{len(self.model._blocks)}")
        mean, _ = imagenet_whitening()
        self.center = torch.from_numpy(mean)
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.trained_parameters():
            p.requires_grad_(True)
        self.model.eval()  # BatchNorm statistics frozen, always
        self.model.to(memory_format=torch.channels_last)

    def trained_modules(self) -> dict:
        return {**{f"_blocks.{i}": self.model._blocks[i] for i in range(self.cut, len(self.model._blocks))},
                "_conv_head": self.model._conv_head, "_bn1": self.model._bn1}

    def trained_parameters(self) -> list:
        return [p for m in self.trained_modules().values() for p in m.parameters()]

    def trained_state(self) -> dict:
        """The trained modules' weights (and BN buffers), keyed as in the full model's state dict."""
        return {f"{name}.{key}": value.detach().clone() for name, module in self.trained_modules().items()
                for key, value in module.state_dict().items()}

    def load_trained_state(self, state: dict) -> None:
        full = self.model.state_dict()
        unknown = set(state) - set(full)
        if unknown:
            raise ValueError(f"not in the model: {sorted(unknown)[:3]}")
        full.update(state)
        self.model.load_state_dict(full, strict=True)

    def frozen(self, x):
        import torch.nn.functional as F

        m = self.model
        x = F.relu6(m._bn0(m._conv_stem(x)))
        for block in m._blocks[:self.cut]:
            x = block(x)
        return x

    def pooled(self, activations):
        """Activations after the frozen part -> L2-normalised GeM vectors [n, 1280] (float32): the default
        pipeline's descriptor before the whitening."""
        torch = _torch()
        import torch.nn.functional as F

        from neardup.models.efficientnet_lite0 import gem

        m = self.model
        x = activations
        for block in m._blocks[self.cut:]:
            x = block(x)
        x = F.relu6(m._bn1(m._conv_head(x)))
        return F.normalize(gem(x.float()), dim=1) if x.dtype != torch.float32 else F.normalize(gem(x), dim=1)


def frozen_activations(split: Split, pixels: np.ndarray, bf16: bool, chunk: int = 32):
    """uint8 [n, 224, 224, 3] -> the frozen part's activations, bf16 (or fp32) [n, c, h, w], channels_last."""
    torch = _torch()
    out = []
    dtype = torch.bfloat16 if bf16 else torch.float32
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for s in range(0, len(pixels), chunk):
            x = torch.from_numpy(default_model.normalise(pixels[s:s + chunk])).contiguous(memory_format=torch.channels_last)
            out.append(split.frozen(x).to(dtype))
    return torch.cat(out).contiguous(memory_format=torch.channels_last)


def copy_loss(vectors, labels, center, temperature: float, koleo: float) -> tuple:
    """(total, infonce, koleo term) of L2 vectors [n, d] with photo labels [n]: multi-positive InfoNCE over
    the batch (each view against every other; positives are the other views of its photo) plus KoLeo
    (-mean log of each view's distance to its nearest view of another photo), on centred, re-normalised
    vectors."""
    torch = _torch()
    import torch.nn.functional as F

    z = F.normalize(vectors - center, dim=1)
    similarity = z @ z.T
    n = len(z)
    eye = torch.eye(n, dtype=torch.bool)
    same = (labels[:, None] == labels[None, :]) & ~eye
    logits = (similarity / temperature).masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    infonce = -(log_prob.masked_fill(~same, 0).sum(1) / same.sum(1).clamp(min=1)).mean()
    other = similarity.masked_fill(same | eye, float("-inf"))
    nearest = other.max(dim=1).values
    distance = torch.sqrt(torch.clamp(2 - 2 * nearest, min=1e-8))
    koleo_term = -torch.log(distance + 1e-8).mean()
    return infonce + koleo * koleo_term, infonce, koleo_term


# ---- training ------------------------------------------------------------------------------------

#: Settings that change a run's result: a resumed run must keep them.
RESULT_KEYS = ("seed", "cut", "views", "photos_per_batch", "epochs", "lr", "weight_decay", "warmup_steps",
               "temperature", "koleo", "bf16", "max_photos", "min_crop_area")
#: Settings added after runs were made: a stored config without one ran with this value.
RESULT_DEFAULTS = {"min_crop_area": copy_augment.MIN_AREA}


class Stop(Exception):
    pass


def _save_atomic(obj, path: Path) -> None:
    torch = _torch()
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _log(run_dir: Path, record: dict) -> None:
    record = {"time": round(time.time(), 1), **record}
    with open(run_dir / "log.jsonl", "a") as log:
        log.write(json.dumps(record) + "\n")
    print(json.dumps(record), file=sys.stderr, flush=True)


def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(args, data: tuple | None = None) -> None:
    """Train or resume the run args.run (in args.runs_dir); `data` = (names, photos, meta) replaces the
    Debian photos (the tests train on a few sample photos)."""
    torch = _torch()
    torch.set_num_threads(args.threads)
    run_dir = Path(args.runs_dir) / args.run
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {key: getattr(args, key) for key in RESULT_KEYS}
    config_path = run_dir / "config.json"
    if config_path.is_file():
        stored = json.loads(config_path.read_text())
        stored = {**RESULT_DEFAULTS, **stored}
        changed = {k: (stored.get(k), v) for k, v in config.items() if stored.get(k) != v}
        if changed:
            raise SystemExit(f"{run_dir}: settings differ from the stored run (stored, given): {changed}; "
                             "use another --run")
    else:
        config_path.write_text(json.dumps(config, indent=1))

    names, photos, meta = data or photos_for_training(Path(args.runs_dir) / "_data")
    if args.max_photos:
        order = np.random.default_rng(args.seed).permutation(len(photos))[:args.max_photos]
        names, photos = [names[i] for i in sorted(order)], [photos[i] for i in sorted(order)]
    n_photos = len(photos)
    steps_per_epoch = n_photos // args.photos_per_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{n_photos} photos: fewer than --photos-per-batch {args.photos_per_batch}")
    total_steps = steps_per_epoch * args.epochs

    split = Split(args.cut)
    optimiser = torch.optim.AdamW(split.trained_parameters(), lr=args.lr, weight_decay=args.weight_decay)
    step, epoch, started_at = 0, 0, time.time()
    checkpoint_path = run_dir / "checkpoint.pt"
    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        split.load_trained_state(state["trained"])
        optimiser.load_state_dict(state["optimiser"])
        step = state["step"]
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        _log(run_dir, {"event": "resumed", "step": step, "epoch": step // steps_per_epoch})
    else:
        torch.manual_seed(args.seed)
        np.random.seed(args.seed)
        random.seed(args.seed)
        _log(run_dir, {"event": "started", "photos": n_photos, "steps_per_epoch": steps_per_epoch,
                       "total_steps": total_steps, "trained_parameters": sum(p.numel() for p in split.trained_parameters()),
                       "config": config, "sources": meta.get("sources")})

    stop = {"signal": None}

    def on_signal(number, frame):
        stop["signal"] = number

    previous = {number: signal.signal(number, on_signal) for number in (signal.SIGTERM, signal.SIGINT)}

    def save(reason: str) -> None:
        _save_atomic({"trained": split.trained_state(), "optimiser": optimiser.state_dict(), "step": step,
                      "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(),
                      "python_rng": random.getstate(), "config": config}, checkpoint_path)
        _log(run_dir, {"event": "checkpoint", "reason": reason, "step": step})

    last_save = time.time()
    center = split.center
    try:
        while step < total_steps:
            epoch = step // steps_per_epoch
            t0 = time.perf_counter()
            pixels = epoch_views(photos, args.seed, epoch, args.views, args.workers, args.min_crop_area)
            t1 = time.perf_counter()
            flat = pixels.reshape(-1, INPUT, INPUT, 3)
            activations = frozen_activations(split, flat, args.bf16)
            t2 = time.perf_counter()
            del pixels, flat
            _log(run_dir, {"event": "epoch views", "epoch": epoch, "views": n_photos * args.views,
                           "augment_s": round(t1 - t0, 1), "frozen_s": round(t2 - t1, 1),
                           "augment_views_per_s": round(n_photos * args.views / (t1 - t0), 1),
                           "frozen_views_per_s": round(n_photos * args.views / (t2 - t1), 1)})
            order = np.random.default_rng([args.seed, epoch, 7]).permutation(n_photos)
            window = {"loss": [], "infonce": [], "koleo": [], "pos": [], "neg": [], "t": time.perf_counter()}
            while step < total_steps and step // steps_per_epoch == epoch:
                if stop["signal"] is not None or (args.stop_after_steps and step >= args.stop_after_steps):
                    raise Stop()
                within = step % steps_per_epoch
                chosen = order[within * args.photos_per_batch:(within + 1) * args.photos_per_batch]
                rows = torch.from_numpy((chosen[:, None] * args.views + np.arange(args.views)[None]).ravel())
                labels = torch.arange(len(chosen)).repeat_interleave(args.views)
                batch = activations[rows]
                for group in optimiser.param_groups:
                    group["lr"] = lr_at(step, total_steps, args.lr, args.warmup_steps)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                    vectors = split.pooled(batch)
                loss, infonce, koleo_term = copy_loss(vectors.float(), labels, center, args.temperature, args.koleo)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                step += 1
                with torch.no_grad():
                    z = torch.nn.functional.normalize(vectors.float() - center, dim=1)
                    sim = z @ z.T
                    same = labels[:, None] == labels[None, :]
                    eye = torch.eye(len(z), dtype=torch.bool)
                    window["pos"].append(float(sim[same & ~eye].mean()))
                    window["neg"].append(float(sim[~same].mean()))
                window["loss"].append(float(loss.detach())), window["infonce"].append(float(infonce.detach()))
                window["koleo"].append(float(koleo_term.detach()))
                if step % args.log_every == 0 or step == total_steps:
                    elapsed = time.perf_counter() - window["t"]
                    _log(run_dir, {"step": step, "epoch": epoch, "lr": round(optimiser.param_groups[0]["lr"], 7),
                                   "loss": round(float(np.mean(window["loss"])), 4),
                                   "infonce": round(float(np.mean(window["infonce"])), 4),
                                   "koleo": round(float(np.mean(window["koleo"])), 4),
                                   "pos_cos": round(float(np.mean(window["pos"])), 4),
                                   "neg_cos": round(float(np.mean(window["neg"])), 4),
                                   "train_views_per_s": round(len(window["loss"]) * len(rows) / elapsed, 1)})
                    window = {"loss": [], "infonce": [], "koleo": [], "pos": [], "neg": [], "t": time.perf_counter()}
                if time.time() - last_save > args.checkpoint_minutes * 60:
                    save("timer")
                    last_save = time.time()
            del activations
            if step % steps_per_epoch == 0:
                save("epoch")
                last_save = time.time()
                done_epoch = step // steps_per_epoch
                if done_epoch % args.keep_every == 0 or step == total_steps:
                    _save_atomic({"trained": split.trained_state(), "cut": args.cut, "step": step, "epoch": done_epoch,
                                  "config": config}, run_dir / f"weights-epoch{done_epoch:03d}.pt")
    except Stop:
        save(f"signal {stop['signal']}" if stop["signal"] is not None else f"--stop-after-steps {args.stop_after_steps}")
        _log(run_dir, {"event": "stopped", "step": step})
        return
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    _log(run_dir, {"event": "finished", "step": step, "hours": round((time.time() - started_at) / 3600, 2)})


# ---- evaluation ----------------------------------------------------------------------------------

def whitening_pixels(cache: Path, seed: int = 0, copies: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """fit_whitening's photos and edited copies (same seed, same draws as `fit_whitening.py --seed --copies`)
    as the model's uint8 pixels: (photos [m, 224, 224, 3], copies [n, ...], copy_of [n]); cached."""
    path = cache / f"whitening-pixels-seed{seed}-copies{copies}.npz"
    if path.is_file():
        with np.load(path) as data:
            return data["photos"], data["copies"], data["copy_of"]
    photos, _ = fit_whitening.training_photos(seed)
    rng = random.Random(seed)
    copy_pixels, copy_of = [], []
    for i, photo in enumerate(photos):
        for _ in range(copies):
            copy_pixels.append(default_model.model_pixels(fit_whitening.edited_copy(photo, rng)))
            copy_of.append(i)
    photo_pixels = np.stack([default_model.model_pixels(p) for p in photos])
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path.with_suffix(".tmp.npz"), photos=photo_pixels, copies=np.stack(copy_pixels), copy_of=np.array(copy_of))
    os.replace(path.with_suffix(".tmp.npz"), path)
    return photo_pixels, np.stack(copy_pixels), np.array(copy_of)


def pooled_of_pixels(split: Split, pixels: np.ndarray, chunk: int = 32) -> np.ndarray:
    """fp32 L2 GeM vectors [n, 1280] of uint8 pixels through the whole (trained) model."""
    torch = _torch()
    out = []
    with torch.inference_mode():
        for s in range(0, len(pixels), chunk):
            x = torch.from_numpy(default_model.normalise(pixels[s:s + chunk])).contiguous(memory_format=torch.channels_last)
            out.append(split.pooled(split.frozen(x)).numpy())
    return np.concatenate(out)


def refit_whitening(split: Split, seed: int = 0, copies: int = 8) -> tuple[np.ndarray, np.ndarray]:
    from neardup.models import whitening

    photos, copy_pixels, copy_of = whitening_pixels(RUNS / "_data", seed, copies)
    vectors = pooled_of_pixels(split, np.concatenate([photos, copy_pixels]))
    return whitening.fit(vectors[:len(photos)], vectors[len(photos):], copy_of, default_model.DIM, 0.5)


def trained_embedder(weights: Path | None, whitening_seed: int = 0):
    """A neardup Embedder of the default model with the trained blocks of `weights` (None: the ImageNet
    weights) and a whitening refitted on its features; its own identity."""
    torch = _torch()
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=False)
        split = Split(state["cut"] if "cut" in state else state["config"]["cut"])
        split.load_trained_state(state["trained"])
    else:
        split, state = Split(len(Split(0).model._blocks)), {"trained": {}}
    mean, projection = refit_whitening(split, whitening_seed)
    digest = hashlib.sha256()
    for key in sorted(state["trained"]):
        digest.update(key.encode()), digest.update(state["trained"][key].float().numpy().tobytes())
    return embedder_of(split.model, mean, projection, "efficientnet-lite0-copytrained", digest.hexdigest())


def figures(result: dict) -> dict:
    ours = result["methods"]["neardup"]
    dups = ours["dups"]["lsh"]
    calibration = ours["calibration"]
    return {"top1": ours["overall"]["top1"], "micro_AP": ours["overall"]["micro_AP"], "mAP": ours["overall"]["mAP"],
            "dups_precision": dups["precision"], "dups_recall": dups["recall"], "dups_threshold": dups["threshold"],
            "calibrated_threshold": calibration["threshold"], "recall_at_p99": calibration["recall"],
            "grouped_with_original": dups.get("grouped_with_original", {})}


def evaluate(args) -> None:
    torch = _torch()
    torch.set_num_threads(args.threads)
    from neardup import evaluation

    run_dir = Path(args.runs_dir) / args.run
    weights = Path(args.weights) if args.weights else max(run_dir.glob("weights-epoch*.pt"), default=None)
    if weights is None:
        checkpoint = run_dir / "checkpoint.pt"
        if not checkpoint.is_file():
            raise SystemExit(f"{run_dir}: no weights-epoch*.pt and no checkpoint.pt")
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        weights = run_dir / f"weights-step{state['step']}.pt"
        _save_atomic({"trained": state["trained"], "cut": state["config"]["cut"], "step": state["step"],
                      "config": state["config"]}, weights)
    started = time.perf_counter()
    trained = trained_embedder(weights)
    print(f"whitening refitted on the trained features ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    # the trained model beside the model neardup ships now (torch fp32, as the trained one runs), whose
    # figures are kept per set under its identity: a later eval against the same shipped model reads them
    from neardup.models import load_embedder

    shipped = load_embedder("torch")
    shipped_key = hashlib.sha256(json.dumps(shipped.identity, sort_keys=True).encode()).hexdigest()[:12]
    rows = []
    for set_path in args.sets:
        name = Path(set_path).name
        shipped_path = RUNS / "_data" / f"shipped-{shipped_key}-{name}.json"
        if shipped_path.is_file():
            base = json.loads(shipped_path.read_text())
        else:
            base = figures(evaluation.run(set_path, baselines=False, embedder=shipped))
            shipped_path.write_text(json.dumps(base, indent=1))
        ours = figures(evaluation.run(set_path, baselines=False, embedder=trained))
        rows.append({"set": name, "shipped": base, "shipped_identity": shipped.identity, "trained": ours})
        print(f"{name}: shipped {_fmt(base)}\n{' ' * len(name)}  trained {_fmt(ours)}", flush=True)
    out = run_dir / f"eval-{weights.stem}.json"
    out.write_text(json.dumps({"weights": str(weights), "results": rows}, indent=1))
    print(f"wrote {out}", file=sys.stderr)


def _fmt(f: dict) -> str:
    cal = "none" if f["calibrated_threshold"] is None else f"{f['calibrated_threshold']:.3f}"
    return (f"top-1 {f['top1']:.4f}  micro-AP {f['micro_AP']:.4f}  mAP {f['mAP']:.4f}  dups at {f['dups_threshold']}: "
            f"P {f['dups_precision']:.4f} R {f['dups_recall']:.4f}  P>=0.99 from {cal}: R {f['recall_at_p99']:.4f}  "
            f"50 % crops grouped {f.get('grouped_with_original', {}).get('crop50', float('nan')):.3f}")


# ---- ship ----------------------------------------------------------------------------------------

def ship(args) -> None:
    """Make a run's trained weights the default model's: write the tensors training changed as float16 to
    default_model.COPY_WEIGHTS_FILE, then refit the shipped whitening on them (benchmarks/fit_whitening.py,
    its defaults). The model identity changes with both, so an index of earlier vectors is refused."""
    torch = _torch()
    torch.set_num_threads(args.threads)
    state = torch.load(args.weights, map_location="cpu", weights_only=False)
    imagenet = torch.load(default_model.weights_path(), map_location="cpu", weights_only=True)
    arrays = {}
    for name, value in sorted(state["trained"].items()):
        if torch.equal(value, imagenet[name]):
            continue  # BatchNorm running statistics: frozen in training
        if value.abs().max() > np.finfo(np.float16).max:
            raise SystemExit(f"{name} does not fit float16")
        arrays[name] = value.float().numpy().astype(np.float16)
    # what storing float16 costs: descriptors (before whitening) of fit_whitening's photos, fp32 vs fp16 weights
    exact, rounded = Split(state["config"]["cut"]), Split(state["config"]["cut"])
    exact.load_trained_state(state["trained"])
    rounded.load_trained_state({name: torch.from_numpy(value.astype(np.float32)) for name, value in arrays.items()})
    pixels = whitening_pixels(RUNS / "_data")[0][:256]
    agreement = np.sum(pooled_of_pixels(exact, pixels) * pooled_of_pixels(rounded, pixels), axis=1)
    source = Path(args.weights).resolve()
    meta = {"from": str(source.relative_to(REPO) if source.is_relative_to(REPO) else source),
            "step": state["step"], "epoch": state.get("epoch"), "config": state["config"],
            "tensors": len(arrays), "parameters": int(sum(a.size for a in arrays.values())),
            "fp16_vs_fp32_min_cosine": round(float(agreement.min()), 6),
            "script": "benchmarks/train_copy_descriptor.py ship"}
    out = default_model.COPY_WEIGHTS_FILE
    write_reproducible_npz(out, {**arrays, "meta": np.array(json.dumps(meta))})
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {meta['parameters']:,} parameters; float16 against "
          f"float32: lowest cosine {meta['fp16_vs_fp32_min_cosine']} over {len(pixels)} photos); refitting the whitening",
          file=sys.stderr)
    import subprocess

    subprocess.run([sys.executable, str(Path(__file__).with_name("fit_whitening.py"))], check=True)


def write_reproducible_npz(path: Path, arrays: dict) -> None:
    """np.savez_compressed's format, but with fixed member times: the same numbers give the same bytes, so
    the model identity (default_model.weights_sha256 hashes the file) changes only with the numbers."""
    import io
    import zipfile

    temp = path.with_name(path.stem + ".tmp.npz")
    with zipfile.ZipFile(temp, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(arrays):
            buffer = io.BytesIO()
            np.save(buffer, arrays[name], allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buffer.getvalue(),
                             compress_type=zipfile.ZIP_DEFLATED)
    os.replace(temp, path)


# ---- speed ---------------------------------------------------------------------------------------

def speed(args) -> None:
    """views/s of each part on this machine: augmentation, the frozen part, training above each cut."""
    torch = _torch()
    torch.set_num_threads(args.threads)
    from skimage import data as samples

    photos = [_shrunk(Image.fromarray(f())) for f in (samples.astronaut, samples.coffee, samples.chelsea, samples.rocket)]
    n = 64
    t = time.perf_counter()
    pixels = np.stack([view_pixels(photos[i % 4], 0, 0, i, 0) for i in range(n)])
    print(json.dumps({"augment_views_per_s_1_process": round(n / (time.perf_counter() - t), 1)}), flush=True)
    batch = np.concatenate([pixels] * max(1, args.batch // n))[:args.batch]
    for cut in args.cuts:
        split = Split(cut)
        for bf16 in (True, False) if args.fp32 else (True,):
            t = time.perf_counter()
            acts = frozen_activations(split, batch, bf16)
            frozen_rate = len(batch) / (time.perf_counter() - t)
            optimiser = torch.optim.AdamW(split.trained_parameters(), lr=1e-5)
            labels = torch.arange(len(batch) // 4).repeat_interleave(4)
            times = []
            for _ in range(args.repeats + 1):
                t = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    vectors = split.pooled(acts)
                loss = copy_loss(vectors.float(), labels, split.center, 0.1, 10.0)[0]
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                times.append(time.perf_counter() - t)
            print(json.dumps({"cut": cut, "bf16": bf16, "batch": len(batch), "frozen_views_per_s": round(frozen_rate, 1),
                              "train_views_per_s": round(len(batch) / float(np.median(times[1:])), 1),
                              "trained_parameters": sum(p.numel() for p in split.trained_parameters())}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train", help="train (or resume) a run")
    t.add_argument("--run", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--cut", type=int, default=8, help="first trained block (0..16); blocks before it are frozen")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--views", type=int, default=4, help="fresh views per photo per epoch (all in one batch)")
    t.add_argument("--photos-per-batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=2e-4)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--warmup-steps", type=int, default=100)
    t.add_argument("--temperature", type=float, default=0.1)
    t.add_argument("--koleo", type=float, default=10.0)
    t.add_argument("--min-crop-area", type=float, default=copy_augment.MIN_AREA,
                   help="smallest share of a photo's area a cropped view keeps (drawn uniformly up to 1)")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast for the frozen part and training (measured: no faster here)")
    t.add_argument("--max-photos", type=int, default=0, help="train on a seeded subset (0: every photo)")
    t.add_argument("--workers", type=int, default=2, help="augmentation processes")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--log-every", type=int, default=10)
    t.add_argument("--checkpoint-minutes", type=float, default=5.0)
    t.add_argument("--keep-every", type=int, default=5, help="keep the trained weights every N epochs")
    t.add_argument("--stop-after-steps", type=int, default=0, help="checkpoint and stop at this step (a later run resumes)")
    t.add_argument("--runs-dir", default=str(RUNS))
    e = commands.add_parser("eval", help="evaluate a run's weights on neardup eval sets, beside the shipped model")
    e.add_argument("--run", required=True)
    e.add_argument("--weights", help="a weights-*.pt file (default: the run's latest; else its checkpoint)")
    e.add_argument("--sets", nargs="+", default=["/tmp/evalsets/seed1", "/tmp/evalsets/seed2"])
    e.add_argument("--threads", type=int, default=2)
    e.add_argument("--runs-dir", default=str(RUNS))
    h = commands.add_parser("ship", help="make a run's weights the default model's (copy weights + whitening)")
    h.add_argument("--weights", required=True, help="a weights-epochNNN.pt file of a finished run")
    h.add_argument("--threads", type=int, default=2)
    s = commands.add_parser("speed", help="measure views/s of augmentation, the frozen part and training per cut")
    s.add_argument("--cuts", type=int, nargs="+", default=[0, 8, 11, 13])
    s.add_argument("--batch", type=int, default=128)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--fp32", action="store_true", help="also measure without bf16 autocast")
    s.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    {"train": train, "eval": evaluate, "ship": ship, "speed": speed}[args.command](args)


if __name__ == "__main__":
    main()
