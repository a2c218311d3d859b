"""dd2: Distilled Decoding 2 for image auto-regressive models.

This package's top level is everything a teacher plugin needs, and nothing deeper: a plugin writes
`import dd2cli` (or `from dd2cli import ...`) and never imports a submodule. Importing it is cheap (no
torch, no plugin loading): the names that need torch (`Teacher`, `Backbone`, `BundleParts`,
`ModuleRecipe`, `bundle_factory`, `nearest_codebook`, `check_teacher`, `load_digits_dataset`,
`load_generator`) are imported on first use.
The command line is `dd2cli.cli`.
"""

from .config import deep_merge
from .errors import (
    CheckpointMismatchError,
    ConfigError,
    DD2Error,
    DownloadError,
    FileFormatError,
    MissingWeightsError,
    PluginError,
    UnknownTeacherError,
)
from .files import (
    cache_dir,
    check_state_dict,
    expected_shapes,
    fingerprint_file,
    load_foreign_checkpoint,
    load_safetensors,
    load_state_dict_strict,
    read_json,
    save_safetensors,
    sha256_file,
    write_json,
)
from .hookspecs import hookimpl
from .settings import CPU_DEMO_DEFAULTS
from .teachers import Family, SamplingSettings, TeacherSpec, Variant, WeightFile
from .version import __version__

# name -> the module that defines it (imported on first use: these need torch)
_LAZY = {
    "Teacher": "teacher", "Backbone": "teacher", "BundleParts": "teacher", "ModuleRecipe": "teacher",
    "bundle_factory": "teacher", "nearest_codebook": "teacher", "load_generator": "engine.bundle",
    "check_teacher": "testing", "check_sampler": "testing", "load_digits_dataset": "digits",
    "load_digits_classifier": "digits",
}

__all__ = [
    "__version__", "hookimpl",
    # the contract
    "Family", "Variant", "WeightFile", "TeacherSpec", "SamplingSettings", "Teacher", "Backbone", "BundleParts",
    "ModuleRecipe", "bundle_factory", "nearest_codebook", "CPU_DEMO_DEFAULTS", "deep_merge",
    # errors a plugin raises
    "DD2Error", "ConfigError", "FileFormatError", "CheckpointMismatchError", "MissingWeightsError", "DownloadError", "PluginError",
    "UnknownTeacherError",
    # files: safetensors + JSON written atomically, foreign checkpoints read with weights_only=True
    "load_safetensors", "save_safetensors", "read_json", "write_json", "sha256_file", "fingerprint_file",
    "load_foreign_checkpoint", "check_state_dict", "load_state_dict_strict", "cache_dir",
    # checking a plugin's teacher against the contract; the digits of the CPU demo (train / held-out split)
    "check_teacher", "check_sampler", "expected_shapes", "load_digits_dataset", "load_digits_classifier",
    # using a bundle from Python
    "load_generator",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
