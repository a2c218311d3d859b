"""The quality table `dd2 distill` ends with (`run.eval_samples > 0`, set for the bundled digits teachers).

Three sample sets of `n` images each with balanced labels, written under `RUN/quality/` by the same engine
as `dd2 sample` (so they are deterministic per index, resumable, and can be re-evaluated with `dd2 eval`):
the one-step generator (EMA), the teacher's own AR sampler, and the set-prediction baseline. They are
scored in the digits classifier's feature space (`dd2 eval all --features digits`) and the rows, with the
sampling speed of each source, are written to `RUN/quality.json`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from ..files import read_json, write_json
from .evaluate import EvalRequest, evaluate
from .sample import SampleRequest
from .sample import run as sample_run

QUALITY_DIR = "quality"
QUALITY_JSON = "quality.json"


@dataclass
class QualityRow:
    name: str  # one-step | teacher | set-prediction
    samples: str  # the sample folder (for dd2 eval)
    n: int
    metrics: dict[str, float]  # fid, precision, recall, class_consistency (digits space)
    images_per_s: float  # sampling throughput of this source in this run (images written included)


def quality_report(run_dir: Path, n: int, device: str = "auto", batch_size: int = 100,
                   on_message=None) -> list[QualityRow]:
    """Sample and score the three sources; returns the rows (also written to RUN/quality.json)."""
    run_dir = Path(run_dir)
    info = read_json(run_dir / "config.json")
    teacher_name, weights = info["teacher"], info.get("weights") or {}
    out = run_dir / QUALITY_DIR
    requests: dict[str, SampleRequest] = {
        "one-step": SampleRequest(source=run_dir, steps=1),
        "teacher": SampleRequest(teacher=teacher_name, teacher_weights=weights),
        "set-prediction": SampleRequest(teacher=teacher_name, teacher_weights=weights, baseline="set-prediction"),
    }
    speeds: dict[str, float] = {}
    folders: dict[str, Path] = {}
    for name, req in requests.items():
        req.n, req.labels, req.batch_size, req.device, req.out = n, "balanced", batch_size, device, out / name
        req.distributed = False  # (under torchrun only rank 0 reports: the run's process group is gone)
        if on_message is not None:
            on_message(f"quality check: {n} images from the {name} sampler")
        res = sample_run(req)
        folders[name] = res.out_dir
        # a resumed report re-uses finished sets: keep the speed measured when they were written
        speeds[name] = res.images_per_s if res.generated else _previous_speed(run_dir, name)
    results = evaluate(EvalRequest(metrics=("fid", "prec-recall", "class-consistency"), samples=list(folders.values()),
                                   features="digits", device=device))
    rows = [QualityRow(name=name, samples=str(folders[name]), n=r.count, metrics=_pick(r.metrics),
                       images_per_s=speeds[name]) for name, r in zip(folders, results)]
    write_json(run_dir / QUALITY_JSON, {"n": n, "labels": "balanced", "features": "digits",
                                        "reference": results[0].reference, "rows": [asdict(r) for r in rows]})
    return rows


def _pick(metrics: Mapping[str, Any]) -> dict[str, float]:
    keep = ("fid", "precision", "recall", "class_consistency")
    return {k: float(metrics[k]) for k in keep if k in metrics}


def _previous_speed(run_dir: Path, name: str) -> float:
    path = run_dir / QUALITY_JSON
    if path.is_file():
        for row in read_json(path).get("rows", []):
            if row.get("name") == name:
                return float(row.get("images_per_s", float("nan")))
    return float("nan")

