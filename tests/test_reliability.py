"""Reliability under crashes, full disks and concurrent use (issue 7). Real processes, real SIGKILL, real
photos and model, real SQLite; docs/RELIABILITY.md tabulates what these tests try.

Crash points: a child process runs the real `neardup` command with os.fsync/replace/rename/link/unlink
counted; at the N-th call (N seeded-random over the calls a full run makes) it SIGKILLs itself — a real
SIGKILL that lands between two durable steps, reproducibly (tests/test_cli.py adds SIGKILLs from outside
at wall-clock times). After each kill: the index opens, Store.verify() is clean, counts are those of a
whole number of commits, re-running completes, and no user file is lost (sha256 of every file before and
after; for actions the manifest and the disk agree and undo restores the original tree exactly).
"""

from __future__ import annotations

import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_probability, tree_hashes

#: A strict `dups` threshold: the copy probability of collection-aware score 0.8.
STRICT = round(copy_probability(0.8, aware=True), 4)

from neardup import actions
from neardup import graph as knn
from neardup.images import load_image
from neardup.index import Index
from neardup.store import IndexLocked, IndexWriteError, Store, StoreError

SEED = 20261127
CHILD = textwrap.dedent("""
    import os, signal, sys
    kill_at, calls = int(os.environ["NEARDUP_KILL_AT"]), 0

    def counted(call):
        def wrapper(*args, **kwargs):
            global calls
            calls += 1
            if calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return call(*args, **kwargs)
        return wrapper

    for name in ("fsync", "replace", "rename", "link", "unlink"):
        setattr(os, name, counted(getattr(os, name)))
    import atexit
    atexit.register(lambda: print(f"IOCALLS {calls}", file=sys.stderr))
    if sys.argv[1] == "compact":
        from neardup.index import Index
        Index.open(sys.argv[2]).compact()
    else:
        from neardup.cli import main
        main(sys.argv[1:], prog_name="neardup")
""")


