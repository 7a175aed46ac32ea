"""The k-NN graph kept with the index (neardup.graph, issue 18): the exact regime against a brute-force
oracle through any sequence of adds, removals and re-embeds (hypothesis); the clustered regime's
promises (true similarities, K-th a lower bound, true lists where b can matter); the index keeps it
current, `dups` in a new process reads it, and `dups` over it links exactly what `dups --exact` links."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from conftest import assert_same_groups, copy_probability, write_index

from neardup import graph as knn
from neardup import lsh, neighbourhood
from neardup.index import Index, stored_graph
from neardup.store import Store

#: The copy probability `dups` links pairs of collection-aware score 0.7 at.
SCORE_07 = copy_probability(0.7, aware=True)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_lists(vectors: np.ndarray) -> np.ndarray:
    """Each row's similarities to the other rows, highest first, KEEP of them (-inf padded)."""
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    top = -np.sort(-sims, axis=1)[:, :knn.KEEP]
    return np.concatenate([top, np.full((len(vectors), knn.KEEP - top.shape[1]), -np.inf)], axis=1)


def assert_true_lists(graph: knn.Graph, vectors: np.ndarray, rows: np.ndarray | None = None) -> None:
    """The listed similarities are the true ones of the listed rows, and (for `rows`) the true top list."""
    n = len(vectors)
    rows = np.arange(n) if rows is None else rows
    valid = graph.neighbours >= 0
    assert (np.isfinite(graph.similarities) == valid).all()
    listed = np.einsum("id,ikd->ik", vectors, vectors[np.where(valid, graph.neighbours, 0)])
    np.testing.assert_allclose(graph.similarities[valid], listed[valid], atol=2e-5)
    assert not (graph.neighbours == np.arange(n)[:, None]).any()  # nobody is their own neighbour
    for row in range(n):  # no row listed twice
        kept = graph.neighbours[row][valid[row]]
        assert len(set(kept.tolist())) == len(kept)
    truth = brute_lists(vectors)[rows]
    filled = np.isfinite(graph.similarities[rows]).sum(axis=1)
    need = min(knn.K, n - 1)
    assert (filled >= need).all()
    got = np.where(np.isfinite(graph.similarities[rows]), graph.similarities[rows], -9)
    want = np.where(np.isfinite(truth), truth, -9)
    for i, f in enumerate(filled):  # a list may be shorter than KEEP after removals: a true prefix
        np.testing.assert_allclose(got[i, :f], want[i, :f], atol=2e-5)
    np.testing.assert_allclose(graph.kth()[rows], np.where(np.isfinite(truth[:, knn.K - 1]), truth[:, knn.K - 1], 0.0),
                               atol=2e-5)


