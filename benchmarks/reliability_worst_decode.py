"""The slowest files the image loader accepts: one per format, as large as the pixel limit allows, made of
flat (maximally compressible) pixels so the file itself is small. Prints how long load_image takes on each.

    .venv/bin/python benchmarks/reliability_worst_decode.py

This is the per-file time bound neardup relies on (docs/RELIABILITY.md): decoding work is bounded by
images.DEFAULT_MAX_PIXELS, checked from the header before any pixel is decoded.
"""

from __future__ import annotations

import io
import math
import time
import warnings

from PIL import Image

from neardup.images import DEFAULT_MAX_PIXELS, ImageError, load_image

warnings.simplefilter("ignore", Image.DecompressionBombWarning)


def build(fmt: str, mode: str, side: int, **options) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (side, side)).save(buffer, fmt, **options)
    return buffer.getvalue()


def main() -> None:
    side = math.isqrt(DEFAULT_MAX_PIXELS)
    cases = [
        ("PNG", "RGBA", side, {}),
        ("PNG", "RGB", side, {}),
        ("TIFF", "RGB", side, {"compression": "tiff_deflate"}),
        ("GIF", "P", side, {}),
        ("BMP", "RGB", side, {}),
        ("JPEG", "RGB", side, {"progressive": True}),
        ("WEBP", "RGB", 16383, {}),  # WebP's own maximum side; above the pixel limit: refused from the header
    ]
    print(f"pixel limit {DEFAULT_MAX_PIXELS:,} ({side}x{side})")
    print("| format | mode | size | file MB | load s | result |")
    print("|---|---|---|---|---|---|")
    for fmt, mode, s, options in cases:
        data = build(fmt, mode, s, **options)
        started = time.perf_counter()
        try:
            decoded = load_image(data, min_side=224)
            result = f"decoded {decoded.width}x{decoded.height}"
        except ImageError as exc:
            result = exc.reason
        elapsed = time.perf_counter() - started
        print(f"| {fmt} | {mode} | {s}x{s} | {len(data) / 1e6:.1f} | {elapsed:.2f} | {result} |", flush=True)


if __name__ == "__main__":
    main()
