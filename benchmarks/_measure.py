"""Shared helpers for the benchmarks: wall time (median of repeats) and peak memory on CPU or CUDA."""

from __future__ import annotations

import os
import statistics
import threading
import time
from contextlib import contextmanager

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


@contextmanager
def peak_memory(device: str):
    """Yields a dict whose 'peak' is the extra memory (bytes) allocated inside the block.

    CUDA: the allocator's peak. CPU: the resident set size sampled every millisecond by a thread
    (large torch tensors are mmap'd and returned to the OS when freed, so RSS follows them).
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
