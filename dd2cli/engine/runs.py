"""Run and sample-set folders: where new ones go, finding the newest, and loading a run's generator.

A run folder (`dd2 distill`) holds `config.json`, `checkpoints/`, `latest.json`, `metrics.jsonl` and
`samples/`; `load_generator_from_run` builds the generator with `networks.build_model` and loads its weights,
without building a training run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Callable, Iterable

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


def new_folder(parent: Path, prefix: str) -> Path:
    """A folder name under `parent` that does not exist yet: `<prefix>-<YYYYmmdd-HHMMSS>[-i]` (not created)."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(parent) / f"{prefix}-{stamp}"
    path, i = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    return path


def check_empty_out(out: Path, remedy: str = "choose another --out or delete it first") -> None:
    """Refuse an output folder that exists with something in it (dd2 never mixes its output with other files)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DD2Error(f"{out} already exists and is not empty; {remedy}.")


def _newest(markers: Iterable[Path], accept: Callable[[dict], bool]) -> Path | None:
    """The folder of the most recently written JSON marker file whose content `accept`s (unreadable ones skipped)."""
    best, best_t = None, -1.0
    for marker in markers:
        try:
            if not accept(json.loads(marker.read_text())):
                continue
            t = marker.stat().st_mtime
        except (OSError, ValueError, TypeError, AttributeError):
            continue
        if t > best_t:
            best, best_t = marker.parent, t
    return best


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
    root = default_runs_dir()
    best = _newest(root.glob("*/latest.json"), lambda latest: int(latest.get("stage", 0)) == 2)
    if best is None:
        raise DD2Error(f"No finished distillation run under {root}; run 'dd2 distill' first, or pass --from RUN_DIR "
                       f"or --teacher NAME.")
    return best


def find_latest_sample_set() -> Path:
    """The newest complete dd2 sample set under the runs folder and ./dd2-samples."""
    markers = [*default_runs_dir().glob("*/samples/*/manifest.json"), *Path("dd2-samples").glob("*/manifest.json")]
    best = _newest(markers, lambda manifest: bool(manifest.get("complete")))
    if best is None:
        raise DD2Error(f"No finished sample set found under {default_runs_dir()} or ./dd2-samples; run 'dd2 sample' first "
                       f"or pass the samples' path.")
    return best
