"""The `neardup` command: a thin adapter over neardup.index.Index.

Exit codes: 0 success, 1 runtime failure (bad index, model mismatch, an unreadable query image),
2 usage error (bad option, missing path). Errors are one line on stderr; --debug shows the traceback.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time

import click

from .actions import ACTIONS, DEFAULT_KEEP
from .images import ImageError, printable_path
from .index import DEFAULT_BATCH, DEFAULT_INDEX_DIR, DEFAULT_THRESHOLD, Index, NeardupError
from . import neighbourhood
from .models import BACKENDS, describe_auto, describe_embedder
from .store import StoreError

# OSError: disk full, permission denied, vanished files...; UnicodeError: a name that is not valid UTF-8
USER_ERRORS = (StoreError, NeardupError, ImageError, OSError, UnicodeError)


class Failure(click.ClickException):
    """A runtime failure: one line on stderr, exit code 1."""

    exit_code = 1

    def show(self, file=None) -> None:
        click.echo(f"neardup: error: {self.message}", err=True)


def _message(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or str(exc) or type(exc).__name__


class NeardupGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise Failure(_message(exc)) from exc


index_option = click.option(
    "--index", "index_dir", type=click.Path(file_okay=False), envvar="NEARDUP_INDEX", default=DEFAULT_INDEX_DIR,
    show_default=True, help="Index folder (env NEARDUP_INDEX).",
)
threshold_help = "Keep only matches with cosine similarity >= T (1.0 = identical pixels)."
dups_threshold_help = ("Link pairs whose copy probability is >= T, in (0, 1]: the share of true copies among pairs "
                       "scoring as high in neardup's evaluation sets (docs/SCORES.md). The score behind it is "
                       f"collection-aware in an index of {neighbourhood.MIN_FILES} files or more, else the cosine.")


def embedder_options(command):
    """--backend, --model, --model-spec, --threads: which model computes the vectors, and how (neardup.models)."""
    options = [
        click.option("--backend", type=click.Choice(BACKENDS), envvar="NEARDUP_BACKEND",
                     default="auto", show_default=True,
                     help="How to run the model (env NEARDUP_BACKEND): auto = the fastest usable here."),
        click.option("--model", "model_path", type=click.Path(exists=True, dir_okay=False),
                     help="A custom ONNX image model instead of the built-in EfficientNet-Lite0."),
        click.option("--model-spec", type=click.Path(exists=True, dir_okay=False),
                     help="JSON spec of --model (input_size, mean, std...; default: MODEL with a .json suffix)."),
        click.option("--threads", type=click.IntRange(1, 256), help="Inference threads (default: every core)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _embedder(backend, model_path, model_spec, threads, images: int | None = None):
    from .models import load_embedder

    if model_spec and not model_path:
        raise click.UsageError("--model-spec goes with --model")
    return load_embedder(backend, model=model_path, spec=model_spec, threads=threads, images=images)


@click.group(cls=NeardupGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="neardup")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Find near-duplicate images: index folders, search by image, list duplicate groups."""
    import warnings

    from PIL import Image

    # images.load_image enforces its own pixel limit from the header; Pillow's warning is noise here
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    ctx.obj = {"debug": debug}


def _waiting() -> None:
    click.echo("neardup: another process is writing this index; waiting for it to finish...", err=True)


@main.command("index")
@click.argument("paths", nargs=-1, required=True)
@index_option
@click.option("--batch-size", default=None, type=click.IntRange(1, 4096),
              help="Images per model call  [default: the backend's: 256 on a GPU, else 32].")
@click.option("--prune", is_flag=True, help="Remove catalogued files under PATHS that no longer exist.")
@click.option("--failures", "show_failures", is_flag=True, help="List every file that failed, with its reason.")
@click.option("--commit-every", default=512, show_default=True, type=click.IntRange(1),
              help="Commit to disk after this many files (a crash loses at most this much work).")
@click.option("--no-wait", is_flag=True, help="Fail at once if another process is writing the index.")
@click.option("--workers", type=click.IntRange(1, 256), help="Decoding threads (default: every core).")
@embedder_options
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Embed on a Ray cluster (ADDRESS, else $RAY_ADDRESS, else a local one), write Parquet shards, "
                   "merge them. Put it after PATHS or write --ray=ADDRESS. PATHS may be fsspec URLs (s3://...).")
