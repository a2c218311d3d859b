"""`dd2 sample`: draw sample sets from a distilled generator, an exported bundle or a teacher.

Modes (docs/method.md §6):

- one step: `q = G(ε, label)`, nearest-codebook ids, the teacher's decoder;
- k steps (paper Alg. 4): the one-step tokens of the first `S − (k−1)` AR steps are kept and the
  teacher re-samples the last `k − 1` steps with its own sampler;
- teacher: the teacher's AR sampler (`S` steps);
- set-prediction baseline (paper App. E.5): every position drawn independently from its marginal
  token frequency given the class, estimated from teacher samples (cached).

Output folder: `000000.png`... (one per global index), `samples_NxHxWx3.npz` in the ADM layout
(`arr_0` uint8 NHWC, labels in `arr_1`; written at the end from the PNGs), `manifest.json` (every
setting, the source's identity, the dd2 version), `preview.png` and `tokens.npy`: the token ids of every
sample, rows in index order (one step: the nearest codebook entry of each generated latent, with its distance in
`token_distances.npy`), written per batch under `ids-parts/` like the PNGs, so an interrupted set resumes.

Determinism: sample `i` depends only on the seed and `i`. Per-index draws (the generator's noise,
the baseline's picks) use a generator seeded by `(seed, i)`; samplers that draw a whole batch with
one `torch.Generator` (the teacher, k-step refinement) work on fixed blocks of `block_size` indices,
each with a generator seeded by `(seed, block)`, so neither `--batch-size` nor the number of ranks
changes any image. A re-run finishes the missing PNGs only; under torchrun rank `r` takes blocks
`r, r+W, ...` and rank 0 writes the npz, the preview and the manifest after a barrier.

One writer per folder: the job's rank 0 holds the folder's lock (`sample_sets.SampleFolderLock`) from before it
reads the old manifest until the final manifest is written; another `dd2 sample` aimed at the folder is refused
with nothing written.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as tdist
from torch import Tensor

from ..errors import DD2Error
from ..files import load_safetensors, read_json, save_safetensors, sha256_file, write_json
from ..plugins import get_variant
from ..teacher import nearest_codebook
from ..version import __version__
from .bundle import load_bundle
from .checkpoint import checkpoint_fingerprint
from .distributed import DistInfo, barrier, cleanup, init_from_env
from .labels import LabelSchedule, index_seed
from .progress import Progress
from .runs import find_latest_run, load_generator_from_run, new_folder
from .runtime import check_precision, maybe_compile, resolve_device, sampling_context
from .sample_sets import (
    IDS_PARTS,
    SampleFolderLock,
    _check_out_dir,
    _finalise,
    _find_resumable,
    _normalise,
    _Writer,
    assemble_ids,
    chunks,
    indices_with_ids,
    npz_is_readable,
    png_name,
    remove_stale_temporaries,
    write_ids_part,
)

#: the indices one `torch.Generator` covers for block-wise samplers (teacher, k-step); part of the settings
DEFAULT_BLOCK_SIZE = 64
MODE_TAGS = {"one-step": "1step", "k-step": "{k}step", "teacher": "teacher", "set-prediction": "setpred"}


@dataclass
class SampleRequest:
    source: Optional[Path] = None  # --from: a run directory or an exported bundle
    teacher: Optional[str] = None
    teacher_weights: Mapping[str, str] = field(default_factory=dict)
    which: str = "ema"  # ema | raw (run sources)
    steps: Optional[int] = None
    baseline: Optional[str] = None
    baseline_samples: int = 2000
    n: int = 1000  # a quick look; the ADM protocol's 50,000 is asked for explicitly
    batch_size: int = 64
    labels: str = "auto"  # balanced when the class count divides n, else uniform
    seed: int = 0
    cfg: Optional[float] = None
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    temperature: Optional[float] = None
    block_size: int = DEFAULT_BLOCK_SIZE
    out: Optional[Path] = None
    device: str = "auto"
    precision: str = "fp32"  # fp32 | bf16 (CUDA autocast; changes the images, so it is part of the settings)
    compile: bool = False  # torch.compile the one-step generator (same images up to kernel rounding)
    #: shard the set over the torchrun processes (from the environment); False: this process alone, as rank 0
    #: does for the quality report at the end of `dd2 distill` after the others have finished
    distributed: bool = True


@dataclass
class SampleResult:
    out_dir: Path
    n: int
    mode: str
    source: str  # one line, for the user
    generated: int = 0  # images made by this invocation (this rank)
    existing: int = 0  # found already written (resume)
    npz: Optional[Path] = None
    preview: Optional[Path] = None
    manifest: Optional[Path] = None
    seconds: float = 0.0
    images_per_s: float = 0.0


@dataclass
class _Source:
    kind: str  # run | bundle | teacher
    tag: str  # folder-name prefix
    spec: Any  # TeacherSpec (or a bundle's TeacherSpec-like)
    identity: dict
    describe: str
    teacher: Any = None
    generator: Any = None
    bundle: Any = None
    run_dir: Optional[Path] = None
    parent: Path = Path("dd2-samples")  # default folder of new sample sets (a teacher's: not under a run)

    def one_step(self, eps_BNd: Tensor, labels_B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Images, the nearest-codebook ids of the generated latents and each latent's distance to its code."""
        if self.bundle is not None:
            q_BNd, codebook_Vd = self.bundle.latents(labels_B, eps_BNd), self.bundle.codebook_Vd
            decode = lambda ids: self.bundle.decoder(ids).float()
        else:
            q_BNd, codebook_Vd, decode = self.generator(eps_BNd, labels_B), self.teacher.codebook(), self.teacher.decode
        q_BNd = q_BNd.to(codebook_Vd.dtype)
        ids_BN = nearest_codebook(q_BNd, codebook_Vd)
        return decode(ids_BN), ids_BN, (q_BNd - codebook_Vd[ids_BN]).norm(dim=-1)

    def one_step_tokens(self, eps_BNd: Tensor, labels_B: Tensor) -> Tensor:
        return self.teacher.as_tokens(self.generator(eps_BNd, labels_B))


