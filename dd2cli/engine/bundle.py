"""Generator bundles: the folder `dd2 export` writes, and loading it back without the run or the teacher.

    bundle.json             marker: {"format": "dd2-generator-bundle", "version": 1, "teacher", "content_sha256"}
    config.json             format version, spec facts, head config, family, backbone/decoder factories + configs,
                            teacher identity, distillation settings, the run's checkpoint step
    generator.safetensors   G_θ (`model.backbone.*`, `model.head.*`), EMA weights by default
    decoder.safetensors     the tokenizer decoder: token ids (B, n) → images (B, 3, H, W) in [0, 1]
    codebook.safetensors    `codebook` (V, d) fp32: the nearest-codebook lookup of the generator's latents
    README.md               model card (`engine.model_card`)
    samples.png             the run's last sample grid (when the run has one)
    generator.pt2           (--format pt2) a torch.export program: labels, noise → uint8 images

A bundle names its teacher family; loading finds the family's plugin through the registry (so
`DD2_LOAD_PLUGINS` applies and an uninstalled family is one sentence naming the package to install) and calls
only `@bundle_factory` functions inside that plugin's package to rebuild the backbone and the decoder.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from safetensors import safe_open
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..errors import CheckpointMismatchError, DD2Error, FileFormatError
from ..files import check_state_dict, load_safetensors, read_json, sha256_file
from ..networks import Generator, build_model
from ..plugins import LOAD_ENV, registry
from ..teacher import nearest_codebook
from ..teachers import Family, SamplingSettings, TeacherSpec
from ..version import __version__

BUNDLE_FORMAT = "dd2-generator-bundle"
#: the newest bundle layout this dd2 writes and reads
BUNDLE_VERSION = 1
MARKER, CONFIG, CARD = "bundle.json", "config.json", "README.md"
GENERATOR, DECODER, CODEBOOK = "generator.safetensors", "decoder.safetensors", "codebook.safetensors"
PT2, SAMPLES = "generator.pt2", "samples.png"
REQUIRED = (CONFIG, GENERATOR, DECODER, CODEBOOK)


class BundleError(FileFormatError):
    """A bundle folder is missing a file, damaged, or needs code that is not installed."""


class BundleVersionError(BundleError):
    """A bundle written by a newer dd2 (a bundle format this version cannot read)."""


def bundle_family(config: Mapping[str, Any]) -> Family:
    """The teacher family that made the bundle, found through the plugin registry by its name alone.

    The registry is the only way in: a family that is not installed, or that `DD2_LOAD_PLUGINS` leaves out, is
    refused here, before anything the bundle names is imported.
    """
    family = config.get("family")
    if not isinstance(family, str) or not family:
        raise BundleError("The bundle's config.json names no teacher family; the file is damaged or was written by "
                          "an older dd2, export the bundle again.")
    reg = registry()
    if family not in reg.families:
        package = config.get("plugin_package")
        remedy = f"pip install {package}" if package else f"install the dd2 plugin package that provides '{family}'"
        excluded = (f" or is left out by {LOAD_ENV}={os.environ[LOAD_ENV]!r}" if os.environ.get(LOAD_ENV) is not None
                    else "")
        raise BundleError(f"The bundle was made from teacher family '{family}', which is not installed{excluded}; "
                          f"{remedy} to load it (see 'dd2 plugins').")
    return reg.families[family]


def _resolve_factory(text: Any, what: str, family: Family) -> Callable[[dict], nn.Module]:
    """The `@bundle_factory` that the bundle names for `what`, if the installed family declares it.

    Only names the family registered (`Family.bundle_factories`) are ever imported: a config.json that names
    anything else, a module shipped inside the bundle folder included, is refused without importing it.
    """
    if not isinstance(text, str) or text not in family.bundle_factories:
        raise BundleError(f"The bundle's {what} factory {text!r} is not one of the bundle factories the installed "
                          f"'{family.name}' plugin declares; the bundle's config.json is damaged or was tampered "
                          f"with, do not load it.")
    module_name, _, fn_name = text.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise BundleError(f"The bundle's {what} needs the Python module '{module_name}' ('{exc.name}' is not "
                          f"installed); reinstall the '{family.name}' plugin.") from None
    fn = getattr(module, fn_name, None)
    if fn is None or not getattr(fn, "__dd2_bundle_factory__", False):
        raise BundleError(f"'{text}' is not a dd2 bundle factory; the installed '{family.name}' plugin declares a "
                          f"function it does not provide or mark with @bundle_factory, report it.")
    return fn


def content_hash(folder: Path) -> str:
    """sha256 over the bundle's files (all but the marker and the model card), as recorded in `bundle.json`."""
    h = hashlib.sha256()
    for name in sorted(n for n in (CONFIG, GENERATOR, DECODER, CODEBOOK, SAMPLES, PT2) if (folder / n).is_file()):
        h.update(name.encode())
        h.update(sha256_file(folder / name).encode())
    return h.hexdigest()


