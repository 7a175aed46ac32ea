"""The actions API (`neardup serve --allow-actions`): plan, apply, undo and list runs over HTTP.

Real photos, the real model, real files: every test checks the bytes on disk by sha256 and the index's
catalog. The API must be the CLI's engine (same plan, same manifest), and every safety rule of issue 14
has a test here: off by default, JSON only, same origin only, the token rules, one writer at a time,
a plan applied once and never after the index or its files changed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner
from conftest import build_library, copy_probability, restored_library, tree_hashes

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from neardup import actions
from neardup.cli import main
from neardup.index import DEFAULT_THRESHOLD, Index
from neardup.schemas import ACTION_PLAN, ACTION_RUN, ACTION_RUNS, ERROR
from neardup.store import Store
from neardup.web.app import create_app

THRESHOLD = round(copy_probability(0.8, aware=True), 4)  # a strict copy probability
KEEP = "pixels,oldest"  # the full-size originals in photos/a survive
TOKEN = "actions-test-token"


@pytest.fixture(scope="module")
def pristine_library(tmp_path_factory, collection, embedder) -> Path:
    return build_library(tmp_path_factory.mktemp("webactions"), collection, embedder)


@pytest.fixture
def library(pristine_library, embedder):
    yield from restored_library(pristine_library, embedder)


@pytest.fixture
def client(library, tmp_path):
    _, index = library
    with TestClient(create_app(index, allow_actions=True, thumbs_dir=tmp_path / "thumbs"),
                    base_url="http://127.0.0.1") as client:
        yield client


DUPLICATES = ("b/chelsea_half.jpg", "b/deep/chelsea_flip.jpg", "b/coffee_jpeg30.jpg")


def plan(client, action="move", **body) -> dict:
    response = client.post("/api/actions/plan", json={"action": action, "threshold": THRESHOLD, "keep": KEEP, **body})
    assert response.status_code == 200, response.text
    answer = response.json()
    jsonschema.validate(answer, ACTION_PLAN)
    return answer


def apply(client, plan_id: str):
    return client.post("/api/actions/apply", json={"plan_id": plan_id, "confirm": True})


def assert_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    jsonschema.validate(body, ERROR)
    return body["error"]


def image_id(index: Index, path: Path) -> int:
    with Store.open(index.root) as store:
        return store.record(str(path)).id


def catalog(index: Index) -> set[str]:
    with Store.open(index.root) as store:
        assert store.verify() == []
        return {r.path for r in store.records(status="indexed")}


# ---- the plan: the CLI's dry run, nothing touched ------------------------------------------------------

def test_plan_is_the_cli_dry_run_and_touches_nothing(library, client, tmp_path):
    photos, index = library
    before, version = tree_hashes(photos), index.version()
    answer = plan(client, to=str(tmp_path / "moved"))
    manifest = answer["manifest"]
    assert answer["plan_id"] == manifest["id"] and manifest["state"] == "planned"
    assert all(e["status"] == "planned" for e in manifest["entries"])
    assert {e["source"] for e in manifest["entries"]} == {str(photos / p) for p in DUPLICATES}
    assert {e["survivor"] for e in manifest["entries"]} == {str(photos / "a" / "chelsea.jpg"), str(photos / "a" / "coffee.jpg")}
    # nothing on disk changed: the photos, the index, no target folder, no manifest
    assert tree_hashes(photos) == before and index.version() == version
    assert not (tmp_path / "moved").exists() and not (index.root / "actions").exists()

    cli = CliRunner().invoke(main, ["dups", "--index", str(index.root), "--threshold", str(THRESHOLD), "--keep", KEEP,
                                    "--action", "move", "--to", str(tmp_path / "moved"), "--json"])
    assert cli.exit_code == 0, cli.output
    dry_run = json.loads(cli.stdout)
    assert dry_run["entries"] == manifest["entries"]  # same engine, same plan, file by file
    assert {k: v for k, v in dry_run.items() if k not in ("id", "created")} == \
           {k: v for k, v in manifest.items() if k not in ("id", "created")}


def test_plan_defaults_to_the_index_threshold_and_policy(library, client):
    photos, _ = library
    response = client.post("/api/actions/plan", json={"action": "delete"})
    assert response.status_code == 200, response.text
    manifest = response.json()["manifest"]
    assert manifest["threshold"] == DEFAULT_THRESHOLD and manifest["keep"] == list(actions.DEFAULT_KEEP)
    assert manifest["trash"].startswith(str(library[1].root / "trash"))


# ---- apply and undo, checked on disk ---------------------------------------------------------------------

def test_move_with_one_file_left_out_then_undo(library, client, tmp_path):
    photos, index = library
    before = tree_hashes(photos)
    kept_back = photos / "b" / "coffee_jpeg30.jpg"
    answer = plan(client, to=str(tmp_path / "moved"), exclude=[image_id(index, kept_back)])
    left_out = next(e for e in answer["manifest"]["entries"] if e["source"] == str(kept_back))
    assert left_out["status"] == "skipped" and "left out" in left_out["reason"] and left_out["destination"] is None

    response = apply(client, answer["plan_id"])
    assert response.status_code == 200, response.text
    run = response.json()
    jsonschema.validate(run, ACTION_RUN)
    assert run["run_id"] == answer["plan_id"] and run["manifest"]["state"] == "applied"
    assert run["manifest_path"] == str(index.root / "actions" / f"{run['run_id']}.json")
    assert json.loads(Path(run["manifest_path"]).read_text(encoding="utf-8")) == run["manifest"]
    moved = {e["source"]: e["destination"] for e in run["manifest"]["entries"] if e["status"] == "done"}
    assert set(moved) == {str(photos / "b" / "chelsea_half.jpg"), str(photos / "b" / "deep" / "chelsea_flip.jpg")}
    after = tree_hashes(photos, tmp_path / "moved")
    for source, destination in moved.items():
        assert source not in after and after[destination] == before[source]
    assert after[str(kept_back)] == before[str(kept_back)]
    indexed = catalog(index)
    assert set(moved.values()) <= indexed and not set(moved) & indexed  # the index follows the files

    runs = client.get("/api/actions").json()
    jsonschema.validate(runs, ACTION_RUNS)
    assert runs["enabled"] is True
    assert runs["runs"] == [{"run_id": run["run_id"], "action": "move", "created": run["manifest"]["created"],
                             "state": "applied", "counts": {"done": 2, "skipped": 1},
                             "manifest_path": run["manifest_path"], "to": str(tmp_path / "moved")}]

    assert "already applied in run" in assert_error(apply(client, answer["plan_id"]), 409)  # a plan is applied once
    assert tree_hashes(photos, tmp_path / "moved").keys() == after.keys()

    response = client.post("/api/actions/undo", json={"run_id": run["run_id"]})
    assert response.status_code == 200, response.text
    undone = response.json()
    jsonschema.validate(undone, ACTION_RUN)
    assert undone["manifest"]["state"] == "undone"
    assert {e["status"] for e in undone["manifest"]["entries"] if e["source"] in moved} == {"undone"}
    assert tree_hashes(photos) == before and tree_hashes(tmp_path / "moved") == {}
    assert set(moved) <= catalog(index)
    assert client.get("/api/actions").json()["runs"][0]["counts"] == {"undone": 2, "skipped": 1}


def test_delete_goes_to_the_trash_and_undo_indexes_the_files_again(library, client):
    photos, index = library
    before = tree_hashes(photos)
    answer = plan(client, "delete")
    run = apply(client, answer["plan_id"]).json()
    deleted = {e["source"]: e["destination"] for e in run["manifest"]["entries"]}
    assert {e["status"] for e in run["manifest"]["entries"]} == {"done"} and len(deleted) == 3
    trash = tree_hashes(index.root / "trash")
    for source, destination in deleted.items():
        assert not os.path.lexists(source) and trash[destination] == before[source]
    assert not set(deleted) & catalog(index)

    undone = client.post("/api/actions/undo", json={"run_id": run["run_id"]})
    assert undone.status_code == 200, undone.text
    assert tree_hashes(photos) == before
    assert set(deleted) <= catalog(index)  # re-embedded, as `neardup undo` does
    assert {p for g in index.duplicates(THRESHOLD) for p in g.files} == {str(photos / p) for p in DUPLICATES} | {
        str(photos / "a" / "chelsea.jpg"), str(photos / "a" / "coffee.jpg")}


def test_hardlink_and_undo(library, client):
    photos, index = library
    before = tree_hashes(photos)
    run = apply(client, plan(client, "hardlink")["plan_id"]).json()
    for entry in run["manifest"]["entries"]:
        assert entry["status"] == "done" and os.path.samefile(entry["source"], entry["survivor"])
    assert client.post("/api/actions/undo", json={"run_id": run["run_id"]}).status_code == 200
    assert tree_hashes(photos) == before
    assert all(not os.path.samefile(e["source"], e["survivor"]) for e in run["manifest"]["entries"])


# ---- never applied blindly ---------------------------------------------------------------------------------

def test_a_plan_older_than_the_last_index_write_is_refused(library, client, tmp_path, collection):
    photos, index = library
    answer = plan(client, to=str(tmp_path / "moved"))
    shutil.copy(collection["originals"]["astronaut"], photos / "astronaut.jpg")
    index.add([photos / "astronaut.jpg"])  # another write to the index after the plan was made
    before = tree_hashes(photos)
    message = assert_error(apply(client, answer["plan_id"]), 409)
    assert "index was written since this plan was made" in message and "preview again" in message
    assert tree_hashes(photos) == before and not (tmp_path / "moved").exists()
    assert not (index.root / "actions").exists()
    fresh = plan(client, to=str(tmp_path / "moved"))  # previewing again is all it takes
    assert apply(client, fresh["plan_id"]).status_code == 200


def test_a_plan_whose_files_changed_is_refused(library, client, tmp_path):
    photos, index = library
    answer = plan(client, to=str(tmp_path / "moved"))
    changed = photos / "b" / "coffee_jpeg30.jpg"
    changed.write_bytes(changed.read_bytes()[:-10] + b"0123456789")  # same size, other bytes; index not told
    before = tree_hashes(photos)
    message = assert_error(apply(client, answer["plan_id"]), 409)
    assert "files changed since this plan was made" in message and str(changed) in message
    assert tree_hashes(photos) == before and not (tmp_path / "moved").exists()
    again = plan(client, to=str(tmp_path / "moved"))  # the new preview says why it is skipped
    entry = next(e for e in again["manifest"]["entries"] if e["source"] == str(changed))
    assert entry["status"] == "skipped" and "sha256 differs" in entry["reason"]


def test_one_writer_at_a_time_apply_and_undo_answer_409_while_the_index_is_written(library, client, tmp_path):
    photos, index = library
    answer = plan(client, to=str(tmp_path / "moved"))
    before = tree_hashes(photos)
    with Store.open(index.root, write=True):  # another process indexing, or another action, holds the lock
        assert "being written" in assert_error(apply(client, answer["plan_id"]), 409)
    assert tree_hashes(photos) == before and not (index.root / "actions").exists()
    run = apply(client, answer["plan_id"])  # the refused plan was not spent: it applies once the writer is done
    assert run.status_code == 200, run.text
    with Store.open(index.root, write=True):
        assert "being written" in assert_error(client.post("/api/actions/undo", json={"run_id": answer["plan_id"]}), 409)
    assert client.post("/api/actions/undo", json={"run_id": answer["plan_id"]}).status_code == 200
    assert tree_hashes(photos) == before


# ---- safety: off by default, JSON only, same origin only, the token -------------------------------------------

POSTS = [("/api/actions/plan", {"action": "delete"}), ("/api/actions/apply", {"plan_id": "x", "confirm": True}),
         ("/api/actions/undo", {"run_id": "x"})]


def test_without_allow_actions_every_post_answers_403(library, tmp_path):
    photos, index = library
    before = tree_hashes(photos)
    with TestClient(create_app(index, thumbs_dir=tmp_path / "thumbs"), base_url="http://127.0.0.1") as off:
        for path, body in POSTS:
            assert "--allow-actions" in assert_error(off.post(path, json=body), 403)
        runs = off.get("/api/actions").json()
        jsonschema.validate(runs, ACTION_RUNS)
        assert runs["enabled"] is False and runs["runs"] == []
        assert runs["default_keep"] == ",".join(actions.DEFAULT_KEEP) and runs["keep_criteria"] == list(actions.KEEP_CRITERIA)
    assert tree_hashes(photos) == before and not (index.root / "actions").exists()


def test_a_foreign_origin_or_a_non_json_body_is_refused(library, client, tmp_path):
    photos, index = library
    answer = plan(client, to=str(tmp_path / "moved"))
    before = tree_hashes(photos)
    for origin in ("http://evil.example", "http://127.0.0.1:9999", "null", "https://127.0.0.1.evil.example"):
        for path, body in [*POSTS, ("/api/actions/apply", {"plan_id": answer["plan_id"], "confirm": True})]:
            assert "cross-origin" in assert_error(client.post(path, json=body, headers={"origin": origin}), 403)
    data = json.dumps({"plan_id": answer["plan_id"], "confirm": True})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"content-type": content_type} if content_type else {}
        request = client.build_request("POST", "/api/actions/apply", content=data, headers=headers)
        assert request.headers.get("content-type") == content_type
        assert "application/json" in assert_error(client.send(request), 415)
    assert tree_hashes(photos) == before and not (tmp_path / "moved").exists()
    # the refused requests did nothing: the plan is still there, and the page's own origin may apply it
    run = client.post("/api/actions/apply", json={"plan_id": answer["plan_id"], "confirm": True},
                      headers={"origin": "http://127.0.0.1"})
    assert run.status_code == 200, run.text


def test_the_token_rules_of_the_api_apply(library, tmp_path):
    photos, index = library
    app = create_app(index, token=TOKEN, allow_actions=True, thumbs_dir=tmp_path / "thumbs")
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for path, body in POSTS:
            assert_error(client.post(path, json=body), 401)
        assert_error(client.get("/api/actions"), 401)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        answer = client.post("/api/actions/plan", json={"action": "delete"}, headers=auth)
        assert answer.status_code == 200, answer.text
        assert client.get("/api/actions", headers=auth).status_code == 200
    with TestClient(create_app(index, allow_actions=True, thumbs_dir=tmp_path / "thumbs"),
                    base_url="http://evil.example") as rebound:  # no token: loopback Host names only
        assert_error(rebound.post("/api/actions/plan", json={"action": "delete"}), 403)


def test_bad_requests_get_one_line_json_errors(library, client, tmp_path):
    photos, index = library
    before = tree_hashes(photos)
    not_a_folder = photos / "a" / "rocket.jpg"
    cases = [
        ({"action": "shred"}, 422, "action"),
        ({"action": "move"}, 422, "Choose the folder to move the duplicates into"),
        ({"action": "delete", "to": str(tmp_path)}, 422, "goes with the action move only"),
        ({"action": "move", "to": "relative/folder"}, 422, "Give the full path of the folder"),
        ({"action": "move", "to": str(not_a_folder)}, 422, "is a file, not a folder"),
        ({"action": "delete", "keep": "prettiest"}, 422, "unknown keep criterion prettiest"),
        ({"action": "delete", "keep_in": [str(tmp_path / "nowhere")]}, 422, "not a folder"),
        ({"action": "delete", "exclude": [10**9]}, 422, "no image with id"),
        ({"action": "delete", "threshold": 0.2}, 422, "threshold"),
        ({"action": "delete", "paths": ["/etc"]}, 422, "paths"),
    ]
    for body, status, text in cases:
        assert text in assert_error(client.post("/api/actions/plan", json=body), status), body
    fields = {"to": {"action": "move", "to": "relative/folder"}, "keep": {"action": "delete", "keep": "prettiest"},
              "keep_in": {"action": "delete", "keep_in": ["x"]}}
    for field, body in fields.items():  # the page shows each error next to its field
        assert client.post("/api/actions/plan", json=body).json()["field"] == field
    assert "JSON" in assert_error(client.post("/api/actions/plan", content=b"{not json",
                                              headers={"content-type": "application/json"}), 422)
    huge = json.dumps({"action": "delete", "exclude": [1] * 400_000})
    assert "too large" in assert_error(client.post("/api/actions/plan", content=huge,
                                                   headers={"content-type": "application/json"}), 413)
    answer = plan(client, "delete")
    assert "confirm" in assert_error(client.post("/api/actions/apply", json={"plan_id": answer["plan_id"], "confirm": False}), 422)
    assert "confirm" in assert_error(client.post("/api/actions/apply", json={"plan_id": answer["plan_id"]}), 422)
    assert "preview again" in assert_error(apply(client, "20260101-000000.000-abcdef"), 404)
    for run_id in ("nope", "../../etc/passwd", answer["plan_id"]):  # a plan not applied has no run
        assert_error(client.post("/api/actions/undo", json={"run_id": run_id}), 404)
    assert tree_hashes(photos) == before and not (index.root / "trash").exists()


def test_serve_allow_actions_starts_a_server_that_acts(library):
    import httpx

    photos, index = library
    env = {k: v for k, v in os.environ.items() if k != "NEARDUP_TOKEN"}
    server = subprocess.Popen([sys.executable, "-m", "neardup.cli", "serve", "--index", str(index.root), "--port", "0",
                               "--allow-actions"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stderr.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert url, line
        assert "actions allowed" in server.stderr.readline()
        with httpx.Client(base_url=url.group(0), timeout=120) as client:
            assert client.get("/api/actions").json()["enabled"] is True
            answer = client.post("/api/actions/plan", json={"action": "delete", "threshold": THRESHOLD, "keep": KEEP})
            assert answer.status_code == 200, answer.text
            assert {e["source"] for e in answer.json()["manifest"]["entries"]} == {str(photos / p) for p in DUPLICATES}
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(30) == 0
    help_text = CliRunner().invoke(main, ["serve", "--help"]).output
    assert "--allow-actions" in help_text


def test_a_target_leading_into_the_index_folder_is_refused(library, client, tmp_path):
    """Review 2026-12-06 #1 (web): `to` a symbolic link to the index's segments folder was planned and
    applied, and the apply's segment sweep deleted the moved photos. It is refused with the reason, both
    at plan time and (when the link appears after the plan) at apply time; no file is touched."""
    photos, index = library
    before = tree_hashes(photos)
    innocent = tmp_path / "dups-out"
    innocent.symlink_to(index.root / "segments", target_is_directory=True)
    refused = client.post("/api/actions/plan", json={"action": "move", "to": str(innocent), "threshold": THRESHOLD})
    assert "inside the index folder" in assert_error(refused, 422)

    later = tmp_path / "later"
    planned = plan(client, to=str(later))
    assert planned["manifest"]["entries"]
    later.symlink_to(index.root, target_is_directory=True)
    assert "inside the index folder" in assert_error(apply(client, planned["plan_id"]), 422)
    assert tree_hashes(photos) == before
    from neardup.store import _SEGMENT_FILE

    assert all(_SEGMENT_FILE.fullmatch(n) for n in os.listdir(index.root / "segments"))  # only the store's own files


# ---- issue 19: two tabs, and plans that say why -------------------------------------------------------------

def test_a_plan_applied_from_another_tab_is_reported_as_applied_not_as_changed_files(library, client, tmp_path):
    """Issue 19 #7: two tabs preview the same move; the first applies it. The second tab's apply is told
    the plan was already applied in that run (undo it there), never that the files changed."""
    photos, index = library
    first = plan(client, to=str(tmp_path / "moved"))
    second = plan(client, to=str(tmp_path / "moved"))
    assert first["plan_id"] != second["plan_id"]
    run = apply(client, first["plan_id"])
    assert run.status_code == 200, run.text
    after = tree_hashes(photos, tmp_path / "moved")
    message = assert_error(apply(client, second["plan_id"]), 409)
    assert f"already applied in run {first['plan_id']}" in message and "undo it there" in message
    assert "changed" not in message
    again = assert_error(apply(client, first["plan_id"]), 409)  # the same tab, twice
    assert f"already applied in run {first['plan_id']}" in again
    assert tree_hashes(photos, tmp_path / "moved") == after


def test_plan_notes_warn_near_the_field_in_plain_words(library, client, tmp_path):
    """Issue 19 #8: a target inside the indexed folder is warned about; the library itself says why nothing
    would move; a plan of nothing says why."""
    photos, index = library
    inside = plan(client, to=str(photos / "dups"))
    assert inside["manifest"]["entries"]
    warning = next(n for n in inside["notes"] if n["field"] == "to")
    assert warning["level"] == "warning" and "indexed folder" in warning["message"] and "again" in warning["message"]

    itself = plan(client, to=str(photos))
    assert not [e for e in itself["manifest"]["entries"] if e["status"] == "planned"]
    error = next(n for n in itself["notes"] if n["field"] == "to")
    assert error["level"] == "error" and "nothing would move" in error["message"]

    ids = [image_id(index, photos / p) for p in DUPLICATES]
    nothing = plan(client, "delete", exclude=ids)
    info = [n for n in nothing["notes"] if n["field"] is None]
    assert info and "would change no file" in info[0]["message"] and "you left it out" in info[0]["message"]
    outside = plan(client, to=str(tmp_path / "moved"))
    assert outside["notes"] == []
