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
  (changed since indexing), or that is missing, is skipped with a reason. Files under ``keep_in`` folders
  are never touched and are preferred as survivors.
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

import datetime
import errno
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .index import DuplicateGroup, NeardupError, maybe_compact
from .store import Record, Store, fsync_dir
from .errors import ActionError  # noqa: F401 (re-exported)

ACTIONS = ("move", "hardlink", "delete")
KEEP_CRITERIA = ("pixels", "size", "oldest", "newest", "shortest-path")
DEFAULT_KEEP = ("pixels", "size", "oldest")
MANIFEST_VERSION = 1
ACTIONS_DIR = "actions"  # inside the index folder: one manifest per applied run
TRASH_DIR = "trash"
_INDEX_BATCH = 64  # steps per index commit
_TMP_PREFIX = ".neardup-tmp-"

ProgressCallback = Callable[[int, int], None]  # (steps done, steps planned)


@dataclass
class Entry:
    """One file acted on. status: 'planned', 'done', 'skipped' (with a reason, nothing touched) or
    'undone'. `destination` is where the file's own bytes went; `survivor` the file kept in its group."""

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
    state: str = "planned"  # planned -> applying -> applied | interrupted -> undone
    manifest: str | None = None

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


def _rank_key(record: Record, keep: Sequence[str], protected: bool):
    """Sort key: the smallest key survives. Files under --keep-in come first, then the criteria in
    order, then the path, so equal files always resolve the same way."""
    values = {
        "pixels": -((record.width or 0) * (record.height or 0)),
        "size": -record.size,
        "oldest": record.mtime_ns,
        "newest": -record.mtime_ns,
        "shortest-path": len(record.path),
    }
    return (not protected, *(values[name] for name in keep), record.path)


def _is_under(path: str, folders: Sequence[str]) -> bool:
    return any(path == f or path.startswith(f.rstrip(os.sep) + os.sep) for f in folders)


# ---- planning ---------------------------------------------------------------------------------


def make_plan(index_root: str | os.PathLike, groups: Iterable[DuplicateGroup], action: str, *,
              to: str | os.PathLike | None = None, keep: Sequence[str] = DEFAULT_KEEP,
              keep_in: Sequence[str | os.PathLike] = (), threshold: float | None = None) -> Plan:
    """What `apply_plan` will do, file by file: the survivor of each group by `keep` (files under
    `keep_in` first and never touched), every other member checked against the catalog (size, sha256)
    and given its destination. Reads only."""
    if action not in ACTIONS:
        raise ActionError(f"unknown action {action!r}; choose from {', '.join(ACTIONS)}")
    if action == "move" and not to:
        raise ActionError("--action move needs --to DIR")
    root = Path(index_root).absolute()
    keep = tuple(keep)
    protected_folders = [os.path.abspath(f) for f in keep_in]
    now = time.time()
    run_id = f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}.{int(now * 1000) % 1000:03d}-{uuid.uuid4().hex[:6]}"
    trash = str(root / TRASH_DIR / run_id) if action in ("delete", "hardlink") else None
    target = os.path.abspath(to) if action == "move" else trash
    plan = Plan(run_id, action, str(root), datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                list(keep), protected_folders, os.path.abspath(to) if to else None, trash, threshold)
    # files an earlier move already put in --to are done with: neither acted on again nor survivors
    handled = [os.path.abspath(to)] if action == "move" else []
    with Store.open(root) as store:
        chosen: list[tuple[int, Record, list[Record]]] = []
        for number, group in enumerate(groups, 1):
            records = [r for r in (store.record(p) for p in group.files)
                       if r is not None and r.status == "indexed" and not _is_under(r.path, handled)]
            if len(records) < 2:
                continue
            ranked = sorted(records, key=lambda r: _rank_key(r, keep, _is_under(r.path, protected_folders)))
            chosen.append((number, ranked[0], ranked[1:]))
    acted = [r.path for _, _, others in chosen for r in others if not _is_under(r.path, protected_folders)]
    base = os.path.commonpath([os.path.dirname(p) for p in acted]) if acted else os.sep
    taken: set[str] = set()
    for number, survivor, others in chosen:
        survivor_ok = _check_file(survivor)
        for record in others:
            entry = Entry(number, action, record.path, None, survivor.path, record.sha256 or "", record.size,
                          survivor.sha256 or "")
            plan.entries.append(entry)
            if _is_under(record.path, protected_folders):
                entry.status, entry.reason = "skipped", "under a --keep-in folder"
                continue
            problem = _check_file(record) or (survivor_ok and f"its survivor {survivor.path}: {survivor_ok}")
            if not problem and action == "hardlink":
                problem = _hardlink_problem(record.path, survivor.path)
            if problem:
                entry.status, entry.reason = "skipped", problem
                continue
            entry.destination = _free_name(os.path.join(target, os.path.relpath(record.path, base)), taken)
    return plan


