"""The numeric core: hashing, bucket tables, candidate pairs and recall against the exact oracle."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from neardup import lsh


def unit_rows(rng, n, dim):
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def naive_codes(vectors, planes, num_tables, center=None):
    """The definition, one bit at a time: bit b of table t is sign(<v - c, plane[t*bits + b]>) > 0."""
    bits = planes.shape[0] // num_tables
    out = np.zeros((len(vectors), num_tables), dtype=np.uint64)
    for i, v in enumerate(vectors):
        v = v if center is None else v - center
        for t in range(num_tables):
            for b in range(bits):
                if float(np.dot(v, planes[t * bits + b])) > 0:
                    out[i, t] |= np.uint64(1) << np.uint64(b)
    return out


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 12),
    dim=st.integers(1, 24),
    num_tables=st.integers(1, 4),
    bits=st.integers(1, 32),
    seed=st.integers(0, 2**32 - 1),
    centred=st.booleans(),
)
def test_hash_equals_naive_definition(n, dim, num_tables, bits, seed, centred):
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    planes = lsh.make_planes(dim, num_tables, bits, seed)
    center = rng.standard_normal(dim).astype(np.float32) if centred else None
    codes = lsh.hash_vectors(vectors, planes, num_tables, center)
    assert codes.dtype == np.uint32 and codes.shape == (n, num_tables)
    # float32 matmul and per-element dot can disagree on the sign of a projection within rounding:
    # compare only where the projection is clearly away from zero.
    shifted = vectors if center is None else vectors - center
    projections = (shifted @ planes.T).reshape(n, num_tables, bits)
    clear = np.abs(projections) > 1e-4
    naive = naive_codes(vectors, planes, num_tables, center)
    for i, t in itertools.product(range(n), range(num_tables)):
        for b in range(bits):
            if clear[i, t, b]:
                assert (int(codes[i, t]) >> b) & 1 == (int(naive[i, t]) >> b) & 1


@given(st.integers(1, 16), st.integers(0, 3))
def test_probe_masks_are_every_pattern_within_the_radius(k, radius):
    masks = lsh.probe_masks(k, radius).tolist()
    assert masks[0] == 0 and len(set(masks)) == len(masks)
    assert set(masks) == {m for m in range(1 << k) if bin(m).count("1") <= radius}


@given(arrays(np.float32, st.integers(1, 50), elements=st.floats(-1, 1, width=32)), st.integers(1, 60))
def test_top_k_is_sorted_and_exact(scores, k):
    picked = lsh.top_k(scores, k)
    assert len(picked) == min(k, len(scores))
    assert np.all(np.diff(scores[picked]) <= 0)
    if len(picked) < len(scores):
        assert scores[picked].min() >= np.delete(scores, picked).max()


def test_collision_probability_matches_simulation():
    rng = np.random.default_rng(1)
    dim, k, tables = 64, 6, 8
    base = unit_rows(rng, 1, dim)[0]
    noise = unit_rows(rng, 1, dim)[0]
    noise -= noise.dot(base) * base
    noise /= np.linalg.norm(noise)
    cosine = 0.8
    other = cosine * base + np.sqrt(1 - cosine**2) * noise
    hits = 0
    trials = 400
    for seed in range(trials):
        planes = lsh.make_planes(dim, tables, k, seed)
        codes = lsh.hash_vectors(np.stack([base, other]), planes, tables)
        hits += bool(np.any(codes[0] == codes[1]))
    predicted = lsh.collision_probability(cosine, k, tables)
    assert abs(hits / trials - predicted) < 0.07


def clustered(rng, centres, per_cluster, dim, spread):
    """Unit vectors around `centres` random unit centres, each copy at cosine ~ 1/sqrt(1+spread^2)."""
    heads = unit_rows(rng, centres, dim)
    copies = heads[:, None, :] + spread * rng.standard_normal((centres, per_cluster, dim)).astype(np.float32) / np.sqrt(dim)
    copies = copies.reshape(-1, dim)
    return np.r_[heads, copies / np.linalg.norm(copies, axis=1, keepdims=True)].astype(np.float32)


def test_lsh_recall_against_exact_oracle_on_clusters():
    rng = np.random.default_rng(7)
    dim, centres, per_cluster = 128, 300, 3
    vectors = clustered(rng, centres, per_cluster, dim, spread=0.45)  # copies at cosine ~0.91
    planes = lsh.make_planes(dim, 16, 32, seed=3)
    codes = lsh.hash_vectors(vectors, planes, 16)
    n = len(vectors)
    tables = lsh.LSHTables(codes, k=16)
    found = total = 0
    for q in range(0, n, 3):
        exact_rows, exact_scores = lsh.exact_search(vectors, vectors[q], 4)
        candidates = tables.candidates(codes[q])
        scores = vectors[candidates] @ vectors[q]
        lsh_rows = candidates[lsh.top_k(scores, 4)]
        relevant = set(exact_rows[exact_scores > 0.8].tolist())
        found += len(relevant & set(lsh_rows.tolist()))
        total += len(relevant)
        assert len(candidates) < n / 10, "LSH must not degenerate into a full scan"
    assert total > 0 and found / total >= 0.99


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([1, 7, 8, 13, 18, 20, 32]))
def test_a_query_keys_and_words_from_its_signs_equal_those_of_its_stored_codes(seed, k):
    """The query path reads a vector's table keys and bit string from its projections' signs; they must
    be the keys and words its stored codes give (range_keys, code_words)."""
    rng = np.random.default_rng(seed)
    planes = lsh.make_planes(24, 16, 32, seed)
    projections = lsh.project(rng.standard_normal((1, 24)).astype(np.float32), planes)
    codes = lsh.hash_vectors(np.zeros((1, 24), np.float32), planes, 16, projections=projections)
    np.testing.assert_array_equal(lsh.table_keys(projections[0] > 0, k), lsh.range_keys(codes, k)[0])
    np.testing.assert_array_equal(lsh.sign_words(projections[0] > 0), lsh.code_words(codes)[0])


def test_as_float32_keeps_subnormal_halves_where_the_thread_flushes_subnormal_floats(monkeypatch):
    """With FTZ/DAZ set on the thread (torch.set_flush_denormal, as some runtimes do), the bit path's
    scaling would read the subnormal halves as zero; they must still convert as numpy's cast does."""
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(lsh, "_half_by_bits", lambda: True)
    halves = np.array([3e-6, -3e-6, 1e-7, 6e-8, 0.5, -0.25], np.float16)
    assert (np.abs(halves[:4]) < np.finfo(np.float16).tiny).all()  # subnormal halves
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        converted = lsh.as_float32(halves)
    finally:
        torch.set_flush_denormal(False)
    assert np.array_equal(converted.view(np.uint32), halves.astype(np.float32).view(np.uint32))


def test_as_float32_gives_numpys_floats_bit_for_bit_by_either_path(monkeypatch):
    every_half = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    expected = every_half.astype(np.float32).view(np.uint32)
    finite = np.isfinite(every_half)
    for by_bits in (True, False):  # whichever is faster on this CPU (timed once per process)
        monkeypatch.setattr(lsh, "_half_by_bits", lambda: by_bits)
        assert np.array_equal(lsh.as_float32(every_half).view(np.uint32), expected)  # NaN, infinity: numpy's
        assert np.array_equal(lsh.as_float32(every_half[finite]).view(np.uint32), expected[finite])
        rows = every_half[:4096].reshape(8, 512)[:, ::2]  # a strided view converts as well
        assert np.array_equal(lsh.as_float32(rows), rows.astype(np.float32))
        assert lsh.as_float32(np.ones(3, np.float64)).dtype == np.float32
        small = every_half[finite & (np.abs(every_half) < 1)][:768 * 4].reshape(4, 768)
        query = lsh.normalise_rows(small[:1])[0]
        assert np.array_equal(lsh.cosines(small, query), small.astype(np.float32) @ query / lsh._norms(small.astype(np.float32)))
