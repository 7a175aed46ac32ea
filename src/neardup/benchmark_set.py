"""A copy-detection evaluation set built from real photos this machine can obtain (Copydays/DISC21 style).

    neardup eval build OUT [--seed 1] [--sources skimage,sklearn,debian] [--no-download]

Layout of OUT (the format `neardup eval run` reads; an outside set in the same format plugs in)::

    OUT/gallery/<id>.jpg      originals and distractors (what gets indexed)
    OUT/queries/<id>.jpg      edited copies of originals (what gets searched)
    OUT/truth.json            ground truth, schema neardup.schemas.EVAL_SET

Photos come from installed or registry-fetched packages, never from the repository:

* scikit-image's bundled samples (``neardup.demo.sample_photos``), always present with the eval extra;
* scikit-learn's two samples (china, flower), read from an installed scikit-learn, else from its wheel
  fetched with ``pip download scikit-learn --no-deps`` into the cache;
* Debian packages fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into the cache
  (``$NEARDUP_CACHE``, else ``$XDG_CACHE_HOME/neardup``, else ``~/.cache/neardup``): photos of lomiri-wallpapers-16.04/-20.04,
  mate-backgrounds and plasma-workspace-wallpapers, and the non-photographic wallpapers of those and
  of ukui-wallpapers and gnome-backgrounds as distractors.

A source that cannot be obtained is skipped and named in ``truth.json`` (``missing``) and on stderr.
Photos beyond ``max_originals`` and every wallpaper listed as a distractor go to the gallery as
distractors: the whole image and up to eight non-adjacent, non-featureless tiles of it. Tiles of one image
are distinct pixels but often alike (one texture, one lighting); they share a ``source``, and `dups`
scoring neither rewards nor penalises pairs of distractors with the same source.
Edits are drawn from a seeded generator, so a second seed gives a differently edited set of the same
photos (used to check that a threshold calibrated on one set holds on another).
"""

from __future__ import annotations

import functools
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from . import demo

SET_VERSION = 1
TRUTH_FILE = "truth.json"
#: Originals and distractors are stored at most this long (long side), as a web copy would be.
GALLERY_LONG_SIDE = 1024
JPEG_QUALITY = 95


# ---- sources -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DebSource:
    """Photos (originals) and non-photographic images (distractors only) inside one Debian package."""

    package: str
    short: str
    licence: str
    photos: tuple[str, ...]  # paths inside the package
    distractors: tuple[str, ...] = ()


_LOMIRI16 = "usr/share/backgrounds/"
_MATE = "usr/share/backgrounds/mate/"
_PLASMA = "usr/share/wallpapers/"
_UKUI = "usr/share/backgrounds/"
_GNOME = "usr/share/backgrounds/gnome/"

