"""benchmarks/train_copy_descriptor.py and benchmarks/copy_augment.py: the augmentations, the data guard, and
one tiny real training run on sample photos that stops and resumes to the same state."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
samples = pytest.importorskip("skimage.data")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import copy_augment  # noqa: E402
import train_copy_descriptor as tcd  # noqa: E402

from neardup import benchmark_set  # noqa: E402


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [tcd._shrunk(Image.fromarray(f()).convert("RGB"), 256)
            for f in (samples.astronaut, samples.coffee, samples.chelsea, samples.rocket)]


def test_every_stage_gives_a_valid_image(photos):
    for index, (name, function) in enumerate(copy_augment.STAGES):
        for draw in range(3):
            out = function(photos[draw], np.random.default_rng([index, draw]))
            assert out.mode == "RGB" and min(out.size) >= 8, name
    thumb = copy_augment.thumbnail(photos[0], np.random.default_rng(1))
    assert 64 <= max(thumb.size) <= 160


def test_crop_keeps_at_least_30_percent_and_rotation_can_leave_black_corners(photos):
    w, h = photos[0].size
    for draw in range(30):
        out = copy_augment.crop(photos[0], np.random.default_rng(draw))
        assert out.width * out.height >= 0.3 * w * h - (w + h)
    black = [np.asarray(copy_augment.rotate(photos[1], np.random.default_rng(draw)))[0, 0].sum() == 0 for draw in range(12)]
    assert any(black) and not all(black)


def test_min_crop_area_widens_the_crops_of_cropped_views_only(photos):
    w, h = photos[0].size
    areas = [copy_augment.crop(photos[0], np.random.default_rng(draw), min_area=0.15).size for draw in range(60)]
    shares = [cw * ch / (w * h) for cw, ch in areas]
    assert min(shares) >= 0.15 - (w + h) / (w * h) and min(shares) < 0.3
    # the trainer's setting reaches the crop of a view that is cropped, and only the crop: other draws stay
    view = next(v for v in range(20) if "crop" in copy_augment.applied_stages(copy_augment.view_rng(3, 0, 0, v)))
    assert not np.array_equal(tcd.view_pixels(photos[0], 3, 0, 0, view), tcd.view_pixels(photos[0], 3, 0, 0, view, 0.15))
    uncropped = next(v for v in range(20) if "crop" not in copy_augment.applied_stages(copy_augment.view_rng(3, 0, 0, v)))
    assert np.array_equal(tcd.view_pixels(photos[0], 3, 0, 0, uncropped), tcd.view_pixels(photos[0], 3, 0, 0, uncropped, 0.15))


def test_views_are_deterministic_per_seed_and_fresh_per_epoch(photos):
    first = tcd.view_pixels(photos[0], seed=3, epoch=0, photo_index=0, view=1)
    assert first.shape == (224, 224, 3) and first.dtype == np.uint8
    assert np.array_equal(first, tcd.view_pixels(photos[0], seed=3, epoch=0, photo_index=0, view=1))
    assert not np.array_equal(first, tcd.view_pixels(photos[0], seed=3, epoch=1, photo_index=0, view=1))
    assert not np.array_equal(first, tcd.view_pixels(photos[0], seed=4, epoch=0, photo_index=0, view=1))
    # made in worker processes or not, an epoch's views are the same
    assert np.array_equal(tcd.epoch_views(photos[:2], 3, 0, 2, workers=1), tcd.epoch_views(photos[:2], 3, 0, 2, workers=2))


def test_guard_refuses_eval_sources_and_reserved_packages():
    for package in ["opencv-doc", "darknet"] + [s.package for s in benchmark_set.DEB_SOURCES]:
        with pytest.raises(SystemExit, match="reserved|eval"):
            tcd.check_training_package(package)
    used = {package for package, *_ in tcd.training_sources()}
    assert used and not used & ({"opencv-doc", "darknet"} | {s.package for s in benchmark_set.DEB_SOURCES})


def test_loss_prefers_views_of_the_same_photo():
    rng = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.rand(4, 64, generator=rng), dim=1)
    labels = torch.arange(4).repeat_interleave(2)
    close = base.repeat_interleave(2, 0) + 0.01 * torch.rand(8, 64, generator=rng)
    mixed = close[torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])]
    center = torch.full((64,), 0.5)
    assert tcd.copy_loss(close, labels, center, 0.1, 1.0)[1] < tcd.copy_loss(mixed, labels, center, 0.1, 1.0)[1]


def _args(runs: Path, run: str, **extra) -> argparse.Namespace:
    args = dict(run=run, runs_dir=str(runs), seed=0, cut=14, epochs=2, views=2, photos_per_batch=2, lr=1e-3,
                weight_decay=1e-4, warmup_steps=1, temperature=0.1, koleo=1.0, bf16=False, max_photos=0, workers=1,
                threads=2, log_every=1, checkpoint_minutes=60.0, keep_every=1, stop_after_steps=0,
                min_crop_area=copy_augment.MIN_AREA)
    args.update(extra)
    return argparse.Namespace(**args)


def test_tiny_training_runs_and_resumes_to_the_same_state(tmp_path, photos):
    data = ([f"sample{i}" for i in range(4)], photos, {"sources": "skimage samples"})
    tcd.train(_args(tmp_path, "straight"), data)
    tcd.train(_args(tmp_path, "stopped", stop_after_steps=1), data)  # stops mid-epoch
    stopped = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=False)
    assert stopped["step"] == 1
    tcd.train(_args(tmp_path, "stopped"), data)  # resumes
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 4
    pretrained = tcd.Split(14).trained_state()
    for key, value in a["trained"].items():
        assert torch.allclose(value, b["trained"][key], atol=1e-6), key
    assert any(not torch.equal(value, pretrained[key]) for key, value in a["trained"].items())  # it trained
    events = [json.loads(line) for line in (tmp_path / "stopped" / "log.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e.get("event") in ("started", "stopped", "resumed", "finished")] == \
        ["started", "stopped", "resumed", "finished"]
    assert all(np.isfinite(e["loss"]) for e in events if "loss" in e)
    assert (tmp_path / "straight" / "weights-epoch002.pt").is_file()
    with pytest.raises(SystemExit, match="settings differ"):
        tcd.train(_args(tmp_path, "straight", lr=5e-4), data)
    # a run stored before --min-crop-area existed ran with its default: it goes on, and refuses another value
    config = tmp_path / "straight" / "config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "min_crop_area"}))
    tcd.train(_args(tmp_path, "straight"), data)
    with pytest.raises(SystemExit, match="min_crop_area"):
        tcd.train(_args(tmp_path, "straight", min_crop_area=0.15), data)


def test_shipped_weights_file_is_the_same_bytes_for_the_same_numbers(tmp_path):
    # the model identity hashes that file: re-shipping identical weights must not change it
    arrays = {"_conv_head.weight": np.random.default_rng(0).standard_normal((4, 3)).astype(np.float16),
              "meta": np.array(json.dumps({"step": 1}))}
    first, second = tmp_path / "a.npz", tmp_path / "b.npz"
    tcd.write_reproducible_npz(first, arrays)
    tcd.write_reproducible_npz(second, dict(reversed(list(arrays.items()))))
    assert first.read_bytes() == second.read_bytes()
    with np.load(first) as data:
        assert set(data.files) == set(arrays)
        assert np.array_equal(data["_conv_head.weight"], arrays["_conv_head.weight"]) and data["_conv_head.weight"].dtype == np.float16
        assert json.loads(str(data["meta"])) == {"step": 1}