def run_child(args, kill_at: int = 0, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `neardup ARGS` (or `compact INDEX`), SIGKILLed at its kill_at-th durable file operation."""
    env = {**os.environ, "NEARDUP_KILL_AT": str(kill_at)}
    return subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True, check=False, env=env,
                          timeout=timeout)


def io_calls(result: subprocess.CompletedProcess) -> int:
    assert result.returncode == 0, result.stderr
    return int(result.stderr.rsplit("IOCALLS ", 1)[1].split()[0])


def killed(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == -signal.SIGKILL


def check_store(root: Path, *, write: bool = False) -> dict:
    """Opens, verifies, and the snapshot's ids, paths and vectors agree; the stored k-NN graph, if any, is
    whole (a killed writer leaves the previous one); with `write` (after a run that finished) it is
    current, and orphans are cleared."""
    with Store.open(root, write=write) as store:
        assert store.verify() == []
        snap = store.snapshot()
        assert len(snap.ids) == len(snap.paths) == len(snap.vectors()) == store.counts()["indexed"]
        arrays = store.load_graph()
        graph = None if arrays is None else knn.Graph.from_arrays(arrays)  # raises if not whole
        if write:
            assert graph is not None and knn.current(graph, snap.ids, snap.stamps)
        return {"counts": store.counts(), "paths": list(snap.paths),
                "vectors": dict(zip(snap.paths, snap.vectors().astype(np.float32)))}


def no_litter(root: Path) -> None:
    with Store.open(root) as store:
        registered = {f"{name}.{kind}.npy" for name in store.segment_names() for kind in ("vectors", "codes")}
        if store.get_meta("graph"):
            registered.add(f"{store.get_meta('graph')}.graph.npz")
    assert set(os.listdir(root / "segments")) == registered


@pytest.fixture(scope="module")
def photos(tmp_path_factory, collection) -> Path:
    """16 originals and 16 half-size copies: 32 files, 16 duplicate pairs."""
    folder = tmp_path_factory.mktemp("rel-photos")
    (folder / "originals").mkdir()
    (folder / "copies").mkdir()
    for name, path in collection["originals"].items():
        shutil.copy(path, folder / "originals" / f"{name}.jpg")
    for copy in collection["copies"]:
        if copy["edit"] == "half":
            shutil.copy(copy["path"], folder / "copies" / Path(copy["path"]).name)
    return folder


@pytest.fixture(scope="module")
def base_index(tmp_path_factory, photos, embedder) -> Path:
    """An index of the 32 photos in 8 segments (4 files per commit)."""
    root = tmp_path_factory.mktemp("rel-base") / "idx"
    with Index.open(root, create=True, embedder=embedder) as index:
        assert index.add([photos], commit_every=4).added == 32
    return root


# ---- crashes ---------------------------------------------------------------------------------------


def test_sigkill_at_20_points_across_index_remove_compact_and_an_applied_action(
        tmp_path, photos, base_index, embedder):
    rng = random.Random(SEED)
    outcomes = []
    user_files = tree_hashes(photos)

    # index: the 16 originals into a fresh index each time, 4 files per commit -> counts are whole commits
    originals = photos / "originals"
    index_args = ["index", originals, "--commit-every", "4", "--batch-size", "4", "--index"]
    total = io_calls(run_child([*index_args, tmp_path / "probe"]))
    for kill_at in sorted(rng.sample(range(1, total + 1), 5)):
        root = tmp_path / f"index-{kill_at}"
        result = run_child([*index_args, root], kill_at)
        outcomes.append(("index", kill_at, total, killed(result)))
        if (root / "catalog.sqlite").exists():
            state = check_store(root)
            assert state["counts"]["indexed"] % 4 == 0 and state["counts"]["failed"] == 0
        with Index.open(root, create=True, embedder=embedder) as index:  # re-running completes
            index.add([originals])
        assert check_store(root, write=True)["counts"]["indexed"] == 16
        no_litter(root)
    assert tree_hashes(photos) == user_files

    # remove: all or nothing
    reference = check_store(base_index)
    probe = tmp_path / "probe-remove"
    shutil.copytree(base_index, probe)
    total = io_calls(run_child(["remove", photos / "copies", "--index", probe]))
    for kill_at in sorted(rng.sample(range(1, total + 1), min(4, total))):
        root = tmp_path / f"remove-{kill_at}"
        shutil.copytree(base_index, root)
        result = run_child(["remove", photos / "copies", "--index", root], kill_at)
        outcomes.append(("remove", kill_at, total, killed(result)))
        state = check_store(root)
        assert state["counts"]["indexed"] in (32, 16)
        for path, vector in state["vectors"].items():  # nothing half-present: every vector is the original
            np.testing.assert_array_equal(vector, reference["vectors"][path])
        with Index.open(root, embedder=embedder) as index:
            index.remove([photos / "copies"])
        assert check_store(root, write=True)["counts"]["indexed"] == 16
        no_litter(root)

    # compaction: 8 segments with 4 dead rows -> 1 segment; the live vectors never change
    compactable = tmp_path / "compactable"
    shutil.copytree(base_index, compactable)
    with Store.open(compactable, write=True) as store:
        store.commit(removed=[p for p in reference["paths"] if "/copies/" in p][:4])
    live = check_store(compactable)
    probe = tmp_path / "probe-compact"
    shutil.copytree(compactable, probe)
    total = io_calls(run_child(["compact", probe]))
    for kill_at in sorted(rng.sample(range(1, total + 1), min(4, total))):
        root = tmp_path / f"compact-{kill_at}"
        shutil.copytree(compactable, root)
        result = run_child(["compact", root], kill_at)
        outcomes.append(("compact", kill_at, total, killed(result)))
        state = check_store(root)
        assert state["counts"]["indexed"] == 28 and state["counts"]["segments"] in (1, 8, 9)
        for path, vector in state["vectors"].items():
            np.testing.assert_array_equal(vector, live["vectors"][path])
        with Index.open(root) as index:
            index.compact()
        assert check_store(root, write=True)["counts"]["segments"] == 1
        no_litter(root)

    # an applied action: move every duplicate; after the kill, the manifest and the disk agree, no file
    # is lost, re-running completes (recovering the interrupted run), undo restores the original tree
    pristine, case = tmp_path / "pristine", tmp_path / "case"
    shutil.copytree(photos, case / "photos")
    with Index.open(case / "idx", create=True, embedder=embedder) as index:
        index.add([case / "photos"])
    shutil.copytree(case, pristine)

    def action_case() -> tuple[Path, Path, Path]:
        """The same paths every time (so the index built once stays valid), restored from the pristine copy."""
        shutil.rmtree(case)
        shutil.copytree(pristine, case)
        return case / "photos", case / "idx", case / "moved"

    user, root, moved = action_case()
    move = ["dups", "--index", root, "--threshold", str(STRICT), "--action", "move", "--to", moved, "--apply"]
    total = io_calls(run_child(move))
    for kill_at in sorted(rng.sample(range(1, total + 1), 7)):
        user, root, moved = action_case()
        before = tree_hashes(user)
        move = ["dups", "--index", root, "--threshold", str(STRICT), "--action", "move", "--to", moved, "--apply"]
        result = run_child(move, kill_at)
        outcomes.append(("move", kill_at, total, killed(result)))
        check_store(root)
        after = Counter(tree_hashes(user, moved).values())
        assert not Counter(before.values()) - after  # every file's bytes still somewhere
        manifests = sorted((root / "actions").glob("*.json"))
        for manifest in manifests:
            for entry in actions.load_manifest(manifest).entries:
                state = actions.disk_state(entry)
                assert state != "lost"
                assert entry.status != "done" or state == "done"  # the journal never runs ahead of the disk
        io_calls(run_child(move))  # re-running completes the job (and settles the interrupted run first)
        again = actions.load_manifest(max((root / "actions").glob("*.json"), key=os.path.getmtime))
        assert again.state == "applied" and all(e.status == "done" for e in again.entries)
        assert not any(e.source.startswith(str(moved)) for e in again.entries)  # what was moved stays put
        assert Counter(tree_hashes(user, moved).values()) == Counter(before.values())  # no stray second copy
        state = check_store(root, write=True)
        assert all(os.path.exists(p) for p in state["paths"])  # the index points only at real files
        with Index.open(root, embedder=embedder) as index:
            assert index.duplicates(STRICT) == [] or all(
                sum(not p.startswith(str(moved)) for p in g.files) == 1 for g in index.duplicates(STRICT))
        for manifest in sorted((root / "actions").glob("*.json"), reverse=True):
            actions.undo(manifest)
        assert tree_hashes(user) == before and not [f for _, _, f in os.walk(moved) if f]
        assert all(os.path.exists(p) for p in check_store(root)["paths"])
        no_litter(root)

    assert len(outcomes) >= 20
    assert sum(hit for *_, hit in outcomes) >= 18, outcomes  # the kills landed inside the runs
    print("\n".join(f"{kind:8} kill at I/O call {n}/{total}: {'killed' if hit else 'finished first'}"
                    for kind, n, total, hit in outcomes))


# ---- disk full -------------------------------------------------------------------------------------


def test_injected_enospc_on_a_commit_is_one_clear_error_and_the_index_keeps_its_last_commit(
        tmp_path, photos, embedder, monkeypatch):
    root = tmp_path / "idx"
    real_save, saves = np.save, []

    def failing_save(file, array, *args, **kwargs):
        saves.append(1)
        if len(saves) > 5:  # the planes, two commits of vectors + codes, then the third commit
            raise OSError(28, "No space left on device")
        return real_save(file, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    with Index.open(root, create=True, embedder=embedder) as index, \
            pytest.raises(IndexWriteError, match="No space left on device; it keeps its last committed state"):
        index.add([photos / "originals"], commit_every=4)
    monkeypatch.setattr(np, "save", real_save)
    state = check_store(root)
    assert state["counts"]["indexed"] == 8  # two whole commits
    assert not [n for n in os.listdir(root / "segments") if n.startswith(".tmp-")]
    with Index.open(root, embedder=embedder) as index:
        index.add([photos / "originals"])
    assert check_store(root, write=True)["counts"]["indexed"] == 16
    no_litter(root)


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (needs root and mount permission; skipped with the reason otherwise)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if not shutil.which("mount") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8); the injected-ENOSPC test covers this")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()}); the injected-ENOSPC test covers this")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def test_real_full_disk_during_index_and_action(small_disk, tmp_path, photos, embedder):
    root = small_disk / "idx"
    first = sorted((photos / "originals").iterdir())[:4]
    with Index.open(root, create=True, embedder=embedder) as index:
        index.add(first)
    committed = check_store(root)["counts"]["indexed"]
    filler = fill(small_disk, leave=160 * 1024)
    originals = photos / "originals"
    result = run_child(["index", originals, "--index", root, "--commit-every", "2", "--batch-size", "2"])
    assert result.returncode == 1, result.stderr
    error = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("IOCALLS")]
    print(error)
    assert len(error) == 1 and error[0].startswith("neardup: error: ") and ("full" in error[0] or "space" in error[0])
    assert "Traceback" not in result.stderr
    try:  # SQLite may need a few bytes even to read (its WAL index): then a clear error, never garbage
        state = check_store(root)
    except StoreError as exc:
        print(f"reading the index on the full disk: {exc}")
        filler.unlink()
        state = check_store(root)
    assert committed <= state["counts"]["indexed"] < 16 and state["counts"]["indexed"] % 2 == 0
    if filler.exists():
        filler.unlink()
    with Index.open(root, embedder=embedder) as index:  # space freed: re-running completes
        index.add([originals])
    assert check_store(root, write=True)["counts"]["indexed"] == 16
    no_litter(root)

    # moving duplicates onto the full disk: each failed copy is skipped with the reason, nothing lost
    subset = tmp_path / "subset"
    for name in ("chelsea", "coffee", "rocket", "astronaut"):
        for found in photos.rglob(f"{name}*.jpg"):
            (subset / found.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(found, subset / found.parent.name / found.name)
    index_root = tmp_path / "idx2"
    with Index.open(index_root, create=True, embedder=embedder) as index:
        index.add([subset])
    filler = fill(small_disk, leave=64 * 1024)
    photos = subset
    before = tree_hashes(photos)
    with Index.open(index_root) as index:
        plan = actions.make_plan(index_root, index.duplicates(STRICT), "move", to=small_disk / "moved", threshold=STRICT)
    plan = actions.apply_plan(plan)
    failed = [e for e in plan.entries if e.status == "skipped"]
    assert failed and all("No space left on device" in e.reason for e in failed)
    print(f"move onto the full disk: {len(plan.entries)} files, {len(failed)} skipped for lack of space")
    assert sorted(tree_hashes(photos, small_disk / "moved").values()) == sorted(before.values())
    assert not [p for p in tree_hashes(small_disk / "moved") if ".neardup-tmp-" in p]
    check_store(index_root)
    filler.unlink()
    actions.undo(plan.manifest)
    assert tree_hashes(photos) == before


# ---- concurrency -----------------------------------------------------------------------------------


def neardup_process(*args, index: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "neardup.cli", *map(str, args), "--index", str(index)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# Holds the index's writer lock (the real Store lock) until a line arrives on stdin; says so on stdout.
LOCK_HOLDER = textwrap.dedent("""
    import sys
    from neardup.store import Store
    with Store.open(sys.argv[1], write=True):
        print("held", flush=True)
        sys.stdin.readline()
""")


def test_second_writer_waits_with_a_message_or_fails_with_no_wait(tmp_path, photos, base_index):
    """Ordered by what the processes say, not by how long anything takes: a holder process takes the
    lock and says so; a second writer is started and must print the waiting message; --no-wait must
    fail; only then is the holder told to let go, and the waiting writer completes its job."""
    root = tmp_path / "idx"
    shutil.copytree(base_index, root)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(root)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        waiter = neardup_process("remove", photos / "copies", index=root)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in waiter.stderr] + [lines.put("")],
                         daemon=True).start()
        waited = []
        while not waited or "another process is writing this index; waiting" not in waited[-1]:
            waited.append(lines.get(timeout=300))  # the timeout only turns a hang into a failure
            assert waited[-1], f"the second writer ended without waiting: {waited}"
        refused = subprocess.run([sys.executable, "-m", "neardup.cli", "remove", photos / "copies", "--index", root,
                                  "--no-wait"], capture_output=True, text=True, check=False, timeout=120)
        assert waiter.poll() is None  # still waiting: the lock is still held
    finally:
        holder.communicate("release\n", timeout=120)
    waiter_out = waiter.stdout.read()
    waiter.wait(timeout=300)
    waiter_err = "".join(waited)
    assert holder.returncode == 0
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [f"neardup: error: the index at {root} is being written by another process"]
    assert waiter.returncode == 0, waiter_err
    assert "removed 16 files" in waiter_out  # the waiting writer did its whole job once the lock was free
    assert check_store(root)["counts"]["indexed"] == 32 - 16


# `neardup ARGS` whose every commit waits until a reader has seen the new count (a file seen-N in DIR).
WAIT_UNTIL_SEEN = textwrap.dedent("""
    import os, sys, time
    from neardup.store import Store
    seen_dir, real_commit = sys.argv[1], Store.commit

    def commit_then_wait_until_seen(self, **kwargs):
        real_commit(self, **kwargs)
        marker = os.path.join(seen_dir, f"seen-{self.counts()['indexed']}")
        while not os.path.exists(marker):
            time.sleep(0.002)

    Store.commit = commit_then_wait_until_seen
    from neardup.cli import main
    main(sys.argv[2:], prog_name="neardup")
""")


def test_readers_see_whole_commits_while_a_writer_commits(tmp_path, photos, embedder):
    """A writer process adds 32 files, 3 per commit; reader threads snapshot, query and list duplicates in
    a loop. Every snapshot is a whole number of commits, its ids, paths and vectors agree, and every path
    a reader saw is in the final index with the same vector. The writer goes on after each commit only
    once a reader has seen it (a file per count seen), so the readers see every commit however the
    machine schedules them; they still read while the writer embeds and commits the next batch."""
    root = tmp_path / "idx"
    Index.open(root, create=True, embedder=embedder).close()
    probe = embedder.embed(embedder.preprocess(load_image(str(min((photos / "originals").iterdir()))).image)[None])[0]
    writer = subprocess.Popen([sys.executable, "-c", WAIT_UNTIL_SEEN, str(tmp_path), "index", str(photos),
                               "--commit-every", "3", "--batch-size", "3", "--index", str(root)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen_counts, seen, reads = set(), {}, []
    problems = []

    def reader() -> None:
        with Index.open(root) as index:
            while writer.poll() is None:
                try:
                    snap = index._reader.snapshot()
                    vectors = snap.vectors()
                    if not len(snap.ids) == len(snap.paths) == len(vectors):
                        problems.append(f"torn snapshot: {len(snap.ids)} ids, {len(vectors)} vectors")
                    seen_counts.add(len(snap))
                    (tmp_path / f"seen-{len(snap)}").touch()
                    reads.append(len(snap))
                    for path, vector in zip(snap.paths, vectors.astype(np.float32)):
                        seen.setdefault(path, vector)
                    for match in index.query_vector(probe, k=5):
                        seen.setdefault(match.path, None)
                    index.duplicates(STRICT)
                except Exception as exc:  # noqa: BLE001 (any failure of a reader is the finding)
                    problems.append(repr(exc))

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        _, err = writer.communicate(timeout=300)  # the timeout only turns a hang into a failure
    finally:
        writer.kill()
    for thread in threads:
        thread.join(timeout=60)
    assert writer.returncode == 0, err
    assert problems == []
    final = check_store(root)
    assert seen_counts >= {*range(3, 31, 3), 32}, seen_counts  # the readers saw every commit
    assert all(n % 3 == 0 or n == 32 for n in seen_counts), seen_counts
    print(f"\n{len(reads)} snapshots (+ a query and a duplicates run each) by 2 readers during 11 commits; "
          f"sizes seen: {sorted(seen_counts)}")
    for path, vector in seen.items():
        assert path in final["vectors"]
        if vector is not None:
            np.testing.assert_array_equal(vector, final["vectors"][path])
