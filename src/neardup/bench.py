"""`neardup bench`: the seed's speed experiment (embed 1,000 images, then query), measured on this
machine with every backend side by side in one run.

Rows:
* seed-style: what the seed's predict loop does, one image at a time: full-size decode, resize,
  torch eager with a batch of 1, no overlap. Its model time alone is the model-only baseline.
* per backend, model-only: decoded uint8 model inputs through `embed` in batches (no decoding); on a GPU
  (`embed_on_device`) batches of 256 already on the device, so the device's own speed is what is timed.
* per backend, end to end: `Index.add` on the image files (read, hash, draft-decode, preprocess in
  worker processes or threads, overlapped with batched inference, stored), the path users run, with
  where the indexing thread's time went: the model, the store's commits, and waiting for decoded files.
* the bound set by the model's FLOPs and this machine's measured sgemm rate, and how close each
  backend comes to it.
* queries: `Index.query_vector` exact and LSH, ms per query, on the index built above.

Images: ~2-megapixel JPEGs (1600x1200) made from the bundled sample photos (demo extra), each a
different crop, brightness and quality so no two files are alike, or a folder given with --images.
"""

from __future__ import annotations

import os
import platform
import resource
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

LARGE_SIZE = (1600, 1200)
SEED_BACKEND = "torch eager, batch 1"
QUERY_K = 10


# ---- inputs ----------------------------------------------------------------------------------------


def make_images(folder: Path, n: int, size: tuple[int, int] = LARGE_SIZE,
                progress: Callable[[int], None] | None = None) -> list[Path]:
    """n distinct ~2-MP JPEGs from the sample photos: photo i % 16 upscaled to cover `size` plus a
    margin, then cropped at an offset, brightened and encoded at a quality that all depend on i."""
    from PIL import Image, ImageEnhance

    from .demo import sample_photos

    photos = [p.image for p in sample_photos()]
    if not photos:
        raise RuntimeError("neardup bench needs scikit-image for its sample photos (pip install 'neardup[demo]'), "
                           "or a folder of images: --images DIR")
    width, height = size
    margin = 64
    covers = []
    for photo in photos:
        scale = max((width + margin) / photo.width, (height + margin) / photo.height)
        covers.append(photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.BICUBIC))
    folder.mkdir(parents=True, exist_ok=True)

    def write(i: int) -> Path:
        cover = covers[i % len(covers)]
        variant = i // len(covers)
        left = (variant * 7) % (cover.width - width + 1)
        top = (variant * 5) % (cover.height - height + 1)
        image = cover.crop((left, top, left + width, top + height))
        image = ImageEnhance.Brightness(image).enhance(0.9 + 0.02 * (variant % 10))
        path = folder / f"img{i:05d}.jpg"
        image.save(path, "JPEG", quality=80 + variant % 15)
        return path

    paths = []
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for path in pool.map(write, range(n)):
            paths.append(path)
            if progress:
                progress(1)
    return paths


def image_files(folder: Path, n: int) -> list[Path]:
    from .images import discover

    files = discover([str(folder)]).files[:n]
    if not files:
        raise FileNotFoundError(f"no image files under {folder}")
    return [Path(f) for f in files]


# ---- the machine -------------------------------------------------------------------------------------


def machine() -> dict:
    import onnxruntime as ort
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from .models import describe_auto
    from .models import openvino_backend as ovb

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    flags = ovb.cpu_flags() or frozenset()
    openvino = None
    if ovb.available():
        import openvino as ov

        openvino = ov.__version__
    return {"cpu": cpu, "cores": os.cpu_count() or 1, "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers(),
            "openvino": openvino, "cpu_flags": sorted(set(ovb.KEY_FLAGS) & flags),
            # what `auto` runs here and why, as cached when the machine was described (the bench's first step)
            "auto": describe_auto()}


def model_macs() -> int:
    """Multiply-adds of one 224x224 image through the embedding path, counted by forward hooks on
    every convolution (BatchNorm, ReLU6, pooling and the norm are a rounding error)."""
    import torch

    from .models.efficientnet_lite0 import INPUT_SIZE, load_pretrained

    model = load_pretrained()
    total = 0

    def count(module, inputs, output):
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.inference_mode():
        model.forward_features(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE))
    for hook in hooks:
        hook.remove()
    return total


