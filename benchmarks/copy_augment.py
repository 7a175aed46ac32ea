"""Training augmentations for the copy-detection descriptor (benchmarks/train_copy_descriptor.py).

Written apart from the evaluation set's edit generator (src/neardup/benchmark_set.py) and from the
whitening fit's edits (benchmarks/fit_whitening.py): its own code, its own ranges and its own random
draws (numpy Generators seeded by (seed, epoch, photo, view), never Python's `random`), so training
does not learn the benchmark's exact parameter draws.

    from copy_augment import augmented_view, view_rng
    image = augmented_view(photo, view_rng(seed, epoch, photo_index, view_index))

One view is a chain drawn independently per stage (SSCD-style "strong" augmentation, widened to the
copies neardup must find):

* geometry: crop down to 30 % of the area (aspect 3/5..5/3; the trainer's --min-crop-area changes the 30 %);
  rotation up to +-30 degrees, with black corners, with coloured corners, or cropped inside (no corners);
  perspective; horizontal (and rarely vertical) flip; aspect squash 0.6..1.65;
* colour: brightness / contrast / saturation / hue jitter, greyscale, Gaussian blur, sensor noise;
* overlays: text (random words, DejaVu/Liberation fonts or Pillow's default), emoji (drawn smileys and
  symbol glyphs), logos (a badge with letters, semi-transparent);
* frames: uniform borders, letterbox/pillarbox padding to another aspect, noisy or gradient frames;
* last: thumbnail with long side 64..160 px and/or JPEG at quality 10..90.

Every function takes (PIL RGB image, numpy Generator) and returns a new RGB image of at least 8x8 px.
"""

from __future__ import annotations

import functools
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

#: Probability of each stage being applied to one view.
PROBABILITIES = {
    "crop": 0.85, "rotate": 0.3, "perspective": 0.15, "hflip": 0.5, "vflip": 0.03, "squash": 0.2,
    "jitter": 0.7, "grey": 0.12, "blur": 0.2, "noise": 0.1,
    "text": 0.2, "emoji": 0.1, "logo": 0.12,
    "frame": 0.2, "thumbnail": 0.2, "jpeg": 0.45,
}
MIN_AREA = 0.30
MAX_DEGREES = 30.0
THUMB_SIDES = (64, 160)
JPEG_QUALITIES = (10, 90)
_FONT_FILES = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",
               "/usr/share/fonts/truetype/dejavu/DejaVuSerif.ttf", "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
               "/usr/share/fonts/truetype/liberation/LiberationSans-Bold.ttf")
_WORDS = ("sale", "holiday", "2019", "copyright", "lol", "best day ever", "summer", "follow me", "photo by", "news",
          "WOW", "#travel", "do not copy", "sample", "memories", "family", "breaking", "via", "OMG", "look at this",
          "original?", "share", "Montag", "vacances", "meme", "the end", "@user123", "DRAFT")
_SYMBOLS = "\u2605\u2665\u263a\u2600\u266b\u2708\u2602\u263c\u2622\u270c\u2764\u2714\u260e\u2691"


def view_rng(seed: int, epoch: int, photo: int, view: int) -> np.random.Generator:
    """The Generator of one training view: fresh per epoch, independent of the order views are made in."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, photo, view, 0xC0B1]))


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


@functools.cache
def _font_files() -> tuple[str, ...]:
    return tuple(f for f in _FONT_FILES if Path(f).is_file())


def _font(rng: np.random.Generator, size: int) -> ImageFont.ImageFont:
    files = _font_files()
    if files:
        return ImageFont.truetype(files[int(rng.integers(len(files)))], size)
    return ImageFont.load_default(size)


# ---- geometry ------------------------------------------------------------------------------------

def crop(img: Image.Image, rng: np.random.Generator, min_area: float = MIN_AREA) -> Image.Image:
    """A crop keeping min_area..1 of the area (uniform), its aspect 3/5..5/3 times the photo's."""
    w, h = img.size
    for _ in range(10):
        area = rng.uniform(min_area, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 5), math.log(5 / 3)))
        cw, ch = round(w * math.sqrt(area * ratio)), round(h * math.sqrt(area / ratio))
        if 8 <= cw <= w and 8 <= ch <= h:
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            return img.crop((x, y, x + cw, y + ch))
    side = math.sqrt(rng.uniform(min_area, 1.0))
    cw, ch = max(8, round(w * side)), max(8, round(h * side))
    return img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))