def _run_identity(run_dir: Path, which: str, info: Mapping[str, Any], teacher) -> tuple[dict, str]:
    latest = read_json(run_dir / "latest.json")
    ident = {"kind": "run", "run_dir": str(run_dir.resolve()), "teacher": info["teacher"],
             "teacher_identity": teacher.identity(), "weights": which, "checkpoint": latest["path"],
             "checkpoint_step": int(latest["step"]), "checkpoint_sha256": checkpoint_fingerprint(run_dir / latest["path"])}
    label = "EMA" if which == "ema" else "raw"
    return ident, f"run {run_dir} ({label} generator, stage-2 step {latest['step']}, teacher {info['teacher']})"


def _resolve_source(req: SampleRequest, device: str, progress: Progress) -> _Source:

    if req.source is not None and req.teacher is not None:
        raise DD2Error("Give either --from (a run or a bundle) or --teacher, not both.")
    if req.which not in ("ema", "raw"):
        raise DD2Error(f"--generator '{req.which}' is not ema or raw.")
    if req.teacher is not None:
        if req.which != "ema":
            raise DD2Error("--generator raw applies to a distillation run (--from RUN_DIR), not to a teacher.")
        variant = get_variant(req.teacher)
        teacher = variant.load(dict(req.teacher_weights) or None, device=device).eval().requires_grad_(False)
        ident = {"kind": "teacher", "teacher": variant.name, "teacher_identity": teacher.identity()}
        return _Source("teacher", variant.name, teacher.spec, ident, f"teacher {variant.name}", teacher=teacher)
    if req.teacher_weights:
        raise DD2Error("--weights KEY=PATH applies to --teacher; a run uses the weight files recorded in its "
                       "config.json.")
    path = req.source
    if path is None:
        path = find_latest_run()
        progress.message(f"Sampling from the most recent run: {path}")
    path = Path(path)
    if (path / "bundle.json").is_file():
        bundle = load_bundle(path, device)
        ident = {"kind": "bundle", "bundle": str(path.resolve()), "bundle_sha256": sha256_file(path / "bundle.json")}
        if callable(getattr(bundle, "identity", None)):
            ident.update(bundle.identity())
        ident.setdefault("teacher", getattr(bundle, "teacher_name", None) or read_json(path / "bundle.json").get(
            "teacher", path.name))
        return _Source("bundle", path.name, bundle.spec, ident, f"bundle {path}", bundle=bundle,
                       teacher=getattr(bundle, "teacher", None))
    if not (path / "config.json").is_file():
        raise DD2Error(f"{path} is neither a distillation run (no config.json) nor an exported bundle (no "
                       f"bundle.json); check the path.")

    gen, teacher, info = load_generator_from_run(path, device=device, which=req.which)
    ident, describe = _run_identity(path, req.which, info, teacher)
    return _Source("run", req.which, teacher.spec, ident, describe, teacher=teacher, generator=gen.eval(),
                   run_dir=path, parent=path / "samples")


