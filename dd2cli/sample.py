"""`dd2 sample`: draw sample sets from a distilled generator, an exported bundle or a teacher.

Modes (method.md §6):

- one step: `q = G(ε, label)`, nearest-codebook ids, the teacher's decoder;
- k steps (paper Alg. 4): the one-step tokens of the first `S − (k−1)` AR steps are kept and the
  teacher re-samples the last `k − 1` steps with its own sampler;
- teacher: the teacher's AR sampler (`S` steps);
- set-prediction baseline (paper App. E.5): every position drawn independently from its marginal
  token frequency given the class, estimated from teacher samples (cached).

Output folder: `000000.png`... (one per global index), `samples_NxHxWx3.npz` in the ADM layout
(`arr_0` uint8 NHWC, labels in `arr_1`; written at the end from the PNGs), `manifest.json` (every
setting, the source's identity, the dd2 version) and `preview.png`.

Determinism: sample `i` depends only on the seed and `i`. Per-index draws (the generator's noise,
the baseline's picks) use a generator seeded by `(seed, i)`; samplers that draw a whole batch with
one `torch.Generator` (the teacher, k-step refinement) work on fixed blocks of `block_size` indices,
each with a generator seeded by `(seed, block)`, so neither `--batch-size` nor the number of ranks
changes any image. A re-run finishes the missing PNGs only; under torchrun rank `r` takes blocks
`r, r+W, ...` and rank 0 writes the npz, the preview and the manifest after a barrier.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from . import __version__
from .errors import DD2Error
from .files import read_json, write_json

#: the indices one `torch.Generator` covers for block-wise samplers (teacher, k-step); part of the settings
DEFAULT_BLOCK_SIZE = 64
#: uniform labels are drawn in chunks of this many indices, each from its own seeded generator
LABEL_BLOCK = 1024
PREVIEW_COUNT = 100
MODE_TAGS = {"one-step": "1step", "k-step": "{k}step", "teacher": "teacher", "set-prediction": "setpred"}


def index_seed(seed: int, stream: str, index: int) -> int:
    """A 63-bit seed for `(seed, stream, index)`: independent streams without collisions."""
    digest = hashlib.sha256(f"dd2-sample/{seed}/{stream}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def png_name(index: int) -> str:
    return f"{index:06d}.png"


# ---- labels ---------------------------------------------------------------------------------------

class LabelSchedule:
    """`uniform` (i.i.d. uniform), `balanced` (`i mod C`: class order, interleaved) or `3,1,4` (cycled).

    A pure function of the index: `schedule(indices)` never depends on `n` or on other indices.
    """

    def __init__(self, text: str, num_classes: int, seed: int) -> None:
        self.text, self.num_classes, self.seed = text.strip().lower(), int(num_classes), int(seed)
        self.values: Optional[list[int]] = None
        if self.text not in ("uniform", "balanced"):
            try:
                self.values = [int(v) for v in self.text.split(",") if v.strip()]
            except ValueError:
                raise DD2Error(f"--labels '{text}' is not uniform, balanced or a comma list of class ids "
                               f"(e.g. 1,7,3).") from None
            if not self.values:
                raise DD2Error("--labels is empty; use uniform, balanced or a comma list of class ids.")
            bad = [v for v in self.values if not 0 <= v < self.num_classes]
            if bad:
                raise DD2Error(f"--labels has class {bad[0]}, outside 0..{self.num_classes - 1}.")

    def __call__(self, indices: Iterable[int]) -> Tensor:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if self.text == "balanced":
            return idx % self.num_classes
        if self.values is not None:
            return torch.tensor(self.values, dtype=torch.long)[idx % len(self.values)]
        blocks = idx.div(LABEL_BLOCK, rounding_mode="floor")
        used = blocks.unique()  # sorted
        draws_UL = torch.stack([
            torch.randint(0, self.num_classes, (LABEL_BLOCK,),
                          generator=torch.Generator().manual_seed(index_seed(self.seed, "labels", int(b))))
            for b in used]) if len(used) else torch.empty(0, LABEL_BLOCK, dtype=torch.long)
        return draws_UL[torch.searchsorted(used, blocks), idx % LABEL_BLOCK]


def labels_from_manifest(manifest: Mapping[str, Any]) -> np.ndarray:
    """The labels of a dd2 sample set, recomputed from its manifest."""
    s = manifest["settings"]
    return LabelSchedule(s["labels"], s["num_classes"], s["seed"])(range(int(manifest["n"]))).numpy()


# ---- request / result / progress ------------------------------------------------------------------

@dataclass
class SampleRequest:
    source: Optional[Path] = None  # --from: a run directory or an exported bundle
    teacher: Optional[str] = None
    teacher_weights: Mapping[str, str] = field(default_factory=dict)
    which: str = "ema"  # ema | raw (run sources)
    steps: Optional[int] = None
    baseline: Optional[str] = None
    baseline_samples: int = 2000
    n: int = 50000
    batch_size: int = 64
    labels: str = "uniform"
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


class Progress:
    """No-op progress sink; the CLI supplies a rich bar with images/s."""

    def start(self, description: str, total: int, completed: int) -> None: ...
    def advance(self, count: int) -> None: ...
    def stop(self) -> None: ...
    def message(self, text: str) -> None: ...


# ---- sources ---------------------------------------------------------------------------------------

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
    parent: Path = Path("samples")  # default folder of new sample sets

    def one_step_images(self, eps_BNd: Tensor, labels_B: Tensor) -> Tensor:
        if self.bundle is not None:
            return self.bundle.generate(labels_B, eps_BNd)
        return self.teacher.decode(self.one_step_tokens(eps_BNd, labels_B))

    def one_step_tokens(self, eps_BNd: Tensor, labels_B: Tensor) -> Tensor:
        return self.teacher.as_tokens(self.generator(eps_BNd, labels_B))


def find_latest_run() -> Path:
    """The newest run under the runs folder that has a stage-2 checkpoint (by mtime of latest.json)."""
    from .distill import default_runs_dir

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


def _run_identity(run_dir: Path, which: str, info: Mapping[str, Any], teacher) -> tuple[dict, str]:
    from .files import fingerprint_file

    latest = read_json(run_dir / "latest.json")
    modules = run_dir / latest["path"] / "modules.safetensors"
    ident = {"kind": "run", "run_dir": str(run_dir.resolve()), "teacher": info["teacher"],
             "teacher_identity": teacher.identity(), "weights": which, "checkpoint": latest["path"],
             "checkpoint_step": int(latest["step"]), "checkpoint_sha256": fingerprint_file(modules)}
    label = "EMA" if which == "ema" else "raw"
    return ident, f"run {run_dir} ({label} generator, stage-2 step {latest['step']}, teacher {info['teacher']})"


def _resolve_source(req: SampleRequest, device: str, progress: Progress) -> _Source:
    from .plugins import get_variant

    if req.source is not None and req.teacher is not None:
        raise DD2Error("Give either --from (a run or a bundle) or --teacher, not both.")
    if req.which not in ("ema", "raw"):
        raise DD2Error(f"--weights '{req.which}' is not ema, raw or KEY=PATH.")
    if req.teacher is not None:
        if req.which != "ema":
            raise DD2Error("--weights raw applies to a distillation run (--from RUN_DIR), not to a teacher.")
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
        import importlib

        try:
            export = importlib.import_module(f"{__package__}.export")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.export":
                raise
            raise DD2Error(f"{path} is an exported bundle, but this dd2 does not support bundles yet (dd2cli.export "
                           f"is missing); sample from the run directory instead.") from None
        from .files import sha256_file

        bundle = export.load_bundle(path, device)
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
    from .distill import load_generator_from_run

    gen, teacher, info = load_generator_from_run(path, device=device, which=req.which)
    ident, describe = _run_identity(path, req.which, info, teacher)
    return _Source("run", req.which, teacher.spec, ident, describe, teacher=teacher, generator=gen.eval(),
                   run_dir=path, parent=path / "samples")


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


# ---- the set-prediction baseline -------------------------------------------------------------------

def _baseline_tokens(src: _Source, settings, count: int, block_size: int, cache_dir: Path, device: str,
                     is_main: bool, progress: Progress) -> tuple[Tensor, Tensor, Path]:
    """`count` teacher samples (balanced labels) whose per-position frequencies define the baseline; cached."""
    from .files import load_safetensors, save_safetensors

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


# ---- output folder -----------------------------------------------------------------------------------

def _normalise(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def _first_difference(a: Any, b: Any, prefix: str = "") -> Optional[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else f"{prefix[:-1]} is {json.dumps(a)} there but {json.dumps(b)} now"


def _new_out_dir(parent: Path, prefix: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = parent / f"{prefix}-{stamp}"
    path, i = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{i}")
        i += 1
    return path


def _find_resumable(parent: Path, prefix: str, settings: dict, n: int) -> Optional[Path]:
    """Without --out: an earlier set of the same command (same settings, not more images) is continued."""
    best, best_t = None, -1.0
    for m in parent.glob(f"{prefix}-*/manifest.json"):
        try:
            old = json.loads(m.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if old.get("settings") == settings and int(old.get("n", 0)) <= n and m.stat().st_mtime > best_t:
            best, best_t = m.parent, m.stat().st_mtime
    return best


def _check_out_dir(out: Path, settings: dict, n: int) -> Optional[dict]:
    """The existing manifest when `out` can be resumed; a DD2Error when it cannot."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise DD2Error(f"{out} exists and is not a folder; choose another --out.")
    manifest = out / "manifest.json"
    if not manifest.is_file():
        if any(out.iterdir()):
            raise DD2Error(f"{out} is not empty and is not a dd2 sample set (no manifest.json); choose another --out.")
        return None
    old = read_json(manifest)
    diff = _first_difference(old.get("settings", {}), settings)
    if diff:
        raise DD2Error(f"{out} holds samples made with other settings ({diff}); resume it with the original "
                       f"settings or choose another --out.")
    if int(old.get("n", 0)) > n:
        raise DD2Error(f"{out} already holds {old['n']} samples; pass -n {old['n']} or more to resume it, or choose "
                       f"another --out.")
    return old


