"""Shared fixtures: real photos with edited copies, and one index of them built once per session."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from neardup.demo import EDITS, build_collection
from neardup import calibration, lsh
from neardup.index import LSH_SEED, NUM_TABLES, STORED_BITS, Index
from neardup.store import Record, Store
from neardup.models import default_embedder


def tree_hashes(*folders: Path) -> dict[str, str]:
    """sha256 of every file under the folders, by path: what "no user file lost or changed" compares."""
    out = {}
    for folder in folders:
        for dirpath, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(dirpath, name)
                out[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return out


def _peer_data() -> Path | None:
    """imagededup's test images (not part of this repo): $NEARDUP_PEER_DATA, or shared/peer-data beside the repo."""
    candidates = [os.environ.get("NEARDUP_PEER_DATA")] + [
        str(folder / "shared" / "peer-data" / "imagededup") for folder in Path(__file__).resolve().parents
    ] + ["/work/shared/peer-data/imagededup"]
    return next((Path(c) for c in candidates if c and Path(c, "NOTICE.md").exists()), None)


PEER_DATA = _peer_data()
needs_peer_data = pytest.mark.skipif(PEER_DATA is None, reason="imagededup peer data not found (set NEARDUP_PEER_DATA)")


@pytest.fixture(scope="session")
def embedder():
    return default_embedder()


@pytest.fixture(scope="session")
def collection(tmp_path_factory) -> dict:
    """16 real photos and 7 edited copies of each (half, jpeg30, crop80, rotate5, bright, text, flip)."""
    return build_collection(tmp_path_factory.mktemp("photos"), edits=EDITS)


@pytest.fixture(scope="session")
def full_index(tmp_path_factory, collection, embedder) -> Index:
    """An index of every original and every copy (read-only for the tests that use it)."""
    index = Index.open(tmp_path_factory.mktemp("full") / "idx", create=True, embedder=embedder)
    root = Path(next(iter(collection["originals"].values()))).parents[1]
    index.add([root / "originals", root / "edited"])
    yield index
    index.close()


@pytest.fixture(scope="session")
def originals_index(tmp_path_factory, collection, embedder) -> Index:
    """An index of the originals only: each copy's right answer is its own original."""
    index = Index.open(tmp_path_factory.mktemp("orig") / "idx", create=True, embedder=embedder)
    index.add(collection["originals"].values())
    yield index
    index.close()


@pytest.fixture
def photo_folder(tmp_path, collection) -> Path:
    """A private, writable copy of a few originals and copies."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("chelsea", "coffee", "rocket", "astronaut"):
        shutil.copy(collection["originals"][name], folder / f"{name}.jpg")
    for copy in collection["copies"]:
        if copy["original"] in ("chelsea", "coffee") and copy["edit"] in ("half", "flip"):
            shutil.copy(copy["path"], folder / Path(copy["path"]).name)
    return folder


def build_library(base: Path, collection: dict, embedder, extra: dict[str, str] | None = None) -> Path:
    """The actions' test library under base/work, indexed, and a copy of it in base/pristine:
    photos/a: chelsea, coffee, rocket (the originals, oldest); photos/b: chelsea half-size and flipped (in
    b/deep), coffee re-encoded at JPEG quality 30; `extra` adds files to photos/b (name: source path)."""
    photos = base / "work" / "photos"
    (photos / "a").mkdir(parents=True)
    (photos / "b" / "deep").mkdir(parents=True)
    originals = collection["originals"]
    copies = {(c["original"], c["edit"]): c["path"] for c in collection["copies"]}
    for name in ("chelsea", "coffee", "rocket"):
        shutil.copy(originals[name], photos / "a" / f"{name}.jpg")
    shutil.copy(copies["chelsea", "half"], photos / "b" / "chelsea_half.jpg")
    shutil.copy(copies["chelsea", "flip"], photos / "b" / "deep" / "chelsea_flip.jpg")
    shutil.copy(copies["coffee", "jpeg30"], photos / "b" / "coffee_jpeg30.jpg")
    for name, source in (extra or {}).items():
        shutil.copy(source, photos / "b" / name)
    for path in photos.rglob("*.jpg"):  # the originals are the oldest files
        stamp = 1_000_000_000 if path.parent.name == "a" else 1_500_000_000
        os.utime(path, (stamp, stamp))
    with Index.open(base / "work" / "idx", create=True, embedder=embedder) as index:
        summary = index.add([photos])
    assert summary.added == 6 + len(extra or {}) and summary.failed == 0
    shutil.copytree(base / "work", base / "pristine")
    return base


def restored_library(base: Path, embedder):
    """base/work restored from base/pristine (copy2 keeps mtimes to the ns: the catalog still matches);
    yields (photos folder, open Index)."""
    work = base / "work"
    shutil.rmtree(work)
    shutil.copytree(base / "pristine", work)
    index = Index.open(work / "idx", embedder=embedder)
    yield work / "photos", index
    index.close()


def copy_probability(raw: float, aware: bool) -> float:
    """The `dups` threshold (a copy probability, neardup.calibration) of the raw score `raw`: it links
    the pairs whose raw score reaches `raw` (up to where the curve stops rising)."""
    return float(calibration.probability(raw, aware))


def assert_same_groups(found: list, expected: list) -> None:
    """The same duplicate groups (files and ids, in order) with the same score and cosine ranges to float32
    rounding: two paths compute a pair's cosine with different products, whose sums the CPU's BLAS may
    order differently (seen: 6e-8 apart on an AVX2 EPYC, bit-equal on a Sapphire Rapids)."""
    assert [(g.files, g.ids) for g in found] == [(g.files, g.ids) for g in expected]
    for got, want in zip(found, expected):
        for field in ("min_score", "max_score", "min_cosine", "max_cosine"):
            assert getattr(got, field) == pytest.approx(getattr(want, field), abs=1e-6), (got, want)


def write_index(root, vectors: np.ndarray, start: int = 0) -> None:
    """Commit synthetic unit vectors (paths /v/<row>) straight through Store, with the index's LSH planes."""
    planes = lsh.make_planes(vectors.shape[1], NUM_TABLES, STORED_BITS, LSH_SEED)
    with Store.open(root, create=True, write=True) as store:
        if store.get_meta("model") is None:
            store.save_planes(planes)
            store.set_meta("lsh", {"tables": NUM_TABLES, "bits": STORED_BITS, "seed": LSH_SEED, "center": None})
            store.set_meta("model", {"name": "synthetic", "dim": vectors.shape[1]})
        store.commit(vectors=vectors, codes=lsh.hash_vectors(vectors, store.load_planes(), NUM_TABLES),
                     indexed=[Record(f"/v/{i}", 1, 1) for i in range(start, start + len(vectors))])
