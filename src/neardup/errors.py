"""Every error neardup raises for a user, in one module that imports nothing of neardup's.

Each carries one line worded for the user; the CLI and the server print that line (``--debug`` shows the
traceback). Kept apart so that low-level modules (``models/``, ``shards``, ``store``) can raise them
without importing ``index`` (which imports them).
"""

from __future__ import annotations


class NeardupError(Exception):
    """Base of the user-facing errors raised by the Index (one clear line each)."""


class ModelMismatch(NeardupError):
    """The index was built by another model, descriptor or view set than the one asked for."""


class StoreError(Exception):
    """A problem with the index folder, worded for the user."""


class IndexLocked(StoreError):
    """Another process holds the index's writer lock."""


class IndexWriteError(StoreError):
    """Disk full or another write failure: nothing of the failed write was committed."""


class ImageError(Exception):
    """A file that cannot be used as an image; ``reason`` is one line for the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class BackendError(NeardupError):
    """A backend or model that cannot be used here (refused int8 model, bad ONNX file or spec)."""


class ShardError(NeardupError):
    """A file that is not a valid neardup shard, or one made by another model (one line)."""


class ActionError(NeardupError):
    """An action that cannot be planned, applied or undone, worded for the user."""


class RayError(NeardupError):
    """The Ray path cannot run (Ray missing, cluster unreachable, a task failed)."""


class EvalSetError(NeardupError, ValueError):
    """A set that cannot be evaluated (missing truth file, bad schema, unknown match ids)."""
