"""The GPU embedder's logic (neardup.models.cuda) on a CPU: batching, the uint8 transfer and on-device
normalisation, the guard's verdicts and the fallbacks where CUDA is absent. The device figures themselves
come from a GPU run (benchmarks/gpu_bench.sh)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from neardup.models import default_model, load_embedder, resolve_backend, torch_cuda_available
from neardup.models.cuda import CudaEmbedder, device_input, guarded_cuda_embedder
from neardup.errors import BackendError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a CUDA device here")


@pytest.fixture(scope="module")
def pixels(collection):
    return np.stack([default_model.model_pixels(Image.open(path).convert("RGB"))
                     for path in collection["originals"].values()])


@pytest.fixture(scope="module")
def cpu_fp32():
    return CudaEmbedder("cpu", torch.float32, batch=5)


def test_device_normalisation_equals_the_cpu_preprocessing(pixels):
    on_device = device_input(torch.from_numpy(pixels), torch.float32)
    assert on_device.shape == (len(pixels), 3, 224, 224)
    assert on_device.is_contiguous(memory_format=torch.channels_last)  # the NHWC upload is already channels_last
    assert np.array_equal(on_device.numpy(), default_model.normalise(pixels))
    half = device_input(torch.from_numpy(pixels), torch.float16).float().numpy()
    assert np.abs(half - default_model.normalise(pixels)).max() <= 2 ** -9  # fp16 holds k/128 to 1/512 near 1


def test_batches_of_uint8_give_the_reference_vectors(embedder, cpu_fp32, pixels):
    assert len(pixels) > 2 * cpu_fp32.batch  # several full batches and a partial one
    reference = embedder.embed(default_model.normalise(pixels))
    vectors = cpu_fp32.embed(pixels)
    assert vectors.shape == (len(pixels), default_model.DIM) and vectors.dtype == np.float32
    assert np.abs(vectors - reference).max() < 1e-4
    # float32 model inputs (the Embedder protocol's other form) give the same vectors
    assert np.array_equal(cpu_fp32.embed(default_model.normalise(pixels)), vectors)
    assert cpu_fp32.embed(pixels[:0]).shape == (0, default_model.DIM)
    assert cpu_fp32.identity == embedder.identity  # same vector space: an index is shared with every backend
    on_device = cpu_fp32.embed_on_device(torch.from_numpy(pixels[:3]))
    assert np.allclose(on_device.numpy(), vectors[:3], atol=1e-6)


def test_guard_refuses_a_lower_precision_and_falls_back_to_fp32(capfd):
    # bfloat16 (which torch runs on a CPU) loses more than the fp16 bar allows: the issue measured a mean
    # cosine of 0.9974 on the GPU. The real guard on the shipped photos decides.
    chosen = guarded_cuda_embedder("cpu", torch.bfloat16)
    assert chosen.dtype == torch.float32
    report = chosen.guard
    assert not report["passed"] and report["mean_cosine"] < 0.999 and report["min_mean_cosine"] == 0.999
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("neardup: bfloat16 refused by its accuracy guard")
    assert lines[0].endswith("using fp32 on the GPU")
    # under a bar it clears (and with every nearest original kept), the faster precision is used
    chosen = guarded_cuda_embedder("cpu", torch.bfloat16, min_mean_cosine=report["mean_cosine"] - 0.001)
    if report["top1_changed"] == 0:
        assert chosen.dtype == torch.bfloat16 and chosen.guard["passed"]
        assert capfd.readouterr().err == ""
    else:
        assert chosen.dtype == torch.float32


@no_cuda
def test_without_cuda_the_gpu_backend_is_refused_and_auto_stays_on_the_cpu():
    with pytest.raises(BackendError, match="no CUDA device"):
        CudaEmbedder("cuda")
    with pytest.raises(BackendError, match="torch-fp16 needs a CUDA GPU"):
        load_embedder("torch-fp16")
    assert not torch_cuda_available()  # so auto resolves to a CPU backend (or ORT's GPU providers)
    assert resolve_backend("torch") == "torch"
