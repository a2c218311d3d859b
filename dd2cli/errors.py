"""User-facing errors.

A `DD2Error` carries one sentence that says what was wrong and what to do. The CLI prints it
without a traceback and exits non-zero; library callers can catch it.
"""

from __future__ import annotations

import errno


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


class DownloadError(MissingWeightsError):
    """A weight file could not be downloaded (server unreachable, not found, incomplete or wrong checksum)."""


class OutputError(DD2Error):
    """A file could not be written (disk full, read-only location, no permission)."""

    def __init__(self, message: str, os_error: OSError | None = None) -> None:
        super().__init__(message)
        self.os_error = os_error  # the cause, so that a caller can name what it was writing instead


#: the errors of a write that the user can remedy (disk full, quota, read-only location, permissions)
WRITE_ERRNOS = frozenset((errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM))


def write_failure(path: object, exc: OSError) -> OutputError:
    """One sentence for an `OSError` met while writing `path`, with the remedy for its cause."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        remedy = "free some disk space and run the same command again (finished files are kept)"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        remedy = "choose a writable location (--out) or fix the folder's permissions"
    else:
        remedy = "check the location and run the same command again"
    return OutputError(f"Could not write {path} ({reason}); {remedy}.", exc)


class Interrupted(DD2Error):
    """The user stopped a long command (Ctrl-C); the message says where and how to continue."""

    exit_code = 130  # 128 + SIGINT, as shells report an interrupted program
