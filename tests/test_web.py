"""The HTTP API (FastAPI's test client and a real uvicorn on loopback), the HTML report and the query figure."""

from __future__ import annotations

import base64
import importlib.util
import io
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient
from conftest import copy_probability
from webserver import serve_in_thread

from neardup.cli import main
from neardup.files import open_regular
from neardup.index import DEFAULT_THRESHOLD, Index
from neardup.report import html_report
from neardup.schemas import COMPARE, DUPS_PAGE, ERROR, IMAGE, QUERY
from neardup.web.app import create_app
from neardup.web.thumbnails import ThumbnailCache

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "correct-horse-battery"

#: A `dups` threshold: the copy probability of collection-aware score 0.65 (0.995, stricter than the default).
AT_065 = round(copy_probability(0.65, aware=True), 4)


@pytest.fixture(scope="module")
def app(full_index, tmp_path_factory):
    return create_app(full_index, thumbs_dir=tmp_path_factory.mktemp("thumbs"))


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client


def copy_of(collection, name: str, edit: str) -> Path:
    return Path(next(c["path"] for c in collection["copies"] if c["original"] == name and c["edit"] == edit))


def assert_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    jsonschema.validate(body, ERROR)
    assert "Traceback" not in body["error"]
    return body["error"]


def png_with_declared_size(width: int, height: int) -> bytes:
    """A real 1x1 PNG whose header claims width x height: what a decompression bomb looks like."""
    out = io.BytesIO()
    Image.new("L", (1, 1)).save(out, "PNG")
    png = bytearray(out.getvalue())
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


# ---- search ----------------------------------------------------------------------------------------

def test_search_upload_finds_the_copies(client, collection, full_index):
    query = copy_of(collection, "chelsea", "crop80")
    response = client.post("/api/search", params={"k": 8}, files={"file": (query.name, query.read_bytes(), "image/jpeg")})
    assert response.status_code == 200, response.text
    payload = response.json()
    jsonschema.validate(payload, QUERY)
    assert payload["threshold"] is None and payload["results"][0]["query"] == query.name
    matches = payload["results"][0]["matches"]
    assert len(matches) == 8
    assert matches[0]["path"] == str(query) and matches[0]["score"] > 0.999  # the very same pixels are indexed
    assert all(Path(m["path"]).name.startswith("chelsea") for m in matches)  # the original and its 7 copies
    assert [m["score"] for m in matches] == sorted((m["score"] for m in matches), reverse=True)
    for match in matches[:3]:
        assert full_index.image(match["id"]).path == match["path"]


def test_search_fields_raw_body_and_threshold(client, collection):
    query = copy_of(collection, "coffee", "half").read_bytes()
    raw = client.post("/api/search", params={"k": 3, "threshold": 0.9}, content=query,
                      headers={"content-type": "application/octet-stream"})
    assert raw.status_code == 200, raw.text
    jsonschema.validate(raw.json(), QUERY)
    assert raw.json()["threshold"] == 0.9 and raw.json()["results"][0]["query"] == "upload"
    assert 1 <= len(raw.json()["results"][0]["matches"]) <= 3
    assert all(m["score"] >= 0.9 for m in raw.json()["results"][0]["matches"])
    form = client.post("/api/search", data={"k": "2", "threshold": "-1"}, files={"file": ("q.jpg", query)})
    assert form.status_code == 200 and form.json()["threshold"] == -1 and len(form.json()["results"][0]["matches"]) == 2


@pytest.mark.parametrize("case", ["corrupt", "not an image", "bomb", "empty form", "no body", "bad k",
                                  "bad form k", "threshold out of range", "malformed multipart"])
