"""Shared fixtures: real photos with edited copies, and one index of them built once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from neardup.demo import EDITS, build_collection
from neardup.index import Index
from neardup.models import default_embedder

PEER_DATA = Path(__file__).resolve().parents[2] / "shared" / "peer-data" / "imagededup"


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
