"""Reading what the CLI printed: typer draws usage errors in a box that wraps at the terminal width."""

import re

_BOX = re.compile(r"[│╭╮╰╯─]+")


def plain(output: str) -> str:
    """The text of `output` with the box drawing removed and every run of whitespace made one space."""
    return " ".join(_BOX.sub(" ", output).split())
