"""Tests for neardup.demo: sample photos, edits, collection building."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("skimage")

from neardup import demo  # noqa: E402
from neardup.demo import (  # noqa: E402
    EDITS,
    HARD_EDITS,
    Photo,
    build_collection,
    load_manifest,
    sample_photos,
    tiles,
)

ALL_EDITS = {**EDITS, **HARD_EDITS}


@pytest.fixture(scope="module")
def photos() -> list[Photo]:
    return sample_photos()


@pytest.fixture(scope="module")
def chelsea(photos) -> Image.Image:
    # colour, odd width (451 x 300): exercises rounding in the size edits
    return next(p.image for p in photos if p.name == "chelsea")


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


# --------------------------------------------------------------------------
# sample_photos
# --------------------------------------------------------------------------


def test_sample_photos_basic(photos):
    assert len(photos) >= 10
    names = [p.name for p in photos]
    assert len(set(names)) == len(names)
    assert names == sorted(names)
    for p in photos:
        assert isinstance(p, Photo)
        assert p.image.mode == "RGB"
        assert min(p.image.size) >= 200, p.name
        assert "__" not in p.name


def test_sample_photos_selection(photos):
    names = {p.name for p in photos}
    assert {"astronaut", "camera", "chelsea", "coffee", "motorcycle_left"} <= names
    # cat() is the same file as chelsea; synthetic and tiny images are out
    for excluded in ("cat", "checkerboard", "logo", "colorwheel", "text", "page", "horse"):
        assert excluded not in names
    assert not any("right" in n for n in names)


def test_sample_photos_are_deterministic_copies(photos):
    again = sample_photos()
    assert [p.name for p in again] == [p.name for p in photos]
    for a, b in zip(again, photos):
        assert a.image.size == b.image.size
        assert np.array_equal(arr(a.image), arr(b.image))
    # callers get copies: scribbling on one does not leak into the next call
    again[0].image.paste((255, 0, 255), (0, 0, 50, 50))
    assert not np.array_equal(arr(again[0].image), arr(sample_photos()[0].image))


def test_sklearn_images_used_when_installed(tmp_path, monkeypatch):
    """scikit-learn's china/flower are read from its wheel without importing it."""
    import importlib.machinery
    import importlib.util

    pkg = tmp_path / "sklearn"
    (pkg / "datasets" / "images").mkdir(parents=True)
    Image.new("RGB", (640, 427), (200, 30, 30)).save(pkg / "datasets" / "images" / "china.jpg")
    Image.new("RGB", (640, 427), (30, 200, 30)).save(pkg / "datasets" / "images" / "flower.jpg")
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name, *args, **kwargs):
        if name == "sklearn":
            spec = importlib.machinery.ModuleSpec("sklearn", None, is_package=True)
            spec.submodule_search_locations = [str(pkg)]
            return spec
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    demo._load_photos.cache_clear()
    try:
        got = {p.name: p for p in sample_photos()}
    finally:
        monkeypatch.undo()
        demo._load_photos.cache_clear()
    assert {"china", "flower"} <= set(got)
    assert got["china"].image.size == (640, 427) and got["china"].image.mode == "RGB"


def test_photo_is_frozen(photos):
    with pytest.raises(dataclasses.FrozenInstanceError):
        photos[0].name = "x"  # type: ignore[misc]


def test_grey_photos_become_rgb(photos):
    camera = next(p.image for p in photos if p.name == "camera")
    a = arr(camera)
    assert a.ndim == 3 and a.shape[2] == 3
    assert np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2])


# --------------------------------------------------------------------------
# Edits
# --------------------------------------------------------------------------


def test_edit_names():
    assert list(EDITS) == ["half", "jpeg30", "crop80", "rotate5", "bright", "text", "flip"]
    assert list(HARD_EDITS) == ["crop50", "rotate15", "grey", "thumb64", "combined"]


@pytest.mark.parametrize("name", list(ALL_EDITS))
def test_edit_returns_rgb_and_differs(name, chelsea):
    before = arr(chelsea).copy()
    out = ALL_EDITS[name](chelsea)
    assert isinstance(out, Image.Image)
    assert out.mode == "RGB"
    assert np.array_equal(arr(chelsea), before), "edit modified its input"
    if out.size == chelsea.size:
        assert np.abs(arr(out) - before).mean() > 0.5
    else:
        # compare with the original scaled to the same size
        ref = arr(chelsea.resize(out.size, Image.Resampling.BILINEAR))
        assert name in {"half", "thumb64"} or np.abs(arr(out) - ref).mean() > 0.5
    # deterministic
    assert np.array_equal(arr(ALL_EDITS[name](chelsea)), arr(out))


