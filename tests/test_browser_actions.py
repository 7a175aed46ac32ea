"""Cleaning up from the page, in a real headless Chromium (Debian's, driven by Playwright): preview a move,
leave one file out, apply, undo; and a page on another origin that tries to start an action.

Files are checked on disk by sha256. Screenshots go to test-artifacts/ at the repository root (git-ignored).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest
from chromium import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, needs_chromium
from conftest import tree_hashes

pytestmark = needs_chromium
sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("fastapi")

from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route
from webserver import serve_in_thread

from neardup.index import Index
from neardup.store import Store
from neardup.web.app import create_app

TOKEN = "browser-actions-token"


def make_library(tmp_path, collection, embedder, names: dict[str, str] | None = None):
    """photos/a: chelsea and coffee (the originals, oldest); photos/b: two copies of chelsea (half size,
    flipped) and one of coffee (JPEG quality 30), named by `names` (default: chelsea_half.jpg...); an index."""
    names = names or {"half": "chelsea_half.jpg", "flip": "chelsea_flip.jpg", "jpeg30": "coffee_jpeg30.jpg"}
    photos = tmp_path / "photos"
    (photos / "a").mkdir(parents=True)
    (photos / "b").mkdir()
    copies = {(c["original"], c["edit"]): c["path"] for c in collection["copies"]}
    for name in ("chelsea", "coffee"):
        shutil.copy(collection["originals"][name], photos / "a" / f"{name}.jpg")
    shutil.copy(copies["chelsea", "half"], photos / "b" / names["half"])
    shutil.copy(copies["chelsea", "flip"], photos / "b" / names["flip"])
    shutil.copy(copies["coffee", "jpeg30"], photos / "b" / names["jpeg30"])
    for path in photos.rglob("*.jpg"):
        stamp = 1_000_000_000 if path.parent.name == "a" else 1_500_000_000
        os.utime(path, (stamp, stamp))
    index = Index.open(tmp_path / "idx", create=True, embedder=embedder)
    assert index.add([photos]).added == 5
    return photos, index


@pytest.fixture
def library(tmp_path, collection, embedder):
    photos, index = make_library(tmp_path, collection, embedder)
    yield photos, index
    index.close()


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def watch(page) -> list[str]:
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda message: message.type == "error" and problems.append(message.text))
    page.on("response", lambda response: response.status >= 400 and problems.append(f"{response.status} {response.url}"))
    return problems


@contextlib.contextmanager
def duplicates_page(index: Index, tmp_path: Path):
    """A served index with actions allowed, and one Chromium page (1280 x 1000) on its Duplicates view at
    threshold 0.999 (a strict copy probability), once the library's two groups are shown: yields (url, page, problems seen so far)."""
    sync_api.expect.set_options(timeout=60_000)
    ARTIFACTS.mkdir(exist_ok=True)
    app = create_app(index, token=TOKEN, allow_actions=True, thumbs_dir=tmp_path / "thumbs")
    with serve_in_thread(app) as url, sync_api.sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            problems = watch(page)
            page.goto(f"{url}/?token={TOKEN}#duplicates")
            page.locator("#threshold").fill("0.999")
            sync_api.expect(page.locator("#dups-status")).to_contain_text("2 groups, 5 files at threshold 0.999")
            yield url, page, problems
        finally:
            browser.close()


