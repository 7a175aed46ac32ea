"""The decode stage of indexing: read, hash and decode files into model inputs, in order, in parallel.

Each file goes through the index's own `prepare(path, known, input_size, pixels)` (read, hash, compare
with the catalog, decode, make the model input), so read, hash, record and failure rules are the index's,
whichever workers run it. The workers only compute; the caller commits, so the index's crash safety does
not depend on them.

Workers are processes when the embedder can hand them its pixel recipe (`embedder.model_pixels`, a
picklable function returning uint8 [size, size, 3]: 150 KB to ship back, not 600 KB of float32) and the run
is large enough to pay for starting them; otherwise threads (Pillow and the model release the GIL, but
the border trim, the hashing glue and the conversion of each image hold it, so threads stop scaling at a
few cores: issue 13 measured 339-478 images/s on 16 threads against 1,074 on 16 processes). A worker
process that dies (a decoder crash, the out-of-memory killer) does not stop the run: the pool is started
again and the file it was decoding is retried alone; if it kills its worker again it is recorded as
failed with a reason.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

#: Processes are used from this many cores on (on fewer, threads measured as fast: benchmarks/RESULTS.md).
PROCESS_MIN_CORES = int(os.environ.get("NEARDUP_DECODE_PROCESS_MIN_CORES", "3"))
#: ... and from this many files on: starting a process (Python, numpy, Pillow) costs ~0.3 s.
PROCESS_MIN_FILES = 64
CRASH_REASON = "the decoder crashed on this file (its worker process died)"


def use_processes(embedder, files: int, workers: int) -> bool:
    return (getattr(embedder, "model_pixels", None) is not None and workers >= PROCESS_MIN_CORES
            and files >= PROCESS_MIN_FILES)


def prepare_files(files: Sequence, known: Callable, embedder, prepare: Callable, failed: Callable,
                  workers: int | None = None, lookahead: int = 0, processes: bool | None = None) -> Iterator:
    """Yield prepare(path, known(path), input_size, pixels) for each file, in order. `known(path)` (the
    catalog record) is called here, in the caller's thread; `failed(path, known, reason)` makes the record
    of a file whose worker died twice. `lookahead` files are kept in flight (at least two model batches)
    so the workers never wait for the model. `processes`: None decides (use_processes). When the
    iterator ends (or is closed), the pool is shut down and waited for: worker processes have exited
    and been joined, so their CPU time is in getrusage(RUSAGE_CHILDREN) (`neardup bench` counts it)."""
    workers = workers or os.cpu_count() or 1
    if processes is None:
        processes = use_processes(embedder, len(files), workers)
    pixels = embedder.model_pixels if processes else getattr(embedder, "model_pixels", None) or embedder.preprocess
    size = embedder.input_size
    in_flight = max(4 * workers, lookahead)
    pool = _pool(processes, workers)
    try:
        pending: deque = deque()
        for path in files:
            path = str(path)
            record = known(path)
            pending.append((path, record, _submit(pool, prepare, path, record, size, pixels)))
            if len(pending) >= in_flight:
                result, pool = _result(pending, pool, processes, workers, prepare, failed, size, pixels)
                yield result
        while pending:
            result, pool = _result(pending, pool, processes, workers, prepare, failed, size, pixels)
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # joins the worker processes (reaps them)


def _pool(processes: bool, workers: int) -> Executor:
    if not processes:
        return ThreadPoolExecutor(max_workers=workers)
    # spawn, not fork: the parent runs model threads (ONNX Runtime, torch) that a fork would copy mid-flight
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _submit(pool: Executor, *call) -> Future:
    """pool.submit(*call), or a future holding the error when the pool already broke (a worker died):
    the file is then retried when its turn comes (_result)."""
    try:
        return pool.submit(*call)
    except BrokenProcessPool as exc:
        broken: Future = Future()
        broken.set_exception(exc)
        return broken


def _result(pending: deque, pool: Executor, processes: bool, workers: int, prepare, failed, size, pixels):
    path, record, future = pending.popleft()
    try:
        return future.result(), pool
    except BrokenProcessPool:
        pass
    # a worker died: every unfinished file of the pool is lost with it. Retry this one alone, then
    # resubmit the unfinished others to a new pool.
    pool.shutdown(wait=True, cancel_futures=True)
    alone = _pool(True, 1)
    try:
        result = alone.submit(prepare, path, record, size, pixels).result()
    except BrokenProcessPool:
        result = failed(path, record, CRASH_REASON)
    finally:
        alone.shutdown(wait=True, cancel_futures=True)
    pool = _pool(processes, workers)
    for i, (other, other_record, future) in enumerate(pending):
        if not (future.done() and not future.cancelled() and future.exception() is None):
            pending[i] = (other, other_record, _submit(pool, prepare, other, other_record, size, pixels))
    return result, pool
