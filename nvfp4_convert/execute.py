"""Execution: turn a plan into shard files, streaming one tensor (and one row band) at a time.

Contract:
- Source files are only ever opened for reading.
- Each shard is written as ``<name>.partial``, fsynced and renamed (``ShardWriter``); the caller
  records each finished shard in the journal (``state.RunState``) so ``--resume`` skips it.
- Within a shard, passthrough copies and conversions run in two threads at fixed file offsets.
- Memory is bounded by one row band of the largest converted tensor (``BAND_BYTES`` of float32)
  and the I/O buffers of ``direct_io``, whatever the number or size of shards. Passthrough tensors
  that are back to back in the source are copied as one run: ``O_DIRECT`` reads and writes
  (``direct=True``) or ``copy_file_range``.
- Shards are independent: ``workers`` processes write them in parallel; the bytes of every shard
  depend only on the plan, never on the number of workers or the order they finish in.
- Block scales of NVFP4 tensors are checked as their bytes stream by, copied or converted: NaN or
  negative stops the run (``formats.nvfp4.check_block_scales``). Decoding is the formats' (``formats.decode_rows``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

from .codecs import FP8_BLOCK, fold_block_scales, mxfp4_to_nvfp4
from .direct_io import Range, ReadAhead
from .errors import ConvertError
from .formats import DENSE, FP8_BLOCK_FORMAT, decode_rows, of_sources
from .formats.nvfp4 import check_block_scales, check_e4m3_codes, is_block_scale
from .mtp import mx_rows
from .plan import OutputTensor, Shard
from .safetensors_io import ShardWriter, TensorInfo, TensorSink, read_tensor

BAND_BYTES = 64 * 1024 * 1024  # float32 bytes of one row band of a converted tensor

Progress = Callable[[int, int], None]  # (bytes written, tensors written) since the last call


@dataclass(frozen=True)
class ShardResult:
    """A finished shard; ``seconds``: where its time went (``PHASES``, thread-seconds: the phases overlap);
    ``cached_bytes``: the copied bytes read from the page cache (``ReadAhead``), not from the disk."""

    file: str
    size: int
    seconds: dict[str, float] = field(default_factory=dict)
    cached_bytes: int = 0


# read: source bytes copied (read-ahead thread); write: bytes into the shard (all threads);
# convert: the conversion thread, its reads included; fsync: commit; wall: the shard, start to rename
PHASES = ("read", "write", "convert", "fsync", "wall")


def band_rows(cols: int, multiple: int = FP8_BLOCK) -> int:
    """Rows per band: a multiple of ``multiple`` holding about ``BAND_BYTES`` of float32."""
    return max(multiple, (BAND_BYTES // max(1, cols * 4)) // multiple * multiple)


class ScaleCheck:
    """``check_block_scales`` for the scale tensors among a run of copied tensors, applied to the
    source bytes as they stream by in chunks (``ShardWriter.copy_run``'s ``inspect``)."""

    def __init__(self, tensors: list[TensorInfo]) -> None:
        self.scales = [t for t in tensors if is_block_scale(t) and t.nbytes]

    def __call__(self, offset: int, view: memoryview) -> None:
        end = offset + len(view)
        for t in self.scales:
            lo, hi = max(t.start, offset), min(t.end, end)
            if lo < hi:
                check_e4m3_codes(np.frombuffer(view, np.uint8, hi - lo, lo - offset), t, first=lo - t.start)


def _bands(rows: int, cols: int) -> Iterator[tuple[int, int]]:
    step = band_rows(cols)
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


def produce(out: OutputTensor, writer: TensorSink, scales: dict[str, list[torch.Tensor]] | None = None) -> None:
    """Write the bytes of a computed ``out`` (any op but ``copy``, see ``copy_run``) through its sink.

    ``scales`` carries FP8 block scales from an ``fp8_weight`` to its ``fp8_scale`` (written next by
    the same thread), so each FP8 tensor is quantized once; without it the scale is recomputed
    (the same bytes: the quantizer is deterministic).
    """
    src = out.sources[0]
    if out.op == "fp8_scale" and scales is not None and out.name in scales:
        for scale in scales.pop(out.name):
            writer.write(scale.to(torch.float8_e8m0fnu))
    elif out.op in ("bf16", "fp8_weight", "fp8_scale"):
        rows, cols = out.shape if out.op != "fp8_scale" else (out.sources[0].shape[0], _logical_cols(out.sources))
        kept: list[torch.Tensor] = []
        for r0, r1 in _bands(rows, cols):
            x = decode_rows(out.sources, r0, r1)
            if out.op == "bf16":
                writer.write(DENSE.encode(x)["weight"])
                continue
            encoded = FP8_BLOCK_FORMAT.encode(x)
            writer.write(encoded["weight" if out.op == "fp8_weight" else "scale"])
            kept.append(encoded["scale"])
        if out.op == "fp8_weight" and scales is not None:
            scales[out.name.removesuffix(".weight") + ".scale"] = kept
    elif out.op in ("mx_nvfp4_weight", "mx_nvfp4_scale"):
        rows, cols = src.shape[0], _logical_cols(out.sources)
        for r0, r1 in _bands(rows, cols):
            encoded = mxfp4_to_nvfp4(*mx_rows(out.sources, r0, r1), int(out.value or 0), name=src.name)
            writer.write(encoded.weight if out.op == "mx_nvfp4_weight" else encoded.weight_scale)
    elif out.op == "fold_scale":
        ws = read_tensor(src)
        check_block_scales(ws, src)
        writer.write(fold_block_scales(ws, float(out.value or 1.0))[0])  # planning refused a lossy fold
    elif out.op == "scalar":
        writer.write(torch.tensor(out.value, dtype=torch.float32).reshape(out.shape))
    elif out.op == "restate":
        fmt, _ = of_sources(out.sources)
        ws = read_tensor(src)
        if is_block_scale(src):
            check_block_scales(ws, src)
        restated = fmt.restate(src.name.rpartition(".")[2], ws, out.shape)
        writer.write(restated if out.value is None else fold_block_scales(restated, float(out.value))[0])
    else:
        raise ValueError(f"unknown op {out.op!r}")


def _logical_cols(sources: tuple[TensorInfo, ...]) -> int:
    fmt, params = of_sources(sources)
    return fmt.logical_shape(params)[1]


def copy_runs(outputs: list[OutputTensor]) -> list[list[OutputTensor]]:
    """Maximal runs of consecutive ``copy`` outputs whose sources are back to back in one file:
    each run is one sequential copy (one read and one write stream, not one per tensor)."""
    runs: list[list[OutputTensor]] = []
    previous: TensorInfo | None = None
    for out in outputs:
        if out.op != "copy":
            previous = None
            continue
        src = out.sources[0]
        if previous is not None and previous.file == src.file and previous.end == src.start:
            runs[-1].append(out)
        else:
            runs.append([out])
        previous = src
    return runs


def copy_run(
    run: list[OutputTensor],
    writer: ShardWriter,
    progress: Progress | None = None,
    chunks: Iterator[tuple[int, memoryview]] | None = None,
) -> None:
    """Copy one run's source bytes unchanged (``chunks``: already being read, see ``ReadAhead``),
    checking the NVFP4 block scales among them."""
    sources = [o.sources[0] for o in run]
    ends = [s.end - sources[0].start for s in sources]  # where each tensor ends, from the run's start
    done = [0, 0]  # bytes, tensors

    def advance(nbytes: int) -> None:
        done[0] += nbytes
        tensors = done[1]
        while done[1] < len(ends) and ends[done[1]] <= done[0]:
            done[1] += 1
        if progress:
            progress(nbytes, done[1] - tensors)

    check = ScaleCheck(sources)
    inspect = check if check.scales else None
    writer.copy_run(
        [o.name for o in run], sources[0].file, sources[0].start, inspect=inspect, progress=advance, chunks=chunks
    )
    if progress and done[1] < len(run):  # zero-byte tensors at the end of the run
        progress(0, len(run) - done[1])


def write_shard(
    shard: Shard,
    dst: Path,
    progress: Progress | None = None,
    *,
    direct: bool = False,
    cached: frozenset[Path] = frozenset(),
    probe_cache: bool = False,
) -> ShardResult:
    """Write one shard atomically; report progress per chunk and tensor.

    Passthrough copies (kernel work) and conversions (torch work) run in two threads, each at its
    tensors' own offsets in the file: the conversion of a layer's attention overlaps the copy of
    its experts. Both release the GIL; the bytes are the same whatever the timing, and whether
    the file is written with ``O_DIRECT`` (``direct``) or through the page cache. With ``direct``,
    a read-ahead thread reads the copied bytes of the whole shard in order, across source files,
    while they are written: through the page cache for the files in ``cached`` (and, with ``probe_cache``, for every
    chunk found there), else ``O_DIRECT``.
    """
    t0 = time.perf_counter()
    final = dst / shard.file
    runs = copy_runs(shard.outputs)
    computed = [o for o in shard.outputs if o.op != "copy"]
    seconds = dict.fromkeys(PHASES, 0.0)
    from_cache = [0]

    def convert_all(writer: ShardWriter) -> None:
        t = time.perf_counter()
        scales: dict[str, list[torch.Tensor]] = {}
        for out in computed:
            produce(out, writer.sink(out.name), scales)
            if progress:
                progress(out.nbytes, 1)
        seconds["convert"] = time.perf_counter() - t

    def copy_all(writer: ShardWriter) -> None:
        if not direct:
            for run in runs:
                copy_run(run, writer, progress)
            return
        ranges = [Range(r[0].sources[0].file, r[0].sources[0].start, sum(o.sources[0].nbytes for o in r)) for r in runs]
        with ReadAhead(ranges, cached=cached, probe_cache=probe_cache) as ahead:
            for i, run in enumerate(runs):
                copy_run(run, writer, progress, ahead.chunks(i))
        seconds["read"] = ahead.read_seconds
        from_cache[0] = ahead.cached_bytes

    try:
        with ShardWriter(final, shard.entries, direct=direct) as writer:
            if computed and runs:
                with ThreadPoolExecutor(1, thread_name_prefix="convert") as pool:
                    background = pool.submit(convert_all, writer)
                    try:
                        copy_all(writer)
                    finally:
                        exc = background.exception()  # wait for it before the writer can abort
                    if exc is not None:
                        raise exc
            else:
                copy_all(writer)
                convert_all(writer)
            writer.commit()
            seconds["fsync"] = writer.fsync_seconds
            seconds["write"] = writer.direct.write_seconds if writer.direct else 0.0
    except OSError as e:
        hint = "; free space and rerun with --resume" if e.errno == errno.ENOSPC else ""
        raise ConvertError(f"cannot write: {e.strerror or e}{hint}", file=final) from e
    seconds["wall"] = time.perf_counter() - t0
    return ShardResult(shard.file, final.stat().st_size, {k: round(v, 3) for k, v in seconds.items()}, from_cache[0])


# --- parallel execution -------------------------------------------------------------------------

_queue = None


def _init_worker(queue: object) -> None:
    global _queue
    _queue = queue
    torch.set_num_threads(1)
    pin_mmap_threshold()


def pin_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """Serve allocations >= 1 MiB with mmap, returned to the OS when freed.

    glibc otherwise raises its mmap threshold after the first large free (up to 32 MiB), and the
    row bands then come from a heap that keeps growing with the number of tensors converted:
    measured here, peak RSS 520 -> 583 MB from a 1-layer to a 4-layer source, flat (446 / 450 MB)
    with the threshold pinned. A no-op where glibc's ``mallopt`` is unavailable.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD; setting it also disables the dynamic adjustment
    except (OSError, AttributeError):
        pass


def _worker_progress(nbytes: int, ntensors: int) -> None:
    _queue.put((nbytes, ntensors))  # type: ignore[attr-defined]


def _write_shard_in_worker(
    shard: Shard, dst: Path, *, direct: bool, cached: frozenset[Path], probe_cache: bool
) -> ShardResult:
    progress = _worker_progress if _queue is not None else None
    return write_shard(shard, dst, progress, direct=direct, cached=cached, probe_cache=probe_cache)


def write_shards(
    shards: list[Shard],
    dst: Path,
    *,
    workers: int = 1,
    direct: bool = False,
    cached: frozenset[Path] = frozenset(),
    probe_cache: bool = False,
    progress: Progress | None = None,
    on_done: Callable[[ShardResult], None] | None = None,
) -> list[ShardResult]:
    """Write ``shards`` with ``workers`` processes (1 = in this process); ``on_done`` per finished
    shard; ``direct``: with ``O_DIRECT`` (see ``direct_io``), reading the source files in
    ``cached`` (and with ``probe_cache`` every chunk found in the page cache) through the page cache."""
    results: list[ShardResult] = []
    pin_mmap_threshold()
    if workers <= 1 or len(shards) <= 1:
        for shard in shards:
            res = write_shard(shard, dst, progress, direct=direct, cached=cached, probe_cache=probe_cache)
            results.append(res)
            if on_done:
                on_done(res)
        return results
    ctx = get_context("spawn")
    with contextlib.ExitStack() as stack:  # the progress queue's manager process ends with the pool
        queue = stack.enter_context(ctx.Manager()).Queue() if progress else None
        pool = stack.enter_context(
            ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(queue,))
        )
        pending = {
            pool.submit(_write_shard_in_worker, s, dst, direct=direct, cached=cached, probe_cache=probe_cache)
            for s in shards
        }
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            _drain(queue, progress)
            for fut in done:
                res = fut.result()  # re-raises a worker's ConvertError here
                results.append(res)
                if on_done:
                    on_done(res)
        _drain(queue, progress)
    return sorted(results, key=lambda r: r.file)


def _drain(queue: object, progress: Progress | None) -> None:
    if queue is None or progress is None:
        return
    while not queue.empty():  # type: ignore[attr-defined]
        progress(*queue.get())  # type: ignore[attr-defined]


def default_workers() -> int:
    """Half the cores (each worker is mostly I/O-bound), at least 1, at most 16."""
    return max(1, min(16, (os.cpu_count() or 2) // 2))
