"""Real sample photographs and realistic near-duplicate edits of them.

Used by the test suite, ``make demo`` and the benchmarks.  Everything here is
deterministic and built only from data that ships inside installed packages:
nothing is downloaded at run time.

Sources
-------
* scikit-image (``skimage.data``): every *real* photograph whose file is bundled
  in the wheel (see :data:`SKIMAGE_PHOTOS`).  Left out on purpose:

  - synthetic images: ``checkerboard``, ``binary_blobs``, ``logo``,
    ``colorwheel``, ``text``, ``shepp_logan_phantom``, ``horse`` (a binary
    silhouette);
  - images smaller than 200 px: ``page`` (191 x 384), ``microaneurysms``
    (102 x 102), ``lfw_subset`` (25 x 25 faces);
  - ``cat``: it is the very same file as ``chelsea`` (an exact duplicate);
  - the right view of ``stereo_motorcycle``: left and right views of one scene
    are neither independent photos nor edits of one another, so only the left
    view is used (as ``motorcycle_left``);
  - loaders whose data is not in the wheel (``eagle``, ``skin``, ``brain``,
    ``lily``, ...): they need ``pooch`` and a download, and whether they load
    would depend on a local cache, so they are never called.

* scikit-learn's two sample images (``china``, ``flower``), only when
  scikit-learn is installed.  They are read straight from the files bundled in
  the wheel (``sklearn/datasets/images``) without importing scikit-learn.

Edits
-----
:data:`EDITS` holds the standard near-duplicate edits, :data:`HARD_EDITS`
harder ones.  Every edit is a pure function ``PIL.Image -> PIL.Image`` (RGB in,
RGB out) and deterministic for a given Pillow build.

Command line::

    python -m neardup.demo OUT [--hard] [--fmt jpg|png]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import io
import json
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

__all__ = [
    "Photo",
    "SKIMAGE_PHOTOS",
    "MIN_SIDE",
    "EDITS",
    "HARD_EDITS",
    "sample_photos",
    "build_collection",
    "load_manifest",
    "tiles",
    "main",
]

#: Photos smaller than this on their short side are not used.
MIN_SIDE = 200

#: skimage.data loaders of real photographs bundled in the scikit-image wheel,
#: mapped to the name the photo gets here.  ``stereo_motorcycle`` returns
#: (left, right, disparity); only the left view is used.
SKIMAGE_PHOTOS: dict[str, str] = {
    "astronaut": "astronaut",  # colour, 512x512, NASA portrait of Eileen Collins
    "brick": "brick",  # grey, 512x512, brick wall texture
    "camera": "camera",  # grey, 512x512, the cameraman
    "cell": "cell",  # grey, 550x660, cell in saline (microscope)
    "chelsea": "chelsea",  # colour, 451x300, a cat (``cat()`` is the same file)
    "clock": "clock",  # grey, 400x300, clock with motion blur
    "coffee": "coffee",  # colour, 600x400, a cup of coffee
    "coins": "coins",  # grey, 384x303, Greek coins
    "grass": "grass",  # grey, 512x512, grass texture
    "gravel": "gravel",  # grey, 512x512, gravel texture
    "hubble_deep_field": "hubble_deep_field",  # colour, 1000x872, galaxies
    "immunohistochemistry": "immunohistochemistry",  # colour, 512x512, stained tissue
    "moon": "moon",  # grey, 512x512, surface of the moon
    "retina": "retina",  # colour, 1411x1411, fundus photograph
    "rocket": "rocket",  # colour, 640x427, SpaceX rocket launch
    "stereo_motorcycle": "motorcycle_left",  # colour, 741x500, left stereo view
}

#: scikit-learn bundled sample images (file name -> photo name).
SKLEARN_PHOTOS: dict[str, str] = {"china.jpg": "china", "flower.jpg": "flower"}


@dataclass(frozen=True)
class Photo:
    """A named RGB photograph."""

    name: str
    image: Image.Image  # RGB


# --------------------------------------------------------------------------
# Sample photos
# --------------------------------------------------------------------------


def _to_rgb(arr: np.ndarray) -> Image.Image:
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise TypeError(f"expected a uint8 photo, got {arr.dtype}")
    if arr.ndim == 2:
        return Image.fromarray(arr, "L").convert("RGB")
    if arr.ndim == 3 and arr.shape[2] == 3:
        return Image.fromarray(arr, "RGB")
    if arr.ndim == 3 and arr.shape[2] == 4:
        return Image.fromarray(arr, "RGBA").convert("RGB")
    raise ValueError(f"unexpected photo shape {arr.shape}")


def _skimage_photos() -> list[Photo]:
    try:
        import skimage.data as skdata
    except ImportError:  # scikit-image is an optional (demo) dependency
        return []
    photos = []
    for loader, name in SKIMAGE_PHOTOS.items():
        fn = getattr(skdata, loader, None)
        if fn is None:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = fn()
        except Exception:  # noqa: BLE001 - missing file / pooch / network: skip
            continue
        if isinstance(arr, tuple):  # stereo_motorcycle: (left, right, disparity)
            arr = arr[0]
        try:
            photos.append(Photo(name, _to_rgb(arr)))
        except (TypeError, ValueError):
            continue
    return photos


def _sklearn_photos() -> list[Photo]:
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    photos = []
    for location in spec.submodule_search_locations:
        folder = Path(location) / "datasets" / "images"
        for fname, name in SKLEARN_PHOTOS.items():
            path = folder / fname
            if not path.is_file():
                continue
            with Image.open(path) as im:
                photos.append(Photo(name, im.convert("RGB")))
        if photos:
            break
    return photos


@functools.lru_cache(maxsize=1)
def _load_photos() -> tuple[Photo, ...]:
    photos = {}
    for p in _skimage_photos() + _sklearn_photos():
        if min(p.image.size) < MIN_SIDE or p.name in photos:
            continue
        photos[p.name] = p
    return tuple(photos[name] for name in sorted(photos))


def sample_photos() -> list[Photo]:
    """Every real photograph bundled with scikit-image (and scikit-learn, when
    installed), as RGB, sorted by name.

    The images are loaded once and cached; each call returns fresh copies, so
    callers may modify them.
    """
    return [Photo(p.name, p.image.copy()) for p in _load_photos()]


# --------------------------------------------------------------------------
# Edits
# --------------------------------------------------------------------------


def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def half(img: Image.Image) -> Image.Image:
    """Half size (each side ``// 2``), Lanczos."""
    w, h = img.size
    return _rgb(img).resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.LANCZOS)


