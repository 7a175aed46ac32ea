"""The page in a real headless Chromium (Debian's, driven by Playwright): upload, duplicates, compare.

Screenshots are written to test-artifacts/ at the repository root (git-ignored).
"""

from __future__ import annotations

import re

import pytest
from chromium import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, needs_chromium

pytestmark = needs_chromium
sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("fastapi")

from webserver import serve_in_thread

from neardup.index import DEFAULT_THRESHOLD, Index
from neardup.web.app import create_app

TOKEN = "browser-test-token"


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, collection, embedder):
    """Every original except chelsea's, and the edited copies of chelsea, coffee and rocket: chelsea's
    original is not indexed, so its best match must be one of its edited copies."""
    index = Index.open(tmp_path_factory.mktemp("browser") / "idx", create=True, embedder=embedder)
    files = [path for name, path in collection["originals"].items() if name != "chelsea"]
    files += [c["path"] for c in collection["copies"] if c["original"] in ("chelsea", "coffee", "rocket")]
    summary = index.add(files)
    assert summary.failed == 0
    yield index
    index.close()


def loaded_images(page, selector: str) -> None:
    page.wait_for_function(
        "s => { const imgs = [...document.querySelectorAll(s)];"
        " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }", arg=selector)


def test_upload_duplicates_and_compare_in_chromium(gallery, collection, tmp_path):
    expect = sync_api.expect
    expect.set_options(timeout=30_000)
    ARTIFACTS.mkdir(exist_ok=True)
    app = create_app(gallery, token=TOKEN, thumbs_dir=tmp_path / "thumbs")
    with serve_in_thread(app) as url, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            problems: list[str] = []
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("console", lambda message: message.type == "error" and problems.append(message.text))
            page.on("response", lambda response: response.status >= 400 and problems.append(f"{response.status} {response.url}"))

            # the token link sets the cookie and leaves the address bar clean
            page.goto(f"{url}/?token={TOKEN}")
            assert "token" not in page.url
            expect(page.locator("#stats")).to_contain_text(f"{gallery.stats()['images']} images indexed")

            # search: choose chelsea's original; its edited copies come first
            page.set_input_files("#file", collection["originals"]["chelsea"])
            results = page.locator("#results li")
            expect(results.first).to_be_visible()
            top_path = results.first.locator(".path").inner_text()
            assert re.search(r"/chelsea__\w+\.jpg$", top_path), top_path
            top_score = float(results.first.locator(".score").get_attribute("data-cosine"))
            assert 0.8 < top_score < 1.0
            loaded_images(page, "#results img")
            assert page.locator("img:not([alt])").count() == 0
            # issue 19 #2: where the copies stop (the dups threshold), and what is below reads "not a copy"
            cutoff = page.locator("#results li.cutoff")
            expect(cutoff).to_have_count(1)
            expect(cutoff).to_contain_text(
                f"Copies stop here (copy probability {DEFAULT_THRESHOLD:.3f}, the dups threshold): below, not a copy")
            below = page.locator("#results li.cutoff ~ li.card")
            assert below.count() > 0
            for i in range(below.count()):
                expect(below.nth(i).locator(".verdict")).to_have_text("Not a copy")
                assert float(below.nth(i).locator(".score").get_attribute("data-probability")) < DEFAULT_THRESHOLD
            expect(results.first.locator(".verdict")).to_have_text("A copy")
            page.screenshot(path=str(ARTIFACTS / "search.png"), full_page=True)

            # drag and drop: a file dropped on the zone searches too (rocket's flipped copy, fetched by id)
            rocket = next(m for m in gallery.query(str(next(c["path"] for c in collection["copies"]
                                                             if c["original"] == "rocket" and c["edit"] == "flip")),
                                                   k=1, exclude_self=False))
            dropped = page.evaluate_handle(
                """async id => { const blob = await (await fetch(`/api/images/${id}`)).blob();
                   const data = new DataTransfer(); data.items.add(new File([blob], "dropped.jpg", {type: blob.type}));
                   return data; }""", rocket.id)
            page.dispatch_event("#drop", "drop", {"dataTransfer": dropped})
            expect(page.locator("#query-caption")).to_contain_text("dropped.jpg")
            expect(results.first.locator(".path")).to_have_text(rocket.path)
            expect(results.first.locator(".score")).to_have_text("copy probability 1.000")
            expect(results.first.locator(".cosine")).to_have_text("cosine 1.000")

            # back to chelsea, then compare the query with its best match
            page.set_input_files("#file", collection["originals"]["chelsea"])
            expect(results.first.locator(".path")).to_have_text(top_path)
            results.first.locator("button").click()
            expect(page.locator("#view-compare")).to_be_visible()
            top_probability = float(results.first.locator(".score").get_attribute("data-probability"))
            expect(page.locator("#compare-score")).to_contain_text(
                f"Copy probability {top_probability:.3f} (cosine {top_score:.3f}): a copy at the dups threshold {DEFAULT_THRESHOLD:.3f}")
            page.click("#compare-back")
            expect(page.locator("#view-search")).to_be_visible()

            # duplicates: the groups the API computes, in order
            page.click("#tab-duplicates")
            expected = gallery.duplicates(DEFAULT_THRESHOLD)
            strict = gallery.duplicates(1.0)  # pairs at cosine >= 0.7725 here (a small index: the plain cosine)
            assert sum(len(g.files) for g in strict) < sum(len(g.files) for g in expected)
            status = page.locator("#dups-status")
            expect(status).to_contain_text(f"{len(expected)} groups")
            groups = page.locator("#groups section.group")
            expect(groups).to_have_count(len(expected))
            # the group's scores are named as the CLI names them
            expect(groups.first.locator("h3")).to_contain_text(
                f"copy probability {expected[0].min_score:.3f}–{expected[0].max_score:.3f}, "
                f"cosine {expected[0].min_cosine:.3f}–{expected[0].max_cosine:.3f}")
            expect(page.locator("#threshold")).to_have_attribute("max", "1")
            loaded_images(page, "#groups img")
            page.screenshot(path=str(ARTIFACTS / "duplicates.png"), full_page=True)

            # the threshold slider re-queries: at 1 only the closest copies stay, back at the default all return
            page.locator("#threshold").fill("1")
            expect(status).to_contain_text(f"{len(strict)} groups, {sum(len(g.files) for g in strict)} files at threshold 1")
            page.locator("#threshold").fill(str(DEFAULT_THRESHOLD))
            expect(status).to_contain_text(f"{len(expected)} groups")

            # compare two members of the first group, chosen with the keyboard
            first = groups.first
            buttons = first.locator("ul.strip button")
            for i in (1, 2):
                buttons.nth(i).focus()
                page.keyboard.press("Enter")
                expect(buttons.nth(i)).to_have_attribute("aria-pressed", "true")
            first.locator("button.compare-button").click()
            compare = page.locator("#view-compare")
            expect(compare).to_be_visible()
            expect(page.locator("#compare-score")).to_contain_text("Copy probability")
            expect(compare.locator("dd").first).to_contain_text(" px")
            loaded_images(page, "#view-compare img")
            score = float(page.locator("#compare-score").get_attribute("data-cosine"))
            ids = [expected[0].ids[1], expected[0].ids[2]]
            assert score == pytest.approx(gallery.similarity(*ids), abs=1e-3)
            page.screenshot(path=str(ARTIFACTS / "compare.png"), full_page=True)
            print(f"screenshots: {ARTIFACTS}/search.png, duplicates.png, compare.png")
            assert problems == []
        finally:
            browser.close()
