"""Shared helpers for the benchmarks: wall time (median of repeats) and peak memory on CPU or CUDA."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import statistics
import threading
import time
from contextlib import contextmanager, nullcontext

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _glibc():
    """glibc through ctypes, or None (another libc: RSS peaks may then read low after the first block)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextmanager
def _memory_returned_to_os():
    """Make freed blocks of 64 KiB and more go back to the OS at once, for the duration of the block.

    glibc keeps freed heap memory for reuse, so after the first measured block the next one's tensors
    fit in memory the process already holds, and its RSS does not grow: the peak would read 0. Served
    by mmap instead, every large tensor is mapped when allocated and unmapped when freed.
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.malloc_trim(0)
    libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    libc.mallopt(_M_TRIM_THRESHOLD, 64 * 1024)
    try:
        yield
    finally:
        # glibc's static defaults (the dynamic threshold adjustment stays off after an explicit set)
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)


@contextmanager
def peak_memory(device: str, return_to_os: bool = False):
    """Yields a dict whose 'peak' is the extra memory (bytes) allocated inside the block.

    CUDA: the allocator's peak. CPU: the resident set size sampled every millisecond by a thread.
    RSS only grows when the process needs more than it already holds, so on CPU only the first
    measured block of a process reads true, unless `return_to_os`: glibc then maps blocks of 64 KiB
    and more separately (see `_memory_returned_to_os`). That leaves malloc's tuning changed for the
    rest of the process, so time everything before the first such block.
    """
    out = {"peak": 0}
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield out
        torch.cuda.synchronize()
        out["peak"] = torch.cuda.max_memory_allocated() - base
        return
    with _memory_returned_to_os() if return_to_os else nullcontext():
        with _rss_peak(out):
            yield out


@contextmanager
def _rss_peak(out: dict):
    base = rss_bytes()
    peak = [base]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.001)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        yield out
    finally:
        stop.set()
        th.join()
        peak[0] = max(peak[0], rss_bytes())
        out["peak"] = peak[0] - base


def time_runs(fn, repeats: int, device: str = "cpu") -> list[float]:
    """Wall seconds of each of `repeats` calls of `fn()` (CUDA work included)."""
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def timeit(fn, repeats: int = 3, warmup: int = 1, device: str = "cpu") -> float:
    """Median wall seconds of `fn()`."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_runs(fn, repeats, device))


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"
