"""JPEG thumbnails of indexed images, made with the safe loader and cached on disk by id and content."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

from PIL import Image

from ..images import load_image
from ..store import Record

THUMB_SIZE = 256
JPEG_QUALITY = 82


def thumbnail_jpeg(path: str | os.PathLike, size: int = THUMB_SIZE) -> bytes:
    """A JPEG no larger than size x size of the image at `path`. Raises ImageError."""
    # JPEG draft decoding at the smallest scale that keeps `size` pixels makes big photos cheap
    image = load_image(path, min_side=size).image
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

    def get(self, record: Record) -> bytes:
        own = self.folder / str(record.id)
        cached = own / f"{(record.sha256 or 'unhashed')[:16]}-{self.size}.jpg"
        try:
            return cached.read_bytes()
        except OSError:
            pass
        data = thumbnail_jpeg(record.path, self.size)
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