@click.option("--shards", "shards_dir", help="With --ray: the folder or URL for the shards, writable by every worker "
                                             "(default: a folder in the index, removed after the merge).")
def index_command(paths, index_dir, batch_size, prune, show_failures, commit_every, no_wait, workers,
                  backend, model_path, model_spec, threads, ray_address, shards_dir) -> None:
    """Add image files and folders (recursively) to the index; unchanged files are skipped."""
    if ray_address is not None:
        if prune:
            raise click.UsageError("--prune is not supported with --ray (run `neardup index PATH --prune` locally)")
        _index_on_ray(paths, index_dir, ray_address, shards_dir, batch_size, show_failures, no_wait,
                      backend, model_path, model_spec, threads)
        return
    if shards_dir:
        raise click.UsageError("--shards goes with --ray")
    for path in paths:
        if not os.path.exists(path):
            raise click.BadParameter(f"Path {path!r} does not exist.", param_hint="'PATHS...'")
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    columns = (
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn(),
        TextColumn("[red]{task.fields[failed]} failed"), TimeElapsedColumn(),
    )
    started = time.perf_counter()
    embedder = _embedder(backend, model_path, model_spec, threads)
    with Index.open(index_dir, create=True, embedder=embedder) as index, \
            Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("indexing", total=None, rate="", failed=0)

        def progress(done: int, total: int, failed: int) -> None:
            elapsed = time.perf_counter() - started
            bar.update(task, completed=done, total=total, failed=failed, rate=f"{done / max(elapsed, 1e-9):.1f} img/s")

        stage_started: dict[str, float] = {}

        def graph_progress(stage: str, done: int, total: int) -> None:  # the k-NN graph (neardup.graph)
            if stage not in stage_started:
                stage_started[stage] = time.perf_counter()
                bar.reset(task, description=f"neighbourhoods: {stage}", total=total)
            rate = done / max(time.perf_counter() - stage_started[stage], 1e-9)
            bar.update(task, completed=done, total=total, rate=f"{rate:.0f} files/s")

        summary = index.add(paths, batch_size=batch_size, prune=prune, progress=progress, workers=workers,
                            commit_every=commit_every, wait=not no_wait, on_wait=_waiting,
                            graph_progress=graph_progress)
    elapsed = time.perf_counter() - started
    embedded = summary.added + summary.updated - summary.identical
    click.echo(
        f"{summary.discovered} files in {elapsed:.1f} s ({embedded / max(elapsed, 1e-9):.1f} images/s embedded): "
        f"{summary.added} added, {summary.updated} updated, {summary.unchanged} unchanged, "
        f"{summary.identical} identical copies, {summary.failed} failed, {summary.removed} removed, "
        f"{summary.skipped} skipped (not images)"
        + (f", {len(summary.aliases)} not added (same file as a catalogued path)" if summary.aliases else "")
    )
    click.echo(f"backend: {describe_embedder(embedder)}")
    if show_failures:
        for path, reason in summary.failures:
            click.echo(f"failed: {path}: {reason}")
        for path, catalogued in summary.aliases:
            click.echo(f"not added: {path}: same file as {catalogued}")
        for path in summary.skipped_files:
            click.echo(f"skipped: {path}: not an image file (extension)")
    elif summary.failures or summary.aliases:
        click.echo("(run with --failures to list the failed and not added files and why)")


@main.command("query")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@index_option
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1, 10_000), help="Matches per query.")
@click.option("--threshold", type=click.FloatRange(-1, 1), help=threshold_help)
@click.option("--exact/--lsh", default=None,
              help="Compare with every indexed image, or only the LSH candidates (default: exact up to 20,000 images).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema: neardup.schemas.QUERY).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a PNG of the query and its matches.")
