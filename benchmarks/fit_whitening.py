"""Fit the default model's learned whitening (src/neardup/models/efficientnet_lite0_whitening.npz).

    .venv/bin/python benchmarks/fit_whitening.py [--out PATH] [--copies 8] [--seed 0] [--dim 768] [--shrinkage 0.5]
        [--save-vectors NPZ]

Training photos come from Debian packages that no `neardup eval` set draws from (checked against
neardup.benchmark_set.DEB_SOURCES), fetched with `apt-get download` into the eval cache:

* gcompris-qt-data: photos of monuments, animals, instruments and paintings, stored as WebP inside the
  activities' Qt resource bundles (.rcc); carved out by their RIFF headers;
* stellarium-data: telescope photos of nebulae and galaxies, landscape panoramas;
* tuxpaint-stamps-default: photographed animals, food, plants, objects (cut-outs on white);
* extremetuxracer-data: sky and terrain photos;
* mypaint-data-extras: paper and canvas photos.

Each photo gets `--copies` edited copies, chains of 1 to 4 edits drawn from the list below (the kinds
copies of photos get in the wild; written here independently of the evaluation set's edits and with wider
ranges, plus blur and noise, which the evaluation set lacks). Photos and copies are embedded with the
default model up to its L2-normalised GeM vector (border trim included), and
neardup.models.whitening.fit gives the mean and projection. The file records its sources and settings.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import io
import json
import random
import string
import struct
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from neardup import benchmark_set
from neardup.models import default_model, whitening

#: (package, short name, licence, glob patterns inside the package, cap, minimum colours)
SOURCES = (
    ("gcompris-qt-data", "gcompris", "GPL-3+ / CC-BY-SA (debian/copyright)", ("usr/share/gcompris-qt/rcc/*.rcc",), 450, 8000),
    ("stellarium-data", "stellarium", "GPL-2+ / CC (debian/copyright)",
     ("usr/share/stellarium/nebulae/default/*", "usr/share/stellarium/landscapes/**/*.png",
      "usr/share/stellarium/scenery3d/**/*.jpg", "usr/share/stellarium/scenery3d/**/*.png"), 280, 0),
    ("tuxpaint-stamps-default", "tuxpaint", "GPL-2+ / CC (debian/copyright)",
     tuple(f"usr/share/tuxpaint/stamps/{kind}/**/*.png" for kind in
           ("animals", "food", "plants", "town", "household", "clothes", "vehicles", "sports", "hobbies", "space",
            "seasonal", "people")), 200, 0),
    ("extremetuxracer-data", "etr", "GPL-2+ (debian/copyright)", ("usr/share/games/etr/**/*.png", "usr/share/games/etr/**/*.jpg"), 90, 0),
    ("mypaint-data-extras", "mypaint", "GPL-2+ / CC (debian/copyright)", ("usr/share/mypaint/backgrounds/**/*.*",), 20, 0),
)
MIN_SIDE = 200
MAX_ASPECT = 3.0


# ---- training photos -----------------------------------------------------------------------------

def _webp_in_bundle(path: Path):
    """The WebP images stored whole inside a Qt resource bundle (RIFF size + 'WEBP' tag)."""
    data = path.read_bytes()
    at = data.find(b"RIFF")
    while at >= 0:
        if data[at + 8:at + 12] == b"WEBP":
            size = struct.unpack("<I", data[at + 4:at + 8])[0]
            yield f"{path.name}@{at}", data[at:at + 8 + size]
        at = data.find(b"RIFF", at + 4)


def _candidates(root: Path, patterns):
    for pattern in patterns:
        for name in sorted(glob.glob(str(root / pattern), recursive=True)):
            path = Path(name)
            if path.suffix == ".rcc":
                yield from _webp_in_bundle(path)
            elif path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"):
                yield str(path.relative_to(root)), path.read_bytes()


def usable_rgb(root: Path, patterns, min_colours: int):
    """(name, RGB image as the default model sees it) of every usable photo below `root`: Pillow reads it,
    its short side is >= MIN_SIDE, its aspect <= MAX_ASPECT, and (with `min_colours`) it has at least that
    many colours (fewer: a drawing, not a photo)."""
    for name, data in _candidates(root, patterns):
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                rgb = default_model_rgb(image)
        except (OSError, ValueError, Image.DecompressionBombError):
            continue  # not an image Pillow reads: not a training photo
        width, height = rgb.size
        if min(width, height) < MIN_SIDE or max(width, height) / min(width, height) > MAX_ASPECT:
            continue
        if min_colours and (rgb.getcolors(min_colours) is not None):
            continue
        yield name, rgb


def training_photos(seed: int) -> tuple[list[Image.Image], dict]:
    """Photos from SOURCES (each capped, sampled with `seed`) and a summary of what was used."""
    evaluated = {source.package for source in benchmark_set.DEB_SOURCES}
    rng = random.Random(seed)
    photos, summary = [], {}
    for package, short, licence, patterns, cap, min_colours in SOURCES:
        if package in evaluated:
            raise SystemExit(f"{package} is an evaluation source; training on it would tune to the benchmark")
        root, why = benchmark_set.deb_root(benchmark_set.DebSource(package, short, licence, ()), download=True)
        if root is None:
            raise SystemExit(f"{package}: {why}")
        usable = list(usable_rgb(root, patterns, min_colours))
        rng.shuffle(usable)
        chosen = usable[:cap]
        photos += [rgb for _, rgb in chosen]
        deb = (root / ".complete").read_text().strip()  # the .deb file name, version included
        summary[package] = {"deb": deb, "licence": licence, "usable": len(usable), "used": len(chosen)}
        print(f"{package}: {len(chosen)} of {len(usable)} usable images", file=sys.stderr)
    return photos, summary


def default_model_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white, as neardup.images loads files."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# ---- edits ---------------------------------------------------------------------------------------

def _colour_value(rng: random.Random) -> tuple[int, int, int]:
    return tuple(rng.randint(0, 255) for _ in range(3))


def crop(img, rng):
    w, h = img.size
    fh = rng.uniform(0.4, 0.95)
    fw = fh if rng.random() < 0.5 else rng.uniform(0.4, 0.95)
    cw, ch = max(8, int(w * fw)), max(8, int(h * fh))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return img.crop((x, y, x + cw, y + ch))


def rotate(img, rng):
    return img.rotate(rng.uniform(-20, 20), resample=Image.Resampling.BICUBIC, expand=rng.random() < 0.5,
                      fillcolor=_colour_value(rng))


def flip(img, rng):
    return ImageOps.mirror(img)


def grey(img, rng):
    return img.convert("L").convert("RGB")


def jpeg(img, rng):
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=rng.randint(8, 50))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def thumbnail(img, rng):
    side = rng.randint(48, 160)
    small = img.copy()
    small.thumbnail((side, side), rng.choice([Image.Resampling.BILINEAR, Image.Resampling.LANCZOS]))
    return small


def caption(img, rng):
    out = img.copy()
    w, h = out.size
    size = max(8, int(h * rng.uniform(0.05, 0.2)))
    text = "".join(rng.choice(string.ascii_letters + "  ") for _ in range(rng.randint(4, 20)))
    ImageDraw.Draw(out).text((rng.randint(0, w // 2), rng.randint(0, max(0, h - size))), text,
                             fill=_colour_value(rng), font=ImageFont.load_default(size))
    return out


def overlay(img, rng):
    base = img.convert("RGBA")
    w, h = base.size
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    pw, ph = int(w * rng.uniform(0.1, 0.35)), int(h * rng.uniform(0.1, 0.35))
    x, y = rng.randint(0, w - pw), rng.randint(0, h - ph)
    shape = ImageDraw.Draw(layer).ellipse if rng.random() < 0.5 else ImageDraw.Draw(layer).rectangle
    shape((x, y, x + pw, y + ph), fill=_colour_value(rng) + (rng.randint(100, 255),))
    return Image.alpha_composite(base, layer).convert("RGB")


def border(img, rng):
    pad = max(2, int(rng.uniform(0.03, 0.2) * max(img.size)))
    colour = _colour_value(rng) if rng.random() < 0.5 else rng.choice([(0, 0, 0), (255, 255, 255)])
    return ImageOps.expand(img, border=pad, fill=colour)


def aspect(img, rng):
    w, h = img.size
    return img.resize((max(8, int(w * rng.uniform(0.55, 1.7))), h))


def colour(img, rng):
    out = ImageEnhance.Brightness(img).enhance(rng.uniform(0.5, 1.5))
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.2, 2.0))
    out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.6, 1.4))
    if rng.random() < 0.7:
        shift = rng.randint(-60, 60)
        hue, saturation, value = out.convert("HSV").split()
        out = Image.merge("HSV", (hue.point(lambda x: (x + shift) % 256), saturation, value)).convert("RGB")
    return out


def blur(img, rng):
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.5)))


def noise(img, rng):
    pixels = np.asarray(img, np.float32)
    pixels = pixels + np.random.default_rng(rng.randrange(1 << 30)).normal(0, rng.uniform(4, 20), pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


EDITS = (crop, rotate, flip, grey, jpeg, thumbnail, caption, overlay, border, aspect, colour, blur, noise)
#: Edits that shrink or re-encode come last in a chain, as copies are made.
LAST = (thumbnail, jpeg)


def edited_copy(img: Image.Image, rng: random.Random) -> Image.Image:
    chain = rng.sample(EDITS, rng.choice([1, 1, 2, 2, 3, 4]))
    chain.sort(key=lambda edit: edit in LAST)
    for edit in chain:
        img = edit(img, rng)
    return img


# ---- embedding and fit ---------------------------------------------------------------------------

def pooled_vectors(images: list[Image.Image]) -> np.ndarray:
    """L2-normalised GeM vectors [n, 1280] of the default model: the whitening's input. Small channels_last
    batches, as the embedder runs (efficientnet_lite0.MICRO_BATCH: 4-5x faster on CPU than NCHW batches of 32)."""
    import torch

    from neardup.models.efficientnet_lite0 import MICRO_BATCH as batch
    from neardup.models.efficientnet_lite0 import gem, load_pretrained

    model = load_pretrained(whitened=False).to(memory_format=torch.channels_last)
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            pixels = torch.from_numpy(np.stack([default_model.preprocess(i) for i in images[start:start + batch]]))
            features = model.forward_features(pixels.contiguous(memory_format=torch.channels_last))
            out.append(torch.nn.functional.normalize(gem(features), dim=1).numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(default_model.WHITENING_FILE))
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dim", type=int, default=default_model.DIM)
    parser.add_argument("--shrinkage", type=float, default=0.5)
    parser.add_argument("--save-vectors", metavar="NPZ", help="also keep the training vectors (to try other --dim/--shrinkage)")
    args = parser.parse_args()
    if Path(args.out).resolve() == default_model.WHITENING_FILE.resolve() and args.dim != default_model.DIM:
        parser.error(f"--dim {args.dim} cannot replace the shipped whitening (default_model.DIM is {default_model.DIM}); "
                     "write it elsewhere with --out")
    started = time.perf_counter()
    photos, summary = training_photos(args.seed)
    rng = random.Random(args.seed)
    copies, copy_of = [], []
    for i, photo in enumerate(photos):
        for _ in range(args.copies):
            copies.append(edited_copy(photo, rng))
            copy_of.append(i)
    print(f"{len(photos)} photos, {len(copies)} copies; embedding", file=sys.stderr)
    vectors = pooled_vectors(photos + copies)
    if args.save_vectors:
        np.savez(args.save_vectors, photos=vectors[:len(photos)], copies=vectors[len(photos):], copy_of=np.array(copy_of))
    mean, projection = whitening.fit(vectors[:len(photos)], vectors[len(photos):], np.array(copy_of),
                                     args.dim, args.shrinkage)
    meta = {"method": "learned whitening (Radenovic, Tolias & Chum 2016), neardup.models.whitening.fit",
            "input": "efficientnet-lite0 " + default_model.PREPROCESSING.split(",l2,")[0] + ",l2",
            "photos": len(photos), "copies_per_photo": args.copies, "seed": args.seed, "dim": args.dim,
            "shrinkage": args.shrinkage, "sources": summary, "edits": [e.__name__ for e in EDITS],
            "fitted": datetime.date.today().isoformat(), "script": "benchmarks/fit_whitening.py",
            "mean_projection_sha256": hashlib.sha256(mean.tobytes() + projection.tobytes()).hexdigest()}
    np.savez(args.out, mean=mean, projection=projection, meta=np.array(json.dumps(meta)))
    print(f"wrote {args.out} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