def _check_file(record: Record) -> str | None:
    """Why the file no longer is what the catalog says (None when it is)."""
    try:
        if os.path.islink(record.path):
            return "is a symbolic link (the link would be acted on, not the image)"
        size = os.stat(record.path).st_size
        if size != record.size:
            return "changed since indexing (size differs; re-run `neardup index`)"
        if _sha256(record.path) != record.sha256:
            return "changed since indexing (sha256 differs; re-run `neardup index`)"
    except FileNotFoundError:
        return "missing (moved or deleted since indexing)"
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    return None


def _hardlink_problem(path: str, survivor: str) -> str | None:
    a, b = os.stat(path), os.stat(survivor)
    if a.st_dev != b.st_dev:
        return "on another filesystem than its survivor (a hard link cannot cross filesystems)"
    if a.st_ino == b.st_ino:
        return "already a hard link to its survivor"
    return None


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
               on_wait: Callable[[], None] | None = None, progress: ProgressCallback | None = None) -> Plan:
    """Execute the plan under the index's writer lock; returns it with statuses filled in and
    `manifest` set to where it was written (default: <index>/actions/<id>.json)."""
    root = Path(plan.index)
    plan.manifest = str(manifest or root / ACTIONS_DIR / f"{plan.id}.json")
    with Store.open(root, write=True, wait=wait, on_wait=on_wait) as store:
        recover(store)
        plan.state = "applying"
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


def _do(plan: Plan, entry: Entry) -> None:
    st = os.stat(entry.source)
    if st.st_size != entry.size:
        raise ActionError("changed since the plan was made")
    if entry.action in ("move", "delete"):
        _move_file(entry.source, entry.destination, entry.sha256)
    else:
        _hardlink(plan, entry)


def _move_file(source: str, destination: str, sha256: str) -> None:
    """Move without overwriting anything and without a moment where the bytes exist nowhere."""
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    try:
        os.link(source, destination)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise ActionError(f"destination {destination} already exists") from None
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        _copy_verified(source, destination, sha256)
    fsync_dir(os.path.dirname(destination))
    os.unlink(source)
    fsync_dir(os.path.dirname(source))