@embedder_options
def query_command(images, index_dir, k, threshold, exact, as_json, plot, backend, model_path, model_spec, threads) -> None:
    """Find the indexed images most similar to each IMAGE."""
    results, failed = [], 0
    embedder = _embedder(backend, model_path, model_spec, threads, images=len(images))
    with Index.open(index_dir, embedder=embedder) as index:
        for image in images:
            try:
                matches = index.query(image, k=k, threshold=threshold, exact=exact)
            except ImageError as exc:
                failed += 1
                click.echo(f"neardup: error: cannot read query {printable_path(image)}: {exc.reason}", err=True)
                continue
            results.append({"query": image, "matches": [{"path": m.path, "score": round(m.score, 6), "id": m.id} for m in matches]})
    if as_json:
        click.echo(json.dumps({"threshold": threshold, "results": results}, indent=2))
    else:
        for result in results:
            click.echo(f"{printable_path(result['query'])}:")
            for match in result["matches"] or [{"path": "(no match)", "score": float("nan")}]:
                click.echo(f"  {match['score']:.4f}  {match['path']}")
    if plot and results:
        from .report import plot_query

        plot_query(results[0]["query"], [(m["path"], m["score"]) for m in results[0]["matches"]], plot)
        click.echo(f"wrote {plot}", err=True)
    if failed:
        sys.exit(1)


@main.command("dups")
@index_option
@click.option("--threshold", default=DEFAULT_THRESHOLD, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help=dups_threshold_help)
@click.option("--cosine", "plain_cosine", is_flag=True, help="Threshold the plain cosine, whatever the index's size.")
@click.option("--exact", is_flag=True, help="Compare every pair (slow, O(n²)) instead of LSH candidate pairs.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (schema: neardup.schemas.DUPS).")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV: group,path,min_score,max_score.")
@click.option("--action", type=click.Choice(ACTIONS),
              help="Act on every group's duplicates (all but the survivor). A dry run unless --apply.")
@click.option("--to", "move_to", type=click.Path(file_okay=False), help="With --action move: the folder to move into.")
@click.option("--keep", default=",".join(DEFAULT_KEEP), show_default=True,
              help="Survivor policy: criteria in order, from shape, central, pixels, size, oldest, newest, "
                   "shortest-path (docs: 'Which file is kept').")
@click.option("--keep-in", "keep_in", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Reference folder: its files are preferred as survivors and never touched (repeatable).")
@click.option("--apply", "do_apply", is_flag=True, help="Do the actions (default: print exactly what would be done).")
@click.option("--yes", is_flag=True, help="Confirm --action delete --apply.")
@click.option("--no-wait", "action_no_wait", is_flag=True, help="With --apply: fail at once if another process is writing the index.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="", default=None, metavar="[ADDRESS]",
              help="Search pairs on a Ray cluster (ADDRESS, else $RAY_ADDRESS, else a local one): the same groups.")
def dups_command(index_dir, threshold, plain_cosine, exact, as_json, as_csv, action, move_to, keep, keep_in, do_apply,
                 yes, action_no_wait, ray_address) -> None:
    """List groups of near-duplicate images, or move, hard-link or delete the duplicates (--action)."""
    if as_json and as_csv:
        raise click.UsageError("choose one of --json and --csv")
    if exact and ray_address is not None:
        raise click.UsageError("choose one of --exact and --ray")
    _check_action_options(action, move_to, keep, keep_in, do_apply, yes, as_csv)
    _note_loose_threshold(threshold)
    with Index.open(index_dir) as index:
        if action and do_apply:  # an earlier run cut short by a crash: settle it before planning from the index
            from .actions import recover_interrupted

            recover_interrupted(index.root, wait=not action_no_wait, on_wait=_waiting)
        if ray_address is not None:
            from . import distributed

            distributed.connect(ray_address)
            groups = distributed.duplicates(index, threshold, collection_aware=not plain_cosine).groups
        else:
            groups = index.duplicates(threshold, exact=exact, collection_aware=not plain_cosine)
        root = index.root
        aware = not plain_cosine and neighbourhood.applies(index.stats()["images"])
    if action:
        _act_on_groups(root, groups, threshold, action, move_to, keep, keep_in, do_apply, as_json, action_no_wait)
        return
    if as_json:
        click.echo(json.dumps({"threshold": threshold, "groups": [
            {"files": g.files, "min_score": round(g.min_score, 6), "max_score": round(g.max_score, 6),
             "min_cosine": round(g.min_cosine, 6), "max_cosine": round(g.max_cosine, 6)} for g in groups
        ]}, indent=2))
    elif as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["group", "path", "min_score", "max_score"])
        for number, g in enumerate(groups, 1):
            for path in g.files:
                writer.writerow([number, path, f"{g.min_score:.6f}", f"{g.max_score:.6f}"])
    else:
        # the words the page uses: the copy probability the threshold applies to, and the score it reads
        for number, g in enumerate(groups, 1):
            click.echo(f"group {number}: {len(g.files)} files, copy probability {g.min_score:.3f}–{g.max_score:.3f}, "
                       f"cosine {g.min_cosine:.3f}–{g.max_cosine:.3f}")
            for path in g.files:
                click.echo(f"  {path}")
        basis = "collection-aware score" if aware else "cosine"
        click.echo(f"{len(groups)} groups, {sum(len(g.files) for g in groups)} files "
                   f"(copy probability >= {threshold}, from the {basis})", err=True)


