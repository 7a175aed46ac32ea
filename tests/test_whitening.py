"""Learned whitening (neardup.models.whitening) and the default model's border trim and shipped fit."""

import hashlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from neardup import benchmark_set
from neardup.models import default_model, whitening


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _pairs(seed, d=12, photos=80, copies=4, edit_axes=(0, 1), edit_scale=0.8, noise=0.02):
    """Photos spread over every axis; copies differ from their photo mostly along `edit_axes`."""
    rng = np.random.default_rng(seed)
    originals = _unit(rng.normal(size=(photos, d)) + 3.0)  # a positive cone, like ReLU features
    copy_of = np.repeat(np.arange(photos), copies)
    moves = rng.normal(scale=noise, size=(len(copy_of), d))
    moves[:, list(edit_axes)] += rng.normal(scale=edit_scale, size=(len(copy_of), len(edit_axes)))
    return originals, _unit(originals[copy_of] + moves), copy_of


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), dim=st.integers(1, 12), shrinkage=st.sampled_from([0.0, 0.1, 0.5, 0.9]))
def test_fit_shapes_and_unit_output(seed, dim, shrinkage):
    originals, copies, copy_of = _pairs(seed)
    mean, projection = whitening.fit(originals, copies, copy_of, dim, shrinkage)
    assert mean.shape == (12,) and projection.shape == (dim, 12)
    assert mean.dtype == projection.dtype == np.float32
    out = whitening.apply(np.concatenate([originals, copies]), mean, projection)
    assert out.shape == (len(originals) + len(copies), dim)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_without_shrinkage_matching_differences_are_white(seed):
    """The defining property: projected copy-minus-photo differences have identity covariance."""
    originals, copies, copy_of = _pairs(seed)
    _, projection = whitening.fit(originals, copies, copy_of, 12, 0.0)
    diff = (copies - originals[copy_of]) @ projection.T.astype(np.float64)
    np.testing.assert_allclose(diff.T @ diff / len(diff), np.eye(12), atol=1e-3)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_copies_move_closer_than_other_photos(seed):
    """Edits along two axes cost copies their similarity; whitening gives it back without bringing
    different photos closer: the gap between the worst copy and the best other photo widens."""
    originals, copies, copy_of = _pairs(seed, photos=120)
    test_originals, test_copies, test_copy_of = _pairs(seed + 1, photos=60)  # photos the fit never saw
    mean, projection = whitening.fit(originals, copies, copy_of, 6, 0.1)

    def gap(orig, cop):
        sims = cop @ orig.T
        own = sims[np.arange(len(cop)), test_copy_of]
        sims[np.arange(len(cop)), test_copy_of] = -np.inf
        return np.median(own - sims.max(axis=1))

    before = gap(test_originals, test_copies)
    after = gap(whitening.apply(test_originals, mean, projection), whitening.apply(test_copies, mean, projection))
    assert after > before + 0.05, (before, after)


def test_fit_rejects_bad_arguments():
    originals, copies, copy_of = _pairs(0)
    with pytest.raises(ValueError, match="dim"):
        whitening.fit(originals, copies, copy_of, 13)
    with pytest.raises(ValueError, match="shrinkage"):
        whitening.fit(originals, copies, copy_of, 4, 1.0)
    with pytest.raises(ValueError, match="copy_of"):
        whitening.fit(originals, copies, copy_of[:-1], 4)


def test_shipped_fit_matches_the_model_and_was_trained_off_the_benchmark():
    mean, projection = default_model.whitening()
    assert mean.shape == (default_model.HEAD_CHANNELS,)
    assert projection.shape == (default_model.DIM, default_model.HEAD_CHANNELS)
    assert np.isfinite(projection).all() and np.isfinite(mean).all()
    with np.load(default_model.WHITENING_FILE) as data:
        meta = json.loads(str(data["meta"]))
    assert meta["dim"] == default_model.DIM and meta["photos"] >= 500
    evaluated = {source.package for source in benchmark_set.DEB_SOURCES}
    assert meta["sources"] and not set(meta["sources"]) & evaluated
    numbers = hashlib.sha256(mean.tobytes() + projection.tobytes()).hexdigest()
    assert default_model.identity()["whitening_sha256"] == numbers == meta["mean_projection_sha256"]