# ---- the engine ------------------------------------------------------------------------------------

def _fresh_eps(indices: Sequence[int], seed: int, shape: tuple[int, int], device: str) -> Tensor:
    """`ε_i` from a CPU generator seeded by `(seed, i)`: the same noise on every device and batch size."""
    out = torch.empty(len(indices), *shape)
    for row, i in enumerate(indices):
        g = torch.Generator().manual_seed(index_seed(seed, "eps", i))
        out[row] = torch.randn(shape, generator=g)
    return out.to(device)


def _chunks(seq: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for s in range(0, len(seq), size):
        yield seq[s:s + size]


def _save_png(path: Path, image_HW3: np.ndarray) -> None:
    import io

    from PIL import Image

    from .files import atomic_write_bytes

    buf = io.BytesIO()
    # level 1: lossless like every level, ~4x faster to encode than PIL's default 6 for ~20 % more bytes,
    # which is what keeps 50k images from being bound by PNG compression
    Image.fromarray(image_HW3).save(buf, format="PNG", compress_level=1)
    atomic_write_bytes(path, buf.getvalue())


class _Writer:
    """PNG encoding and atomic writes on a thread pool; one batch in flight while the next is generated."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.pool = ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2)))
        self.pending: list[Future] = []

    def write(self, indices: Sequence[int], images_B3HW: Tensor) -> None:
        from .images import to_uint8

        arr = to_uint8(images_B3HW).numpy()
        self.wait()
        self.pending = [self.pool.submit(_save_png, self.out / png_name(i), arr[row]) for row, i in enumerate(indices)]

    def wait(self) -> None:
        for f in self.pending:
            f.result()
        self.pending = []

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)


def _read_pngs(out: Path, indices: Sequence[int], pool: ThreadPoolExecutor) -> np.ndarray:
    from .evaluate import _read_image

    return np.stack(list(pool.map(_read_image, [out / png_name(i) for i in indices])))


def _finalise(out: Path, n: int, labels: np.ndarray) -> tuple[Path, Path]:
    """Rank 0: the ADM npz and the preview grid, from the PNGs on disk."""
    from .evaluate import write_adm_npz
    from .images import save_grid

    missing = [i for i in range(n) if not (out / png_name(i)).is_file()]
    if missing:
        raise DD2Error(f"{len(missing)} of {n} images are missing in {out} (e.g. {png_name(missing[0])}); rerun the "
                       f"same command to finish them.")
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:
        first = _read_pngs(out, [0], pool)
        h, w = first.shape[1:3]
        npz = out / f"samples_{n}x{h}x{w}x3.npz"
        for old in out.glob("samples_*x*x*x3.npz"):
            if old != npz:
                old.unlink()
        write_adm_npz(npz, (_read_pngs(out, chunk, pool) for chunk in _chunks(range(n), 256)), n, h, w, labels)
        preview = _read_pngs(out, range(min(n, PREVIEW_COUNT)), pool)
    grid_path = out / "preview.png"
    save_grid(grid_path, torch.from_numpy(preview).permute(0, 3, 1, 2).float() / 255, ncol=10)
    return npz, grid_path


def run(req: SampleRequest, progress: Progress | None = None) -> SampleResult:
    """Sample (or finish) a sample set; see the module docstring."""
    from .distill import resolve_device
    from .distributed import cleanup, init_from_env

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
    from .accel import check_precision

    check_precision(req.precision, device)  # before loading anything
    dist = init_from_env(device)
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
    from .accel import maybe_compile, sampling_context
    from .distributed import barrier

    if req.compile and req.teacher is not None:  # before minutes of loading a teacher
        raise DD2Error(_COMPILE_NEEDS_GENERATOR)
    src = _resolve_source(req, device, progress)
    mode, k = _resolve_mode(req, src)
    if req.compile:
        if src.generator is None:
            raise DD2Error(_COMPILE_NEEDS_GENERATOR)
        src.generator = maybe_compile(src.generator, True)
    spec = src.spec
    schedule = LabelSchedule(req.labels, spec.num_classes, req.seed)
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
        out = _find_resumable(src.parent, prefix, settings, req.n) or _new_out_dir(src.parent, prefix)
    if dist.enabled:  # every rank writes into rank 0's choice (a time stamp may differ between ranks)
        import torch.distributed as tdist

        chosen = [str(out)]
        tdist.broadcast_object_list(chosen, src=0)
        out = chosen[0]
    out = Path(out)
    old = _check_out_dir(out, settings, req.n)
    barrier(dist)  # every rank has read the old manifest before rank 0 rewrites it
    progress.message(f"Source: {src.describe}; mode: {mode}{f' ({k} steps)' if k > 1 else ''}")
    progress.message(f"{'Resuming' if old else 'Writing'} {req.n} samples {'in' if old else 'to'} {out}")
    manifest = {
        "dd2_version": __version__, "complete": False, "n": req.n, "settings": settings, "source": settings["source"],
        "created": (old or {}).get("created") or _dt.datetime.now().isoformat(timespec="seconds"),
    }
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for tmp in out.glob(".[0-9]*.png.*.tmp"):  # PNG writes cut short by a kill (never renamed into place)
            tmp.unlink(missing_ok=True)
        write_json(out / "manifest.json", {**(old or {}), **manifest, "complete": False})
    barrier(dist)

    # 1. which indices are this rank's and still missing
    existing = {e.name for e in os.scandir(out)}
    unit = req.block_size
    my_blocks = range(dist.rank, math.ceil(req.n / unit), dist.world_size)
    mine = [i for b in my_blocks for i in range(b * unit, min((b + 1) * unit, req.n))]
    todo = [i for i in mine if png_name(i) not in existing]
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
                    images = _block_images(src, mode, k, block, schedule, sampling, req, device, b)
                    rows = [i - b * unit for i in wanted]
                    writer.write(wanted, images[rows])
                    progress.advance(len(wanted))
            else:
                for chunk in _chunks(todo, req.batch_size):
                    labels = schedule(chunk).to(device)
                    if mode == "one-step":
                        eps = _fresh_eps(chunk, req.seed, (spec.num_tokens, spec.latent_dim), device)
                        images = src.one_step_images(eps, labels)
                    else:
                        tokens = baseline.tokens(req.seed, chunk, labels.cpu()).to(device)
                        images = src.teacher.decode(tokens)
                    writer.write(chunk, images)
                    progress.advance(len(chunk))
            writer.wait()
    finally:
        writer.close()
        progress.stop()
    result.generated = len(todo)
    result.seconds = time.perf_counter() - t0
    if dist.enabled:  # report the totals over all ranks (the slowest rank's time)
        import torch.distributed as tdist

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
                      and result.generated == 0 and (out / "preview.png").is_file())
        if up_to_date:
            result.npz, result.preview = out / npz_name, out / "preview.png"
            write_json(out / "manifest.json", old)  # as it was before this run marked it incomplete
            progress.message("Nothing to do: every sample is already there.")
        else:
            progress.message("Writing the ADM .npz and the preview grid")
            labels = schedule(range(req.n)).numpy()
            result.npz, result.preview = _finalise(out, req.n, labels)
            final = {**manifest, "complete": True, "npz": result.npz.name, "preview": result.preview.name,
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


def _block_images(src: _Source, mode: str, k: int, block: list[int], schedule: LabelSchedule, sampling,
                  req: SampleRequest, device: str, b: int) -> Tensor:
    """Images of one whole block, drawn with the block's own generator (teacher or k-step)."""
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
    return torch.cat([src.teacher.decode(tokens[s:s + req.batch_size]) for s in range(0, len(block), req.batch_size)])


# ---- speed subjects (dd2 eval speed) -----------------------------------------------------------------

def build_speed_subjects(run_dir: Optional[Path], teacher_name: Optional[str], weights: Mapping[str, str],
                         device: str) -> tuple[Any, Any, dict]:
    """(teacher, one-step generator, info) for timing.

    With `--teacher` only, the generator is an untrained one of the default architecture: its speed
    does not depend on the weights.
    """
    from .plugins import get_variant

    if run_dir is not None and teacher_name is not None:
        raise DD2Error("Give either --from RUN_DIR or --teacher NAME, not both.")
    if teacher_name is not None:
        variant = get_variant(teacher_name)
        teacher = variant.load(dict(weights) or None, device=device).eval().requires_grad_(False)
        gen = untrained_generator(teacher, variant.distill_defaults)
        return teacher, gen, {"teacher": variant.name, "generator": "untrained, default architecture (speed only)"}
    from .distill import load_generator_from_run

    run_dir = Path(run_dir) if run_dir is not None else find_latest_run()
    if not (run_dir / "config.json").is_file():
        raise DD2Error(f"{run_dir} is not a distillation run (no config.json); check the path.")
    gen, teacher, info = load_generator_from_run(run_dir, device=device)
    return teacher, gen, {"teacher": info["teacher"], "generator": f"EMA generator of {run_dir}"}


def untrained_generator(teacher, distill_defaults: Mapping[str, Any] | None = None):
    """A generator of the architecture `dd2 distill` would build for `teacher` (random head; for timing)."""
    from .config import load_settings
    from .heads import MLPHead
    from .networks import ARDiffusion, Generator
    from .settings import DistillSettings

    h = load_settings(DistillSettings, None, (), base=dict(distill_defaults or {})).head
    backbone = teacher.new_backbone().to(teacher.device)
    head = MLPHead(teacher.spec.latent_dim, backbone.feature_dim, h.width, h.depth, h.mlp_ratio).to(teacher.device)
    return Generator(ARDiffusion(backbone, head)).eval().requires_grad_(False)
