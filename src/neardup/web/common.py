"""What web/app.py and web/actions_api.py both use: the API error, the threshold bounds, and the scores
the page shows with the words the CLI uses ("copy probability", "cosine").

`dups` links a pair when its copy probability (neardup.calibration) reaches the threshold; the
probability is that of the collection-aware score (neighbourhood) in an index of
neighbourhood.MIN_FILES files or more, else of the plain cosine. The page and the API judge a pair of
files (Compare) and a search match with that same rule, so "a copy" means the same everywhere.
"""

from __future__ import annotations

import numpy as np

from .. import calibration, neighbourhood

#: Lowest threshold the page offers and the server computes groups for: below it a linked pair is more
#: likely two look-alikes than a copy (the CLI's `dups` takes any threshold in (0, 1]).
MIN_DUPS_THRESHOLD = 0.5
COPY_PROBABILITY = "copy probability"


class ApiError(Exception):
    """An answer {"error": message} with this HTTP status; `field` names the request field it concerns
    (the page shows the message next to it)."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def pair_scores(index, a: int, b: int) -> dict | None:
    """The cosine of two indexed ids and the copy probability `dups` would link them by ({"cosine",
    "score", "score_name"}); None unless both are indexed."""
    cosine = index.similarity(a, b)
    if cosine is None:
        return None
    snap = _snap(index)
    if not neighbourhood.applies(len(snap)):
        return {"cosine": cosine, "score": float(calibration.probability(cosine, False)), "score_name": COPY_PROBABILITY}
    positions = np.searchsorted(snap.ids, [a, b])  # snapshot ids are sorted
    if (positions >= len(snap.ids)).any() or not np.array_equal(snap.ids[np.minimum(positions, len(snap.ids) - 1)], [a, b]):
        return None
    values = index.backgrounds(positions, exact=True, snapshot=snap)
    raw = neighbourhood.normalised(np.array([cosine]), values[positions[:1]], values[positions[1:]])
    return {"cosine": cosine, "score": float(calibration.probability(raw, True)[0]), "score_name": COPY_PROBABILITY}


def match_scores(index, vector, matches) -> tuple[str, list[float]]:
    """(score name, the copy probability `dups` would give each match with the query; `vector()` gives
    the query's vector, asked for only when the score is collection-aware). In the collection-aware
    regime the query's background is its cosine to its K-th nearest indexed file (an indexed copy of the
    very same pixels left out, so an upload of an indexed file scores as that file would)."""
    snap = _snap(index)
    if not neighbourhood.applies(len(snap)):
        return COPY_PROBABILITY, [float(p) for p in calibration.probability([m.score for m in matches], False)]
    near = [m.score for m in index.query_vector(vector(), neighbourhood.K + 1)]
    if near and near[0] >= 0.9999:
        near = near[1:]
    kth = near[neighbourhood.K - 1] if len(near) >= neighbourhood.K else 0.0
    b_query = float(neighbourhood.backgrounds(np.array([kth]))[0])
    ids = np.array([m.id for m in matches], dtype=np.int64)
    positions = np.searchsorted(snap.ids, ids)
    known = (positions < len(snap.ids)) & (snap.ids[np.minimum(positions, len(snap.ids) - 1)] == ids)
    b_matches = np.full(len(matches), neighbourhood.B_MAX)
    if known.any():
        b_matches[known] = index.backgrounds(positions[known], snapshot=snap)[positions[known]]
    raw = neighbourhood.normalised(np.array([m.score for m in matches], dtype=np.float64), b_query, b_matches)
    return COPY_PROBABILITY, [float(p) for p in calibration.probability(raw, True)]


def _snap(index):
    return index._search_state().snap  # the snapshot the search and the backgrounds use (cached per version)