def sgemm_gflops(threads: int, size: int = 1024, seconds: float = 1.5) -> float:
    """Best float32 matrix-multiply rate (2*n^3 flops per product) with this many threads, torch/oneDNN."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)
        best = float("inf")
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        return 2 * size**3 / best / 1e9
    finally:
        torch.set_num_threads(previous)


# ---- timings -------------------------------------------------------------------------------------------


def seed_style(paths: Sequence[Path], tick: Callable[[int], None] | None = None) -> dict:
    """The seed's loop: for each file, decode at full size, resize, run torch eager on a batch of 1."""
    from PIL import Image

    from .models import default_embedder
    from .models.default_model import INPUT_SIZE, normalise, trim_border

    embedder = default_embedder(os.cpu_count())
    model_seconds = 0.0
    start = time.perf_counter()
    for path in paths:
        with Image.open(path) as image:
            # the seed's plain full-size resize (no reducing_gap shortcut), after neardup's border trim
            resized = trim_border(image.convert("RGB")).resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BICUBIC)
            pixels = normalise(np.asarray(resized)[None])
        began = time.perf_counter()
        embedder.embed(pixels)
        model_seconds += time.perf_counter() - began
        if tick:
            tick(1)
    seconds = time.perf_counter() - start
    return {"images": len(paths), "seconds": round(seconds, 3), "images_per_s": round(len(paths) / seconds, 2),
            "model_images_per_s": round(len(paths) / model_seconds, 2)}


def model_only(embedder, pool: np.ndarray, n: int, batch: int = 32, tick: Callable[[int], None] | None = None) -> float:
    """Images/s of `embed` on n decoded images (uint8 model inputs, cycling through `pool`), in batches; on a
    GPU embedder, of `embed_on_device` on batches of its own size that live on the device."""
    if hasattr(embedder, "embed_on_device"):
        return _model_only_on_device(embedder, pool, n, tick)
    embedder.embed(pool[:batch])  # warm-up: first-run allocations, TensorRT engine build
    done, start = 0, time.perf_counter()
    while done < n:
        take = min(batch, n - done)
        offset = done % len(pool)
        chunk = np.take(pool, np.arange(offset, offset + take) % len(pool), axis=0)
        embedder.embed(chunk)
        done += take
        if tick:
            tick(take)
    return n / (time.perf_counter() - start)


