"""The `dd2` command line: the app, its global options, and the commands it is made of.

Each command lives in its own module and only parses options and calls the engine; start-up stays
instant (no torch import, no plugin loading until a command runs).
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Optional

import typer

from . import cli_distill, cli_eval, cli_export, cli_sample, cli_teachers
from .cli_common import console, state
from .downloads import set_offline
from .version import __version__

app = typer.Typer(
    name="dd2",
    help="Distilled Decoding 2: distil image auto-regressive models (VAR, LlamaGen, plugins) into one-step "
         "generators, then sample, evaluate and export them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"dd2 {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    version: Optional[bool] = typer.Option(None, "--version", callback=_version_callback, is_eager=True, metavar="",
                                           help="Print the dd2 version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", metavar="", help="Only print results and errors."),
    offline: bool = typer.Option(False, "--offline", metavar="",
                                 help="Never download weight files (also: DD2_OFFLINE=1 or HF_HUB_OFFLINE=1); use "
                                      "local and cached files only."),
) -> None:
    """Global options apply to every command."""
    state.quiet = quiet
    set_offline(offline)
    ctx.call_on_close(lambda: set_offline(False))  # the flag is for this command only (matters when embedded)


app.command("teachers")(cli_teachers.teachers)
app.command("plugins")(cli_teachers.plugins)
app.command("inspect")(cli_teachers.inspect)
app.command("distill")(cli_distill.distill)
app.command("sample")(cli_sample.sample)
app.add_typer(cli_eval.eval_app(), name="eval")
app.command("export")(cli_export.export)


def main() -> None:
    try:
        app(prog_name="dd2")
    except SystemExit as exc:
        if exc.code in (0, None) and state.skip_teardown:
            # Unloading torch's modules at exit takes 1-2 s, a fifth of a dry run's time; it wrote no file, so
            # only the atexit handlers and the streams need to finish.
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
