"""The actions API: `dups --action` from the page, with the CLI's own engine (`neardup serve --allow-actions`).

    POST /api/actions/plan    {"action", "to", "threshold", "keep", "keep_in", "exclude"} -> schemas.ACTION_PLAN
    POST /api/actions/apply   {"plan_id", "confirm": true}                             -> schemas.ACTION_RUN
    POST /api/actions/undo    {"run_id"}                                               -> schemas.ACTION_RUN
    GET  /api/actions         past runs of <index>/actions/                            -> schemas.ACTION_RUNS

Plan, apply and undo are `actions.make_plan`, `actions.apply_plan` and `actions.undo`, exactly as the CLI
calls them (re-hashing, skips with reasons, the journal, index sync, crash recovery); this module adds
only what a long-lived server needs on top:

* A plan is kept in memory with the index version it was made from. Apply settles interrupted runs,
  re-makes the plan (every file hashed again) and applies only if the index has not been written since
  and the fresh plan says the same thing file by file; otherwise it answers 409 and the page previews
  again. A plan is applied at most once (409 after).
* One actions call at a time in this server, and the index's writer lock is taken without waiting: while
  another process (or run) writes the index, apply and undo answer 409 at once.
* Without --allow-actions every POST answers 403. A POST needs `Content-Type: application/json`, and
  one whose `Origin` is not this server's own is refused (403): no other site's page can start an action,
  even one the user has open. The app's guard (token or loopback Host) runs before all of this.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from .. import actions, files, schemas
from ..errors import ActionError, IndexLocked
from ..index import DEFAULT_THRESHOLD, DuplicateGroup, Index
from .common import MIN_DUPS_THRESHOLD, ApiError

MAX_BODY_BYTES = 1_000_000
MAX_KEPT_PLANS = 16  # previews kept for apply; older ones answer 404 ("preview again")
EXCLUDED = "left out on request (unchecked on the page)"


class PlanRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: Literal["move", "hardlink", "delete"]
    to: str | None = None
    threshold: float | None = Field(None, ge=MIN_DUPS_THRESHOLD, le=1.0)
    keep: str = ",".join(actions.DEFAULT_KEEP)
    keep_in: list[str] = []
    exclude: list[int] = []
    exclude_paths: list[str] = []


class ApplyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    plan_id: str
    confirm: bool


class UndoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run_id: str


@dataclass
class _Preview:
    """A plan shown to the user, with what it was made from (to re-make it right before applying)."""

    plan: actions.Plan
    groups: list[DuplicateGroup]
    version: int
    keep: tuple[str, ...]
    excluded: frozenset[str]
    applied: bool = False


def actions_router(index: Index, *, enabled: bool) -> APIRouter:
    """The /api/actions endpoints over `index`; every POST answers 403 unless `enabled`."""
    router = APIRouter(prefix="/api/actions", tags=["actions"])
    previews: OrderedDict[str, _Preview] = OrderedDict()
    busy = threading.Lock()  # one plan, apply or undo at a time in this server

    def exclusive(work: Callable[[], dict]) -> dict:
        if not busy.acquire(blocking=False):
            raise ApiError(409, "another action is running on this server; try again when it has finished")
        try:
            return work()
        finally:
            busy.release()

    @router.post("/plan", openapi_extra=_body(schemas.ACTION_PLAN_REQUEST))
    async def plan(request: Request):
        """What the action would do, file by file: the CLI's dry run (schema: neardup.schemas.ACTION_PLAN).
        Reads only; nothing on disk changes."""
        body = await _checked_body(request, enabled, PlanRequest)
        return await run_in_threadpool(exclusive, lambda: _plan(index, previews, body))

    @router.post("/apply", openapi_extra=_body(schemas.ACTION_APPLY_REQUEST))
    async def apply(request: Request):
        """Do a previewed plan (schema: neardup.schemas.ACTION_RUN): 409 if it was applied already, if
        the index was written since it was made or its files changed, or while the index is being written."""
        body = await _checked_body(request, enabled, ApplyRequest)
        if body.confirm is not True:
            raise ApiError(422, "confirm: must be true (the files will be moved, linked or put in the trash)")
        return await run_in_threadpool(exclusive, lambda: _apply(index, previews, body.plan_id))

    @router.post("/undo", openapi_extra=_body(schemas.ACTION_UNDO_REQUEST))
    async def undo(request: Request):
        """Put back every file of a run, as `neardup undo` does (schema: neardup.schemas.ACTION_RUN)."""
        body = await _checked_body(request, enabled, UndoRequest)
        return await run_in_threadpool(exclusive, lambda: _undo(index, body.run_id))

    @router.get("")
    def runs():
        """Past runs from <index>/actions/, newest first (schema: neardup.schemas.ACTION_RUNS)."""
        found = []
        for path in map(str, actions.manifests(index.root)):
            try:
                run = actions.load_manifest(path)
            except ActionError:
                continue  # not a manifest this neardup reads: not listed
            counts: dict[str, int] = {}
            for entry in run.entries:
                counts[entry.status] = counts.get(entry.status, 0) + 1
            found.append({"run_id": run.id, "action": run.action, "created": run.created, "state": run.state,
                          "counts": counts, "manifest_path": run.manifest, "to": run.to})
        found.sort(key=lambda r: (r["created"], r["run_id"]), reverse=True)
        return {"enabled": enabled, "runs": found, "keep_criteria": list(actions.KEEP_CRITERIA),
                "default_keep": ",".join(actions.DEFAULT_KEEP)}

    return router


# ---- the three steps (run in a worker thread, one at a time) -----------------------------------------

def _plan(index: Index, previews: OrderedDict[str, _Preview], body: PlanRequest) -> dict:
    if body.action == "move" and not body.to:
        raise ApiError(422, "Choose the folder to move the duplicates into.", "to")
    if body.action != "move" and body.to:
        raise ApiError(422, "A folder to move into goes with the action move only.", "to")
    if body.to:
        _absolute("to", body.to)
        if os.path.exists(body.to) and not os.path.isdir(body.to):
            raise ApiError(422, f"{body.to} is a file, not a folder: choose a folder (one that does not exist yet "
                                "is created).", "to")
    for folder in body.keep_in:
        _absolute("keep_in", folder)
        if not os.path.isdir(folder):
            raise ApiError(422, f"{folder} is not a folder: each line must be a folder that exists.", "keep_in")
    try:
        keep = actions.parse_keep(body.keep)
    except ActionError as exc:
        raise ApiError(422, f"Keep in each group: {exc}", "keep") from None
    excluded = set(body.exclude_paths)
    for image_id in body.exclude:
        record = index.image(image_id) if 0 < image_id < 2**63 else None
        if record is None:
            raise ApiError(422, f"exclude: no image with id {image_id}", "exclude")
        excluded.add(record.path)
    threshold = round(body.threshold if body.threshold is not None else DEFAULT_THRESHOLD, 4)
    version = index.version()  # read before the groups: a write after it makes this plan stale, never unnoticed
    groups = without_handled(index, index.duplicates(threshold))
    plan = _make_plan(index, groups, keep, excluded, body.action, body.to, body.keep_in, threshold)
    previews[plan.id] = _Preview(plan, groups, version, keep, frozenset(excluded))
    while len(previews) > MAX_KEPT_PLANS:
        previews.popitem(last=False)
    return {"plan_id": plan.id, "manifest": plan.to_json(), "notes": _notes(index, plan, groups, body.to)}


def _make_plan(index: Index, groups: list[DuplicateGroup], keep: tuple[str, ...], excluded: set[str] | frozenset[str],
               action: str, to: str | None, keep_in: list[str], threshold: float | None) -> actions.Plan:
    """`actions.make_plan`, as the CLI calls it, then the files the user left out marked skipped (their
    survivors stay the policy's choice; a survivor itself is never touched, so leaving it out changes nothing)."""
    try:
        plan = actions.make_plan(index.root, groups, action, to=to, keep=keep, keep_in=keep_in, threshold=threshold)
    except ActionError as exc:
        raise ApiError(422, str(exc), "to" if action == "move" and "move target" in str(exc) else None) from None
    for entry in plan.entries:
        if entry.source in excluded and entry.status == "planned":
            entry.status, entry.reason, entry.destination = "skipped", EXCLUDED, None
    return plan


def _apply(index: Index, previews: OrderedDict[str, _Preview], plan_id: str) -> dict:
    preview = previews.get(plan_id)
    if preview is None:
        raise ApiError(404, f"no plan {plan_id!r} on this server (plans last until the server stops, the "
                            f"{MAX_KEPT_PLANS} newest): preview again")
    if preview.applied:
        raise ApiError(409, f"this plan was already applied in run {plan_id}; undo it there (the Actions tab lists "
                            "it), or preview again")
    shown = preview.plan
    try:
        settled = actions.recover_interrupted(index.root, wait=False)
    except IndexLocked:
        raise _locked() from None
    if settled:
        raise ApiError(409, f"an interrupted earlier run was settled first ({', '.join(settled)}), so the index "
                            "changed after this plan was made: preview again")
    fresh = _make_plan(index, preview.groups, preview.keep, preview.excluded, shown.action, shown.to, shown.keep_in,
                       shown.threshold)
    changed = [a for a, b in zip(shown.entries, fresh.entries) if _substance(shown, a) != _substance(fresh, b)]
    if changed or len(shown.entries) != len(fresh.entries):
        done_by = _applied_elsewhere(index, shown)
        if done_by:
            raise ApiError(409, done_by)
        example = changed[0] if changed else None
        detail = f", e.g. {example.source}" if example else ""
        raise ApiError(409, f"the files changed since this plan was made{detail}: preview again")
    def unchanged_index() -> None:  # run again under the writer lock: no write can slip in between
        if index.version() != preview.version:
            raise ApiError(409, "the index was written since this plan was made (an index run, or another "
                                "action): preview again")

    unchanged_index()
    try:
        plan = actions.apply_plan(shown, wait=False, check=unchanged_index)
    except IndexLocked:
        raise _locked() from None
    finally:
        # once apply_plan has started, its manifest exists: whatever happened, this plan is never applied again
        preview.applied = shown.state != "planned"
    return {"run_id": plan.id, "manifest_path": plan.manifest, "manifest": plan.to_json()}


def _undo(index: Index, run_id: str) -> dict:
    manifest = next((p for p in map(str, actions.manifests(index.root)) if os.path.basename(p) == f"{run_id}.json"), None)
    if manifest is None:
        raise ApiError(404, f"no run {run_id!r} in {index.root / actions.ACTIONS_DIR}")
    try:
        plan, reembed = actions.undo(manifest, wait=False)
    except IndexLocked:
        raise _locked() from None
    except ActionError as exc:
        raise ApiError(409, str(exc)) from None
    if reembed:  # restored deletes and hard links get their own vectors back, as `neardup undo` does
        try:
            index.add(reembed, wait=False)
        except IndexLocked:
            raise ApiError(409, f"the files of run {run_id} are back in place, but another process took the index "
                                f"before they were indexed again: run `neardup index` on their folders") from None
    return {"run_id": plan.id, "manifest_path": plan.manifest, "manifest": plan.to_json()}


# ---- helpers -------------------------------------------------------------------------------------

async def _checked_body(request: Request, enabled: bool, model: type[BaseModel]):
    """The request's JSON body as `model`, after the rules every state-changing call obeys."""
    if not enabled:
        raise ApiError(403, "actions are off: start the server with `neardup serve --allow-actions` to move, "
                            "hard-link or delete files from the page")
    origin = request.headers.get("origin")
    if origin is not None and not _same_origin(origin, request.headers.get("host", "")):
        raise ApiError(403, f"cross-origin request refused (Origin {origin[:100]}): actions are taken from this "
                            "server's own page only")
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise ApiError(415, "send the body as JSON with 'Content-Type: application/json'")
    body = bytearray()
    async for chunk in request.stream():  # Content-Length is not trusted: counted as it comes
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body too large: at most {MAX_BODY_BYTES // 1000} kB")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()]
        fields = [str(e["loc"][0]) for e in exc.errors() if e["loc"]]
        raise ApiError(422, "; ".join(problems), fields[0] if fields else None) from None


def _same_origin(origin: str, host: str) -> bool:
    """Whether the Origin header names this server: the same host and port the request was sent to (the
    scheme is left out, so a TLS proxy in front still counts as the same server)."""
    try:
        netloc = urlsplit(origin).netloc
    except ValueError:
        return False
    return bool(netloc) and netloc.lower() == host.strip().lower()


def _substance(plan: actions.Plan, entry: actions.Entry) -> tuple:
    """What an entry says, whatever run id its plan has (trash destinations hold the id)."""
    destination = entry.destination
    if destination and plan.trash:
        destination = os.path.relpath(destination, plan.trash)
    return (entry.group, entry.source, entry.survivor, entry.sha256, entry.size, entry.survivor_sha256,
            entry.status, entry.reason, destination)


def _absolute(field: str, path: str) -> None:
    if not os.path.isabs(path) or "\0" in path:
        shown = path.replace("\0", "")
        raise ApiError(422, f"Give the full path of the folder, starting with / ({shown!r} is a relative path, "
                            "not an absolute path).", field)


def _applied_elsewhere(index: Index, shown: actions.Plan) -> str | None:
    """Why a plan no longer matches its files when the reason is a run applied since (from another tab or
    window, or the CLI) that did this plan's steps: "already applied in run ...". None otherwise."""
    steps = {(e.source, e.sha256) for e in shown.entries if e.status == "planned"}
    if not steps:
        return None
    for path in map(str, actions.manifests(index.root)):
        try:
            run = actions.load_manifest(path)
        except ActionError:
            continue
        if run.id == shown.id or run.state not in ("applied", "partly-undone", "applying", "interrupted"):
            continue
        done = {(e.source, e.sha256) for e in run.entries if e.status == "done"} & steps
        if done == steps:
            return (f"this plan was already applied in run {run.id} (from another tab, window or the command "
                    f"line); undo it there (the Actions tab lists it), or preview again")
        if done:
            return (f"{len(done)} of this plan's {len(steps)} files were already handled by run {run.id} (applied "
                    f"from another tab, window or the command line); undo it there, or preview again")
    return None


_handled_cache: dict[str, tuple[int, frozenset[str]]] = {}


def handled_files(index: Index) -> frozenset[str]:
    """Paths an applied run is done with: files it moved (at their new paths) and files it made hard links
    to their survivor. Read from the manifests once per index version (an apply or undo writes the index)."""
    version = index.version()
    cached = _handled_cache.get(str(index.root))
    if cached and cached[0] == version:
        return cached[1]
    paths = set()
    for path in map(str, actions.manifests(index.root)):
        try:
            run = actions.load_manifest(path)
        except ActionError:
            continue
        for entry in run.entries:
            if entry.status == "done" and entry.action in ("move", "hardlink"):
                paths.add(entry.destination if entry.action == "move" else entry.source)
    _handled_cache[str(index.root)] = (version, frozenset(paths))
    return frozenset(paths)


def without_handled(index: Index, groups: list[DuplicateGroup]) -> list[DuplicateGroup]:
    """`groups` without the files applied runs are done with (handled_files), as the page shows them: a
    group left with fewer than two files is dropped."""
    done = handled_files(index)
    if not done:
        return groups
    kept = []
    for group in groups:
        pairs = [(p, i) for p, i in zip(group.files, group.ids) if p not in done]
        if len(pairs) >= 2:
            kept.append(dataclasses.replace(group, files=[p for p, _ in pairs], ids=[i for _, i in pairs]))
    return kept


def _library(index: Index) -> list[str]:
    """The indexed folders: the deepest folder holding every indexed file, or (when that is the file
    system's root) each folder that holds indexed files."""
    parents = {os.path.dirname(p) for p in index._search_state().snap.paths}
    if not parents:
        return []
    common = os.path.commonpath(sorted(parents))
    return [common] if os.path.dirname(common) != common else sorted(parents)


def _notes(index: Index, plan: actions.Plan, groups: list[DuplicateGroup], to: str | None) -> list[dict]:
    """What the user should know about this plan, in plain words, each with the field it concerns."""
    notes = [{"field": "keep_in", "level": "warning", "message": w} for w in plan.warnings]
    planned = [e for e in plan.entries if e.status == "planned"]
    members = [p for g in groups for p in g.files]
    if to:
        target = files.real_folder(to)
        inside = [p for p in members if files.is_within(p, [target])]
        library = [f for f in _library(index) if files.is_within(os.path.join(target, "x"), [files.real_folder(f)])]
        if inside and not planned:
            notes.append({"field": "to", "level": "error", "message": (
                f"{to} holds the photos themselves ({len(inside)} files of these groups are inside it). Files "
                "already inside the folder to move into count as moved there, so nothing would move: choose a "
                f"folder outside {library[0] if library else to}.")})
        elif inside:
            notes.append({"field": "to", "level": "warning", "message": (
                f"{len(inside)} files of these groups are already inside {to}: they are left where they are, "
                "as if an earlier move had put them there.")})
        elif library:
            notes.append({"field": "to", "level": "warning", "message": (
                f"{to} is inside the indexed folder {library[0]}: the next `neardup index` of it would index "
                "the moved files again, and they would come back as duplicates. A folder outside it is safer.")})
    if not planned and not any(n["level"] == "error" for n in notes):
        if not groups:
            why = (f"there are no duplicate groups at threshold {plan.threshold}: nothing to do (a lower threshold "
                   "finds more).")
        elif not plan.entries:
            why = "every group holds a single file that can be acted on (the others are handled already)."
        else:
            reasons: dict[str, int] = {}
            for entry in plan.entries:
                reason = "you left it out" if entry.reason == EXCLUDED else (entry.reason or "skipped")
                reasons[reason] = reasons.get(reason, 0) + 1
            listed = "; ".join(f"{n} × {r}" for r, n in sorted(reasons.items(), key=lambda x: -x[1]))
            why = f"all {len(plan.entries)} files would be skipped: {listed}."
        notes.append({"field": None, "level": "info", "message": f"This plan would change no file: {why}"})
    return notes


def _locked() -> ApiError:
    return ApiError(409, "the index is being written by another process (an index run or another action); "
                         "try again when it has finished")


def _body(schema: dict) -> dict:
    """The request body's JSON Schema for the OpenAPI page (the endpoints read the body themselves)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        k: v for k, v in schema.items() if k != "$schema"}}}}}
