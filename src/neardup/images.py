"""Find image files and decode them robustly into RGB Pillow images.

Two jobs, both independent of the embedding model:

* :func:`discover` turns the files and folders a user names into a sorted list of
  image paths, cheaply enough for folders with hundreds of thousands of files.
* :func:`load_image` decodes one file (or the bytes of an upload) into an RGB image,
  and turns every way that can fail into :class:`ImageError` with a one-line reason.

``load_image`` runs in worker threads, so it never changes process-wide state: no
``Image.MAX_IMAGE_PIXELS``, no ``ImageFile.LOAD_TRUNCATED_IMAGES``, no warning filters.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from .errors import ImageError  # noqa: F401 (re-exported)
from .files import FileCheckError, open_regular


def _register_optional_plugins() -> None:
    """Let Pillow read HEIC/HEIF (and AVIF on builds without it) when a plugin is installed."""
    try:
        import pillow_heif
    except ImportError:
        pass
    else:
        pillow_heif.register_heif_opener()
    with contextlib.suppress(ImportError):
        import pillow_avif  # noqa: F401  (importing it registers the AVIF plugin)
    # Loading every plugin now, once, keeps Pillow's lazy plugin loading out of the
    # worker threads that call load_image concurrently.
    Image.init()


_register_optional_plugins()

_ALWAYS_READABLE_EXTENSIONS = frozenset(
    {
        ".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".dib",
        ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm",
    }
)
_PLUGIN_EXTENSIONS = frozenset({".heic", ".heif", ".avif"})

IMAGE_EXTENSIONS: frozenset[str] = _ALWAYS_READABLE_EXTENSIONS | (
    _PLUGIN_EXTENSIONS & Image.registered_extensions().keys()
)
"""Lower-case file extensions (with the dot) that :func:`discover` treats as images."""

DEFAULT_MAX_PIXELS: int = 178_956_970
"""Largest width x height decoded by default: Pillow's own hard decompression-bomb limit
(2 x its default ``MAX_IMAGE_PIXELS``), so neardup refuses nothing Pillow would decode
out of the box, and 100-megapixel camera files still load. The worst case is a
non-JPEG at the limit: about 0.7 GB while decoding an RGBA image of that size."""

_VECTOR_EXTENSIONS = frozenset({".svg", ".svgz"})
_SVG_REASON = "unsupported format: SVG is a vector image"

# ISO base media "ftyp" brands of still images that Pillow reads only through a plugin.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})

# EXIF orientation -> the transpose that shows the image upright (EXIF 2.3, tag 0x0112).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_TRANSPOSES_SWAPPING_SIDES = frozenset(
    {Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270}
)
_EXIF_ORIENTATION_TAG = 0x0112

_MODES_WITH_ALPHA = frozenset({"RGBA", "RGBa", "LA", "PA"})
#: Modes Pillow converts to RGBA directly (the 16- and 32-bit ones take _to_rgb's scaling instead).
_EIGHT_BIT_MODES = frozenset({"RGBA", "RGBa", "LA", "PA", "P", "L", "RGB", "1"})
_WHITE = (255, 255, 255, 255)

# Pillow's DecompressionBombError/Warning text: "Image size (N pixels) exceeds limit of M pixels".
_PILLOW_BOMB_MESSAGE = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+) pixels")
_SNIFF_BYTES = 4096
_MAX_DETAIL_CHARS = 120
#: Decoded images are reduced to no less than this many times the requested minimum side.
_REDUCE_MARGIN = 3


@dataclass(frozen=True)
class Decoded:
    """A decoded image: RGB, upright, fully loaded.

    ``width``/``height`` are the full-resolution size the user sees (after EXIF
    orientation), even when JPEG draft decoding made ``image`` itself smaller.
    """

    image: Image.Image
    width: int
    height: int


def load_image(
    source: str | os.PathLike[str] | bytes,
    *,
    min_side: int = 224,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Decoded:
    """Decode a file path, or the raw bytes of an uploaded file, into an RGB :class:`Decoded`.

    JPEGs are decoded at the smallest DCT scale (1/2, 1/4 or 1/8) that keeps both sides
    at least ``min_side`` when the original is that large. Animated images give their
    first frame; transparency is composited on white. Images over ``max_pixels``
    (width x height, read from the header) are refused before any pixel is decoded.

    Raises:
        ImageError: for every reason the source cannot be decoded.
        ValueError: if ``min_side`` or ``max_pixels`` is not positive.
    """
    if min_side < 1 or max_pixels < 1:
        raise ValueError(f"min_side and max_pixels must be positive, got {min_side}, {max_pixels}")
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not source:
            raise ImageError("empty file (0 bytes)")
        return _decode(io.BytesIO(source), min_side, max_pixels)
    if Path(source).suffix.lower() in _VECTOR_EXTENSIONS:
        raise ImageError(_SVG_REASON)
    with _open_file(source) as stream:
        return _decode(stream, min_side, max_pixels)


@contextlib.contextmanager
def _open_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    # The one safe open (a FIFO or device at the path is refused, never waited on); a symlinked file is
    # followed, as discovery includes symlinked files on purpose.
    try:
        stream = open_regular(path, follow_symlinks=True)
    except FileCheckError as error:
        raise ImageError(str(error)) from None
    with stream:
        if os.fstat(stream.fileno()).st_size == 0:
            raise ImageError("empty file (0 bytes)")
        yield stream


def _decode(stream: BinaryIO, min_side: int, max_pixels: int) -> Decoded:
    # Pillow's ~40 format plugins raise many exception types on malformed input
    # (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError,
    # ...), so everything from Pillow is translated here: one bad file must never stop
    # a batch with an unexpected exception type.
    try:
        image = Image.open(stream)
    except Image.UnidentifiedImageError:
        stream.seek(0)
        raise ImageError(_unrecognised_content_reason(stream.read(_SNIFF_BYTES))) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # The warning arrives as an exception only when the application turned warnings into errors.
        raise ImageError(_pillow_bomb_reason(error)) from None
    except OSError as error:
        if error.errno is not None:  # a real I/O error from the file, not a Pillow parse error
            raise ImageError(f"cannot read file: {error.strerror or error}") from None
        raise ImageError(_failure_reason("image", "header", error)) from None
    except Exception as error:
        raise ImageError(_failure_reason("image", "header", error)) from None

    image_format = image.format or "image"
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"too large: {width}x{height} pixels exceeds the limit of {max_pixels}")
    try:
        # Only JPEG implements draft(); it picks the largest DCT scale-down that keeps
        # both sides >= min_side. Other formats ignore it and decode at full size.
        image.draft("RGB", (min_side, min_side))
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(_pillow_bomb_reason(error)) from None
    except MemoryError:
        raise ImageError(f"not enough memory to decode this {width}x{height} {image_format}") from None
    except Exception as error:
        raise ImageError(_failure_reason(image_format, "data", error)) from None

    # Non-JPEG formats decode at full size; averaging blocks of pixels first (Image.reduce, a box filter)
    # makes the colour conversion and the model's resize 4-9x cheaper on large PNG/WebP/TIFF files. It
    # keeps at least 3x the model's input on each side, so the model's bicubic resize sees the same detail.
    factor = min(image.size) // (_REDUCE_MARGIN * min_side)
    reducible = image.format != "JPEG" and factor >= 2
    transparent = _has_transparency(image)
    if reducible and image.mode in ("RGB", "L") and not transparent:
        try:
            image = image.reduce(factor)
        except Exception as error:
            raise ImageError(_failure_reason(image_format, "data", error)) from None
    try:
        if reducible and transparent and image.mode in _EIGHT_BIT_MODES:
            rgb = _reduced_on_white(image, factor)
        else:
            rgb = _to_rgb(image)
    except Exception as error:
        raise ImageError(f"unsupported pixel format {image.mode} in {image_format} ({_detail(error)})") from None

    transpose = _ORIENTATION_TRANSPOSE.get(_exif_orientation(image))
    if transpose is None:
        return Decoded(rgb, width, height)
    if transpose in _TRANSPOSES_SWAPPING_SIDES:
        width, height = height, width
    return Decoded(rgb.transpose(transpose), width, height)


def _exif_orientation(image: Image.Image) -> int | None:
    """The EXIF (or XMP) orientation tag, or None when absent or unreadable.

    Cameras and editors write plenty of malformed EXIF; a broken block must not make
    an otherwise good image fail, so any parse error means "no rotation".
    """
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG)
    except Exception:
        return None
    return orientation if isinstance(orientation, int) else None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: transparency on white, high bit depths scaled to 8 bits."""
    mode = image.mode
    if mode.startswith("I;16"):
        # Pillow's own I;16 -> L conversion clips everything above 255 to white.
        samples = np.asarray(image, dtype=np.uint32)
        return _grey_to_rgb((samples * 255 + 32767) // 65535)
    if mode in ("I", "F"):
        # 32-bit integer and float images have no nominal white level: stretch the
        # values actually present to 0..255 (a constant image keeps its clipped value).
        samples = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(samples.min()), float(samples.max())
        if high > low:
            samples = (samples - low) * (255.0 / (high - low))
        return _grey_to_rgb(np.rint(np.clip(samples, 0, 255)))
    if _has_transparency(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        # A copy, detached from the source stream: an upload's bytes are not kept alive with it.
        return image.copy()
    # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX, ...: Pillow's conversions are correct for these.
    return image.convert("RGB")


def _has_transparency(image: Image.Image) -> bool:
    return image.mode in _MODES_WITH_ALPHA or "transparency" in image.info


def _reduced_on_white(image: Image.Image, factor: int) -> Image.Image:
    """`image` composited on white, then box-reduced by `factor`, computed in the other order.

    Compositing is linear in premultiplied colours (white + alpha x (colour - white)), so averaging the
    premultiplied pixels (RGBa) and then compositing gives the average of the composited pixels, to
    rounding, with no hidden colour under a transparent pixel bleeding in; only the reduced image is
    composited. Twice to four times cheaper than compositing a 15-megapixel wallpaper at full size.
    """
    rgba = image if image.mode == "RGBA" else image.convert("RGBA")
    premultiplied = np.asarray(rgba.convert("RGBa").reduce(factor), dtype=np.int16)
    # composited = premultiplied colour + (255 - alpha); the colour never exceeds its alpha, min() is a guard
    composited = np.minimum(premultiplied[..., :3] + (255 - premultiplied[..., 3:]), 255)
    return Image.fromarray(composited.astype(np.uint8))


def _grey_to_rgb(levels: np.ndarray) -> Image.Image:
    return Image.fromarray(levels.astype(np.uint8)).convert("RGB")


def _unrecognised_content_reason(head: bytes) -> str:
    """Say what a file Pillow cannot identify is, when that is recognisable."""
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<") and b"<svg" in head.lower():
        return _SVG_REASON
    if head[4:8] == b"ftyp":
        # Name the missing plugin; with the plugin present, Pillow found this file unreadable.
        brand = head[8:12]
        if brand in _HEIF_BRANDS and ".heic" not in IMAGE_EXTENSIONS:
            return "unsupported format: HEIC/HEIF needs the pillow-heif plugin"
        if brand in _AVIF_BRANDS and ".avif" not in IMAGE_EXTENSIONS:
            return "unsupported format: AVIF needs a Pillow build with AVIF support or pillow-avif-plugin"
    if head.startswith(b"%PDF"):
        return "not an image (PDF document)"
    if b"\0" not in head:
        with contextlib.suppress(UnicodeDecodeError):
            head.decode("utf-8")
            return "not an image (text file)"
    return "not an image (unrecognised format)"


def _failure_reason(image_format: str, part: str, error: Exception) -> str:
    if "truncated" in str(error).lower():
        return f"truncated {image_format} file (data ends early)"
    return f"corrupt {image_format} {part} ({_detail(error)})"


def _pillow_bomb_reason(error: Exception) -> str:
    """Pillow refused the size before we could see it; its message carries the numbers."""
    match = _PILLOW_BOMB_MESSAGE.search(str(error))
    if match is None:
        return "too large: exceeds Pillow's decompression-bomb limit"
    pixels, limit = match.groups()
    return f"too large: {pixels} pixels exceeds the limit of {limit}"


def _detail(error: Exception) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= _MAX_DETAIL_CHARS else text[: _MAX_DETAIL_CHARS - 3] + "..."


NOT_UTF8 = "file name is not valid UTF-8"


def printable_path(path: str) -> str:
    """A found path as text that can be catalogued and printed. Names on disk are bytes; one that is not
    valid UTF-8 reaches Python with surrogate escapes, which neither SQLite nor a UTF-8 terminal takes.
    Such a path is spelled with its undecodable bytes as \\xNN escapes (``caf\\xe9.jpg``); a valid path
    is returned unchanged."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    return path


@dataclass
class Discovery:
    """What :func:`discover` found."""

    files: list[Path]
    """Absolute image paths (symlinks kept as named), sorted, each path once."""
    skipped: list[Path]
    """Files with a non-image extension: counted for the summary, not errors."""
    errors: list[tuple[Path, str]]
    """Folders (or entries) that could not be read, with a one-line reason."""


def discover(roots: Iterable[str | os.PathLike[str]], *, recursive: bool = True) -> Discovery:
    """Collect image files from files and folders.

    A file named explicitly is always included, whatever its extension (loading it then
    says why it failed). Folders are searched (recursively by default) with hidden files
    and folders left out; symlinks to folders are followed, but each real folder is
    searched once, so symlink loops terminate.

    Raises:
        FileNotFoundError: if a root does not exist.
    """
    given_roots = list(roots)
    for root in given_roots:
        if not os.path.exists(root):
            raise FileNotFoundError(f"no such file or folder: {root}")

    walk = _Walk(recursive)
    folders = []
    for root in map(os.path.abspath, given_roots):
        if os.path.isdir(root):
            folders.append(root)
        else:
            walk.files.add(root)
    walk.search(folders)
    return Discovery(
        files=_sorted_paths(walk.files),
        skipped=_sorted_paths(walk.skipped),
        errors=sorted(walk.errors),
    )


class _Walk:
    """One discovery run: folders already searched, and what was found so far."""

    def __init__(self, recursive: bool) -> None:
        self.recursive = recursive
        self.files: set[str] = set()
        self.skipped: set[str] = set()
        self.errors: list[tuple[Path, str]] = []
        # (st_dev, st_ino) identifies a real folder however it was reached, at one stat per folder.
        self._searched: set[tuple[int, int]] = set()

    def search(self, roots: list[str]) -> None:
        # Real folders of all roots are searched before any symlinked one, so files inside
        # the roots are reported under their real path, not under whichever symlink came first.
        folders = roots[::-1]  # a stack: the first root is searched first
        symlinked_folders: list[str] = []
        while folders or symlinked_folders:
            folder = folders.pop() if folders else symlinked_folders.pop()
            for path, is_symlink in self._search_folder(folder):
                (symlinked_folders if is_symlink else folders).append(path)

    def _search_folder(self, folder: str) -> list[tuple[str, bool]]:
        """Record the files in ``folder``; return its subfolders as (path, is_symlink)."""
        subfolders: list[tuple[str, bool]] = []
        try:
            identity = os.stat(folder)
            if (identity.st_dev, identity.st_ino) in self._searched:
                return subfolders
            self._searched.add((identity.st_dev, identity.st_ino))
            with os.scandir(folder) as entries:
                for entry in entries:
                    if not entry.name.startswith("."):
                        self._add_entry(entry, subfolders)
        except OSError as error:
            self.errors.append((Path(folder), _read_error_reason(error)))
        return subfolders

    def _add_entry(self, entry: os.DirEntry[str], subfolders: list[tuple[str, bool]]) -> None:
        try:
            if entry.is_dir():
                if self.recursive:
                    subfolders.append((entry.path, entry.is_symlink()))
            elif entry.is_file():
                extension = os.path.splitext(entry.name)[1].lower()
                (self.files if extension in IMAGE_EXTENSIONS else self.skipped).add(entry.path)
            # Anything else (broken symlink, socket, FIFO) holds no image to index.
        except OSError as error:  # e.g. a symlink whose target we may not stat
            self.errors.append((Path(entry.path), _read_error_reason(error)))


def _read_error_reason(error: OSError) -> str:
    if isinstance(error, PermissionError):
        return "permission denied"
    return f"cannot read: {error.strerror or error}"


def _sorted_paths(paths: set[str]) -> list[Path]:
    # Order by path components, as Path ordering does, so a folder's files stay together
    # ("a/x.jpg" before "a-b.jpg"). Mapping the separator to NUL, which no file name can
    # contain, gives that order from a plain string sort, much faster than comparing Paths.
    return [Path(path) for path in sorted(paths, key=lambda path: path.replace(os.sep, "\0"))]
