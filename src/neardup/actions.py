"""Acting on duplicate groups without fear: keep the best file of each group, move, hard-link or delete
the others, write a manifest of every step, and undo it.

    plan = make_plan(index_root, groups, "move", to="dups-moved")   # reads only; this IS the dry run
    manifest = apply_plan(plan)                                      # does exactly that plan
    undo(manifest)                                                   # puts every file back

Where each duplicate's bytes go (``destination`` in the manifest):

* ``move``: ``--to DIR`` / the file's path relative to the deepest folder holding every acted-on file.
* ``delete``: ``<index>/trash/<run id>/`` / that same relative path. Nothing is unlinked: delete moves the
  bytes into the trash, so ``undo`` can restore them; ``purge_trash`` (``neardup purge-trash``) removes
  run folders older than some days to free the space (after that those runs cannot be undone).
* ``hardlink``: the file's old bytes go to the trash as for delete, then the file becomes a hard link to
  its group's survivor (link to a temporary name, then an atomic rename over the file).

Safety:

* The plan hashes every file it would touch; a file whose size or sha256 no longer matches the catalog
  (changed since indexing), that is missing or a symbolic link, is skipped with a reason. Files under
  ``keep_in`` folders are never touched and are preferred as survivors; ``keep_in`` and ``--to`` are
  compared as real folders (a symlinked spelling names the same folder), and a ``keep_in`` folder that
  holds no catalogued file is reported in ``Plan.warnings``.
* A path is not an identity: two catalog paths that reach one file (a symlinked folder or a bind mount
  indexed twice, a hard link) are never a duplicate pair, for every action, at plan and at apply time.
* Apply re-checks right before every step: the source and the survivor are each opened without following
  symbolic links and hashed from the open descriptor (sha256 as planned), and every new link made is
  checked to be the inode that was verified. A failed check skips the entry with its reason; a survivor
  gone since the plan keeps its duplicate in place, so a group never loses all its copies.
* Undo never overwrites: a file put back needs its source path free, or (hard link runs) still the link
  the run left there. Every entry that cannot be put back is recorded with its reason ("not restored:
  ..."), the others are restored, the index synced and the manifest rewritten; a re-run retries only those.
* Moving never overwrites: a hard link to the new name then an unlink of the old one on one filesystem
  (the file exists under at least one name at every instant), else copy to a temporary name + fsync +
  sha256 check + link into place + unlink of the source.
* Journal: the manifest (every entry 'planned') is written atomically before the first file is touched,
  every finished step appends a line to ``<manifest>.journal`` (fsynced), and the end rewrites the
  manifest with final statuses. Where a crash left the journal one step behind, the files themselves
  (sha256, inode) say what happened, so ``undo`` and the next apply's recovery act on disk facts.
* The index is changed in the same run, one commit per batch of steps (a moved file keeps its vector
  under its new path; a deleted file is removed; a hard-linked file takes its survivor's bytes and
  vector). An interrupted run's index changes are completed by the next apply or undo.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import files
from .errors import ActionError, ImageError  # noqa: F401 (ActionError re-exported)
from .files import FileCheckError
from .index import DuplicateGroup, NeardupError, finish_write
from .store import Record, Store, fsync_dir

log = logging.getLogger(__name__)

ACTIONS = ("move", "hardlink", "delete")
KEEP_CRITERIA = ("shape", "central", "pixels", "size", "oldest", "newest", "shortest-path")
SAME_PIXELS = 1.5  # mean grey levels between THUMB x THUMB thumbnails of one picture at two sizes (half: 0.4-1.4)
LARGER = 1.5  # pixels: a version of a picture at least this much larger is another size of it, not an edit
CENTRAL_NEAR = 0.005  # descriptor centrality within this of the best: decided on pixels
THUMB = 32
SHAPE_TOLERANCE = 0.02  # log aspect ratio: rounding of crops and thumbnails stays inside, a 6 % frame does not
DEFAULT_KEEP = ("shape", "central", "pixels", "size", "oldest")
MANIFEST_VERSION = 1
ACTIONS_DIR = "actions"  # inside the index folder: one manifest per applied run
TRASH_DIR = "trash"
_INDEX_BATCH = 64  # steps per index commit
_TMP_PREFIX = ".neardup-tmp-"

ProgressCallback = Callable[[int, int], None]  # (steps done, steps planned)
Identity = tuple[int, int]  # (st_dev, st_ino): what a path reaches, whatever its spelling


class UndoIncomplete(ActionError):
    """An undo that put back every file it could but not all of them. The index is synced and the
    manifest rewritten before this is raised: `plan` (state 'partly-undone'; the entries not put back
    keep status 'done' and say why in `reason`), `reembed` (restored paths to `Index.add`, as `undo`
    returns), `not_restored` (those entries)."""

    def __init__(self, message: str, plan: Plan, reembed: list[str]):
        super().__init__(message)
        self.plan, self.reembed = plan, reembed
        self.not_restored = [e for e in plan.entries if e.status == "done"]


@dataclass
class Entry:
    """One file acted on. status: 'planned', 'done', 'skipped' (with a reason, nothing touched) or
    'undone'. `destination` is where the file's own bytes went; `survivor` the file kept in its group.
    After an undo, an entry still 'done' was not put back; its `reason` ("not restored: ...") says why."""

    group: int
    action: str
    source: str
    destination: str | None
    survivor: str
    sha256: str
    size: int
    survivor_sha256: str
    status: str = "planned"
    reason: str | None = None


@dataclass
class Plan:
    id: str
    action: str
    index: str
    created: str
    keep: list[str]
    keep_in: list[str]
    to: str | None
    trash: str | None
    threshold: float | None
    entries: list[Entry] = field(default_factory=list)
    state: str = "planned"  # planned -> applying -> applied | interrupted -> undone | partly-undone
    manifest: str | None = None
    warnings: list[str] = field(default_factory=list)  # e.g. a --keep-in folder that holds no catalogued file
    created_dirs: list[str] = field(default_factory=list)  # folders apply made (undo removes them once empty)

    @property
    def todo(self) -> list[Entry]:
        return [e for e in self.entries if e.status == "planned"]

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("manifest")
        return {"version": MANIFEST_VERSION, **data}

    @classmethod
    def from_json(cls, data: dict, manifest: str | None = None) -> Plan:
        data = dict(data)
        version = data.pop("version", None)
        if version != MANIFEST_VERSION:
            raise ActionError(f"manifest version {version} is not supported (this neardup writes {MANIFEST_VERSION})")
        entries = [Entry(**e) for e in data.pop("entries")]
        return cls(**data, entries=entries, manifest=manifest)


# ---- choosing the survivor ---------------------------------------------------------------------


def parse_keep(text: str) -> tuple[str, ...]:
    """'pixels,size,oldest' -> ('pixels', 'size', 'oldest'); raises ActionError for an unknown name."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [n for n in names if n not in KEEP_CRITERIA]
    if unknown or not names:
        raise ActionError(f"unknown keep criterion {', '.join(unknown) or '(none)'}; choose from {', '.join(KEEP_CRITERIA)}")
    return names


