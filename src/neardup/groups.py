"""Verified pairs → duplicate groups (union-find); pure numpy, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Group:
    """Members (row numbers, ascending) and the weakest / strongest verified link that joined them.

    Every member has at least one partner in the group with score >= min_score; members are not
    guaranteed to be that close to *every* other member (groups are connected components). The score is
    the one the threshold applied to (`Index.duplicates` gives copy probabilities, neardup.calibration);
    min_cosine / max_cosine are the plain cosines of the same links.
    """

    members: np.ndarray
    min_score: float
    max_score: float
    min_cosine: float
    max_cosine: float


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component label (smallest member row) of each of n nodes, joined by edges a[i]–b[i].
    Vectorised hook-and-compress (Shiloach–Vishkin style): every round hooks the larger of two roots an
    edge joins under the smaller, then compresses each node to its root; the smallest node of a
    component is never hooked, so it ends as the label. Millions of edges in a few numpy passes, where a
    Python union-find loop took seconds."""
    labels = np.arange(n, dtype=np.int64)
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    while len(a):
        ra, rb = labels[a], labels[b]
        apart = ra != rb
        if not apart.any():
            break
        a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]  # edges inside a component are done
        np.minimum.at(labels, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:  # pointer jumping to the roots
            parents = labels[labels]
            if np.array_equal(parents, labels):
                break
            labels = parents
    return labels


def group_pairs(a: np.ndarray, b: np.ndarray, scores: np.ndarray, cosines: np.ndarray | None = None) -> list[Group]:
    """Groups of two or more rows from verified pairs a[i]–b[i], largest first, then by smallest member.
    `cosines` (default: the scores) are the links' plain cosines where the scores are normalised."""
    a, b, scores = (np.asarray(x) for x in (a, b, scores))
    cosines = scores if cosines is None else np.asarray(cosines)
    distinct = a != b
    a, b, scores, cosines = a[distinct], b[distinct], scores[distinct], cosines[distinct]
    if len(a) == 0:
        return []
    nodes, local = np.unique(np.r_[a, b], return_inverse=True)
    la, lb = local[: len(a)], local[len(a) :]
    labels = connected_components(len(nodes), la, lb)
    edge_label = labels[la]
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1], True])
    lowest = np.full(len(nodes), np.inf)
    highest = np.full(len(nodes), -np.inf)
    np.minimum.at(lowest, edge_label, scores)
    np.maximum.at(highest, edge_label, scores)
    lowest_cos = np.full(len(nodes), np.inf)
    highest_cos = np.full(len(nodes), -np.inf)
    np.minimum.at(lowest_cos, edge_label, cosines)
    np.maximum.at(highest_cos, edge_label, cosines)
    groups = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        members = nodes[order[start:end]]
        label = labels[order[start]]
        groups.append(Group(np.sort(members), float(lowest[label]), float(highest[label]),
                            float(lowest_cos[label]), float(highest_cos[label])))
    groups.sort(key=lambda g: (-len(g.members), int(g.members[0])))
    return groups