DEB_SOURCES: tuple[DebSource, ...] = (
    DebSource("lomiri-wallpapers-16.04", "lomiri16", "CC-BY-4.0 / CC-BY-SA-4.0 (per file, debian/copyright)",
              tuple(_LOMIRI16 + f for f in (
                  "Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg", "Picture_0B_by_freespace.jpg",
                  "Picture_1A_by_freespace.jpg", "Wine_by_Jakkub_Mede.jpg", "aitzgorri_by_Aitzol_Berasategi.jpg",
                  "free_by_Peter_Nerlich.jpg", "friends_by_Aitzol_Berasategi.jpg", "greentock_by_Peter_Nerlich.jpg",
                  "life_by_Aitzol_Berasategi.jpg", "picosdeeuropa_by_Aitzol_Berasategi.jpg",
                  "seeding_by_Clements_Engelhardt.jpg", "sunset_by_Aitzol_Berasategi.jpg")),
              tuple(_LOMIRI16 + f for f in ("analogpattern_by_Peter_Nerlich.jpg", "umang_by_Abhishek_Mudgal.jpg"))),
    DebSource("lomiri-wallpapers-20.04", "lomiri20", "CC-BY-SA-4.0 (debian/copyright)",
              (_LOMIRI16 + "Kleiber_by_Lukas_Baubkus.jpg",),
              tuple(_LOMIRI16 + f for f in ("Fossa_by_Jasper_Roks.jpg", "Infinite-Sea_by_Aury88.jpg",
                                             "Painting-Colors_by__herobrine7gamer.jpg"))),
    DebSource("mate-backgrounds", "mate", "GPL-2+ (debian/copyright)",
              tuple(_MATE + "nature/" + f for f in (
                  "Aqua.jpg", "Blinds.jpg", "Dune.jpg", "FreshFlower.jpg", "Garden.jpg", "GreenMeadow.jpg",
                  "LadyBird.jpg", "RainDrops.jpg", "Storm.jpg", "TwoWings.jpg", "Wood.jpg", "YellowFlower.jpg")),
              tuple(_MATE + f for f in (
                  # Spring.png and Waves.png are left out: recolourings of Silk.png
                  "abstract/Elephants.jpg", "abstract/Flow.png", "abstract/Gulp.png", "abstract/Silk.png",
                  "desktop/GreenTraditional.jpg",
                  "desktop/Float-into-MATE.png", "desktop/Stripes.png", "desktop/Ubuntu-Mate-Warm-no-logo.png"))),
    # plasma's photos are used as distractors (whole + tiles): real photos that are not any query's original
    DebSource("plasma-workspace-wallpapers", "plasma", "CC-BY-SA-3.0 / LGPL (debian/copyright)", (),
              tuple(_PLASMA + f"{name}/contents/images/{size}" for name, size in (
                  ("BytheWater", "2560x1600.jpg"), ("ColdRipple", "2560x1600.jpg"), ("ColorfulCups", "2560x1600.jpg"),
                  ("DarkestHour", "2560x1600.jpg"), ("EveningGlow", "2560x1600.jpg"), ("FallenLeaf", "2560x1600.jpg"),
                  ("Grey", "2560x1600.jpg"), ("Kite", "2560x1600.jpg"), ("OneStandsOut", "2560x1600.jpg"),
                  ("Path", "2560x1600.jpg"), ("summer_1am", "2560x1600.jpg"), ("Volna", "5120x2880.jpg"),
                  ("Autumn", "2560x1600.jpg"), ("Altai", "5120x2880.png"), ("Canopee", "3840x2160.png"),
                  ("Cluster", "3840x2160.png"), ("Elarun", "2560x1600.png"), ("Honeywave", "5120x2880.jpg"),
                  ("Kokkini", "3840x2160.png"), ("MilkyWay", "5120x2880.png"), ("Opal", "3840x2160.png"),
                  ("PastelHills", "3200x2000.jpg"), ("SafeLanding", "5120x2880.jpg"), ("Shell", "5120x2880.jpg")))),
    DebSource("ukui-wallpapers", "ukui", "GPL-2+ / CC (debian/copyright)", (),
              tuple(_UKUI + f for f in (
                  "2004default.jpg", "calla.png", "city.png", "desert.png", "firstgeneration.jpg", "fluent-color.png",
                  "goldfish.png", "rhythm.jpg", "rollpaper.png", "string.jpg", "the-mouse.jpg"))),
    DebSource("gnome-backgrounds", "gnome", "CC-BY-SA-3.0 (debian/copyright)", (),
              tuple(_GNOME + f for f in ("adwaita-l.webp", "grid-l.webp", "licorice-l.webp", "pixels-l.webp",
                                          "symbolic-l.webp", "truchet-l.webp", "wood-l.webp"))),
)


@dataclass(frozen=True)
class SourceImage:
    id: str  # unique, file-name safe
    source: str  # e.g. "skimage:astronaut", "deb:mate-backgrounds:usr/share/..."
    licence: str
    load: Callable[[], Image.Image]
    photo: bool  # True: may be an original; False: distractor only


def cache_dir() -> Path:
    """The model cache's folder, by its one rule ($NEARDUP_CACHE, else $XDG_CACHE_HOME/neardup, else
    ~/.cache/neardup): fetched packages and wheels are kept beside the exported models."""
    from .models.onnx_backend import cache_dir as model_cache_dir

    return model_cache_dir()


def _skimage_images() -> tuple[list[SourceImage], list[str]]:
    photos = demo.sample_photos()
    if not photos:
        return [], ["scikit-image: not installed (pip install 'neardup[eval]')"]
    found = []
    for photo in photos:
        if photo.name in demo.SKLEARN_PHOTOS.values():
            continue  # an installed scikit-learn's samples are listed under sklearn
        found.append(SourceImage(f"skimage-{photo.name}", f"skimage:{photo.name}", "scikit-image sample data (BSD-3 / public domain, see skimage.data)",
                                 functools.partial(photo.image.copy), True))
    return found, []