def test_preview_leave_one_out_apply_and_undo_a_move_in_chromium(library, tmp_path):
    photos, index = library
    expect = sync_api.expect
    target = tmp_path / "moved"
    before = tree_hashes(photos)
    with duplicates_page(index, tmp_path) as (url, page, problems):
        status = page.locator("#dups-status")
        expect(status).to_contain_text("2 groups, 5 files at threshold 0.999")
        expect(page.locator("#cleanup")).to_be_visible()

        # the settings, with the keyboard where a user would use it
        page.get_by_label("Action", exact=True).select_option("move")
        page.get_by_label("Folder to move into").fill(str(target))
        page.get_by_label("Keep in each group").select_option("pixels,oldest")
        page.get_by_role("button", name="Preview").click()
        plan_status = page.locator("#plan-status")
        expect(plan_status).to_contain_text("Would move 3 files")
        expect(plan_status).to_contain_text("skip 0, in 2 groups")
        # each group's kept file is marked, the others say where they go
        for name in ("chelsea.jpg", "coffee.jpg"):
            item = page.locator(f'li[data-path="{photos / "a" / name}"]')
            expect(item.locator(".kept")).to_be_visible()
            expect(item.locator(".include")).to_be_hidden()
        half = page.locator(f'li[data-path="{photos / "b" / "chelsea_half.jpg"}"]')
        expect(half.locator(".plan-note")).to_have_text(f"Moves to {target / 'chelsea_half.jpg'}")

        # leave coffee's copy out: the plan is made again and says so
        left_out = page.get_by_label("Include coffee_jpeg30.jpg in the clean-up")
        left_out.focus()
        page.keyboard.press("Space")
        expect(left_out).not_to_be_checked()
        expect(plan_status).to_contain_text("Would move 2 files")
        expect(plan_status).to_contain_text("skip 1")
        expect(page.locator(f'li[data-path="{photos / "b" / "coffee_jpeg30.jpg"}"] .plan-note')).to_have_text("Left out")
        page.locator("#plan-details summary").click()
        expect(page.locator("#plan-list")).to_contain_text(f"skip {photos / 'b' / 'coffee_jpeg30.jpg'}: left out")
        assert tree_hashes(photos) == before and not target.exists()  # a preview touches nothing
        page.screenshot(path=str(ARTIFACTS / "actions-preview.png"), full_page=True)

        # apply, confirmed in the dialog
        page.get_by_role("button", name="Apply…").click()
        dialog = page.locator("#confirm")
        expect(dialog).to_be_visible()
        expect(dialog).to_contain_text(f"Move 2 files to {target}?")
        dialog.get_by_role("button", name="Apply").click()
        result = page.locator("#result")
        expect(result).to_contain_text("Moved 2 files")
        manifest_path = result.locator(".manifest-path").inner_text()
        assert Path(manifest_path).parent == index.root / "actions"
        expect(page.locator(".result-title")).to_be_focused()
        page.screenshot(path=str(ARTIFACTS / "actions-applied.png"), full_page=True)

        moved = {photos / "b" / "chelsea_half.jpg": target / "chelsea_half.jpg",
                 photos / "b" / "chelsea_flip.jpg": target / "chelsea_flip.jpg"}
        after = tree_hashes(photos, target)
        for source, destination in moved.items():
            assert str(source) not in after and after[str(destination)] == before[str(source)]
        assert after[str(photos / "b" / "coffee_jpeg30.jpg")] == before[str(photos / "b" / "coffee_jpeg30.jpg")]
        manifest = json.loads(Path(manifest_path).read_text(encoding="utf-8"))
        assert [e["status"] for e in manifest["entries"]].count("done") == 2

        # undo from the result, then the Actions view lists the run as undone
        result.get_by_role("button", name="Undo").click()
        expect(result).to_contain_text("2 files are back in place")
        assert tree_hashes(photos) == before and tree_hashes(target) == {}
        page.get_by_role("link", name="Actions").click()
        row = page.locator("#runs-body tr")
        expect(row).to_have_count(1)
        expect(row.locator(".state")).to_have_text("undone")
        expect(row.get_by_role("button", name=f"Undo run {manifest['id']}")).to_be_disabled()
        page.screenshot(path=str(ARTIFACTS / "actions-runs.png"), full_page=True)

        # delete asks for the number of files, typed (coffee's copy, left out above, is included again first:
        # a file left out stays left out until the user says otherwise)
        page.get_by_role("link", name="Duplicates").click()
        expect(left_out).not_to_be_checked()
        page.get_by_role("button", name="Include them all again").click()
        expect(left_out).to_be_checked()
        page.get_by_label("Action", exact=True).select_option("delete")
        page.get_by_role("button", name="Preview").click()
        expect(plan_status).to_contain_text("Would delete 3 files")
        page.get_by_role("button", name="Apply…").click()
        confirm = dialog.get_by_role("button", name="Apply")
        expect(confirm).to_be_disabled()
        count = dialog.get_by_label("Type the number of files to delete")
        expect(count).to_be_focused()
        count.fill("2")
        expect(confirm).to_be_disabled()
        count.fill("3")
        expect(confirm).to_be_enabled()
        page.keyboard.press("Escape")
        expect(dialog).to_be_hidden()
        assert tree_hashes(photos) == before and not (index.root / "trash").exists()

        # this time typed and confirmed with Enter; then undone from the Actions view
        page.get_by_role("button", name="Apply…").click()
        count.fill("3")
        page.keyboard.press("Enter")
        expect(result).to_contain_text("Deleted (into the trash) 3 files")
        trash = tree_hashes(index.root / "trash")
        assert sorted(trash.values()) == sorted(h for p, h in before.items() if "/b/" in p)
        assert not any(os.path.lexists(p) for p in before if "/b/" in p)
        page.get_by_role("link", name="Actions").click()
        expect(row).to_have_count(2)
        expect(row.first.locator(".state")).to_have_text("applied")
        row.first.get_by_role("button", name="Undo").click()
        expect(page.locator("#actions-status")).to_contain_text("3 files are back in place")
        expect(row.first.locator(".state")).to_have_text("undone")
        assert tree_hashes(photos) == before
        assert problems == []


