"""TODO docstring."""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from ..config import from_dict
from ..errors import DD2Error
from ..files import read_json
from ..networks import Generator, build_model
from ..plugins import get_variant
from ..settings import DistillSettings
from ..teacher import Teacher
from .checkpoint import latest_checkpoint

RUNS_DIR_ENV = "DD2_RUNS_DIR"


def default_runs_dir() -> Path:
    return Path(os.environ.get(RUNS_DIR_ENV, "runs"))


def _new_run_dir(teacher: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = default_runs_dir() / f"{teacher}-{stamp}"
    path, i = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    return path


def load_generator_from_run(run_dir: Path, device: str = "cpu", which: str = "ema") -> tuple[Generator, Teacher, dict]:
    """The trained generator (EMA weights by default) and its teacher, from a run directory."""
    run_dir = Path(run_dir)
    info = read_json(run_dir / "config.json")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None or ckpt.stage != 2:
        raise DD2Error(f"Run {run_dir} has no stage-2 checkpoint yet; finish 'dd2 distill' first.")
    settings = from_dict(DistillSettings, info["settings"])
    teacher = get_variant(info["teacher"]).load(info.get("weights") or None, device=device).eval().requires_grad_(False)
    h = settings.head
    gen = Generator(build_model(teacher.new_backbone().to(device), teacher.spec.latent_dim, h.width, h.depth,
                                h.mlp_ratio, seed=settings.seed, device=device)).eval()
    ckpt.load_module(which if which != "raw" else "generator", gen)
    return gen.requires_grad_(False), teacher, info


def find_latest_run() -> Path:
    """The newest run under the runs folder that has a stage-2 checkpoint (by mtime of latest.json)."""

    best, best_t = None, -1.0
    root = default_runs_dir()
    for pointer in root.glob("*/latest.json"):
        try:
            if int(json.loads(pointer.read_text()).get("stage", 0)) != 2:
                continue
        except (OSError, ValueError, json.JSONDecodeError):
            continue
        t = pointer.stat().st_mtime
        if t > best_t:
            best, best_t = pointer.parent, t
    if best is None:
        raise DD2Error(f"No finished distillation run under {root}; run 'dd2 distill' first, or pass --from RUN_DIR "
                       f"or --teacher NAME.")
    return best


def _new_out_dir(parent: Path, prefix: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = parent / f"{prefix}-{stamp}"
    path, i = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    return path


def find_latest_sample_set() -> Path:
    """The newest complete dd2 sample set under the runs folder and ./samples."""

    candidates = list(default_runs_dir().glob("*/samples/*/manifest.json")) + list(Path("samples").glob("*/manifest.json"))
    best, best_t = None, -1.0
    for m in candidates:
        try:
            if not json.loads(m.read_text()).get("complete"):
                continue
        except (OSError, json.JSONDecodeError):
            continue
        t = m.stat().st_mtime
        if t > best_t:
            best, best_t = m.parent, t
    if best is None:
        raise DD2Error(f"No finished sample set found under {default_runs_dir()} or ./samples; run 'dd2 sample' first "
                       f"or pass the samples' path.")
    return best


def check_out_dir(out: Path) -> None:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DD2Error(f"{out} already exists and is not empty; choose another --out or delete it first.")
