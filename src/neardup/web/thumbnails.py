"""JPEG thumbnails of indexed images, made with the safe loader and cached on disk by id and content."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import BinaryIO

from PIL import Image

from ..errors import ImageError
from ..files import FileCheckError, read_checked, read_verified
from ..images import load_image
from ..store import Record

THUMB_SIZE = 256
JPEG_QUALITY = 82


def thumbnail_jpeg(source: str | os.PathLike | bytes, size: int = THUMB_SIZE) -> bytes:
    """A JPEG no larger than size x size of an image given as bytes or as a path. A path is read through
    files.open_regular, so a FIFO or a symlink at it is refused instead of blocking or being followed.
    Raises ImageError."""
    if not isinstance(source, bytes):
        try:
            source = read_checked(source)
        except FileCheckError as exc:
            raise ImageError(str(exc)) from None
    # JPEG draft decoding at the smallest scale that keeps `size` pixels makes big photos cheap
    image = load_image(source, min_side=size).image
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return out.getvalue()


class ThumbnailCache:
    """Thumbnails under `folder` as <id>/<sha256 prefix>-<size>.jpg: a re-indexed (changed) file gets a
    new name, so a cached thumbnail never shows stale content, and the old one is deleted. One folder per
    id keeps a miss O(1): only that image's own folder is listed, never the whole cache (a first browse
    of N images would otherwise list the whole, growing cache N times). A folder that cannot be written
    (a read-only index) just means thumbnails are made again on each request."""

    def __init__(self, folder: str | os.PathLike, size: int = THUMB_SIZE):
        self.folder = Path(folder)
        self.size = size

    def get(self, record: Record, stream: BinaryIO) -> bytes:
        """The thumbnail of `record`, whose file the caller opened with files.open_regular and checked
        against the record's size and mtime. On a miss the image is decoded from `stream`'s bytes, and
        only when they have the catalogued sha256 (a file swapped for another of the same size and mtime
        is refused), so the cache only ever holds thumbnails of indexed content.

        Raises:
            FileCheckError: the content is not the one indexed. ImageError: it cannot be decoded.
        """
        own = self.folder / str(record.id)
        cached = own / f"{(record.sha256 or 'unhashed')[:16]}-{self.size}.jpg"
        try:
            return cached.read_bytes()
        except OSError:
            pass
        content = read_verified(stream, size=record.size, sha256=record.sha256)
        data = thumbnail_jpeg(content, self.size)
        try:
            own.mkdir(parents=True, exist_ok=True)
            # unique temp name + atomic rename: concurrent requests for one thumbnail never see half a file
            tmp = cached.with_name(f".tmp-{uuid.uuid4().hex}-{cached.name}")
            tmp.write_bytes(data)
            os.replace(tmp, cached)
            for stale in own.glob(f"*-{self.size}.jpg"):  # of the file's earlier content
                if stale != cached and not stale.name.startswith(".tmp-"):  # another request's, in flight
                    stale.unlink(missing_ok=True)
        except OSError:
            pass
        return data
