"""neardup: near-duplicate image search (CNN embeddings, sign-random-projection LSH, an index in a folder)."""

__version__ = "0.1.0"

from .index import AddSummary, DuplicateGroup, Index, Match  # noqa: E402

__all__ = ["AddSummary", "DuplicateGroup", "Index", "Match", "__version__"]
