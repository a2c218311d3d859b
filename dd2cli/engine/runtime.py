"""Where and how the engine computes: the device, the torch thread count, bf16 autocast and `torch.compile`.

`threads = -1` picks one torch thread per idle core at start; 0 leaves torch's default and N means N, the same on
every command (`--threads` of `dd2 sample` and `dd2 eval`, default -1; the `threads` setting of `dd2 distill`,
whose default is the teacher's: -1 for the digits demo teachers, else 0). The count is not neutral: CPU
kernels (matmuls, reductions) split their float sums by thread, and PyTorch has no switch that makes the result
independent of the split (deterministic algorithms fix the algorithm, not the split), so a distillation with
another count ends at slightly different weights. A run therefore records the count it used in config.json and
`--resume` keeps it (`engine.distill`).

Precision and compilation are opt-in (`--precision bf16`, `--compile` on `dd2 sample` and `dd2 eval speed`)
because they change numerics (bf16) or cost minutes of compilation before the first image (compile). bf16 is
refused off CUDA: CPU autocast to bf16 is slower than fp32 on most CPUs and would silently change the images.
`torch.compile` wraps the one-step generator only: the teachers' AR samplers grow their KV cache every step (a
new shape per step), which would recompile at every position.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch

from ..errors import DD2Error


def resolve_device(name: str) -> str:
    """`auto` (CUDA when there is one, else the CPU), `cpu`, `cuda` or `cuda:N`, checked against this machine."""
    name = str(name).strip()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise DD2Error(f"Unknown device '{name}'; use auto, cpu, cuda or cuda:N.")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DD2Error(f"Device '{name}' was requested but CUDA is not available; use --device cpu.")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise DD2Error(f"Device '{name}' does not exist: this machine has {torch.cuda.device_count()} CUDA "
                           f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    return name


def _idle_cores(cpus: set[int], interval: float = 0.3) -> float | None:
    """How many of `cpus` sat idle over the next `interval` seconds (from /proc/stat), or None.

    Per-CPU lines, so that a container or VM counts its own CPUs, not the host's; time stolen by
    the hypervisor counts as busy (another tenant holds the core).
    """
    def snapshot() -> dict[str, tuple[int, int]]:
        out = {}
        with open("/proc/stat") as fh:
            for line in fh:
                name, *vals = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    v = [int(x) for x in vals[:8]]  # user nice system idle iowait irq softirq steal
                    out[name] = (v[3] + v[4], sum(v))
        return out

    try:
        before = snapshot()
        time.sleep(interval)
        after = snapshot()
    except (OSError, ValueError, IndexError):
        return None
    idle = 0.0
    for name, (idle0, total0) in before.items():
        idle1, total1 = after.get(name, (idle0, total0))
        idle += (idle1 - idle0) / (total1 - total0) if total1 > total0 else 1.0
    return idle if before else None


def resolve_threads(threads: int) -> int:
    """The `threads` setting as a torch thread count; 0 leaves torch's default.

    -1 (auto) is one thread per core that is idle at start, measured over 0.3 s (the 1-minute load
    average where /proc/stat is missing), shared between the processes torchrun starts on this
    machine (they all look at the same idle cores at once), at least 1. On a CPU, the small models
    of the digits demo run about 1.7x faster on two idle cores than on one, but much slower when a
    thread has to wait for a core another job holds.
    """
    if threads >= 0:
        return threads
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    idle = _idle_cores(cpus)
    if idle is None:
        try:
            idle = len(cpus) - os.getloadavg()[0]
        except (AttributeError, OSError):  # neither: assume the machine is ours
            idle = len(cpus)
    local_procs = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(len(cpus), int(idle / local_procs + 0.5)))


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with `threads` torch threads (0: leave the count), then restore the caller's count.

    Restoring matters for in-process callers (tests, notebooks), which keep their own count.
    """
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str, device: str) -> None:
    """Refuse an unknown precision, and bf16 anywhere but CUDA, with one sentence."""
    if precision not in PRECISIONS:
        raise DD2Error(f"--precision '{precision}' is not one of {', '.join(PRECISIONS)}.")
    if precision == "bf16" and not str(device).startswith("cuda"):
        raise DD2Error(f"--precision bf16 needs a CUDA device (got '{device}'); on CPU dd2 samples in fp32, so drop "
                       f"--precision bf16 or use --device cuda.")


def autocast(precision: str, device: str):
    """bf16 autocast on CUDA for `precision == "bf16"`, else a no-op context (call `check_precision` first)."""
    if precision != "bf16":
        return nullcontext()
    import torch

    return torch.autocast("cuda", dtype=torch.bfloat16)


class _CompiledGenerator:
    """`torch.compile(generator)` that turns a failure of the first (compiling) call into one clear error.

    Compilation is lazy: a missing C++ compiler or an unsupported op only shows when the first batch
    runs, deep inside inductor; the user needs to know it was `--compile` and that dropping it works.
    """

    def __init__(self, generator) -> None:
        import torch

        self.generator = generator
        self._compiled = torch.compile(generator)
        self._checked = False

    def __call__(self, eps_BNd, labels_B):
        if self._checked:
            return self._compiled(eps_BNd, labels_B)
        try:
            out = self._compiled(eps_BNd, labels_B)
        except Exception as exc:  # noqa: BLE001 - anything raised while compiling
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DD2Error(f"--compile failed on this machine ({type(exc).__name__}: {first[:200]}); drop --compile "
                           f"to sample without torch.compile.") from exc
        self._checked = True
        return out

    def __getattr__(self, name):
        # attributes the sampling code reads (eval(), parameters(), ...) come from the eager module
        return getattr(self.generator, name)


def maybe_compile(generator, enabled: bool):
    """The generator itself, or a compiled wrapper of it with a clear error on compile failure."""
    return _CompiledGenerator(generator) if enabled else generator


@contextmanager
def sampling_context(precision: str, device: str):
    """`no_grad` + the precision's autocast: the context every timed or written sample runs in."""
    import torch

    with torch.no_grad(), autocast(precision, device):
        yield