def _model_only_on_device(embedder, pool: np.ndarray, n: int, tick: Callable[[int], None] | None) -> float:
    import torch

    size = embedder.batch
    on_device = torch.from_numpy(np.take(pool, np.arange(size) % len(pool), axis=0)).to(embedder.device)
    embedder.embed_on_device(on_device)  # warm-up: cuDNN's algorithm choice
    rounds = max(1, -(-n // size))
    sync = torch.cuda.synchronize if embedder.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(rounds):
        embedder.embed_on_device(on_device)
        if tick:
            tick(size)
    sync()
    return rounds * size / (time.perf_counter() - start)


def index_run(embedder, paths: Sequence[Path], root: Path, workers: int | None,
              tick: Callable[[int], None] | None = None) -> tuple[float, float, Path, dict]:
    """Images/s of Index.add on the files into a fresh index at root (decode + embed + store), the
    CPU time it used per image (ms: every thread of this process and the decode stage's worker
    processes, see cpu_seconds): on a busy machine wall time says little, while cores / CPU time per
    image bounds what the same run reaches on idle cores; and the stages: seconds the indexing thread
    spent in the model, in the store's commits, and otherwise (waiting for decoded files, bookkeeping),
    and where the CPU went: decode_cpu_ms_per_file (the decode stage's workers: read, hash, decode, trim,
    resize) and model_cpu_ms_per_image (the rest: the model's threads, the indexing thread). On cores that
    decoding and the model share, the indexing thread's seconds "in the model" include the time decoding
    took the cores from it; the CPU split says which stage to make cheaper."""
    from . import decode
    from . import index as index_module
    from .index import Index
    from .store import Store

    seen = 0

    def progress(done: int, total: int, failed: int) -> None:
        nonlocal seen
        if tick:
            tick(done - seen)
        seen = done

    spent = {"model": 0.0, "store": 0.0}

    def timed(function, stage):
        def run(*args, **kwargs):
            began = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[stage] += time.perf_counter() - began
        return run

    # the decode workers' CPU: summed per call from the thread's own clock (threads), or the worker
    # processes' CPU (cpu_seconds' children part), which is decoding only
    decode_cpu = [0.0]
    prepare, lock = index_module._prepare_file, threading.Lock()

    def timed_prepare(*args):
        began = time.thread_time()
        try:
            return prepare(*args)
        finally:
            spent_here = time.thread_time() - began
            with lock:
                decode_cpu[0] += spent_here

    processes = decode.use_processes(embedder, len(paths), workers or os.cpu_count() or 1)
    embed, commit, own = embedder.embed, Store.commit, "embed" in vars(embedder)
    embedder.embed, Store.commit = timed(embed, "model"), timed(commit, "store")
    if not processes:  # a closure cannot be sent to worker processes
        index_module._prepare_file = timed_prepare
    try:
        with Index.open(root, create=True, embedder=embedder) as index:
            start, cpu_start, children_start = time.perf_counter(), cpu_seconds(), _children_cpu()
            # a GPU embedder names the batch it wants (256); CPU backends run best at the CLI's 32
            summary = index.add([str(p) for p in paths], progress=progress, workers=workers,
                                batch_size=getattr(embedder, "batch", 32))
            seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
            if processes:
                decode_cpu[0] = _children_cpu() - children_start
    finally:
        if own:
            embedder.embed = embed
        else:
            del embedder.embed  # the class's method again
        Store.commit = commit
        index_module._prepare_file = prepare
    embedded = summary.added - summary.identical
    stages = {"seconds": round(seconds, 3), "model_s": round(spent["model"], 3), "store_s": round(spent["store"], 3),
              "decode_wait_s": round(seconds - spent["model"] - spent["store"], 3),
              "decode": "processes" if processes else "threads",
              "decode_cpu_ms_per_file": round(decode_cpu[0] / max(1, len(paths)) * 1000, 2),
              "model_cpu_ms_per_image": round((cpu - decode_cpu[0]) / max(1, embedded) * 1000, 2)}
    return embedded / seconds, cpu / max(1, embedded) * 1000, root, stages


def _children_cpu() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return children.ru_utime + children.ru_stime


def cpu_seconds() -> float:
    """CPU seconds used so far by this process (all threads) and by its child processes that have ended
    and been waited for. Index.add's decode stage in worker processes (neardup.decode) joins them
    before add returns, so the difference of two readings around add counts their decoding too; a
    child still running is not counted (RUSAGE_CHILDREN only has reaped children)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def queries(root: Path, vectors: np.ndarray, n: int, tick: Callable[[int], None] | None = None) -> dict:
    """ms per query through Index.query_vector, exact and LSH, on n query vectors (the given vectors,
    each slightly perturbed: near-duplicates of indexed images), and LSH's recall@10 against exact."""
    from .index import Index

    rng = np.random.default_rng(0)
    picks = vectors[rng.integers(0, len(vectors), n)]
    noisy = picks + rng.normal(0, 0.01, picks.shape).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    result = {"count": n}
    found = {}
    with Index.open(root) as index:
        result["index_size"] = index.stats()["images"]
        for exact in (True, False):
            index.query_vector(noisy[0], QUERY_K, exact=exact)  # builds the tables once, outside the timing
            start = time.perf_counter()
            found[exact] = [[m.id for m in index.query_vector(q, QUERY_K, exact=exact)] for q in noisy]
            result["exact_ms" if exact else "lsh_ms"] = round((time.perf_counter() - start) / n * 1000, 4)
            if tick:
                tick(n)
    hits = sum(len(set(a) & set(b)) for a, b in zip(found[True], found[False]))
    result["lsh_recall_at_10"] = round(hits / max(1, sum(len(a) for a in found[True])), 4)
    return result


# ---- the whole experiment ------------------------------------------------------------------------------


def run(*, n: int = 1000, images: Path | None = None, backends: Sequence[str] = ("torch", "onnx", "onnx-int8"),
        workers: int | None = None, threads: int | None = None, n_queries: int = 1000, console=None) -> dict:
    """Run every measurement and return the figures (schema: neardup.schemas.BENCH)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from .models import describe_embedder, load_embedder
    from .models.onnx_backend import BackendError, int8_report

    columns = (TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("ETA"), TimeRemainingColumn(), TimeElapsedColumn())
    with tempfile.TemporaryDirectory(prefix="neardup-bench-") as work, \
            Progress(*columns, console=console, transient=True, disable=console is None) as bar:
        work = Path(work)

        def stage(description: str, total: int):
            task = bar.add_task(description, total=total)
            return lambda k: bar.advance(task, k)

        if images is None:
            paths = make_images(work / "images", n, progress=stage(f"writing {n} JPEGs {LARGE_SIZE[0]}x{LARGE_SIZE[1]}", n))
            source = f"generated: {LARGE_SIZE[0]}x{LARGE_SIZE[1]} JPEGs from the sample photos"
        else:
            paths = image_files(images, n)
            source = str(images)
        megapixels = _mean_megapixels(paths)
        figures: dict = {"machine": machine(),
                         "images": {"count": len(paths), "source": source, "mean_megapixels": megapixels}}
        macs = model_macs()
        gflops = sgemm_gflops(threads or os.cpu_count() or 1)
        bound = gflops * 1e9 / (2 * macs)
        figures["flops"] = {"macs_per_image": macs, "sgemm_gflops": round(gflops, 2),
                            "threads": threads or os.cpu_count() or 1, "bound_images_per_s": round(bound, 1)}
        seed = seed_style(paths, stage(f"seed-style: {SEED_BACKEND}", len(paths)))
        figures["seed_style"] = seed
        pool = _preprocessed(paths[:64])
        rows, query_root, query_vectors = [], None, None
        for backend in backends:
            row = {"backend": backend, "available": True, "error": None}
            try:
                embedder = load_embedder(backend, threads=threads)
            except BackendError as exc:
                row.update(available=False, error=str(exc))
                rows.append(row)
                continue
            row["providers"] = list(getattr(embedder, "providers", None) or [str(getattr(embedder, "device", "cpu"))])
            model_rate = model_only(embedder, pool, len(paths), tick=stage(f"model only: {backend}", len(paths)))
            index_rate, cpu_ms, root, stages = index_run(embedder, paths, work / f"index-{backend}", workers,
                                         stage(f"end to end (Index.add): {backend}", len(paths)))
            row.update(model_images_per_s=round(model_rate, 2),
                       model_ratio=round(model_rate / seed["model_images_per_s"], 2),
                       model_fraction_of_bound=round(model_rate / bound, 3),
                       index_images_per_s=round(index_rate, 2),
                       index_ratio=round(index_rate / seed["images_per_s"], 2),
                       index_cpu_ms_per_image=round(cpu_ms, 2), index_stages=stages)
            row["choice"] = describe_embedder(embedder)
            if backend == "onnx-int8":
                row["int8_guard"] = int8_report(embedder.path)
            if getattr(embedder, "backend", None) == "openvino":
                row["openvino_guard"] = _openvino_guard(embedder, pool)
            rows.append(row)
            if query_root is None:
                query_root, query_vectors = root, embedder.embed(pool)
        figures["backends"] = rows
        figures["queries"] = (queries(query_root, query_vectors, n_queries, stage("queries: exact, LSH", 2 * n_queries))
                              if query_root is not None and n_queries else None)
    return figures


def _openvino_guard(embedder, pool: np.ndarray) -> dict:
    """The OpenVINO embedder's guard report (auto's cached one, else measured now), and its cosine to fp32
    ONNX on the bench's own images (mean and worst)."""
    from .models import onnx_backend as ob
    from .models import openvino_backend as ovb

    fp32 = ob.OnnxEmbedder()
    choice = getattr(embedder, "choice", None) or {}
    report = dict((choice.get("guards") or {}).get(embedder.precision) or ovb.guard(fp32, embedder))
    cosines = np.sum(fp32.embed(pool) * embedder.embed(pool), axis=1)
    report["bench_images"] = len(pool)
    report["bench_mean_cosine"] = round(float(cosines.mean()), 6)
    report["bench_min_cosine"] = round(float(cosines.min()), 6)
    return report


def _preprocessed(paths: Sequence[Path]) -> np.ndarray:
    """uint8 model inputs [n, 224, 224, 3] of the files, as the decode stage gives them."""
    from .images import load_image
    from .models.default_model import INPUT_SIZE, model_pixels

    return np.stack([model_pixels(load_image(p, min_side=INPUT_SIZE).image) for p in paths])


def _mean_megapixels(paths: Sequence[Path]) -> float:
    from PIL import Image

    sizes = []
    for path in paths[:200]:
        with Image.open(path) as image:
            sizes.append(image.width * image.height)
    return round(float(np.mean(sizes)) / 1e6, 2)


def table(figures: dict):
    """The figures as a rich Table."""
    from rich.table import Table

    seed = figures["seed_style"]
    flops = figures["flops"]
    images = figures["images"]
    title = (f"{images['count']} images ({images['mean_megapixels']} MP) on {figures['machine']['cpu']}, "
             f"{figures['machine']['cores']} cores" + (f", {figures['machine']['gpu']}" if figures["machine"]["gpu"] else ""))
    t = Table(title=title)
    for column in ("path", "model img/s", "× seed", "of bound", "end-to-end img/s", "× seed"):
        t.add_column(column, justify="left" if column == "path" else "right", no_wrap=True)
    t.add_row("seed-style", f"{seed['model_images_per_s']:.1f}", "1.0",
              f"{seed['model_images_per_s'] / flops['bound_images_per_s']:.0%}", f"{seed['images_per_s']:.1f}", "1.0")
    for row in figures["backends"]:
        if not row["available"]:
            t.add_row(row["backend"], "—", "—", "—", "—", "—")
            continue
        label = row["backend"] + ("" if row["providers"] == ["CPUExecutionProvider"] else f" [{row['providers'][0]}]")
        t.add_row(label, f"{row['model_images_per_s']:.1f}", f"{row['model_ratio']:.1f}",
                  f"{row['model_fraction_of_bound']:.0%}", f"{row['index_images_per_s']:.1f}", f"{row['index_ratio']:.1f}")
    return t


def summary_lines(figures: dict) -> list[str]:
    flops = figures["flops"]
    bound = (f"FLOPs bound: {flops['macs_per_image'] / 1e6:.0f} M multiply-adds per image at the measured "
             f"sgemm rate {flops['sgemm_gflops']:.0f} GFLOP/s ({flops['threads']} threads) = "
             f"{flops['bound_images_per_s']:.0f} images/s")
    seed = (f"seed-style: {SEED_BACKEND}, full-size decode, one image at a time (the seed's predict loop); "
            "end to end = Index.add: threaded draft decoding overlapped with batched inference, stored")
    lines = [seed, bound]
    if figures["machine"].get("auto"):
        lines.append(f"auto here: {figures['machine']['auto']}")
    cores = figures["machine"]["cores"]
    for row in figures["backends"]:
        if not row["available"]:
            lines.append(f"{row['backend']}: not available: {row['error']}")
            continue
        cpu = row["index_cpu_ms_per_image"]
        stages = row.get("index_stages") or {}
        lines.append(f"{row['backend']}: end to end {cpu:.1f} ms of CPU per image (all threads and decode "
                     "processes), so at most "
                     f"{cores * 1000 / cpu:.0f} images/s on {cores} idle cores"
                     + (f"; of {stages['seconds']:.1f} s the indexing thread spent {stages['model_s']:.1f} s in the model, "
                        f"{stages['store_s']:.1f} s storing, {stages['decode_wait_s']:.1f} s waiting for decoded files"
                        if stages else "")
                     + (f"; CPU: decoding {stages['decode_cpu_ms_per_file']:.1f} ms per file ({stages['decode']}), "
                        f"model and the rest {stages['model_cpu_ms_per_image']:.1f} ms per image"
                        if "decode_cpu_ms_per_file" in stages else ""))
        if row.get("choice"):
            lines.append(f"{row['backend']}: runs {row['choice']}")
        if "openvino_guard" in row:
            g = row["openvino_guard"]
            lines.append(f"OpenVINO guard: cosine to fp32 mean {g['mean_cosine']:.4f}, worst {g['min_cosine']:.4f} over "
                         f"{g['images']} images, textureless worst {g.get('extra_min_cosine', float('nan')):.4f}, "
                         f"{g['top1_changed']} nearest originals changed; on the bench images mean "
                         f"{g['bench_mean_cosine']:.4f}, worst {g['bench_min_cosine']:.4f}")
        if "int8_guard" in row:
            g = row["int8_guard"]
            lines.append(f"int8 guard: mean cosine to fp32 {g['mean_cosine']:.4f} (min {g['min_cosine']:.4f}) over "
                         f"{g['images']} images, {g['top1_changed']} nearest originals changed")
    q = figures.get("queries")
    if q:
        lines.append(f"queries ({q['count']} on {q['index_size']} images, k={QUERY_K}): exact {q['exact_ms']:.3f} ms, "
                     f"LSH {q['lsh_ms']:.3f} ms, LSH recall@10 {q['lsh_recall_at_10']:.3f}")
    return lines
