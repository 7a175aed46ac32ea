"""Bad input, tried and recorded (issue 7): the image loader against generated and mutated real files, and
`neardup index` against a hostile folder (odd names, wrong extensions, symlink loops, a FIFO, files that
vanish or change while indexing, unreadable files, a folder of empty files).

CI size by default (~30 s); the long run for docs/RELIABILITY.md:
    NEARDUP_FUZZ_EXAMPLES=3000 NEARDUP_EMPTY_FILES=100000 .venv/bin/pytest -q -s tests/test_fuzz.py
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from neardup import index as index_module
from neardup.images import ImageError, load_image
from neardup.index import Index
from neardup.store import Store

EXAMPLES = int(os.environ.get("NEARDUP_FUZZ_EXAMPLES", "300"))
EMPTY_FILES = int(os.environ.get("NEARDUP_EMPTY_FILES", "5000"))
#: No single file may take longer than this to load or fail (a hang detector, not a speed target: the
#: pixel limit bounds the work; the slowest file built so far is in docs/RELIABILITY.md).
PER_FILE_LIMIT = timedelta(seconds=30)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def seeds(collection) -> dict[str, bytes]:
    """Small real photos in every format the loader handles, some with EXIF, transparency, animation."""
    photo = Image.open(collection["originals"]["chelsea"]).convert("RGB").resize((96, 72))
    other = Image.open(collection["originals"]["rocket"]).convert("RGB").resize((64, 96))
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "neardup fuzz"
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    return {
        "jpeg": _encode(photo, "JPEG", quality=80),
        "jpeg-exif": _encode(photo, "JPEG", exif=exif.tobytes()),
        "jpeg-progressive": _encode(other, "JPEG", progressive=True),
        "png": _encode(photo, "PNG"),
        "png-rgba": _encode(rgba, "PNG"),
        "png-16bit": _encode(photo.convert("I;16"), "PNG"),
        "gif-animated": _encode(photo.convert("P"), "GIF", save_all=True, append_images=[other.convert("P")]),
        "webp": _encode(photo, "WEBP"),
        "tiff": _encode(photo, "TIFF", compression="tiff_deflate"),
        "bmp": _encode(other, "BMP"),
    }


def huge_dimensions(data: bytes, width: int, height: int) -> bytes:
    """Patch the declared size in the header (PNG IHDR, JPEG SOFn, GIF screen, BMP info), data unchanged."""
    out = bytearray(data)
    if data.startswith(b"\x89PNG"):
        out[16:24] = struct.pack(">II", width & 0x7FFFFFFF, height & 0x7FFFFFFF)
    elif data.startswith(b"\xff\xd8"):
        for marker in (b"\xff\xc0", b"\xff\xc2"):
            at = data.find(marker)
            if at > 0:
                out[at + 5:at + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
    elif data.startswith(b"GIF"):
        out[6:10] = struct.pack("<HH", width & 0xFFFF, height & 0xFFFF)
    elif data.startswith(b"BM"):
        out[18:26] = struct.pack("<ii", width & 0x7FFFFFFF, height & 0x7FFFFFFF)
    return bytes(out)


def exif_garbage(data: bytes, garbage: bytes) -> bytes:
    """A JPEG with an APP1 Exif segment of random bytes right after SOI (other formats: appended)."""
    if not data.startswith(b"\xff\xd8"):
        return data + garbage
    payload = b"Exif\0\0" + garbage[:65000]
    return data[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + data[2:]


@st.composite
def mutated(draw, seeds: dict[str, bytes]) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(seeds)))
    data = seeds[name]
    kind = draw(st.sampled_from(["truncate", "flip", "splice", "huge", "exif", "zero", "random", "stack"]))
    if kind == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif kind in ("flip", "stack"):
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 16))):
            at = draw(st.integers(0, len(out) - 1))
            out[at] ^= draw(st.integers(1, 255))
        data = bytes(out)
        if kind == "stack":
            data = huge_dimensions(data[:draw(st.integers(8, len(data)))], draw(st.integers(1, 1 << 31)),
                                   draw(st.integers(1, 1 << 31)))
    elif kind == "splice":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=256)) + data[at:]
    elif kind == "huge":
        data = huge_dimensions(data, draw(st.integers(1, 1 << 31)), draw(st.integers(1, 1 << 31)))
    elif kind == "exif":
        data = exif_garbage(data, draw(st.binary(min_size=0, max_size=2048)))
    elif kind == "zero":
        data = b""
    else:
        data = draw(st.binary(min_size=0, max_size=512))
    return f"{name}/{kind}", data


def check_load(source) -> str:
    """Load; either an upright RGB image with its size, or an ImageError with a one-line reason."""
    try:
        decoded = load_image(source)
    except ImageError as exc:
        assert exc.reason and "\n" not in exc.reason and len(exc.reason) < 300, exc.reason
        return exc.reason
    assert decoded.image.mode == "RGB" and decoded.width > 0 and decoded.height > 0
    decoded.image.load()
    return "ok"


def test_mutated_real_files_load_or_fail_with_a_reason(seeds, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    extensions = [".jpg", ".png", ".gif", ".webp", ".tif", ".bmp", ".heic", ".txt", ""]
    outcomes: dict[str, int] = {}

    @settings(max_examples=EXAMPLES, deadline=PER_FILE_LIMIT, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=mutated(seeds), extension=st.sampled_from(extensions))
    def load(case, extension):
        label, data = case
        outcome = check_load(data)
        path = folder / f"file{extension}"  # the same bytes from disk, under a (usually) wrong extension
        path.write_bytes(data)
        assert check_load(str(path)) == outcome or outcome == "ok" or data == b""
        key = f"{label.split('/')[1]}: {'ok' if outcome == 'ok' else 'failed'}"
        outcomes[key] = outcomes.get(key, 0) + 1

    load()
    print(f"\n{EXAMPLES} mutated files: {dict(sorted(outcomes.items()))}")
    assert any(k.endswith("failed") for k in outcomes) and any(k.endswith("ok") for k in outcomes)


def hostile_folder(root: Path, seeds: dict[str, bytes]) -> dict[str, str]:
    """Build it; returns name -> what it is."""
    rng = random.Random(7)
    made = {}

    def put(name: str, data: bytes, what: str) -> None:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        made[name] = what

    put("plain.jpg", seeds["jpeg"], "good")
    put("with spaces and ünïcödé 写真.png", seeds["png"], "good")
    put("line\nbreak.jpg", seeds["jpeg"], "good")
    put("exif-rotated.jpg", seeds["jpeg-exif"], "good")
    put("tab\tand \"quotes\", commas.webp", seeds["webp"], "good")
    put("-starts-with-dash.gif", seeds["gif-animated"], "good")
    put("emoji 📷.tif", seeds["tiff"], "good")
    put("png-named.jpg", seeds["png"], "good (wrong extension)")
    put("empty.jpg", b"", "bad")
    put("text.png", b"hello, not an image\n", "bad")
    put("huge.png", huge_dimensions(seeds["png"], 1 << 20, 1 << 20), "bad")
    put("huge.jpg", huge_dimensions(seeds["jpeg"], 60000, 60000), "bad")
    for n in range(20):
        name = rng.choice(sorted(seeds))
        data = bytearray(seeds[name])
        if n % 2:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(8):
                data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
        put(f"mutated/{n:02d}-{name}.{'jpg' if 'jpeg' in name else name.split('-')[0]}", bytes(data), "either")
    (root / "loop").mkdir()
    os.symlink("..", root / "loop" / "back-to-root")  # a symlink loop
    os.symlink(root / "nowhere.jpg", root / "dangling.jpg")
    os.mkfifo(root / "pipe.jpg")  # reading it would block forever: discovery must not offer it
    (root / "folder.jpg").mkdir()
    return made


def neardup_cli(*args, env=None, user=None, timeout=300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "neardup.cli", *map(str, args)]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command]
    return subprocess.run(command, capture_output=True, text=True, check=False, env=env or dict(os.environ), timeout=timeout)


def test_a_home_nothing_can_be_written_to_leaves_stderr_to_neardup(tmp_path, seeds):
    """ONNX Runtime 1.32 keeps a telemetry device id under the home or cache folder; where it cannot write
    one (another user, a read-only or missing home) it printed a warning on every run, and it would send
    telemetry from a tool that should keep to itself. neardup turns its telemetry off (ORT_DISABLE_TELEMETRY
    unless the user set it): stderr holds neardup's own lines only."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "one.jpg").write_bytes(seeds["jpeg"])
    from neardup.models import onnx_backend

    env = {**os.environ, "HOME": "/proc/no-home", "XDG_CACHE_HOME": "/proc/no-cache", "XDG_CONFIG_HOME": "/proc/no-config",
           "NEARDUP_CACHE": str(onnx_backend.cache_dir())}  # the models built so far, where they are
    env.pop("ORT_DISABLE_TELEMETRY", None)
    for backend in ("onnx", "onnx-int8"):
        result = neardup_cli("index", photos, "--index", tmp_path / f"idx-{backend}", "--backend", backend, env=env)
        assert result.returncode == 0, result.stderr
        assert "onnxruntime" not in result.stderr, result.stderr


