"""dd2: Distilled Decoding 2 for image auto-regressive models.

Importing this package is cheap (no torch, no plugin loading); see `dd2cli.cli` for the CLI.
"""

from .hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["hookimpl", "__version__"]