def _recorded_labels(out: Optional[Path]) -> Optional[str]:
    """The label schedule of the sample set already at `out`, if there is a readable one."""
    try:
        return str(read_json(Path(out) / "manifest.json")["settings"]["labels"]) if out is not None else None
    except (OSError, DD2Error, KeyError, TypeError):
        return None


def _resolve_mode(req: SampleRequest, src: _Source) -> tuple[str, int]:
    num_steps = getattr(src.spec, "num_steps", None)
    if req.baseline is not None:
        if req.baseline != "set-prediction":
            raise DD2Error(f"Unknown --baseline '{req.baseline}'; the only baseline is set-prediction.")
        if src.teacher is None:
            raise DD2Error("The set-prediction baseline needs a teacher; use --teacher NAME or --from RUN_DIR.")
        if req.steps not in (None, 1):
            raise DD2Error("The set-prediction baseline is one step; drop --steps.")
        return "set-prediction", 1
    if src.kind == "teacher":
        if req.steps is not None and req.steps != num_steps:
            raise DD2Error(f"Teacher {src.tag} samples in its own {num_steps} steps; drop --steps (or pass --steps "
                           f"{num_steps}), or use --from RUN_DIR for k-step sampling with a distilled generator.")
        return "teacher", num_steps
    steps = 1 if req.steps is None else req.steps
    if steps < 1:
        raise DD2Error(f"--steps must be at least 1, got {steps}.")
    if steps == 1:
        return "one-step", 1
    if src.teacher is None:
        raise DD2Error("k-step sampling needs the teacher, which this bundle does not carry; use --from RUN_DIR.")
    if steps > num_steps:
        raise DD2Error(f"--steps {steps} is more than the teacher's {num_steps} AR steps; use 1..{num_steps}.")
    return "k-step", steps


def _sampling_settings(req: SampleRequest, spec) -> Any:
    if req.top_k is not None and req.top_k < 0:
        raise DD2Error(f"--top-k must be >= 0 (0 keeps all tokens), got {req.top_k}.")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise DD2Error(f"--top-p must be in (0, 1], got {req.top_p}.")
    if req.temperature is not None and not req.temperature > 0:
        raise DD2Error(f"--temperature must be > 0, got {req.temperature}.")
    base = getattr(spec, "evaluation", None)
    if base is None:
        return None
    return base.with_overrides(cfg=req.cfg, top_k=req.top_k, top_p=req.top_p, temperature=req.temperature)