def test_bad_search_requests_get_a_json_4xx(client, case):
    jpeg_head = b"\xff\xd8\xff\xe0" + b"\x00" * 200
    request = {
        "corrupt": {"files": {"file": ("broken.jpg", jpeg_head)}},
        "not an image": {"files": {"file": ("notes.jpg", b"hello, this is text " * 20)}},
        "bomb": {"files": {"file": ("bomb.png", png_with_declared_size(40_000, 40_000))}},
        "empty form": {"files": {"file": ("empty.jpg", b"")}},
        "no body": {"content": b"", "headers": {"content-type": "image/jpeg"}},
        "bad k": {"params": {"k": 0}, "files": {"file": ("x.jpg", jpeg_head)}},
        "bad form k": {"data": {"k": "many"}, "files": {"file": ("x.jpg", jpeg_head)}},
        "threshold out of range": {"params": {"threshold": 3}, "files": {"file": ("x.jpg", jpeg_head)}},
        "malformed multipart": {"content": b"--xyz\r\nnonsense", "headers": {"content-type": "multipart/form-data; boundary=xyz"}},
    }[case]
    response = client.post("/api/search", **request)
    message = assert_error(response, {"corrupt": 422, "not an image": 422, "bomb": 422, "bad k": 422,
                                      "bad form k": 422, "threshold out of range": 422}.get(case, 400))
    if case == "bomb":
        assert "pixels" in message or "bomb" in message