def test_another_whitening_is_another_model_and_metadata_is_not(tmp_path):
    """The identity (what an index stores) and the ONNX/int8 cache key follow the whitening's numbers;
    a refit with the same numbers (other metadata, another day) changes neither."""
    mean, projection = default_model.whitening()
    shipped = default_model.WHITENING_FILE
    before = (default_model.identity(), default_model.descriptor_key())
    same, other = tmp_path / "same.npz", tmp_path / "other.npz"
    np.savez(same, mean=mean, projection=projection, meta=np.array('{"fitted": "another day"}'))
    np.savez(other, mean=mean, projection=projection[::-1].copy())
    try:
        for path, changes in ((same, False), (other, True)):
            default_model.WHITENING_FILE = path
            default_model.whitening.cache_clear()
            default_model.whitening_sha256.cache_clear()
            after = (default_model.identity(), default_model.descriptor_key())
            assert (after[0] != before[0]) is changes and (after[1] != before[1]) is changes
    finally:
        default_model.WHITENING_FILE = shipped
        default_model.whitening.cache_clear()
        default_model.whitening_sha256.cache_clear()
    assert (default_model.identity(), default_model.descriptor_key()) == before


# ---- border trim ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def photo():
    import skimage.data

    return Image.fromarray(skimage.data.astronaut())  # 512 x 512, detail up to every edge


@pytest.mark.parametrize("pad, fill", [(20, (0, 0, 0)), (51, (255, 255, 255)), (90, (244, 21, 166)), (6, (30, 30, 30))])
def test_border_box_finds_the_picture_inside_a_frame(photo, pad, fill):
    framed = ImageOps.expand(photo, border=pad, fill=fill)
    left, top, right, bottom = default_model.border_box(framed)
    w, h = framed.size
    tolerance = 3  # the frame is found on a 2x-reduced copy
    for found, expected in ((left, pad), (top, pad), (w - right, pad), (h - bottom, pad)):
        assert abs(found - expected) <= tolerance, (default_model.border_box(framed), pad)


def test_border_trim_survives_jpeg_and_keeps_the_descriptor(photo, tmp_path):
    from neardup.images import load_image
    from neardup.models import default_embedder

    framed = ImageOps.expand(photo, border=40, fill=(255, 255, 255))
    path = tmp_path / "framed.jpg"
    framed.save(path, quality=40)
    decoded = load_image(path).image  # JPEG draft decoding may halve it
    scale = decoded.width / framed.width
    box = default_model.border_box(decoded)
    assert box is not None and all(abs(a - b * scale) <= 3 for a, b in zip(box, (40, 40, 552, 552), strict=True)), box
    embedder = default_embedder()
    a, b = embedder.embed(np.stack([embedder.preprocess(photo), embedder.preprocess(decoded)]))
    assert float(a @ b) > 0.95


def test_no_frame_no_trim_and_never_more_than_a_quarter(photo):
    assert default_model.border_box(photo) is None
    assert default_model.trim_border(photo) is photo
    flat = Image.new("RGB", (400, 200), (12, 200, 40))  # all frame: cut at most a quarter each side
    left, top, right, bottom = default_model.border_box(flat)
    assert (left, top, right, bottom) == (100, 50, 300, 150)
    tiny = Image.new("RGB", (5, 5), (0, 0, 0))
    assert default_model.border_box(tiny) is None


def test_a_frame_on_one_side_only(photo):
    letterbox = Image.new("RGB", (512, 600), (0, 0, 0))
    letterbox.paste(photo, (0, 0))
    left, top, right, bottom = default_model.border_box(letterbox)
    assert (left, top, right) == (0, 0, 512) and abs(bottom - 512) <= 2


def test_a_mirrored_copy_is_trimmed_as_its_original(photo):
    framed = ImageOps.expand(photo, border=30, fill=(250, 250, 250))
    framed.putpixel((0, 0), (242, 242, 242))  # a corner pixel a little off the frame colour changes nothing
    left, top, right, bottom = default_model.border_box(framed)
    m_left, m_top, m_right, m_bottom = default_model.border_box(ImageOps.mirror(framed))
    w = framed.width
    assert (m_left, m_top, m_right, m_bottom) == (w - right, top, w - left, bottom)
    assert abs(left - 30) <= 2 and abs(top - 30) <= 2


