"""dd2: Distilled Decoding 2 for image auto-regressive models.

Importing this package is cheap (no torch, no plugin loading); see `dd2cli.cli` for the CLI.
"""

from .hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["hookimpl", "load_generator", "__version__"]


def __getattr__(name: str):
    # `dd2cli.load_generator` imports torch only when it is used: `import dd2cli` stays instant
    if name == "load_generator":
        from .export import load_generator

        return load_generator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
