"""The Index end to end on real photos and the real model."""

from __future__ import annotations

import os
import shutil
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from neardup.index import DEFAULT_THRESHOLD, Index, ModelMismatch, query_bits
from neardup.models.efficientnet_lite0 import TorchEmbedder
from neardup.store import Store

from conftest import PEER_DATA, copy_probability, needs_peer_data

#: A fine texture rotated with black corners is the known weak spot of the descriptor (docs/LIMITS.md,
#: "Known limits": gravel__rotate5 scores 0.50 against its original); every other copy must group.
# Copies that do not group with their original at the calibrated DEFAULT_THRESHOLD (0.77): 5° rotations
# of fine textures, star fields and the moon (black corners), and watermark text across a small
# motion-blurred photo and across the dark retina and star-field photos. The last three joined the list
# with GeM pooling and the threshold moving from 0.75 to 0.77 (cosine to the original, GeM / average
# pooling: moon rotate5 0.74 / 0.75, retina text 0.73 / 0.77, hubble_deep_field text 0.74 / 0.73).
KNOWN_MISSES = {("gravel", "rotate5"), ("grass", "rotate5"), ("hubble_deep_field", "rotate5"), ("clock", "text"),
                ("moon", "rotate5"), ("retina", "text"), ("hubble_deep_field", "text")}


def test_every_copy_finds_its_original_top1_with_lsh_equal_to_exact(collection, originals_index):
    originals = {name: os.path.abspath(path) for name, path in collection["originals"].items()}
    for copy in collection["copies"]:
        lsh = originals_index.query(copy["path"], k=3, exact=False)
        exact = originals_index.query(copy["path"], k=3, exact=True)
        assert lsh[0].path == originals[copy["original"]], (copy, lsh[:2])
        assert [m.path for m in lsh] == [m.path for m in exact]
        np.testing.assert_allclose([m.score for m in lsh], [m.score for m in exact], atol=1e-6)


def test_query_scores_are_cosines_sorted_and_thresholded(collection, originals_index):
    chelsea = collection["originals"]["chelsea"]
    copy = next(c["path"] for c in collection["copies"] if c["original"] == "chelsea" and c["edit"] == "half")
    matches = originals_index.query(copy, k=16)
    scores = [m.score for m in matches]
    assert scores == sorted(scores, reverse=True) and len(matches) == 16
    assert matches[0].path == os.path.abspath(chelsea) and matches[0].score > 0.95
    assert all(-1 <= s <= 1.0001 for s in scores)
    kept = originals_index.query(copy, k=16, threshold=0.5)
    assert kept == [m for m in matches if m.score >= 0.5]
    # an indexed image queried by its own path leaves itself out by default
    assert all(m.path != os.path.abspath(chelsea) for m in originals_index.query(chelsea, k=3))
    assert originals_index.query(chelsea, k=1, exclude_self=False)[0].score == pytest.approx(1.0, abs=1e-5)


def test_dups_groups_each_copy_with_its_original_and_never_merges_photos(collection, full_index):
    name_of = {os.path.abspath(p): n for n, p in collection["originals"].items()}
    name_of.update({os.path.abspath(c["path"]): c["original"] for c in collection["copies"]})
    groups = full_index.duplicates(DEFAULT_THRESHOLD)
    for group in groups:
        assert len({name_of[f] for f in group.files}) == 1, f"different photos merged: {group.files}"
        # scores are copy probabilities (of the collection-aware score here: 128 files)
        assert DEFAULT_THRESHOLD <= group.min_score <= group.max_score <= 1.0
        assert group.min_cosine <= group.max_cosine <= 1.0001
    group_of = {f: i for i, g in enumerate(groups) for f in g.files}
    for copy in collection["copies"]:
        if (copy["original"], copy["edit"]) in KNOWN_MISSES:
            continue
        original = os.path.abspath(collection["originals"][copy["original"]])
        assert group_of.get(os.path.abspath(copy["path"])) == group_of.get(original) is not None, copy


def test_lsh_duplicates_equal_exact_duplicates(full_index):
    for threshold in (copy_probability(0.45, aware=True), DEFAULT_THRESHOLD, copy_probability(0.7, aware=True)):
        lsh = full_index.duplicates(threshold)
        exact = full_index.duplicates(threshold, exact=True)
        assert [g.files for g in lsh] == [g.files for g in exact]
        # the tables find a subset of the exact pairs (each pair at the threshold with probability >= 0.999),
        # so a group's weakest found link is never weaker than the exact one, its strongest never stronger
        for found, oracle in zip(lsh, exact):
            assert threshold <= oracle.min_score <= found.min_score + 1e-5
            assert found.max_score <= oracle.max_score + 1e-5