#: Under this `--threshold`, `dups` and `report` say what the number means: scripts written when it was a
#: raw score (0.52, 0.8 were strict settings then) would otherwise link far looser pairs without a word.
LOOSE_THRESHOLD = 0.9


def _note_loose_threshold(threshold: float) -> None:
    if threshold < LOOSE_THRESHOLD:
        click.echo(f"neardup: note: --threshold {threshold} is a copy probability: pairs scoring so were true "
                   f"copies {threshold:.0%} of the time on neardup's evaluation sets (default {DEFAULT_THRESHOLD}; "
                   "docs/SCORES.md)", err=True)


def _check_action_options(action, move_to, keep, keep_in, do_apply, yes, as_csv) -> None:
    if not action:
        used = [name for name, value in (("--to", move_to), ("--keep-in", keep_in), ("--apply", do_apply), ("--yes", yes))
                if value]
        if used or keep != ",".join(DEFAULT_KEEP):
            raise click.UsageError(f"{', '.join(used) or '--keep'} needs --action")
        return
    if as_csv:
        raise click.UsageError("--csv lists groups; with --action use the text output or --json")
    if (action == "move") != bool(move_to):
        raise click.UsageError("--action move needs --to DIR" if action == "move" else "--to goes with --action move")
    if action == "delete" and do_apply and not yes:
        raise click.UsageError("--action delete --apply also needs --yes (files go to the index's trash; `neardup undo` restores them)")


def _act_on_groups(root, groups, threshold, action, move_to, keep, keep_in, do_apply, as_json, no_wait) -> None:
    from . import actions

    plan = actions.make_plan(root, groups, action, to=move_to, keep=actions.parse_keep(keep), keep_in=keep_in,
                             threshold=threshold)
    if do_apply:
        with _step_progress("applying") as progress:
            plan = actions.apply_plan(plan, wait=not no_wait, on_wait=_waiting, progress=progress)
    if as_json:
        click.echo(json.dumps(plan.to_json(), indent=2, ensure_ascii=False))
    else:
        verb = action
        group = None
        for entry in plan.entries:
            if entry.group != group:
                group = entry.group
                click.echo(f"group {group}: keep {entry.survivor}")
            if entry.status == "skipped":
                click.echo(f"  skip {entry.source}: {entry.reason}")
            elif action == "hardlink":
                click.echo(f"  {verb} {entry.source} -> {entry.survivor}")
            else:
                click.echo(f"  {verb} {entry.source} -> {entry.destination}")
    acted = [e for e in plan.entries if e.status in ("planned", "done")]
    skipped = len(plan.entries) - len(acted)
    size = sum(e.size for e in acted) / 1e6
    past = {"move": "moved", "hardlink": "hard-linked", "delete": "deleted (into the trash)"}[action]
    if not do_apply:
        click.echo(f"dry run: would {action} {len(acted)} files ({size:.1f} MB), skip {skipped}, "
                   f"in {len({e.group for e in plan.entries})} groups; add --apply to do it", err=True)
        return
    click.echo(f"{past} {len(acted)} files ({size:.1f} MB), skipped {skipped}; manifest {plan.manifest}", err=True)
    if plan.trash and acted:
        click.echo(f"their bytes are kept in {plan.trash} until `neardup purge-trash` removes it", err=True)
    click.echo(f"undo with: neardup undo {plan.manifest}", err=True)


