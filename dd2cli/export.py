"""`dd2 export`: a self-contained one-step generator bundle, and loading it back without the run.

A bundle is a folder:

    bundle.json             marker: {"format": "dd2-generator-bundle", "version": 1, "teacher", "content_sha256"}
    config.json             format version, spec facts, head config, backbone/decoder factories + configs,
                            teacher identity, distillation settings, the run's checkpoint step
    generator.safetensors   G_θ (`model.backbone.*`, `model.head.*`), EMA weights by default, in --dtype
    decoder.safetensors     the tokenizer decoder: token ids (B, n) → images (B, 3, H, W) in [0, 1], in --dtype
    codebook.safetensors    `codebook` (V, d) fp32: the nearest-codebook lookup of the generator's latents
    README.md               model card
    samples.png             the run's last sample grid (when the run has one)
    generator.pt2           (--format pt2) a torch.export program: labels, noise → uint8 images

The engine knows no teacher family. The teacher's plugin says, through `Teacher.bundle_parts(backbone)`,
which factory functions (`"module:function"`, marked with `@bundle_factory`) rebuild its backbone and
its decoder from JSON configs; loading imports those plugin modules, never the teacher's weights.

Everything is written into a temporary folder next to `--out` that is renamed into place at the end,
so an interrupted export never leaves a bundle that looks complete.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from . import __version__
from .errors import CheckpointMismatchError, DD2Error, FileFormatError
from .files import check_state_dict, load_safetensors, read_json, save_safetensors, sha256_file, write_json
from .heads import MLPHead, head_config
from .networks import ARDiffusion, Generator
from .teacher import nearest_codebook
from .teachers import SamplingSettings, TeacherSpec

BUNDLE_FORMAT = "dd2-generator-bundle"
#: the newest bundle layout this dd2 writes and reads
BUNDLE_VERSION = 1
MARKER, CONFIG, CARD = "bundle.json", "config.json", "README.md"
GENERATOR, DECODER, CODEBOOK = "generator.safetensors", "decoder.safetensors", "codebook.safetensors"
PT2, SAMPLES = "generator.pt2", "samples.png"
REQUIRED = (CONFIG, GENERATOR, DECODER, CODEBOOK)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMATS = ("safetensors", "pt2")
#: a fp32 bundle must reproduce the run's images to this (pixel values in [0, 1])
FP32_TOLERANCE = 1e-5


class BundleError(FileFormatError):
    """A bundle folder is missing a file, damaged, or needs code that is not installed."""


class BundleVersionError(BundleError):
    """A bundle written by a newer dd2 (a bundle format this version cannot read)."""


# ---- what a teacher plugin provides ------------------------------------------------------------------

def bundle_factory(fn: Callable[[dict], nn.Module]) -> Callable[[dict], nn.Module]:
    """Mark `fn(config: dict) -> nn.Module` as a factory a bundle's config.json may name.

    A bundle names its factories as text; only functions carrying this mark are ever called, so a
    tampered config.json cannot make `load_generator` call an arbitrary function. Factories run with
    the random initialisers of `torch.nn.init` switched off (the bundle assigns every weight), so
    building on the CPU costs no more than an allocation; tensors the state dict does not hold
    (non-persistent buffers) must be computed, not drawn. Building on the meta device also works.
    """
    fn.__dd2_bundle_factory__ = True
    return fn


@dataclass
class ModuleRecipe:
    """How to rebuild one network without the teacher: `factory(config)`, then its weights.

    `factory` is `"package.module:function"` (a `@bundle_factory`), `config` plain JSON.
    `state` holds the weights (the decoder's); the backbone's weights come from the generator.
    """

    factory: str
    config: dict
    state: Optional[Mapping[str, Tensor]] = None

    def as_json(self) -> dict:
        return {"factory": self.factory, "config": self.config}


@dataclass
class BundleParts:
    """What `Teacher.bundle_parts(backbone)` returns.

    - `backbone`: factory + config that build a module with the same state-dict keys and shapes as
      the generator's backbone (weights not needed);
    - `decoder`: factory + config + state of a module mapping token ids `(B, n)` int64 to images
      `(B, 3, H, W)` fp32 in `[0, 1]`, exactly as `teacher.decode(ids)`;
    - `codebook_Vd`: `teacher.codebook()`, the rows the generator's latents are snapped to.
    """

    backbone: ModuleRecipe
    decoder: ModuleRecipe
    codebook_Vd: Tensor


# ---- loading ----------------------------------------------------------------------------------------

def _resolve_factory(text: Any, what: str) -> Callable[[dict], nn.Module]:
    module_name, _, fn_name = str(text).partition(":")
    if not module_name or not fn_name:
        raise BundleError(f"The bundle's {what} factory '{text}' is not of the form module:function; its "
                          f"config.json is damaged, export the bundle again.")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise BundleError(f"The bundle's {what} needs the Python module '{module_name}' ('{exc.name}' is not "
                          f"installed); install the dd2 teacher plugin that made the bundle.") from None
    fn = getattr(module, fn_name, None)
    if fn is None or not getattr(fn, "__dd2_bundle_factory__", False):
        raise BundleError(f"'{text}' is not a dd2 bundle factory; the installed '{module_name.split('.')[0]}' "
                          f"plugin is a different version from the one that made the bundle.")
    return fn


def _check_version(value: Any, file: Path) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BundleError(f"{file} has no valid bundle format version ({value!r}); the file is damaged, export "
                          f"the bundle again.")
    if value > BUNDLE_VERSION:
        raise BundleVersionError(f"{file} was written by a newer dd2 (bundle format version {value}; dd2 "
                                 f"{__version__} reads up to version {BUNDLE_VERSION}); upgrade dd2 to load it.")


def spec_from_config(config: Mapping[str, Any]) -> TeacherSpec:
    """The teacher facts recorded in a bundle's config.json (no teacher needed)."""
    s = config["spec"]
    sampling = s.get("sampling", {})
    return TeacherSpec(
        num_tokens=int(s["num_tokens"]), vocab_size=int(s["vocab_size"]), latent_dim=int(s["latent_dim"]),
        num_classes=int(s["num_classes"]), null_class=int(s["null_class"]), steps=tuple(int(x) for x in s["steps"]),
        image_size=int(s["image_size"]), reads_ids=bool(s.get("reads_ids", False)),
        **{k: SamplingSettings(**sampling[k]) for k in ("stage1", "target", "evaluation") if k in sampling},
    )


class _SkipInit(TorchFunctionMode):
    """Inside: the random initialisers of `torch.nn.init` leave their tensor as it is.

    The bundle assigns every weight, so drawing them first is wasted work: a module built on the CPU
    inside this mode costs an allocation of untouched memory and nothing else. (The meta device is
    no cheaper: its reference kernels import torch._dynamo, 2.5 s of a cold start.)
    """

    _SKIPPED = frozenset((torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.kaiming_uniform_,
                          torch.nn.init.constant_))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._SKIPPED:
            return args[0] if args else (kwargs or {})["tensor"]
        return func(*args, **(kwargs or {}))


def build_skeleton(config: Mapping[str, Any]) -> tuple[Generator, nn.Module]:
    """Generator and decoder of a bundle config, built by the plugin's factories (weights not loaded)."""
    with _SkipInit():
        backbone = _resolve_factory(config["backbone"]["factory"], "backbone")(dict(config["backbone"]["config"]))
        head = MLPHead(**config["head"])
        decoder = _resolve_factory(config["decoder"]["factory"], "decoder")(dict(config["decoder"]["config"]))
    return Generator(ARDiffusion(backbone, head)), decoder


def _adopt(module: nn.Module, state: Mapping[str, Tensor], *, what: str, file: Path) -> None:
    """Strict key/shape check (names the first mismatching key), then take the tensors as fp32."""
    check_state_dict(module, state, variant=what, file=str(file))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.is_meta:
            raise BundleError(f"The {what} factory left '{name}' without a value (it is on the meta device and "
                              f"not in {file.name}); the plugin's bundle factory is broken, report it.")


def _read_config(path: Path) -> dict:
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
    return config


def load_bundle(path: str | os.PathLike, device: str = "cpu") -> "BundleGenerator":
    """Load an exported bundle as a `BundleGenerator` (fp32) on `device`; no run directory or teacher needed."""
    path = Path(path)
    config = _read_config(path)
    try:
        spec = spec_from_config(config)
        generator, decoder = build_skeleton(config)
    except (KeyError, TypeError, ValueError) as exc:
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


class _ImagesProgram(nn.Module):
    """What `generator.pt2` holds: labels int64 `(B,)`, noise fp32 `(B, n, d)` → uint8 `(B, H, W, 3)`."""

    def __init__(self, bundle: BundleGenerator) -> None:
        super().__init__()
        self.generator, self.decoder = bundle.generator, bundle.decoder
        self.register_buffer("codebook_Vd", bundle.codebook_Vd.clone())

    def forward(self, labels_B: Tensor, noise_BNd: Tensor) -> Tensor:
        q_BNd = self.generator(noise_BNd, labels_B)
        d = q_BNd.shape[-1]
        # nearest_codebook without its row chunks (a Python loop over a batch-dependent range does not
        # export); the same arithmetic, so the ids match while B·n fits one chunk
        flat_Md = q_BNd.reshape(-1, d)
        dist_MV = (self.codebook_Vd * self.codebook_Vd).sum(-1)[None] - 2 * flat_Md @ self.codebook_Vd.T
        ids_BN = dist_MV.argmin(-1).reshape(q_BNd.shape[:-1])
        images_B3HW = self.decoder(ids_BN).float()
        # as dd2cli.images.to_uint8: round to nearest, channels last
        return (images_B3HW.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1)


# ---- exporting --------------------------------------------------------------------------------------

@dataclass
class ExportRequest:
    run_dir: Path
    out: Path
    dtype: str = "fp32"  # fp32 | bf16 | fp16: generator and decoder weights (the codebook stays fp32)
    weights: str = "ema"  # ema | raw
    format: str = "safetensors"  # safetensors | pt2 (adds generator.pt2)
    verify: bool = True  # load the written bundle back and compare its images with the run's


@dataclass
class ExportResult:
    out: Path
    teacher: str
    files: dict[str, int] = field(default_factory=dict)  # name → bytes
    check_max_abs_diff: Optional[float] = None  # bundle vs run images on the check batch
    pt2_batch: Optional[str] = None  # "dynamic" or the fixed batch size
    seconds: float = 0.0


class Progress:
    """No-op progress sink; the CLI prints the messages."""

    def message(self, text: str) -> None: ...


def check_out_dir(out: Path) -> None:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DD2Error(f"{out} already exists and is not empty; choose another --out or delete it first.")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _cast(state: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu().contiguous()
            for k, v in state.items()}


def _run_facts(run_dir: Path) -> dict:
    """Which checkpoint of which run (the fingerprint is the one `dd2 sample` records for runs)."""
    from .files import fingerprint_file

    latest = read_json(run_dir / "latest.json")
    modules = run_dir / str(latest.get("path")) / "modules.safetensors"
    return {"name": run_dir.resolve().name, "checkpoint": latest.get("path"), "checkpoint_stage": latest.get("stage"),
            "checkpoint_step": latest.get("step"),
            "checkpoint_sha256": fingerprint_file(modules) if modules.is_file() else None}


def _eval_records(run_dir: Path) -> list[dict]:
    """`dd2 eval` results found under the run's samples/ folder (records with a `metrics` dict)."""
    records = []
    for path in sorted((run_dir / "samples").rglob("*.json")):
        if path.name == "manifest.json":
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for rec in data if isinstance(data, list) else [data]:
            if isinstance(rec, dict) and isinstance(rec.get("metrics"), dict) and rec["metrics"]:
                settings = rec.get("sample_settings") or {}
                source = settings.get("source") or {}
                records.append({"file": str(path.relative_to(run_dir)), "samples": Path(str(rec.get("samples", ""))).name,
                                "count": rec.get("count"), "features": rec.get("features"),
                                "mode": settings.get("mode"), "steps": settings.get("steps"),
                                "weights": source.get("weights"), "checkpoint_step": source.get("checkpoint_step"),
                                "metrics": {k: v for k, v in rec["metrics"].items()
                                            if isinstance(v, (int, float)) and math.isfinite(v)}})
    return records


def _last_losses(run_dir: Path) -> dict:
    """The last logged stage-1 and stage-2 losses (from metrics.jsonl)."""
    out: dict = {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        stage = rec.get("stage")
        losses = {k: v for k, v in rec.items() if k.startswith("loss_") and isinstance(v, (int, float))}
        if stage in (1, 2) and losses:
            out[f"stage{stage}"] = {"step": rec.get("step"), **losses}
    return out


def _content_hash(folder: Path, names: Sequence[str]) -> str:
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name.encode())
        h.update(sha256_file(folder / name).encode())
    return h.hexdigest()


def _check_images(teacher, run_gen: Generator, bundle: BundleGenerator) -> float:
    """Max |pixel difference| between the run's images and the bundle's on a fixed batch."""
    spec = bundle.spec
    batch = max(2, min(4, spec.num_classes))
    labels_B = torch.arange(batch) % spec.num_classes
    eps_BNd = torch.randn(batch, spec.num_tokens, spec.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = teacher.decode(teacher.as_tokens(run_gen(eps_BNd, labels_B))).float().cpu()
        got = bundle.generate(labels_B, eps_BNd).cpu()
    return float((ref - got).abs().max())


def _export_pt2(bundle: BundleGenerator, path: Path) -> str:
    """Write `generator.pt2` (dynamic batch when torch.export allows it); returns "dynamic" or the batch."""
    program = _ImagesProgram(bundle).eval()
    spec = bundle.spec
    g = torch.Generator().manual_seed(1)

    def example(batch: int) -> tuple[Tensor, Tensor]:
        return (torch.arange(batch) % spec.num_classes,
                torch.randn(batch, spec.num_tokens, spec.latent_dim, generator=g))

    batch_dim = torch.export.Dim("batch", min=1, max=4096)
    try:
        ep = torch.export.export(program, example(2), dynamic_shapes=({0: batch_dim}, {0: batch_dim}))
        ep.module()(*example(3))  # the program really takes another batch size
        kind = "dynamic"
    except Exception:  # noqa: BLE001 - any failure of the dynamic export falls back to a fixed batch of one
        try:
            ep = torch.export.export(program, example(1))
        except Exception as exc:  # noqa: BLE001 - torch.export raises many types
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise DD2Error(f"torch.export cannot export this generator ({type(exc).__name__}: {first}); export "
                           f"without --format pt2.") from None
        kind = "1"
    torch.export.save(ep, str(path))
    # the saved program must give the bundle's images, byte for byte
    loaded = torch.export.load(str(path)).module()
    labels_B, noise_BNd = example(2 if kind == "dynamic" else 1)
    with torch.no_grad():
        got = loaded(labels_B, noise_BNd)
        want = program(labels_B, noise_BNd)
    if not torch.equal(got, want):
        raise DD2Error(f"The exported program {path.name} does not reproduce the bundle's images; export without "
                       f"--format pt2 and report the problem.")
    return kind


def _bundle_config(info: dict, teacher, generator: Generator, parts: BundleParts, req: ExportRequest,
                   run: dict) -> dict:
    from .config import from_dict
    from .settings import DistillSettings

    spec = teacher.spec
    settings = from_dict(DistillSettings, info["settings"])
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "dd2_version": __version__,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "teacher": info["teacher"],
        "family": info.get("family", ""),
        "variant": info["teacher"],
        "spec": {"num_tokens": spec.num_tokens, "vocab_size": spec.vocab_size, "latent_dim": spec.latent_dim,
                 "num_classes": spec.num_classes, "null_class": spec.null_class, "num_steps": spec.num_steps,
                 "steps": list(spec.steps), "image_size": spec.image_size, "reads_ids": spec.reads_ids,
                 "sampling": {"stage1": spec.stage1.as_dict(), "target": spec.target.as_dict(),
                              "evaluation": spec.evaluation.as_dict()}},
        "head": head_config(generator.model.head),
        "backbone": parts.backbone.as_json(),
        "decoder": parts.decoder.as_json(),
        "weights": {"which": req.weights, "dtype": req.dtype, "codebook_dtype": "fp32"},
        "teacher_identity": info.get("teacher_identity") or teacher.identity(),
        "distillation": {"settings": info["settings"],
                         "resolved_target": settings.target.apply(spec.target).as_dict(),
                         "resolved_stage1_data": settings.stage1.sampling.apply(spec.stage1).as_dict(),
                         "dd2_version": info.get("dd2_version")},
        "run": run,
    }


def export(req: ExportRequest, progress: Progress | None = None) -> ExportResult:
    """Write the bundle of a finished run (see the module docstring)."""
    from .distill import load_generator_from_run

    progress = progress or Progress()
    t0 = time.perf_counter()
    if req.dtype not in DTYPES:
        raise DD2Error(f"--dtype must be one of {', '.join(DTYPES)}, not '{req.dtype}'.")
    if req.weights not in ("ema", "raw"):
        raise DD2Error(f"--weights must be ema or raw, not '{req.weights}'.")
    if req.format not in FORMATS:
        raise DD2Error(f"--format must be one of {', '.join(FORMATS)}, not '{req.format}'.")
    run_dir, out = Path(req.run_dir), Path(req.out)
    if not (run_dir / "config.json").is_file():
        raise DD2Error(f"{run_dir} is not a distillation run (no config.json); pass the folder 'dd2 distill' wrote.")
    check_out_dir(out)

    # 1. the run's generator and teacher, and what the teacher's plugin says rebuilds them
    progress.message(f"Loading the {req.weights} generator of {run_dir}")
    generator, teacher, info = load_generator_from_run(run_dir, device="cpu", which=req.weights)
    try:
        parts = teacher.bundle_parts(generator.model.backbone)
    except NotImplementedError as exc:
        text = str(exc) or f"teacher '{info['teacher']}' does not support export."
        raise DD2Error(text[0].upper() + text[1:]) from None
    run = _run_facts(run_dir)
    config = _bundle_config(info, teacher, generator, parts, req, run)
    dtype = DTYPES[req.dtype]
    gen_state = _cast(generator.state_dict(), dtype)
    dec_state = _cast(parts.decoder.state or {}, dtype)
    codebook = parts.codebook_Vd.detach().float().cpu().contiguous()
    meta = {"format": BUNDLE_FORMAT, "teacher": info["teacher"], "dtype": req.dtype}

    # 2. everything into a temporary folder next to --out, renamed into place at the end
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the bundle gets the usual permissions
    result = ExportResult(out=out, teacher=info["teacher"])
    try:
        save_safetensors(tmp / GENERATOR, gen_state, {**meta, "role": "generator", "weights": req.weights})
        save_safetensors(tmp / DECODER, dec_state, {**meta, "role": "decoder"})
        save_safetensors(tmp / CODEBOOK, {"codebook": codebook}, {**meta, "role": "codebook", "dtype": "fp32"})
        write_json(tmp / CONFIG, config)
        write_json(tmp / MARKER, {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION})  # provisional, for loading
        grid = run_dir / "samples" / "final.png"
        if grid.is_file():
            shutil.copyfile(grid, tmp / SAMPLES)

        # 3. the bundle must rebuild the run's generator without the teacher: load it back and compare
        bundle = None
        if req.verify or req.format == "pt2":
            progress.message("Checking the bundle against the run")
            bundle = load_bundle(tmp, "cpu")
            result.check_max_abs_diff = _check_images(teacher, generator, bundle)
            if req.dtype == "fp32" and not result.check_max_abs_diff <= FP32_TOLERANCE:
                raise DD2Error(f"The exported bundle does not reproduce the run's images (max pixel difference "
                               f"{result.check_max_abs_diff:.3g}); the '{info.get('family') or info['teacher']}' "
                               f"plugin's bundle_parts() is wrong, report it.")
        if req.format == "pt2":
            progress.message("Exporting generator.pt2 with torch.export")
            result.pt2_batch = _export_pt2(bundle, tmp / PT2)
        del bundle

        # 4. model card, then the final marker (it names a hash of every other file)
        config["check"] = {"max_abs_pixel_diff_vs_run": result.check_max_abs_diff}
        config["pt2"] = None if result.pt2_batch is None else {
            "file": PT2, "batch": result.pt2_batch, "torch_version": torch.__version__,
            "inputs": {"labels": "int64 (B,)", "noise": f"float32 (B, {teacher.spec.num_tokens}, "
                                                         f"{teacher.spec.latent_dim})"},
            "output": f"uint8 (B, {teacher.spec.image_size}, {teacher.spec.image_size}, 3)"}
        write_json(tmp / CONFIG, config)
        names = [p.name for p in tmp.iterdir() if p.name not in (MARKER, CARD)]
        sizes = {name: (tmp / name).stat().st_size for name in sorted(names)}
        card = model_card(config, sizes, _eval_records(run_dir), _last_losses(run_dir), out.name)
        (tmp / CARD).write_text(card)
        write_json(tmp / MARKER, {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "teacher": info["teacher"],
                                  "content_sha256": _content_hash(tmp, names)})
        if out.exists():
            check_out_dir(out)  # still empty: nothing else wrote there meanwhile
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.files = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    result.seconds = time.perf_counter() - t0
    return result


# ---- the model card ---------------------------------------------------------------------------------

def human_size(n: int) -> str:
    """Bytes as KiB / MiB / GiB."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def model_card(config: Mapping[str, Any], sizes: Mapping[str, int], evals: Sequence[Mapping[str, Any]],
               losses: Mapping[str, Any], folder: str) -> str:
    """README.md of a bundle: what it is, teacher, training, metrics, files, how to load it."""
    spec, dist = config["spec"], config["distillation"]
    s = dist["settings"]
    s1, s2, run, w = s["stage1"], s["stage2"], config["run"], config["weights"]
    teacher = config["teacher"]
    ident = config.get("teacher_identity") or {}
    lines = [
        f"# dd2 one-step generator: {teacher}",
        "",
        f"A one-step image generator distilled with Distilled Decoding 2 (DD2) from the auto-regressive teacher "
        f"**{teacher}** (family `{config.get('family') or '?'}`). One forward pass maps a class label and "
        f"Gaussian noise `({spec['num_tokens']}, {spec['latent_dim']})` to {spec['num_tokens']} continuous tokens; "
        f"each is snapped to the nearest of the teacher's {spec['vocab_size']} codebook vectors and the "
        f"teacher's tokenizer decoder turns them into a {spec['image_size']}×{spec['image_size']} RGB image. "
        f"The teacher needs {spec['num_steps']} AR steps for the same job.",
        "",
        f"Exported by dd2 {config['dd2_version']} on {config['created']} (bundle format "
        f"{config['format_version']}).",
        "",
    ]
    if SAMPLES in sizes:
        lines += [f"![samples of the run]({SAMPLES})", "", "Samples of the run's EMA generator (one row per class).", ""]
    lines += ["## Teacher", "", "| | |", "|---|---|",
              f"| variant | `{teacher}` |", f"| family | `{config.get('family') or '?'}` |",
              f"| tokens × AR steps | {spec['num_tokens']} × {spec['num_steps']} |",
              f"| codebook | {spec['vocab_size']} × {spec['latent_dim']} |",
              f"| classes | {spec['num_classes']} (null class {spec['null_class']}) |",
              f"| image size | {spec['image_size']} px |"]
    for key, value in sorted((ident.get("weights") or {}).items()):
        shown = value
        if isinstance(value, dict):
            digest = value.get("sha256") or value.get("fingerprint") or ""
            shown = f"{value.get('file', '')} sha256 {digest[:16]}…" if digest else value.get("file", "")
        elif isinstance(value, str) and len(value) == 64:
            shown = f"sha256 {value[:16]}…"
        lines.append(f"| weights `{key}` | {shown} |")
    lines += ["", "The full teacher identity (file hashes) is in `config.json` → `teacher_identity`.", "",
              "## Training", "",
              f"- distillation target (teacher sampling): {_sampling_text(dist['resolved_target'])}",
              f"- stage 1 (GTS initialisation): {s1['steps']} steps, batch {s1['batch_size']}, head lr {s1['lr']}, "
              f"backbone lr {s1['backbone_lr']}, head-only steps {s1['head_only_steps']}, data: "
              f"{'teacher samples' if s1['data'] == 'teacher' else s1['data']} "
              f"({_sampling_text(dist['resolved_stage1_data'])})",
              f"- stage 2 (conditional score distillation): {s2['steps']} generator updates, batch {s2['batch_size']}, "
              f"lr {s2['lr']}, guidance lr {s2['guidance_lr']}, {s2['guidance_updates']} guidance updates per "
              f"generator update, α {s2['alpha']}, EMA cap {s2['ema_max']}",
              f"- head: MLP width {config['head']['width']}, depth {config['head']['depth']}; precision "
              f"{s.get('precision', 'fp32')}; seed {s.get('seed')}",
              f"- exported weights: **{w['which']}** generator of checkpoint `{run.get('checkpoint')}` "
              f"(stage {run.get('checkpoint_stage')}, step {run.get('checkpoint_step')}), stored as {w['dtype']} "
              f"(the codebook stays fp32; loading computes in fp32)",
              ""]
    check = config.get("check") or {}
    if check.get("max_abs_pixel_diff_vs_run") is not None:
        lines += [f"Check at export: the bundle's images differ from the run's by at most "
                  f"{check['max_abs_pixel_diff_vs_run']:.3g} (pixel values in [0, 1]) on a fixed batch.", ""]
    lines += ["## Metrics", ""]
    if evals:
        lines += ["Measured with `dd2 eval` on sample sets of the run (not re-measured on this bundle):", "",
                  "| samples | mode | weights | step | count | features | metrics |", "|---|---|---|---|---|---|---|"]
        for e in evals:
            metrics = ", ".join(f"{k} {_fmt(v)}" for k, v in e["metrics"].items())
            mode = f"{e.get('mode') or '?'}" + (f" ({e['steps']} steps)" if (e.get("steps") or 1) > 1 else "")
            lines.append(f"| {e['samples']} | {mode} | {e.get('weights') or '-'} | {e.get('checkpoint_step') or '-'} | "
                         f"{e.get('count')} | {e.get('features')} | {metrics} |")
        lines.append("")
    else:
        lines += ["No `dd2 eval` results were found in the run directory. Measure this bundle with "
                  f"`dd2 sample --from {folder} -n 50000` and `dd2 eval fid ...`.", ""]
    if losses:
        parts = [f"stage {k[-1]} step {v.get('step')}: " + ", ".join(f"{n[5:]} {_fmt(x)}" for n, x in v.items()
                                                                       if n.startswith("loss_"))
                 for k, v in sorted(losses.items())]
        lines += ["Last logged training losses — " + "; ".join(parts) + ".", ""]
    lines += ["## Files", "", "| file | size | what |", "|---|---|---|"]
    what = {GENERATOR: f"generator weights ({w['dtype']})", DECODER: f"tokenizer decoder: ids → images ({w['dtype']})",
            CODEBOOK: "codebook (V, d) fp32 for the nearest-codebook lookup",
            CONFIG: "architecture (factories + configs), spec, provenance",
            SAMPLES: "sample grid of the run", PT2: "torch.export program (no dd2 needed)"}
    for name, size in sizes.items():
        lines.append(f"| `{name}` | {human_size(size)} | {what.get(name, '')} |")
    lines += [f"| `{MARKER}` | – | marker and content hash |", f"| `{CARD}` | – | this card |", ""]
    k = min(3, spec["num_classes"])
    labels, size = list(range(k)), spec["image_size"]
    lines += ["## Use", "", "With the dd2 command line (PNGs + an ADM `.npz` + a manifest):", "", "```sh",
              f"dd2 sample --from {folder} -n 1000 --out samples/", "```", "",
              "With Python (needs `dd2` and the teacher's plugin package installed, not the teacher weights):", "",
              "```python", "import dd2cli", "", f"gen = dd2cli.load_generator(\"{folder}\", device=\"cpu\")",
              f"images = gen({labels}, seed=0)  # ({k}, 3, {size}, {size}) float32 in [0, 1]",
              f"noise = gen.noise({k}, seed=0)  # ({k}, {spec['num_tokens']}, {spec['latent_dim']}) standard normal",
              f"same = gen.generate({labels}, noise)  # explicit noise: the same images", "```", "",
              "`seed` draws the whole batch from one CPU generator; `dd2 sample` seeds every image by its index "
              "instead, so the two give different images for the same seed.", ""]
    pt2_info = config.get("pt2") or {}
    pt2 = pt2_info.get("batch")
    if pt2 is not None:
        batch_note = ("any batch size (dynamic batch dimension)" if pt2 == "dynamic" else
                      f"a fixed batch of {pt2} (torch.export could not make the batch dimension dynamic for this "
                      f"model; call it once per image)")
        lines += ["With plain PyTorch, no dd2 installed (`generator.pt2`, a `torch.export` program of generator + "
                  f"nearest-codebook lookup + decoder; it takes {batch_note}):", "", "```python", "import torch", "",
                  f"program = torch.export.load(\"{folder}/{PT2}\").module()",
                  "labels = torch.tensor([0, 1], dtype=torch.int64)",
                  f"noise = torch.randn(2, {spec['num_tokens']}, {spec['latent_dim']})",
                  f"images = program(labels, noise)  # uint8 (2, {spec['image_size']}, {spec['image_size']}, 3)",
                  "```", "", "The program holds its own fp32 copy of the weights, on the CPU; it was exported with "
                  f"PyTorch {pt2_info.get('torch_version')} (load it with that version or a newer one).", ""]
    return "\n".join(lines)


def _sampling_text(s: Mapping[str, Any]) -> str:
    parts = [f"cfg {s.get('cfg')}", f"top-k {s.get('top_k') or 'off'}",
             f"top-p {s.get('top_p') if s.get('top_p', 1.0) < 1.0 else 'off'}"]
    if s.get("temperature", 1.0) != 1.0:
        parts.append(f"temperature {s['temperature']}")
    if s.get("cfg_interval", -1) >= 0:
        parts.append(f"cfg interval {s['cfg_interval']}")
    return ", ".join(parts)


__all__ = ["BundleParts", "ModuleRecipe", "BundleGenerator", "BundleError", "BundleVersionError", "bundle_factory",
           "load_bundle", "load_generator", "export", "ExportRequest", "ExportResult", "model_card"]
