"""The one progress protocol of the engine.

Long work (a training stage, a sample set, a feature pass, an export) reports through a `Progress`:
`start` a task, then either `advance` it by a count (images) or `update` it to a step with its
metrics (training), `stop` it, and `message` a line in between. The base class does nothing, so the
engine runs silently when nobody listens; the command line plugs in a rich display
(`dd2cli.cli_common.RichProgress`) that writes to stderr.
"""

from __future__ import annotations

from typing import Mapping, Optional


class Progress:
    """No-op progress sink; subclasses display it."""

    def start(self, description: str, total: int, completed: int = 0, unit: str = "") -> None:
        """A task of `total` units begins, `completed` of them already done (a resumed run)."""

    def advance(self, count: int = 1) -> None:
        """`count` more units are done."""

    def update(self, completed: int, metrics: Optional[Mapping[str, float]] = None) -> None:
        """The task reached `completed` units; `metrics` are the latest numbers worth showing (losses, it/s)."""

    def stop(self) -> None:
        """The task ended (or was interrupted)."""

    def message(self, text: str) -> None:
        """One line of information for a person."""