operations = st.lists(st.tuples(st.sampled_from(["add", "remove", "reembed"]), st.integers(1, 30)), min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(start=st.integers(0, 40), ops=operations, seed=st.integers(0, 2**16), twins=st.booleans())
def test_exact_graph_equals_brute_force_through_adds_removals_and_reembeds(start, ops, seed, twins):
    rng = np.random.default_rng(seed)
    dim = 6  # low dimension: crowded neighbourhoods and near-ties
    vectors = {i: unit(rng.standard_normal((1, dim)))[0] for i in range(start)}
    stamps = dict.fromkeys(vectors, 1.0)
    if twins and start >= 2:
        vectors[1] = vectors[0].copy()  # byte-identical copies: equal similarities
    next_id, clock = start, 2.0

    def current():
        ids = np.array(sorted(vectors), dtype=np.int64)
        matrix = np.array([vectors[i] for i in ids], dtype=np.float32).reshape(len(ids), dim)
        return ids, np.array([stamps[i] for i in ids]), matrix

    ids, times, matrix = current()
    graph = knn.build(ids, times, lambda at: matrix[at])
    assert_true_lists(graph, matrix)
    for op, count in ops:
        clock += 1
        if op == "add":
            for _ in range(count):
                vectors[next_id], stamps[next_id] = unit(rng.standard_normal((1, dim)))[0], clock
                next_id += 1
        elif op == "remove":
            for i in rng.permutation(sorted(vectors))[:count].tolist():
                del vectors[i], stamps[i]
        else:  # the same id, a new vector (the file changed and was embedded again)
            for i in rng.permutation(sorted(vectors))[:count].tolist():
                vectors[i], stamps[i] = unit(rng.standard_normal((1, dim)))[0], clock
        ids, times, matrix = current()
        graph = knn.update(graph, ids, times, lambda at, m=matrix: m[at])
        assert np.array_equal(graph.ids, ids) and knn.current(graph, ids, times)
        assert_true_lists(graph, matrix)
        assert graph.exact and graph.exact_rows.all()


def planted(n: int, dim: int, seed: int) -> np.ndarray:
    """Unrelated rows plus bursts: 1 in 10 rows is the centre of a burst of 2-30 rows at cosine 0.6-0.97."""
    rng = np.random.default_rng(seed)
    vectors = unit(rng.standard_normal((n, dim)))
    for centre in rng.choice(n, n // 10, replace=False):
        members = rng.choice(n, min(n, rng.integers(2, 30)), replace=False)
        cos = rng.uniform(0.6, 0.97)
        vectors[members] = unit(cos * vectors[centre] + np.sqrt(1 - cos**2) * unit(rng.standard_normal((len(members), dim))))
    return vectors


@pytest.mark.parametrize(("low_precision", "torch_top"), [(False, False), (False, True), (True, False)],
                         ids=["float32", "float32-torch-top", "bfloat16"])
def test_clustered_graph_keeps_its_promises_through_an_update(monkeypatch, low_precision, torch_top):
    if torch_top:  # every block's top through torch.topk, as the large blocks of a big collection take it
        monkeypatch.setattr(knn, "TORCH_TOP_MIN", 0)
    monkeypatch.setattr(knn, "EXACT_MAX", 500)
    monkeypatch.setattr(knn, "CLUSTER_ROWS", 64)
    monkeypatch.setattr(knn, "PROBES", 16)
    monkeypatch.setattr(knn, "bf16_matmul", lambda: low_precision)
    vectors = planted(3000, 24, seed=5)
    first = np.arange(2700)
    graph = knn.build(first, np.ones(2700), lambda at: vectors[at])
    assert not graph.exact and len(graph.centroids) == -(-2700 // 64)

    def check(graph, matrix):
        valid = graph.neighbours >= 0
        listed = np.einsum("id,ikd->ik", matrix, matrix[np.where(valid, graph.neighbours, 0)])
        np.testing.assert_allclose(graph.similarities[valid], listed[valid], atol=2e-5)  # re-scored in float32
        truth = brute_lists(matrix)[:, knn.K - 1]
        assert (graph.kth() <= truth + 2e-5).all()  # a lower bound
        # rows whose b can matter (a pair at the cosine floor, a listed K-th under B_MAX) hold true lists
        matters = (graph.similarities[:, 0] >= neighbourhood.COSINE_FLOOR) & (graph.kth() < neighbourhood.B_MAX)
        assert graph.exact_rows[matters].all()
        true_rows = np.flatnonzero(graph.exact_rows)
        assert len(true_rows) > 100
        np.testing.assert_allclose(graph.kth()[true_rows], truth[true_rows], atol=2e-3 if low_precision else 2e-5)
        lists = brute_lists(matrix)[true_rows, :knn.K]  # their first K entries are the true top K
        np.testing.assert_allclose(graph.similarities[true_rows, :knn.K], lists, atol=2e-3 if low_precision else 2e-5)
        recall = np.mean(np.abs(graph.kth() - truth) < 1e-3)
        assert recall >= 0.5  # the lists' own quality (measured at scale in benchmarks/RESULTS.md)

    check(graph, vectors[first])
    # remove 200 rows, add the 300 held back, re-embed 20: still the same promises
    ids = np.r_[np.arange(200, 2700), np.arange(2700, 3000)]
    stamps = np.ones(len(ids))
    stamps[:20] = 2.0
    changed = vectors.copy()
    changed[200:220] = unit(np.random.default_rng(1).standard_normal((20, 24)))
    matrix = changed[ids]
    updated = knn.update(graph, ids, stamps, lambda at: matrix[at])
    assert not updated.exact and updated.fitted == graph.fitted
    check(updated, matrix)


def crowded(seed: int) -> np.ndarray:
    """Two bursts of 40 near-identical rows bridged by one pair at cosine ~0.8, bursts of a few rows,
    unrelated rows: every list of a big burst is full of its own members, so the bridge is in no list."""
    rng = np.random.default_rng(seed)
    dim = 32
    vectors = planted(900, dim, seed)
    a, b = unit(rng.standard_normal((2, dim)))
    orthogonal = unit((b - (b @ a) * a)[None])[0]
    b = unit((0.8 * a + 0.6 * orthogonal)[None])[0]
    for centre, rows in ((a, slice(0, 40)), (b, slice(40, 80))):
        vectors[rows] = unit(centre + 0.05 * unit(rng.standard_normal((40, dim))))
    return vectors


@pytest.mark.parametrize("threshold", [0.5, 0.58, 0.8])
@pytest.mark.parametrize("plain", [False, True], ids=["collection-aware", "cosine"])
def test_dups_over_the_graph_links_what_the_exact_path_links(tmp_path, threshold, plain):
    write_index(tmp_path / "idx", crowded(seed=2))
    with Index.open(tmp_path / "idx") as index:
        probability = copy_probability(threshold, aware=not plain)
        over_graph = index.duplicates(probability, collection_aware=not plain)
        exact = index.duplicates(probability, exact=True, collection_aware=not plain)
        assert {tuple(g.files) for g in over_graph} == {tuple(g.files) for g in exact}
        # the two crowded bursts are one group through pairs at cosine ~0.8 that no list holds (the
        # collection-aware score of such a pair: 0.8 - B_MAX + OFFSET = 0.60)
        if threshold < 0.6:
            assert max(len(g.files) for g in exact) >= 80
        a, b, _ = index.graph().pairs(0.5)
        assert not ((a < 40) & (b >= 40) & (b < 80)).any()


def test_index_keeps_the_graph_current_and_a_new_process_reads_it(tmp_path, monkeypatch):
    root = tmp_path / "idx"
    vectors = planted(400, 16, seed=3)
    write_index(root, vectors[:300])
    with Store.open(root, write=True) as store:  # what every writer does last (Index.add, remove, merge, actions)
        from neardup.index import finish_write

        finish_write(store)
        saved = stored_graph(store)
        snap = store.snapshot()
        assert saved is not None and knn.current(saved, snap.ids, snap.stamps)
    # a writer killed between its commit and the graph's: readers bring the stored graph up to date
    write_index(root, vectors[300:], start=300)
    with Index.open(root) as index:
        snap = index.snapshot()
        with Store.open(root) as store:
            assert not knn.current(stored_graph(store), snap.ids, snap.stamps)
        graph = index.graph()
        assert knn.current(graph, snap.ids, snap.stamps)
        assert_true_lists(graph, lsh.normalise_rows(snap.vectors(dtype=None)))
        assert_same_groups(index.duplicates(SCORE_07), index.duplicates(SCORE_07, exact=True))
        index.remove(["/v/0", "/v/1"])  # the next writer saves it
    with Store.open(root) as store:
        snap = store.snapshot()
        assert len(snap) == 398 and knn.current(stored_graph(store), snap.ids, snap.stamps)
    with Index.open(root) as index:
        assert_same_groups(index.duplicates(SCORE_07), index.duplicates(SCORE_07, exact=True))

    def computed(*args, **kwargs):
        raise AssertionError("dups computed a neighbourhood the index keeps")

    for name in ("_scan", "_clustered_rows", "build"):  # a fresh reader of a current graph only reads it
        monkeypatch.setattr(knn, name, computed)
    with Index.open(root) as index:
        assert len(index.duplicates()) > 0 and len(index.duplicates(SCORE_07)) > 0


def test_only_its_own_graph_files_are_swept(tmp_path):
    root = tmp_path / "idx"
    write_index(root, planted(120, 8, seed=4))
    with Store.open(root, write=True) as store:
        from neardup.index import update_graph

        update_graph(store)
        names = sorted(p.name for p in (root / "segments").glob("*.graph.npz"))
        assert len(names) == 1
        (root / "segments" / "mine.graph.npz").write_bytes(b"not neardup's")
    write_index(root, planted(10, 8, seed=5), start=120)
    with Store.open(root, write=True) as store:
        update_graph(store)
    left = sorted(p.name for p in (root / "segments").glob("*.graph.npz"))
    assert "mine.graph.npz" in left and names[0] not in left and len(left) == 2


def test_a_query_finds_copies_through_its_best_matches_nearest_files(tmp_path, monkeypatch):
    """Above EXACT_SCAN_MAX a query reads LSH candidates; the nearest files (stored graph) of its best
    matches join them, so a copy the tables miss is found through its original."""
    from neardup import index as index_module

    rng = np.random.default_rng(6)
    n, dim = 10_500, 64
    vectors = unit(rng.standard_normal((n, dim)))
    originals = np.arange(50)
    for c in range(1, 3):  # two copies of each original at cosine ~0.8 (rows 50c .. 50c + 49)
        noise = unit(rng.standard_normal((50, dim)))
        vectors[50 * c + originals] = unit(0.8 * vectors[originals] + 0.6 * noise)
    write_index(tmp_path / "idx", vectors)
    with Store.open(tmp_path / "idx", write=True) as store:
        from neardup.index import update_graph

        update_graph(store)
    monkeypatch.setattr(index_module, "QUERY_PROBES", 1)  # tables that see little beyond the query's own bucket
    monkeypatch.setattr(index_module, "QUERY_PROBES_UNCENTRED", 1)

    def copies_found(expand: int) -> float:
        monkeypatch.setattr(index_module, "QUERY_EXPAND", expand)
        with Index.open(tmp_path / "idx") as index:
            if not expand:
                state = index._search_state()
                state.graph_checked = True  # no graph for this state
            found = 0
            for o in originals:
                paths = {m.path for m in index.query_vector(vectors[o], 5, exact=False)}
                found += sum(f"/v/{50 * c + o}" in paths for c in (1, 2))
            return found / (2 * len(originals))

    with_graph, without = copies_found(2), copies_found(0)
    assert with_graph == 1.0 and without < 1.0


def test_a_query_without_a_convincing_match_probes_deeper(tmp_path, monkeypatch):
    """A query whose best LSH match stays under DEEPEN_BELOW probes DEEPEN times as many buckets: copies at
    cosine ~0.7, which one bucket per table mostly misses, are found (no graph here to find them through)."""
    from neardup import index as index_module

    rng = np.random.default_rng(8)
    n, dim = 10_500, 64
    vectors = unit(rng.standard_normal((n, dim)))
    write_index(tmp_path / "idx", vectors)
    queries = unit(0.7 * vectors[:60] + 0.71 * unit(rng.standard_normal((60, dim))))
    monkeypatch.setattr(index_module, "QUERY_PROBES", 1)
    monkeypatch.setattr(index_module, "QUERY_PROBES_UNCENTRED", 1)

    def found(deepen: int) -> float:
        monkeypatch.setattr(index_module, "DEEPEN", deepen)
        with Index.open(tmp_path / "idx") as index:
            state = index._search_state()
            state.graph_checked = True  # no graph: only the tables find candidates
            hits = [f"/v/{i}" in {m.path for m in index.query_vector(q, 3, exact=False)} for i, q in enumerate(queries)]
            return float(np.mean(hits))

    assert np.max(np.sum(queries * vectors[:60], axis=1)) < index_module.DEEPEN_BELOW  # so every query deepens
    shallow, deep = found(1), found(256)
    assert deep == 1.0 and shallow < 0.9


def test_only_a_query_without_a_convincing_match_reads_the_long_shortlist(tmp_path, monkeypatch):
    """The first pass re-ranks the SHORTLIST closest candidates (at least k) and the closest one's nearest
    files; a query whose best match stays under DEEPEN_BELOW also reads SHORTLIST_PER_MATCH per match asked
    for, so a weak copy ranked low by Hamming distance still gets its cosine read. Without a graph the
    first pass reads the long shortlist."""
    from neardup import index as index_module

    rng = np.random.default_rng(9)
    vectors = unit(rng.standard_normal((10_500, 64)))
    write_index(tmp_path / "idx", vectors)
    with Store.open(tmp_path / "idx", write=True) as store:
        from neardup.index import update_graph

        update_graph(store)
    passes = []
    real = index_module._lsh_scored

    def recording(state, graph, vector, projections, probes, shortlist, scored=None):
        positions, scores = real(state, graph, vector, projections, probes, shortlist, scored)
        passes.append((shortlist, len(positions) - (0 if scored is None else len(scored[0])), graph is not None))
        return positions, scores

    monkeypatch.setattr(index_module, "_lsh_scored", recording)
    with Index.open(tmp_path / "idx") as index:
        neighbours = index.graph().neighbours.shape[1]
        matches = index.query_vector(vectors[7], 10, exact=False)  # an indexed vector: itself at 1.0
        assert matches[0].path == "/v/7" and matches[0].score > 0.999
        assert len(passes) == 1 and passes[0][0] == index_module.SHORTLIST and passes[0][2]
        assert passes[0][1] <= index_module.SHORTLIST + neighbours
        passes.clear()
        index.query_vector(vectors[7], 20, exact=False)
        assert [p[0] for p in passes] == [20]
        passes.clear()
        unrelated = unit(rng.standard_normal((1, 64)))[0]  # nothing indexed comes near it
        assert index.query_vector(unrelated, 10, exact=False)[0].score < index_module.DEEPEN_BELOW
        assert [p[0] for p in passes] == [index_module.SHORTLIST, index_module.SHORTLIST_PER_MATCH * 10]
        assert passes[1][1] > 0  # the deeper pass read rows the first had not
    with Index.open(tmp_path / "idx") as index:
        index._search_state().graph_checked = True  # no graph: the shortlist alone brings a match's copies
        passes.clear()
        index.query_vector(vectors[7], 10, exact=False)
        assert [(p[0], p[2]) for p in passes] == [(index_module.SHORTLIST_PER_MATCH * 10, False)]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 300), seed=st.integers(0, 2**16), threshold=st.floats(0.3, 0.95), block=st.integers(1, 64))
def test_pairs_above_are_the_brute_force_pairs(n, seed, threshold, block):
    """The crowded files' join: every pair at or above the threshold, each once, with its cosine,
    whatever the row blocks."""
    rng = np.random.default_rng(seed)
    vectors = unit(rng.standard_normal((n, 8))) if n else np.zeros((0, 8), np.float32)
    if n > 10:  # near-duplicates around the threshold
        vectors[n // 2:] = unit(vectors[: n - n // 2] + 0.5 * rng.standard_normal((n - n // 2, 8)))
    import neardup.graph as graph_module

    old = graph_module.PAIR_BLOCK
    graph_module.PAIR_BLOCK = block
    try:
        a, b, s = knn.pairs_above(vectors, threshold)
    finally:
        graph_module.PAIR_BLOCK = old
    sims = vectors @ vectors.T
    want_a, want_b = np.nonzero(np.triu(sims >= threshold, 1))
    assert sorted(zip(a.tolist(), b.tolist())) == sorted(zip(want_a.tolist(), want_b.tolist()))
    np.testing.assert_allclose(s, sims[a, b], atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 120), seed=st.integers(0, 2**16), cut=st.floats(-0.5, 0.99), chunk=st.integers(1, 50))
def test_listed_pairs_are_every_listed_pair_once(n, seed, cut, chunk):
    vectors = unit(np.random.default_rng(seed).standard_normal((n, 5))) if n else np.zeros((0, 5), np.float32)
    graph = knn.build(np.arange(n), np.zeros(n), lambda at: vectors[at])
    a, b, s = graph.pairs(cut, chunk=chunk)
    want = {}
    for row in range(n):
        for col, sim in zip(graph.neighbours[row], graph.similarities[row]):
            if col >= 0 and sim >= cut:
                want[(min(row, int(col)), max(row, int(col)))] = sim
    assert sorted(zip(a.tolist(), b.tolist())) == sorted(want)
    assert all(abs(want[(x, y)] - v) < 1e-6 for x, y, v in zip(a.tolist(), b.tolist(), s.tolist()))
    # Graph.lists (the crowded join drops what the graph lists) says the same of every pair, in any chunking
    if n >= 2:
        every_a, every_b = np.triu_indices(n, 1)
        listed = graph.lists(every_a, every_b, cut, chunk=chunk)
        assert sorted(zip(every_a[listed].tolist(), every_b[listed].tolist())) == sorted(want)


@settings(max_examples=200, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(0, 40), st.integers(0, 40)), elements=st.booleans()))
def test_sparse_nonzero_equals_nonzero(mask):
    """The crowded join's hit finder gives np.nonzero's positions, in its order, whatever the shape (rows
    that do not fill whole 8-byte words, a tail after the last word, no hits, all hits)."""
    expected = np.nonzero(mask)
    found = knn.sparse_nonzero(mask)
    assert all(np.array_equal(e, f) and f.dtype == e.dtype for e, f in zip(expected, found))