class _step_progress:
    """A rich progress bar for steps (done, total); a context manager giving the callback."""

    def __init__(self, label: str):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"),
                             TimeRemainingColumn(), console=Console(stderr=True), transient=True)

    def __enter__(self):
        self._bar.__enter__()
        task = self._bar.add_task("steps", total=None)
        return lambda done, total: self._bar.update(task, completed=done, total=total)

    def __exit__(self, *exc):
        return self._bar.__exit__(*exc)


@main.command("remove")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@index_option
@click.option("--no-wait", is_flag=True, help="Fail at once if another process is writing the index.")
def remove_command(paths, index_dir, no_wait) -> None:
    """Forget files (or everything under folders); the files themselves are not touched."""
    with Index.open(index_dir) as index:
        removed = index.remove(paths, wait=not no_wait, on_wait=_waiting)
    click.echo(f"removed {removed} files from the index")


@main.command("info")
@index_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--failures", "show_failures", is_flag=True, help="List the files that failed, with reasons.")
def info_command(index_dir, as_json, show_failures) -> None:
    """Show what the index holds."""
    with Index.open(index_dir) as index:
        stats = index.stats()
        failures = index.failures() if show_failures else []
    if as_json:
        if show_failures:
            stats["failures"] = [{"path": p, "reason": r} for p, r in failures]
        click.echo(json.dumps(stats, indent=2))
        return
    model = stats["model"] or {}
    click.echo(f"index:    {stats['index']}")
    click.echo(f"images:   {stats['images']} indexed, {stats['failed']} failed")
    click.echo(f"model:    {model.get('name', '(none yet)')} ({model.get('dim', '?')}-d)")
    click.echo(f"backend:  auto here runs {describe_auto()}")
    click.echo(f"storage:  {stats['segments']} segments, {stats['dead_rows']} dead rows, "
               f"{stats['bytes_on_disk'] / 1e6:.1f} MB")
    for path, reason in failures:
        click.echo(f"failed: {path}: {reason}")


@main.command("undo")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False))
@click.option("--no-wait", is_flag=True, help="Fail at once if another process is writing the index.")
def undo_command(manifest, no_wait) -> None:
    """Put back every file an applied `dups --action` moved, deleted or hard-linked (from its MANIFEST)."""
    from . import actions

    incomplete = None
    with _step_progress("undoing") as progress:
        try:
            plan, reembed = actions.undo(manifest, wait=not no_wait, on_wait=_waiting, progress=progress)
        except actions.UndoIncomplete as exc:  # every other file is back; the index must learn of them too
            incomplete, plan, reembed = exc, exc.plan, exc.reembed
    if reembed:
        with Index.open(plan.index) as index:
            index.add(reembed, wait=not no_wait, on_wait=_waiting)
    restored = sum(e.status == "undone" for e in plan.entries)
    click.echo(f"{restored} files of {manifest} are back in place (index updated)")
    if incomplete is not None:
        for entry in incomplete.not_restored:
            click.echo(f"not restored {entry.source}: {entry.reason}", err=True)
        raise incomplete


@main.command("serve")
@index_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback requires a token.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--token", envvar="NEARDUP_TOKEN", help="Require this token on every API call (env NEARDUP_TOKEN).")
@click.option("--max-upload-mb", default=25.0, show_default=True, type=click.FloatRange(0.01, 1024),
              help="Largest image accepted by /api/search.")
