"""neardup: near-duplicate image search (CNN embeddings, sign-random-projection LSH, an index in a folder)."""

__version__ = "0.1.0"

import os

# ONNX Runtime 1.32's Linux wheels collect telemetry (1DS) unless told not to before their first session: a
# photo tool that runs offline keeps to itself, and where the device id cannot be persisted (another user,
# a read-only home) ONNX Runtime printed a warning on stderr beside neardup's own one-line errors. A value
# the user set wins.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from .index import AddSummary, DuplicateGroup, Index, Match  # noqa: E402

__all__ = ["AddSummary", "DuplicateGroup", "Index", "Match", "__version__"]