def centrality(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """Each member's mean cosine to the other members of its group (pure; unit or not)."""
    v = np.asarray(vectors, dtype=np.float64)
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    if len(v) < 2:
        return np.ones(len(v))
    sims = v @ v.T
    return (sims.sum(axis=1) - np.diag(sims)) / (len(v) - 1)


def shape_outliers(records: Sequence[Record]) -> np.ndarray:
    """Members whose aspect ratio (within SHAPE_TOLERANCE) fewer than half as many others share as the best
    shared one: edits that keep the picture's shape (re-encodes, filters, captions, logos, flips, crops and
    thumbnails of the whole) agree with the original's; a stretched, squashed or framed copy stands alone.
    In a pair, or where every shape is alone, nobody is an outlier."""
    ratios = np.array([np.log(max(r.width or 1, 1) / max(r.height or 1, 1)) for r in records])
    shared = (np.abs(ratios[:, None] - ratios[None, :]) <= SHAPE_TOLERANCE).sum(axis=1) - 1
    return shared < 0.5 * shared.max()


def _pixels(record: Record) -> int:
    return (record.width or 0) * (record.height or 0)


def _looks(paths: Sequence[str]) -> list[tuple[np.ndarray | None, bool]]:
    """(a THUMB x THUMB RGB thumbnail, whether the file shows a uniform frame) of each file, read safely
    (JPEG draft decoding: a few ms each); an unreadable file gives (None, True): it is no survivor."""
    from PIL import Image

    from .images import load_image
    from .models.default_model import border_box

    out = []
    for path in paths:
        try:
            image = load_image(path, min_side=4 * THUMB).image
            thumb = np.asarray(image.resize((THUMB, THUMB), Image.Resampling.BOX), dtype=np.float32)
            out.append((thumb, border_box(image) is not None))
        except (ImageError, NeardupError, OSError, ValueError):
            out.append((None, True))
    return out


def _central_best(records: Sequence[Record], vectors: dict[str, np.ndarray], eligible: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the members 'central' ranks first, as a mask; every member's descriptor centrality).

    The original is the member every copy was made from: one edit from each copy, two from any other
    copy. So it is the most central by descriptor (mean cosine to the others) - up to noise of a few
    thousandths, which copies that change little (a caption, a logo, a re-encode) can win. Members within
    CENTRAL_NEAR of the best are therefore compared once more, on pixels: each one's mean distance to the
    others as THUMB x THUMB thumbnails, where edits add up (a caption copy is a caption away from the
    original and a caption plus an edit from every other copy); a framed one loses to an unframed one.
    The winner ranks first together with any member the pixels cannot tell from it (in a pair, both are
    as far from each other) and any larger version of it (the same shape, at least LARGER times its
    pixels, thumbnails within SAME_PIXELS grey levels): the next criterion decides between those (by
    default the most pixels: a larger version of the picture is the better file, whichever came first)."""
    central = centrality([vectors[r.path] for r in records])
    top = float(central[eligible].max())
    near = np.flatnonzero(eligible & (central >= top - CENTRAL_NEAR))
    best = np.zeros(len(records), bool)
    thumbs: dict[int, np.ndarray | None] = {}
    framed: dict[int, bool] = {}

    def look(indices) -> None:
        missing = [int(i) for i in indices if int(i) not in thumbs]
        for i, (thumb, frame) in zip(missing, _looks([records[i].path for i in missing])):
            thumbs[i], framed[i] = thumb, frame

    def apart(i: int, j: int) -> float:
        if thumbs[i] is None or thumbs[j] is None:
            return 255.0
        return float(np.abs(thumbs[i] - thumbs[j]).mean())

    winner = int(near[0])
    if len(near) > 1:
        look(range(len(records)))
        spread = {int(i): float(np.mean([apart(i, j) for j in range(len(records)) if j != i])) for i in near}
        winner = min(spread, key=lambda i: (framed[i], spread[i], -central[i]))
        for i in near:  # as far from the others as the winner is: the pixels cannot tell them apart
            best[i] = framed[i] == framed[winner] and abs(spread[i] - spread[winner]) <= 1e-6
    best[winner] = True
    shape = np.log(max(records[winner].width or 1, 1) / max(records[winner].height or 1, 1))
    larger = [i for i, r in enumerate(records) if eligible[i] and _pixels(r) >= LARGER * _pixels(records[winner])
              and abs(np.log(max(r.width or 1, 1) / max(r.height or 1, 1)) - shape) <= SHAPE_TOLERANCE]
    if larger:
        look([winner, *larger])
        for i in larger:  # (a frame added around the picture is no larger version of it)
            best[i] = framed[i] <= framed[winner] and apart(i, winner) <= SAME_PIXELS
    return best, central


def catalogued_survivor(store: Store, paths: Sequence[str], keep: Sequence[str] = DEFAULT_KEEP) -> Record:
    """`choose_survivor` of catalogued files, with their records and stored vectors read from `store`."""
    records = [store.record(p) for p in paths]
    return choose_survivor(records, keep, vectors=_stored_vectors(store, records, keep))


def _stored_vectors(store: Store, records: Sequence[Record], keep: Sequence[str]) -> dict[str, np.ndarray] | None:
    """What 'central' compares (path -> stored vector); None when `keep` does not use it."""
    return {r.path: store.vector(r.id) for r in records} if "central" in keep else None


def choose_survivor(records: Sequence[Record], keep: Sequence[str], *, vectors: dict[str, np.ndarray] | None = None,
                    protected: Callable[[Record], bool] = lambda record: False) -> Record:
    """The member of a group to keep: files under --keep-in first, then the criteria in order, then the
    path, so equal files always resolve the same way. 'central' needs `vectors` (path -> stored vector)."""
    return sorted(records, key=_rank_keys(records, keep, vectors, protected))[0]


def _rank_keys(records: Sequence[Record], keep: Sequence[str], vectors: dict[str, np.ndarray] | None,
               protected: Callable[[Record], bool]):
    """Sort key over one group's records: the smallest key survives.

    'shape': a shape outlier (`shape_outliers`) ranks after the others. 'central': the member
    `_central_best` ranks first, the others by their descriptor centrality; chosen among the members
    that the criteria before it leave tied on 'shape' and on --keep-in."""
    outliers = shape_outliers(records) if "shape" in keep else np.zeros(len(records), bool)
    position = {r.path: i for i, r in enumerate(records)}
    central_key: dict[str, tuple] = {}
    if "central" in keep:
        guarded = np.array([protected(r) for r in records])
        eligible = guarded if guarded.any() else np.ones(len(records), bool)
        if "shape" in keep[:keep.index("central")] and (eligible & ~outliers).any():
            eligible = eligible & ~outliers
        best, central = _central_best(records, vectors, eligible)
        central_key = {r.path: (0, 0.0) if best[i] else (1, float(central.max() - central[i]))
                       for i, r in enumerate(records)}

    def key(record: Record):
        values = {
            "shape": lambda: bool(outliers[position[record.path]]),
            "central": lambda: central_key[record.path],
            "pixels": lambda: -_pixels(record),
            "size": lambda: -record.size,
            "oldest": lambda: record.mtime_ns,
            "newest": lambda: -record.mtime_ns,
            "shortest-path": lambda: len(record.path),
        }
        return (not protected(record), *(values[name]() for name in keep), record.path)

    return key


# ---- planning ---------------------------------------------------------------------------------


def make_plan(index_root: str | os.PathLike, groups: Iterable[DuplicateGroup], action: str, *,
              to: str | os.PathLike | None = None, keep: Sequence[str] = DEFAULT_KEEP,
              keep_in: Sequence[str | os.PathLike] = (), threshold: float | None = None) -> Plan:
    """What `apply_plan` will do, file by file: the survivor of each group by `keep` (files under
    `keep_in` first and never touched), every other member checked against the catalog (size, sha256,
    not a symbolic link, not the survivor's own file by another path) and given its destination.
    Reads only. `Plan.warnings` lists what the user should know (also logged)."""
    if action not in ACTIONS:
        raise ActionError(f"unknown action {action!r}; choose from {', '.join(ACTIONS)}")
    if action == "move" and not to:
        raise ActionError("--action move needs --to DIR")
    root = Path(index_root).absolute()
    if action == "move":
        _refuse_index_target(str(to), root)
    keep = tuple(keep)
    protected_folders = [files.real_folder(f) for f in keep_in]
    now = time.time()
    run_id = f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}.{int(now * 1000) % 1000:03d}-{uuid.uuid4().hex[:6]}"
    trash = str(root / TRASH_DIR / run_id) if action in ("delete", "hardlink") else None
    target = os.path.abspath(to) if action == "move" else trash
    plan = Plan(run_id, action, str(root), datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                list(keep), protected_folders, os.path.abspath(to) if to else None, trash, threshold)
    # files an earlier move already put in --to are done with: neither acted on again nor survivors
    handled = [files.real_folder(to)] if action == "move" else []
    with Store.open(root) as store:
        plan.warnings = [f"--keep-in {folder} holds no catalogued file: it protects nothing"
                         for folder in protected_folders if not _holds_catalogued(store, folder)]
        chosen: list[tuple[int, Record, list[Record]]] = []
        for number, group in enumerate(groups, 1):
            records = [r for r in (store.record(p) for p in group.files)
                       if r is not None and r.status == "indexed" and not files.is_within(r.path, handled)]
            if len(records) < 2:
                continue
            ranked = sorted(records, key=_rank_keys(records, keep, _stored_vectors(store, records, keep),
                                                    lambda r: files.is_within(r.path, protected_folders)))
            chosen.append((number, ranked[0], ranked[1:]))
    for warning in plan.warnings:
        log.warning("neardup: warning: %s", warning)
    acted = [r.path for _, _, others in chosen for r in others if not files.is_within(r.path, protected_folders)]
    base = os.path.commonpath([os.path.dirname(p) for p in acted]) if acted else os.sep
    taken: set[str] = set()
    survivors: dict[Identity, str] = {}  # every survivor's file: no path to it is acted on, in any group
    checked = []
    for number, survivor, others in chosen:
        try:
            kept = _verify(survivor.path, survivor.sha256, survivor.size)
            survivors.setdefault(kept, survivor.path)
            checked.append((number, survivor, others, kept, None))
        except FileCheckError as exc:
            checked.append((number, survivor, others, None, _since_indexing(survivor.path, exc)))
    acted_on: dict[Identity, str] = {}
    for number, survivor, others, kept, survivor_problem in checked:
        for record in others:
            entry = Entry(number, action, record.path, None, survivor.path, record.sha256 or "", record.size,
                          survivor.sha256 or "")
            plan.entries.append(entry)
            if files.is_within(record.path, protected_folders):
                entry.status, entry.reason = "skipped", "under a --keep-in folder"
                continue
            try:
                identity = _verify(record.path, record.sha256, record.size)
            except FileCheckError as exc:
                entry.status, entry.reason = "skipped", _since_indexing(record.path, exc)
                continue
            problem = survivor_problem and f"its survivor {survivor.path}: {survivor_problem}"
            if not problem and identity in survivors:
                problem = _same_file_reason(record.path, survivors[identity])
            if not problem and identity in acted_on:
                problem = f"the same file as {acted_on[identity]}, which this plan already acts on (another path to it)"
            if not problem and action == "hardlink" and identity[0] != kept[0]:
                problem = "on another filesystem than its survivor (a hard link cannot cross filesystems)"
            if problem:
                entry.status, entry.reason = "skipped", problem
                continue
            acted_on[identity] = record.path
            entry.destination = _free_name(os.path.join(target, os.path.relpath(record.path, base)), taken)
    return plan


def _refuse_index_target(to: str, index_root: str | os.PathLike) -> None:
    """A move target whose real location is the index folder or lies inside it is refused: neardup owns
    every file there (segments it sweeps, trash it purges, manifests it rewrites), so photos put there
    could be deleted as neardup's own leftovers."""
    index = files.real_folder(index_root)
    target = files.real_folder(to)
    if target == index or target.startswith(index.rstrip(os.sep) + os.sep):
        spelled = "" if os.path.abspath(to) == target else f" (it leads to {target})"
        raise ActionError(f"the move target {to} is inside the index folder {index}{spelled}, where neardup keeps its own "
                          "files and may delete unknown ones: choose a folder outside it")


def _holds_catalogued(store: Store, folder: str) -> bool:
    """Whether any catalogued file lies in `folder` (a real folder), whatever spelling indexed it."""
    if store.paths_under([folder]):
        return True
    inside: dict[str, bool] = {}  # the catalog may spell it through a symlink: resolve each parent once
    for record in store.records():
        parent = os.path.dirname(record.path)
        if parent not in inside:
            inside[parent] = files.is_within(record.path, [folder])
        if inside[parent]:
            return True
    return False


def _verify(path: str, sha256: str | None, size: int | None) -> Identity:
    """(dev, inode) of the regular file at `path`, after checking it holds `size` bytes hashing to
    `sha256`; read from one descriptor opened without following a symbolic link, so the file checked is
    the one whose identity is returned.

    Raises:
        FileCheckError: its one-line reason (missing, a symbolic link, "size differs", "sha256 differs"...).
    """
    try:
        with files.open_regular(path) as stream:
            info = os.fstat(stream.fileno())
            if size is not None and info.st_size != size:
                raise FileCheckError("size differs")
            if files.sha256_of(stream) != sha256:
                raise FileCheckError("sha256 differs")
    except FileCheckError:
        if not os.path.lexists(path):
            raise FileCheckError("missing") from None
        raise
    except OSError as exc:
        raise FileCheckError(f"cannot read file: {exc.strerror or exc}") from None
    return info.st_dev, info.st_ino


def _since_indexing(path: str, problem: FileCheckError) -> str:
    """A plan's reason for a file that is not what the catalog says."""
    reason = str(problem)
    if reason == "missing":
        return "missing (moved or deleted since indexing)"
    if reason in ("size differs", "sha256 differs"):
        return f"changed since indexing ({reason}; re-run `neardup index`)"
    if "symbolic link" in reason:
        return "is a symbolic link (the link would be acted on, not the image)"
    return reason


def _same_file_reason(path: str, survivor: str) -> str:
    if os.path.realpath(path) == os.path.realpath(survivor):
        return ("the same file as its survivor, reached by another path (a symlinked folder): not a duplicate; "
                "acting on it would act on the survivor")
    return "already a hard link to its survivor (the same file under another name): not a duplicate"


def _free_name(path: str, taken: set[str]) -> str:
    """`path`, or 'name (1).ext', 'name (2).ext'... when that exists or another entry took it."""
    stem, ext = os.path.splitext(path)
    candidate, n = path, 0
    while candidate in taken or os.path.lexists(candidate):
        n += 1
        candidate = f"{stem} ({n}){ext}"
    taken.add(candidate)
    return candidate


# ---- applying ---------------------------------------------------------------------------------


def apply_plan(plan: Plan, *, manifest: str | os.PathLike | None = None, wait: bool = True,
               on_wait: Callable[[], None] | None = None, progress: ProgressCallback | None = None,
               check: Callable[[], None] | None = None) -> Plan:
    """Execute the plan under the index's writer lock; returns it with statuses filled in and
    `manifest` set to where it was written (default: <index>/actions/<id>.json). `check`, when given, runs
    once the lock is held and interrupted runs are settled, before anything is written: an exception from
    it leaves the plan unapplied (the server uses it to refuse a plan the index has moved on from)."""
    root = Path(plan.index)
    with Store.open(root, write=True, wait=wait, on_wait=on_wait) as store:
        recover(store)
        if check is not None:
            check()
        if plan.action == "move":  # the target may have become a symbolic link into the index since the plan
            _refuse_index_target(plan.to, root)
        plan.manifest = str(manifest or root / ACTIONS_DIR / f"{plan.id}.json")
        plan.state = "applying"
        plan.created_dirs = _folders_to_create(plan)  # recorded before any is made: a crash cannot lose them
        _write_manifest(plan)
        journal = _Journal(plan.manifest)
        number = {id(e): i for i, e in enumerate(plan.entries)}
        todo = plan.todo
        pending: list[Entry] = []
        try:
            for done, entry in enumerate(todo, 1):
                try:
                    _do(plan, entry)
                    entry.status = "done"
                except _Skip as exc:  # a check failed before anything was touched
                    entry.status, entry.reason = "skipped", str(exc)
                except (OSError, ActionError) as exc:
                    if disk_state(entry) == "done":  # failed after its last step (e.g. a folder fsync)
                        entry.status = "done"
                    else:
                        _remove_partial(plan, entry)
                        entry.status, entry.reason = "skipped", f"failed: {_message(exc)}"
                journal.record(number[id(entry)], entry.status, entry.reason)
                if entry.status == "done":
                    pending.append(entry)
                if len(pending) >= _INDEX_BATCH:
                    _sync_index(store, plan, pending)
                    pending = []
                if progress:
                    progress(done, len(todo))
        finally:
            journal.close()
        _sync_index(store, plan, pending)
        plan.state = "applied"
        _write_manifest(plan)
        journal.remove()
    return plan


class _Skip(Exception):
    """A re-check before a step failed: the entry is skipped with this reason, nothing was touched."""


def _do(plan: Plan, entry: Entry) -> None:
    """One step, after re-checking both files right before it: the plan may be minutes old."""
    try:
        source = _verify(entry.source, entry.sha256, entry.size)
    except FileCheckError as exc:
        raise _Skip(_since_plan(str(exc))) from None
    try:
        survivor = _verify(entry.survivor, entry.survivor_sha256, None)
    except FileCheckError as exc:
        reason = str(exc)
        if reason == "missing":
            raise _Skip(f"its survivor {entry.survivor} is gone (moved or deleted since the plan): "
                        "this copy is kept") from None
        raise _Skip(f"its survivor {entry.survivor} {_since_plan(reason)}: this copy is kept") from None
    if source == survivor:
        raise _Skip(_same_file_reason(entry.source, entry.survivor))
    if entry.action == "move" and files.is_within(entry.destination, [files.real_folder(plan.index)]):
        raise _Skip(f"its destination {entry.destination} now leads into the index folder (a folder on the way "
                    "was replaced by a symbolic link since the plan): this copy is kept")
    if entry.action in ("move", "delete"):
        _move_file(entry.source, entry.destination, entry.sha256, source)
    else:
        _hardlink(plan, entry, source, survivor)


def _since_plan(reason: str) -> str:
    if reason == "missing":
        return "missing (moved or deleted since the plan)"
    if reason in ("size differs", "sha256 differs"):
        return f"changed since the plan ({reason})"
    return reason


def _link_checked(source: str, destination: str, identity: Identity) -> None:
    """Hard-link `source` (never a symbolic link's target) to the new name `destination`, and make sure
    the new name is the verified file: a file swapped in at `source` after the check is not linked."""
    os.link(source, destination, follow_symlinks=False)
    if files.identity(destination, follow_symlinks=False) != identity:
        os.unlink(destination)  # the new name we just made, not the user's file
        raise ActionError(f"{source} changed while being acted on; left in place")


def _unlink_checked(path: str, identity: Identity) -> None:
    """Remove the name `path` only while it still is the verified file (its bytes have another name)."""
    if files.identity(path, follow_symlinks=False) != identity:
        raise ActionError(f"{path} changed while being acted on; left in place")
    os.unlink(path)


def _move_file(source: str, destination: str, sha256: str, identity: Identity) -> None:
    """Move the verified file `identity` without overwriting anything and without a moment where its
    bytes exist nowhere."""
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    try:
        _link_checked(source, destination, identity)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise ActionError(f"destination {destination} already exists") from None
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        _copy_verified(source, destination, sha256)
    fsync_dir(os.path.dirname(destination))
    _unlink_checked(source, identity)
    fsync_dir(os.path.dirname(source))


def _copy_verified(source: str, destination: str, sha256: str) -> None:
    """Copy to a temporary name beside `destination`, fsync, check sha256, link into place."""
    folder = os.path.dirname(destination)
    tmp = os.path.join(folder, f"{_TMP_PREFIX}{uuid.uuid4().hex[:8]}")
    try:
        with files.open_regular(source) as src, open(tmp, "xb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        shutil.copystat(source, tmp, follow_symlinks=False)  # times and mode only; the bytes are checked next
        with open(tmp, "rb") as copied:
            matches = files.sha256_of(copied) == sha256
        if not matches:
            raise ActionError(f"the copy of {source} does not match its sha256; source left in place")
        os.link(tmp, destination, follow_symlinks=False)  # fails rather than overwrite
    except FileCheckError as exc:
        raise ActionError(f"{source}: {exc}") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _hardlink(plan: Plan, entry: Entry, source: Identity, survivor: Identity) -> None:
    """Keep the file's bytes in the trash, then atomically replace it by a hard link to the survivor."""
    if source[0] != survivor[0]:
        raise _Skip("on another filesystem than its survivor (a hard link cannot cross filesystems)")
    os.makedirs(os.path.dirname(entry.destination), exist_ok=True)
    try:
        _link_checked(entry.source, entry.destination, source)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise ActionError(f"trash entry {entry.destination} already exists") from None
        if exc.errno != errno.EXDEV:  # the trash (in the index folder) may be on another filesystem
            raise
        _copy_verified(entry.source, entry.destination, entry.sha256)
    fsync_dir(os.path.dirname(entry.destination))
    tmp = _link_tmp(plan, entry)
    if os.path.lexists(tmp):
        os.unlink(tmp)
    _link_checked(entry.survivor, tmp, survivor)
    if files.identity(entry.source, follow_symlinks=False) != source:
        os.unlink(tmp)
        raise ActionError(f"{entry.source} changed while being acted on; left in place")
    os.replace(tmp, entry.source)
    fsync_dir(os.path.dirname(entry.source))


def _link_tmp(plan: Plan, entry: Entry) -> str:
    tag = hashlib.sha256(entry.source.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return os.path.join(os.path.dirname(entry.source), f"{_TMP_PREFIX}{plan.id}-{tag}")


# ---- what the disk says --------------------------------------------------------------------------


def disk_state(entry: Entry) -> str:
    """'done' when the entry's step is complete on disk, 'undone' when the source still is its old self
    (never done, or undone), 'lost' when its bytes are found nowhere (must never happen)."""
    if entry.action == "hardlink":
        # the source is "undone" only while it is its own inode with its old bytes: byte-identical copies
        # hold the same sha256 after the link too; a survivor edited or moved later breaks neither case
        if not files.same_file(entry.source, entry.survivor) and _holds(entry.source, entry.sha256, entry.size):
            return "undone"
        if entry.destination and _holds(entry.destination, entry.sha256, entry.size):
            return "done"
        return "lost"
    if _holds(entry.source, entry.sha256, entry.size):
        return "undone"
    if entry.destination and _holds(entry.destination, entry.sha256, entry.size):
        return "done"
    return "lost"


def _holds(path: str, sha256: str, size: int | None) -> bool:
    """Whether `path` is a regular file (not a symbolic link) holding these bytes."""
    try:
        _verify(path, sha256, size)
    except FileCheckError:
        return False
    return True


# ---- keeping the index in step ---------------------------------------------------------------------


def _sync_index(store: Store, plan: Plan, entries: Sequence[Entry], *, undo: bool = False) -> None:
    """Make the catalog say what the disk says for these entries, in one commit. Idempotent: a change
    already recorded is not made twice. Undone deletes and hard links need re-embedding: their paths
    are returned for `Index.add`."""
    moves: list[tuple[str, str]] = []
    removed: list[str] = []
    linked: list[tuple[str, str]] = []
    for entry in entries:
        if not undo:
            if entry.action == "move" and store.record(entry.source) and not store.record(entry.destination):
                moves.append((entry.source, entry.destination))
            elif entry.action == "delete" and store.record(entry.source):
                removed.append(entry.source)
            elif entry.action == "hardlink":
                known = store.record(entry.source)
                if known and known.sha256 != entry.survivor_sha256:
                    linked.append((entry.source, entry.survivor))
        elif entry.action == "move" and store.record(entry.destination) and not store.record(entry.source):
            moves.append((entry.destination, entry.source))
    if not (moves or removed or linked):
        finish_write(store)  # a run killed after its commit but before the k-NN graph's: bring it up to date
        return
    snap = store.snapshot()
    position = {path: i for i, path in enumerate(snap.paths)}
    records, rows = [], []
    for old, new in moves:
        known = store.record(old)
        if old in position:
            st = os.stat(new)
            records.append(Record(new, st.st_size, st.st_mtime_ns, known.sha256, known.width, known.height))
            rows.append(position[old])
        removed.append(old)
    for path, survivor in linked:
        kept = store.record(survivor)
        if kept is None or survivor not in position:
            removed.append(path)  # nothing to copy the vector from: forget it; `neardup index` re-adds it
            continue
        st = os.stat(path)
        records.append(Record(path, st.st_size, st.st_mtime_ns, kept.sha256, kept.width, kept.height))
        rows.append(position[survivor])
    vectors = codes = None
    if records:
        rows_array = np.asarray(rows, dtype=np.int64)
        vectors, codes = snap.vectors(rows_array), snap.codes(rows_array)
    kept_paths = {r.path for r in records}
    store.commit(vectors=vectors, codes=codes, indexed=records, removed=[p for p in removed if p not in kept_paths])
    finish_write(store)


# ---- recovery and undo ----------------------------------------------------------------------------


def recover_interrupted(index_root: str | os.PathLike, *, wait: bool = True,
                        on_wait: Callable[[], None] | None = None) -> list[str]:
    """`recover` under the index's writer lock (run it before planning from the index after a crash)."""
    with Store.open(index_root, write=True, wait=wait, on_wait=on_wait) as store:
        return recover(store)


def manifests(index_root: str | os.PathLike) -> list[Path]:
    """The manifests in an index's actions folder, oldest run first (run ids start with the time);
    temporary files (dot names) left out."""
    folder = Path(index_root) / ACTIONS_DIR
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [folder / n for n in sorted(names) if n.endswith(".json") and not n.startswith(".")]


def recover(store: Store) -> list[str]:
    """Finish the bookkeeping of runs a crash interrupted: every manifest of this index still marked
    'applying' gets its statuses from the disk, the index is brought in line, leftover temporary links
    are removed, and it is marked 'interrupted'. Returns the manifests recovered."""
    recovered = []
    for path in manifests(store.root):
        try:
            plan = load_manifest(path)
        except ActionError:
            continue
        if plan.state != "applying":
            continue
        _recover_plan(store, plan)
        recovered.append(str(path))
    return recovered


def _recover_plan(store: Store, plan: Plan) -> None:
    """One interrupted run: statuses from the disk, the index in line, the journal folded into the manifest."""
    _settle(plan)
    _sync_index(store, plan, [e for e in plan.entries if e.status == "done"])
    plan.state = "interrupted"
    _write_manifest(plan)
    _Journal(plan.manifest).remove()


def _settle(plan: Plan) -> None:
    """Statuses from the disk for every entry a crash may have left in between."""
    for entry in plan.entries:
        if entry.status in ("planned", "done"):
            state = disk_state(entry)
            if state == "done":
                entry.status = "done"
            elif state == "undone":
                entry.status, entry.reason = "skipped", "interrupted before this step"
                _remove_partial(plan, entry)
        if entry.action == "hardlink" and entry.status != "skipped":
            tmp = _link_tmp(plan, entry)
            if os.path.lexists(tmp):
                os.unlink(tmp)


def _remove_partial(plan: Plan, entry: Entry) -> None:
    """A step cut short may leave a second name (or verified copy) of the source at its destination,
    and a hard-link step its temporary link; the source holds the bytes, so these go."""
    if entry.destination and os.path.lexists(entry.destination) and _holds(entry.destination, entry.sha256, entry.size):
        os.unlink(entry.destination)
    if entry.action == "hardlink":
        tmp = _link_tmp(plan, entry)
        if os.path.lexists(tmp):
            os.unlink(tmp)


def undo(manifest: str | os.PathLike, *, wait: bool = True, on_wait: Callable[[], None] | None = None,
         progress: ProgressCallback | None = None) -> tuple[Plan, list[str]]:
    """Put back every file the manifest's run moved, deleted (into the trash) or replaced by a hard
    link, checking sha256, never overwriting. Idempotent. Returns the plan and the restored paths whose
    vectors must be recomputed (undone deletes and hard links): `Index.add` them.

    An entry that cannot be put back (something else now at its source, its bytes gone) keeps status
    'done' with reason "not restored: ..."; every other entry is still restored, then the index is
    synced and the manifest rewritten (state 'partly-undone'), and `UndoIncomplete` is raised carrying
    the plan and the paths to re-embed. A re-run retries only the entries not restored."""
    plan = load_manifest(manifest)
    reembed: list[str] = []
    with Store.open(plan.index, write=True, wait=wait, on_wait=on_wait) as store:
        recover(store)
        plan = load_manifest(manifest)
        if plan.state == "applying":  # recover() only handles this index's own actions folder
            _recover_plan(store, plan)
        todo = [e for e in plan.entries if e.status == "done"]  # an entry once undone is the user's again
        for n, entry in enumerate(reversed(todo), 1):
            try:
                state = disk_state(entry)
                if state == "done":
                    _restore(entry)
                elif state == "lost":
                    raise ActionError(_lost_reason(plan, entry))
                else:  # back at its source already (an undo cut short): only leftovers to clear
                    _remove_partial(plan, entry)
                if entry.action != "move":
                    reembed.append(entry.source)
                entry.status, entry.reason = "undone", None
            except (OSError, ActionError) as exc:  # this entry stays as the run left it; the others go on
                entry.status, entry.reason = "done", f"not restored: {_message(exc)}"
            if progress:
                progress(n, len(todo))
        _sync_index(store, plan, [e for e in plan.entries if e.status == "undone"], undo=True)
        left = [e for e in todo if e.status == "done"]
        plan.state = "partly-undone" if left else "undone"
        if not left:
            _remove_created_folders(plan)
        _write_manifest(plan)
    if left:
        more = f" (and {len(left) - 1} more; the manifest lists each)" if len(left) > 1 else ""
        raise UndoIncomplete(f"{len(left)} of {len(todo)} files of {manifest} were not restored: "
                             f"{left[0].source}: {left[0].reason.removeprefix('not restored: ')}{more}", plan, reembed)
    return plan, reembed


def _folders_to_create(plan: Plan) -> list[str]:
    """The folders the plan's moves will make (destinations' parents that do not exist yet)."""
    missing: set[str] = set()
    for entry in plan.todo:
        folder = os.path.dirname(entry.destination or "")
        while folder and folder not in missing and not os.path.lexists(folder):
            missing.add(folder)
            folder = os.path.dirname(folder)
    return sorted(missing)


def _remove_created_folders(plan: Plan) -> None:
    """After a complete undo, remove the folders the run made, deepest first, each only while it is an
    empty real folder: anything the user put there since keeps it (and its parents)."""
    for folder in sorted(plan.created_dirs, key=lambda f: f.count(os.sep), reverse=True):
        if os.path.islink(folder):
            continue
        try:
            os.rmdir(folder)
        except OSError:
            continue
        with contextlib.suppress(OSError):
            fsync_dir(os.path.dirname(folder))


def _lost_reason(plan: Plan, entry: Entry) -> str:
    in_trash = plan.trash and entry.destination and entry.destination.startswith(plan.trash + os.sep)
    if in_trash and not os.path.lexists(entry.destination):  # purge-trash removed it (or its whole run)
        return f"its bytes were kept in {plan.trash}, which has been purged"
    return ("neither at its source nor at its destination with its recorded sha256 (changed since, or moved "
            "by a later action: undo later manifests first)")


def _restore(entry: Entry) -> None:
    """Put one entry's bytes back at its source, never over a file that is not what the run left there."""
    try:
        kept = _verify(entry.destination, entry.sha256, entry.size)
    except FileCheckError as exc:
        raise ActionError(f"its bytes at {entry.destination}: {exc}") from None
    if entry.action in ("move", "delete"):
        try:
            _move_file(entry.destination, entry.source, entry.sha256, kept)
        except ActionError as exc:
            if os.path.lexists(entry.source):
                raise ActionError(f"changed since the run: a file is now at {entry.source}; "
                                  f"its old bytes stay at {entry.destination}") from exc
            raise
        return
    # hardlink: the source should still be the link to the survivor the run made; only then is it replaced
    left = _left_by_hardlink(entry)
    if left is None and os.path.lexists(entry.source):
        raise ActionError(f"changed since the run: {entry.source} is no longer the link to its survivor; "
                          f"its old bytes stay at {entry.destination}")
    tmp = os.path.join(os.path.dirname(entry.source), f"{_TMP_PREFIX}undo-{uuid.uuid4().hex[:8]}")
    try:
        try:
            _link_checked(entry.destination, tmp, kept)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _copy_verified(entry.destination, tmp, entry.sha256)
        if left is None:
            os.link(tmp, entry.source, follow_symlinks=False)  # the source name is free: never overwrites
        elif files.identity(entry.source, follow_symlinks=False) != left:
            raise ActionError(f"{entry.source} changed while being restored; left in place")
        else:
            os.replace(tmp, entry.source)
    finally:
        if os.path.lexists(tmp):  # our temporary name (a second name of the kept bytes, or left by a failure)
            os.unlink(tmp)
    fsync_dir(os.path.dirname(entry.source))
    os.unlink(entry.destination)


def _left_by_hardlink(entry: Entry) -> Identity | None:
    """The identity of the source while it still is what a hardlink run left there (the survivor's
    file, or a file with the survivor's bytes if the survivor moved on since), else None."""
    identity = files.identity(entry.source, follow_symlinks=False)
    if identity is None:
        return None
    if identity == files.identity(entry.survivor, follow_symlinks=False):
        return identity
    try:
        return identity if _verify(entry.source, entry.survivor_sha256, None) == identity else None
    except FileCheckError:
        return None


# ---- purging the trash ----------------------------------------------------------------------------


@dataclass
class TrashRun:
    """One run's folder in the trash: what purging it frees (only the files its run put there)."""

    path: str
    age_days: float  # since the folder was last written to (its mtime)
    files: int
    bytes: int
    owned: list[tuple[str, str, int]] = field(default_factory=list, repr=False)  # (path, sha256, size)
    left: list[str] = field(default_factory=list)  # after purging: what its run did not put there, kept


def purge_trash(index_root: str | os.PathLike, older_than_days: float, *, dry_run: bool = False,
                wait: bool = True, on_wait: Callable[[], None] | None = None,
                progress: ProgressCallback | None = None) -> list[TrashRun]:
    """Delete what runs older than `older_than_days` days (by their folder's mtime; 0: all) put in
    ``<index>/trash/``; those runs can no longer be undone. Returns them; with `dry_run` only lists them.

    Only what this index's own manifests put there is deleted: a folder in the trash is a run's only when
    a manifest names it as its trash, and within it only the files its entries moved there, each checked
    (a regular file, not a symbolic link, with the size and sha256 the manifest recorded) right before it
    is unlinked; then the folders left empty. Anything else (files put there by hand, links) stays, and
    so does its folder. A trash folder that is itself a symbolic link is refused. Runs under the writer
    lock, after settling interrupted runs (as apply and undo do)."""
    root = Path(index_root).absolute()
    if dry_run:
        return _old_trash_runs(root, older_than_days)
    with Store.open(root, write=True, wait=wait, on_wait=on_wait) as store:
        recover(store)
        runs = _old_trash_runs(root, older_than_days)
        for done, run in enumerate(runs, 1):
            _purge_run(run)
            if progress:
                progress(done, len(runs))
        if runs:
            fsync_dir(root / TRASH_DIR)
    return runs


def _purge_run(run: TrashRun) -> None:
    for path, sha256, size in run.owned:
        try:
            _verify(path, sha256, size)
        except FileCheckError:
            continue  # not the bytes the run put there: kept, and listed in run.left
        os.unlink(path)
    for folder, subfolders, names in os.walk(run.path, topdown=False):  # os.walk does not follow links
        for name in subfolders:
            with contextlib.suppress(OSError):  # not empty: it holds something this run did not put there
                os.rmdir(os.path.join(folder, name))
    with contextlib.suppress(OSError):
        os.rmdir(run.path)
    if os.path.lexists(run.path):
        run.left = sorted(os.path.join(folder, name) for folder, subfolders, names in os.walk(run.path)
                          for name in names + [d for d in subfolders if os.path.islink(os.path.join(folder, d))])


def _old_trash_runs(root: Path, older_than_days: float) -> list[TrashRun]:
    trash = root / TRASH_DIR
    if os.path.islink(trash) or (trash.exists() and not trash.is_dir()):
        raise ActionError(f"{trash} is not a plain folder (a symbolic link?); nothing purged")
    if not trash.exists():
        return []
    owners: dict[str, Plan] = {}  # run folder name -> the plan whose trash it is
    for path in manifests(root):
        try:
            plan = load_manifest(path)
        except ActionError as exc:
            log.warning("neardup: warning: %s", exc)
            continue
        if plan.trash and files.real_folder(os.path.dirname(plan.trash)) == files.real_folder(trash):
            owners[os.path.basename(plan.trash)] = plan
    now = time.time()
    runs = []
    with os.scandir(trash) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            plan = owners.get(entry.name)
            if plan is None or not entry.is_dir(follow_symlinks=False):
                continue  # not a run folder of this index: left alone
            age = (now - entry.stat(follow_symlinks=False).st_mtime) / 86400
            if older_than_days and age < older_than_days:  # (0 takes all, even a folder dated in the future)
                continue
            owned = []
            for e in plan.entries:
                relative = e.destination and os.path.relpath(e.destination, plan.trash)
                if not relative or relative.startswith(os.pardir):
                    continue
                path = os.path.join(entry.path, relative)  # as this index's root spells it
                if os.path.isfile(path) and not os.path.islink(path):
                    owned.append((path, e.sha256, e.size))
            runs.append(TrashRun(entry.path, age, len(owned), sum(size for _, _, size in owned), owned))
    return runs


# ---- the manifest file --------------------------------------------------------------------------


def load_manifest(path: str | os.PathLike) -> Plan:
    """Read a manifest, with the statuses its journal recorded after it was last written."""
    try:
        with open(path, encoding="utf-8") as f:
            plan = Plan.from_json(json.load(f), manifest=str(os.path.abspath(path)))
    except FileNotFoundError:
        raise ActionError(f"no manifest at {path}") from None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ActionError(f"cannot read manifest {path}: {exc}") from None
    for line in _Journal.lines(plan.manifest):
        entry = plan.entries[line["i"]]
        entry.status, entry.reason = line["status"], line.get("reason")
    return plan


def _write_manifest(plan: Plan) -> None:
    path = Path(plan.manifest)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(plan.to_json(), f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(str(path.parent))


class _Journal:
    """Appended, fsynced lines {"i": entry number, "status": ...} beside the manifest."""

    def __init__(self, manifest: str):
        self.path = manifest + ".journal"
        self._file = None

    def record(self, i: int, status: str, reason: str | None = None) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._file.write(json.dumps({"i": i, "status": status, "reason": reason}, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        self.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    @staticmethod
    def lines(manifest: str) -> list[dict]:
        try:
            with open(manifest + ".journal", encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut short by a crash: its step is re-derived from the disk
                break
        return out


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({exc.filename})" if exc.filename else exc.strerror
    return str(exc)
