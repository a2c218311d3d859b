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
    #: set by a command that wrote nothing and holds nothing open (the dry run): `main` then ends the process
    #: without the interpreter's teardown
    skip_teardown = False


state = State()

#: `--offline` on the commands that may download, so that it works after the command name too
OFFLINE = typer.Option(False, "--offline", metavar="", help="Never download (the same as 'dd2 --offline ...', "
                       "DD2_OFFLINE=1 or HF_HUB_OFFLINE=1): local and cached files only.")


def go_offline(offline: bool) -> None:
    """A command's own `--offline`; the `dd2` callback clears the flag when the command ends."""
    if offline:
        from .downloads import set_offline

        set_offline(True)


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


def set_threads(ctx: typer.Context, threads: int) -> int:
    """`--threads`, the policy of every command: -1 = one per idle core, 0 = torch's default, N = N.

    The count holds until the command ends and the caller's comes back then (`torch_threads` on the command's
    context), so an in-process caller (a test, a notebook) keeps its own; what -1 chose is said on stderr, as
    `dd2 distill` does. Returns the count (0: torch's default left alone).
    """
    if threads < -1:
        raise typer.BadParameter(f"--threads must be -1 (one per idle core), 0 (torch's default) or a count >= 1, "
                                 f"got {threads}.")
    from .engine.runtime import resolve_threads, torch_threads  # (torch: when a command runs, not at start-up)

    count = resolve_threads(threads)
    if threads < 0:
        say(f"{count} torch thread(s): one per idle core (--threads -1)", style="dim")
    ctx.with_resource(torch_threads(count))
    return count


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

    `transient` bars disappear when done (feature passes). Where stderr is not a terminal (a log file, a pipe, a
    batch job) a bar would only leave control codes, so the same facts come as plain lines instead: at the start,
    every tenth of the task, at least once a minute, and at the end.
    """

    #: the longest silence between two plain progress lines, in seconds
    LINE_EVERY_S = 60.0

    def __init__(self, transient: bool = False, console: Console | None = None) -> None:
        self._console = console or err_console
        self._transient = transient
        self._p = None
        self._task = None
        self._unit = ""
        self._t0 = 0.0
        self._done = 0
        # plain-line mode
        self._plain = False
        self._description, self._total, self._completed, self._start_completed = "", 0, 0, 0
        self._last_line_t, self._last_line_completed = 0.0, -1
        self._metrics: Mapping[str, float] = {}

    def start(self, description: str, total: int, completed: int = 0, unit: str = "") -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.stop()
        self._unit = unit or "images"
        self._t0, self._done = time.perf_counter(), 0
        if not self._console.is_terminal:
            self._plain = True
            self._description, self._total = description, total
            self._completed = self._start_completed = completed
            self._metrics = {}
            self._line(force=True)
            return
        self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[metrics]}"), TextColumn("{task.fields[rate]}"),
                           TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self._console,
                           transient=self._transient)
        self._p.start()
        self._task = self._p.add_task(escape(description), total=total, completed=completed, metrics="", rate="")

    def advance(self, count: int = 1) -> None:
        self._done += count
        if self._plain:
            self._completed += count
            self._line()
            return
        if self._p is None:
            return
        rate = self._done / max(time.perf_counter() - self._t0, 1e-9)
        self._p.update(self._task, advance=count, rate=f"{rate:.1f} {self._unit}/s")

    def update(self, completed: int, metrics: Optional[Mapping[str, float]] = None) -> None:
        metrics = metrics or {}
        if self._plain:
            self._completed, self._metrics = completed, metrics
            self._line()
            return
        if self._p is None:
            return
        shown = "  ".join(f"{k[5:]} {v:.4g}" for k, v in metrics.items() if k.startswith("loss_"))
        rate = f"{metrics['it_s']:.2f} it/s" if "it_s" in metrics else ""
        self._p.update(self._task, completed=completed, metrics=shown, rate=rate)

    def _line(self, force: bool = False) -> None:
        """One plain progress line, when a tenth of the task has passed, a minute has, or the task is done."""
        now = time.perf_counter()
        step = max(1, self._total // 10)
        due = (self._completed // step > self._last_line_completed // step or self._completed >= self._total
               or now - self._last_line_t >= self.LINE_EVERY_S)
        if not (force or due) or self._completed == self._last_line_completed:
            return
        elapsed = now - self._t0
        parts = [f"{self._description}: {self._completed}/{self._total}"]
        parts += [f"{k[5:]} {v:.4g}" for k, v in self._metrics.items() if k.startswith("loss_")]
        new = self._completed - self._start_completed
        if new > 0 and elapsed > 0:
            rate = new / elapsed
            parts.append(f"{rate:.2f} {'it' if self._unit == 'it' else self._unit}/s")
            left = (self._total - self._completed) / rate
            parts.append(f"elapsed {_clock(elapsed)}, ETA {_clock(left)}")
        self._console.print("  ".join(parts), highlight=False, markup=False, soft_wrap=True)
        self._last_line_t, self._last_line_completed = now, self._completed

    def stop(self) -> None:
        self._plain = False
        if self._p is not None:
            self._p.stop()
            self._p = None

    def message(self, text: str) -> None:
        self._console.print(text, highlight=False, markup=False, soft_wrap=True)


def _clock(seconds: float) -> str:
    """`1:02:03` / `2:03`."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_for(quiet: bool, transient: bool = False) -> RichProgress | None:
    """The display of a command: none under --quiet (the engine then reports nothing)."""
    return None if quiet else RichProgress(transient=transient)