def _baseline_tokens(src: _Source, settings, count: int, block_size: int, cache_dir: Path, device: str,
                     is_main: bool, progress: Progress) -> tuple[Tensor, Tensor, Path]:
    """`count` teacher samples (balanced labels) whose per-position frequencies define the baseline; cached."""

    spec = src.spec
    if count < spec.num_classes:
        raise DD2Error(f"--baseline-samples {count} is fewer than the {spec.num_classes} classes; use at least "
                       f"{spec.num_classes} (the marginals are estimated per class).")
    key_data = {"teacher": src.identity.get("teacher_identity", src.identity.get("teacher")),
                "sampling": settings.as_dict(), "count": count, "block_size": block_size}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()[:16]
    name = str(src.identity.get("teacher", "teacher")).replace("/", "_")
    path = cache_dir / f"set-prediction-{name}-{count}-{key}.safetensors"
    if path.is_file():
        try:
            tensors, _ = load_safetensors(path)
            return tensors["tokens"].long(), tensors["labels"].long(), path
        except (DD2Error, KeyError):
            pass  # damaged: redraw
    progress.message(f"Drawing {count} teacher samples for the set-prediction marginals (cached in {path})")
    tokens, labels = [], []
    for b in range(math.ceil(count / block_size)):
        idx = range(b * block_size, (b + 1) * block_size)
        lab = torch.tensor([i % spec.num_classes for i in idx], device=device)
        g = torch.Generator(device=device).manual_seed(index_seed(0, "baseline-data", b))
        with torch.no_grad():
            tokens.append(src.teacher.sample(lab, settings, generator=g).cpu())
        labels.append(lab.cpu())
    tok, lab = torch.cat(tokens)[:count], torch.cat(labels)[:count]
    if is_main:
        save_safetensors(path, {"tokens": tok.to(torch.int32), "labels": lab},
                         {"what": "dd2 set-prediction baseline: teacher samples", "key": json.dumps(key_data, default=str)})
    return tok, lab, path


class _SetPrediction:
    """Every position independently from its empirical per-class marginal: pick, per position, the token of
    a uniformly drawn teacher sample of the same class (exactly the marginal frequency, no V-sized tables)."""

    def __init__(self, tokens_MN: Tensor, labels_M: Tensor, num_classes: int) -> None:
        self.tokens_MN = tokens_MN
        self.pools = [torch.nonzero(labels_M == c).flatten() for c in range(num_classes)]

    def tokens(self, seed: int, indices: Sequence[int], labels_B: Tensor) -> Tensor:
        n = self.tokens_MN.shape[1]
        out = torch.empty(len(indices), n, dtype=torch.long)
        pos_N = torch.arange(n)
        for row, (i, c) in enumerate(zip(indices, labels_B.tolist())):
            pool = self.pools[c]
            g = torch.Generator().manual_seed(index_seed(seed, "set-prediction", i))
            pick_N = torch.randint(0, len(pool), (n,), generator=g)
            out[row] = self.tokens_MN[pool[pick_N], pos_N]
        return out


def _fresh_eps(indices: Sequence[int], seed: int, shape: tuple[int, int], device: str) -> Tensor:
    """`ε_i` from a CPU generator seeded by `(seed, i)`: the same noise on every device and batch size."""
    out = torch.empty(len(indices), *shape)
    for row, i in enumerate(indices):
        g = torch.Generator().manual_seed(index_seed(seed, "eps", i))
        out[row] = torch.randn(shape, generator=g)
    return out.to(device)


def run(req: SampleRequest, progress: Progress | None = None) -> SampleResult:
    """Sample (or finish) a sample set; see the module docstring."""

    progress = progress or Progress()
    if req.n <= 0:
        raise DD2Error(f"Nothing to sample: -n must be at least 1, got {req.n}.")
    if req.batch_size <= 0:
        raise DD2Error(f"--batch-size must be positive, got {req.batch_size}.")
    if req.block_size <= 0:
        raise DD2Error(f"--block-size must be positive, got {req.block_size}.")
    if req.baseline_samples <= 0:
        raise DD2Error(f"--baseline-samples must be positive, got {req.baseline_samples}.")
    device = resolve_device(req.device)

    check_precision(req.precision, device)  # before loading anything
    dist = init_from_env(device) if req.distributed else DistInfo()
    if dist.enabled and device.startswith("cuda"):
        device = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_main:
        progress = Progress()
    try:
        return _run(req, device, dist, progress)
    finally:
        cleanup(dist)