def recording(app, seen: list[dict]):
    """The app, with every HTTP request it answers recorded (method, path, Origin, status, headers)."""
    async def wrapper(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        record = {"method": scope["method"], "path": scope["path"], "origin": headers.get("origin")}
        seen.append(record)

        async def send_recorded(message):
            if message["type"] == "http.response.start":  # recorded before the browser can see it
                record["status"] = message["status"]
                record["headers"] = {k.decode().lower(): v.decode() for k, v in message["headers"]}
            await send(message)

        await app(scope, receive, send_recorded)
    return wrapper


ATTACK = """<!doctype html><html><body>
<form id="form" method="post" enctype="text/plain" action="{api}/api/actions/apply">
<input name='{{"plan_id":"{plan_id}","confirm":true,"x":"' value='"}}'></form>
<script>
(async () => {{
  const body = JSON.stringify({{plan_id: "{plan_id}", confirm: true}});
  const outcome = [];
  try {{  // a JSON request: needs a CORS preflight, which the server does not grant
    await fetch("{api}/api/actions/apply", {{method: "POST", credentials: "include",
      headers: {{"Content-Type": "application/json"}}, body}});
    outcome.push("json: answered");
  }} catch (e) {{ outcome.push("json: blocked"); }}
  // a "simple" request needs no preflight: it reaches the server, which must refuse it
  await fetch("{api}/api/actions/apply", {{method: "POST", mode: "no-cors", credentials: "include",
    headers: {{"Content-Type": "text/plain"}}, body}});
  outcome.push("no-cors: sent");
  document.title = outcome.join("; ");
  document.getElementById("form").submit();  // last: a cross-site form post, navigating to the answer
}})();
</script></body></html>"""


def test_a_page_on_another_origin_cannot_start_an_action(library, tmp_path):
    photos, index = library
    expect = sync_api.expect
    expect.set_options(timeout=60_000)
    target = tmp_path / "moved"
    seen: list[dict] = []
    app = recording(create_app(index, token=TOKEN, allow_actions=True, thumbs_dir=tmp_path / "thumbs"), seen)
    with serve_in_thread(app) as api, sync_api.sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page()
            # the user has the real page open: the token cookie is set (SameSite=Strict, but a page on
            # another port of 127.0.0.1 is the same site, so the browser sends it along)
            page.goto(f"{api}/?token={TOKEN}")
            plan = page.evaluate("""async to => (await (await fetch("/api/actions/plan", {method: "POST",
                headers: {"Content-Type": "application/json"},
                body: JSON.stringify({action: "move", to, threshold: 0.999, keep: "pixels,oldest"})})).json())""",
                                 str(target))
            assert len(plan["manifest"]["entries"]) == 3, plan
            before = tree_hashes(photos)

            evil = Starlette(routes=[Route("/", lambda request: HTMLResponse(
                ATTACK.format(api=api, plan_id=plan["plan_id"])))])
            with serve_in_thread(evil) as evil_url:
                assert evil_url != api
                seen.clear()
                page.goto(evil_url)
                page.wait_for_url(f"{api}/api/actions/apply")  # the form post, the attack's last step
                assert "cross-origin request refused" in page.locator("body").inner_text()
            applies = [r for r in seen if r["path"] == "/api/actions/apply"]
            posts = [r for r in applies if r["method"] == "POST"]
            assert len(posts) == 2 and all(r["origin"] == evil_url and r["status"] == 403 for r in posts), applies
            for preflight in (r for r in applies if r["method"] == "OPTIONS"):
                assert "access-control-allow-origin" not in preflight["headers"], preflight
            assert tree_hashes(photos) == before and not target.exists() and not (index.root / "actions").exists()

            # the plan was not spent: the page's own origin applies it
            applied = page.evaluate("""async id => (await fetch("/api/actions/apply", {method: "POST",
                headers: {"Content-Type": "application/json"}, body: JSON.stringify({plan_id: id, confirm: true})})).status""",
                                    plan["plan_id"])
            assert applied == 200
            with Store.open(index.root) as store:
                assert store.record(str(target / "chelsea_half.jpg")) is not None
        finally:
            browser.close()


# ---- issue 19: layout, the page after apply and refresh, Undo while it runs, two tabs ------------------------

LONG_NAMES = {"half": "chelsea_half_size_copy_from_the_old_backup_drive_of_the_family_laptop_2019.jpg",
              "flip": "chelsea_mirrored_copy_that_someone_made_for_a_birthday_card_long_ago.jpg",
              "jpeg30": "coffee_cup_recompressed_at_quality_thirty_by_a_chat_application.jpg"}


def test_no_horizontal_scroll_and_labels_inside_their_cards_at_1024_1400_1920(tmp_path, collection, embedder):
    """Issue 19 #3/#6: the "Include <name> in the clean-up" labels wrap inside their cards, and the page is
    never wider than the viewport, with long file names, a preview shown and its notes."""
    photos, index = make_library(tmp_path, collection, embedder, LONG_NAMES)
    expect = sync_api.expect
    expect.set_options(timeout=60_000)
    ARTIFACTS.mkdir(exist_ok=True)
    app = create_app(index, token=TOKEN, allow_actions=True, thumbs_dir=tmp_path / "thumbs")
    try:
        with serve_in_thread(app) as url, sync_api.sync_playwright() as playwright:
            browser = launch(playwright)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                problems = watch(page)
                page.goto(f"{url}/?token={TOKEN}#duplicates")
                page.locator("#threshold").fill("0.999")
                expect(page.locator("#dups-status")).to_contain_text("2 groups, 5 files")
                page.get_by_label("Folder to move into").fill(str(photos / "duplicates-to-check-later"))
                page.get_by_role("button", name="Preview").click()
                expect(page.locator("#plan-status")).to_contain_text("Would move 3 files")
                expect(page.locator("#move-to-note")).to_contain_text("inside the indexed folder")
                labels = page.locator("#groups li .include:visible")
                expect(labels).to_have_count(3)
                for width in (1024, 1400, 1920):
                    page.set_viewport_size({"width": width, "height": 900})
                    page.wait_for_function("w => window.innerWidth === w", arg=width)
                    sizes = page.evaluate("""() => ({doc: document.documentElement.scrollWidth,
                        body: document.body.scrollWidth, view: window.innerWidth})""")
                    assert sizes["doc"] <= sizes["view"] and sizes["body"] <= sizes["view"], (width, sizes)
                    boxes = page.evaluate("""() => [...document.querySelectorAll("#groups li[data-path]")]
                        .filter(li => { const l = li.querySelector(".include"); return l && !l.hidden; })
                        .map(li => { const c = li.getBoundingClientRect(), l = li.querySelector(".include").getBoundingClientRect();
                                     const next = li.nextElementSibling && li.nextElementSibling.getBoundingClientRect();
                                     return {card: [c.left, c.right, c.top, c.bottom], label: [l.left, l.right, l.top, l.bottom],
                                             next: next ? [next.left, next.top] : null}; })""")
                    assert len(boxes) == 3
                    for box in boxes:
                        (c_left, c_right, c_top, c_bottom), (l_left, l_right, l_top, l_bottom) = box["card"], box["label"]
                        assert c_left - 0.5 <= l_left and l_right <= c_right + 0.5, (width, box)
                        assert c_top - 0.5 <= l_top and l_bottom <= c_bottom + 0.5, (width, box)
                    page.screenshot(path=str(ARTIFACTS / f"layout-{width}.png"), full_page=True)
                assert problems == []
            finally:
                browser.close()
    finally:
        index.close()


def group_count(page) -> str:
    return page.locator("#dups-status").inner_text()


def test_apply_reloads_groups_unticks_persist_refresh_keeps_undo_and_undo_is_disabled_while_running(library, tmp_path):
    """Issue 19 #4, #5, #6: after apply the groups and counts come from the index again (the moved files leave
    their groups); a file left out stays left out across apply and refresh and is never planned again; the
    form survives a refresh; after a refresh the last run and its Undo are still there; Undo says
    "Undoing…" and cannot be clicked again while it runs."""
    photos, index = library
    expect = sync_api.expect
    target = tmp_path / "moved"
    before = tree_hashes(photos)
    kept_back = photos / "b" / "coffee_jpeg30.jpg"
    with duplicates_page(index, tmp_path) as (url, page, problems):
        status, plan_status = page.locator("#dups-status"), page.locator("#plan-status")
        expect(status).to_contain_text("2 groups, 5 files at threshold 0.999")
        page.get_by_label("Folder to move into").fill(str(target))
        page.get_by_label("Keep in each group").select_option("pixels,oldest")
        left_out = page.get_by_label("Include coffee_jpeg30.jpg in the clean-up")
        left_out.uncheck()
        page.get_by_role("button", name="Preview").click()
        expect(plan_status).to_contain_text("Would move 2 files")

        # a refresh keeps the form: folder, policy, threshold and the untick
        page.reload()
        expect(status).to_contain_text("2 groups, 5 files at threshold 0.999")
        expect(page.get_by_label("Folder to move into")).to_have_value(str(target))
        expect(page.get_by_label("Keep in each group")).to_have_value("pixels,oldest")
        expect(left_out).not_to_be_checked()
        expect(page.locator("#left-out")).to_contain_text("1 file is left out")

        page.get_by_role("button", name="Preview").click()
        expect(plan_status).to_contain_text("Would move 2 files")
        expect(plan_status).to_contain_text("skip 1")
        page.get_by_role("button", name="Apply…").click()
        page.locator("#confirm").get_by_role("button", name="Apply").click()
        result = page.locator("#result")
        expect(result).to_contain_text("Moved 2 files")
        run_id = Path(result.locator(".manifest-path").inner_text()).stem

        # the groups reload from the index: chelsea's copies left, its group with them; the counts follow
        expect(status).to_contain_text("1 groups, 2 files at threshold 0.999")
        expect(status).to_contain_text("2 files that earlier runs moved or linked are left out")
        expect(page.locator(f'li[data-path="{photos / "b" / "chelsea_half.jpg"}"]')).to_have_count(0)
        expect(left_out).not_to_be_checked()  # still left out after apply
        page.get_by_role("button", name="Preview").click()
        expect(plan_status).to_contain_text("Would move 0 files")
        expect(page.locator("#plan-note")).to_contain_text("would change no file")
        expect(page.locator(f'li[data-path="{kept_back}"] .plan-note')).to_have_text("Left out")
        page.screenshot(path=str(ARTIFACTS / "actions-after-apply.png"), full_page=True)

        # a refresh after apply: the last run and its Undo are still here, the untick too
        page.reload()
        expect(status).to_contain_text("1 groups, 2 files at threshold 0.999")
        expect(result).to_contain_text(f"Last run {run_id}: Moved 2 files, skipped 1")
        undo = result.get_by_role("button", name=f"Undo run {run_id}")
        expect(undo).to_be_enabled()
        expect(left_out).not_to_be_checked()
        page.screenshot(path=str(ARTIFACTS / "actions-after-refresh.png"), full_page=True)

        # Undo while it runs: the request is held while the page's button is read (and clicked once more)
        seen = []

        def while_running(route):
            seen.append(page.evaluate(f"""() => {{ const b = document.querySelector('#result button.undo');
                const state = [b.disabled, b.textContent]; b.click(); return state; }}"""))
            route.continue_()

        page.route("**/api/actions/undo", while_running)
        undo.click()
        expect(result).to_contain_text(f"Run {run_id} undone: 2 files are back in place")
        assert seen == [[True, "Undoing…"]]  # one request: the second click found the button disabled
        assert tree_hashes(photos) == before and tree_hashes(target) == {}
        expect(status).to_contain_text("2 groups, 5 files at threshold 0.999")
        expect(left_out).not_to_be_checked()  # undo does not forget what the user left out
        assert problems == []


def test_a_plan_applied_in_another_tab_is_reported_as_applied_there(library, tmp_path):
    """Issue 19 #7: two tabs hold the same preview; the first applies it; the second is told that it was
    already applied in that run (undo it there), not that the files changed."""
    photos, index = library
    expect = sync_api.expect
    expect.set_options(timeout=60_000)
    target = tmp_path / "moved"
    app = create_app(index, token=TOKEN, allow_actions=True, thumbs_dir=tmp_path / "thumbs")
    with serve_in_thread(app) as url, sync_api.sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 1000})
            tabs = [context.new_page(), context.new_page()]
            for tab in tabs:
                tab.goto(f"{url}/?token={TOKEN}#duplicates")
                tab.locator("#threshold").fill("0.999")
                expect(tab.locator("#dups-status")).to_contain_text("2 groups, 5 files at threshold 0.999")
                tab.get_by_label("Folder to move into").fill(str(target))
                tab.get_by_label("Keep in each group").select_option("pixels,oldest")
                tab.get_by_role("button", name="Preview").click()
                expect(tab.locator("#plan-status")).to_contain_text("Would move 3 files")
            first, second = tabs
            first.get_by_role("button", name="Apply…").click()
            first.locator("#confirm").get_by_role("button", name="Apply").click()
            expect(first.locator("#result")).to_contain_text("Moved 3 files")
            run_id = Path(first.locator("#result .manifest-path").inner_text()).stem

            moved = tree_hashes(photos, target)
            second.get_by_role("button", name="Apply…").click()
            second.locator("#confirm").get_by_role("button", name="Apply").click()
            expect(second.locator("#plan-status")).to_contain_text(
                f"Not applied: this plan was already applied in run {run_id}")
            expect(second.locator("#plan-status")).to_contain_text("undo it there")
            assert "changed" not in second.locator("#plan-status").inner_text()
            assert tree_hashes(photos, target) == moved
            second.screenshot(path=str(ARTIFACTS / "actions-two-tabs.png"), full_page=True)
        finally:
            browser.close()
