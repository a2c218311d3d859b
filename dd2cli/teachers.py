"""What a teacher plugin registers: families, variants and the weight files they need.

This module imports no torch, so `dd2 teachers` and `dd2 --help` stay instant. The runtime
contract of a loaded teacher (logits, sampler, decode, backbone) lives in `dd2cli.teacher`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import InitVar, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from .downloads import cached_file, fetch, is_offline
from .errors import MissingWeightsError, PluginError

#: The feature spaces dd2 evaluates samples in (see `Variant.features`).
FEATURE_SPACES = ("inception", "digits")

#: Environment variable naming the folder where official weight files are looked up.
WEIGHTS_DIR_ENV = "DD2_WEIGHTS_DIR"


def default_weights_dir() -> Path:
    """`$DD2_WEIGHTS_DIR`, else `~/.cache/dd2/weights`."""
    env = os.environ.get(WEIGHTS_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "dd2" / "weights"


@dataclass(frozen=True)
class SamplingSettings:
    """How a teacher turns logits into its sampling distribution.

    `cfg` is interpreted in the family's own convention (VAR ramps `(1+t)·cond − t·uncond` with
    `t = cfg·step/(steps−1)`; LlamaGen uses `uncond + cfg·(cond − uncond)`); `cfg <= 0` (VAR) or
    `cfg == 1` (LlamaGen) means no guidance. `top_k = 0` and `top_p = 1.0` switch filtering off.
    `cfg_interval < 0` means guidance at every position (LlamaGen's option; others ignore it).
    """

    cfg: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    cfg_interval: int = -1

    def with_overrides(self, **changes: Any) -> "SamplingSettings":
        """A copy with the non-None entries of `changes` applied."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict[str, Any]:
        return {
            "cfg": self.cfg,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "temperature": self.temperature,
            "cfg_interval": self.cfg_interval,
        }


@dataclass(frozen=True)
class TeacherSpec:
    """Static facts about a teacher (docs/method.md §1).

    `steps[i]` is the AR step of position `i` (non-decreasing, starting at 0). Positions of the
    same step are sampled in parallel given all earlier steps.
    """

    num_tokens: int
    vocab_size: int
    latent_dim: int
    num_classes: int
    null_class: int
    steps: tuple[int, ...]
    image_size: int
    stage1: SamplingSettings = SamplingSettings()
    target: SamplingSettings = SamplingSettings()
    evaluation: SamplingSettings = SamplingSettings()
    #: accepted for plugins written against dd2 0.1 and ignored (dd2 never read it); not stored
    reads_ids: InitVar[bool | None] = None

    def __post_init__(self, reads_ids: bool | None) -> None:
        if reads_ids is not None:
            warnings.warn("TeacherSpec(reads_ids=...) is ignored and will be removed: dd2 never reads it.",
                          DeprecationWarning, stacklevel=3)
        if len(self.steps) != self.num_tokens:
            raise ValueError(f"steps has {len(self.steps)} entries, expected num_tokens={self.num_tokens}")
        if self.steps and self.steps[0] != 0:
            raise ValueError("steps must start at 0")
        if any(b < a or b > a + 1 for a, b in zip(self.steps, self.steps[1:])):
            raise ValueError("steps must be non-decreasing without gaps")

    @property
    def num_steps(self) -> int:
        return (self.steps[-1] + 1) if self.steps else 0

    def step_spans(self) -> list[tuple[int, int]]:
        """`[(begin, end), ...]` token span of every AR step."""
        spans: list[tuple[int, int]] = []
        begin = 0
        for i in range(1, self.num_tokens + 1):
            if i == self.num_tokens or self.steps[i] != self.steps[i - 1]:
                spans.append((begin, i))
                begin = i
        return spans


@dataclass(frozen=True)
class WeightFile:
    """One file a variant needs, e.g. the transformer or the tokenizer checkpoint.

    With `hf_repo` set, a file found nowhere else is downloaded from that Hugging Face hub repository on
    first use (`dd2cli.downloads`) and then found in the hub cache; `sha256` and `size`, when known, are
    checked after the download.
    """

    key: str  # short role name used on the command line: --weights var=PATH
    filename: str  # the official file name, looked up in the weights folder
    description: str = ""
    url: str = ""  # where users download it by hand (shown in the missing-weights message)
    bundled: Path | None = None  # shipped inside the plugin package (no download needed)
    hf_repo: str = ""  # hub repository to download from, e.g. "FoundationVision/var"; "" = never downloaded
    hf_filename: str = ""  # the file's path in that repository ("" = `filename`)
    revision: str = "main"  # branch, tag or commit of the repository
    sha256: str = ""  # hex digest checked after a download ("" = unknown)
    size: int | None = None  # bytes, checked after a download (None = unknown)

    @property
    def hub_filename(self) -> str:
        return self.hf_filename or self.filename

    def hub_cached(self) -> Path | None:
        """The complete copy of this file in the local Hugging Face hub cache, if any (never the network)."""
        if not self.hf_repo:
            return None
        return cached_file(self.hf_repo, self.hub_filename, self.revision)

    def locate(self, explicit: Mapping[str, str | os.PathLike] | None = None,
               weights_dir: Path | None = None, hub_cache: bool = True) -> Path | None:
        """Where this file is: an explicit path, the bundled copy, the weights folder or the hub cache."""
        if explicit and self.key in explicit:
            return Path(explicit[self.key]).expanduser()
        if self.bundled is not None:
            return self.bundled
        candidate = (weights_dir or default_weights_dir()) / self.filename
        if candidate.is_file():
            return candidate
        return self.hub_cached() if hub_cache else None

    def expected_location(self, weights_dir: Path | None = None) -> Path:
        return self.bundled or (weights_dir or default_weights_dir()) / self.filename


@dataclass(frozen=True)
class Variant:
    """A loadable teacher, e.g. `var-d16` or `llamagen-digits`.

    `loader(variant, weight_paths, device)` builds the `Teacher`; plugins import torch inside it,
    never at registration. `distill_defaults` are nested settings (`{"stage2": {"lr": ...}}`)
    applied over the engine's defaults before the user's config file and `--set` overrides.
    """

    name: str
    description: str
    loader: Callable[["Variant", Mapping[str, Path], str], Any]  # returns a dd2cli.teacher.Teacher
    weights: tuple[WeightFile, ...] = ()
    image_size: int = 0
    distill_defaults: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)  # free-form, for the family's loader
    #: the feature space `dd2 eval --features auto` scores this teacher's samples in: "inception" (natural
    #: images, the ADM protocol) or "digits" (the bundled 16-px digits classifier)
    features: str = "inception"
    #: for model cards of exported bundles: the teacher's model-hub id (e.g. "FoundationVision/var") and the
    #: licence of its weights (an SPDX-style id such as "mit"; "" when unknown)
    base_model: str = ""
    license: str = ""
    #: `skeleton(variant)`: the teacher's networks at their initial weights, reading no file (optional). The memory
    #: plan (`dd2 distill --dry-run`) calls it under `torch.device("meta")`, so nothing is allocated and no weights
    #: are needed; without it the plan loads the teacher, which needs its weight files.
    skeleton: Optional[Callable[["Variant"], Any]] = None
    family: str = ""  # filled in by the registry

    def __post_init__(self) -> None:
        if self.features not in FEATURE_SPACES:
            raise ValueError(f"Variant '{self.name}': features must be one of {', '.join(FEATURE_SPACES)}, "
                             f"not '{self.features}'.")

    def locate_weights(self, explicit: Mapping[str, str | os.PathLike] | None = None,
                       weights_dir: Path | None = None) -> dict[str, Path | None]:
        return {w.key: w.locate(explicit, weights_dir) for w in self.weights}

    def load(self, weights: Mapping[str, str | os.PathLike] | None = None, device: str = "cpu",
             weights_dir: Path | None = None) -> Any:
        """Find the weight files and build the teacher; missing files are a `MissingWeightsError`.

        Missing files that all have hub coordinates are downloaded first unless offline (`dd2cli.downloads`);
        a failed download is a `DownloadError`.

        A teacher whose `spec.image_size` differs from this variant's `image_size` (when set) is a `PluginError`.
        """
        unknown = set(weights or {}) - {w.key for w in self.weights}
        if unknown:
            valid = ", ".join(w.key for w in self.weights) or "none"
            raise MissingWeightsError(
                f"Teacher '{self.name}' has no weight file called '{sorted(unknown)[0]}'; "
                f"valid names: {valid}."
            )
        found = self.locate_weights(weights, weights_dir)
        missing = [w for w in self.weights if found[w.key] is None or not found[w.key].is_file()]
        downloadable = [w for w in missing if w.hf_repo and w.key not in (weights or {})]
        if missing and len(downloadable) == len(missing) and not is_offline():
            for w in downloadable:  # official files: fetched from the hub on first use
                found[w.key] = fetch(w, self.name)
            missing = []
        if missing:  # every missing file in one message: the user fetches them all at once
            folder = weights_dir or default_weights_dir()
            files = [f"{w.filename} ({w.description or w.key}) at {found[w.key] or w.expected_location(weights_dir)}"
                     + (f" (download: {w.url})" if w.url else "") for w in missing]
            options = " ".join(f"--weights {w.key}=PATH" for w in missing)
            needs = files[0] if len(files) == 1 else f"{len(files)} weight files: " + ", ".join(files)
            raise MissingWeightsError(
                f"Teacher '{self.name}' needs {needs}; pass {options} or put {'it' if len(files) == 1 else 'them'} "
                f"in {folder} (set ${WEIGHTS_DIR_ENV} to change that folder)."
            )
        teacher = self.loader(self, {k: p for k, p in found.items() if p is not None}, device)
        size = getattr(getattr(teacher, "spec", None), "image_size", None)
        if self.image_size and isinstance(size, int) and size != self.image_size:
            raise PluginError(
                f"Teacher '{self.name}' is registered with image_size {self.image_size} but its loader built a "
                f"teacher whose spec.image_size is {size}; the plugin must make Variant.image_size and "
                f"TeacherSpec.image_size agree."
            )
        return teacher


@dataclass(frozen=True)
class Family:
    """A teacher family (one plugin may register several)."""

    name: str
    description: str
    variants: tuple[Variant, ...]
    #: the `"module:function"` names of the plugin's `@bundle_factory` functions (what its teachers'
    #: `bundle_parts` name): loading a bundle of this family calls these and nothing else a file names
    bundle_factories: tuple[str, ...] = ()
    plugin: str = ""  # filled in by the registry: the plugin that registered it