def test_upload_size_is_capped_whatever_content_length_says(full_index, tmp_path, collection):
    app = create_app(full_index, max_upload_bytes=100_000, thumbs_dir=tmp_path)
    big = (b"\xff\xd8\xff" + bytes(300_000))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert "too large" in assert_error(client.post("/api/search", files={"file": ("big.jpg", big)}), 413)
        # chunked upload: no Content-Length to trust, the server counts
        chunks = (big[i:i + 65536] for i in range(0, len(big), 65536))
        assert_error(client.post("/api/search", content=chunks, headers={"content-type": "image/jpeg"}), 413)
        small = copy_of(collection, "rocket", "half").read_bytes()
        assert len(small) < 100_000 and client.post("/api/search", files={"file": ("ok.jpg", small)}).status_code == 200
    # uploads together may hold only so much memory: past it the server says busy instead of swelling
    tight = create_app(full_index, max_upload_bytes=100_000, max_buffered_bytes=len(small) // 2, thumbs_dir=tmp_path)
    with TestClient(tight, base_url="http://127.0.0.1") as client:
        assert "retry" in assert_error(client.post("/api/search", files={"file": ("ok.jpg", small)}), 503)


# ---- duplicates, images, compare, stats -----------------------------------------------------------------

def test_duplicates_pages_cover_every_group_once(client, full_index):
    expected = full_index.duplicates(AT_065)
    first = client.get("/api/duplicates", params={"threshold": AT_065, "per_page": 5})
    assert first.status_code == 200, first.text
    jsonschema.validate(first.json(), DUPS_PAGE)
    assert first.json()["total_groups"] == len(expected) >= 10
    assert first.json()["pages"] == math.ceil(len(expected) / 5)
    assert first.json()["total_files"] == sum(len(g.ids) for g in expected)
    seen = []
    for page in range(1, first.json()["pages"] + 1):
        body = client.get("/api/duplicates", params={"threshold": AT_065, "per_page": 5, "page": page}).json()
        jsonschema.validate(body, DUPS_PAGE)
        seen += [(g["number"], [i["id"] for i in g["images"]]) for g in body["groups"]]
    assert seen == [(n, g.ids) for n, g in enumerate(expected, 1)]
    beyond = client.get("/api/duplicates", params={"threshold": AT_065, "per_page": 5, "page": 999}).json()
    assert beyond["groups"] == [] and beyond["total_groups"] == len(expected)
    strict = client.get("/api/duplicates", params={"threshold": 1.0}).json()
    assert strict["total_files"] < first.json()["total_files"]  # only the closest copies remain
    default = client.get("/api/duplicates").json()
    assert default["threshold"] == DEFAULT_THRESHOLD and default["page"] == 1


@pytest.mark.parametrize("params", [{"threshold": 0.1}, {"threshold": "x"}, {"page": 0}, {"per_page": 10_000}])
def test_bad_duplicates_requests(client, params):
    assert_error(client.get("/api/duplicates", params=params), 422)


def test_images_served_by_catalog_id_only(client, full_index, collection, app):
    original = collection["originals"]["astronaut"]
    image_id = next(m.id for m in full_index.query(original, k=1, exclude_self=False))
    assert client.get(f"/api/images/{image_id}").content == Path(original).read_bytes()
    info = client.get(f"/api/images/{image_id}/info").json()
    jsonschema.validate(info, IMAGE)
    assert info["path"] == original and info["bytes"] == Path(original).stat().st_size
    with Image.open(original) as img:
        assert (info["width"], info["height"]) == img.size
    thumb = client.get(f"/api/images/{image_id}/thumb")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as img:
        assert img.format == "JPEG" and max(img.size) == 256
    assert client.get(f"/api/images/{image_id}/thumb").content == thumb.content  # from the cache now
    for bad, status in [("999999", 404), ("0", 422), ("-3", 422), ("abc", 422), (str(2**70), 422)]:
        assert_error(client.get(f"/api/images/{bad}"), status)
        assert_error(client.get(f"/api/images/{bad}/thumb"), status)
    for traversal in ["../../../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd"]:
        response = client.get(f"/api/images/{traversal}")
        assert response.status_code in (404, 422) and "root:" not in response.text


_LISTED: list[str] | None = None  # folders listed while a test records them (see _record_listings)


def _record_listings(event: str, args: tuple) -> None:
    if _LISTED is not None and event in ("os.scandir", "os.listdir", "glob.glob"):
        _LISTED.append(os.fspath(args[0]) if args and args[0] is not None else ".")


def test_thumbnail_miss_lists_only_its_own_image_and_a_changed_file_gets_a_fresh_one(tmp_path, photo_folder, embedder):
    global _LISTED
    index = Index.open(tmp_path / "idx", create=True, embedder=embedder)
    index.add([photo_folder])
    records = sorted(index._reader.records(), key=lambda r: r.id)
    cache = ThumbnailCache(tmp_path / "thumbs")

    def thumbnail(record):  # the file opened as the server opens it
        with open_regular(record.path) as stream:
            return cache.get(record, stream)

    sys.addaudithook(_record_listings)  # audit hooks stay for the process; it records only while _LISTED is set
    _LISTED = []
    try:
        first = {r.id: thumbnail(r) for r in records}  # a first browse: every one a miss
    finally:
        listed, _LISTED = _LISTED, None
    # a miss may list the image's own entry, never the whole cache folder (O(N) per miss, O(N²) per browse)
    assert str(tmp_path / "thumbs") not in listed, listed
    for record in records:
        with Image.open(io.BytesIO(first[record.id])) as img, Image.open(record.path) as original:
            assert img.format == "JPEG" and max(img.size) == min(256, max(original.size))
        assert thumbnail(record) == first[record.id]  # a hit
    before = {p for p in (tmp_path / "thumbs").rglob("*") if p.is_file()}
    assert len(before) == len(records)

    # chelsea.jpg gets coffee's bytes: re-indexed under its id, its thumbnail shows the new content
    chelsea = next(r for r in records if r.path.endswith("chelsea.jpg"))
    coffee = next(r for r in records if r.path.endswith("coffee.jpg"))
    shutil.copy(coffee.path, chelsea.path)
    index.add([photo_folder])
    changed = index.image(chelsea.id)
    assert changed.sha256 == coffee.sha256 != chelsea.sha256
    assert thumbnail(changed) == first[coffee.id] != first[chelsea.id]
    after = {p for p in (tmp_path / "thumbs").rglob("*") if p.is_file()}
    assert len(before - after) == 1 and len(after - before) == 1  # the stale thumbnail went, no other
    assert thumbnail(changed) == first[coffee.id]
    index.close()


def test_compare_gives_the_cosine_of_two_images(client, full_index, collection):
    a = full_index.query(collection["originals"]["coffee"], k=1, exclude_self=False)[0]
    b = full_index.query(str(copy_of(collection, "coffee", "flip")), k=1, exclude_self=False)[0]
    body = client.get("/api/compare", params={"a": a.id, "b": b.id}).json()
    jsonschema.validate(body, COMPARE)
    vector_a, vector_b = full_index.embed(a.path), full_index.embed(b.path)
    assert body["cosine"] == pytest.approx(float(np.dot(vector_a, vector_b)), abs=1e-4)
    # issue 19 #2: the score `dups` links by, named as `dups` names it (this index is collection-aware)
    from neardup import neighbourhood

    from neardup import calibration

    assert body["score_name"] == "copy probability" and neighbourhood.applies(full_index.stats()["images"])
    snap = full_index.snapshot()
    positions = np.searchsorted(snap.ids, [a.id, b.id])
    backgrounds = full_index.backgrounds(positions, exact=True)[positions]
    raw = body["cosine"] - backgrounds.mean() + neighbourhood.OFFSET
    assert body["score"] == pytest.approx(float(calibration.probability(raw, True)), abs=1e-3)
    group = next(g for g in full_index.duplicates() if a.id in g.ids)  # the pair is one of coffee's group's links
    assert b.id in group.ids and group.min_score - 1e-4 <= body["score"] <= group.max_score + 1e-4
    assert [i["id"] for i in body["images"]] == [a.id, b.id]
    assert client.get("/api/compare", params={"a": b.id, "b": a.id}).json()["score"] == body["score"]
    assert_error(client.get("/api/compare", params={"a": a.id, "b": 999999}), 404)
    assert_error(client.get("/api/compare", params={"a": a.id}), 422)


def test_stats_page_and_static_files_are_offline(client, full_index):
    stats = client.get("/api/stats").json()
    assert stats["images"] == full_index.stats()["images"] == 128
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text):
        assert client.get(asset).status_code == 200
    static = Path(__file__).resolve().parents[1] / "src" / "neardup" / "web" / "static"
    for file in static.iterdir():
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", file.read_text()), f"external resource in {file.name}"
    assert_error(client.get("/api/nothing-here"), 404)
    assert_error(client.delete("/api/stats"), 405)
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/api/search", "/api/duplicates", "/api/stats"}
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text and "cdn." not in docs.text
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200


