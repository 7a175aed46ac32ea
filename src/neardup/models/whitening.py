"""Learned whitening of global descriptors, fitted from (photo, edited copy) pairs. Pure numpy.

Radenović, Tolias & Chum, "CNN image retrieval learns from BoW" (ECCV 2016), section 4 ("learned
whitening"): whiten by the covariance of the differences between matching descriptors, C_S, so the
directions edits move a descriptor along are shrunk, then rotate by the principal directions of the
photos themselves in that space and keep the `dim` strongest, where different photos differ most.
The shipped fit (default_model.WHITENING_FILE) is made by benchmarks/fit_whitening.py.
"""

from __future__ import annotations

import numpy as np


def fit(originals: np.ndarray, copies: np.ndarray, copy_of: np.ndarray, dim: int,
        shrinkage: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(mean [d], projection [dim, d]) from unit descriptors of photos [m, d] and of their edited copies
    [n, d], copy i being a copy of photo copy_of[i].

    `shrinkage` in [0, 1) pulls C_S towards a multiple of the identity before it is inverted
    ((1 - s) C_S + s * trace(C_S) / d * I): directions no training edit moved along are not blown up,
    so an edit the training did not show still scores as it did before whitening."""
    originals = np.asarray(originals, dtype=np.float64)
    copies = np.asarray(copies, dtype=np.float64)
    copy_of = np.asarray(copy_of)
    d = originals.shape[1]
    if copies.shape[1] != d or len(copy_of) != len(copies):
        raise ValueError("copies must have the photos' dimension and one copy_of entry each")
    if not 0 < dim <= d:
        raise ValueError(f"dim must be in 1..{d}, got {dim}")
    if not 0 <= shrinkage < 1:
        raise ValueError(f"shrinkage must be in [0, 1), got {shrinkage}")
    mean = np.concatenate([originals, copies]).mean(axis=0)
    differences = copies - originals[copy_of]
    matching = differences.T @ differences / len(differences)
    matching = (1 - shrinkage) * matching + shrinkage * np.trace(matching) / d * np.eye(d)
    values, vectors = np.linalg.eigh(matching)
    whiten = (vectors / np.sqrt(np.maximum(values, 1e-12 * values.max()))) @ vectors.T
    photos = (originals - mean) @ whiten.T
    _, directions = np.linalg.eigh(photos.T @ photos / len(photos))
    projection = directions[:, ::-1][:, :dim].T @ whiten
    return mean.astype(np.float32), projection.astype(np.float32)


def apply(vectors: np.ndarray, mean: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """Whitened unit descriptors [n, dim] of unit descriptors [n, d]."""
    out = (np.asarray(vectors, dtype=np.float32) - mean) @ projection.T
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)