def test_index_of_a_hostile_folder_records_every_failure_and_handles_odd_names(tmp_path, seeds):
    photos = tmp_path / "hostile"
    made = hostile_folder(photos, seeds)
    index = tmp_path / "idx"
    started = time.perf_counter()
    result = neardup_cli("index", photos, "--index", index, "--failures")
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    info = json.loads(neardup_cli("info", "--json", "--failures", "--index", index).stdout)
    indexed = {r.path for r in Store.open(index).records(status="indexed")}
    failures = {f["path"]: f["reason"] for f in info["failures"]}
    expected = {str(photos / name) for name in made}
    assert indexed | set(failures) == expected and not indexed & set(failures)  # each file once, nothing else
    assert all(reason and "\n" not in reason for reason in failures.values())
    for name, what in made.items():
        if what.startswith("good"):
            assert str(photos / name) in indexed, (name, failures.get(str(photos / name)))
        elif what == "bad":
            assert str(photos / name) in failures
    assert failures[str(photos / "empty.jpg")] == "empty file (0 bytes)"
    assert failures[str(photos / "huge.jpg")].startswith("too large")
    with Store.open(index) as store:
        assert store.verify() == []
    # odd names survive every output format
    dups = json.loads(neardup_cli("dups", "--json", "--threshold", "0.9", "--index", index).stdout)
    grouped = {p for g in dups["groups"] for p in g["files"]}
    assert str(photos / "line\nbreak.jpg") in grouped and str(photos / "plain.jpg") in grouped
    rows = list(csv.DictReader(io.StringIO(neardup_cli("dups", "--csv", "--threshold", "0.9", "--index", index).stdout)))
    assert {r["path"] for r in rows} == grouped
    print(f"\nhostile folder: {len(made)} files, {len(indexed)} indexed, {len(failures)} failed, {elapsed:.1f} s")


