"""Run directories and resumable checkpoints.

A run directory holds:

    config.json            the resolved settings (and the teacher variant, weight paths, dd2 version)
    metrics.jsonl          one JSON object per logged step
    latest.json            {"stage": s, "step": k, "path": "checkpoints/stage{s}-{k:07d}"}
    checkpoints/stageS-K/  modules.safetensors, optim.safetensors, state.json
                           (an FSDP run: sharded/, torch.distributed.checkpoint's folder with one file of shards
                           per rank, and rng.safetensors, state.json)
    samples/*.png          sample grids

A checkpoint folder is written under a temporary name and renamed into place, and `latest.json`
(itself written atomically) is updated only after that, so a process killed at any moment leaves
the previous checkpoint as the one to resume from. A resumed run removes the temporary folders of writes that
a kill cut short, and falls back to the newest earlier checkpoint when the latest one is damaged.

Sharded checkpoints never gather a network on one rank: each rank writes its own shards, and a reader with
another number of ranks (or none: `dd2 sample`, `dd2 export`) has torch.distributed.checkpoint re-slice them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..errors import DD2Error, FileFormatError, OutputError, write_failure
from ..files import atomic_write_bytes, fingerprint_file, load_safetensors, read_json, save_safetensors, write_json
from .distributed import load_optimizer_state

CKPT_DIR = "checkpoints"
LATEST = "latest.json"
FINAL_MARK = "FINAL"  # in the last checkpoint of stage 1
SHARDED = "sharded"  # the torch.distributed.checkpoint folder inside a checkpoint written by an FSDP run


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
        _put_in_place(tmp, dest, final)
    except OutputError as exc:  # name the checkpoint, not the temporary file inside it
        shutil.rmtree(tmp, ignore_errors=True)
        raise (write_failure(f"checkpoint {dest}", exc.os_error) if exc.os_error is not None else exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json(run_dir / LATEST, {"stage": stage, "step": step, "path": f"{CKPT_DIR}/{name}"})
    _prune(root, keep, protect=dest)
    return dest


def _put_in_place(tmp: Path, dest: Path, final: bool) -> None:
    """The finished temporary folder becomes the checkpoint (its `final` mark inside it, so both appear at once)."""
    if final:
        (tmp / FINAL_MARK).write_text("")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def save_sharded_checkpoint(run_dir: Path, stage: int, step: int, modules: Mapping[str, torch.nn.Module | Mapping],
                            optimizers: Mapping[str, torch.optim.Optimizer], state: Mapping[str, Any],
                            rng: Mapping[str, torch.Tensor], *, is_main: bool, sync: Callable[[], None], keep: int = 2,
                            final: bool = False) -> Path | None:
    """`save_checkpoint` for FSDP runs, collective: every rank writes the shards it holds of each module and
    optimiser state (torch.distributed.checkpoint), nothing is gathered. An optimiser is keyed like the module it
    updates. Plain state dicts in `modules` (the same on every rank) are written once. Rank 0 finishes the folder
    exactly as `save_checkpoint` does (temporary name, rename, `latest.json`); returns its path there.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    run_dir = Path(run_dir)
    root = run_dir / CKPT_DIR
    name = f"stage{stage}-{step:07d}"
    dest, tmp = root / name, root / f".{name}.partial"  # one name every rank can compute
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    sync()
    content = {"modules": {m: dict(mod) if isinstance(mod, Mapping) else get_model_state_dict(mod)
                           for m, mod in modules.items()},
               "optim": {o: get_optimizer_state_dict(modules[o], opt) for o, opt in optimizers.items()}}
    try:
        dcp.save(content, checkpoint_id=tmp / SHARDED)
    except BaseException:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not is_main:
        sync()
        return None
    try:
        save_safetensors(tmp / "rng.safetensors", {f"rng.{k}": v for k, v in rng.items()})
        write_json(tmp / "state.json", {"stage": stage, "step": step, "format": SHARDED, **state})
        _put_in_place(tmp, dest, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        sync()
        raise
    write_json(run_dir / LATEST, {"stage": stage, "step": step, "path": f"{CKPT_DIR}/{name}"})
    _prune(root, keep, protect=dest)
    sync()
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
    """A loaded checkpoint folder, whole (safetensors) or sharded (an FSDP run's, read on demand)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not (self.path / "state.json").is_file():
            raise FileFormatError(f"{self.path} is not a complete dd2 checkpoint (state.json is missing).")
        self.state = read_json(self.path / "state.json")
        self.sharded = self.state.get("format") == SHARDED
        self._full: dict[str, dict[str, torch.Tensor]] = {}  # module name -> whole tensors read so far (sharded)
        if self.sharded:
            self._metadata = _sharded_metadata(self.path / SHARDED)
            self._names = {k.split(".")[1] for k in self._metadata.state_dict_metadata if k.startswith("modules.")}
            self._extras = self.path / "rng.safetensors"
        else:
            self._names = {k.split(".", 1)[0] for k in _tensor_names(self.path / "modules.safetensors")}
            self._extras = self.path / "optim.safetensors"
            if not self._extras.is_file():
                raise FileFormatError(f"{self.path} is not a complete dd2 checkpoint (optim.safetensors is missing).")
        # the tensors are read when first asked for, and `release` lets them go once the networks hold them
        self._weights: dict[str, torch.Tensor] | None = None
        self._opt: dict[str, torch.Tensor] | None = None  # optimiser states and random streams

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """Every module's tensors of a whole checkpoint (`modules.safetensors`, checked against its hash)."""
        if self._weights is None:
            self._weights, _ = load_safetensors(self.path / "modules.safetensors")
        return self._weights

    @property
    def _opt_tensors(self) -> dict[str, torch.Tensor]:
        if self._opt is None:
            self._opt, _ = load_safetensors(self._extras)
        return self._opt

    def verify(self) -> None:
        """Read every part (a resume needs all of them whole); what is read stays for the restore that follows."""
        if not self.sharded:
            _ = self.weights
        _ = self._opt_tensors

    def release(self) -> None:
        """Drop the tensors read so far (gigabytes at real size): the networks and optimisers hold copies now."""
        self._weights, self._opt, self._full = None, None, {}

    @property
    def stage(self) -> int:
        return int(self.state["stage"])

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def module_state(self, name: str) -> dict[str, torch.Tensor]:
        """The module's whole state dict (a sharded checkpoint is read and re-assembled in this process)."""
        if not self.has_module(name):
            raise FileFormatError(f"Checkpoint {self.path} holds no weights for '{name}'.")
        if not self.sharded:
            prefix = name + "."
            return {k[len(prefix):]: v for k, v in self.weights.items() if k.startswith(prefix)}
        if name not in self._full:
            from torch.distributed.checkpoint.metadata import TensorStorageMetadata

            prefix = f"modules.{name}."
            empty = {k[len(prefix):]: torch.empty(m.size, dtype=m.properties.dtype)
                     for k, m in self._metadata.state_dict_metadata.items()
                     if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
            self._read({"modules": {name: empty}}, collective=False)
            self._full[name] = empty
        return dict(self._full[name])

    def has_module(self, name: str) -> bool:
        return name in self._names

    def load_module(self, name: str, module: torch.nn.Module) -> None:
        module.load_state_dict(self.module_state(name), strict=True)

    def load_sharded_module(self, name: str, module: torch.nn.Module) -> None:
        """Into a module sharded over this run's ranks (collective): each rank reads the slices it holds."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        if not self.has_module(name):
            raise FileFormatError(f"Checkpoint {self.path} holds no weights for '{name}'.")
        sd = get_model_state_dict(module)
        self._read({"modules": {name: sd}}, collective=True)
        set_model_state_dict(module, sd)

    def load_optimizer_into(self, name: str, module: torch.nn.Module, opt: torch.optim.Optimizer,
                            sharded: bool) -> None:
        """Restore the optimiser of `module` (sharded over this run's ranks when `sharded`, collective then)."""
        if not self.sharded:
            load_optimizer_state(module, opt, self.optimizer_state(name), sharded)
            return
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        # a fresh optimiser's state, created with the shapes to read into; parameters the checkpoint holds no state
        # for (a backbone still frozen when it was written) keep Adam's zero start, as in an uninterrupted run
        osd = get_optimizer_state_dict(module, opt)
        self._read({"optim": {name: osd}}, collective=sharded, partial=True)
        set_optimizer_state_dict(module, opt, osd)
        # creating that state took one (zero) step, so a parameter the checkpoint holds no state for would resume
        # with a step count of 1: drop its state, and Adam starts it afresh as the uninterrupted run does
        saved = {k.split(".state.", 1)[1].rsplit(".", 1)[0] for k in self._metadata.state_dict_metadata
                 if k.startswith(f"optim.{name}.state.")}
        for fqn, param in module.named_parameters():
            if fqn not in saved:
                opt.state.pop(param, None)

    def _read(self, state: dict, collective: bool, partial: bool = False) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

        try:
            with warnings.catch_warnings():  # (that one process reads the checkpoint is the point, not a warning)
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                dcp.load(state, checkpoint_id=self.path / SHARDED, no_dist=not collective,
                         planner=DefaultLoadPlanner(allow_partial_load=partial))
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            raise FileFormatError(f"Sharded checkpoint {self.path} cannot be read ({str(exc).splitlines()[0]}); "
                                  f"resume from an earlier one or start a new run.") from None

    def optimizer_moments(self, name: str) -> list[dict[str, torch.Tensor]]:
        """The optimiser's per-parameter tensors (Adam's step and moments), whole, in its parameters' order: the
        same list for a whole and a sharded checkpoint of the same run (to compare them)."""
        if not self.sharded:
            state = self.optimizer_state(name)
            order = [i for group in state["param_groups"] for i in group["params"]]
            return [{k: v for k, v in state["state"][i].items() if torch.is_tensor(v)} for i in order
                    if i in state["state"]]
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        prefix = f"optim.{name}."
        # each group's parameter names are one saved entry (`...param_groups.G.params`); placeholders are replaced
        count = sum(1 for key in self._metadata.state_dict_metadata
                    if key.startswith(prefix + "param_groups.") and key.endswith(".params"))
        groups: dict[str, Any] = {"param_groups": [{"params": None} for _ in range(count)]}
        self._read({"optim": {name: groups}}, collective=False, partial=True)
        tensors: dict[str, dict[str, torch.Tensor]] = {}
        for key, meta in self._metadata.state_dict_metadata.items():
            if key.startswith(prefix + "state.") and isinstance(meta, TensorStorageMetadata):
                fqn, field_name = key[len(prefix + "state."):].rsplit(".", 1)
                tensors.setdefault(fqn, {})[field_name] = torch.empty(meta.size, dtype=meta.properties.dtype)
        self._read({"optim": {name: {"state": tensors}}}, collective=False)
        order = [fqn for group in groups["param_groups"] for fqn in group["params"]]
        return [tensors[fqn] for fqn in order if fqn in tensors]

    def optimizer_state(self, name: str) -> dict:
        if self.sharded:
            raise FileFormatError(f"Checkpoint {self.path} is sharded; restore its optimisers with "
                                  f"load_optimizer_into.")
        return _unflatten_optimizer(self._opt_tensors, self.state["optimizers"][name], name)

    def load_optimizer(self, name: str, opt: torch.optim.Optimizer) -> None:
        opt.load_state_dict(self.optimizer_state(name))

    def rng(self) -> dict[str, torch.Tensor]:
        return {k[4:]: v for k, v in self._opt_tensors.items() if k.startswith("rng.")}


def _tensor_names(path: Path) -> list[str]:
    """The tensor names in a safetensors file's header (nothing else is read)."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileFormatError(f"{path.parent} is not a complete dd2 checkpoint ({path.name} is missing).")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return list(fh.keys())
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise FileFormatError(f"{path} is not a readable safetensors file ({exc}).") from None


def checkpoint_fingerprint(path: Path) -> str:
    """A cheap identity of a checkpoint's weights, whole or sharded (what `dd2 sample` and `dd2 export` record);
    nothing is loaded."""
    path = Path(path)
    if not (path / SHARDED).is_dir():
        return fingerprint_file(path / "modules.safetensors")
    parts = sorted((path / SHARDED).iterdir())
    return hashlib.sha256("".join(f"{p.name}:{fingerprint_file(p)}" for p in parts).encode()).hexdigest()


def _sharded_metadata(folder: Path):
    """The index of a torch.distributed.checkpoint folder, after checking that every shard file it names is there."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as exc:  # a missing or cut .metadata file: any of several errors, all mean "damaged"
        raise FileFormatError(f"Sharded checkpoint {folder.parent} has no readable index ({exc}).") from None
    files = {getattr(info, "relative_path", None) for info in (metadata.storage_data or {}).values()}
    missing = sorted(f for f in files if f and not (folder / f).is_file())
    if missing:
        raise FileFormatError(f"Sharded checkpoint {folder.parent} lacks {', '.join(missing)}.")
    return metadata


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
            ckpt.verify()
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