def _sklearn_images(download: bool) -> tuple[list[SourceImage], list[str]]:
    folder = cache_dir() / "sklearn"
    files = {name: None for name in demo.SKLEARN_PHOTOS}
    installed = {p.name: p for p in demo.sample_photos() if p.name in demo.SKLEARN_PHOTOS.values()}
    if len(installed) == len(files):
        loaders = {f: functools.partial(installed[n].image.copy) for f, n in demo.SKLEARN_PHOTOS.items()}
    else:
        wheels = sorted(folder.glob("scikit_learn-*.whl"))
        if not wheels and download:
            folder.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                            "-d", str(folder), "scikit-learn"], capture_output=True, check=False)
            wheels = sorted(folder.glob("scikit_learn-*.whl"))
        if not wheels:
            why = "not installed and no wheel in the cache" + ("" if download else " (--no-download)")
            return [], [f"scikit-learn samples china, flower: {why}; `pip download scikit-learn --no-deps -d {folder}`"]
        loaders = {f: functools.partial(_image_from_wheel, wheels[-1], f) for f in files}
    return [SourceImage(f"sklearn-{name}", f"sklearn:{fname}", "scikit-learn sample image (see sklearn/datasets/images/README.txt)",
                        loaders[fname], True) for fname, name in demo.SKLEARN_PHOTOS.items()], []


def _image_from_wheel(wheel: Path, fname: str) -> Image.Image:
    with zipfile.ZipFile(wheel) as z:
        return Image.open(io.BytesIO(z.read(f"sklearn/datasets/images/{fname}"))).convert("RGB")


def deb_root(source: DebSource, download: bool) -> tuple[Path | None, str | None]:
    """The folder the package is unpacked in (fetching and unpacking it if needed), or a reason."""
    root = cache_dir() / "debs" / source.package
    if (root / ".complete").exists():
        return root, None
    debs = sorted((cache_dir() / "debs").glob(f"{source.package}_*.deb"))
    if not debs:
        if not download:
            return None, "not in the cache (--no-download)"
        if shutil.which("apt-get") is None:
            return None, "apt-get not found (Debian/Ubuntu only)"
        (cache_dir() / "debs").mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["apt-get", "download", source.package], cwd=cache_dir() / "debs",
                              capture_output=True, text=True, check=False)
        debs = sorted((cache_dir() / "debs").glob(f"{source.package}_*.deb"))
        if not debs:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            return None, f"`apt-get download {source.package}` failed: {last} (run `apt-get update` first?)"
    if shutil.which("dpkg-deb") is None:
        return None, "dpkg-deb not found"
    tmp = Path(tempfile.mkdtemp(dir=cache_dir() / "debs"))
    unpacked = subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(tmp)], capture_output=True, text=True, check=False)
    if unpacked.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        return None, f"dpkg-deb -x failed: {unpacked.stderr.strip()[:200]}"
    (tmp / ".complete").write_text(debs[-1].name)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root, None


def _open_file(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.draft("RGB", (2 * GALLERY_LONG_SIDE, 2 * GALLERY_LONG_SIDE))  # JPEG: decode at reduced scale
        return im.convert("RGB")


def _debian_images(download: bool) -> tuple[list[SourceImage], list[str]]:
    found, missing = [], []
    for src in DEB_SOURCES:
        root, why = deb_root(src, download)
        if root is None:
            missing.append(f"Debian package {src.package}: {why}")
            continue
        for rel, photo in [(r, True) for r in src.photos] + [(r, False) for r in src.distractors]:
            path = root / rel
            if not path.is_file():
                missing.append(f"Debian package {src.package}: file {rel} not in this version")
                continue
            stem = Path(rel).stem if src.short != "plasma" else Path(rel).parts[-4]
            found.append(SourceImage(f"{src.short}-{_safe(stem)}", f"deb:{src.package}:{rel}", src.licence,
                                     functools.partial(_open_file, path), photo))
    return found, missing


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


SOURCE_NAMES = ("skimage", "sklearn", "debian")


def gather_sources(sources: tuple[str, ...] = SOURCE_NAMES, download: bool = True) -> tuple[list[SourceImage], list[str]]:
    images, missing = [], []
    for name in sources:
        if name == "skimage":
            got, why = _skimage_images()
        elif name == "sklearn":
            got, why = _sklearn_images(download)
        elif name == "debian":
            got, why = _debian_images(download)
        else:
            raise ValueError(f"unknown source {name!r}; choose from {', '.join(SOURCE_NAMES)}")
        images += got
        missing += why
    return images, missing


# ---- edits ---------------------------------------------------------------------------------------

_WORDS = ("holiday", "sale", "breaking", "look", "wow", "2026", "photo", "repost", "news", "via", "@someone",
          "like", "share", "amazing", "original", "weekend", "free", "the", "best", "view")


def _caption(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 4)))