@click.option("--upload-timeout", default=60.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds an upload may take to arrive; a slower one gets 408.")
@click.option("--allow-actions", is_flag=True,
              help="Let the page move, hard-link or delete duplicates (as `dups --action`, with undo); off: read-only.")
def serve_command(index_dir, host, port, token, max_upload_mb, upload_timeout, allow_actions) -> None:
    """Serve the page and the JSON API (search by upload, duplicate groups, thumbnails)."""
    import socket

    try:
        import uvicorn

        from .web.app import create_app, is_loopback
    except ImportError as exc:
        raise Failure(f"serving needs FastAPI and uvicorn: pip install 'neardup[serve]' ({exc.name} is missing)") from exc
    if not token and not is_loopback(host):
        raise click.UsageError(f"--host {host} is reachable from other machines: set --token (or NEARDUP_TOKEN)")
    if token is not None and len(token) < 8:
        raise click.UsageError("--token must be at least 8 characters")
    index = Index.open(index_dir)
    index.stats()  # fail now, not on the first request, if the folder is no index
    index.embedder  # load the model before the first search arrives
    try:
        family = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        raise Failure(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    app = create_app(index, token=token, max_upload_bytes=int(max_upload_mb * 1_000_000),
                     upload_timeout=upload_timeout, allow_actions=allow_actions)
    bound_port = sock.getsockname()[1]
    shown_host = f"[{host.strip('[]')}]" if ":" in host else host
    url = f"http://{shown_host}:{bound_port}/" + (f"?token={token}" if token else "")
    click.echo(f"neardup: serving {index.root} at {url} (API docs at /docs; Ctrl-C stops)", err=True)
    if allow_actions:
        click.echo("neardup: actions allowed: the page can move, hard-link and delete files (undo restores them)", err=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: a normal stop
        click.echo("neardup: server stopped", err=True)
    finally:
        index.close()


@main.command("report")
@index_option
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False), help="The HTML file to write.")
@click.option("--threshold", default=DEFAULT_THRESHOLD, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help=dups_threshold_help)
@click.option("--exact", is_flag=True, help="Compare every pair (slow, O(n²)) instead of LSH candidate pairs.")
@click.option("--thumb-size", default=200, show_default=True, type=click.IntRange(32, 1024), help="Thumbnail side in pixels.")
@click.option("--thumbs-beside", is_flag=True,
              help="Write thumbnails as JPEGs into OUT-STEM_thumbs/ next to the report instead of embedding them.")
@click.option("--max-groups", type=click.IntRange(1), help="Only the first (largest) N groups.")
def report_command(index_dir, out, threshold, exact, thumb_size, thumbs_beside, max_groups) -> None:
    """Write a static HTML gallery of the duplicate groups (opens from disk, no server, can be mailed)."""
    from .report import html_report

    _note_loose_threshold(threshold)
    with Index.open(index_dir) as index, _step_progress("thumbnails") as progress:
        summary = html_report(index, out, threshold, exact=exact, thumb_size=thumb_size, thumbs_beside=thumbs_beside,
                              max_groups=max_groups, progress=progress)
    click.echo(f"wrote {summary.out}: {summary.groups} groups, {summary.files} files"
               + (f", thumbnails in {summary.thumbs_dir}" if summary.thumbs_dir else "")
               + (f"; {summary.unreadable} images could not be read now (shown as such)" if summary.unreadable else ""))


@main.command("bench")
@click.option("-n", "count", default=1000, show_default=True, type=click.IntRange(1, 1_000_000),
              help="Images to embed (and queries to run).")
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False),
              help="Use the first N images of this folder (default: ~2-MP JPEGs made from the sample photos).")
@click.option("--backends", default="torch,onnx,onnx-int8", show_default=True,
              help="Comma-separated backends to measure beside the seed-style path.")
@click.option("--workers", type=click.IntRange(1, 256), help="Decoding threads of Index.add (default: every core).")
@click.option("--threads", type=click.IntRange(1, 256), help="Inference threads (default: every core).")
@click.option("--queries", "n_queries", default=1000, show_default=True, type=click.IntRange(0), help="Queries to time.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, allow_dash=True),
              help="Also write the figures as JSON to this file ('-' = stdout; schema: neardup.schemas.BENCH).")
def bench_command(count, images_dir, backends, workers, threads, n_queries, json_out) -> None:
    """Time embedding (seed-style torch loop vs each backend) and queries on this machine; print a table."""
    from pathlib import Path

    from rich.console import Console

    from . import bench

    chosen = [b.strip() for b in backends.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in BACKENDS or b == "auto"]
    if unknown or not chosen:
        raise click.BadParameter(f"choose from {', '.join(BACKENDS[1:])}", param_hint="--backends")
    console = Console(stderr=True)
    figures = bench.run(n=count, images=Path(images_dir) if images_dir else None, backends=chosen, workers=workers,
                        threads=threads, n_queries=n_queries, console=console)
    if json_out == "-":
        click.echo(json.dumps(figures, indent=2))
    else:
        if json_out:
            Path(json_out).write_text(json.dumps(figures, indent=2) + "\n")
        Console().print(bench.table(figures))
        for line in bench.summary_lines(figures):
            click.echo(line)


