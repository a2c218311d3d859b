"""What every `dd2` command shares: consoles, global options, error handling, option parsing, progress.

Results go to stdout (`console`); progress, messages and errors go to stderr (`err_console`), so
`dd2 ... --json > file` captures JSON only. Nothing here imports torch at import time.
"""

from __future__ import annotations

import functools
import time
from enum import Enum
from typing import Callable, Mapping, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .errors import WRITE_ERRNOS, DD2Error, Interrupted, write_failure

console = Console()
err_console = Console(stderr=True)


class State:
    """Global options (set by the `dd2` callback before any command runs)."""

    quiet = False


state = State()


def show(text: str) -> None:
    """A result line on stdout; `text` is plain text (paths may hold brackets), never markup."""
    console.print(text, highlight=False, markup=False, soft_wrap=True)


def say(text: str, style: str | None = None) -> None:
    """A line for a person on stderr, unless --quiet; `text` is plain text, never markup."""
    if not state.quiet:
        err_console.print(text, style=style, highlight=False, markup=False, soft_wrap=True)


def handle_errors(fn: Callable) -> Callable:
    """A `DD2Error` becomes one red sentence on stderr and its exit code; Ctrl-C one line and exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Interrupted as exc:  # not an error: the user asked for it
            err_console.print(str(exc), highlight=False, markup=False, soft_wrap=True)
            raise typer.Exit(code=exc.exit_code) from None
        except DD2Error as exc:
            err_console.print(f"[bold red]Error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("Interrupted.", highlight=False)
            raise typer.Exit(code=130) from None
        except OSError as exc:  # a write the engine did not wrap itself (disk full, read-only, permissions)
            if exc.errno not in WRITE_ERRNOS:
                raise
            message = write_failure(exc.filename or "a file", exc)
            err_console.print(f"[bold red]Error:[/bold red] {escape(str(message))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=message.exit_code) from None

    return wrapper


def parse_weights(items: list[str]) -> dict[str, str]:
    """`--weights KEY=PATH` (repeatable) as a dict."""
    out = {}
    for item in items:
        if "=" not in item:
            raise DD2Error(f"--weights '{item}' is not of the form KEY=PATH (e.g. --weights var=var_d16.pth).")
        key, path = item.split("=", 1)
        out[key.strip()] = path.strip()
    return out


def set_threads(threads: int) -> None:
    """`--threads N`: N torch threads for this process (0 keeps torch's default)."""
    if threads < 0:
        raise typer.BadParameter(f"--threads must be >= 0 (0 = torch's default), got {threads}.")
    if threads:
        import torch

        torch.set_num_threads(threads)


# ---- choices: `--help` lists them, typer refuses anything else ------------------------------------------

class GeneratorWeights(str, Enum):
    ema = "ema"
    raw = "raw"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class Stage(str, Enum):
    one = "1"
    two = "2"
    all = "all"


class Baseline(str, Enum):
    set_prediction = "set-prediction"


class Features(str, Enum):
    auto = "auto"
    inception = "inception"
    digits = "digits"


class Resize(str, Enum):
    adm = "adm"
    antialias = "antialias"


class DType(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class ExportFormat(str, Enum):
    safetensors = "safetensors"
    pt2 = "pt2"


# ---- the one rich progress display ---------------------------------------------------------------------

class RichProgress:
    """A live bar on stderr for any engine task: done/total, the latest losses, a rate, elapsed time, ETA.

    `transient` bars disappear when done (feature passes); a display that is not a terminal (a log file,
    a pipe) gets no bar, only the messages.
    """

    def __init__(self, transient: bool = False, console: Console | None = None) -> None:
        self._console = console or err_console
        self._transient = transient
        self._p = None
        self._task = None
        self._unit = ""
        self._t0 = 0.0
        self._done = 0

    def start(self, description: str, total: int, completed: int = 0, unit: str = "") -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.stop()
        if not self._console.is_terminal:
            return
        self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[metrics]}"), TextColumn("{task.fields[rate]}"),
                           TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self._console,
                           transient=self._transient)
        self._p.start()
        self._task = self._p.add_task(escape(description), total=total, completed=completed, metrics="", rate="")
        self._unit = unit or "images"
        self._t0, self._done = time.perf_counter(), 0

    def advance(self, count: int = 1) -> None:
        if self._p is None:
            return
        self._done += count
        rate = self._done / max(time.perf_counter() - self._t0, 1e-9)
        self._p.update(self._task, advance=count, rate=f"{rate:.1f} {self._unit}/s")

    def update(self, completed: int, metrics: Optional[Mapping[str, float]] = None) -> None:
        if self._p is None:
            return
        metrics = metrics or {}
        shown = "  ".join(f"{k[5:]} {v:.4g}" for k, v in metrics.items() if k.startswith("loss_"))
        rate = f"{metrics['it_s']:.2f} it/s" if "it_s" in metrics else ""
        self._p.update(self._task, completed=completed, metrics=shown, rate=rate)

    def stop(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None

    def message(self, text: str) -> None:
        self._console.print(text, highlight=False, markup=False, soft_wrap=True)


def progress_for(quiet: bool, transient: bool = False) -> RichProgress | None:
    """The display of a command: none under --quiet (the engine then reports nothing)."""
    return None if quiet else RichProgress(transient=transient)
