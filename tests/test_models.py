"""EfficientNet-Lite0 definition and embedder, checked with the real weights on real photos."""

import io
import json
import re

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from neardup.models import default_embedder
from neardup.models.efficientnet_lite0 import (
    DIM,
    Conv2dSame,
    EfficientNetLite0,
    load_pretrained,
    preprocess,
    weights_path,
    weights_sha256,
)

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup


@pytest.fixture(scope="module")
def embedder():
    return default_embedder()


@pytest.fixture(scope="module")
def chelsea():
    return Image.fromarray(skimage.data.chelsea())


@pytest.fixture(scope="module")
def coffee():
    return Image.fromarray(skimage.data.coffee())


def _jpeg_copy(image, quality):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def test_state_dict_matches_definition_exactly():
    state_dict = torch.load(weights_path(), map_location="cpu", weights_only=True)
    assert len(state_dict) == 296
    result = EfficientNetLite0().load_state_dict(state_dict, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_classifier_recognises_photos(embedder, chelsea, coffee):
    # Right ImageNet classes with high confidence show that the architecture, TF SAME padding
    # and BN epsilon all match how the weights were trained. The copy-trained blocks no longer feed the
    # ImageNet classifier, so this checks the weights they were trained from.
    model = load_pretrained(copy_trained=False)
    assert not model.training
    batch = torch.from_numpy(np.stack([embedder.preprocess(chelsea), embedder.preprocess(coffee)]))
    with torch.inference_mode():
        probabilities = model(batch).softmax(dim=1)
    cat_top1 = probabilities[0].argmax().item()
    assert cat_top1 in CAT_CLASSES
    assert probabilities[0, sorted(CAT_CLASSES)].sum() > 0.8
    coffee_top5 = set(probabilities[1].topk(5).indices.tolist())
    assert coffee_top5 & COFFEE_CLASSES


def test_same_padding_gives_ceil_output_size():
    for size, expected in [(224, 112), (225, 113), (7, 4)]:
        conv = Conv2dSame(1, 1, 5, stride=2)
        assert conv(torch.zeros(1, 1, size, size)).shape[-1] == expected
    model = EfficientNetLite0().eval()
    with torch.inference_mode():
        assert model.forward_features(torch.zeros(1, 3, 100, 130)).shape == (1, 1280, 4, 5)


def test_preprocess_any_mode_and_size(embedder, chelsea):
    for image in [chelsea, chelsea.convert("L"), chelsea.convert("RGBA").resize((31, 500))]:
        pixels = embedder.preprocess(image)
        assert pixels.dtype == np.float32
        assert pixels.shape == (3, 224, 224)
        assert pixels.min() >= -127 / 128 and pixels.max() <= 128 / 128


def test_embed_returns_unit_rows(embedder, chelsea, coffee):
    vectors = embedder.embed(np.stack([embedder.preprocess(chelsea), embedder.preprocess(coffee)]))
    assert vectors.dtype == np.float32
    assert vectors.shape == (2, DIM)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_embed_empty_batch(embedder):
    vectors = embedder.embed(np.zeros((0, 3, 224, 224), dtype=np.float32))
    assert vectors.dtype == np.float32
    assert vectors.shape == (0, DIM)


def test_embed_rejects_wrong_shape(embedder):
    with pytest.raises(ValueError):
        embedder.embed(np.zeros((1, 3, 100, 100), dtype=np.float32))


@pytest.mark.parametrize("batch_size", [4, 6])  # 6 spans two internal micro-batches
def test_embedding_independent_of_batch(embedder, chelsea, coffee, batch_size):
    images = [coffee, chelsea.rotate(90), chelsea, coffee.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    batch = np.stack([embedder.preprocess(image) for image in (images * 2)[:batch_size]])
    alone = embedder.embed(batch[[batch_size - 1]])
    together = embedder.embed(batch)
    np.testing.assert_allclose(alone[0], together[batch_size - 1], atol=1e-5)


def test_edited_copies_stay_close(embedder, chelsea, coffee):
    # Measured: half-size 0.991, JPEG q30 0.936, unrelated photo 0.123.
    half_size = chelsea.resize((chelsea.width // 2, chelsea.height // 2), Image.Resampling.BICUBIC)
    images = [chelsea, half_size, _jpeg_copy(chelsea, quality=30), coffee]
    original, half, jpeg, other = embedder.embed(np.stack([embedder.preprocess(i) for i in images]))
    assert original @ half > 0.95
    assert original @ jpeg > 0.9
    assert original @ other < 0.5


def test_identity(embedder):
    identity = embedder.identity
    assert json.loads(json.dumps(identity)) == identity
    assert set(identity) == {"name", "weights_sha256", "preprocessing", "whitening_sha256", "dim"}
    assert re.fullmatch(r"[0-9a-f]{64}", identity["weights_sha256"])
    assert re.fullmatch(r"[0-9a-f]{64}", identity["whitening_sha256"])
    assert identity["weights_sha256"] == weights_sha256()
    assert identity["name"] == embedder.name == "efficientnet-lite0-copy"
    assert identity["dim"] == embedder.dim == DIM
    assert embedder.input_size == 224


def test_copy_trained_weights_ship_in_the_package_and_change_the_descriptor(chelsea):
    from neardup.models import default_model

    trained = default_model.copy_weights()
    assert default_model.COPY_WEIGHTS_FILE.stat().st_size <= 20e6
    imagenet = torch.load(weights_path(), map_location="cpu", weights_only=True)
    assert trained and set(trained) <= set(imagenet)
    assert any(name.startswith("_blocks.15.") for name in trained) and "_conv_head.weight" in trained
    assert not any(name.startswith(("_conv_stem", "_blocks.0.", "_fc")) for name in trained)
    # the identity hashes both files: neither the ImageNet weights alone nor the copy weights alone
    assert weights_sha256() != default_model.imagenet_weights_sha256()
    pixels = torch.from_numpy(np.stack([preprocess(chelsea)]))
    with torch.inference_mode():
        ours = load_pretrained(whitened=False).forward_features(pixels)
        theirs = load_pretrained(whitened=False, copy_trained=False).forward_features(pixels)
    assert not torch.allclose(ours, theirs)


def test_default_embedder_is_cached(embedder):
    assert default_embedder() is embedder