def jpeg(img: Image.Image, quality: int = 30) -> Image.Image:
    """Re-encode as JPEG at ``quality`` and decode again."""
    buf = io.BytesIO()
    _rgb(img).save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as im:
        return im.convert("RGB")


def center_crop(img: Image.Image, fraction: float) -> Image.Image:
    """Central crop keeping ``fraction`` of each side."""
    w, h = img.size
    cw, ch = max(1, round(w * fraction)), max(1, round(h * fraction))
    left, top = (w - cw) // 2, (h - ch) // 2
    return _rgb(img).crop((left, top, left + cw, top + ch))


def rotate(img: Image.Image, degrees: float) -> Image.Image:
    """Rotate counter-clockwise about the centre, same canvas size, black corners."""
    return _rgb(img).rotate(
        degrees, resample=Image.Resampling.BICUBIC, expand=False, fillcolor=(0, 0, 0)
    )


def brighten(img: Image.Image, factor: float = 1.3) -> Image.Image:
    """Multiply brightness by ``factor`` (1.3 = +30 %)."""
    return ImageEnhance.Brightness(_rgb(img)).enhance(factor)


WATERMARK = "© neardup demo"


@functools.lru_cache(maxsize=64)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # FreeType font, Pillow >= 10.1
    except TypeError:  # very old Pillow: no size argument
        return ImageFont.load_default()