def rotate(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Up to +-MAX_DEGREES: black corners (canvas grown or kept), coloured corners, or cropped inside."""
    degrees = float(rng.uniform(-MAX_DEGREES, MAX_DEGREES))
    mode = int(rng.integers(4))
    if mode == 0:
        return img.rotate(degrees, Image.Resampling.BILINEAR, expand=True, fillcolor=(0, 0, 0))
    if mode == 1:
        return img.rotate(degrees, Image.Resampling.BICUBIC, expand=False, fillcolor=(0, 0, 0))
    if mode == 2:
        return img.rotate(degrees, Image.Resampling.BILINEAR, expand=bool(rng.integers(2)), fillcolor=_colour(rng))
    # the largest axis-aligned rectangle inside the rotated photo: no corners at all
    w, h = img.size
    turned = img.rotate(degrees, Image.Resampling.BICUBIC, expand=True)
    a = math.radians(abs(degrees))
    sin, cos = math.sin(a), math.cos(a)
    long_side, short_side = max(w, h), min(w, h)
    if short_side <= 2 * sin * cos * long_side or abs(sin - cos) < 1e-9:
        x = 0.5 * short_side
        cw, ch = (x / sin, x / cos) if w >= h else (x / cos, x / sin)
    else:
        cos2 = cos * cos - sin * sin
        cw, ch = (w * cos - h * sin) / cos2, (h * cos - w * sin) / cos2
    tw, th = turned.size
    cw, ch = max(8, int(cw)), max(8, int(ch))
    return turned.crop(((tw - cw) // 2, (th - ch) // 2, (tw - cw) // 2 + cw, (th - ch) // 2 + ch))


def _perspective_coefficients(source: list[tuple[float, float]], target: list[tuple[float, float]]) -> list[float]:
    rows = []
    for (x, y), (u, v) in zip(target, source):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
    solution = np.linalg.solve(np.array(rows, dtype=np.float64), np.array(source, dtype=np.float64).ravel())
    return solution.tolist()


def perspective(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Each corner moved inwards by up to 20 % of the side (a photo of a photo, a tilted screen)."""
    w, h = img.size
    strength = rng.uniform(0.05, 0.2)
    corners = [(0, 0), (w, 0), (w, h), (0, h)]
    signs = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
    moved = [(x + sx * rng.uniform(0, strength) * w, y + sy * rng.uniform(0, strength) * h)
             for (x, y), (sx, sy) in zip(corners, signs)]
    fill = (0, 0, 0) if rng.random() < 0.6 else _colour(rng)
    coefficients = _perspective_coefficients(corners, moved)
    return img.transform((w, h), Image.Transform.PERSPECTIVE, coefficients, Image.Resampling.BILINEAR, fillcolor=fill)


def hflip(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def vflip(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)


def squash(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Width or height scaled by 0.6..1.65 (the other kept)."""
    w, h = img.size
    factor = math.exp(rng.uniform(math.log(0.6), math.log(1.65)))
    size = (max(8, round(w * factor)), h) if rng.random() < 0.5 else (w, max(8, round(h * factor)))
    return img.resize(size, Image.Resampling.BILINEAR)


# ---- colour --------------------------------------------------------------------------------------

def jitter(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast, saturation and hue, each drawn, applied in a drawn order."""
    steps = [lambda i: ImageEnhance.Brightness(i).enhance(rng.uniform(0.55, 1.5)),
             lambda i: ImageEnhance.Contrast(i).enhance(rng.uniform(0.55, 1.5)),
             lambda i: ImageEnhance.Color(i).enhance(rng.uniform(0.3, 1.8))]
    if rng.random() < 0.5:
        shift = int(rng.integers(-25, 26))  # of 256: up to ~35 degrees of hue

        def hue(i: Image.Image) -> Image.Image:
            hsv = np.asarray(i.convert("HSV")).copy()
            hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 256
            return Image.fromarray(hsv, "HSV").convert("RGB")
        steps.append(hue)
    for index in rng.permutation(len(steps)):
        img = steps[index](img)
    return img


def grey(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.grayscale(img).convert("RGB")


def blur(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    return img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 3.0)) * max(img.size) / 512))


def noise(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(img, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, rng.uniform(3, 15), pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


# ---- overlays ------------------------------------------------------------------------------------

def text(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One to three lines of words, optionally outlined, anywhere on the picture."""
    out = img.copy()
    w, h = out.size
    draw = ImageDraw.Draw(out)
    for _ in range(int(rng.integers(1, 4))):
        size = max(8, int(h * rng.uniform(0.04, 0.16)))
        words = " ".join(_WORDS[int(i)] for i in rng.integers(0, len(_WORDS), int(rng.integers(1, 4))))
        position = (int(rng.integers(0, max(1, w - size))), int(rng.integers(0, max(1, h - size))))
        stroke = int(rng.integers(0, 3)) * max(1, size // 16)
        draw.text(position, words, fill=_colour(rng), font=_font(rng, size), stroke_width=stroke,
                  stroke_fill=_colour(rng))
    return out


def emoji(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One to four stickers: drawn smiley faces or symbol glyphs (stars, hearts, suns...)."""
    out = img.convert("RGBA")
    w, h = out.size
    layer = Image.new("RGBA", out.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(1, 5))):
        d = max(8, int(min(w, h) * rng.uniform(0.08, 0.3)))
        x, y = int(rng.integers(0, max(1, w - d))), int(rng.integers(0, max(1, h - d)))
        if rng.random() < 0.5:
            face = (255, int(rng.integers(180, 230)), 0, 255)
            draw.ellipse((x, y, x + d, y + d), fill=face, outline=(60, 40, 0, 255), width=max(1, d // 20))
            e = max(1, d // 9)
            for ex in (x + d * 0.33, x + d * 0.67):
                draw.ellipse((ex - e, y + d * 0.35 - e, ex + e, y + d * 0.35 + e), fill=(40, 25, 0, 255))
            draw.arc((x + d * 0.25, y + d * 0.3, x + d * 0.75, y + d * 0.78), 20, 160, fill=(40, 25, 0, 255),
                     width=max(1, d // 14))
        else:
            glyph = _SYMBOLS[int(rng.integers(len(_SYMBOLS)))]
            draw.text((x, y), glyph, fill=_colour(rng) + (255,), font=_font(rng, d))
    return Image.alpha_composite(out, layer).convert("RGB")


def logo(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A badge (rectangle, rounded or round) with two to four letters, 40..100 % opaque, near a corner."""
    out = img.convert("RGBA")
    w, h = out.size
    bw = max(12, int(w * rng.uniform(0.1, 0.3)))
    bh = max(8, int(bw * rng.uniform(0.35, 1.0)))
    badge = Image.new("RGBA", (bw, bh), (0, 0, 0, 0))
    draw = ImageDraw.Draw(badge)
    alpha = int(rng.integers(100, 256))
    shape = int(rng.integers(3))
    if shape == 0:
        draw.rectangle((0, 0, bw - 1, bh - 1), fill=_colour(rng) + (alpha,))
    elif shape == 1:
        draw.rounded_rectangle((0, 0, bw - 1, bh - 1), radius=bh // 3, fill=_colour(rng) + (alpha,))
    else:
        draw.ellipse((0, 0, bw - 1, bh - 1), fill=_colour(rng) + (alpha,))
    letters = "".join(chr(65 + int(i)) for i in rng.integers(0, 26, int(rng.integers(2, 5))))
    draw.text((bw * 0.12, bh * 0.15), letters, fill=_colour(rng) + (alpha,), font=_font(rng, max(6, int(bh * 0.6))))
    margin_x, margin_y = int(w * rng.uniform(0, 0.06)), int(h * rng.uniform(0, 0.06))
    corner = int(rng.integers(5))
    if corner == 4:  # anywhere
        x, y = int(rng.integers(0, max(1, w - bw))), int(rng.integers(0, max(1, h - bh)))
    else:
        x = margin_x if corner in (0, 3) else max(0, w - bw - margin_x)
        y = margin_y if corner in (0, 1) else max(0, h - bh - margin_y)
    out.alpha_composite(badge, (x, y))
    return out.convert("RGB")


# ---- frames --------------------------------------------------------------------------------------

def frame(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A uniform border, letterbox/pillarbox padding to another aspect, or a frame neardup cannot trim
    (noise or a gradient)."""
    w, h = img.size
    kind = int(rng.integers(4))
    colour = (0, 0, 0) if rng.random() < 0.3 else (255, 255, 255) if rng.random() < 0.3 else _colour(rng)
    if kind == 0:
        sides = [int(max(w, h) * rng.uniform(0.02, 0.2)) for _ in range(4)]
        if rng.random() < 0.5:
            sides = [sides[0]] * 4
        return ImageOps.expand(img, border=tuple(sides), fill=colour)
    if kind == 1:  # pad to a drawn aspect, picture centred or off-centre
        target = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
        nw, nh = (max(w, round(h * target)), h) if target > w / h else (w, max(h, round(w / target)))
        canvas = Image.new("RGB", (nw, nh), colour)
        canvas.paste(img, (int(rng.integers(0, nw - w + 1)), int(rng.integers(0, nh - h + 1))))
        return canvas
    pad = max(2, int(max(w, h) * rng.uniform(0.03, 0.15)))
    nw, nh = w + 2 * pad, h + 2 * pad
    if kind == 2:
        base = np.asarray(Image.new("RGB", (1, 1), colour), dtype=np.float32)
        field = base + rng.normal(0, rng.uniform(10, 50), (nh, nw, 3))
    else:
        start, end = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
        t = np.linspace(0, 1, nh if rng.random() < 0.5 else nw, dtype=np.float32)
        line = start + (end - start) * t[:, None]
        field = np.broadcast_to(line[:, None, :], (nh, nw, 3)) if len(t) == nh else np.broadcast_to(line[None], (nh, nw, 3))
    canvas = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    canvas.paste(img, (pad, pad))
    return canvas


# ---- last: what sharing does ---------------------------------------------------------------------

def thumbnail(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    side = int(rng.integers(THUMB_SIDES[0], THUMB_SIDES[1] + 1))
    out = img.copy()
    filters = (Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC, Image.Resampling.LANCZOS)
    out.thumbnail((side, side), filters[int(rng.integers(len(filters)))])
    if min(out.size) < 8:
        out = out.resize((max(8, out.width), max(8, out.height)))
    return out


def jpeg(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=int(rng.integers(JPEG_QUALITIES[0], JPEG_QUALITIES[1] + 1)),
             subsampling=int(rng.choice([0, 2])))
    with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
        return decoded.convert("RGB")


#: (name, function) in the order a view applies them.
STAGES = (("crop", crop), ("rotate", rotate), ("perspective", perspective), ("hflip", hflip), ("vflip", vflip),
          ("squash", squash), ("jitter", jitter), ("grey", grey), ("blur", blur), ("noise", noise),
          ("text", text), ("emoji", emoji), ("logo", logo), ("frame", frame), ("thumbnail", thumbnail),
          ("jpeg", jpeg))


def augmented_view(photo: Image.Image, rng: np.random.Generator, probabilities: dict | None = None,
                   min_crop_area: float = MIN_AREA) -> Image.Image:
    """One augmented copy of `photo` (RGB): each stage applied with its probability, in STAGES order.
    The draws are made for every stage whether or not it applies, so one stage's parameters do not
    depend on another's being drawn."""
    probabilities = probabilities or PROBABILITIES
    functions = dict(STAGES, crop=functools.partial(crop, min_area=min_crop_area))
    img = photo if photo.mode == "RGB" else photo.convert("RGB")
    for name, _ in STAGES:
        stage_rng = np.random.default_rng(rng.integers(1 << 62))
        if rng.random() < probabilities.get(name, 0.0):
            img = functions[name](img, stage_rng)
    return img


def applied_stages(rng: np.random.Generator, probabilities: dict | None = None) -> list[str]:
    """The stage names augmented_view would apply for a Generator in this state (it advances it the same way)."""
    probabilities = probabilities or PROBABILITIES
    out = []
    for name, _ in STAGES:
        rng.integers(1 << 62)
        if rng.random() < probabilities.get(name, 0.0):
            out.append(name)
    return out
