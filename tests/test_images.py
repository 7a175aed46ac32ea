"""Tests for neardup.images: discovery and robust decoding, on real photos."""

from __future__ import annotations

import io
import math
import os
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile
from skimage import data as samples

from neardup import images
from neardup.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    Decoded,
    Discovery,
    ImageError,
    discover,
    load_image,
)

from conftest import PEER_DATA, needs_peer_data

CHELSEA = Image.fromarray(samples.chelsea())  # 451 x 300 (landscape)
COFFEE = Image.fromarray(samples.coffee())  # 600 x 400


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def write(folder: Path, name: str, content: bytes = b"") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def png_with_declared_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose IHDR claims width x height (CRC fixed), as a decompression bomb would."""
    png = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    png[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature(8)+length(4)+type(4)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))  # CRC covers chunk type + 13 data bytes
    return bytes(png)


def pixels(decoded: Decoded) -> np.ndarray:
    return np.asarray(decoded.image, dtype=np.int16)


def assert_rgb(decoded: Decoded) -> None:
    assert isinstance(decoded, Decoded)
    assert decoded.image.mode == "RGB"
    assert decoded.width >= decoded.image.width >= 1
    assert decoded.height >= decoded.image.height >= 1


# --- extensions and limits -------------------------------------------------------------


def test_image_extensions_are_lower_case_with_dot_and_plugin_aware():
    assert {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff"} <= IMAGE_EXTENSIONS
    assert {".ppm", ".pgm", ".pbm", ".pnm"} <= IMAGE_EXTENSIONS
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)
    assert ".svg" not in IMAGE_EXTENSIONS
    registered = Image.registered_extensions()
    for optional in (".heic", ".heif", ".avif"):
        assert (optional in IMAGE_EXTENSIONS) == (optional in registered)


def test_default_max_pixels_is_pillows_hard_limit():
    assert DEFAULT_MAX_PIXELS == 178_956_970


# --- the peer data set ------------------------------------------------------------------


@needs_peer_data
@pytest.mark.parametrize(
    "name",
    ["ukbench09380.jpeg", "ukbench09380.png", "ukbench09380.bmp", "ukbench09380.webp", "Iggy.1024.ppm",
     "baboon.pgm", "marbles.pbm", "copyleft.tiff", "giphy.gif"],
)
def test_every_raster_format_of_the_peer_loads(name):
    path = PEER_DATA / "formats_images" / name
    decoded = load_image(path)
    assert_rgb(decoded)
    with Image.open(path) as original:
        assert (decoded.width, decoded.height) == original.size
    assert 5 < pixels(decoded).mean() < 250  # real content, not a blank canvas


@needs_peer_data
def test_peer_copies_of_one_photo_decode_alike():
    decoded = [
        load_image(PEER_DATA / "formats_images" / f"ukbench09380.{ext}", min_side=10_000)
        for ext in ("jpeg", "png", "bmp", "webp")
    ]
    reference = pixels(decoded[0])
    for other in decoded[1:]:
        assert np.abs(pixels(other) - reference).mean() < 4


@needs_peer_data
def test_peer_svg_is_refused_as_vector_image():
    with pytest.raises(ImageError) as failure:
        load_image(PEER_DATA / "formats_images" / "ukbench09380.svg")
    assert failure.value.reason == "unsupported format: SVG is a vector image"


@needs_peer_data
def test_peer_corrupt_jpeg_fails_with_reason():
    with pytest.raises(ImageError) as failure:
        load_image(PEER_DATA / "mixed_images" / "ukbench09268_corrupt.jpg")
    assert failure.value.reason == "not an image (unrecognised format)"


@needs_peer_data
def test_peer_rgba_png_is_converted():
    decoded = load_image(PEER_DATA / "alpha_channel_image.png")
    assert_rgb(decoded)
    assert (decoded.width, decoded.height) == (640, 480)


@needs_peer_data
def test_peer_nested_folders_found_only_recursively():
    nested = PEER_DATA / "mixed_nested_images"
    found = discover([nested])
    names = sorted(path.name for path in found.files)
    assert names == sorted(
        ["ukbench09268_corrupt.jpg", "ukbench00120_hflip.jpg", "ukbench00120.jpg", "ukbench09268.jpg",
         "ukbench00120_resize.jpg", "ukbench00120_rotation.jpg"]
    )
    shallow = discover([nested], recursive=False)
    assert sorted(path.name for path in shallow.files) == ["ukbench00120_hflip.jpg", "ukbench09268_corrupt.jpg"]


@needs_peer_data
def test_peer_folder_discovery_skips_svg_and_notes():
    found = discover([PEER_DATA])
    assert {path.name for path in found.skipped} == {"NOTICE.md", "ukbench09380.svg"}
    assert len(found.files) == 33
    assert found.errors == []


# --- bad input ---------------------------------------------------------------------------


def corrupt_png() -> bytes:
    png = bytearray(encode(CHELSEA, "PNG"))
    png[len(png) // 2] ^= 0xFF  # inside the compressed pixel data
    return bytes(png)


def half(content: bytes) -> bytes:
    return content[: len(content) // 2]


CONTENT_CASES = {
    "corrupt PNG": ("picture.png", corrupt_png, "corrupt PNG data (broken data stream when reading image file)"),
    "truncated JPEG": ("photo.jpg", lambda: half(encode(CHELSEA, "JPEG")), "truncated JPEG file (data ends early)"),
    "truncated PNG": ("picture.png", lambda: half(encode(CHELSEA, "PNG")), "truncated PNG file (data ends early)"),
    "text named .jpg": ("notes.jpg", lambda: b"shopping list:\n- milk\n- eggs\n", "not an image (text file)"),
    "random bytes": ("noise.jpg", lambda: bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8)),
                     "not an image (unrecognised format)"),
    "decompression bomb": ("bomb.png", lambda: png_with_declared_size(50_000, 50_000),
                           "too large: 2500000000 pixels exceeds the limit of 178956970"),
    "SVG content": ("drawing.png", lambda: b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>',
                    "unsupported format: SVG is a vector image"),
    "PDF": ("scan.jpg", lambda: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "not an image (PDF document)"),
}


@pytest.mark.parametrize("as_bytes", [False, True], ids=["path", "bytes"])
@pytest.mark.parametrize("case", CONTENT_CASES)
def test_bad_content_raises_image_error_with_reason(tmp_path, case, as_bytes):
    name, make_content, reason = CONTENT_CASES[case]
    content = make_content()
    source = content if as_bytes else write(tmp_path, name, content)
    with pytest.raises(ImageError) as failure:
        load_image(source)
    assert failure.value.reason == reason
    assert str(failure.value) == reason


def test_bad_input_reasons_are_distinct():
    reasons = [reason for _, _, reason in CONTENT_CASES.values()]
    reasons += ["empty file (0 bytes)", "file not found", "is a folder, not a file", "permission denied"]
    assert len(set(reasons)) == len(reasons)
    assert all("\n" not in reason for reason in reasons)


@pytest.mark.parametrize("as_bytes", [False, True], ids=["path", "bytes"])
def test_empty_file(tmp_path, as_bytes):
    with pytest.raises(ImageError, match=r"^empty file \(0 bytes\)$"):
        load_image(b"" if as_bytes else write(tmp_path, "empty.jpg"))


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="^file not found$"):
        load_image(tmp_path / "gone.jpg")
    with pytest.raises(ImageError, match="^is a folder, not a file$"):
        load_image(tmp_path)


def test_unreadable_file(tmp_path):
    path = write(tmp_path, "secret.jpg", encode(CHELSEA, "JPEG"))
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("running as root: file permissions do not stop reading")
    with pytest.raises(ImageError, match="^permission denied$"):
        load_image(path)


def test_permission_error_is_reported(tmp_path, monkeypatch):
    # Root can read anything, so also check the mapping with a refusing open().
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    path = write(tmp_path, "secret.jpg", encode(CHELSEA, "JPEG"))
    monkeypatch.setattr(os, "open", refuse)  # files.open_regular, the one open of a catalogued file
    with pytest.raises(ImageError, match="^permission denied$"):
        load_image(path)


def test_svg_extension_is_refused_before_decoding(tmp_path):
    with pytest.raises(ImageError, match="^unsupported format: SVG is a vector image$"):
        load_image(write(tmp_path, "logo.SVG", b"<svg/>"))


@pytest.mark.skipif(".heic" in Image.registered_extensions(), reason="a HEIF plugin is installed")
def test_heic_without_plugin_says_which_plugin():
    heic_header = struct.pack(">I", 24) + b"ftypheic" + b"\0\0\0\0" + b"mif1heic"
    with pytest.raises(ImageError, match="^unsupported format: HEIC/HEIF needs the pillow-heif plugin$"):
        load_image(heic_header + b"\0" * 64)


def test_max_pixels_is_checked_from_header_with_dimensions(tmp_path):
    path = write(tmp_path, "cat.jpg", encode(CHELSEA, "JPEG"))
    with pytest.raises(ImageError, match=r"^too large: 451x300 pixels exceeds the limit of 10000$"):
        load_image(path, max_pixels=10_000)
    assert load_image(path, max_pixels=451 * 300).width == 451


def test_bomb_below_pillow_limit_is_refused_by_our_limit_before_decoding():
    # 9000 x 9000 is under Pillow's own thresholds; decoding it would allocate 81 MB.
    with pytest.raises(ImageError, match=r"^too large: 9000x9000 pixels exceeds the limit of 50000000$"):
        load_image(png_with_declared_size(9_000, 9_000), max_pixels=50_000_000)


def test_pillow_bomb_warning_as_error_becomes_image_error():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match=r"^too large: 100000000 pixels exceeds the limit of 89478485$"):
            load_image(png_with_declared_size(10_000, 10_000))


def test_invalid_arguments_are_programming_errors():
    with pytest.raises(ValueError):
        load_image(encode(CHELSEA, "PNG"), min_side=0)
    with pytest.raises(ValueError):
        load_image(encode(CHELSEA, "PNG"), max_pixels=0)


def test_load_image_leaves_pillow_and_warnings_state_alone(tmp_path):
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))
    for _, make_content, _ in CONTENT_CASES.values():
        with pytest.raises(ImageError):
            load_image(make_content())
    load_image(encode(CHELSEA, "JPEG"))
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters)) == before


# --- pixel modes ------------------------------------------------------------------------


def test_rgba_transparent_is_white_and_opaque_keeps_colour():
    rgba = CHELSEA.convert("RGBA")
    alpha = np.full((300, 451), 255, np.uint8)
    alpha[:, :200] = 0
    rgba.putalpha(Image.fromarray(alpha))
    decoded = pixels(load_image(encode(rgba, "PNG")))
    assert (decoded[:, :200] == 255).all()
    assert (decoded[:, 200:] == np.asarray(CHELSEA)[:, 200:]).all()


def test_la_transparent_is_white_and_opaque_keeps_grey():
    grey = CHELSEA.convert("L")
    alpha = np.full((300, 451), 255, np.uint8)
    alpha[:100] = 0
    la = Image.merge("LA", (grey, Image.fromarray(alpha)))
    decoded = pixels(load_image(encode(la, "PNG")))
    assert (decoded[:100] == 255).all()
    for channel in range(3):
        assert (decoded[100:, :, channel] == np.asarray(grey)[100:]).all()


def test_palette_with_transparent_index_is_white():
    palette_image = CHELSEA.quantize(16)
    palette_image.paste(15, (0, 0, 451, 50))  # top band: palette index 15, declared transparent below
    for image_format in ("PNG", "GIF"):
        decoded = pixels(load_image(encode(palette_image, image_format, transparency=15)))
        assert (decoded[:50] == 255).all(), image_format
        assert decoded[50:].mean() < 200, image_format


def test_palette_alpha_mode_is_composited_on_white():
    pa = CHELSEA.quantize(16).convert("PA")
    alpha = np.full((300, 451), 255, np.uint8)
    alpha[-20:] = 0
    pa.putalpha(Image.fromarray(alpha))
    decoded = pixels(load_image(encode(pa, "TIFF")))
    assert (decoded[-20:] == 255).all()
    assert decoded[:-20].mean() < 200


@pytest.mark.parametrize("image_format", ["PNG", "TIFF"])
def test_sixteen_bit_grey_is_scaled_not_clipped(image_format):
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (10, 1))
    sixteen_bit = Image.fromarray(ramp)
    assert sixteen_bit.mode == "I;16"
    decoded = pixels(load_image(encode(sixteen_bit, image_format)))
    assert decoded[0, 0, 0] == 0 and decoded[0, -1, 0] == 255
    assert abs(decoded[0, 128, 0] - 128) <= 1  # mid-grey stays mid-grey instead of white
    assert (np.diff(decoded[0, :, 0]) >= 0).all()


@pytest.mark.parametrize("mode", ["I", "F"])
def test_wide_integer_and_float_grey_are_stretched_to_full_range(mode):
    grey = np.asarray(CHELSEA.convert("L"), dtype=np.float64)
    wide = Image.fromarray((grey * 1000 - 20_000).astype(np.int32 if mode == "I" else np.float32))
    assert wide.mode == mode
    decoded = pixels(load_image(encode(wide, "TIFF")))
    expected = (grey - grey.min()) * 255 / (grey.max() - grey.min())
    assert np.abs(decoded[:, :, 0] - expected).max() <= 1


def test_bilevel_is_black_and_white():
    bilevel = CHELSEA.convert("1")
    for image_format in ("PNG", "PPM"):
        decoded = pixels(load_image(encode(bilevel, image_format)))
        assert set(np.unique(decoded)) == {0, 255}
        assert (decoded == np.asarray(bilevel.convert("RGB"))).all()


def test_grey_becomes_three_equal_channels():
    grey = CHELSEA.convert("L")
    decoded = pixels(load_image(encode(grey, "PNG")))
    for channel in range(3):
        assert (decoded[:, :, channel] == np.asarray(grey)).all()


@pytest.mark.parametrize("image_format", ["JPEG", "TIFF"])
def test_cmyk_converts_back_to_the_colours(image_format):
    decoded = pixels(load_image(encode(CHELSEA.convert("CMYK"), image_format), min_side=10_000))
    assert np.abs(decoded - np.asarray(CHELSEA, dtype=np.int16)).mean() < 3


def test_ycbcr_tiff_converts_to_rgb():
    decoded = pixels(load_image(encode(CHELSEA.convert("YCbCr"), "TIFF")))
    assert np.abs(decoded - np.asarray(CHELSEA, dtype=np.int16)).mean() < 3


def test_animated_gif_gives_first_frame():
    red, blue = Image.new("RGB", (64, 48), (255, 0, 0)), Image.new("RGB", (64, 48), (0, 0, 255))
    gif = encode(red, "GIF", save_all=True, append_images=[blue], duration=100)
    decoded = load_image(gif)
    assert decoded.image.getpixel((10, 10)) == (255, 0, 0)


def test_animated_webp_gives_first_frame():
    frames = [Image.fromarray(samples.astronaut()), Image.fromarray(samples.coffee()).resize((512, 512))]
    decoded = load_image(encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], quality=90))
    assert np.abs(pixels(decoded) - np.asarray(frames[0], dtype=np.int16)).mean() < 6


# --- orientation ------------------------------------------------------------------------


def with_orientation(image: Image.Image, image_format: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, image_format, exif=exif)


@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP"])
def test_orientation_6_turns_landscape_into_portrait(image_format):
    decoded = load_image(with_orientation(CHELSEA, image_format, 6), min_side=10_000)
    assert (decoded.width, decoded.height) == (300, 451)
    assert decoded.image.size == (300, 451)
    upright = np.asarray(CHELSEA.transpose(Image.Transpose.ROTATE_270), dtype=np.int16)
    assert np.abs(pixels(decoded) - upright).mean() < 6


def test_orientation_3_rotates_without_swapping_sides():
    decoded = load_image(with_orientation(CHELSEA, "PNG", 3))
    assert (decoded.width, decoded.height) == (451, 300)
    assert (pixels(decoded) == np.asarray(CHELSEA)[::-1, ::-1]).all()


BROKEN_EXIF = {
    "bad-offset": b"Exif\x00\x00II*\x00\xff\xff\xff\x7f" + b"\x00" * 20,  # IFD offset points past the end
    "bad-count": b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff" + b"\x01" * 40,  # absurd entry count
    "text-orientation": b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x02\x00\x00\x00\x04abc\x00",
    "garbage": b"not exif at all",
}


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("image_format", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("exif", BROKEN_EXIF.values(), ids=BROKEN_EXIF.keys())
def test_broken_exif_does_not_fail_a_good_image(image_format, exif):
    decoded = load_image(encode(CHELSEA, image_format, exif=exif), min_side=10_000)
    assert (decoded.width, decoded.height) == (451, 300)
    assert np.abs(pixels(decoded) - np.asarray(CHELSEA, dtype=np.int16)).mean() < 6


@pytest.mark.parametrize("image_format", ["PNG", "WEBP"])
def test_exif_that_raises_while_parsing_means_no_rotation(image_format):
    # PNG and WebP parse EXIF lazily; with warnings as errors Pillow's "Corrupt EXIF data"
    # warning is raised from getexif(), after the pixels decoded fine.
    content = encode(CHELSEA, image_format, exif=BROKEN_EXIF["bad-offset"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = load_image(content)
    assert (decoded.width, decoded.height) == (451, 300)


# --- JPEG draft decoding ---------------------------------------------------------------


@pytest.fixture(scope="module")
def large_jpeg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("large") / "coffee-24mp.jpg"
    COFFEE.resize((6000, 4000), Image.Resampling.BILINEAR).save(path, "JPEG", quality=90)
    return path


def test_large_jpeg_decodes_at_reduced_scale_but_reports_full_size(large_jpeg):
    decoded = load_image(str(large_jpeg))
    assert (decoded.width, decoded.height) == (6000, 4000)
    assert decoded.image.size == (750, 500)  # 1/8 DCT scale: both sides >= 224
    reference = np.asarray(COFFEE.resize((750, 500), Image.Resampling.BILINEAR), dtype=np.int16)
    assert np.abs(pixels(decoded) - reference).mean() < 8


def test_draft_scale_follows_min_side(large_jpeg):
    decoded = load_image(large_jpeg, min_side=1000)
    assert decoded.image.size == (1500, 1000)
    assert (decoded.width, decoded.height) == (6000, 4000)


def test_large_jpeg_with_orientation_reports_upright_full_size(tmp_path):
    content = with_orientation(COFFEE.resize((2400, 1600)), "JPEG", 8)
    decoded = load_image(content)
    assert (decoded.width, decoded.height) == (1600, 2400)
    assert decoded.image.size == (400, 600)
    assert min(decoded.image.size) >= 224


@settings(max_examples=25, deadline=None)
@given(
    width=st.integers(16, 1200),
    height=st.integers(16, 1200),
    min_side=st.integers(8, 700),
)
def test_draft_never_goes_below_min_side(width, height, min_side):
    content = encode(COFFEE.resize((width, height)), "JPEG", quality=75)
    decoded = load_image(content, min_side=min_side)
    assert (decoded.width, decoded.height) == (width, height)
    scales = [scale for scale in (1, 2, 4, 8)
              if decoded.image.size == (math.ceil(width / scale), math.ceil(height / scale))]
    assert scales, "not a DCT scale of the original"
    assert decoded.image.width >= min(min_side, width) and decoded.image.height >= min(min_side, height)
    if min(width, height) >= 8 * min_side:
        assert 8 in scales


# --- never anything but Decoded or ImageError ------------------------------------------


def decodes_or_fails_cleanly(content: bytes) -> None:
    try:
        decoded = load_image(content, max_pixels=4_000_000)
    except ImageError as error:
        assert error.reason and "\n" not in error.reason
    else:
        assert_rgb(decoded)
        decoded.image.getpixel((0, 0))  # really loaded


SMALL_PHOTO = CHELSEA.resize((120, 80))
REAL_FILES = {
    image_format: encode(SMALL_PHOTO.convert(mode), image_format)
    for image_format, mode in [("JPEG", "RGB"), ("PNG", "RGBA"), ("GIF", "P"), ("WEBP", "RGB"),
                               ("TIFF", "RGB"), ("BMP", "RGB")]
}
REAL_JPEG_WITH_EXIF = with_orientation(SMALL_PHOTO, "JPEG", 6)


# Damaged files make Pillow warn about their metadata; decoding carries on regardless.
@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_decode_or_fail_cleanly(content):
    decodes_or_fails_cleanly(content)


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([REAL_JPEG_WITH_EXIF, *REAL_FILES.values()]),
    st.data(),
)
def test_truncated_or_bit_flipped_real_files_decode_or_fail_cleanly(content, data):
    damaged = bytearray(content[: data.draw(st.integers(1, len(content)), label="keep bytes")])
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(damaged) - 1), st.integers(1, 255)), max_size=8))
    for position, mask in flips:
        damaged[position] ^= mask
    decodes_or_fails_cleanly(bytes(damaged))


def test_concurrent_loads_match_serial_loads(large_jpeg):
    sources = [large_jpeg, *REAL_FILES.values(), REAL_JPEG_WITH_EXIF] * 3
    serial = [np.asarray(load_image(source).image) for source in sources]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = [np.asarray(decoded.image) for decoded in pool.map(load_image, sources)]
    assert all((a == b).all() for a, b in zip(serial, parallel))


# --- discovery ----------------------------------------------------------------------------


def by_components(paths):
    return sorted(paths, key=lambda path: path.parts)


@pytest.fixture()
def photo_tree(tmp_path) -> Path:
    """root/ with images, non-images, hidden entries, nested folders and symlinks."""
    root = tmp_path / "root"
    jpeg = encode(SMALL_PHOTO, "JPEG")
    write(root, "a.jpg", jpeg)
    write(root, "B.PNG", encode(SMALL_PHOTO, "PNG"))
    write(root, "notes.txt", b"hello")
    write(root, ".hidden.jpg", jpeg)
    write(root, ".cache/thumb.jpg", jpeg)
    write(root, "sub/c.webp", encode(SMALL_PHOTO, "WEBP"))
    write(root, "sub/readme.md", b"# readme")
    write(root, "sub/deeper/d.tif", encode(SMALL_PHOTO, "TIFF"))
    write(root, "a-b/e.jpeg", jpeg)
    (root / "loop").symlink_to(root, target_is_directory=True)  # root/loop -> root
    (root / "sub" / "deeper" / "up").symlink_to(root / "sub", target_is_directory=True)
    (root / "alias.jpg").symlink_to(root / "a.jpg")
    (root / "dangling.jpg").symlink_to(root / "missing.jpg")
    return root


def test_discover_walks_tree_skipping_hidden_and_following_symlinks_once(photo_tree):
    found = discover([photo_tree])
    assert isinstance(found, Discovery)
    expected = [photo_tree / name for name in
                ("a.jpg", "B.PNG", "alias.jpg", "sub/c.webp", "sub/deeper/d.tif", "a-b/e.jpeg")]
    assert found.files == by_components(expected)
    assert found.skipped == by_components([photo_tree / "notes.txt", photo_tree / "sub/readme.md"])
    assert found.errors == []
    assert all(path.is_absolute() for path in found.files)


def test_discover_sorts_by_path_components(tmp_path):
    for name in ("sub-x.jpg", "sub/c.jpg", "Z.jpg", "a.jpg"):
        write(tmp_path, name)
    names = [str(path.relative_to(tmp_path)) for path in discover([tmp_path]).files]
    # A folder's files stay together, as in Path ordering (plain string order would put "sub-x.jpg" first).
    assert names == ["Z.jpg", "a.jpg", "sub/c.jpg", "sub-x.jpg"]


def test_discover_not_recursive_lists_only_top_level(photo_tree):
    found = discover([photo_tree], recursive=False)
    assert found.files == by_components([photo_tree / "a.jpg", photo_tree / "B.PNG", photo_tree / "alias.jpg"])
    assert found.skipped == [photo_tree / "notes.txt"]


def test_discover_follows_symlink_to_folder_outside_roots(tmp_path):
    outside = tmp_path / "elsewhere"
    write(outside, "x.jpg", encode(SMALL_PHOTO, "JPEG"))
    root = tmp_path / "root"
    root.mkdir()
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (outside / "back").symlink_to(root, target_is_directory=True)  # loop through two folders
    assert discover([root]).files == [root / "linked" / "x.jpg"]


def test_discover_explicit_files_always_included_and_deduplicated(photo_tree, tmp_path):
    odd = write(tmp_path, "upload.bin", b"whatever")
    hidden = photo_tree / ".hidden.jpg"
    found = discover([odd, hidden, photo_tree, photo_tree / "a.jpg", str(photo_tree / "sub")])
    assert odd in found.files and hidden in found.files
    assert found.files.count(photo_tree / "a.jpg") == 1
    assert found.files.count(photo_tree / "sub" / "c.webp") == 1
    assert len(found.files) == len(set(found.files))


def test_discover_explicit_hidden_folder_is_searched(tmp_path):
    hidden = tmp_path / ".photos"
    write(hidden, "x.jpg", b"")
    assert discover([hidden]).files == [hidden / "x.jpg"]


def test_discover_relative_roots_become_absolute_without_resolving_symlinks(photo_tree, monkeypatch):
    monkeypatch.chdir(photo_tree)
    found = discover(["alias.jpg", "."])
    assert photo_tree / "alias.jpg" in found.files
    assert all(path.is_absolute() for path in found.files)


def test_discover_missing_root_raises(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=f"^no such file or folder: {missing}$"):
        discover([tmp_path, missing])


def test_discover_accepts_any_iterable(photo_tree):
    assert discover(iter([photo_tree])).files == discover([photo_tree]).files


def test_discover_reports_unreadable_folder_and_continues(photo_tree, monkeypatch):
    real_scandir = os.scandir
    blocked = str(photo_tree / "sub")

    def scandir(path):
        if os.fspath(path) == blocked:
            raise PermissionError(13, "Permission denied", blocked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found = discover([photo_tree])
    assert found.errors == [(photo_tree / "sub", "permission denied")]
    assert photo_tree / "a.jpg" in found.files
    assert photo_tree / "sub" / "c.webp" not in found.files


def test_discover_unreadable_folder_for_real(photo_tree):
    locked = photo_tree / "sub"
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as root: folder permissions do not stop reading")
        found = discover([photo_tree])
        assert found.errors == [(locked, "permission denied")]
    finally:
        locked.chmod(0o755)


def test_discover_many_files(tmp_path):
    for folder in range(20):
        for index in range(100):
            (tmp_path / f"d{folder:02}").mkdir(exist_ok=True)
            (tmp_path / f"d{folder:02}" / f"{index:03}.jpg").touch()
    found = discover([tmp_path])
    assert len(found.files) == 2000
    assert found.files == by_components(found.files)


def test_discover_prefers_real_paths_across_roots(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    write(second, "x.jpg")
    first.mkdir()
    (first / "shortcut").symlink_to(second, target_is_directory=True)
    assert discover([first, second]).files == [second / "x.jpg"]
    assert discover([first]).files == [first / "shortcut" / "x.jpg"]


def test_large_png_is_reduced_before_conversion_and_embeds_as_the_full_decode(tmp_path, embedder):
    """A 2,048-px PNG (no draft decoding) is box-reduced to no less than 3x the requested side before the
    colour conversion; its reported size stays the full size, and the model sees what the full decode gave."""
    photo = Image.fromarray(samples.astronaut()).resize((2048, 2048), Image.Resampling.BICUBIC)
    path = tmp_path / "big.png"
    photo.save(path)
    decoded = load_image(path, min_side=224)
    assert (decoded.width, decoded.height) == (2048, 2048)
    assert decoded.image.size == (683, 683)  # 2048 // (3 x 224) = factor 3: still >= 3 x 224 (ceil 2048 / 3)
    reduced, full = embedder.embed(np.stack([embedder.preprocess(decoded.image), embedder.preprocess(photo)]))
    assert float(reduced @ full) >= 0.995


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_large_transparent_image_is_reduced_as_if_composited_on_white_first(tmp_path, mode):
    """A large image with transparency is reduced before it is composited (premultiplied colours averaged):
    the result is the full-size composite reduced, to rounding, and the colours hidden under transparent
    pixels (pure red here) never bleed in."""
    rng = np.random.default_rng(7)
    photo = Image.fromarray(samples.astronaut()).resize((1400, 1400), Image.Resampling.BICUBIC)
    colours = np.asarray(photo).copy()
    alpha = rng.integers(0, 256, (1400, 1400), dtype=np.uint8)
    alpha[:700] = 255
    alpha[700:900] = 0
    colours[700:900] = (255, 0, 0)
    image = Image.fromarray(np.dstack([colours, alpha]), "RGBA")
    if mode == "LA":
        image = Image.merge("LA", (image.convert("L"), image.getchannel("A")))
    elif mode == "PA":
        image = image.convert("RGB").quantize(64).convert("PA")
        image.putalpha(Image.fromarray(alpha))
    path = tmp_path / ("alpha.tif" if mode == "PA" else "alpha.png")  # Pillow writes PA to TIFF only
    image.save(path)
    decoded = load_image(path, min_side=224)
    assert decoded.image.size == (700, 700)  # 1400 // (3 x 224) = factor 2
    composited = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
    expected = np.asarray(composited.convert("RGB").reduce(2), dtype=int)
    assert np.abs(pixels(decoded) - expected).max() <= 2
    assert (pixels(decoded)[351:449] == 255).all()  # transparent rows: white, no red


def test_a_fifo_named_like_an_image_is_refused_without_blocking(tmp_path):
    """load_image(path) (query, report, thumbnails) opens through files.open_regular: a FIFO is refused at
    once, never waited on for a writer that never comes."""
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="^is a named pipe"):
        load_image(fifo)
