import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from neardup.groups import GroupBuilder, connected_components, group_pairs

edges = st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30), st.floats(0, 1)), max_size=60)


def reference_components(pairs):
    """Components by repeated set merging: slow and obviously right."""
    sets: list[set[int]] = []
    for a, b, _ in pairs:
        if a == b:
            continue
        touching = [s for s in sets if a in s or b in s]
        merged = {a, b}.union(*touching)
        sets = [s for s in sets if s not in touching] + [merged]
    return sorted(sorted(s) for s in sets)


@given(edges)
def test_groups_equal_reference_components(pairs):
    a = np.array([p[0] for p in pairs], dtype=np.int64)
    b = np.array([p[1] for p in pairs], dtype=np.int64)
    scores = np.array([p[2] for p in pairs], dtype=np.float64)
    groups = group_pairs(a, b, scores)
    assert sorted(g.members.tolist() for g in groups) == reference_components(pairs)
    for g in groups:
        inside = [s for x, y, s in pairs if x != y and x in g.members]
        assert g.min_score == min(inside) and g.max_score == max(inside)
    sizes = [len(g.members) for g in groups]
    assert sizes == sorted(sizes, reverse=True)


def test_connected_components_labels_by_smallest_member():
    labels = connected_components(6, np.array([5, 1, 3]), np.array([4, 4, 2]))
    assert labels.tolist() == [0, 1, 2, 2, 1, 1]


def test_groups_report_the_cosines_of_normalised_links():
    a, b = np.array([0, 1, 3]), np.array([1, 2, 4])
    scores, cosines = np.array([0.7, 0.9, 0.8]), np.array([0.6, 0.95, 0.5])
    groups = group_pairs(a, b, scores, cosines)
    assert [(g.members.tolist(), g.min_score, g.max_score, g.min_cosine, g.max_cosine) for g in groups] == [
        ([0, 1, 2], 0.7, 0.9, 0.6, 0.95), ([3, 4], 0.8, 0.8, 0.5, 0.5)]


@given(st.integers(2, 3000), st.integers(0, 2**16), st.sampled_from(["chain", "random", "star"]))
def test_connected_components_label_every_node_by_its_components_smallest_member(n, seed, shape):
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    if shape == "chain":  # the longest paths: hooking must still reach the smallest node
        a, b = order[:-1], order[1:]
    elif shape == "star":
        a, b = np.full(n - 1, order[0]), order[1:]
    else:
        a, b = rng.integers(0, n, n // 2), rng.integers(0, n, n // 2)
    labels = connected_components(n, a, b)
    parent = list(range(n))  # reference: a plain union-find

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist()):
        rx, ry = find(x), find(y)
        parent[max(rx, ry)] = min(rx, ry)
    assert labels.tolist() == [find(x) for x in range(n)]


@given(edges, st.lists(st.integers(0, 60), max_size=4), st.booleans(), st.sampled_from([1, 7, 1 << 22]))
def test_group_builder_fed_in_chunks_equals_all_links_at_once(pairs, cuts, repeat, buffer):
    """`dups` feeds links a chunk at a time (some twice: a pair two lists hold, or the crowded join found
    again): the groups and their score and cosine ranges are those of every distinct link at once."""
    a = np.array([p[0] for p in pairs], dtype=np.int64)
    b = np.array([p[1] for p in pairs], dtype=np.int64)
    scores = np.array([p[2] for p in pairs], dtype=np.float64)
    cosines = scores / 2 + 0.25
    builder = GroupBuilder(31)
    builder.buffer = buffer  # links hooked at once: every chunk, a few chunks, or all at the end
    bounds = [0, *sorted(min(c, len(a)) for c in cuts), len(a)]
    for start, end in zip(bounds[:-1], bounds[1:]):
        builder.add(a[start:end], b[start:end], scores[start:end], cosines[start:end])
        if repeat:
            builder.add(b[start:end], a[start:end], scores[start:end], cosines[start:end])
    got = [(g.members.tolist(), g.min_score, g.max_score, g.min_cosine, g.max_cosine) for g in builder.groups()]
    want = [(g.members.tolist(), g.min_score, g.max_score, g.min_cosine, g.max_cosine)
            for g in group_pairs(a, b, scores, cosines)]
    assert got == want
