"""The photos variant of the scale benchmark (benchmarks/photos_variant.py): deterministic, unit rows,
planted copies where bench_scale puts them, and real photos' neighbourhood figures at n = 2,000."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import photos_variant as pv  # noqa: E402

# Measured on the descriptors of 2,059 real photos (benchmarks/photo_neighbourhoods.py); the figures and
# the tolerances (the spread of the generator over seeds at this n) are in benchmarks/PHOTOS_VARIANT.md.
REAL_SHARE_ABOVE_04 = 0.00471
REAL_B_MEDIAN = 0.247
SHARE_FACTOR = 2.0  # generator's share of pairs > 0.4 within [real / 2, real * 2]
B_MEDIAN_TOL = 0.04  # generator's median b within real +- 0.04


def test_deterministic_per_seed_and_chunking():
    a = pv.photos_vectors(3000, seed=5, planted=50)
    b = pv.photos_vectors(3000, seed=5, planted=50)
    assert a.dtype == np.float32 and a.shape == (3000, pv.DIM)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, pv.photos_vectors(3000, seed=6, planted=50))
    # chunk by chunk gives rows in order, the same as at once when the chunk size is the same
    gen = pv.PhotosVariant(5, 3000, 50)
    starts = [start for start, _ in gen.chunks(1000)]
    assert starts == [0, 1000, 2000]


def test_unit_rows_and_planted_copies():
    gen = pv.PhotosVariant(seed=2, n=2000, planted=100)
    vectors = np.concatenate([v for _, v in gen.chunks(1000)])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(gen.originals, np.arange(100))
    assert gen.copies.shape == (100, 2)
    for c in range(2):
        cos = np.sum(vectors[gen.originals] * vectors[gen.copies[:, c]], axis=1)
        assert cos.min() >= 0.8 - 1e-4 and cos.max() <= 0.99 + 1e-4
    a, b = gen.planted_pairs()
    assert len(a) == len(b) == 300
    assert "Pitman-Yor" in gen.describe()


def test_matches_real_photos_at_2000():
    vectors = pv.photos_vectors(2000, seed=1)
    g = pv.gram(vectors)
    share = float(np.mean(g[np.triu_indices(len(g), 1)] > 0.4))
    assert REAL_SHARE_ABOVE_04 / SHARE_FACTOR <= share <= REAL_SHARE_ABOVE_04 * SHARE_FACTOR, share
    assert abs(float(np.median(pv.b_values(g))) - REAL_B_MEDIAN) <= B_MEDIAN_TOL