def test_a_noisy_frame_is_trimmed(photo):
    rng = np.random.default_rng(0)
    framed = np.asarray(ImageOps.expand(photo, border=40, fill=(128, 128, 128))).astype(np.float32)
    noisy = Image.fromarray(np.clip(framed + rng.normal(0, 3, framed.shape), 0, 255).astype(np.uint8))
    box = default_model.border_box(noisy)
    assert box is not None and all(abs(a - b) <= 3 for a, b in zip(box, (40, 40, 552, 552), strict=True)), box


def test_long_and_non_rgb_images():
    strip = Image.new("RGB", (300, 40_000), (0, 0, 0))
    strip.paste(Image.new("RGB", (300, 30_000), (200, 30, 30)), (0, 5_000))
    left, top, right, bottom = default_model.border_box(strip)  # reduced per axis: fast, little memory
    assert (left, right) == (0, 300) and abs(top - 5_000) <= 160 and abs(bottom - 35_000) <= 160
    for mode in ("L", "P", "LA", "I;16", "1"):
        assert default_model.border_box(Image.new(mode, (64, 64))) == (16, 16, 48, 48)


# ---- the fit script's pieces (the fit itself needs ~450 MB of Debian packages: run by hand) --------

@pytest.fixture(scope="module")
def fit_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fit_whitening.py"
    spec = importlib.util.spec_from_file_location("fit_whitening", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_webp_images_are_carved_whole_from_a_resource_bundle(fit_script, photo, tmp_path):
    import io

    encoded = io.BytesIO()
    photo.resize((128, 128)).save(encoded, "WEBP", quality=90)
    bundle = tmp_path / "activity.rcc"
    bundle.write_bytes(b"qres\0\0RIFF-not-webp" + encoded.getvalue() + b"\0tail" + encoded.getvalue())
    found = list(fit_script._webp_in_bundle(bundle))
    assert len(found) == 2 and all(data == encoded.getvalue() for _, data in found)
    with Image.open(io.BytesIO(found[0][1])) as image:
        assert image.size == (128, 128)


def test_edited_copies_are_valid_and_reproducible(fit_script, photo):
    import random

    first = [fit_script.edited_copy(photo, random.Random(seed)) for seed in range(40)]
    again = [fit_script.edited_copy(photo, random.Random(seed)) for seed in range(40)]
    assert all(copy.mode == "RGB" and min(copy.size) >= 8 for copy in first)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again, strict=True))
    assert len({copy.size for copy in first}) > 5  # crops, borders, thumbnails, aspect changes happened


def test_the_fit_refuses_evaluation_sources(fit_script, monkeypatch):
    evaluated = benchmark_set.DEB_SOURCES[0]
    monkeypatch.setattr(fit_script, "SOURCES", ((evaluated.package, "x", "x", ("*",), 1, 0),))
    with pytest.raises(SystemExit, match="evaluation source"):
        fit_script.training_photos(0)


@settings(max_examples=60, deadline=None)
@given(st.integers(8, 1300), st.integers(8, 1300), st.integers(0, 2**16))
def test_an_edge_reduced_from_its_strip_is_that_edge_of_the_reduced_image(width, height, seed):
    """border_box reads a photo's four outermost lines from their own strips (Image.reduce with a box)
    instead of reducing the whole image; the lines must be the whole reduction's, remainders included."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    fx, fy = max(1, width // default_model.BORDER_DETECT_SIDE), max(1, height // default_model.BORDER_DETECT_SIDE)
    whole = np.asarray(image.reduce((fx, fy)))
    rows, cols = whole.shape[:2]
    strips = {"top": (0, 0, width, fy), "bottom": (0, (rows - 1) * fy, width, height),
              "left": (0, 0, fx, height), "right": ((cols - 1) * fx, 0, width, height)}
    lines = {"top": whole[:1], "bottom": whole[-1:], "left": whole[:, :1], "right": whole[:, -1:]}
    for side, box in strips.items():
        assert np.array_equal(np.asarray(image.reduce((fx, fy), box=box)), lines[side]), side
