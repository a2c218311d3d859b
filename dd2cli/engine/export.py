"""`dd2 export`: write a run's one-step generator as a self-contained bundle (layout: `engine.bundle`).

The teacher's plugin says, through `Teacher.bundle_parts(backbone)`, which factories rebuild its backbone and its
decoder from JSON configs. Everything is written into a temporary folder next to `--out`, checked against the
run (the bundle must reproduce the run's images), and renamed into place at the end, so an interrupted export
never leaves a bundle that looks complete.
"""

from __future__ import annotations

import datetime as _dt
import glob
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from ..config import from_dict
from ..errors import DD2Error
from ..files import read_json, save_safetensors, write_json
from ..heads import head_config
from ..networks import Generator
from ..plugins import distribution_of, registry
from ..settings import DistillSettings
from ..teacher import BundleParts
from ..version import __version__
from .bundle import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    CARD,
    CODEBOOK,
    CONFIG,
    DECODER,
    GENERATOR,
    MARKER,
    PT2,
    SAMPLES,
    BundleGenerator,
    content_hash,
    load_bundle,
)
from .checkpoint import checkpoint_fingerprint
from .model_card import model_card
from .progress import Progress
from .runs import check_empty_out, load_generator_from_run

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMATS = ("safetensors", "pt2")
#: a fp32 bundle must reproduce the run's images to this (pixel values in [0, 1])
FP32_TOLERANCE = 1e-5


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _cast(state: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu().contiguous()
            for k, v in state.items()}


def _run_facts(run_dir: Path) -> dict:
    """Which checkpoint of which run (the fingerprint is the one `dd2 sample` records for runs)."""

    latest = read_json(run_dir / "latest.json")
    try:
        fingerprint = checkpoint_fingerprint(run_dir / str(latest.get("path")))
    except (DD2Error, OSError):
        fingerprint = None
    return {"name": run_dir.resolve().name, "checkpoint": latest.get("path"), "checkpoint_stage": latest.get("stage"),
            "checkpoint_step": latest.get("step"), "checkpoint_sha256": fingerprint}


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
    spec = teacher.spec
    settings = from_dict(DistillSettings, info["settings"])
    return {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "dd2_version": __version__,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "teacher": info["teacher"],
        "family": info.get("family", ""),
        # the pip package to install when the family is missing where the bundle is loaded
        "plugin_package": distribution_of(info.get("family", "")),
        # for the model card's front matter
        "base_model": getattr(registry().variants.get(info["teacher"]), "base_model", ""),
        "license": getattr(registry().variants.get(info["teacher"]), "license", ""),
        "variant": info["teacher"],
        "spec": {"num_tokens": spec.num_tokens, "vocab_size": spec.vocab_size, "latent_dim": spec.latent_dim,
                 "num_classes": spec.num_classes, "null_class": spec.null_class, "num_steps": spec.num_steps,
                 "steps": list(spec.steps), "image_size": spec.image_size,
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

    progress = progress or Progress()
    t0 = time.perf_counter()
    if req.dtype not in DTYPES:
        raise DD2Error(f"--dtype must be one of {', '.join(DTYPES)}, not '{req.dtype}'.")
    if req.weights not in ("ema", "raw"):
        raise DD2Error(f"--generator must be ema or raw, not '{req.weights}'.")
    if req.format not in FORMATS:
        raise DD2Error(f"--format must be one of {', '.join(FORMATS)}, not '{req.format}'.")
    run_dir, out = Path(req.run_dir), Path(req.out)
    if not (run_dir / "config.json").is_file():
        raise DD2Error(f"{run_dir} is not a distillation run (no config.json); pass the folder 'dd2 distill' wrote.")
    check_empty_out(out)

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
    for stale in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):  # left by an export a kill cut short
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
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
            bundle = load_bundle(tmp, "cpu", verify_content=False)  # (the hash is written last)
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
                                  "content_sha256": content_hash(tmp)})
        if out.exists():
            check_empty_out(out)  # still empty: nothing else wrote there meanwhile
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.files = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    result.seconds = time.perf_counter() - t0
    return result