def test_files_that_vanish_or_change_between_discovery_and_reading(tmp_path, seeds, embedder, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("vanishes", "shrinks", "replaced", "stays"):
        (photos / f"{name}.jpg").write_bytes(seeds["jpeg"] if name != "replaced" else seeds["jpeg-progressive"])
    real_discover = index_module.discover

    def discover_then_change(roots, **kwargs):
        found = real_discover(roots, **kwargs)
        (photos / "vanishes.jpg").unlink()
        (photos / "shrinks.jpg").write_bytes(seeds["jpeg"][:200])
        (photos / "replaced.jpg").write_bytes(seeds["png"])
        return found

    monkeypatch.setattr(index_module, "discover", discover_then_change)
    with Index.open(tmp_path / "idx", create=True, embedder=embedder) as index:
        summary = index.add([photos])
    failures = dict(summary.failures)
    assert summary.discovered == 4 and summary.added == 2 and summary.failed == 2
    assert failures[str(photos / "vanishes.jpg")].startswith("cannot read file")
    assert "truncated" in failures[str(photos / "shrinks.jpg")] or "corrupt" in failures[str(photos / "shrinks.jpg")]
    with Store.open(tmp_path / "idx") as store:
        assert store.verify() == []
        replaced = store.record(str(photos / "replaced.jpg"))
        # the record describes the bytes that were read (the PNG now there), not the file discovery saw
        import hashlib
        assert replaced.sha256 == hashlib.sha256(seeds["png"]).hexdigest() and replaced.size == len(seeds["png"])


def test_permission_denied_for_real_as_another_user(tmp_path, seeds):
    """Tests run as root, for whom chmod 000 denies nothing: the CLI runs as `nobody` (setpriv) instead."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run neardup as another user")
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                            "import neardup.cli"], capture_output=True, text=True, check=False, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"neardup cannot run as nobody here: {(probe.stderr.strip().splitlines() or ['?'])[-1]}")
    base = Path(tempfile.mkdtemp(prefix="neardup-perm-"))
    try:
        os.chmod(base, 0o755)
        photos = base / "photos"
        (photos / "closed").mkdir(parents=True)
        (photos / "readable.jpg").write_bytes(seeds["jpeg"])
        (photos / "secret.jpg").write_bytes(seeds["png"])
        (photos / "closed" / "inside.jpg").write_bytes(seeds["jpeg"])
        os.chmod(photos / "secret.jpg", 0)
        os.chmod(photos / "closed", 0)
        index = base / "idx"
        index.mkdir()
        os.chown(index, 65534, 65534)
        env = {**os.environ, "HOME": str(index)}
        result = neardup_cli("index", photos, "--index", index, "--failures", env=env, user=65534)
        assert result.returncode == 0, result.stderr
        assert f"failed: {photos / 'secret.jpg'}: permission denied" in result.stdout
        assert f"failed: {photos / 'closed'}: cannot list folder: permission denied" in result.stdout
        assert "1 added" in result.stdout and "2 failed" in result.stdout
        denied = neardup_cli("index", photos, "--index", base / "not-writable" / "idx", env=env, user=65534)
        assert denied.returncode == 1 and "Traceback" not in denied.stderr
        assert denied.stderr.startswith("neardup: error: ") and len(denied.stderr.strip().splitlines()) == 1
    finally:
        for dirpath, dirnames, _ in os.walk(base):
            for d in dirnames:
                os.chmod(os.path.join(dirpath, d), stat.S_IRWXU)
        shutil.rmtree(base, ignore_errors=True)


def test_a_folder_of_many_empty_files_completes_with_reasons(tmp_path, embedder):
    folder = tmp_path / "empty"
    folder.mkdir()
    for n in range(EMPTY_FILES):
        open(folder / f"{n:06d}.jpg", "wb").close()
    started = time.perf_counter()
    with Index.open(tmp_path / "idx", create=True, embedder=embedder) as index:
        summary = index.add([folder])
    elapsed = time.perf_counter() - started
    assert summary.discovered == summary.failed == EMPTY_FILES and summary.added == 0
    with Store.open(tmp_path / "idx") as store:
        counts = store.counts()
        reasons = {r.error for r in store.records(status="failed")}
    assert counts["failed"] == EMPTY_FILES and reasons == {"empty file (0 bytes)"}
    print(f"\n{EMPTY_FILES} empty files indexed (all failed with a reason) in {elapsed:.1f} s "
          f"({EMPTY_FILES / elapsed:.0f} files/s)")