def _check_version(value: Any, file: Path) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BundleError(f"{file} has no valid bundle format version ({value!r}); the file is damaged, export "
                          f"the bundle again.")
    if value > BUNDLE_VERSION:
        raise BundleVersionError(f"{file} was written by a newer dd2 (bundle format version {value}; dd2 "
                                 f"{__version__} reads up to version {BUNDLE_VERSION}); upgrade dd2 to load it.")


def spec_from_config(config: Mapping[str, Any]) -> TeacherSpec:
    """The teacher facts recorded in a bundle's config.json (no teacher needed), checked before any use."""
    s = config.get("spec")
    if not isinstance(s, Mapping):
        raise BundleError("The bundle's config.json has no 'spec' table; the file is damaged, export the bundle again.")
    for key, low in (("num_tokens", 1), ("vocab_size", 1), ("latent_dim", 1), ("num_classes", 1), ("null_class", 0),
                     ("image_size", 1)):
        value = s.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise BundleError(f"The bundle's config.json has spec.{key} = {value!r}, not a whole number >= {low}; "
                              f"the file is damaged or crafted, export the bundle again.")
    steps = s.get("steps")
    if not isinstance(steps, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in steps):
        raise BundleError("The bundle's config.json has no list of whole numbers in spec.steps; the file is damaged "
                          "or crafted, export the bundle again.")
    sampling = s.get("sampling") or {}
    return TeacherSpec(
        num_tokens=s["num_tokens"], vocab_size=s["vocab_size"], latent_dim=s["latent_dim"],
        num_classes=s["num_classes"], null_class=s["null_class"], steps=tuple(steps),
        image_size=s["image_size"],
        **{k: SamplingSettings(**sampling[k]) for k in ("stage1", "target", "evaluation") if k in sampling},
    )


def _stored_numel(*files: Path) -> int:
    """How many values the safetensors files hold, read from their headers (no tensor is loaded)."""
    total = 0
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as fh:
                total += sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())
        except Exception as exc:  # (safetensors raises its own error types for a damaged header)
            raise FileFormatError(f"{file} is not a readable safetensors file ({type(exc).__name__}): it is truncated or "
                                  f"corrupted, export the bundle again.") from None
    return total


class _SkipInit(TorchFunctionMode):
    """Inside: the random initialisers of `torch.nn.init` leave their tensor as it is, and tensor creation stays
    within `budget` values.

    The bundle assigns every weight, so drawing them first is wasted work: a module built on the CPU
    inside this mode costs an allocation of untouched memory and nothing else. (The meta device is
    no cheaper: its reference kernels import torch._dynamo, 2.5 s of a cold start.) The budget bounds what a
    config.json can make dd2 allocate by the weights the bundle actually ships: a crafted width or depth stops
    with one sentence before the memory is taken, instead of exhausting it or running for minutes.
    """

    _SKIPPED = frozenset((torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.kaiming_uniform_,
                          torch.nn.init.constant_))
    #: factories whose first arguments are the shape of the tensor they allocate
    _SIZED = frozenset((torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn, torch.full))

    def __init__(self, budget: int | None = None) -> None:
        super().__init__()
        self.budget, self.used = budget, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._SKIPPED:
            return args[0] if args else kwargs["tensor"]
        if self.budget is not None and func in self._SIZED:
            size = kwargs.get("size", args[0] if func is torch.full or (args and not isinstance(args[0], int))
                              else args)
            size = tuple(size) if isinstance(size, (tuple, list, torch.Size)) else (size,)
            if all(isinstance(x, int) for x in size):
                self.used += math.prod(max(int(x), 0) for x in size)
                if self.used > self.budget:
                    raise BundleError(f"The bundle's config.json describes networks with more than {self.budget:,} "
                                      f"values, far more than the weights it ships; the file is damaged or crafted, "
                                      f"do not load it.")
        return func(*args, **kwargs)


