"""User-facing errors.

A `DD2Error` carries one sentence that says what was wrong and what to do. The CLI prints it
without a traceback and exits non-zero; library callers can catch it.
"""

from __future__ import annotations


class DD2Error(Exception):
    """An error caused by the user's input or environment (not a bug in dd2)."""

    exit_code = 2


class ConfigError(DD2Error):
    """A configuration file or override is invalid."""


class FileFormatError(DD2Error):
    """A file is missing, truncated, corrupted or not in the expected format."""


class CheckpointMismatchError(DD2Error):
    """A checkpoint does not match the architecture it is loaded into."""


class PluginError(DD2Error):
    """A plugin is broken or conflicts with another one."""


class UnknownTeacherError(DD2Error):
    """No installed plugin offers the requested teacher variant."""


class MissingWeightsError(DD2Error):
    """A teacher variant needs weight files that were not found."""


class Interrupted(DD2Error):
    """The user stopped a long command (Ctrl-C); the message says where and how to continue."""

    exit_code = 130  # 128 + SIGINT, as shells report an interrupted program