@pytest.mark.parametrize("name", list(ALL_EDITS))
def test_edit_accepts_non_rgb_input(name, chelsea):
    out = ALL_EDITS[name](chelsea.convert("RGBA"))
    assert out.mode == "RGB"


def test_edit_sizes(chelsea):
    w, h = chelsea.size  # 451 x 300
    assert EDITS["half"](chelsea).size == (w // 2, h // 2)
    assert EDITS["crop80"](chelsea).size == (round(0.8 * w), round(0.8 * h))
    assert HARD_EDITS["crop50"](chelsea).size == (round(0.5 * w), round(0.5 * h))
    t = HARD_EDITS["thumb64"](chelsea)
    assert max(t.size) == 64 and t.size == (64, round(64 * h / w))
    tall = HARD_EDITS["thumb64"](chelsea.transpose(Image.Transpose.ROTATE_90))
    assert tall.size == (round(64 * h / w), 64)
    for name in ("jpeg30", "rotate5", "bright", "text", "flip", "rotate15", "grey"):
        assert ALL_EDITS[name](chelsea).size == (w, h), name
    c = HARD_EDITS["combined"](chelsea)
    assert c.size == (round(0.8 * w), round(0.8 * h))


def test_crop_is_central(chelsea):
    c = EDITS["crop80"](chelsea)
    w, h = chelsea.size
    cw, ch = c.size
    left, top = (w - cw) // 2, (h - ch) // 2
    assert np.array_equal(arr(c), arr(chelsea.crop((left, top, left + cw, top + ch))))


def test_flip_mirror(chelsea):
    f = EDITS["flip"](chelsea)
    assert np.array_equal(arr(f), arr(chelsea)[:, ::-1])


def test_bright_is_brighter(chelsea):
    assert arr(EDITS["bright"](chelsea)).mean() > arr(chelsea).mean() * 1.15


def test_rotate_keeps_canvas_black_corners(chelsea):
    for name in ("rotate5", "rotate15"):
        r = arr(ALL_EDITS[name](chelsea))
        assert (r[0, 0] == 0).all() and (r[-1, -1] == 0).all()
        # the centre is still the photo
        h, w = r.shape[:2]
        centre = (slice(h // 2 - 5, h // 2 + 5), slice(w // 2 - 5, w // 2 + 5))
        assert np.abs(r[centre] - arr(chelsea)[centre]).mean() < 40


def test_text_overlay_is_central_and_scales(chelsea, photos):
    t = arr(EDITS["text"](chelsea))
    changed = np.abs(t - arr(chelsea)).max(axis=2) > 0
    assert changed.any()
    rows = np.flatnonzero(changed.any(axis=1))
    cols = np.flatnonzero(changed.any(axis=0))
    h, w = changed.shape
    # a band across the middle spanning most of the width
    assert rows.min() > 0.2 * h and rows.max() < 0.8 * h
    assert cols.max() - cols.min() > 0.5 * w
    # relative to the image size: a bigger photo gets proportionally bigger text
    big = next(p.image for p in photos if p.name == "retina")
    tb = np.abs(arr(EDITS["text"](big)) - arr(big)).max(axis=2) > 0
    cols_b = np.flatnonzero(tb.any(axis=0))
    assert (cols_b.max() - cols_b.min()) / big.width == pytest.approx(
        (cols.max() - cols.min()) / w, abs=0.1
    )


def test_grey_edit(chelsea, photos):
    g = arr(HARD_EDITS["grey"](chelsea))
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 1], g[..., 2])
    # documented: on an already-grey photo "grey" changes nothing
    camera = next(p.image for p in photos if p.name == "camera")
    assert np.array_equal(arr(HARD_EDITS["grey"](camera)), arr(camera))


def test_edits_on_small_image():
    tiny = Image.new("RGB", (3, 2), (10, 200, 30))
    for name, fn in ALL_EDITS.items():
        out = fn(tiny)
        assert out.mode == "RGB" and min(out.size) >= 1, name


# --------------------------------------------------------------------------
# tiles
# --------------------------------------------------------------------------


def test_tiles(photos):
    astro = next(p for p in photos if p.name == "astronaut")
    ts = tiles(astro, 128, min_std=0)
    assert len(ts) == 16
    assert len({t.name for t in ts}) == 16
    assert all(t.image.size == (128, 128) and t.image.mode == "RGB" for t in ts)
    assert ts[5].name == "astronaut-r1c1"
    assert np.array_equal(arr(ts[5].image), arr(astro.image)[128:256, 128:256])

    retina = next(p for p in photos if p.name == "retina")
    all_tiles = tiles(retina, 128, min_std=0)
    kept = tiles(retina, 128)
    assert len(kept) < len(all_tiles)  # black border tiles dropped
    with pytest.raises(ValueError):
        tiles(astro, 0)


# --------------------------------------------------------------------------
# build_collection
# --------------------------------------------------------------------------


def _files(root: Path) -> dict[str, bytes]:
    files = sorted(root.rglob("*"))
    return {str(p.relative_to(root)): p.read_bytes() for p in files if p.is_file()}


def test_build_collection_default(tmp_path, photos):
    a, b = tmp_path / "a", tmp_path / "b"
    m = build_collection(a)
    build_collection(b)

    names = [p.name for p in photos]
    assert sorted(m["originals"]) == names
    assert len(m["copies"]) == len(names) * len(EDITS)
    assert [(c["original"], c["edit"]) for c in m["copies"]] == [
        (n, e) for n in names for e in EDITS
    ]
    for name, path in m["originals"].items():
        assert Path(path).is_absolute() and Path(path).is_file()
        assert Path(path) == (a / "originals" / f"{name}.jpg").resolve()
    for c in m["copies"]:
        p = Path(c["path"])
        assert p.is_file()
        assert p.name == f"{c['original']}__{c['edit']}.jpg"
        assert p.parent == (a / "edited").resolve()

    # exactly the listed files, nothing else
    listed = {Path(p) for p in m["originals"].values()} | {Path(c["path"]) for c in m["copies"]}
    on_disk = {p.resolve() for p in a.rglob("*.jpg")}
    assert listed == on_disk

    # manifest.json: relative paths, same content as the returned manifest
    raw = json.loads((a / "manifest.json").read_text())
    assert raw["originals"]["camera"] == "originals/camera.jpg"
    assert load_manifest(a) == m
    assert load_manifest(a / "manifest.json") == m

    # deterministic: two builds give identical bytes (manifest included)
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys()
    assert all(fa[k] == fb[k] for k in fa)

    # originals are JPEG, full size
    with Image.open(m["originals"]["chelsea"]) as im:
        assert im.format == "JPEG" and im.size == (451, 300)
    with Image.open(a / "edited" / "chelsea__half.jpg") as im:
        assert im.size == (225, 150)


def test_build_collection_png_custom(tmp_path, photos):
    few = [p for p in photos if p.name in ("coins", "astronaut")]
    edits = {"flip": EDITS["flip"], "thumb64": HARD_EDITS["thumb64"]}
    m = build_collection(tmp_path, few, edits, fmt="png")
    assert list(m["originals"]) == ["astronaut", "coins"]  # sorted
    assert len(m["copies"]) == 4
    with Image.open(m["originals"]["coins"]) as im:
        assert im.format == "PNG"
        got = arr(im.convert("RGB"))
    assert np.array_equal(got, arr(few[1].image))
    with Image.open(tmp_path / "edited" / "coins__thumb64.png") as im:
        assert max(im.size) == 64


def test_build_collection_rejects_bad_input(tmp_path, photos):
    with pytest.raises(ValueError):
        build_collection(tmp_path, photos[:1], fmt="gif")
    with pytest.raises(ValueError):
        build_collection(tmp_path, [photos[0], photos[0]], {})
    with pytest.raises(ValueError):
        build_collection(tmp_path, [Photo("a__b", photos[0].image)], {})
    with pytest.raises(ValueError):
        build_collection(tmp_path, photos[:1], {"x/y": EDITS["flip"]})


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def test_main(tmp_path, capsys, photos):
    demo.main([str(tmp_path / "std")])
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert f"{len(photos)} originals" in out
    assert f"{len(photos) * len(EDITS)} copies" in out

    demo.main([str(tmp_path / "hard"), "--hard"])
    out = capsys.readouterr().out
    assert f"{len(photos) * (len(EDITS) + len(HARD_EDITS))} copies" in out
    m = json.loads((tmp_path / "hard" / "manifest.json").read_text())
    assert {c["edit"] for c in m["copies"]} == set(ALL_EDITS)
