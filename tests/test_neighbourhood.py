"""Collection-aware `dups` scores (neardup.neighbourhood, issue 12)."""

import os

import numpy as np
import pytest

from neardup import calibration, neighbourhood
from neardup.index import DEFAULT_THRESHOLD, Index

from conftest import PEER_DATA, needs_peer_data


def unit_rows(n, dim, seed):
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_kth_exact_is_the_kth_largest_cosine_to_another_row():
    v = unit_rows(300, 16, 0)
    sims = v @ v.T
    np.fill_diagonal(sims, -np.inf)
    expected = np.sort(sims, axis=1)[:, -neighbourhood.K]
    assert np.allclose(neighbourhood.kth_exact(v, block=64), expected, atol=1e-6)


def test_no_pair_under_the_join_cosine_reaches_the_threshold():
    v = unit_rows(200, 8, 1)
    b = neighbourhood.backgrounds(neighbourhood.kth_exact(v))
    sims = v @ v.T
    a, c = np.triu_indices(len(v), 1)
    threshold = 0.6
    scores = neighbourhood.normalised(sims[a, c], b[a], b[c])
    below = sims[a, c] < neighbourhood.join_threshold(threshold)
    assert below.any() and not (scores[below] >= threshold).any()


def test_kth_exact_of_some_rows_equals_those_rows_of_the_full_scan():
    v = unit_rows(300, 16, 2)
    rows = np.array([299, 0, 17, 150])
    assert np.allclose(neighbourhood.kth_exact(v, rows=rows, block=3), neighbourhood.kth_exact(v)[rows])


def test_dups_with_backgrounds_of_paired_files_only_equals_the_brute_force_oracle(full_index):
    """duplicates() computes b only for files in candidate pairs; the groups must be those of scoring every
    pair of the collection with every file's b (the brute-force oracle), by the exact and the LSH path."""
    from neardup.groups import group_pairs

    snap = full_index.snapshot()
    assert neighbourhood.applies(len(snap))
    v = snap.vectors().astype(np.float64)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    b = neighbourhood.backgrounds(neighbourhood.kth_exact(v))
    a, c = np.triu_indices(len(v), 1)
    cosines = np.einsum("ij,ij->i", v[a], v[c])
    scores = neighbourhood.normalised(cosines, b[a], b[c])
    keep = scores >= calibration.raw_threshold(DEFAULT_THRESHOLD, aware=True)
    oracle = sorted(sorted(snap.paths[m] for m in g.members)
                    for g in group_pairs(a[keep], c[keep], calibration.probability(scores[keep], True), cosines[keep]))
    assert len(oracle) >= 10
    for exact in (True, False):
        found = sorted(sorted(g.files) for g in full_index.duplicates(DEFAULT_THRESHOLD, exact=exact))
        assert found == oracle, exact
    asked = full_index.backgrounds()
    assert np.allclose(asked, b, atol=1e-3)  # float16-stored vectors against float64 here


def test_a_crowded_neighbourhood_lowers_the_score_and_its_loss_is_bounded():
    # b is clipped: a burst of more than K copies loses at most B_MAX - OFFSET of cosine
    b = neighbourhood.backgrounds(np.array([0.05, 0.3, 0.95]))
    assert b.tolist() == [neighbourhood.B_MIN, 0.3, neighbourhood.B_MAX]
    quiet, crowded = neighbourhood.normalised(0.7, b[0], b[0]), neighbourhood.normalised(0.7, b[2], b[2])
    assert quiet > 0.7 > crowded == pytest.approx(0.7 - neighbourhood.B_MAX + neighbourhood.OFFSET)
    # and a quiet neighbourhood never links a pair under the cosine floor
    assert neighbourhood.normalised(neighbourhood.COSINE_FLOOR - 0.01, b[0], b[0]) == -np.inf


def test_small_collections_keep_plain_cosine(tmp_path, photo_folder, embedder):
    with Index.open(tmp_path / "idx", create=True, embedder=embedder) as index:
        index.add([photo_folder])
        n = len(index.snapshot())
        assert not neighbourhood.applies(n)
        for group in index.duplicates():  # the copy probability of the plain cosine
            assert group.min_score == pytest.approx(float(calibration.probability(group.min_cosine, False)))
            assert group.max_score == pytest.approx(float(calibration.probability(group.max_cosine, False)))


@needs_peer_data
def test_peer_nested_folder_gives_exactly_the_ukbench00120_group(tmp_path, embedder):
    # issue 12's strict xfail until the copy-trained descriptor: the ~30 degree rotation with black corners
    # scored cosine 0.57 against its group; now 0.63-0.65, above the default in this 5-file (plain cosine) folder
    with Index.open(tmp_path / "idx", create=True, embedder=embedder) as index:
        index.add([PEER_DATA / "mixed_nested_images"])
        groups = [sorted(os.path.basename(f) for f in g.files) for g in index.duplicates(DEFAULT_THRESHOLD)]
    assert groups == [["ukbench00120.jpg", "ukbench00120_hflip.jpg", "ukbench00120_resize.jpg",
                       "ukbench00120_rotation.jpg"]]


def test_dups_cosine_flag_thresholds_the_plain_cosine(full_index):
    import json

    from click.testing import CliRunner

    from neardup.cli import main

    def groups(*flags):
        result = CliRunner().invoke(main, ["dups", "--index", str(full_index.root), "--json", *flags])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)["groups"]

    aware, plain = groups(), groups("--cosine")
    def of_cosine(g) -> bool:
        return g["min_score"] == pytest.approx(float(calibration.probability(g["min_cosine"], False)), abs=1e-6)

    assert plain and all(of_cosine(g) for g in plain)
    assert not all(of_cosine(g) for g in aware)
    expected = sorted(sorted(g.files) for g in full_index.duplicates(DEFAULT_THRESHOLD, collection_aware=False))
    assert sorted(sorted(g["files"]) for g in plain) == expected