def watermark(img: Image.Image, text: str = WATERMARK, width: float = 0.7) -> Image.Image:
    """Semi-transparent white text with a dark outline across the centre.

    The text spans about ``width`` of the image width (capped at 30 % of the
    height), drawn with Pillow's default font.
    """
    base = _rgb(img).convert("RGBA")
    w, h = base.size
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    probe = _font(100)
    if isinstance(probe, ImageFont.FreeTypeFont):
        probe_w = ImageDraw.Draw(layer).textlength(text, font=probe)
        size = int(100 * width * w / max(probe_w, 1.0))
        size = max(6, min(size, int(0.3 * h)))
        ImageDraw.Draw(layer).text(
            (w / 2, h / 2),
            text,
            font=_font(size),
            anchor="mm",
            fill=(255, 255, 255, 170),
            stroke_width=max(1, size // 16),
            stroke_fill=(0, 0, 0, 170),
        )
    else:  # bitmap fallback (no FreeType): render small, scale up
        bbox = ImageDraw.Draw(layer).textbbox((0, 0), text, font=probe)
        small = Image.new("RGBA", (bbox[2] + 2, bbox[3] + 2), (0, 0, 0, 0))
        ImageDraw.Draw(small).text((1, 1), text, font=probe, fill=(255, 255, 255, 170))
        tw = max(1, int(width * w))
        th = max(1, min(int(0.3 * h), round(small.height * tw / small.width)))
        small = small.resize((tw, th), Image.Resampling.NEAREST)
        layer.paste(small, ((w - tw) // 2, (h - th) // 2))
    return Image.alpha_composite(base, layer).convert("RGB")


def flip(img: Image.Image) -> Image.Image:
    """Horizontal mirror."""
    return _rgb(img).transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def grey(img: Image.Image) -> Image.Image:
    """Greyscale (ITU-R 601 luma), returned as RGB.

    Note: on a photo that is already grey this is the identity.
    """
    return _rgb(img).convert("L").convert("RGB")


def thumbnail(img: Image.Image, long_side: int = 64) -> Image.Image:
    """Resize so that the long side is exactly ``long_side`` pixels."""
    w, h = img.size
    s = long_side / max(w, h)
    size = (long_side, max(1, round(h * s))) if w >= h else (max(1, round(w * s)), long_side)
    return _rgb(img).resize(size, Image.Resampling.LANCZOS)


def combined(img: Image.Image) -> Image.Image:
    """crop80 + bright + text, then jpeg30 (compression last, as in real life)."""
    return jpeg(watermark(brighten(center_crop(img, 0.8), 1.3)), 30)


Edit = Callable[[Image.Image], Image.Image]

EDITS: dict[str, Edit] = {
    "half": half,
    "jpeg30": functools.partial(jpeg, quality=30),
    "crop80": functools.partial(center_crop, fraction=0.8),
    "rotate5": functools.partial(rotate, degrees=5),
    "bright": functools.partial(brighten, factor=1.3),
    "text": watermark,
    "flip": flip,
}

HARD_EDITS: dict[str, Edit] = {
    "crop50": functools.partial(center_crop, fraction=0.5),
    "rotate15": functools.partial(rotate, degrees=15),
    "grey": grey,
    "thumb64": functools.partial(thumbnail, long_side=64),
    "combined": combined,
}


# --------------------------------------------------------------------------
# Tiles
# --------------------------------------------------------------------------


def tiles(photo: Photo, size: int, *, min_std: float = 8.0) -> list[Photo]:
    """Non-overlapping ``size`` x ``size`` crops of ``photo``, row by row.

    The grid is centred (the leftover margin is split between both sides).
    Tiles whose grey-level standard deviation is below ``min_std`` (near
    uniform: the black border of ``retina``, empty sky, dark space in
    ``hubble_deep_field``) are dropped, because such tiles are near-identical
    to one another.  Names are ``<photo>-r<row>c<col>`` with row/col the
    position in the full grid (so dropped tiles leave gaps in the numbering).

    Caveat for duplicate-detection benchmarks: tiles of one photo are distinct
    content (no pixel is shared), so they are legitimately "different photos",
    but tiles of one texture (``grass``, ``gravel``, ``brick``) or of one
    smooth region look alike, share colour statistics, lighting and camera
    noise, and are adjacent, so an embedding may well place them close
    together.  Treat them as hard negatives, and do not mix tile sizes of the
    same photo (a larger tile contains smaller ones: crop duplicates).
    """
    if size < 1:
        raise ValueError("size must be positive")
    img = _rgb(photo.image)
    w, h = img.size
    nx, ny = w // size, h // size
    x0, y0 = (w - nx * size) // 2, (h - ny * size) // 2
    grey_arr = np.asarray(img.convert("L"), dtype=np.float32)
    out = []
    for r in range(ny):
        for c in range(nx):
            left, top = x0 + c * size, y0 + r * size
            if min_std > 0 and grey_arr[top : top + size, left : left + size].std() < min_std:
                continue
            box = (left, top, left + size, top + size)
            out.append(Photo(f"{photo.name}-r{r}c{c}", img.crop(box)))
    return out


# --------------------------------------------------------------------------
# Collection on disk
# --------------------------------------------------------------------------

_FORMATS = {"jpg": ("JPEG", {"quality": 95}), "png": ("PNG", {})}


def _save(img: Image.Image, path: Path, fmt: str) -> None:
    kind, opts = _FORMATS[fmt]
    _rgb(img).save(path, kind, **opts)


def _absolute(manifest: Mapping, root: Path) -> dict:
    return {
        "originals": {k: str(root / v) for k, v in manifest["originals"].items()},
        "copies": [dict(c, path=str(root / c["path"])) for c in manifest["copies"]],
    }


def load_manifest(path: Path | str) -> dict:
    """Read ``manifest.json`` (or the folder holding it) with absolute paths."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    return _absolute(json.loads(path.read_text(encoding="utf-8")), path.parent.resolve())


def build_collection(
    out: Path | str,
    photos: Iterable[Photo] | None = None,
    edits: Mapping[str, Edit] | None = None,
    *,
    fmt: str = "jpg",
) -> dict:
    """Write originals and edited copies under ``out`` and return the manifest.

    Layout::

        out/originals/<name>.<fmt>          (JPEG quality 95, or PNG)
        out/edited/<name>__<edit>.<fmt>     (same encoding)
        out/manifest.json

    The manifest is ``{"originals": {name: path}, "copies": [{"path",
    "original", "edit"}, ...]}``, copies ordered by photo name then by edit
    order.  In ``manifest.json`` paths are relative to ``out`` (so the folder
    can be moved and two builds are byte-identical); the returned dict (like
    :func:`load_manifest`) has absolute paths.  ``out / p`` works for both.

    Defaults: ``photos = sample_photos()``, ``edits = EDITS``.
    """
    fmt = {"jpeg": "jpg"}.get(fmt.lower(), fmt.lower())
    if fmt not in _FORMATS:
        raise ValueError(f"fmt must be one of {sorted(_FORMATS)}, got {fmt!r}")
    photos = sorted(sample_photos() if photos is None else photos, key=lambda p: p.name)
    edits = EDITS if edits is None else edits
    names = [p.name for p in photos]
    if len(set(names)) != len(names):
        raise ValueError("photo names must be distinct")
    for n in list(names) + list(edits):
        if "__" in n or "/" in n or "\\" in n or not n:
            raise ValueError(f"bad photo/edit name {n!r}")

    out = Path(out)
    (out / "originals").mkdir(parents=True, exist_ok=True)
    (out / "edited").mkdir(parents=True, exist_ok=True)
    manifest: dict = {"originals": {}, "copies": []}
    for p in photos:
        rel = f"originals/{p.name}.{fmt}"
        _save(p.image, out / rel, fmt)
        manifest["originals"][p.name] = rel
        for edit_name, fn in edits.items():
            rel = f"edited/{p.name}__{edit_name}.{fmt}"
            _save(fn(p.image), out / rel, fmt)
            manifest["copies"].append({"path": rel, "original": p.name, "edit": edit_name})
    (out / "manifest.json").write_text(
        json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8"
    )
    return _absolute(manifest, out.resolve())


def build_large_collection(out: Path | str, tile: int = 160) -> dict:
    """A ≥1,000-image collection from the bundled photos: the full photos and their ``tile``-px tiles
    as distinct originals (181 at 160 px), each with every edit of EDITS (1,448 images in all).

    Tiles of one texture look alike (hard negatives, see :func:`tiles`). Returns one manifest with
    absolute paths, covering both parts (``out/full`` and ``out/tiles``).
    """
    out = Path(out)
    photos = sample_photos()
    full = build_collection(out / "full", photos)
    tiled = build_collection(out / "tiles", [t for p in photos for t in tiles(p, tile)])
    return {"originals": {**full["originals"], **tiled["originals"]}, "copies": full["copies"] + tiled["copies"]}


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m neardup.demo",
        description="Write sample photos and near-duplicate edited copies to OUT.",
    )
    parser.add_argument("out", metavar="OUT", type=Path, help="output folder")
    parser.add_argument("--hard", action="store_true", help="also apply HARD_EDITS")
    parser.add_argument("--fmt", choices=sorted(_FORMATS), default="jpg")
    args = parser.parse_args(argv)
    edits = {**EDITS, **HARD_EDITS} if args.hard else dict(EDITS)
    m = build_collection(args.out, edits=edits, fmt=args.fmt)
    print(
        f"{len(m['originals'])} originals, {len(m['copies'])} copies "
        f"({len(edits)} edits: {', '.join(edits)}) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    main()