def _copy_verified(source: str, destination: str, sha256: str) -> None:
    """Copy to a temporary name beside `destination`, fsync, check sha256, link into place."""
    folder = os.path.dirname(destination)
    tmp = os.path.join(folder, f"{_TMP_PREFIX}{uuid.uuid4().hex[:8]}")
    try:
        with open(source, "rb") as src, open(tmp, "xb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        shutil.copystat(source, tmp)
        if _sha256(tmp) != sha256:
            raise ActionError(f"the copy of {source} does not match its sha256; source left in place")
        os.link(tmp, destination)  # fails rather than overwrite
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _hardlink(plan: Plan, entry: Entry) -> None:
    """Keep the file's bytes in the trash, then atomically replace it by a hard link to the survivor."""
    problem = _hardlink_problem(entry.source, entry.survivor)
    if problem:
        raise ActionError(problem)
    os.makedirs(os.path.dirname(entry.destination), exist_ok=True)
    try:
        os.link(entry.source, entry.destination)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise ActionError(f"trash entry {entry.destination} already exists") from None
        if exc.errno != errno.EXDEV:
            raise
        _copy_verified(entry.source, entry.destination, entry.sha256)
    fsync_dir(os.path.dirname(entry.destination))
    tmp = _link_tmp(plan, entry)
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.link(entry.survivor, tmp)
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
        if not _same_file(entry.source, entry.survivor) and _holds(entry.source, entry.sha256, entry.size):
            return "undone"
        if entry.destination and _holds(entry.destination, entry.sha256, entry.size):
            return "done"
        return "lost"
    if _holds(entry.source, entry.sha256, entry.size):
        return "undone"
    if entry.destination and _holds(entry.destination, entry.sha256, entry.size):
        return "done"
    return "lost"


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _holds(path: str, sha256: str, size: int | None) -> bool:
    try:
        if os.path.islink(path) or (size is not None and os.stat(path).st_size != size):
            return False
        return _sha256(path) == sha256
    except OSError:
        return False


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
    maybe_compact(store)


# ---- recovery and undo ----------------------------------------------------------------------------


def recover_interrupted(index_root: str | os.PathLike, *, wait: bool = True,
                        on_wait: Callable[[], None] | None = None) -> list[str]:
    """`recover` under the index's writer lock (run it before planning from the index after a crash)."""
    with Store.open(index_root, write=True, wait=wait, on_wait=on_wait) as store:
        return recover(store)


def recover(store: Store) -> list[str]:
    """Finish the bookkeeping of runs a crash interrupted: every manifest of this index still marked
    'applying' gets its statuses from the disk, the index is brought in line, leftover temporary links
    are removed, and it is marked 'interrupted'. Returns the manifests recovered."""
    recovered = []
    folder = store.root / ACTIONS_DIR
    if not folder.is_dir():
        return recovered
    for path in sorted(folder.glob("*.json")):
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
    link, checking sha256. Idempotent. Returns the plan and the restored paths whose vectors must be
    recomputed (undone deletes and hard links): `Index.add` them."""
    plan = load_manifest(manifest)
    reembed: list[str] = []
    with Store.open(plan.index, write=True, wait=wait, on_wait=on_wait) as store:
        recover(store)
        plan = load_manifest(manifest)
        if plan.state == "applying":  # recover() only handles this index's own actions folder
            _recover_plan(store, plan)
        todo = [e for e in plan.entries if e.status in ("done", "undone")]
        lost = []
        for n, entry in enumerate(reversed(todo), 1):
            state = disk_state(entry)
            if state == "done":
                _restore(entry)
                if entry.action != "move":
                    reembed.append(entry.source)
            elif state == "lost":
                lost.append(entry.source)
                continue
            else:
                _remove_partial(plan, entry)
            entry.status = "undone"
            if progress:
                progress(n, len(todo))
        _sync_index(store, plan, [e for e in todo if e.status == "undone"], undo=True)
        plan.state = "undone" if not lost else "interrupted"
        _write_manifest(plan)
    if lost and plan.trash and not os.path.lexists(plan.trash):
        raise ActionError(f"{len(lost)} files of {manifest} cannot be restored: their bytes were kept in "
                          f"{plan.trash}, which has been purged")
    if lost:
        raise ActionError(f"{len(lost)} files of {manifest} are neither at their source nor at their "
                          f"destination with their recorded sha256, e.g. {lost[0]} (changed since, or moved "
                          "by a later action: undo later manifests first)")
    return plan, reembed


def _restore(entry: Entry) -> None:
    if entry.action in ("move", "delete"):
        _move_file(entry.destination, entry.source, entry.sha256)
        return
    # hardlink: the source is now a link to the survivor; put the kept bytes back over it atomically
    tmp = os.path.join(os.path.dirname(entry.source), f"{_TMP_PREFIX}undo-{uuid.uuid4().hex[:8]}")
    try:
        os.link(entry.destination, tmp)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        _copy_verified(entry.destination, tmp, entry.sha256)
    os.replace(tmp, entry.source)
    fsync_dir(os.path.dirname(entry.source))
    os.unlink(entry.destination)


# ---- purging the trash ----------------------------------------------------------------------------


@dataclass
class TrashRun:
    """One run's folder in the trash: what purging it frees."""

    path: str
    age_days: float  # since the folder was last written to (its mtime)
    files: int
    bytes: int


def purge_trash(index_root: str | os.PathLike, older_than_days: float, *, dry_run: bool = False,
                wait: bool = True, on_wait: Callable[[], None] | None = None,
                progress: ProgressCallback | None = None) -> list[TrashRun]:
    """Delete the run folders in ``<index>/trash/`` last written to more than `older_than_days` days ago
    (0: all); their runs can no longer be undone. Returns them; with `dry_run` only lists them. Only real
    folders directly inside a trash folder that is itself no symbolic link are removed, and symbolic
    links inside them are removed, never followed: nothing outside the trash is touched. Runs under the
    writer lock, after settling interrupted runs (as apply and undo do)."""
    root = Path(index_root).absolute()
    if dry_run:
        return _old_trash_runs(root, older_than_days)
    with Store.open(root, write=True, wait=wait, on_wait=on_wait) as store:
        recover(store)
        runs = _old_trash_runs(root, older_than_days)
        for done, run in enumerate(runs, 1):
            shutil.rmtree(run.path)
            if progress:
                progress(done, len(runs))
        if runs:
            fsync_dir(root / TRASH_DIR)
    return runs


def _old_trash_runs(root: Path, older_than_days: float) -> list[TrashRun]:
    trash = root / TRASH_DIR
    if os.path.islink(trash) or (trash.exists() and not trash.is_dir()):
        raise ActionError(f"{trash} is not a plain folder (a symbolic link?); nothing purged")
    if not trash.exists():
        return []
    now = time.time()
    runs = []
    with os.scandir(trash) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if not entry.is_dir(follow_symlinks=False):
                continue  # not a run folder: left alone
            age = (now - entry.stat(follow_symlinks=False).st_mtime) / 86400
            if older_than_days and age < older_than_days:  # (0 takes all, even a folder dated in the future)
                continue
            files = size = 0
            for folder, _, names in os.walk(entry.path):  # os.walk does not follow symbolic links
                for name in names:
                    files += 1
                    size += os.lstat(os.path.join(folder, name)).st_size
            runs.append(TrashRun(entry.path, age, files, size))
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


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
