"""Run directories and resumable checkpoints.

A run directory holds:

    config.json            the resolved settings (and the teacher variant, weight paths, dd2 version)
    metrics.jsonl          one JSON object per logged step
    latest.json            {"stage": s, "step": k, "path": "checkpoints/stage{s}-{k:07d}"}
    checkpoints/stageS-K/  modules.safetensors, optim.safetensors, state.json
    samples/*.png          sample grids

A checkpoint folder is written under a temporary name and renamed into place, and `latest.json`
(itself written atomically) is updated only after that, so a process killed at any moment leaves
the previous checkpoint as the one to resume from. A resumed run removes the temporary folders of writes that
a kill cut short, and falls back to the newest earlier checkpoint when the latest one is damaged.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..errors import DD2Error, FileFormatError, OutputError, write_failure
from ..files import atomic_write_bytes, load_safetensors, read_json, save_safetensors, write_json

CKPT_DIR = "checkpoints"
LATEST = "latest.json"
FINAL_MARK = "FINAL"  # in the last checkpoint of stage 1


def _flatten_optimizer(opt_state: Mapping[str, Any], prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": opt_state["param_groups"], "state": {}}
    for idx, entry in opt_state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{idx}.{key}"] = value
            else:
                scalars["state"].setdefault(str(idx), {})[key] = value
    return tensors, scalars


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], scalars: Mapping[str, Any], prefix: str) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith(prefix + "."):
            continue
        idx, key = name[len(prefix) + 1:].split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in scalars.get("state", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": scalars["param_groups"]}


def save_checkpoint(run_dir: Path, stage: int, step: int, modules: Mapping[str, torch.nn.Module | Mapping],
                    optimizers: Mapping[str, torch.optim.Optimizer | Mapping], state: Mapping[str, Any],
                    rng: Mapping[str, torch.Tensor], keep: int = 2, final: bool = False) -> Path:
    """Write a complete checkpoint atomically and point `latest.json` at it.

    `final` marks the end of stage 1 (the checkpoint stage 2 starts from, never pruned). The marker is
    written inside the temporary folder, so a checkpoint appears together with its mark: other ranks, and a
    resume after a kill at any moment, never see a finished stage 1 without it.
    """
    run_dir = Path(run_dir)
    root = run_dir / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"stage{stage}-{step:07d}"
    dest = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        # modules / optimizers may be given as already gathered state dicts (FSDP)
        weights = {f"{m}.{k}": v for m, mod in modules.items()
                   for k, v in (mod if isinstance(mod, Mapping) else mod.state_dict()).items()}
        save_safetensors(tmp / "modules.safetensors", weights)
        opt_tensors: dict[str, torch.Tensor] = {}
        opt_scalars: dict[str, Any] = {}
        for oname, opt in optimizers.items():
            t, s = _flatten_optimizer(opt if isinstance(opt, Mapping) else opt.state_dict(), oname)
            opt_tensors.update(t)
            opt_scalars[oname] = s
        opt_tensors.update({f"rng.{k}": v for k, v in rng.items()})
        save_safetensors(tmp / "optim.safetensors", opt_tensors)
        write_json(tmp / "state.json", {"stage": stage, "step": step, "optimizers": opt_scalars, **state})
        if final:
            (tmp / FINAL_MARK).write_text("")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except OutputError as exc:  # name the checkpoint, not the temporary file inside it
        shutil.rmtree(tmp, ignore_errors=True)
        raise (write_failure(f"checkpoint {dest}", exc.os_error) if exc.os_error is not None else exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json(run_dir / LATEST, {"stage": stage, "step": step, "path": f"{CKPT_DIR}/{name}"})
    _prune(root, keep, protect=dest)
    return dest


def _prune(root: Path, keep: int, protect: Path) -> None:
    """Keep the newest `keep` checkpoints per stage, and always the final one of stage 1."""
    if keep <= 0:
        return
    for stage in (1, 2):
        ckpts = sorted(p for p in root.glob(f"stage{stage}-*") if p.is_dir())
        for old in ckpts[:-keep]:
            if old != protect and not (old / FINAL_MARK).exists():
                shutil.rmtree(old, ignore_errors=True)


class Checkpoint:
    """A loaded checkpoint folder."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not (self.path / "state.json").is_file():
            raise FileFormatError(f"{self.path} is not a complete dd2 checkpoint (state.json is missing).")
        self.state = read_json(self.path / "state.json")
        self.weights, _ = load_safetensors(self.path / "modules.safetensors")
        self._opt_tensors, _ = load_safetensors(self.path / "optim.safetensors")

    @property
    def stage(self) -> int:
        return int(self.state["stage"])

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def module_state(self, name: str) -> dict[str, torch.Tensor]:
        prefix = name + "."
        out = {k[len(prefix):]: v for k, v in self.weights.items() if k.startswith(prefix)}
        if not out:
            raise FileFormatError(f"Checkpoint {self.path} holds no weights for '{name}'.")
        return out

    def has_module(self, name: str) -> bool:
        return any(k.startswith(name + ".") for k in self.weights)

    def load_module(self, name: str, module: torch.nn.Module) -> None:
        module.load_state_dict(self.module_state(name), strict=True)

    def optimizer_state(self, name: str) -> dict:
        return _unflatten_optimizer(self._opt_tensors, self.state["optimizers"][name], name)

    def load_optimizer(self, name: str, opt: torch.optim.Optimizer) -> None:
        opt.load_state_dict(self.optimizer_state(name))

    def rng(self) -> dict[str, torch.Tensor]:
        return {k[4:]: v for k, v in self._opt_tensors.items() if k.startswith("rng.")}


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The checkpoint `latest.json` points at (None for a run without one)."""
    pointer = Path(run_dir) / LATEST
    if not pointer.is_file():
        return None
    info = read_json(pointer)
    return Checkpoint(Path(run_dir) / info["path"])


def _stage_step(name: str) -> tuple[int, int] | None:
    """`stage2-0000040` → (2, 40); None for anything else (hidden temporary folders included)."""
    head, _, step = name.partition("-")
    if not head.startswith("stage") or not head[5:].isdigit() or not step.isdigit():
        return None
    return int(head[5:]), int(step)


def resume_checkpoint(run_dir: Path, on_message: Callable[[str], None] | None = None) -> Checkpoint | None:
    """The checkpoint a resumed run continues from: the one `latest.json` names, or, when that one is damaged or
    gone, the newest earlier checkpoint that reads back whole (then `latest.json` is pointed at it, and
    `on_message` says so). None for a run without checkpoints.
    """
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST
    if not pointer.is_file():
        return None
    named = run_dir / read_json(pointer)["path"]
    limit = _stage_step(named.name) or (99, 0)
    older = sorted((p for p in (run_dir / CKPT_DIR).glob("stage*") if p.is_dir() and p != named
                    and (_stage_step(p.name) or limit) < limit), key=lambda p: _stage_step(p.name), reverse=True)
    for path in [named, *older]:
        try:
            ckpt = Checkpoint(path)
        except (DD2Error, OSError, KeyError, ValueError) as exc:
            if on_message is not None:
                on_message(f"checkpoint {path.name} cannot be read ({exc}); trying the one before it")
            continue
        if path != named:
            write_json(pointer, {"stage": ckpt.stage, "step": ckpt.step, "path": f"{CKPT_DIR}/{path.name}"})
            if on_message is not None:
                on_message(f"resuming from {path.name}, the newest checkpoint that reads back whole")
        return ckpt
    raise DD2Error(f"No checkpoint of {run_dir} reads back whole (all are damaged or missing); start a new run with "
                   f"--out.")


def remove_partial_checkpoints(run_dir: Path) -> int:
    """Delete the temporary folders that checkpoint writes cut short by a kill left behind; returns how many."""
    removed = 0
    for tmp in (Path(run_dir) / CKPT_DIR).glob(".stage*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            removed += 1
    return removed


def final_stage1_checkpoint(run_dir: Path) -> Checkpoint | None:
    marks = sorted((Path(run_dir) / CKPT_DIR).glob(f"stage1-*/{FINAL_MARK}"))
    return Checkpoint(marks[-1].parent) if marks else None


def append_metrics(run_dir: Path, record: Mapping[str, Any]) -> None:
    with open(Path(run_dir) / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")


def truncate_metrics(run_dir: Path, stage: int, step: int) -> None:
    """On resume, drop metric lines logged after the checkpoint being resumed (they will be redone)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if (rec.get("stage", 0), rec.get("step", 0)) <= (stage, step):
            keep.append(line)
    atomic_write_bytes(path, ("\n".join(keep) + ("\n" if keep else "")).encode())