_COMPILE_NEEDS_GENERATOR = ("--compile applies to a distilled generator (--from RUN_DIR); drop it for a teacher or "
                            "a bundle.")


def _run(req: SampleRequest, device: str, dist, progress: Progress) -> SampleResult:
    if req.compile and req.teacher is not None:  # before minutes of loading a teacher
        raise DD2Error(_COMPILE_NEEDS_GENERATOR)
    src = _resolve_source(req, device, progress)
    mode, k = _resolve_mode(req, src)
    if req.compile:
        if src.generator is None:
            raise DD2Error(_COMPILE_NEEDS_GENERATOR)
        src.generator = maybe_compile(src.generator, True)
    spec = src.spec
    labels = req.labels
    if labels.strip().lower() == "auto":  # every class the same count when it can be: what evaluation tables expect
        # (a set being extended keeps the labels it was started with)
        labels = _recorded_labels(req.out) or ("balanced" if req.n % spec.num_classes == 0 else "uniform")
    schedule = LabelSchedule(labels, spec.num_classes, req.seed)
    sampling = _sampling_settings(req, spec)
    uses_sampling = mode in ("teacher", "k-step", "set-prediction")
    blockwise = mode in ("teacher", "k-step")
    settings = _normalise({
        "source": src.identity, "mode": mode, "steps": k, "labels": schedule.text, "seed": req.seed,
        "num_classes": spec.num_classes, "image_size": spec.image_size,
        "sampling": sampling.as_dict() if uses_sampling and sampling is not None else None,
        "block_size": req.block_size if blockwise or mode == "set-prediction" else None,
        "baseline_samples": req.baseline_samples if mode == "set-prediction" else None,
        # only when not the default, so that manifests written before this option still match
        **({"precision": req.precision} if req.precision != "fp32" else {}),
    })
    prefix = f"{src.tag}-{MODE_TAGS[mode].format(k=k)}"
    out = req.out
    if out is None:
        out = _find_resumable(src.parent, prefix, settings, req.n) or new_folder(src.parent, prefix)
    if dist.enabled:  # every rank writes into rank 0's choice (a time stamp may differ between ranks)
        chosen = [str(out)]
        tdist.broadcast_object_list(chosen, src=0)
        out = chosen[0]
    out = Path(out)
    _check_out_dir(out, settings, req.n)  # a folder that is not a dd2 sample set gets no lock file
    lock = _lock_for_job(out, dist)
    try:
        return _write_set(req, src, mode, k, schedule, sampling, settings, out, device, dist, progress)
    finally:
        if lock is not None:
            lock.release()


def _lock_for_job(out: Path, dist) -> Optional[SampleFolderLock]:
    """Rank 0 takes the folder's lock for the whole job; every rank refuses when it is held by someone else.

    All ranks of one torchrun job write into the folder (each its own blocks), so a lock per process would shut
    out the job's own ranks. Rank 0 holds it for the job instead, from before anyone reads the old manifest
    until after the final one is written (rank 0 is the last to touch the folder), and tells the other ranks
    whether it got it: another job's ranks, like a second single process, stop before writing anything.
    """
    lock, refusal = None, None
    if dist.is_main:
        lock = SampleFolderLock(out)
        try:
            lock.acquire()
        except DD2Error as exc:
            lock, refusal = None, str(exc)
    if dist.enabled:
        shared = [refusal]
        tdist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal is not None:
        raise DD2Error(refusal)
    return lock


