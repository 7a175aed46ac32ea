"""Image embedders: the protocol the rest of neardup codes against, and the default model."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from PIL import Image


class Embedder(Protocol):
    name: str
    dim: int
    input_size: int
    # JSON-serialisable {"name", "weights_sha256", "preprocessing", "dim"}; an index stores it
    # and refuses to be opened by an embedder whose identity differs.
    identity: dict

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image of any size -> float32 [3, input_size, input_size]. Pure and
        thread-safe, so it can run in decoding workers."""

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """float32 [n, 3, input_size, input_size] -> float32 [n, dim] with unit rows;
        n may be 0, giving shape (0, dim)."""


def default_embedder(threads: int | None = None) -> Embedder:
    """The EfficientNet-Lite0 torch embedder, loaded once per process.

    ``threads`` sets torch's intra-op thread count, which is process-wide, so it applies
    even when the embedder is already loaded.
    """
    # torch is imported lazily so that code needing only the protocol starts fast.
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    return _shared_torch_embedder()


@functools.cache
def _shared_torch_embedder() -> Embedder:
    from neardup.models.efficientnet_lite0 import TorchEmbedder

    return TorchEmbedder()


__all__ = ["Embedder", "default_embedder"]