def _text_overlay(img: Image.Image, rng: random.Random) -> tuple[Image.Image, dict]:
    text = _caption(rng)
    w, h = img.size
    size = max(8, int(h * rng.uniform(0.06, 0.14)))
    colour = rng.choice([(255, 255, 255), (0, 0, 0), (255, 230, 0), (255, 40, 40)])
    out = img.copy()
    draw = ImageDraw.Draw(out)
    font = demo._font(size)
    tw = draw.textlength(text, font=font)
    x = rng.uniform(0, max(1.0, w - tw))
    y = rng.choice([rng.uniform(0.02, 0.2), rng.uniform(0.7, 0.9), rng.uniform(0.4, 0.6)]) * h
    draw.text((x, y), text, font=font, fill=colour, stroke_width=max(1, size // 12),
              stroke_fill=(0, 0, 0) if colour != (0, 0, 0) else (255, 255, 255))
    return out, {"text": text, "size": size}


def _logo(size: int, rng: random.Random) -> Image.Image:
    """A made-up opaque logo: a coloured disc or square with a ring and two letters."""
    logo = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(logo)
    colour = tuple(rng.randint(0, 255) for _ in range(3)) + (235,)
    shape = draw.ellipse if rng.random() < 0.5 else draw.rounded_rectangle
    shape((0, 0, size - 1, size - 1), fill=colour, outline=(255, 255, 255, 255), width=max(1, size // 14))
    letters = "".join(rng.choice("ABCDEFGHKMNPRSTXYZ") for _ in range(2))
    draw.text((size / 2, size / 2), letters, font=demo._font(max(6, size // 2)), anchor="mm", fill=(255, 255, 255, 255))
    return logo


def _logo_overlay(img: Image.Image, rng: random.Random) -> tuple[Image.Image, dict]:
    w, h = img.size
    fraction = rng.uniform(0.15, 0.25)
    size = max(8, int(min(w, h) * fraction))
    corner = rng.choice(["tl", "tr", "bl", "br"])
    margin = int(0.03 * min(w, h))
    x = margin if corner[1] == "l" else w - size - margin
    y = margin if corner[0] == "t" else h - size - margin
    out = img.convert("RGBA")
    out.alpha_composite(_logo(size, rng), (x, y))
    return out.convert("RGB"), {"fraction": round(fraction, 3), "corner": corner}


def _crop(img: Image.Image, rng: random.Random, fraction: float) -> tuple[Image.Image, dict]:
    w, h = img.size
    cw, ch = max(1, round(w * fraction)), max(1, round(h * fraction))
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return img.crop((left, top, left + cw, top + ch)), {"fraction": fraction, "left": left, "top": top}


def _rotate(img: Image.Image, rng: random.Random, degrees: float) -> tuple[Image.Image, dict]:
    angle = degrees * rng.choice([-1, 1])
    return demo.rotate(img, angle), {"degrees": angle}


def _jpeg(img: Image.Image, rng: random.Random) -> tuple[Image.Image, dict]:
    quality = rng.randint(10, 30)
    return demo.jpeg(img, quality), {"quality": quality}


def _thumbnail(img: Image.Image, rng: random.Random) -> tuple[Image.Image, dict]:
    side = rng.randint(64, 128)
    return demo.thumbnail(img, side), {"long_side": side}


def _border(img: Image.Image, rng: random.Random) -> tuple[Image.Image, dict]:
    fraction = rng.uniform(0.05, 0.15)
    pad = max(2, int(fraction * max(img.size)))
    colour = rng.choice([(0, 0, 0), (255, 255, 255), tuple(rng.randint(0, 255) for _ in range(3))])
    return ImageOps.expand(img, border=pad, fill=colour), {"fraction": round(fraction, 3), "colour": list(colour)}


def _aspect(img: Image.Image, rng: random.Random) -> tuple[Image.Image, dict]:
    factor = rng.choice([rng.uniform(0.6, 0.8), rng.uniform(1.3, 1.6)])
    w, h = img.size
    return img.resize((max(1, round(w * factor)), h), Image.Resampling.LANCZOS), {"width_factor": round(factor, 3)}


def _colour(img: Image.Image, rng: random.Random) -> tuple[Image.Image, dict]:
    brightness, saturation, contrast = rng.uniform(0.6, 1.4), rng.uniform(0.3, 1.8), rng.uniform(0.7, 1.3)
    hue = rng.randint(-40, 40)
    out = ImageEnhance.Brightness(img).enhance(brightness)
    out = ImageEnhance.Color(out).enhance(saturation)
    out = ImageEnhance.Contrast(out).enhance(contrast)
    if hue:
        h, s, v = out.convert("HSV").split()
        h = h.point(lambda x: (x + hue) % 256)
        out = Image.merge("HSV", (h, s, v)).convert("RGB")
    return out, {"brightness": round(brightness, 3), "saturation": round(saturation, 3),
                 "contrast": round(contrast, 3), "hue_shift": hue}


def _chain(*steps: tuple[str, Callable]) -> Callable:
    def apply(img: Image.Image, rng: random.Random) -> tuple[Image.Image, dict]:
        params = {}
        for label, step in steps:
            img, params[label] = step(img, rng)
        return img, params
    return apply


def _plain(fn: Callable[[Image.Image], Image.Image]) -> Callable:
    return lambda img, rng: (fn(img), {})


#: Every edit kind of the set: name -> fn(image, rng) -> (edited image, parameters drawn).
EDIT_KINDS: dict[str, Callable] = {
    "crop80": functools.partial(_crop, fraction=0.8),
    "crop50": functools.partial(_crop, fraction=0.5),
    "rotate5": functools.partial(_rotate, degrees=5),
    "rotate15": functools.partial(_rotate, degrees=15),
    "flip": _plain(demo.flip),
    "grey": _plain(demo.grey),
    "jpeg": _jpeg,
    "thumbnail": _thumbnail,
    "text": _text_overlay,
    "logo": _logo_overlay,
    "border": _border,
    "aspect": _aspect,
    "colour": _colour,
    # combinations, as copies met in the wild: a re-posted crop with a caption, re-compressed ...
    "crop_text_jpeg": _chain(("crop", functools.partial(_crop, fraction=0.8)), ("text", _text_overlay), ("jpeg", _jpeg)),
    # ... and a mirrored, recoloured, framed thumbnail
    "flip_colour_border_thumb": _chain(("flip", _plain(demo.flip)), ("colour", _colour), ("border", _border),
                                       ("thumbnail", _thumbnail)),
}


# ---- building ------------------------------------------------------------------------------------

@dataclass
class BuildReport:
    out: Path
    originals: int = 0
    distractors: int = 0
    queries: int = 0
    missing: list[str] = field(default_factory=list)


def _fit(img: Image.Image, long_side: int = GALLERY_LONG_SIDE) -> Image.Image:
    if max(img.size) <= long_side:
        return img
    out = img.copy()
    out.thumbnail((long_side, long_side), Image.Resampling.LANCZOS)
    return out


def _detail(img: Image.Image) -> float:
    """Mean absolute high-pass response of the grey image at 128 x 128: ~0-2 for flat colour, gradients
    and out-of-focus sky, 3 and up for anything with texture or edges."""
    import numpy as np
    from PIL import ImageFilter

    grey = img.convert("L").resize((128, 128), Image.Resampling.BILINEAR)
    blurred = grey.filter(ImageFilter.GaussianBlur(2))
    return float(np.abs(np.asarray(grey, np.float32) - np.asarray(blurred, np.float32)).mean())


#: Tiles with less detail than this are left out: featureless crops (sky, a gradient, a flat colour
#: field) of different wallpapers look the same to any descriptor and to a person.
MIN_TILE_DETAIL = 3.0


def _tiles(img: Image.Image, count: int) -> list[Image.Image]:
    """Up to `count` tiles from a 4x3 grid of cells (each tile the central 80 % of its cell, so no two
    tiles touch); featureless tiles are dropped."""
    w, h = img.size
    cols, rows = (4, 3) if w >= h else (3, 4)
    cw, ch = w // cols, h // rows
    out = []
    for r in range(rows):
        for c in range(cols):
            box = (c * cw + cw // 10, r * ch + ch // 10, c * cw + cw - cw // 10, r * ch + ch - ch // 10)
            tile = img.crop(box)
            if min(tile.size) >= 96 and _detail(tile) >= MIN_TILE_DETAIL:
                out.append(tile)
    return out[:count]


def build_set(out: str | os.PathLike, *, seed: int = 1, sources: tuple[str, ...] = SOURCE_NAMES,
              download: bool = True, max_originals: int | None = None, edits: tuple[str, ...] | None = None,
              tiles_per_distractor: int = 8, log: Callable[[str], None] | None = None) -> BuildReport:
    """Write a set under `out` (gallery/, queries/, truth.json) and return what was built.

    Photos (in source order) become originals up to `max_originals`; the rest, and every
    non-photographic wallpaper, become distractors (whole image plus tiles)."""
    log = log or (lambda message: None)
    out = Path(out)
    edit_names = tuple(edits or EDIT_KINDS)
    unknown = [e for e in edit_names if e not in EDIT_KINDS]
    if unknown:
        raise ValueError(f"unknown edit kinds {unknown}; known: {', '.join(EDIT_KINDS)}")
    images, missing = gather_sources(sources, download)
    for line in missing:
        log(f"missing: {line}")
    if not images:
        raise FileNotFoundError("no source photos found: " + "; ".join(missing))
    photos = [i for i in images if i.photo]
    originals = photos[:max_originals] if max_originals is not None else photos
    distractors = [i for i in images if i not in originals]
    for sub in ("gallery", "queries"):
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True)
    truth: dict = {"version": SET_VERSION, "name": out.name, "seed": seed, "edits": list(edit_names),
                   "missing": missing, "gallery": [], "queries": []}
    report = BuildReport(out, missing=missing)
    for n, item in enumerate(originals, 1):
        image = _fit(item.load())
        rel = f"gallery/{item.id}.jpg"
        image.save(out / rel, "JPEG", quality=JPEG_QUALITY)
        truth["gallery"].append({"id": item.id, "path": rel, "role": "original", "source": item.source,
                                 "licence": item.licence})
        report.originals += 1
        for edit in edit_names:
            rng = random.Random(f"{seed}:{item.id}:{edit}")
            edited, params = EDIT_KINDS[edit](image, rng)
            qrel = f"queries/{item.id}__{edit}.jpg"
            # the JPEG edits are their own encoding; everything else is stored as a high-quality JPEG
            quality = params.get("quality") or params.get("jpeg", {}).get("quality") or JPEG_QUALITY
            edited.convert("RGB").save(out / qrel, "JPEG", quality=quality)
            truth["queries"].append({"id": f"{item.id}__{edit}", "path": qrel, "edit": edit,
                                     "matches": [item.id], "params": params})
            report.queries += 1
        log(f"original {n}/{len(originals)}: {item.id}")
    for n, item in enumerate(distractors, 1):
        image = item.load()
        parts = [("", _fit(image))] + [(f"-t{t}", _fit(tile)) for t, tile in
                                        enumerate(_tiles(image, tiles_per_distractor))]
        for suffix, part in parts:
            rel = f"gallery/{item.id}{suffix}.jpg"
            part.save(out / rel, "JPEG", quality=JPEG_QUALITY)
            truth["gallery"].append({"id": f"{item.id}{suffix}", "path": rel, "role": "distractor",
                                     "source": item.source, "licence": item.licence})
            report.distractors += 1
        log(f"distractor source {n}/{len(distractors)}: {item.id} ({len(parts)} images)")
    (out / TRUTH_FILE).write_text(json.dumps(truth, indent=1) + "\n", encoding="utf-8")
    return report