def _write_set(req: SampleRequest, src: _Source, mode: str, k: int, schedule: LabelSchedule, sampling,
               settings: dict, out: Path, device: str, dist, progress: Progress) -> SampleResult:
    """Write (or finish) the sample set in `out`; the caller holds the folder's lock."""
    spec = src.spec
    blockwise = mode in ("teacher", "k-step")
    old = _check_out_dir(out, settings, req.n)  # again, under the lock: a writer before us may have changed it
    barrier(dist)  # every rank has read the old manifest before rank 0 rewrites it
    progress.message(f"Source: {src.describe}; mode: {mode}{f' ({k} steps)' if k > 1 else ''}")
    progress.message(f"{'Resuming' if old else 'Writing'} {req.n} samples {'in' if old else 'to'} {out}")
    # token ids are kept for every set started by a dd2 that writes them (a set finished before keeps its images)
    keep_ids = old is None or bool(old.get("ids_parts"))
    manifest = {
        "dd2_version": __version__, "complete": False, "n": req.n, "settings": settings, "source": settings["source"],
        "created": (old or {}).get("created") or _dt.datetime.now().isoformat(timespec="seconds"),
        "ids_parts": keep_ids,
    }
    if dist.is_main:
        # writes cut short by a kill (never renamed into place); under the lock no live writer owns one
        remove_stale_temporaries(out)
        write_json(out / "manifest.json", {**(old or {}), **manifest, "complete": False})
    barrier(dist)

    # 1. which indices are this rank's and still missing
    existing = {e.name for e in os.scandir(out)}
    unit = req.block_size
    my_blocks = range(dist.rank, math.ceil(req.n / unit), dist.world_size)
    mine = [i for b in my_blocks for i in range(b * unit, min((b + 1) * unit, req.n))]
    with_ids = indices_with_ids(out) if keep_ids else None
    todo = [i for i in mine if png_name(i) not in existing or (with_ids is not None and i not in with_ids)]
    result = SampleResult(out_dir=out, n=req.n, mode=mode, source=src.describe, existing=len(mine) - len(todo))

    # 2. generate and write
    baseline = None
    if mode == "set-prediction" and todo:
        cache_dir = src.run_dir / "baseline" if src.run_dir is not None else out.parent / ".cache"
        tok, lab, _ = _baseline_tokens(src, sampling, req.baseline_samples, req.block_size, cache_dir, device,
                                       dist.is_main, progress)
        baseline = _SetPrediction(tok, lab, spec.num_classes)
    writer = _Writer(out)
    t0 = time.perf_counter()
    progress.start(f"{mode} samples", len(mine), len(mine) - len(todo))
    try:
        with sampling_context(req.precision, device):
            if blockwise:
                todo_set = set(todo)
                for b in my_blocks:
                    block = list(range(b * unit, (b + 1) * unit))  # always the whole block: i never sees n
                    wanted = [i for i in block if i in todo_set]
                    if not wanted:
                        continue
                    rows = [i - b * unit for i in wanted]
                    images, tokens = _block_images(src, mode, k, block, rows, schedule, sampling, req, device, b)
                    if keep_ids:  # before the images: an image on disk always has its ids
                        write_ids_part(out, wanted, tokens)
                    writer.write(wanted, images)
                    progress.advance(len(wanted))
            else:
                for chunk in chunks(todo, req.batch_size):
                    labels = schedule(chunk).to(device)
                    distance = None
                    if mode == "one-step":
                        eps = _fresh_eps(chunk, req.seed, (spec.num_tokens, spec.latent_dim), device)
                        images, tokens, distance = src.one_step(eps, labels)
                    else:
                        tokens = baseline.tokens(req.seed, chunk, labels.cpu()).to(device)
                        images = src.teacher.decode(tokens)
                    if keep_ids:
                        write_ids_part(out, chunk, tokens, distance)
                    writer.write(chunk, images)
                    progress.advance(len(chunk))
            writer.wait()
    finally:
        writer.close()
        progress.stop()
    result.generated = len(todo)
    result.seconds = time.perf_counter() - t0
    if dist.enabled:  # report the totals over all ranks (the slowest rank's time)
        totals = torch.tensor([result.generated, result.existing, result.seconds], dtype=torch.float64,
                              device=device)
        tdist.all_reduce(totals[:2])
        tdist.all_reduce(totals[2:], op=tdist.ReduceOp.MAX)
        result.generated, result.existing, result.seconds = int(totals[0]), int(totals[1]), float(totals[2])
    result.images_per_s = result.generated / result.seconds if result.seconds > 0 and result.generated else 0.0

    # 3. rank 0: npz, preview, manifest (after every rank has written its PNGs)
    barrier(dist)
    if dist.is_main:
        npz_name = None
        try:
            npz_name = next(iter(out.glob(f"samples_{req.n}x*x*x3.npz"))).name
        except StopIteration:
            pass
        up_to_date = (old is not None and old.get("complete") and int(old.get("n", 0)) == req.n and npz_name
                      and result.generated == 0 and (out / "preview.png").is_file()
                      and (not keep_ids or (out / old.get("tokens", "-")).is_file())
                      and npz_is_readable(out / npz_name, req.n))  # an npz damaged since is written again
        if up_to_date:
            result.npz, result.preview = out / npz_name, out / "preview.png"
            write_json(out / "manifest.json", old)  # as it was before this run marked it incomplete
            progress.message("Nothing to do: every sample is already there.")
        else:
            progress.message("Writing the ADM .npz and the preview grid")
            labels = schedule(range(req.n)).numpy()
            result.npz, result.preview = _finalise(out, req.n, labels)
            ids_files = {}
            if keep_ids:
                tokens_path, distances_path = assemble_ids(out, req.n, spec.vocab_size)
                ids_files = {"tokens": tokens_path.name, "ids_source": _IDS_SOURCE[mode],
                             **({"token_distances": distances_path.name} if distances_path else {})}
            else:
                progress.message(f"No token ids for this set: it was started before dd2 wrote them ({IDS_PARTS}/).")
            final = {**manifest, **ids_files, "complete": True, "npz": result.npz.name, "preview": result.preview.name,
                     "finished": _dt.datetime.now().isoformat(timespec="seconds"),
                     "label_counts": np.bincount(labels, minlength=spec.num_classes).tolist(),
                     "last_invocation": {"generated": result.generated, "seconds": round(result.seconds, 3),
                                         "images_per_s": round(result.images_per_s, 3),
                                         "world_size": dist.world_size, "device": device,
                                         "batch_size": req.batch_size}}
            write_json(out / "manifest.json", final)
        result.manifest = out / "manifest.json"
    barrier(dist)
    return result


