"""Optional sampling accelerations: bf16 autocast and `torch.compile`.

Both are opt-in (`--precision bf16`, `--compile` on `dd2 sample` and `dd2 eval speed`) because they
change numerics (bf16) or cost minutes of compilation before the first image (compile). bf16 is
refused off CUDA: CPU autocast to bf16 is slower than fp32 on most CPUs and would silently change
the images, so dd2 samples in fp32 there.

`torch.compile` wraps the one-step generator only: the teachers' AR samplers grow their KV cache
every step (a new shape per step), which would recompile at every position.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

from .errors import DD2Error

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