def _index_on_ray(paths, index_dir, address, shards_dir, batch_size, show_failures, no_wait,
                  backend, model_path, model_spec, threads) -> None:
    """`index --ray`: the Ray Data pipeline writes shards (Ray's progress bars), then they are merged."""
    import contextlib
    import shutil
    import uuid

    from . import distributed

    for path in paths:
        if "://" not in path and not os.path.exists(path):
            raise click.BadParameter(f"Path {path!r} does not exist.", param_hint="'PATHS...'")
    embedder = _embedder(backend, model_path, model_spec, threads)
    started = time.perf_counter()
    with Index.open(index_dir, create=True, embedder=embedder) as index:
        out = shards_dir or str(index.root / "incoming" / uuid.uuid4().hex[:12])
        distributed.connect(address)
        run = distributed.index_to_shards(
            paths, out, batch_size=batch_size or DEFAULT_BATCH,
            embedder={"backend": backend, "model": model_path and os.path.abspath(model_path),
                      "spec": model_spec and os.path.abspath(model_spec)}, known=index.record)
        elapsed = time.perf_counter() - started
        click.echo(f"{run.files} files embedded on Ray in {elapsed:.1f} s ({run.files / max(elapsed, 1e-9):.1f} files/s): "
                   f"{len(run.shards)} shards in {out}, {run.failed} failed, {run.unchanged} unchanged (not sent), "
                   f"{run.skipped} skipped (not images)")
        with _step_progress("merging shards") as progress:
            summary = index.merge(run.shards, progress=lambda done, total, failed: progress(done, total),
                                  wait=not no_wait, on_wait=_waiting)
    if not shards_dir:
        shutil.rmtree(out, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(out))  # the index's "incoming" folder, unless another run still uses it
    _echo_merge(summary, show_failures, run.failures)


def _echo_merge(summary, show_failures: bool, extra_failures=()) -> None:
    click.echo(f"merged {summary.shards} shards, {summary.rows} rows: {summary.added} added, {summary.updated} updated, "
               f"{summary.unchanged} unchanged, {summary.stale} older than the index, {summary.failed} failed")
    failures = list(extra_failures) + summary.failures
    if show_failures:
        for path, reason in failures:
            click.echo(f"failed: {path}: {reason}")
    elif failures:
        click.echo("(run with --failures to list the failed files and why)")


@main.command("merge")
@click.argument("shards", nargs=-1, required=True)
@index_option
@embedder_options
@click.option("--failures", "show_failures", is_flag=True, help="List every file that failed, with its reason.")
@click.option("--no-wait", is_flag=True, help="Fail at once if another process is writing the index.")
def merge_command(shards, index_dir, backend, model_path, model_spec, threads, show_failures, no_wait) -> None:
    """Import Parquet shards (files or folders, local or URLs) written by `index --ray`; merging the same
    shards again adds nothing. The shards' model must be the index's (for a new index: the chosen one)."""
    from .shards import read_model, shard_files

    files = shard_files(shards)
    for path in files:  # a foreign or damaged file fails here, before an index folder is made
        read_model(path)
    embedder = _embedder(backend, model_path, model_spec, threads)
    with Index.open(index_dir, create=True, embedder=embedder) as index, _step_progress("merging shards") as progress:
        summary = index.merge(files, progress=lambda done, total, failed: progress(done, total),
                              wait=not no_wait, on_wait=_waiting)
    _echo_merge(summary, show_failures)


@main.group("eval", cls=NeardupGroup)
def eval_group() -> None:
    """Measure accuracy: build a copy-detection set from real photos, run neardup and baselines on it."""


@eval_group.command("build")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--seed", default=1, show_default=True, type=int, help="Seed of the edit parameters.")
@click.option("--sources", default="skimage,sklearn,debian", show_default=True,
              help="Comma-separated photo sources: skimage, sklearn (pip download), debian (apt-get download).")
