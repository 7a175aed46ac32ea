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
    """Component label (smallest member row) of each of n nodes, joined by edges a[i]–b[i]."""
    return _hook(np.arange(n, dtype=np.int64), a, b)


def _hook(labels: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`labels` (every node labelled by the smallest member of its component so far) after the edges
    a[i]–b[i] join more. Vectorised hook-and-compress (Shiloach–Vishkin style): every round hooks the larger
    of two roots an edge joins under the smaller, then compresses each node to its root; the smallest node
    of a component is never hooked, so it ends as the label. Millions of edges in a few numpy passes, where
    a Python union-find loop took seconds."""
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


class GroupBuilder:
    """Union-find over n nodes fed a chunk of verified links at a time, so the links are never held
    together (a million crowded photos give tens of millions). Each link's score and cosine are folded
    into per-node extremes on its first node (a link lies in its first node's group), so a group's weakest
    and strongest link are the extremes over its members: O(n) memory whatever the number of links. A
    link given twice changes nothing. The links' ends wait in a buffer of at least LINK_BUFFER links (or n/4)
    before they are hooked, since each hooking round passes over all n labels: many small chunks would
    otherwise cost O(n) each."""

    LINK_BUFFER = 1 << 22

    def __init__(self, n: int):
        self.labels = np.arange(n, dtype=np.int64)
        self.linked = np.zeros(n, dtype=bool)
        self.extremes = np.full((4, n), np.inf)  # min score, -max score, min cosine, -max cosine
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_links = 0
        self.buffer = max(self.LINK_BUFFER, n // 4)

    def add(self, a: np.ndarray, b: np.ndarray, scores: np.ndarray, cosines: np.ndarray | None = None) -> None:
        a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
        scores = np.asarray(scores, dtype=np.float64)
        cosines = scores if cosines is None else np.asarray(cosines, dtype=np.float64)
        distinct = a != b
        a, b, scores, cosines = a[distinct], b[distinct], scores[distinct], cosines[distinct]
        if not len(a):
            return
        self.linked[a] = self.linked[b] = True
        for row, values in zip(self.extremes, (scores, -scores, cosines, -cosines)):
            np.minimum.at(row, a, values)
        self.pending.append((a, b))
        self.pending_links += len(a)
        if self.pending_links >= self.buffer:
            self._hook_pending()

    def _hook_pending(self) -> None:
        if self.pending:
            a, b = (np.concatenate(ends) for ends in zip(*self.pending))
            self.pending, self.pending_links = [], 0
            self.labels = _hook(self.labels, a, b)

    def groups(self) -> list[Group]:
        """Groups of two or more nodes, largest first, then by smallest member."""
        self._hook_pending()
        nodes = np.flatnonzero(self.linked)
        if not len(nodes):
            return []
        labels = self.labels[nodes]
        order = np.argsort(labels, kind="stable")
        bounds = np.flatnonzero(np.r_[True, labels[order][1:] != labels[order][:-1], True])
        extremes = np.minimum.reduceat(self.extremes[:, nodes[order]], bounds[:-1], axis=1)
        groups = [Group(nodes[order[start:end]], float(low), float(-high), float(low_cos), float(-high_cos))
                  for start, end, low, high, low_cos, high_cos in zip(bounds[:-1], bounds[1:], *extremes)]
        groups.sort(key=lambda g: (-len(g.members), int(g.members[0])))
        return groups


def group_pairs(a: np.ndarray, b: np.ndarray, scores: np.ndarray, cosines: np.ndarray | None = None) -> list[Group]:
    """Groups of two or more rows from verified pairs a[i]–b[i], largest first, then by smallest member.
    `cosines` (default: the scores) are the links' plain cosines where the scores are normalised."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    if len(a) == 0:
        return []
    nodes, local = np.unique(np.r_[a, b], return_inverse=True)
    builder = GroupBuilder(len(nodes))
    builder.add(local[: len(a)], local[len(a):], scores, cosines)
    return [Group(nodes[g.members], g.min_score, g.max_score, g.min_cosine, g.max_cosine) for g in builder.groups()]