#: what the ids in `tokens.npy` are, per mode (the manifest says it)
_IDS_SOURCE = {"one-step": "nearest codebook entry of each generated latent", "k-step": "sampled token ids",
               "teacher": "sampled token ids", "set-prediction": "sampled token ids"}


def _block_images(src: _Source, mode: str, k: int, block: list[int], rows: list[int], schedule: LabelSchedule,
                  sampling, req: SampleRequest, device: str, b: int) -> tuple[Tensor, Tensor]:
    """Images and token ids of the `rows` of one block. The tokens of the whole block are drawn with the block's
    own generator (teacher or k-step), so a sample does not depend on how many were asked for; only the rows kept
    are decoded (at 256 px a CPU decodes a few images a second at best)."""
    spec = src.spec
    labels = schedule(block).to(device)
    g = torch.Generator(device=device).manual_seed(index_seed(req.seed, "block", b))
    if mode == "teacher":
        tokens = src.teacher.sample(labels, sampling, generator=g)
    else:
        # 1. one-step tokens (per-index noise, chunked by --batch-size: rows are independent)
        parts = []
        for s in range(0, len(block), req.batch_size):
            eps = _fresh_eps(block[s:s + req.batch_size], req.seed, (spec.num_tokens, spec.latent_dim), device)
            parts.append(src.one_step_tokens(eps, labels[s:s + req.batch_size]))
        prefix = torch.cat(parts)
        # 2. the teacher re-samples the last k−1 AR steps given the earlier ones (paper Alg. 4)
        tokens = src.teacher.sample(labels, sampling, prefix_BN=prefix, start_step=spec.num_steps - (k - 1),
                                    generator=g)
    tokens = tokens[rows]
    images = torch.cat([src.teacher.decode(tokens[s:s + req.batch_size]) for s in range(0, len(rows), req.batch_size)])
    return images, tokens