@click.option("--no-download", is_flag=True, help="Use only what is installed or already in the cache.")
@click.option("--max-originals", type=click.IntRange(1), help="Photos beyond this many become distractors.")
def eval_build_command(out, seed, sources, no_download, max_originals) -> None:
    """Write an evaluation set to OUT: gallery/ (originals, distractors), queries/ (edited copies), truth.json."""
    from .benchmark_set import SOURCE_NAMES, build_set

    chosen = tuple(s.strip() for s in sources.split(",") if s.strip())
    unknown = [s for s in chosen if s not in SOURCE_NAMES]
    if unknown:
        raise click.UsageError(f"unknown source(s) {', '.join(unknown)}; choose from {', '.join(SOURCE_NAMES)}")
    report = build_set(out, seed=seed, sources=chosen, download=not no_download, max_originals=max_originals,
                       log=lambda line: click.echo(line, err=True) if line.startswith("missing") else None)
    click.echo(f"{report.originals} originals, {report.distractors} distractors, {report.queries} queries -> {out}")
    if report.missing:
        click.echo(f"{len(report.missing)} source(s) missing (listed above and in truth.json); "
                   "the set was built from the rest", err=True)


@eval_group.command("run")
@click.argument("set_path", metavar="SET", type=click.Path(exists=True))
@click.option("-k", "k", default=10, show_default=True, type=click.IntRange(1, 1000), help="Results kept per query.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True),
              help="dups threshold (copy probability) to score (default: the default).")
@click.option("--no-baselines", is_flag=True, help="Skip the seed recipe and pHash.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the result (schema neardup.schemas.EVAL_RESULT).")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), help="Write precision-recall curves (PNG).")
def eval_run_command(set_path, k, threshold, no_baselines, json_out, plot_out) -> None:
    """Index SET's gallery, search every query, print top-1, recall@k, mAP, micro-AP per edit kind, and
    the pairwise precision/recall of `dups`, for neardup and (unless --no-baselines) two baselines."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from . import evaluation

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"),
                   TimeRemainingColumn(), console=Console(stderr=True), transient=True)
    with bar:
        task = bar.add_task("evaluating", total=None)
        result = evaluation.run(set_path, k=k, baselines=not no_baselines, threshold=threshold,
                                progress=lambda stage, done, total: bar.update(task, description=stage,
                                                                               completed=done, total=total))
    click.echo(evaluation.table(result))
    if json_out:
        with open(json_out, "w", encoding="utf-8") as f:
            json.dump(evaluation.public(result), f, indent=1)
        click.echo(f"wrote {json_out}", err=True)
    if plot_out:
        evaluation.plot(result, plot_out)
        click.echo(f"wrote {plot_out}", err=True)


@main.command("purge-trash")
@index_option
@click.option("--older-than", "older_than", default=30.0, show_default=True, type=click.FloatRange(0), metavar="DAYS",
              help="Only run folders last written to more than DAYS days ago (0: all).")
@click.option("--apply", "do_apply", is_flag=True, help="Delete them (without it: only list them).")
@click.option("--yes", is_flag=True, help="Confirm --apply: purged files cannot be restored, not even by undo.")
@click.option("--no-wait", is_flag=True, help="Fail at once if another process is writing the index.")
def purge_trash_command(index_dir, older_than, do_apply, yes, no_wait) -> None:
    """Free the space kept by `dups --action delete/hardlink` runs: remove their folders in the index's
    trash (<index>/trash/<run id>/) older than DAYS. Those runs can no longer be undone. Lists only,
    unless --apply --yes."""
    from . import actions

    if do_apply and not yes:
        raise click.UsageError("--apply also needs --yes (purged files cannot be restored, not even by `neardup undo`)")
    with Index.open(index_dir) as index:
        root = index.root
        index.stats()  # fail now if the folder is no index
    if do_apply:
        with _step_progress("purging") as progress:
            runs = actions.purge_trash(root, older_than, wait=not no_wait, on_wait=_waiting, progress=progress)
    else:
        runs = actions.purge_trash(root, older_than, dry_run=True)
    for run in runs:
        click.echo(f"{run.path}: {run.files} files, {run.bytes / 1e6:.1f} MB, {run.age_days:.1f} days old")
        if run.left:
            click.echo(f"{run.path} keeps {len(run.left)} entries its run did not put there (left in place): "
                       + ", ".join(os.path.relpath(p, run.path) for p in run.left), err=True)
    size = sum(run.bytes for run in runs) / 1e6
    if do_apply:
        click.echo(f"purged {len(runs)} trash folders ({size:.1f} MB); their runs can no longer be undone", err=True)
    else:
        click.echo(f"dry run: would purge {len(runs)} trash folders ({size:.1f} MB) older than {older_than:g} days; "
                   "add --apply --yes to do it", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