def test_query_bits_scale_with_collection_size():
    assert query_bits(16) == 8 and query_bits(1_000_000) == 20
    assert [query_bits(n) for n in (10**3, 10**4, 10**5, 10**6)] == sorted(query_bits(n) for n in (10**3, 10**4, 10**5, 10**6))


def test_incremental_reindex_skips_updates_and_prunes(tmp_path, photo_folder, embedder):
    index = Index.open(tmp_path / "idx", create=True, embedder=embedder)
    first = index.add([photo_folder])
    assert (first.discovered, first.added, first.failed) == (8, 8, 0)

    again = index.add([photo_folder])
    assert (again.added, again.updated, again.unchanged) == (0, 0, 8)

    # new mtime, same bytes: recognised by sha256, not re-embedded
    os.utime(photo_folder / "coffee.jpg", ns=(1, 1))
    touched = index.add([photo_folder])
    assert (touched.unchanged, touched.updated) == (8, 0)
    assert index._reader.record(str(photo_folder / "coffee.jpg")).mtime_ns == 1

    # changed content: re-embedded, and the query answer follows the new pixels
    Image.open(photo_folder / "astronaut.jpg").rotate(90).save(photo_folder / "rocket.jpg")
    changed = index.add([photo_folder])
    assert (changed.updated, changed.unchanged) == (1, 7)

    # a byte-identical file under a new name shares the existing vector
    shutil.copy(photo_folder / "chelsea.jpg", photo_folder / "chelsea-copy.jpg")
    identical = index.add([photo_folder])
    assert (identical.added, identical.identical) == (1, 1)
    assert index.query(photo_folder / "chelsea.jpg", k=1)[0].score == pytest.approx(1.0, abs=1e-6)

    (photo_folder / "coffee__flip.jpg").unlink()
    kept = index.add([photo_folder])
    assert kept.removed == 0 and index.stats()["images"] == 9
    pruned = index.add([photo_folder], prune=True)
    assert pruned.removed == 1 and index.stats()["images"] == 8

    assert index.remove([photo_folder / "chelsea-copy.jpg"]) == 1
    assert index.remove([photo_folder]) == 7
    assert index.stats()["images"] == 0
    with Store.open(tmp_path / "idx") as store:
        assert store.verify() == []
    index.close()


def test_bad_files_are_recorded_with_reasons_and_never_indexed(tmp_path, photo_folder, embedder):
    bad = photo_folder / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.jpg").write_text("not a picture")
    good = (photo_folder / "chelsea.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (bad / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    index = Index.open(tmp_path / "idx", create=True, embedder=embedder)
    summary = index.add([photo_folder])
    assert summary.failed == 4 and summary.added == 8
    reasons = dict(index.failures())
    assert set(reasons) == {str(p) for p in bad.iterdir()}
    assert all(reason and "\n" not in reason for reason in reasons.values())
    indexed = {m.path for m in index.query(photo_folder / "chelsea.jpg", k=50)}
    assert not indexed & set(reasons)
    index.close()



def test_a_fifo_swapped_in_after_discovery_is_a_recorded_failure_not_a_hang(tmp_path, photo_folder, collection,
                                                                          embedder, monkeypatch):
    """The loader opens files with files.open_regular: a FIFO put where discovery saw a photo (the race
    between listing and reading, forced here by swapping right after the real discovery) is refused at
    open, never waited on; a symlinked photo is still indexed."""
    from neardup import index as index_module

    swapped = photo_folder / "coffee.jpg"
    (photo_folder / "link.jpg").symlink_to(collection["originals"]["moon"])  # a photo outside the folder
    real_discover = index_module.discover

    def discover_then_swap(roots):
        found = real_discover(roots)
        swapped.unlink()
        os.mkfifo(swapped)
        return found

    monkeypatch.setattr(index_module, "discover", discover_then_swap)
    index = Index.open(tmp_path / "idx", create=True, embedder=embedder)
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.setdefault("summary", index.add([photo_folder])), daemon=True)
    worker.start()
    worker.join(timeout=300)  # only turns a hang into a failure
    if worker.is_alive():  # the old loader blocks in open(): give it a writer so the thread can end
        os.close(os.open(swapped, os.O_WRONLY | os.O_NONBLOCK))
        worker.join()
        raise AssertionError("indexing waited on a FIFO")
    summary = outcome["summary"]
    assert summary.failures == [(str(swapped), "is a named pipe (FIFO), not a file")]
    assert summary.added == 8 and str(photo_folder / "link.jpg") in index.snapshot().paths
    index.close()