# ---- access ----------------------------------------------------------------------------------------------

def test_token_is_required_on_every_api_call(full_index, tmp_path):
    app = create_app(full_index, token=TOKEN, thumbs_dir=tmp_path)
    with TestClient(app, base_url="http://192.0.2.10") as client:
        for path in ["/api/stats", "/api/duplicates", "/api/images/1/thumb", "/api/compare?a=1&b=2"]:
            assert_error(client.get(path), 401)
            assert_error(client.get(path, headers={"Authorization": "Bearer wrong-token-value"}), 401)
        assert_error(client.post("/api/search", content=b"x", headers={"content-type": "image/jpeg"}), 401)
        assert client.get("/api/stats", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert client.get("/").status_code == 200  # the page itself holds no data
        assert_error(client.get("/", params={"token": "not-it"}), 401)
        visit = client.get("/", params={"token": TOKEN}, follow_redirects=False)
        assert visit.status_code == 303 and visit.headers["location"] == "/"
        cookie = visit.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert client.get("/api/stats").status_code == 200  # the client now carries the cookie


def test_without_token_only_loopback_names_are_answered(app):
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        assert client.get("/api/stats").status_code == 200
        assert client.get("/api/stats", headers={"host": "localhost:8000"}).status_code == 200
        assert client.get("/api/stats", headers={"host": "[::1]:8000"}).status_code == 200
        # all of 127.0.0.0/8 is loopback, as for `serve` starting without a token
        assert client.get("/api/stats", headers={"host": "127.0.0.2:8000"}).status_code == 200
        assert client.get("/api/stats", headers={"host": "127.255.0.9"}).status_code == 200
        # a DNS-rebinding page reaches 127.0.0.1 under its own name: refused
        assert_error(client.get("/api/stats", headers={"host": "evil.example:8000"}), 403)
        for foreign in ("192.0.2.10:8000", "[2001:db8::1]:8000", "localhost.evil.example", "127.0.0.1.evil.example"):
            assert_error(client.get("/api/stats", headers={"host": foreign}), 403)


def test_serve_without_token_on_another_loopback_address_answers_it(full_index):
    import httpx

    env = {k: v for k, v in os.environ.items() if k != "NEARDUP_TOKEN"}
    server = subprocess.Popen([sys.executable, "-m", "neardup.cli", "serve", "--index", str(full_index.root),
                               "--host", "127.0.0.2", "--port", "0"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stderr.readline()
        url = re.search(r"http://127\.0\.0\.2:\d+/", line)
        assert url and "token" not in line, line
        with httpx.Client(base_url=url.group(0), timeout=60) as client:
            stats = client.get("/api/stats")
            assert stats.status_code == 200 and stats.json()["images"] == 128
            assert_error(client.get("/api/stats", headers={"host": "evil.example"}), 403)  # still no DNS rebinding
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(30) == 0


def test_broken_index_gives_json_errors_not_tracebacks(tmp_path, photo_folder, embedder, collection):
    index = Index.open(tmp_path / "idx", create=True, embedder=embedder)
    index.add([photo_folder])
    ids = [m.id for m in index.query(str(photo_folder / "chelsea.jpg"), k=2, exclude_self=False)]
    shutil.rmtree(tmp_path / "idx" / "segments")  # the vectors are gone from under the running server
    app = create_app(Index.open(tmp_path / "idx", embedder=embedder), thumbs_dir=tmp_path / "thumbs")
    with TestClient(app, base_url="http://127.0.0.1") as client:  # no exception may escape the app
        assert "index" in assert_error(client.get("/api/compare", params={"a": ids[0], "b": ids[1]}), 503)
        query = Path(collection["originals"]["chelsea"]).read_bytes()
        assert_error(client.post("/api/search", files={"file": ("q.jpg", query)}), 503)
        (photo_folder / "coffee.jpg").unlink()  # an indexed file deleted from disk
        coffee = next(r for r in index._reader.records() if r.path.endswith("coffee.jpg"))
        assert_error(client.get(f"/api/images/{coffee.id}"), 404)
        assert_error(client.get(f"/api/images/{coffee.id}/thumb"), 404)
    index.close()


def test_serve_refuses_unsafe_or_impossible_starts(tmp_path, full_index):
    runner = CliRunner()
    public = runner.invoke(main, ["serve", "--index", str(full_index.root), "--host", "0.0.0.0"], env={"NEARDUP_TOKEN": None})
    assert public.exit_code == 2 and "token" in public.output
    short = runner.invoke(main, ["serve", "--index", str(full_index.root), "--token", "abc"])
    assert short.exit_code == 2
    missing = runner.invoke(main, ["serve", "--index", str(tmp_path / "none")])
    assert missing.exit_code == 1 and "no index" in missing.output


def test_serve_command_runs_a_real_server(full_index):
    import httpx

    env = {k: v for k, v in os.environ.items() if k != "NEARDUP_TOKEN"}
    server = subprocess.Popen([sys.executable, "-m", "neardup.cli", "serve", "--index", str(full_index.root),
                               "--port", "0", "--token", TOKEN], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stderr.readline()
        url = re.search(r"(http://127\.0\.0\.1:\d+/)\?token=(\S+)", line)
        assert url and url.group(2) == TOKEN, line
        with httpx.Client(base_url=url.group(1), timeout=60) as client:
            assert_error(client.get("/api/stats"), 401)
            stats = client.get("/api/stats", headers={"Authorization": f"Bearer {TOKEN}"})
            assert stats.status_code == 200 and stats.json()["images"] == 128
            assert client.get("/").status_code == 200
    finally:
        server.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop
        assert server.wait(30) == 0


# ---- files swapped after indexing, hostile uploads ---------------------------------------------------

def _indexed_by_name(index: Index) -> dict:
    return {Path(r.path).name: r for r in index._reader.records()}


def test_a_file_swapped_after_indexing_is_not_served(tmp_path, photo_folder, embedder):
    index = Index.open(tmp_path / "idx", create=True, embedder=embedder)
    index.add([photo_folder])
    records = _indexed_by_name(index)
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-KEY-MATERIAL\n")
    # a symlink to a file the server's user can read, and one to another photo (which would decode fine)
    (photo_folder / "astronaut.jpg").unlink()
    (photo_folder / "astronaut.jpg").symlink_to(secret)
    (photo_folder / "chelsea__half.jpg").unlink()
    (photo_folder / "chelsea__half.jpg").symlink_to(photo_folder / "rocket.jpg")
    # another regular file moved in (other size), and the same size and mtime with other bytes
    shutil.copy(photo_folder / "coffee__flip.jpg", photo_folder / "chelsea.jpg")
    rocket = records["rocket.jpg"]
    tampered = bytearray((photo_folder / "rocket.jpg").read_bytes())
    tampered[len(tampered) // 2] ^= 0xFF
    (photo_folder / "rocket.jpg").write_bytes(tampered)
    os.utime(photo_folder / "rocket.jpg", ns=(rocket.mtime_ns, rocket.mtime_ns))
    app = create_app(index, thumbs_dir=tmp_path / "thumbs")
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for name, status, words in [("astronaut.jpg", 404, "symbolic link"), ("chelsea__half.jpg", 404, "symbolic link"),
                                    ("chelsea.jpg", 409, "not the file indexed"), ("rocket.jpg", 409, "not the file indexed")]:
            for suffix in ("", "/thumb"):
                response = client.get(f"/api/images/{records[name].id}{suffix}")
                assert words in assert_error(response, status), (name, suffix)
                assert "SECRET" not in response.text
        assert not list((tmp_path / "thumbs").rglob("*.jpg"))  # nothing cached of content never indexed
        honest = records["coffee.jpg"]
        served = client.get(f"/api/images/{honest.id}")
        assert served.status_code == 200 and served.content == (photo_folder / "coffee.jpg").read_bytes()
        assert served.headers["content-length"] == str(honest.size)
        assert client.get(f"/api/images/{honest.id}/thumb").status_code == 200
    index.close()


def test_a_fifo_at_an_indexed_path_is_refused_without_blocking(tmp_path, photo_folder, embedder):
    import httpx

    index = Index.open(tmp_path / "idx", create=True, embedder=embedder)
    index.add([photo_folder])
    record = _indexed_by_name(index)["coffee.jpg"]
    fifo = photo_folder / "coffee.jpg"
    fifo.unlink()
    os.mkfifo(fifo)
    app = create_app(index, thumbs_dir=tmp_path / "thumbs")
    with serve_in_thread(app) as url:
        try:
            # a request blocked on the FIFO would time out here (and the old server froze after 40 of them)
            with httpx.Client(base_url=url, timeout=20) as client:
                for _ in range(3):
                    for suffix in ("/thumb", ""):
                        assert "named pipe" in assert_error(client.get(f"/api/images/{record.id}{suffix}"), 404)
                assert client.get("/api/stats").status_code == 200
        finally:  # should a request be blocked in open(), a writer lets it go so the server can stop
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass  # no reader waiting: nothing is blocked
    index.close()


def test_multipart_parts_are_capped_and_fields_after_the_file_still_count(full_index, tmp_path, collection):
    app = create_app(full_index, thumbs_dir=tmp_path)
    image = copy_of(collection, "rocket", "half").read_bytes()
    form = {"content-type": "multipart/form-data; boundary=B"}
    with TestClient(app, base_url="http://127.0.0.1") as client:
        # the review's parts bomb, scaled down: millions of empty parts cost memory and time per part
        bomb = b"--B\r\n\r\n\r\n" * 200_000 + b"--B--\r\n"
        assert "too many parts" in assert_error(client.post("/api/search", content=bomb, headers=form), 400)
        # a real image followed by more parts than any honest form has
        junk = client.post("/api/search", data={"junk": ["x"] * 8}, files={"file": ("q.jpg", image)})
        assert "too many parts" in assert_error(junk, 400)
        # one part's headers as large as the body allows (python-multipart's limit)
        huge = (b'--B\r\nContent-Disposition: form-data; name="file"; filename="q.jpg"\r\nX-Pad: ' + b"a" * 200_000
                + b"\r\n\r\n" + image + b"\r\n--B--\r\n")
        assert "header size" in assert_error(client.post("/api/search", content=huge, headers=form), 400)
        # an honest form: k after the file is read; a second file part is ignored
        ok = client.post("/api/search", files=[("file", ("q.jpg", image)), ("file", ("other.jpg", b"junk"))],
                         data={"k": "2"})
        assert ok.status_code == 200, ok.text
        assert ok.json()["results"][0]["query"] == "q.jpg" and len(ok.json()["results"][0]["matches"]) == 2
        assert_error(client.post("/api/search", files={"file": ("q.jpg", image)}, data={"k": "1" * 100}), 422)
    assert app.state.buffered.value == 0  # every request gave back the memory it counted


def test_a_stalled_upload_gets_408_and_its_memory_back(full_index, tmp_path):
    import socket

    app = create_app(full_index, max_upload_bytes=1_000_000, upload_timeout=0.5, thumbs_dir=tmp_path)
    with serve_in_thread(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as stalled:
            stalled.sendall(b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                            b"Content-Length: 1000000\r\n\r\n" + b"\xff" * 999_000)  # then nothing more
            answer = b""
            while not answer.endswith(b"}"):  # the whole JSON answer (the old server never answered: timeout)
                data = stalled.recv(4096)
                if not data:
                    break
                answer += data
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"upload not received within 0.5 s" in answer
        assert app.state.buffered.value == 0  # the stalled upload's bytes are back in the budget


def test_session_cookie_is_per_port_and_never_the_token(full_index, tmp_path):
    tokens = {8001: TOKEN, 8002: "another-server-token"}
    apps = {port: create_app(full_index, token=token, thumbs_dir=tmp_path) for port, token in tokens.items()}
    jar: dict[str, str] = {}  # as a browser keeps them: cookies ignore ports
    for port, app in apps.items():
        with TestClient(app, base_url=f"http://192.0.2.10:{port}") as client:
            visit = client.get("/", params={"token": tokens[port]}, follow_redirects=False)
            assert visit.status_code == 303
            name, value = visit.headers["set-cookie"].split(";", 1)[0].split("=", 1)
            assert str(port) in name and tokens[port] not in visit.headers["set-cookie"]
            jar[name] = value
    assert len(jar) == 2  # the second server's cookie did not replace the first one's
    for port, app in apps.items():
        with TestClient(app, base_url=f"http://192.0.2.10:{port}") as client:
            cookies = "; ".join(f"{k}={v}" for k, v in jar.items())
            assert client.get("/api/stats", headers={"cookie": cookies}).status_code == 200
            name = next(k for k in jar if str(port) in k)
            for forged in (f"neardup_token={tokens[port]}", f"{name}={tokens[port]}", f"{name}=made-up-session"):
                assert_error(client.get("/api/stats", headers={"cookie": forged}), 401)


# ---- load (bounded, on loopback) ------------------------------------------------------------------------

def test_concurrent_searches_complete_without_error(app, collection):
    spec = importlib.util.spec_from_file_location("load_test", ROOT / "benchmarks" / "load_test.py")
    load_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_test)
    payloads = [(Path(c["path"]).name, Path(c["path"]).read_bytes()) for c in collection["copies"][:20]]
    with serve_in_thread(app) as url:
        result = load_test.fire(url, payloads, total=40, concurrency=40, timeout=120)
    print("40 concurrent searches:", result)
    assert result["errors"] == 0 and result["ok"] == 40, result["first_errors"]


# ---- report and figure ------------------------------------------------------------------------------------

def test_html_report_is_self_contained(full_index, tmp_path):
    out = tmp_path / "mail" / "report.html"
    out.parent.mkdir()
    summary = html_report(full_index, out, AT_065, thumb_size=96)
    groups = full_index.duplicates(AT_065)
    assert (summary.groups, summary.files, summary.unreadable) == (len(groups), sum(len(g.ids) for g in groups), 0)
    text = out.read_text()
    assert list(out.parent.iterdir()) == [out]  # one file: it can be mailed
    assert len(re.findall(r'<section id="group-\d+">', text)) == len(groups)
    sources = re.findall(r'<img src="([^"]+)" alt="([^"]+)"', text)
    assert len(sources) == summary.files and all(src.startswith("data:image/jpeg;base64,") for src, _ in sources)
    with Image.open(io.BytesIO(base64.b64decode(sources[0][0].split(",", 1)[1]))) as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) == 96
    assert not re.search(r'(src|href)="https?:', text)  # nothing fetched from the network
    assert Path(groups[0].files[0]).name in text


def test_report_command_with_thumbnails_beside(full_index, tmp_path):
    out = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["report", "--index", str(full_index.root), "--out", str(out),
                                       "--thumbs-beside", "--max-groups", "3"])
    assert result.exit_code == 0, result.output
    assert "3 groups" in result.output
    sources = re.findall(r'<img src="([^"]+)"', out.read_text())
    assert sources and all(src.startswith("report_thumbs/") and (tmp_path / src).is_file() for src in sources)


def test_query_plot_writes_the_figure(full_index, collection, tmp_path):
    out = tmp_path / "query.png"
    query = copy_of(collection, "rocket", "crop80")
    result = CliRunner().invoke(main, ["query", str(query), "--index", str(full_index.root), "-k", "4", "--plot", str(out)])
    assert result.exit_code == 0, result.output
    with Image.open(out) as figure:
        assert figure.format == "PNG" and figure.size == (1500, 330)  # 5 columns x 1 row at 3 x 3.3 in, 100 dpi
        pixels = np.asarray(figure.convert("L"), dtype=np.float32)
    # the query and 4 matches are drawn (not blank panels): every one of the 5 panels has image content
    assert all(pixels[60:300, i * 300 + 20:(i + 1) * 300 - 20].std() > 10 for i in range(5))


def test_search_and_duplicates_say_which_score_links_and_where_copies_stop(client, collection, full_index):
    """Issue 19 #2: every match carries the score `dups` would link it by and whether that makes it a copy
    at the dups threshold; the duplicates page names its score (a copy probability) and its whole range."""
    query = copy_of(collection, "coffee", "flip")
    body = client.post("/api/search", params={"k": 30}, files={"file": (query.name, query.read_bytes(), "image/jpeg")}).json()
    jsonschema.validate(body, QUERY)
    assert body["score_name"] == "copy probability" and body["dups_threshold"] == DEFAULT_THRESHOLD
    matches = body["results"][0]["matches"]
    assert matches[0]["copy"] and not matches[-1]["copy"]
    for match in matches:
        assert match["copy"] == (match["dups_score"] >= DEFAULT_THRESHOLD) and 0 <= match["dups_score"] <= 1
    copies = [m for m in matches if m["copy"]]
    group = next(g for g in full_index.duplicates() if matches[0]["id"] in g.ids)
    assert {m["id"] for m in copies} <= set(group.ids) | {matches[0]["id"]}
    page = client.get("/api/duplicates", params={"threshold": 1.0}).json()
    jsonschema.validate(page, DUPS_PAGE)
    assert page["score_name"] == "copy probability" and page["max_threshold"] == 1.0
    assert all(g["min_score"] == 1.0 for g in page["groups"])
    assert client.get("/api/duplicates", params={"threshold": 1.01}).status_code == 422