def build_skeleton(config: Mapping[str, Any], budget: int | None = None) -> tuple[Generator, nn.Module]:
    """Generator and decoder of a bundle config, built by the plugin's factories (weights not loaded).

    `budget`: the most tensor values the factories may allocate (see `_SkipInit`); None for no bound.
    """
    family = bundle_family(config)
    build_backbone = _resolve_factory(config["backbone"]["factory"], "backbone", family)
    build_decoder = _resolve_factory(config["decoder"]["factory"], "decoder", family)
    with _SkipInit(budget):
        backbone = build_backbone(dict(config["backbone"]["config"]))
        h = config["head"]
        model = build_model(backbone, h["latent_dim"], h["width"], h["depth"], h["mlp_ratio"])
        decoder = build_decoder(dict(config["decoder"]["config"]))
    return Generator(model), decoder


def _adopt(module: nn.Module, state: Mapping[str, Tensor], *, what: str, file: Path) -> None:
    """Strict key/shape check (names the first mismatching key), then take the tensors as fp32."""
    check_state_dict(module, state, variant=what, file=str(file))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_meta:
            raise BundleError(f"The {what} factory left '{name}' without a value (it is on the meta device and "
                              f"not in {file.name}); the plugin's bundle factory is broken, report it.")


def _read_config(path: Path, verify_content: bool = True) -> dict:
    if not path.is_dir():
        raise BundleError(f"{path} is not a folder; pass the folder written by 'dd2 export'.")
    if not (path / MARKER).is_file():
        raise BundleError(f"{path} is not a dd2 generator bundle ({MARKER} is missing); pass a folder written by "
                          f"'dd2 export'.")
    marker = read_json(path / MARKER)
    if not isinstance(marker, dict) or marker.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path / MARKER} does not describe a {BUNDLE_FORMAT}; pass a folder written by "
                          f"'dd2 export'.")
    _check_version(marker.get("version"), path / MARKER)
    for name in REQUIRED:
        if not (path / name).is_file():
            raise BundleError(f"Bundle {path} is incomplete: {name} is missing; export it again with 'dd2 export'.")
    config = read_json(path / CONFIG)
    if not isinstance(config, dict):
        raise BundleError(f"{path / CONFIG} is not a bundle config; export the bundle again.")
    _check_version(config.get("format_version"), path / CONFIG)
    missing = [k for k in ("spec", "head", "backbone", "decoder", "teacher") if k not in config]
    if missing:
        raise BundleError(f"{path / CONFIG} lacks the '{missing[0]}' entry; the file is damaged, export the bundle "
                          f"again.")
    if verify_content and marker.get("content_sha256") != content_hash(path):
        raise BundleError(f"The files of bundle {path} do not match the content hash in its {MARKER} (a file was "
                          f"changed, replaced or removed after export); do not use it, export the bundle again.")
    return config


def load_bundle(path: str | os.PathLike, device: str = "cpu", *, verify_content: bool = True) -> "BundleGenerator":
    """Load an exported bundle as a `BundleGenerator` (fp32) on `device`; no run directory or teacher needed.

    The files must match the content hash `dd2 export` recorded (`verify_content=False` only while exporting).
    """
    path = Path(path)
    config = _read_config(path, verify_content)
    # what the networks may allocate: the values the weight files hold, twice over, plus room for the buffers
    # that no state dict holds (RoPE tables, masks)
    budget = 2 * _stored_numel(path / GENERATOR, path / DECODER) + (1 << 24)
    try:
        spec = spec_from_config(config)
        generator, decoder = build_skeleton(config, budget)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, OverflowError) as exc:
        raise BundleError(f"{path / CONFIG} does not describe a generator this dd2 can build ({type(exc).__name__}: "
                          f"{exc}); the file is damaged, export the bundle again.") from None
    teacher = config["teacher"]
    gen_state, _ = load_safetensors(path / GENERATOR)
    _adopt(generator, gen_state, what=f"{teacher} generator", file=path / GENERATOR)
    dec_state, _ = load_safetensors(path / DECODER)
    _adopt(decoder, dec_state, what=f"{teacher} decoder", file=path / DECODER)
    cb, _ = load_safetensors(path / CODEBOOK)
    shape = (spec.vocab_size, spec.latent_dim)
    if set(cb) != {"codebook"} or tuple(cb["codebook"].shape) != shape:
        got = ", ".join(f"{k} {tuple(v.shape)}" for k, v in cb.items()) or "nothing"
        raise CheckpointMismatchError(f"{path / CODEBOOK} holds {got}, but config.json expects codebook {shape}; "
                                      f"the bundle's files do not belong together, export it again.")
    return BundleGenerator(config, generator, decoder, cb["codebook"].float()).to(device)


def load_generator(path: str | os.PathLike, device: str = "cpu") -> "BundleGenerator":
    """`dd2cli.load_generator`: an exported bundle as an `nn.Module` (see `BundleGenerator`)."""
    return load_bundle(path, device)