@needs_peer_data
def test_peer_data_groups_like_imagededup_expects(tmp_path, embedder):
    index = Index.open(tmp_path / "idx", create=True, embedder=embedder)
    summary = index.add([PEER_DATA / "mixed_nested_images", PEER_DATA / "formats_images", PEER_DATA / "alpha_channel_image.png"])
    failures = dict(summary.failures)
    assert list(failures) == [str(PEER_DATA / "mixed_nested_images" / "ukbench09268_corrupt.jpg")]
    groups = [sorted(os.path.basename(f) for f in g.files) for g in index.duplicates()]
    # alpha_channel_image.png is ukbench00120 saved as RGBA: composited on white it is the same photo.
    # ukbench00120_rotation.jpg (turned ~30 degrees, black corners) joins at the default since the
    # copy-trained descriptor (cosine 0.63-0.65; it was 0.57)
    assert ["alpha_channel_image.png", "ukbench00120.jpg", "ukbench00120_hflip.jpg", "ukbench00120_resize.jpg",
            "ukbench00120_rotation.jpg"] in groups
    assert summary.skipped == 1  # ukbench09380.svg: reported as not a raster image
    assert ["ukbench09380.bmp", "ukbench09380.jpeg", "ukbench09380.png", "ukbench09380.webp"] in groups
    assert not any("ukbench09268.jpg" in g for g in groups)
    index.close()


def test_opening_with_another_model_is_a_clear_error(tmp_path, photo_folder, embedder):
    index = Index.open(tmp_path / "idx", create=True, embedder=embedder)
    index.add([photo_folder / "chelsea.jpg"])
    index.close()

    class OtherPreprocessing(TorchEmbedder):
        def __init__(self):
            super().__init__()
            self.identity = {**self.identity, "preprocessing": "resize256-bilinear"}

    other = Index.open(tmp_path / "idx", embedder=OtherPreprocessing())
    with pytest.raises(ModelMismatch, match="resize256-bilinear"):
        other.query(photo_folder / "coffee.jpg")
    with pytest.raises(ModelMismatch):
        other.add([photo_folder / "coffee.jpg"])
    other.close()


@pytest.mark.parametrize("preprocessing", ["resize224-bicubic,(x-127)/128,gap,l2", "resize224-bicubic,(x-127)/128,gem3,l2"])
def test_an_index_of_an_earlier_descriptor_is_refused(tmp_path, photo_folder, embedder, preprocessing):
    # the identities indexes stored before the whitening (average pooling, then GeM): 1280-d, no whitening hash
    earlier = {"name": embedder.name, "weights_sha256": embedder.identity["weights_sha256"],
               "preprocessing": preprocessing, "dim": 1280}
    earlier_descriptor = SimpleNamespace(
        name=embedder.name, dim=1280, input_size=embedder.input_size, preprocess=embedder.preprocess,
        embed=lambda batch: np.full((len(batch), 1280), 1280 ** -0.5, np.float32), identity=earlier)
    with Index.open(tmp_path / "idx", create=True, embedder=earlier_descriptor) as index:
        index.add([photo_folder / "chelsea.jpg"])
    current = Index.open(tmp_path / "idx", embedder=embedder)
    with pytest.raises(ModelMismatch, match=r"preprocessing .*,l2 \(here: trim-border.*lw768,l2\); "
                                            r"dim 1280 \(here: 768\); whitening_sha256 absent \(here: [0-9a-f]{12}\)"):
        current.query(photo_folder / "coffee.jpg")
    current.close()


def test_compaction_keeps_answers_and_drops_dead_rows(tmp_path, photo_folder, embedder):
    index = Index.open(tmp_path / "idx", create=True, embedder=embedder)
    for path in sorted(photo_folder.iterdir()):
        index.add([path])
    before = index.query(photo_folder / "chelsea__half.jpg", k=6)
    index.remove([photo_folder / "rocket.jpg"])
    stats = index.stats()
    assert stats["dead_rows"] == 1 and stats["segments"] == 8
    dropped = index.compact()
    assert dropped == 1 and index.stats()["segments"] == 1 and index.stats()["dead_rows"] == 0
    after = index.query(photo_folder / "chelsea__half.jpg", k=5)
    assert [m.path for m in after] == [m.path for m in before if not m.path.endswith("rocket.jpg")][:5]
    assert {m.id for m in after} <= {m.id for m in before}
    index.close()


def test_add_sends_the_embedders_own_batch_size_to_the_model(tmp_path, photo_folder, embedder):
    """Without batch_size, Index.add batches as the embedder asks (the GPU embedder's `batch`, 256), else 32."""

    class Batching:
        def __init__(self, inner, batch):
            self.inner, self.batch, self.sizes = inner, batch, []

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def embed(self, pixels):
            self.sizes.append(len(pixels))
            return self.inner.embed(pixels)

    counting = Batching(embedder, 3)
    with Index.open(tmp_path / "idx", create=True, embedder=counting) as index:
        assert index.add([photo_folder]).added == 8
    assert max(counting.sizes) == 3 and sum(counting.sizes) == 8
