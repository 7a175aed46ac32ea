"""Acting on duplicate groups: keep-best policy, dry run = the plan, move / hardlink / delete, manifest, undo.

Real photos, the real model and real files; every test checks the bytes on disk (sha256 of every file
before and after) and the index (Store.verify, records under their new paths)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
from conftest import build_library, copy_probability, restored_library, tree_hashes

#: A strict `dups` threshold: the copy probability of collection-aware score 0.8.
STRICT = round(copy_probability(0.8, aware=True), 4)
from PIL import Image

from neardup import actions
from neardup import index as index_module
from neardup.index import Index
from neardup.schemas import MANIFEST
from neardup.store import Record, Store

ODD_NAME = "coffee copy\nnew ünïcode 写真.jpg"  # spaces, a newline, non-ASCII


@pytest.fixture(scope="module")
def pristine_library(tmp_path_factory, collection, embedder) -> Path:
    """conftest.build_library, plus a byte-identical copy of coffee under an odd name in photos/b."""
    return build_library(tmp_path_factory.mktemp("library"), collection, embedder,
                         extra={ODD_NAME: collection["originals"]["coffee"]})


@pytest.fixture
def library(pristine_library, embedder):
    yield from restored_library(pristine_library, embedder)


def plan_for(index: Index, action: str, keep=("pixels", "oldest"), **options) -> actions.Plan:
    """Keep the full-size originals (photos/a): most pixels, then the oldest."""
    return actions.make_plan(index.root, index.duplicates(STRICT), action, threshold=STRICT, keep=keep, **options)


def check_index(index: Index) -> Store:
    with Store.open(index.root) as store:
        assert store.verify() == []
        return store


def records(index: Index) -> dict[str, Record]:
    with Store.open(index.root) as store:
        return {r.path: r for r in store.records()}


def test_keep_policy_ranks_by_criteria_in_order():
    big = Record("/p/big.jpg", size=100, mtime_ns=3, sha256="a", width=400, height=300)
    heavy = Record("/p/heavy.jpg", size=900, mtime_ns=2, sha256="b", width=200, height=150)
    old = Record("/p/a/old.jpg", size=100, mtime_ns=1, sha256="c", width=400, height=300)

    def survivor(keep, protected=()):
        return actions.choose_survivor((big, heavy, old), keep, protected=lambda r: r.path in protected).path

    assert survivor(("pixels", "size", "oldest")) == "/p/a/old.jpg"  # pixels tie, size tie, then oldest
    assert survivor(("pixels", "newest")) == "/p/big.jpg"
    assert survivor(("size",)) == "/p/heavy.jpg"
    assert survivor(("shortest-path",)) == "/p/big.jpg"
    assert survivor(("pixels",), protected={"/p/heavy.jpg"}) == "/p/heavy.jpg"  # --keep-in wins over all
    assert actions.parse_keep("size, oldest") == ("size", "oldest")
    assert MANIFEST["properties"]["keep"]["items"]["enum"] == list(actions.KEEP_CRITERIA)
    with pytest.raises(actions.ActionError, match="unknown keep criterion biggest"):
        actions.parse_keep("size,biggest")


def test_dry_run_is_exactly_what_apply_does_and_touches_nothing(library, tmp_path):
    photos, index = library
    before, catalog = tree_hashes(photos), records(index)
    dry = plan_for(index, "move", to=tmp_path / "moved")
    assert tree_hashes(photos) == before and records(index) == catalog and not (tmp_path / "moved").exists()
    assert {e.group for e in dry.entries} == {1, 2} and all(e.status == "planned" for e in dry.entries)
    assert {e.survivor for e in dry.entries} == {str(photos / "a" / "chelsea.jpg"), str(photos / "a" / "coffee.jpg")}
    default = plan_for(index, "move", keep=actions.DEFAULT_KEEP, to=tmp_path / "moved")
    # the default keeps the originals, although the flipped chelsea is as large and a larger file
    assert {e.survivor for e in default.entries} == {str(photos / "a" / "chelsea.jpg"), str(photos / "a" / "coffee.jpg")}
    flip = photos / "b" / "deep" / "chelsea_flip.jpg"
    assert os.stat(flip).st_size > os.stat(photos / "a" / "chelsea.jpg").st_size
    applied = actions.apply_plan(plan_for(index, "move", to=tmp_path / "moved"))
    assert [(e.source, e.destination) for e in applied.entries] == [(e.source, e.destination) for e in dry.entries]
    assert all(e.status == "done" for e in applied.entries)


def test_move_apply_updates_index_and_undo_restores_everything(library, tmp_path):
    photos, index = library
    before = tree_hashes(photos)
    plan = actions.apply_plan(plan_for(index, "move", to=tmp_path / "moved"))
    manifest = json.loads(Path(plan.manifest).read_text(encoding="utf-8"))
    jsonschema.validate(manifest, MANIFEST)
    assert manifest["state"] == "applied" and not Path(plan.manifest + ".journal").exists()
    moved = {e.source: e.destination for e in plan.entries}
    assert len(moved) == 4 and str(photos / "b" / ODD_NAME) in moved
    # relative structure kept below the deepest common folder of the moved files (photos/b)
    assert moved[str(photos / "b" / "deep" / "chelsea_flip.jpg")] == str(tmp_path / "moved" / "deep" / "chelsea_flip.jpg")
    after = tree_hashes(photos, tmp_path / "moved")
    for source, destination in moved.items():
        assert source not in after and after[destination] == before[source]
    assert {p: h for p, h in after.items() if p not in moved.values()} == {p: h for p, h in before.items() if p not in moved}
    catalog = records(index)
    check_index(index)
    assert set(moved.values()) <= set(catalog) and not set(moved) & set(catalog) and len(catalog) == 7
    grouped = {p for g in index.duplicates(STRICT) for p in g.files}
    assert set(moved.values()) <= grouped  # the moved files keep their vectors under their new paths
    assert plan_for(index, "move", to=tmp_path / "moved").entries == []  # a second run leaves --to alone

    undone, reembed = actions.undo(plan.manifest)
    assert reembed == [] and undone.state == "undone"
    assert tree_hashes(photos) == before and not any(files for _, _, files in os.walk(tmp_path / "moved"))
    catalog = records(index)
    check_index(index)
    assert set(moved) <= set(catalog) and not set(moved.values()) & set(catalog)
    actions.undo(plan.manifest)  # idempotent
    assert tree_hashes(photos) == before


def test_hardlink_replaces_copies_by_links_and_undo_brings_the_bytes_back(library, embedder):
    photos, index = library
    before = tree_hashes(photos)
    plan = actions.apply_plan(plan_for(index, "hardlink"))
    done = [e for e in plan.entries if e.status == "done"]
    assert len(done) == 4
    for entry in done:
        assert os.path.samefile(entry.source, entry.survivor)
        assert Path(entry.destination).is_relative_to(index.root / "trash")  # old bytes kept in the trash
        assert hashlib.sha256(Path(entry.destination).read_bytes()).hexdigest() == before[entry.source]
    catalog = records(index)
    check_index(index)
    for entry in done:  # same content as its survivor now, and the record says so
        assert catalog[entry.source].sha256 == catalog[entry.survivor].sha256 == before[entry.survivor]
    again = plan_for(index, "hardlink")  # nothing left to do: every copy already is the survivor
    assert all(e.status == "skipped" and "already a hard link" in e.reason for e in again.entries)

    survivor = str(photos / "a" / "chelsea.jpg")
    os.rename(survivor, survivor + ".away")  # a survivor renamed since: undo relies on the trash, not on it
    _, reembed = actions.undo(plan.manifest)
    os.rename(survivor + ".away", survivor)
    assert sorted(reembed) == sorted(e.source for e in done)
    index.add(reembed)
    assert tree_hashes(photos) == before
    assert not any(os.path.samefile(e.source, e.survivor) for e in done)
    catalog = records(index)
    check_index(index)
    assert all(catalog[e.source].sha256 == before[e.source] for e in done)


def test_delete_needs_yes_goes_to_trash_and_undo_restores_via_cli(library):
    photos, index = library
    before = tree_hashes(photos)
    env = {**os.environ, "NEARDUP_INDEX": str(index.root)}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "neardup.cli", *args], capture_output=True, text=True, check=False, env=env,
                              timeout=300)

    refused = cli("dups", "--threshold", str(STRICT), "--action", "delete", "--apply")
    assert refused.returncode == 2 and "--yes" in refused.stderr and tree_hashes(photos) == before
    dry = cli("dups", "--threshold", str(STRICT), "--action", "delete", "--json")
    assert dry.returncode == 0 and "would delete 4 files" in dry.stderr
    jsonschema.validate(json.loads(dry.stdout), MANIFEST)
    applied = cli("dups", "--threshold", str(STRICT), "--action", "delete", "--apply", "--yes")
    assert applied.returncode == 0, applied.stderr
    manifest = next((index.root / "actions").glob("*.json"))
    plan = actions.load_manifest(manifest)
    gone = {e.source for e in plan.entries if e.status == "done"}
    assert len(gone) == 4 and not any(os.path.exists(p) for p in gone)
    assert str(plan.trash) in applied.stderr and f"neardup undo {manifest}" in applied.stderr
    assert len(records(index)) == 3 and check_index(index)
    undone = cli("undo", str(manifest))
    assert undone.returncode == 0, undone.stderr
    assert tree_hashes(photos) == before
    assert len(records(index)) == 7 and check_index(index)
    assert {p for g in index.duplicates(STRICT) for p in g.files} >= gone  # re-embedded, found again


def test_keep_in_folder_is_preferred_and_never_touched(library, tmp_path):
    photos, index = library
    reference = photos / "b"
    before = tree_hashes(reference)
    plan = actions.apply_plan(plan_for(index, "move", to=tmp_path / "moved", keep_in=[reference]))
    assert all(Path(e.survivor).is_relative_to(reference) for e in plan.entries)
    assert all(e.status == "skipped" and "--keep-in" in e.reason
               for e in plan.entries if Path(e.source).is_relative_to(reference))
    assert tree_hashes(reference) == before
    moved = {e.source for e in plan.entries if e.status == "done"}
    assert moved == {str(photos / "a" / "chelsea.jpg"), str(photos / "a" / "coffee.jpg")}


def test_files_changed_or_missing_since_indexing_are_skipped_with_reasons(library, tmp_path):
    photos, index = library
    changed = photos / "b" / "chelsea_half.jpg"
    changed.write_bytes(changed.read_bytes() + b"edited")
    same_size = photos / "b" / "coffee_jpeg30.jpg"
    data = bytearray(same_size.read_bytes())
    data[-3] ^= 0xFF
    same_size.write_bytes(bytes(data))
    (photos / "b" / "deep" / "chelsea_flip.jpg").unlink()
    plan = plan_for(index, "move", to=tmp_path / "moved")
    reasons = {os.path.basename(e.source): e.reason for e in plan.entries}
    assert "size differs" in reasons["chelsea_half.jpg"]
    assert "sha256 differs" in reasons["coffee_jpeg30.jpg"]
    assert reasons["chelsea_flip.jpg"].startswith("missing")
    assert reasons[ODD_NAME] is None
    before = tree_hashes(photos)
    actions.apply_plan(plan)
    after = tree_hashes(photos)
    assert all(after[str(photos / "b" / n)] == before[str(photos / "b" / n)] for n in ("chelsea_half.jpg", "coffee_jpeg30.jpg"))


def test_move_never_overwrites_and_crosses_filesystems_by_verified_copy(library, tmp_path):
    photos, index = library
    before = tree_hashes(photos)
    other_fs = Path("/dev/shm")
    cross = other_fs.is_dir() and os.stat(other_fs).st_dev != os.stat(tmp_path).st_dev
    target = (other_fs / f"neardup-test-{os.getpid()}-{tmp_path.name}") if cross else tmp_path / "moved"
    try:
        (target / "deep").mkdir(parents=True)
        squatter = target / "deep" / "chelsea_flip.jpg"
        squatter.write_bytes(b"someone else's file")
        plan = actions.apply_plan(plan_for(index, "move", to=target))
        flip = next(e for e in plan.entries if e.source.endswith("chelsea_flip.jpg"))
        assert flip.status == "done" and flip.destination == str(target / "deep" / "chelsea_flip (1).jpg")
        assert squatter.read_bytes() == b"someone else's file"
        after = tree_hashes(target)
        assert all(after[e.destination] == before[e.source] for e in plan.entries)
        assert not [p for p in after if ".neardup-tmp-" in p]
        actions.undo(plan.manifest)
        assert tree_hashes(photos) == before
    finally:
        shutil.rmtree(target, ignore_errors=True)
    if not cross:
        pytest.skip("/dev/shm is not another filesystem here: only the same-filesystem move was tested")


def test_hardlink_across_filesystems_is_refused_with_a_reason(library, embedder, tmp_path):
    photos, index = library
    other_fs = Path("/dev/shm")
    if not other_fs.is_dir() or os.stat(other_fs).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem (/dev/shm) to test a cross-filesystem hard link")
    elsewhere = other_fs / f"neardup-test-{os.getpid()}-{tmp_path.name}"
    elsewhere.mkdir()
    try:
        shutil.copy(photos / "a" / "rocket.jpg", elsewhere / "rocket_copy.jpg")
        index.add([elsewhere])
        plan = plan_for(index, "hardlink")
        entry = next(e for e in plan.entries if e.source.startswith(str(elsewhere)) or e.survivor.startswith(str(elsewhere)))
        assert entry.status == "skipped" and "another filesystem" in entry.reason
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


def test_cli_usage_errors_for_action_options(library, tmp_path):
    _, index = library
    env = {**os.environ, "NEARDUP_INDEX": str(index.root)}
    for args, message in (
        (["--action", "move"], "--to"),
        (["--to", str(tmp_path)], "needs --action"),
        (["--action", "hardlink", "--to", str(tmp_path)], "--to goes with --action move"),
        (["--action", "move", "--to", str(tmp_path), "--keep", "biggest"], "unknown keep criterion"),
    ):
        result = subprocess.run([sys.executable, "-m", "neardup.cli", "dups", *args], capture_output=True, text=True, check=False,
                                env=env, timeout=120)
        assert result.returncode in (1, 2) and message in result.stderr and "Traceback" not in result.stderr, args


def test_undo_of_an_interrupted_run_with_its_manifest_elsewhere_folds_the_journal(library, tmp_path):
    """A run whose manifest lives outside the index's actions folder and that a crash left 'applying'
    (statuses only in its journal): undo settles it, restores the files, and the manifest read back
    says 'undone' (a leftover journal would replay 'done' over it)."""
    photos, index = library
    before = tree_hashes(photos)
    manifest = tmp_path / "elsewhere" / "run.json"
    plan = actions.apply_plan(plan_for(index, "move", to=tmp_path / "moved"), manifest=manifest)
    assert len(plan.entries) == 4
    # what a crash after the last journal line leaves: the manifest as written before the first step
    statuses = [e.status for e in plan.entries]
    plan.state = "applying"
    for entry in plan.entries:
        entry.status = "planned"
    actions._write_manifest(plan)
    journal = actions._Journal(plan.manifest)
    for i, status in enumerate(statuses):
        journal.record(i, status)
    journal.close()

    undone, _ = actions.undo(manifest)
    assert undone.state == "undone"
    assert tree_hashes(photos) == before
    assert not Path(str(manifest) + ".journal").exists()
    reread = actions.load_manifest(manifest)
    assert reread.state == "undone" and all(e.status == "undone" for e in reread.entries)
    check_index(index)


def test_an_action_compacts_by_the_index_rule_too_many_segments(library, tmp_path):
    """The index compacts after a write that leaves many dead rows OR more than COMPACT_MAX_SEGMENTS
    segments; an applied action follows the same rule (it used to check dead rows only)."""
    from neardup.index import COMPACT_DEAD_FRACTION, COMPACT_MAX_SEGMENTS

    photos, index = library
    (photos / "c").mkdir()
    rocket = photos / "a" / "rocket.jpg"
    with Store.open(index.root) as store:
        have = store.counts()["segments"]
    for n in range(COMPACT_MAX_SEGMENTS - have):  # byte-identical copies share the computed vector: no embedding
        shutil.copy(rocket, photos / "c" / f"rocket-{n}.jpg")
    index.add([photos / "c"], commit_every=1)  # one segment per file, up to the limit but not past it
    with Store.open(index.root) as store:
        assert store.counts()["segments"] == COMPACT_MAX_SEGMENTS and store.dead_fraction() == 0
    groups = [g for g in index.duplicates(STRICT) if not any(f.startswith(str(photos / "c")) for f in g.files)]
    plan = actions.apply_plan(actions.make_plan(index.root, groups, "move", to=tmp_path / "moved",
                                                keep=("pixels", "oldest"), threshold=STRICT))
    assert sum(e.status == "done" for e in plan.entries) == 4
    check_index(index)
    with Store.open(index.root) as store:
        # the action's one commit made it one segment past the limit, with few dead rows: compacted
        assert store.dead_fraction() < COMPACT_DEAD_FRACTION
        assert store.counts()["segments"] == 1
    catalog = records(index)
    assert len(catalog) == 7 + COMPACT_MAX_SEGMENTS - have
    assert {e.destination for e in plan.entries} <= set(catalog)


def test_purge_trash_removes_only_what_old_runs_put_in_the_trash(library, tmp_path):
    from click.testing import CliRunner

    from neardup.cli import main

    _, index = library
    chelsea, coffee = sorted(index.duplicates(STRICT), key=lambda g: "coffee" in g.files[0])
    old = actions.apply_plan(actions.make_plan(index.root, [chelsea], "delete", keep=("pixels", "oldest")))
    new = actions.apply_plan(actions.make_plan(index.root, [coffee], "delete", keep=("pixels", "oldest")))
    assert [e.status for e in old.entries] == ["done", "done"] and len(new.entries) == 2
    trash = index.root / "trash"
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (outside / "keep.jpg").write_bytes(Path(new.entries[0].destination).read_bytes())
    os.symlink(outside, Path(old.trash) / "link-to-a-folder")  # links inside a run: never followed, left
    os.symlink(outside / "keep.jpg", Path(old.trash) / "link-to-a-file.jpg")
    os.symlink(outside, trash / "a-link-not-a-run")  # not a run folder: left alone
    (trash / "notes.txt").write_text("not a run folder")
    month_ago = time.time() - 40 * 86400
    for path in (old.trash, trash / "a-link-not-a-run", trash / "notes.txt"):
        os.utime(path, (month_ago, month_ago), follow_symlinks=False)
    outside_before, new_before = tree_hashes(outside), tree_hashes(Path(new.trash))

    runner = CliRunner()
    dry = runner.invoke(main, ["purge-trash", "--index", str(index.root)])  # default: older than 30 days
    assert dry.exit_code == 0, dry.output
    assert old.trash in dry.output and new.trash not in dry.output and "would purge 1 trash folders" in dry.output
    assert all(Path(e.destination).is_file() for e in old.entries)  # a dry run touches nothing
    refused = runner.invoke(main, ["purge-trash", "--index", str(index.root), "--apply"])
    assert refused.exit_code == 2 and "--yes" in refused.output and Path(old.trash).is_dir()

    purged = runner.invoke(main, ["purge-trash", "--index", str(index.root), "--apply", "--yes"])
    assert purged.exit_code == 0, purged.output
    assert "purged 1 trash folders" in purged.output
    assert not any(os.path.lexists(e.destination) for e in old.entries)
    # what the run did not put there stays, and so does its folder, with a warning naming it
    assert sorted(os.listdir(old.trash)) == ["link-to-a-file.jpg", "link-to-a-folder"]
    assert f"{old.trash} keeps 2 entries its run did not put there" in purged.output
    assert tree_hashes(outside) == outside_before and tree_hashes(Path(new.trash)) == new_before
    assert os.path.islink(trash / "a-link-not-a-run") and (trash / "notes.txt").is_file()
    with pytest.raises(actions.ActionError, match="has been purged"):
        actions.undo(old.manifest)
    undone, reembed = actions.undo(new.manifest)  # the younger run is still undoable
    assert undone.state == "undone" and all(os.path.isfile(p) for p in reembed) and len(reembed) == 2

    # a trash folder that is a symbolic link is refused: it would lead outside the index
    assert not os.path.lexists(new.trash)  # the complete undo removed the (empty) folder its run had made
    os.rename(trash, tmp_path / "real-trash")
    os.symlink(tmp_path / "real-trash", trash)
    (tmp_path / "real-trash" / Path(new.trash).name).mkdir()
    os.utime(tmp_path / "real-trash" / Path(new.trash).name, (month_ago, month_ago))
    linked = runner.invoke(main, ["purge-trash", "--index", str(index.root), "--older-than", "0", "--apply", "--yes"])
    assert linked.exit_code == 1 and "not a plain folder" in linked.output
    assert (tmp_path / "real-trash" / Path(new.trash).name).is_dir()


# ---- regression tests for the review of 2026-12-04 (issue 15): each failed on ff7b7d5 -------------------


def replace_atomically(path: Path, data: bytes) -> None:
    """What an editor's save does: new bytes under a new inode, renamed over the old name."""
    tmp = path.with_name(".save-tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_hardlink_undo_never_overwrites_a_file_saved_at_the_source_since(library):
    """Review #1: after a hard-link run the user saves a new picture under a linked name; undo must not
    put the old bytes over it (it did, keeping no copy, exit 0). That entry is reported, the others are
    restored, and once the user moves their file aside a re-run restores the last one."""
    photos, index = library
    before = tree_hashes(photos)
    plan = actions.apply_plan(plan_for(index, "hardlink"))
    assert sum(e.status == "done" for e in plan.entries) == 4
    saved = photos / "b" / "chelsea_half.jpg"
    new_bytes = b"USER EDIT " + os.urandom(100)
    replace_atomically(saved, new_bytes)
    entry = next(e for e in plan.entries if e.source == str(saved))

    with pytest.raises(actions.ActionError, match="changed since the run") as raised:
        actions.undo(plan.manifest)
    assert saved.read_bytes() == new_bytes  # the user's file is untouched
    assert hashlib.sha256(Path(entry.destination).read_bytes()).hexdigest() == before[str(saved)]  # old bytes kept
    after = tree_hashes(photos)
    assert {p: h for p, h in after.items() if p != str(saved)} == {p: h for p, h in before.items() if p != str(saved)}
    assert sorted(raised.value.reembed) == sorted(e.source for e in plan.entries if e.source != str(saved))
    reread = actions.load_manifest(plan.manifest)
    jsonschema.validate(json.loads(Path(plan.manifest).read_text(encoding="utf-8")), MANIFEST)
    assert reread.state == "partly-undone"
    left = [e for e in reread.entries if e.status == "done"]
    assert [e.source for e in left] == [str(saved)] and left[0].reason.startswith("not restored: changed since the run")

    os.rename(saved, photos / "my new picture.jpg")  # the user moves their file aside
    undone, reembed = actions.undo(plan.manifest)
    assert undone.state == "undone" and reembed == [str(saved)]
    index.add(raised.value.reembed + reembed)
    assert tree_hashes(photos) == {**before, str(photos / "my new picture.jpg"): hashlib.sha256(new_bytes).hexdigest()}
    check_index(index)


def test_one_file_reached_by_two_catalog_paths_is_never_its_own_duplicate(library, tmp_path, monkeypatch):
    """Review #2: photos/a indexed a second time through a symlinked folder. Each of its files is then in
    the catalog twice; acting on one path acted on the survivor itself (delete left neither). At plan time
    no action pairs a file with itself; at apply time a source made a hard link to its survivor since the
    plan is skipped too. `index` no longer catalogues such aliases (test_cli), but a catalog written before
    it did, or merged from shards listed under another mount point, still holds them: the actions must
    stand on their own, so the index's alias check is switched off to build that catalog."""
    photos, index = library
    originals = tree_hashes(photos / "a")
    os.symlink("a", photos / "alias")
    monkeypatch.setattr(index_module._Batch, "alias_of", lambda batch, record: None)
    summary = index.add([photos / "alias"])
    monkeypatch.undo()
    assert summary.added == 3  # the same three files, catalogued under a second spelling
    for action, options in (("move", {"to": tmp_path / "moved"}), ("delete", {}), ("hardlink", {})):
        plan = plan_for(index, action, **options)
        aliased = [e for e in plan.entries if os.path.samefile(e.source, e.survivor)]
        assert len(aliased) == 3, action  # chelsea, coffee, rocket: each paired with its other path
        assert all(e.status == "skipped" and "same file as its survivor" in e.reason for e in aliased), action
    deleted = actions.apply_plan(plan_for(index, "delete"))
    assert tree_hashes(photos / "a") == originals  # every kept file is still there
    assert {os.path.basename(e.source) for e in deleted.entries if e.status == "done"} == {
        "chelsea_half.jpg", "chelsea_flip.jpg", "coffee_jpeg30.jpg", ODD_NAME}
    actions.undo(deleted.manifest)


def test_a_source_that_became_its_survivors_file_since_the_plan_is_skipped(library):
    """Review #2 at apply time: the byte-identical copy is made a hard link to its survivor after the plan
    (same sha256, same inode): acting on it would act on the survivor's file."""
    photos, index = library
    plan = plan_for(index, "delete")
    odd = photos / "b" / ODD_NAME
    os.link(photos / "a" / "coffee.jpg", photos / "b" / "tmp-link")
    os.replace(photos / "b" / "tmp-link", odd)
    applied = actions.apply_plan(plan)
    entry = next(e for e in applied.entries if e.source == str(odd))
    assert entry.status == "skipped" and "already a hard link to its survivor" in entry.reason
    assert os.path.samefile(odd, photos / "a" / "coffee.jpg") and not os.path.lexists(entry.destination or "")


def test_keep_in_and_to_are_compared_as_real_folders(library, tmp_path, caplog):
    """Review #3: --keep-in spelled through a symlink protected nothing (string prefixes); --to spelled
    another way did not exclude files already moved there. A --keep-in folder without catalogued files
    is reported."""
    photos, index = library
    reference = photos / "b"
    os.symlink(reference, tmp_path / "reference-link")
    before = tree_hashes(reference)
    plan = actions.apply_plan(plan_for(index, "move", to=tmp_path / "moved", keep_in=[tmp_path / "reference-link"]))
    assert all(Path(e.survivor).is_relative_to(reference) for e in plan.entries)
    assert all(e.status == "skipped" and "--keep-in" in e.reason
               for e in plan.entries if Path(e.source).is_relative_to(reference))
    assert tree_hashes(reference) == before
    assert {e.source for e in plan.entries if e.status == "done"} == {str(photos / "a" / "chelsea.jpg"),
                                                                       str(photos / "a" / "coffee.jpg")}
    assert plan.warnings == []  # the folder holds catalogued files, whatever its spelling
    os.symlink(tmp_path / "moved", tmp_path / "moved-link")
    again = plan_for(index, "move", to=tmp_path / "moved-link")  # the files moved there are done with
    assert again.entries and not [p for e in again.entries for p in (e.source, e.survivor)
                                  if Path(p).is_relative_to(tmp_path / "moved")]

    (tmp_path / "empty").mkdir()
    with caplog.at_level("WARNING", logger="neardup.actions"):
        warned = plan_for(index, "move", to=tmp_path / "elsewhere", keep_in=[tmp_path / "empty"])
    assert warned.warnings == [f"--keep-in {tmp_path / 'empty'} holds no catalogued file: it protects nothing"]
    assert warned.warnings[0] in caplog.text
    jsonschema.validate(warned.to_json(), MANIFEST)
    # a folder the catalog spells only through a symlink still holds catalogued files
    os.symlink(photos, tmp_path / "photos-link")
    index.remove([photos / "a"])
    index.add([tmp_path / "photos-link" / "a"])
    assert plan_for(index, "move", to=tmp_path / "elsewhere", keep_in=[photos / "a"]).warnings == []


def test_apply_skips_a_duplicate_whose_survivor_is_gone_since_the_plan(library):
    """Review #4a: the survivor deleted between plan and apply; its duplicates went to the trash too,
    leaving no copy in the tree. Now they stay, with the reason."""
    photos, index = library
    before = tree_hashes(photos)
    plan = plan_for(index, "delete")
    survivor = photos / "a" / "chelsea.jpg"
    survivor.unlink()
    applied = actions.apply_plan(plan)
    chelsea = [e for e in applied.entries if e.survivor == str(survivor)]
    assert len(chelsea) == 2
    for entry in chelsea:
        assert entry.status == "skipped" and f"its survivor {survivor} is gone" in entry.reason
        assert hashlib.sha256(Path(entry.source).read_bytes()).hexdigest() == before[entry.source]
    assert sum(e.status == "done" for e in applied.entries) == 2  # the coffee group went ahead
    check_index(index)


def test_apply_skips_a_duplicate_edited_in_place_since_the_plan(library):
    """Review #4b: a same-size edit of the duplicate after the plan hashed it went to the trash, and undo
    then refused to restore it. Now the source is hashed again right before the step."""
    photos, index = library
    plan = plan_for(index, "hardlink")
    source = photos / "b" / "coffee_jpeg30.jpg"
    with open(source, "r+b") as f:
        f.seek(200)
        f.write(b"EDITED-IN-PLACE")
    edited = source.read_bytes()
    applied = actions.apply_plan(plan)
    entry = next(e for e in applied.entries if e.source == str(source))
    assert entry.status == "skipped" and "changed since the plan (sha256 differs)" in entry.reason
    assert source.read_bytes() == edited and not os.path.samefile(source, entry.survivor)
    assert not any(Path(applied.trash).rglob(source.name))
    assert sum(e.status == "done" for e in applied.entries) == 3


def test_apply_never_links_to_a_symlink_swapped_in_for_the_survivor(library, tmp_path):
    """Review #4c: the survivor replaced by a symbolic link after the plan; os.link followed it and made
    the duplicate a hard link to the link's target (any file). Now the survivor must be its regular file."""
    photos, index = library
    before = tree_hashes(photos)
    plan = plan_for(index, "hardlink")
    survivor = photos / "a" / "chelsea.jpg"
    elsewhere = tmp_path / "not-a-photo.jpg"
    shutil.copy(survivor, elsewhere)  # same bytes, so only the symlink check can tell
    survivor.unlink()
    os.symlink(elsewhere, survivor)
    applied = actions.apply_plan(plan)
    chelsea = [e for e in applied.entries if e.survivor == str(survivor)]
    assert len(chelsea) == 2
    for entry in chelsea:
        assert entry.status == "skipped" and "symbolic link" in entry.reason
        assert not os.path.samefile(entry.source, elsewhere)
        assert hashlib.sha256(Path(entry.source).read_bytes()).hexdigest() == before[entry.source]
    assert os.stat(elsewhere).st_nlink == 1


def test_undo_restores_all_it_can_syncs_the_index_and_reports_each_conflict(library, tmp_path):
    """Review #11: undo stopped at the first file it could not put back, leaving later ones in --to,
    the manifest unwritten and the index pointing at files that were gone. Now every other file is put
    back, the index and manifest say so, the CLI exits 1 naming the conflicts, and a re-run retries only
    those."""
    from click.testing import CliRunner

    from neardup.cli import main

    photos, index = library
    before = tree_hashes(photos)
    plan = actions.apply_plan(plan_for(index, "move", to=tmp_path / "moved"))
    assert sum(e.status == "done" for e in plan.entries) == 4
    blocked = {str(photos / "b" / "chelsea_half.jpg"), str(photos / "b" / "coffee_jpeg30.jpg")}
    for path in blocked:
        Path(path).write_bytes(b"new download")

    result = CliRunner().invoke(main, ["undo", plan.manifest])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "2 of 4 files" in result.output and "not restored" in result.output
    assert all(Path(p).read_bytes() == b"new download" for p in blocked)
    reread = actions.load_manifest(plan.manifest)
    assert reread.state == "partly-undone"
    jsonschema.validate(json.loads(Path(plan.manifest).read_text(encoding="utf-8")), MANIFEST)
    for entry in reread.entries:
        if entry.source in blocked:
            assert entry.status == "done" and "a file is now at" in entry.reason
            assert hashlib.sha256(Path(entry.destination).read_bytes()).hexdigest() == before[entry.source]
        else:
            assert entry.status == "undone" and not os.path.exists(entry.destination)
            assert hashlib.sha256(Path(entry.source).read_bytes()).hexdigest() == before[entry.source]
    catalog = records(index)
    check_index(index)
    assert all(os.path.exists(p) for p in catalog)  # the index follows the disk
    assert {e.destination for e in reread.entries if e.source in blocked} <= set(catalog)

    with pytest.raises(actions.UndoIncomplete) as again:  # a re-run retries the two, restores nothing else
        actions.undo(plan.manifest)
    assert {e.source for e in again.value.not_restored} == blocked
    for path in blocked:
        os.unlink(path)
    undone, _ = actions.undo(plan.manifest)
    assert undone.state == "undone" and tree_hashes(photos) == before
    assert set(records(index)) == set(before) and check_index(index)


def test_a_check_that_fails_under_the_writer_lock_leaves_the_plan_unapplied(library, tmp_path):
    """apply_plan's `check` runs with the lock held, before anything is written (the server's guard
    against a plan the index moved on from): when it raises, no file moves and no manifest is written."""
    photos, index = library
    plan = plan_for(index, "move", to=tmp_path / "moved")
    assert plan.todo
    before = tree_hashes(photos)

    def index_moved_on():
        raise actions.ActionError("the index was written since this plan was made")

    with pytest.raises(actions.ActionError, match="written since"):
        actions.apply_plan(plan, check=index_moved_on)
    assert tree_hashes(photos) == before and not (tmp_path / "moved").exists()
    assert plan.state == "planned" and not list((index.root / actions.ACTIONS_DIR).glob("*.json"))


# ---- regression tests for the review of 2026-12-06 (issue 21): each failed on 91b733b -------------------


@pytest.mark.parametrize("where", ["segments", "trash", "actions", ".", "link-to-segments", "link-to-index/sub"])
def test_a_move_target_inside_the_index_folder_is_refused(library, tmp_path, where):
    """Review #1: --to <index>/segments was accepted, and the same apply's orphan sweep deleted the moved
    photos; --to <index>/trash let purge-trash delete them. Every spelling that leads into the index
    folder (itself, a sub-folder, a symbolic link to either) is refused at plan time; nothing moves."""
    from click.testing import CliRunner

    from neardup.cli import main

    photos, index = library
    (tmp_path / "link-to-segments").symlink_to(index.root / "segments", target_is_directory=True)
    (tmp_path / "link-to-index").symlink_to(index.root, target_is_directory=True)
    target = tmp_path / where if where.startswith("link") else index.root / where
    before = tree_hashes(photos)
    with pytest.raises(actions.ActionError, match="inside the index folder"):
        plan_for(index, "move", to=target)
    result = CliRunner().invoke(main, ["dups", "--index", str(index.root), "--threshold", str(STRICT), "--action", "move",
                                       "--to", str(target), "--apply"])
    assert result.exit_code == 1 and "inside the index folder" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert tree_hashes(photos) == before and not list((index.root / actions.ACTIONS_DIR).glob("*.json"))


def test_apply_refuses_a_target_turned_into_a_link_into_the_index_since_the_plan(library, tmp_path):
    """The plan's --to was an ordinary (not yet existing) folder; before apply it became a symbolic link
    to the index's segments folder. Apply re-checks the target right before touching anything."""
    photos, index = library
    target = tmp_path / "review"
    plan = plan_for(index, "move", to=target)
    assert plan.todo
    target.symlink_to(index.root / "segments", target_is_directory=True)
    before = tree_hashes(photos)
    with pytest.raises(actions.ActionError, match="inside the index folder"):
        actions.apply_plan(plan)
    assert tree_hashes(photos) == before
    assert not [n for n in os.listdir(index.root / "segments") if n.endswith(".jpg")]


def test_a_folder_on_the_way_replaced_by_a_link_into_the_index_skips_that_file(library, tmp_path):
    """Per step: a sub-folder of the target swapped for a link into the index between plan and apply
    skips the files bound there (kept in place, with the reason); the others move."""
    photos, index = library
    target = tmp_path / "review"
    plan = plan_for(index, "move", to=target)
    deep = [e for e in plan.todo if os.sep + "deep" + os.sep in e.destination]
    assert deep and len(deep) < len(plan.todo)
    folder = Path(deep[0].destination).parent
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.symlink_to(index.root / "segments", target_is_directory=True)
    actions.apply_plan(plan)
    for entry in plan.entries:
        if entry in deep:
            assert entry.status == "skipped" and "leads into the index folder" in entry.reason
            assert os.path.isfile(entry.source)
        elif entry.status == "done":
            assert os.path.isfile(entry.destination) and not os.path.lexists(entry.source)
    assert not [n for n in os.listdir(index.root / "segments") if n.endswith(".jpg")]


def test_the_segment_sweep_deletes_only_files_the_store_wrote(library, tmp_path):
    """Review #1 (second half) and #3: the orphan sweep deleted every file in segments/ it did not know,
    and a sub-folder there made every later write fail ('Is a directory'). It now removes only regular
    files named like its own segments (orphans and temporaries) and leaves everything else."""
    photos, index = library
    segments = index.root / "segments"
    chelsea = next(photos.rglob("chelsea.jpg"))
    foreign = {
        "photo.jpg": chelsea.read_bytes(),
        "sub/deep/photo.jpg": chelsea.read_bytes(),
        "notes.npy": b"user data",
        "20261206034303-375f2f53.vectors.npy.bak": b"user data",
    }
    for name, data in foreign.items():
        (segments / name).parent.mkdir(parents=True, exist_ok=True)
        (segments / name).write_bytes(data)
    (segments / "20990101000000-deadbeef.codes.npy").mkdir()  # a folder with a segment's name
    (segments / "20990101000000-0badf00d.vectors.npy").symlink_to(chelsea)  # a link with a segment's name
    orphans = [segments / "20990101000000-abcdef12.vectors.npy", segments / ".tmp-20990101000000-abcdef12.codes.npy"]
    for orphan in orphans:
        orphan.write_bytes(b"left by a crash")
    before = tree_hashes(photos)

    new = tmp_path / "new"
    new.mkdir()
    shutil.copy(next(photos.rglob("rocket.jpg")), new / "rocket2.png")
    index.add([new])  # a writer: sweeps at open
    with Store.open(index.root, write=True) as store:
        store.compact()  # and after a compaction
    assert not any(o.exists() for o in orphans)
    for name, data in foreign.items():
        assert (segments / name).read_bytes() == data
    assert (segments / "20990101000000-deadbeef.codes.npy").is_dir()
    assert os.path.islink(segments / "20990101000000-0badf00d.vectors.npy") and chelsea.is_file()
    assert tree_hashes(photos) == before
    index.add([photos])  # later writes keep working
    check_index(index)


def test_purge_trash_leaves_folders_no_manifest_of_this_index_made(library, tmp_path):
    """Review #1 (purge half): purge-trash deleted any folder in the trash as an old run. Now a folder is a
    run's only when a manifest names it, and only the files its entries put there are deleted."""
    photos, index = library
    run = actions.apply_plan(plan_for(index, "delete"))
    assert any(e.status == "done" for e in run.entries)
    trash = index.root / actions.TRASH_DIR
    stranger = trash / "20260101-000000.000-abcdef"  # looks like a run, no manifest made it
    (stranger / "sub").mkdir(parents=True)
    (stranger / "sub" / "photo.jpg").write_bytes(b"a user's photo")
    (Path(run.trash) / "added-later.jpg").write_bytes(b"another user's photo")
    purged = actions.purge_trash(index.root, 0)
    assert [r.path for r in purged] == [run.trash]
    assert not any(os.path.lexists(e.destination) for e in run.entries if e.destination)
    assert (stranger / "sub" / "photo.jpg").read_bytes() == b"a user's photo"
    assert (Path(run.trash) / "added-later.jpg").read_bytes() == b"another user's photo"
    assert purged[0].left == [str(Path(run.trash) / "added-later.jpg")]


# ---- issue 19: the default survivor is the original ------------------------------------------------------


def test_the_default_survivor_is_the_original_in_every_demo_group(full_index, collection, tmp_path):
    """The old default (most pixels, then the largest file) kept the captioned or brightened copy and moved
    the original away in most demo groups. The default policy keeps the original in every group."""
    originals = {str(Path(p).resolve()) for p in collection["originals"].values()}
    groups = full_index.duplicates()
    plan = actions.make_plan(full_index.root, groups, "move", to=tmp_path / "moved")
    survivors = {entry.group: entry.survivor for entry in plan.entries}
    judged = 0
    for number, group in enumerate(groups, 1):
        held = [p for p in group.files if p in originals]
        if len(held) == 1:
            judged += 1
            assert survivors[number] == held[0], (group.files, survivors[number])
    assert judged >= 14


def test_central_keeps_the_original_against_framed_stretched_captioned_and_smaller_copies(tmp_path, collection, embedder):
    """Random names, one mtime: only pixels and vectors decide. A framed copy has more pixels, a stretched
    one more pixels, a captioned one a larger file; the original is kept. A larger version of the same
    picture is the better file, and is kept over a smaller original of it."""
    from PIL import Image, ImageOps

    from neardup import demo

    source = Image.open(collection["originals"]["coffee"]).convert("RGB")
    versions = {
        "original": source,
        "framed": ImageOps.expand(source, border=60, fill=(255, 255, 255)),
        "stretched": source.resize((int(source.width * 1.45), source.height), Image.Resampling.BICUBIC),
        "caption": demo.watermark(source),
        "jpeg": demo.jpeg(source, 20),
        "half": demo.half(source),
        "bright": demo.brighten(source),
        "flip": demo.flip(source),
    }
    folder = tmp_path / "photos"
    folder.mkdir()
    names = {}
    for i, (kind, image) in enumerate(versions.items()):
        path = folder / f"{(i * 7919) % 1000:03d}.jpg"
        image.save(path, quality=95)
        os.utime(path, (1_600_000_000, 1_600_000_000))
        names[kind] = str(path)
    with Index.open(tmp_path / "idx", create=True, embedder=embedder) as index:
        index.add([folder])
        with Store.open(index.root) as store:
            records = {kind: store.record(path) for kind, path in names.items()}
            vectors = {r.path: store.vector(r.id) for r in records.values()}

    def survivor(*kinds):
        chosen = actions.choose_survivor([records[k] for k in kinds], actions.DEFAULT_KEEP, vectors=vectors)
        return next(k for k in kinds if records[k].path == chosen.path)

    assert survivor(*versions) == "original"
    assert survivor("framed", "caption", "original", "jpeg", "flip") == "original"
    assert survivor("original", "half") == "original"  # one picture: the most pixels
    # a higher-resolution version of a picture is the better file, whichever was made first
    smaller = {k: v for k, v in records.items() if k != "original"}
    assert survivor("half", "original", "jpeg") == "original"
    assert smaller and actions.choose_survivor([records["half"], records["original"]], actions.DEFAULT_KEEP,
                                               vectors=vectors).path == records["original"].path


def test_shape_outliers_are_the_members_whose_aspect_ratio_few_others_share():
    def record(name, width, height):
        return Record(f"/p/{name}.jpg", size=1, mtime_ns=1, width=width, height=height)

    group = [record("a", 600, 400), record("b", 300, 200), record("c", 480, 320), record("stretched", 870, 400),
             record("framed", 720, 520)]
    assert list(actions.shape_outliers(group)) == [False, False, False, True, True]
    assert not actions.shape_outliers([record("a", 600, 400), record("b", 870, 400)]).any()  # a pair: no majority


def test_a_complete_undo_removes_the_folders_its_run_made_and_only_empty_ones(library, tmp_path):
    """Issue 19 #8: undo left behind the folders the move had made. They are recorded in the manifest
    before the first is made and removed by a complete undo, deepest first, each only while empty."""
    photos, index = library
    target = tmp_path / "new" / "review"
    plan = actions.apply_plan(plan_for(index, "move", to=target))
    made = [p for p in plan.created_dirs]
    assert str(target) in made and str(tmp_path / "new") in made and all(os.path.isdir(p) for p in made)
    assert json.loads(Path(plan.manifest).read_text())["created_dirs"] == made
    (tmp_path / "new" / "notes.txt").write_text("the user's")  # put there since: keeps its folder
    undone, _ = actions.undo(plan.manifest)
    assert undone.state == "undone"
    assert not target.exists() and (tmp_path / "new" / "notes.txt").read_text() == "the user's"

    again = actions.apply_plan(plan_for(index, "move", to=tmp_path / "other" / "deep"))
    actions.undo(again.manifest)
    assert not (tmp_path / "other").exists()
