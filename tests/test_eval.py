"""The evaluation set builder, the metrics, and `neardup eval run` (real photos, real model)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from neardup import evaluation
from neardup.benchmark_set import EDIT_KINDS, build_set
from neardup.cli import main
from neardup.index import DEFAULT_THRESHOLD
from neardup.schemas import EVAL_RESULT, EVAL_SET

SMALL_ORIGINALS = 6
#: Top-1 on the small scikit-image set is 1.0 today; the floor leaves room for one miss in 90 queries.
TOP1_FLOOR = 0.95


@pytest.fixture(scope="module")
def small_set(tmp_path_factory) -> Path:
    """6 scikit-image originals x every edit kind; the other scikit-image photos (and their tiles) are
    distractors. No network: only the scikit-image source."""
    out = tmp_path_factory.mktemp("evalset") / "set"
    build_set(out, seed=3, sources=("skimage",), download=False, max_originals=SMALL_ORIGINALS)
    return out


@pytest.fixture(scope="module")
def small_run(small_set, tmp_path_factory) -> tuple[dict, Path, Path, str]:
    folder = tmp_path_factory.mktemp("evalrun")
    json_out, png_out = folder / "result.json", folder / "pr.png"
    result = CliRunner().invoke(main, ["eval", "run", str(small_set), "--json", str(json_out), "--plot", str(png_out)])
    assert result.exit_code == 0, result.output
    return json.loads(json_out.read_text()), json_out, png_out, result.output


# ---- the builder -----------------------------------------------------------------------------------

def test_builder_writes_a_valid_set_with_every_edit_kind(small_set):
    truth = json.loads((small_set / "truth.json").read_text())
    jsonschema.validate(truth, EVAL_SET)
    originals = [g for g in truth["gallery"] if g["role"] == "original"]
    distractors = [g for g in truth["gallery"] if g["role"] == "distractor"]
    assert len(originals) == SMALL_ORIGINALS
    assert len(distractors) >= 20
    assert all(g["source"].startswith("skimage:") for g in truth["gallery"])
    # every query is one edit of one original, and every (original, edit) pair is there once
    assert Counter((q["matches"][0], q["edit"]) for q in truth["queries"]) == Counter(
        {(g["id"], e): 1 for g in originals for e in EDIT_KINDS})
    for item in truth["gallery"] + truth["queries"]:
        assert (small_set / item["path"]).is_file()
    # the drawn parameters are within the ranges
    jpeg = [q["params"]["quality"] for q in truth["queries"] if q["edit"] == "jpeg"]
    thumbs = [q["params"]["long_side"] for q in truth["queries"] if q["edit"] == "thumbnail"]
    assert all(10 <= j <= 30 for j in jpeg) and all(64 <= t <= 128 for t in thumbs)
    from PIL import Image

    for q in truth["queries"]:
        if q["edit"] == "thumbnail":
            with Image.open(small_set / q["path"]) as im:
                assert max(im.size) == q["params"]["long_side"]


def test_builder_names_missing_sources_and_continues(tmp_path, monkeypatch):
    monkeypatch.setenv("NEARDUP_CACHE", str(tmp_path / "empty-cache"))
    lines = []
    report = build_set(tmp_path / "set", sources=("skimage", "debian"), download=False, max_originals=2,
                       edits=("flip",), tiles_per_distractor=0, log=lines.append)
    assert report.originals == 2 and report.queries == 2
    missing = [line for line in lines if line.startswith("missing:")]
    assert any("lomiri-wallpapers-16.04" in line and "--no-download" in line for line in missing)
    truth = json.loads((tmp_path / "set" / "truth.json").read_text())
    assert truth["missing"] == report.missing and len(report.missing) == len(missing) >= 6


def test_builder_cache_follows_the_model_cache_rule(tmp_path, monkeypatch):
    """$NEARDUP_CACHE, else $XDG_CACHE_HOME/neardup, else ~/.cache/neardup: for the fetched photo
    packages as for the exported models (the set builder used to ignore $XDG_CACHE_HOME)."""
    from neardup import benchmark_set
    from neardup.models import onnx_backend

    monkeypatch.delenv("NEARDUP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert benchmark_set.cache_dir() == onnx_backend.cache_dir() == tmp_path / "xdg" / "neardup"
    lines = []
    build_set(tmp_path / "set", sources=("skimage", "sklearn"), download=False, max_originals=2,
              edits=("flip",), tiles_per_distractor=0, log=lines.append)
    sklearn = [line for line in lines if line.startswith("missing:") and "scikit-learn" in line]
    if not sklearn:
        pytest.skip("scikit-learn is installed: its samples are not looked up in the cache")
    assert str(tmp_path / "xdg" / "neardup" / "sklearn") in sklearn[0]
    monkeypatch.setenv("NEARDUP_CACHE", str(tmp_path / "mine"))
    assert benchmark_set.cache_dir() == onnx_backend.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("NEARDUP_CACHE")
    assert benchmark_set.cache_dir() == onnx_backend.cache_dir() == Path.home() / ".cache" / "neardup"


def test_cli_build_reports_missing_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("NEARDUP_CACHE", str(tmp_path / "empty-cache"))
    result = CliRunner().invoke(main, ["eval", "build", str(tmp_path / "s"), "--sources", "sklearn",
                                       "--no-download"])
    # scikit-learn is not installed here and the cache is empty: nothing to build from
    if result.exit_code == 0:
        pytest.skip("scikit-learn is installed: its samples were found")
    assert result.exit_code == 1
    assert "scikit-learn" in result.output and "Traceback" not in result.output
    bad = CliRunner().invoke(main, ["eval", "build", str(tmp_path / "s"), "--sources", "flickr"])
    assert bad.exit_code == 2 and "unknown source" in bad.output


def test_eval_run_rejects_a_folder_without_truth(tmp_path):
    result = CliRunner().invoke(main, ["eval", "run", str(tmp_path)])
    assert result.exit_code == 1 and "truth.json" in result.output and "Traceback" not in result.output


# ---- the run ---------------------------------------------------------------------------------------

def test_eval_run_writes_json_plot_and_reaches_the_floor(small_run):
    data, _, png, output = small_run
    jsonschema.validate(data, EVAL_RESULT)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    ours = data["methods"]["neardup"]
    assert data["queries"] == SMALL_ORIGINALS * len(EDIT_KINDS)
    assert set(ours["per_edit"]) == set(EDIT_KINDS)
    assert ours["overall"]["top1"] >= TOP1_FLOOR
    # the LSH path finds what the exact scan finds on a set this small
    assert ours["lsh_search"]["top1"] == pytest.approx(ours["overall"]["top1"])
    assert ours["dups"]["lsh"]["threshold"] == DEFAULT_THRESHOLD
    # the survivor figure (issue 19): groups holding an original keep it
    dups = ours["dups"]["lsh"]
    assert dups["survivor_groups"] >= 1 and dups["survivor_is_original"] >= 0.95
    assert "survivor (default --keep) is the original" in output
    assert "micro" not in output or "ALL" in output
    for name in ("seed_lsh", "phash"):  # baselines ran and are scored the same way
        assert set(data["methods"][name]["per_edit"]) == set(EDIT_KINDS)
        assert 0.0 <= data["methods"][name]["overall"]["micro_AP"] <= 1.0
    # pHash cannot see a mirrored copy as the same picture; the CNN does
    assert data["methods"]["phash"]["per_edit"]["flip"]["top1"] < ours["per_edit"]["flip"]["top1"]


def test_default_threshold_merges_no_two_demo_photos(full_index, collection):
    original_of = {path: name for name, path in collection["originals"].items()}
    original_of.update({c["path"]: c["original"] for c in collection["copies"]})
    groups = full_index.duplicates(DEFAULT_THRESHOLD, exact=True)
    assert groups
    for group in groups:
        assert len({original_of[f] for f in group.files}) == 1, group.files


# ---- metrics: hand-computed examples -----------------------------------------------------------------

def test_average_precision_by_hand():
    # relevant at ranks 1 and 3, two positives: (1/1 + 2/3) / 2
    assert evaluation.average_precision(np.array([1, 0, 1], bool), 2) == pytest.approx(5 / 6)
    # a positive never retrieved counts as precision 0
    assert evaluation.average_precision(np.array([0, 1], bool), 2) == pytest.approx(0.25)
    assert evaluation.average_precision(np.array([], bool), 0) == 0.0


def test_micro_ap_pools_queries_by_hand():
    # query A: its match at 0.9, a wrong one at 0.5; query B: wrong at 0.8, its match at 0.3
    rankings = [[("a", 0.9), ("x", 0.5)], [("y", 0.8), ("b", 0.3)]]
    m = evaluation.ranking_metrics(rankings, [{"a"}, {"b"}], k=10)
    # pooled order 0.9 T, 0.8 F, 0.5 F, 0.3 T: AP = (1/1 + 2/4) / 2
    assert m["micro_AP"] == pytest.approx(0.75)
    assert m["top1"] == 0.5 and m["recall@10"] == 1.0
    assert m["mAP"] == pytest.approx((1.0 + 0.5) / 2)


def test_group_pairs_and_calibration_by_hand():
    # items 0,1 are one photo, 2 another, 3 a third; pairs: (0,1) 0.9 true, (1,2) 0.7 false, (2,3) 0.4 false
    curve = evaluation.group_pair_curve(np.array([0, 1, 2]), np.array([1, 2, 3]), np.array([0.9, 0.7, 0.4]),
                                        ["p", "p", "q", "r"])
    assert curve["true_pairs"] == 1
    assert curve["threshold"].tolist() == [0.9, 0.7, 0.4]
    # at 0.7 the group {0,1,2} predicts 3 pairs, 1 right; at 0.4 one group of 4: 6 pairs, 1 right
    assert curve["precision"].tolist() == pytest.approx([1.0, 1 / 3, 1 / 6])
    assert curve["recall"].tolist() == [1.0, 1.0, 1.0]
    assert evaluation.calibrate(curve)["threshold"] == 0.9
    assert evaluation.at_threshold(curve, 0.5)["precision"] == pytest.approx(1 / 3)
    assert evaluation.pair_counts([["0", "1", "2"]], {"0": "p", "1": "p", "2": "q", "3": "r"}) == (3, 1, 1)


def test_baseline_scores_by_hand():
    bits = np.zeros((2, 64), bool)
    bits[1, :16] = True
    assert evaluation.phash_scores(bits, bits).tolist() == [[1.0, 0.75], [0.75, 1.0]]
    codes = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 2, 0, 0, 0, 0, 0, 0, 0, 10]])
    assert evaluation.seed_scores(codes, codes)[0, 1] == pytest.approx(0.3)


# ---- metrics against brute-force references ------------------------------------------------------------

def _reference_micro_ap(triples: list[tuple[float, bool]], n_true: int) -> float:
    ordered = sorted(enumerate(triples), key=lambda t: (-t[1][0], t[0]))  # ties in pooled order
    total, hits = 0.0, 0
    for rank, (_, (_, rel)) in enumerate(ordered, 1):
        if rel:
            hits += 1
            total += hits / rank
    return total / n_true if n_true else 0.0


rankings_strategy = st.lists(
    st.tuples(st.lists(st.tuples(st.integers(0, 7), st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.9])), max_size=6,
                       unique_by=lambda t: t[0]),
              st.sets(st.integers(0, 7), max_size=3)),
    min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(rankings_strategy, st.integers(1, 6))
def test_ranking_metrics_match_brute_force(queries, k):
    rankings = [[(str(g), s) for g, s in sorted(r, key=lambda t: -t[1])] for r, _ in queries]
    truths = [{str(t) for t in truth} for _, truth in queries]
    got = evaluation.ranking_metrics(rankings, truths, k)
    triples, n_true, top1, recall, aps = [], 0, [], [], []
    for ranked, truth in zip(rankings, truths):
        ranked = ranked[:k]
        triples += [(s, g in truth) for g, s in ranked]
        if not truth:
            continue
        n_true += len(truth)
        top1.append(bool(ranked) and ranked[0][0] in truth)
        recall.append(sum(g in truth for g, _ in ranked) / len(truth))
        hits, ap = 0, 0.0
        for rank, (g, _) in enumerate(ranked, 1):
            if g in truth:
                hits += 1
                ap += hits / rank
        aps.append(ap / len(truth))
    assert got["micro_AP"] == pytest.approx(_reference_micro_ap(triples, n_true))
    assert got["top1"] == pytest.approx(np.mean(top1) if top1 else 0.0)
    assert got[f"recall@{k}"] == pytest.approx(np.mean(recall) if recall else 0.0)
    assert got["mAP"] == pytest.approx(np.mean(aps) if aps else 0.0)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 9).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.integers(0, 3), min_size=n, max_size=n),
    st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1), st.sampled_from([0.2, 0.4, 0.6, 0.8])),
             max_size=15))))
def test_group_pair_curve_matches_brute_force(case):
    n, labels, raw = case
    pairs = {(min(a, b), max(a, b)): s for a, b, s in raw if a != b}
    a = np.array([p[0] for p in pairs], int)
    b = np.array([p[1] for p in pairs], int)
    s = np.array(list(pairs.values()), float)
    curve = evaluation.group_pair_curve(a, b, s, labels)
    cluster = {str(i): labels[i] for i in range(n)}
    for t, p, r in zip(curve["threshold"], curve["precision"], curve["recall"]):
        # brute force: connected components of pairs >= t by repeated relabelling
        comp = list(range(n))
        changed = True
        while changed:
            changed = False
            for (x, y), score in pairs.items():
                if score >= t and comp[x] != comp[y]:
                    low = min(comp[x], comp[y])
                    comp = [low if c in (comp[x], comp[y]) else c for c in comp]
                    changed = True
        groups = [[str(i) for i in range(n) if comp[i] == c] for c in set(comp)]
        predicted, correct, true = evaluation.pair_counts([g for g in groups if len(g) > 1], cluster)
        assert p == pytest.approx(correct / predicted if predicted else 1.0)
        assert r == pytest.approx(correct / true if true else 0.0)


def test_grouped_with_original_counts_copies_in_their_originals_group():
    groups = [["o1", "c1", "c2"], ["o2", "x"]]
    fractions = evaluation.grouped_with_original(groups, ["c1", "c2", "c3", "c4"], ["o1", "o2", "o2", "o3"],
                                                 ["grey", "grey", "logo", "logo"])
    assert fractions == {"all": 0.25, "grey": 0.5, "logo": 0.0}
