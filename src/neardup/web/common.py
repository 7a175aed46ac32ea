"""What web/app.py and web/actions_api.py both use: the API error, the threshold bounds, and the scores
the page shows with the words the CLI uses ("collection-aware score", "cosine").

`dups` links a pair when its score reaches the threshold; the score is collection-aware (neighbourhood)
in an index of neighbourhood.MIN_FILES files or more, else the plain cosine. The page and the API judge a
pair of files (Compare) and a search match with that same rule, so "a copy" means the same everywhere.
"""

from __future__ import annotations

import numpy as np

from .. import neighbourhood

#: Lowest threshold the server computes groups for: below it nearly every pair is a candidate, an
#: O(n²) job no web request should start (the CLI's `dups` takes any threshold).
MIN_DUPS_THRESHOLD = 0.4
#: Highest score a pair can have: the collection-aware score of identical files in the emptiest
#: neighbourhood (cosine 1 - B_MIN + OFFSET = 1.10); plain cosines stop at 1.
MAX_SCORE = round(1 - neighbourhood.B_MIN + neighbourhood.OFFSET, 4)
COLLECTION_AWARE = "collection-aware score"
COSINE = "cosine"


class ApiError(Exception):
    """An answer {"error": message} with this HTTP status; `field` names the request field it concerns
    (the page shows the message next to it)."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def score_name(index) -> str:
    """The name of the score `dups` thresholds in this index, as the page shows it."""
    return COLLECTION_AWARE if neighbourhood.applies(len(_snap(index))) else COSINE


def pair_scores(index, a: int, b: int) -> dict | None:
    """The cosine of two indexed ids and the score `dups` would link them by ({"cosine", "score",
    "score_name"}); None unless both are indexed."""
    cosine = index.similarity(a, b)
    if cosine is None:
        return None
    snap = _snap(index)
    if not neighbourhood.applies(len(snap)):
        return {"cosine": cosine, "score": cosine, "score_name": COSINE}
    positions = np.searchsorted(snap.ids, [a, b])  # snapshot ids are sorted
    if (positions >= len(snap.ids)).any() or not np.array_equal(snap.ids[np.minimum(positions, len(snap.ids) - 1)], [a, b]):
        return None
    values = index.backgrounds(positions, exact=True, snapshot=snap)
    score = float(neighbourhood.normalised(np.array([cosine]), values[positions[:1]], values[positions[1:]])[0])
    return {"cosine": cosine, "score": score, "score_name": COLLECTION_AWARE}


def match_scores(index, vector, matches) -> tuple[str, list[float]]:
    """(score name, the score `dups` would give each match with the query; `vector()` gives the query's
    vector, asked for only when the score is collection-aware). In the collection-aware
    regime the query's background is its cosine to its K-th nearest indexed file (an indexed copy of the
    very same pixels left out, so an upload of an indexed file scores as that file would)."""
    snap = _snap(index)
    if not neighbourhood.applies(len(snap)):
        return COSINE, [m.score for m in matches]
    near = [m.score for m in index.query_vector(vector(), neighbourhood.K + 1)]
    if near and near[0] >= 0.9999:
        near = near[1:]
    kth = near[neighbourhood.K - 1] if len(near) >= neighbourhood.K else 0.0
    b_query = float(neighbourhood.backgrounds(np.array([kth]))[0])
    ids = np.array([m.id for m in matches], dtype=np.int64)
    positions = np.searchsorted(snap.ids, ids)
    known = (positions < len(snap.ids)) & (snap.ids[np.minimum(positions, len(snap.ids) - 1)] == ids)
    values = index.backgrounds(positions[known], snapshot=snap) if known.any() else None
    scores = []
    for m, position, ok in zip(matches, positions, known):
        b = float(values[position]) if ok else neighbourhood.B_MAX
        scores.append(float(neighbourhood.normalised(np.array([m.score]), np.array([b_query]), np.array([b]))[0]))
    return COLLECTION_AWARE, scores


def _snap(index):
    return index._search_state().snap  # the snapshot the search and the backgrounds use (cached per version)