class BundleGenerator(nn.Module):
    """A one-step generator loaded from a bundle: `gen(labels_B, noise=None, seed=None)` → images.

    Images are `(B, 3, H, W)` fp32 in `[0, 1]`; noise is `(B, num_tokens, latent_dim)` standard
    normal. Compute is fp32 whatever dtype the bundle stores. `generate(labels_B, eps_BNd)` is the
    interface `dd2 sample --from BUNDLE` uses; `tokens(...)` gives the token ids instead of images.
    """

    def __init__(self, config: Mapping[str, Any], generator: Generator, decoder: nn.Module,
                 codebook_Vd: Tensor) -> None:
        super().__init__()
        self.config = dict(config)
        self.spec = spec_from_config(config)
        self.generator = generator.eval().requires_grad_(False)
        self.decoder = decoder.eval().requires_grad_(False)
        self.register_buffer("codebook_Vd", codebook_Vd)
        self.teacher_name = str(config["teacher"])
        self.teacher = None  # a bundle carries no teacher (k-step sampling needs the run directory)
        self.num_tokens, self.latent_dim = self.spec.num_tokens, self.spec.latent_dim
        self.num_classes, self.image_size = self.spec.num_classes, self.spec.image_size
        self.vocab_size, self.null_class = self.spec.vocab_size, self.spec.null_class

    @property
    def device(self) -> torch.device:
        return self.codebook_Vd.device

    def identity(self) -> dict:
        """Provenance recorded by `dd2 sample` (teacher, its weights, which generator weights, dtype)."""
        w = self.config.get("weights", {})
        run = self.config.get("run", {})
        return {"teacher": self.teacher_name, "teacher_identity": self.config.get("teacher_identity"),
                "bundle_format": self.config.get("format_version"), "weights": w.get("which"),
                "dtype": w.get("dtype"), "checkpoint_step": run.get("checkpoint_step")}

    # ---- inputs ---------------------------------------------------------------------------------
    def _labels(self, labels_B: Any) -> Tensor:
        labels_B = torch.as_tensor(labels_B, dtype=torch.long, device=self.device).reshape(-1)
        if len(labels_B) and (int(labels_B.min()) < 0 or int(labels_B.max()) >= self.num_classes):
            raise DD2Error(f"Class labels must be in 0..{self.num_classes - 1}; got "
                           f"{int(labels_B.min())}..{int(labels_B.max())}.")
        return labels_B

    def _check_noise(self, eps_BNd: Tensor, batch: int) -> Tensor:
        expected = (batch, self.num_tokens, self.latent_dim)
        if tuple(eps_BNd.shape) != expected:
            raise DD2Error(f"Noise must have shape {expected} (batch, num_tokens, latent_dim), got "
                           f"{tuple(eps_BNd.shape)}.")
        return eps_BNd.to(self.device, torch.float32)

    def noise(self, batch: int, seed: Optional[int] = None) -> Tensor:
        """Standard normal `(batch, n, d)` drawn on the CPU from `seed` (the same on every device)."""
        g = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        return torch.randn(batch, self.num_tokens, self.latent_dim, generator=g).to(self.device)

    # ---- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def latents(self, labels_B: Any, eps_BNd: Tensor) -> Tensor:
        """The generator's continuous tokens `q (B, n, d)`."""
        labels_B = self._labels(labels_B)
        return self.generator(self._check_noise(eps_BNd, len(labels_B)), labels_B).float()

    @torch.no_grad()
    def tokens(self, labels_B: Any, eps_BNd: Tensor) -> Tensor:
        """Nearest-codebook token ids `(B, n)` of the generated latents."""
        return nearest_codebook(self.latents(labels_B, eps_BNd), self.codebook_Vd)

    @torch.no_grad()
    def generate(self, labels_B: Any, eps_BNd: Tensor) -> Tensor:
        """Labels `(B,)` and noise `(B, n, d)` → images `(B, 3, H, W)` fp32 in `[0, 1]`."""
        return self.decoder(self.tokens(labels_B, eps_BNd)).float()

    def forward(self, labels_B: Any, noise: Optional[Tensor] = None, seed: Optional[int] = None) -> Tensor:
        """Images for `labels_B`, from `noise` or from a fresh draw seeded by `seed` (the whole batch)."""
        labels_B = self._labels(labels_B)
        if noise is None:
            noise = self.noise(len(labels_B), seed)
        elif seed is not None:
            raise DD2Error("Pass either noise or seed, not both.")
        return self.generate(labels_B, noise)
