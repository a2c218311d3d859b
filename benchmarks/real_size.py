"""The user's whole path at real model shapes on CPU, through the public CLI, with random official-layout weights.

    python benchmarks/real_size.py --smallest                  # llamagen-b, fewest updates (CI's slow test)
    python benchmarks/real_size.py --json-out real_size.json   # llamagen-b and var-d16

For each teacher it writes random weights in the layout of the released files (`--weights KEY=PATH`, the names
and wrappers the variant's loader expects), then runs, each as its own `dd2` (or `torchrun -m dd2cli`) process
with `DD2_OFFLINE=1`: a short `dd2 distill` through every phase (stage 1 with VAR's head-only steps, the flow-map
phase where it is on, stage 2 with K guidance updates, checkpoints every update); the same run SIGKILLed once its
first checkpoint exists and finished with `--resume`; the run again under torchrun with `parallel=ddp` and with
`parallel=fsdp` (gloo, 2 processes); `dd2 sample` sharded over 2 processes, with `--steps 2`, and from the teacher;
`dd2 eval fid / is / prec-recall` with a random-weight Inception file against a 256 px reference batch in the ADM
layout; `dd2 export --format pt2`; and `dd2cli.load_generator` on the bundle drawing one image. `--smallest`
leaves out the uninterrupted `dd2 distill`: its killed and resumed run, which passes through every phase too, is
the one sampled and exported. LlamaGen's flow-map phase stays off, as in its defaults (one teacher pass per token,
256, per update).

Every step is timed (wall seconds of the process) and its peak resident memory recorded: the kernel's high-water
mark of the largest single process of the step (`ru_maxrss` from `wait4`: the dd2 process itself, or, under
torchrun, its largest worker), not a sum over processes; it includes the pages of torch's own libraries (about
0.8 GiB after `import torch` here). A step whose processes would not fit this machine is not
started when a measured peak already shows it (2 data-parallel workers need twice the single process's peak),
and is stopped the moment MemAvailable falls below a floor otherwise; either way its row says "does not fit"
with the numbers. Times on a small shared CPU are indicative only.

Prints a table (teacher, step, wall time, peak RSS, status) and writes the same rows as JSON (`--json-out`);
exits 1 when a step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
TEACHERS = ("llamagen-b", "var-d16")
#: torch-fidelity's file name; `dd2 eval --inception-weights` takes any path, the name only keeps it recognisable
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
SAMPLE_COUNT = 16  # images of the sharded sample set, evaluated against the reference
REFERENCE_COUNT = 16  # images of the reference batch (precision/recall needs more than k = 3)
#: a step is stopped when the machine's MemAvailable falls below this (the kernel's OOM killer is close)
MEMORY_FLOOR = 1536 << 20
GiB = 1 << 30


# ---- random weights in the official layouts (run in a child process: `--write-weights`) -------------------

def write_weights(teacher: str, folder: Path) -> dict[str, Path]:
    """The variant's weight files with random weights, under the released names and in the released layouts.

    Both families' modules name their parameters as the official checkpoints do. LlamaGen's `.pt` files wrap the
    state dict in {"model": ...}; VAR's `.pth` files are the bare state dict. The weights are "lively": VAR's
    `new_teacher` draws large AdaLN gates and head weights (its training initialisation zeroes parts of them, so
    blocks would not shape the logits); LlamaGen's modules keep torch's default initialisation, which has no
    zeroed projection.
    """
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if teacher == "llamagen-b":
        from dd2_llamagen.gpt import GPTConfig, LlamaGenGPT
        from dd2_llamagen.vq import VQConfig, VQModel

        files = {"gpt": folder / "c2i_B_256.pt", "vq": folder / "vq_ds16_c2i.pt"}
        torch.save({"model": LlamaGenGPT(GPTConfig.named("B", 256)).state_dict()}, files["gpt"])
        torch.save({"model": VQModel(VQConfig()).state_dict()}, files["vq"])
    elif teacher == "var-d16":
        from dd2_var.config import vae_config, var_config
        from dd2_var.teacher import new_teacher

        var_cfg = var_config(16)
        random = new_teacher(var_cfg, vae_config(var_cfg.patch_nums), seed=0, lively=True)
        files = {"var": folder / "var_d16.pth", "vae": folder / "vae_ch160v4096z32.pth"}
        torch.save(random.var.state_dict(), files["var"])
        torch.save(random.vae.state_dict(), files["vae"])
    else:
        raise SystemExit(f"real_size.py writes weights for {', '.join(TEACHERS)}, not '{teacher}'.")
    return files


def write_eval_files(folder: Path) -> tuple[Path, Path]:
    """A random-weight InceptionV3 in torch-fidelity's layout, and a 256 px reference batch in the ADM layout."""
    import numpy as np
    import torch

    from dd2cli.engine.features import inception_network

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = inception_network(None)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):  # He initialisation keeps the activations O(1) through 94 layers
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    weights = folder / INCEPTION_FILE
    torch.save(net.state_dict(), weights)
    # the ADM layout: arr_0 uint8 NHWC images, arr_1 int labels; smooth random images (upsampled 8x8 noise), so
    # the features are not those of white noise
    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.random((REFERENCE_COUNT, 3, 8, 8), dtype=np.float32))
    images = torch.nn.functional.interpolate(coarse, size=(256, 256), mode="bicubic", align_corners=False)
    arr_0 = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    reference = folder / "reference_256.npz"
    np.savez(reference, arr_0=arr_0, arr_1=np.arange(REFERENCE_COUNT, dtype=np.int64))
    return weights, reference


def load_bundle(bundle: Path) -> None:
    """`dd2cli.load_generator` on an exported bundle: one image, checked; then the `generator.pt2` program if any."""
    import torch

    import dd2cli

    gen = dd2cli.load_generator(bundle)
    image = gen([0], seed=0)
    size = gen.image_size
    if tuple(image.shape) != (1, 3, size, size) or not torch.isfinite(image).all():
        raise SystemExit(f"load_generator({bundle}) drew an image of shape {tuple(image.shape)}, not (1, 3, {size}, "
                         f"{size}), or one with non-finite values.")
    pt2 = bundle / "generator.pt2"
    if pt2.is_file():
        program = torch.export.load(str(pt2)).module()
        out = program(torch.tensor([0]), gen.noise(1, seed=0))
        if tuple(out.shape) != (1, size, size, 3) or out.dtype != torch.uint8:
            raise SystemExit(f"{pt2} returned {tuple(out.shape)} {out.dtype}, not (1, {size}, {size}, 3) uint8.")
    print(f"one {size}x{size} image from {bundle}" + (" and from generator.pt2" if pt2.is_file() else ""))


# ---- running one step ---------------------------------------------------------------------------------------

@dataclass
class Row:
    teacher: str
    step: str
    seconds: float | None = None
    peak_rss_bytes: int | None = None
    status: str = "ok"  # ok | does not fit | FAILED
    detail: str = ""
    command: list[str] = field(default_factory=list)


def mem_available() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def _descendants(root: int) -> list[int]:
    """`root` and every process below it (by parent pid), read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                # the name field may hold spaces and parentheses: the parent pid follows the last ')'
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def _last_line(text: str) -> str:
    """The line that says why a command failed: dd2's 'Error: ...' sentence, else the last line with words."""
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if any(c.isalpha() for c in ln)]
    dd2_errors = [ln for ln in lines if ln.startswith("Error:")]
    # an exception's last line, but not torchrun's summary of a failed worker
    raised = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception"))
              and "ChildFailedError" not in ln]
    return (dd2_errors or raised or lines or [""])[-1][:300]


@dataclass
class Outcome:
    returncode: int
    seconds: float
    peak: int  # bytes: the largest single process's high-water mark
    stderr: str
    out_of_memory: str = ""  # why the watchdog stopped it
    stopped: bool = False  # `stop_when` fired and the process group was SIGKILLed


class Runner:
    """Runs each step's command as a child process with a memory watchdog, and collects the rows."""

    def __init__(self, work: Path, threads: int, json_out: Path | None = None, header: dict | None = None) -> None:
        self.work, self.threads = work, threads
        #: OMP_NUM_THREADS of a single process (with dd2's auto, -1, dd2 then sets its own count)
        self.omp = threads if threads > 0 else os.cpu_count() or 1
        self.json_out, self.header = json_out, dict(header or {})
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.rows: list[Row] = []
        bin_dir = Path(sys.executable).parent
        dd2 = bin_dir / "dd2"
        self.dd2 = [str(dd2)] if dd2.is_file() else [sys.executable, "-m", "dd2cli"]
        torchrun = bin_dir / "torchrun"
        self.torchrun = [str(torchrun)] if torchrun.is_file() else [sys.executable, "-m", "torch.distributed.run"]

    def env(self, threads: int) -> dict[str, str]:
        env = os.environ.copy()
        env.update({
            "DD2_OFFLINE": "1", "HF_HUB_OFFLINE": "1",  # nothing may touch the network
            "OMP_NUM_THREADS": str(threads),
            "DD2_LOAD_PLUGINS": "var,llamagen",  # the installed first-party families, whatever the caller set
            "DD2_RUNS_DIR": str(self.work / "runs"),  # a run without --out never lands in the caller's folder
            "TORCH_HOME": str(self.work / "torch-home"),  # no cached Inception file of the user's is picked up
            "PYTHONUNBUFFERED": "1",
        })
        return env

    def ranks(self, nproc: int, *args: str) -> list[str]:
        """`torchrun --standalone --nproc_per_node N -m dd2cli ARGS` (a free port on this machine)."""
        return [*self.torchrun, "--standalone", "--nproc_per_node", str(nproc), "-m", "dd2cli", *args]

    def execute(self, argv: list[str], log: Path, threads: int,
                stop_when: Callable[[], bool] | None = None) -> Outcome:
        """Run `argv`; SIGKILL its process group once `stop_when()` is true, or every process of it when the
        machine's MemAvailable falls below `MEMORY_FLOOR` (before the kernel's OOM killer picks a victim)."""
        with open(log.with_suffix(".out"), "wb") as out, open(log.with_suffix(".err"), "wb") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=out, stderr=err, env=self.env(threads), cwd=self.work,
                                    start_new_session=True)  # its own group: SIGKILL reaches torchrun's workers
            polled: dict[int, int] = {}
            verdict = {"oom": "", "stopped": False}
            done = threading.Event()

            def watch() -> None:
                tick = 0
                while not done.wait(0.05):
                    tick += 1
                    if tick % 5 == 0:  # the process tree every 0.25 s, MemAvailable every 0.05 s
                        for pid in _descendants(proc.pid):
                            polled[pid] = max(polled.get(pid, 0), _rss(pid))
                    if stop_when is not None and not verdict["stopped"] and stop_when():
                        verdict["stopped"] = True
                        os.killpg(proc.pid, signal.SIGKILL)
                    avail = mem_available()
                    if avail < MEMORY_FLOOR and not verdict["oom"]:
                        pids = _descendants(proc.pid)
                        sizes = sorted((_rss(p) for p in pids), reverse=True)
                        verdict["oom"] = (f"MemAvailable fell to {avail / GiB:.1f} GiB with this step's processes "
                                          f"at {' + '.join(f'{s / GiB:.1f}' for s in sizes if s > 64 << 20)} GiB")
                        for pid in reversed(pids):  # workers first, in case they left torchrun's group
                            try:
                                os.kill(pid, signal.SIGKILL)
                            except ProcessLookupError:
                                pass

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            # wait4, not wait: its resource usage is that of this child and every descendant it waited for, so
            # ru_maxrss is the largest of their peaks (torchrun waits for its workers)
            _, status, usage = os.wait4(proc.pid, 0)
            seconds = time.perf_counter() - t0
            done.set()
            watcher.join()
            proc.returncode = os.waitstatus_to_exitcode(status)
        peak = max(usage.ru_maxrss * 1024, max(polled.values(), default=0))  # ru_maxrss is in KiB on Linux
        return Outcome(proc.returncode, seconds, peak, log.with_suffix(".err").read_text(errors="replace"),
                       verdict["oom"], verdict["stopped"])

    def step(self, teacher: str, name: str, argv: list[str], threads: int | None = None,
             check: Callable[[], str] | None = None, stop_when: Callable[[], bool] | None = None,
             expect_stop: bool = False) -> Row:
        """Run one step and record its row; `check()` returns what is wrong with its output ('' when nothing)."""
        threads = threads or self.omp
        slug = f"{teacher}-{name}".replace(" ", "_").replace("/", "_")
        print(f"[{time.strftime('%H:%M:%S')}] {teacher}: {name} ...", flush=True)
        o = self.execute(argv, self.logs / slug, threads, stop_when)
        row = Row(teacher, name, round(o.seconds, 1), o.peak, command=argv)
        if o.out_of_memory:
            row.status, row.detail = "does not fit", o.out_of_memory
        elif expect_stop and not o.stopped:
            row.status = "FAILED"
            row.detail = f"ended (exit code {o.returncode}) before it could be killed: {_last_line(o.stderr)}"
        elif o.returncode != 0 and not (expect_stop and o.stopped):
            row.status, row.detail = "FAILED", f"exit code {o.returncode}: {_last_line(o.stderr)}"
        elif check is not None:
            problem = check()
            if problem:
                row.status, row.detail = "FAILED", problem
        self.add(row)
        return row

    def add(self, row: Row) -> None:
        """Record a row, and rewrite the JSON: a run stopped half-way keeps the rows it measured."""
        self.rows.append(row)
        print(f"    {_fmt_row(row)}", flush=True)
        self.save()

    def save(self, **extra) -> None:
        if self.json_out is None:
            return
        record = {**self.header, **extra, "rows": [asdict(row) for row in self.rows]}
        self.json_out.parent.mkdir(parents=True, exist_ok=True)
        self.json_out.write_text(json.dumps(record, indent=1) + "\n")

    def not_run(self, teacher: str, name: str, status: str, detail: str, argv: list[str]) -> Row:
        row = Row(teacher, name, None, None, status, detail, argv)
        self.add(row)
        return row


# ---- the steps ----------------------------------------------------------------------------------------------

def distill_settings(teacher: str) -> tuple[list[str], str]:
    """`--set` pairs for a short run through every phase of `teacher`, and a note on what it covers."""
    common = {
        "device": "cpu", "stage1.batch_size": 2, "stage1.warmup_steps": 1, "stage1.cache_sequences": 0,
        "stage2.steps": 1, "stage2.batch_size": 2, "stage2.guidance_updates": 2,
        "stage2.warmup_steps": 1, "run.checkpoint_every": 1, "run.keep_checkpoints": 1, "run.log_every": 1,
        "run.sample_every": 0, "run.grid_per_class": 1, "run.eval_samples": 0,
        # one image in each run's final grid: a 256 px decode takes seconds on a CPU core, the grid's path is the same
        "run.grid_classes": 1,
    }
    if teacher.startswith("var"):
        # stage 1 starts with the head alone (VAR's recipe), then trains the backbone too; the flow-map phase costs
        # one teacher pass per scale (10) per update, so it runs here
        common.update({"stage1.steps": 2, "stage1.head_only_steps": 1, "flow_init.steps": 1,
                       "flow_init.batch_size": 2, "flow_init.warmup_steps": 1})
        note = "stage 1: 1 head-only + 1 full GTS step, 1 flow-map update"
    else:
        # LlamaGen's flow map costs one teacher pass per token (256) per update: off, as in the variant's defaults
        common.update({"stage1.steps": 1, "flow_init.steps": 0})
        note = f"stage 1: {common['stage1.steps']} GTS step(s), flow-map phase off (256 teacher passes per update)"
    note += f"; stage 2: {common['stage2.steps']} update(s) x K=2 guidance updates; batch 2"
    args = []
    for key, value in common.items():
        args += ["--set", f"{key}={value}"]
    return args, note


def _run_finished(run: Path) -> Callable[[], str]:
    def check() -> str:
        latest = run / "latest.json"
        if not latest.is_file():
            return f"{run} has no latest.json"
        if json.loads(latest.read_text()).get("stage") != 2:
            return f"{latest} does not point at a stage-2 checkpoint"
        if not (run / "samples" / "final.png").is_file():
            return f"{run}/samples/final.png was not written"
        return ""
    return check


def _sample_set(folder: Path, n: int) -> Callable[[], str]:
    def check() -> str:
        manifest = folder / "manifest.json"
        if not manifest.is_file():
            return f"{folder} has no manifest.json"
        if not json.loads(manifest.read_text()).get("complete"):
            return f"{manifest} does not mark the set complete"
        found = len(list(folder.glob("[0-9]*.png")))  # one per image; the preview grid has a name
        return "" if found >= n else f"{folder} holds {found} PNGs, not {n}"
    return check


def _metric(path: Path, key: str) -> Callable[[], str]:
    def check() -> str:
        if not path.is_file():
            return f"{path} was not written"
        entries = json.loads(path.read_text())
        entries = entries if isinstance(entries, list) else [entries]
        values = [e.get("metrics", {}).get(key) for e in entries]
        ok = values and all(isinstance(v, (int, float)) and v == v for v in values)
        return "" if ok else f"{path} has no finite '{key}' ({values})"
    return check


def _files(*paths: Path) -> Callable[[], str]:
    def check() -> str:
        missing = [str(p) for p in paths if not p.exists()]
        return f"missing: {', '.join(missing)}" if missing else ""
    return check


def run_teacher(r: Runner, teacher: str, smallest: bool, keep: bool, eval_files: tuple[Path, Path] | None,
                skip: frozenset[str] = frozenset()) -> None:
    root = r.work / teacher
    weights_dir = root / "weights"
    me = [sys.executable, str(Path(__file__).resolve())]
    expected = {"llamagen-b": ("gpt=c2i_B_256.pt", "vq=vq_ds16_c2i.pt"),
                "var-d16": ("var=var_d16.pth", "vae=vae_ch160v4096z32.pth")}[teacher]
    weights = []
    for pair in expected:
        key, name = pair.split("=")
        weights += ["--weights", f"{key}={weights_dir / name}"]
    row = r.step(teacher, "weights (random, official layout)", [*me, "--write-weights", teacher, "--work", str(root)],
                 check=_files(*(weights_dir / p.split("=")[1] for p in expected)))
    if row.status != "ok":
        return
    settings, note = distill_settings(teacher)
    threads = r.threads  # -1: dd2's auto, one thread per core idle when the process starts
    # the torch threads of each of 2 torchrun workers (dd2's auto shares the idle cores between them itself), and
    # their OMP_NUM_THREADS
    worker_threads = -1 if threads < 0 else max(1, threads // 2)
    worker_omp = max(1, worker_threads)

    def distill(out: Path, *extra: str, nthreads: int = threads) -> list[str]:
        return ["distill", "--teacher", teacher, *weights, "--out", str(out), *settings,
                "--set", f"threads={nthreads}", *extra]

    def drop(run: Path) -> None:
        """Checkpoints of a run no later step reads: gigabytes each at these sizes."""
        if not keep:
            shutil.rmtree(run / "checkpoints", ignore_errors=True)

    # 1. one process, every phase (--smallest: the killed and resumed run of 2. stands for it, one distillation
    #    less; every phase still runs, split over the two processes)
    killed = root / "run-killed"
    main = killed if smallest else root / "run"
    peaks = []
    if not smallest:
        row = r.step(teacher, "distill", [*r.dd2, *distill(main)], check=_run_finished(main))
        row.detail = row.detail or note
        peaks.append(row.peak_rss_bytes if row.status == "ok" else None)

    # 2. SIGKILL once the first checkpoint exists, then --resume to the end
    row = r.step(teacher, "distill, SIGKILL at 1st checkpoint", [*r.dd2, *distill(killed)],
                 stop_when=lambda: (killed / "latest.json").is_file(), expect_stop=True)
    if row.status == "ok":
        latest = json.loads((killed / "latest.json").read_text())
        row.detail = f"killed with latest.json at stage {latest['stage']} step {latest['step']}"
        row = r.step(teacher, "distill --resume", [*r.dd2, "distill", "--resume", str(killed)],
                     check=_run_finished(killed))
        if smallest:
            row.detail = row.detail or note
            peaks.append(row.peak_rss_bytes if row.status == "ok" else None)
    else:
        r.not_run(teacher, "distill --resume", "FAILED", "the killed run it continues did not run", [])
    if killed != main:
        drop(killed)
    single_peak = peaks[0] if peaks and peaks[0] is not None else None

    # 3. data-parallel under torchrun: replicated (ddp) and sharded (fsdp) networks
    for mode in ("ddp", "fsdp"):
        run = root / f"run-{mode}"
        argv = r.ranks(2, *distill(run, "--set", f"parallel={mode}", nthreads=worker_threads))
        name = f"distill torchrun x2 {mode}"
        avail = mem_available()
        if mode in skip:
            r.not_run(teacher, name, "skipped", f"--skip {mode}", argv)
        elif mode == "ddp" and single_peak is not None and 2 * single_peak > avail - MEMORY_FLOOR:
            # every ddp worker holds what the single process held: decided from that measured peak
            r.not_run(teacher, name, "does not fit", f"2 x {single_peak / GiB:.1f} GiB (the single process's peak) > "
                      f"{(avail - MEMORY_FLOOR) / GiB:.1f} GiB (MemAvailable less a {MEMORY_FLOOR / GiB:.1f} GiB "
                      f"margin)", argv)
        else:
            r.step(teacher, name, argv, threads=worker_omp, check=_run_finished(run))
        drop(run)

    if _run_finished(main)():
        for name in ("sample torchrun x2", "sample --steps 2", "eval fid", "eval is", "eval prec-recall",
                     "export --format pt2", "load_generator"):
            r.not_run(teacher, name, "FAILED", f"needs the finished run {main.name}", [])
        _teacher_sample(r, teacher, weights, root, threads)
        return

    # 4. sampling: the one-step generator sharded over 2 processes, k-step, and the teacher itself
    shards = root / "samples-x2"
    r.step(teacher, "sample torchrun x2", r.ranks(2, "sample", "--from", str(main), "-n", str(SAMPLE_COUNT),
                                                  "--labels", "balanced", "--out", str(shards), "--device", "cpu",
                                                  "--batch-size", "8", "--threads", str(worker_threads)),
           threads=worker_omp, check=_sample_set(shards, SAMPLE_COUNT))
    two = root / "samples-k2"
    # (--block-size n: a block draws all its tokens whatever n is; the default 64 costs minutes at this size on CPU)
    r.step(teacher, "sample --steps 2", [*r.dd2, "sample", "--from", str(main), "--steps", "2", "-n", "2", "--block-size", "2",
                                         "--out", str(two), "--device", "cpu", "--threads", str(threads)],
           check=_sample_set(two, 2))
    _teacher_sample(r, teacher, weights, root, threads)

    # 5. the Inception metrics of the sharded set against the 256 px reference batch
    if eval_files is None:
        for name in ("eval fid", "eval is", "eval prec-recall"):
            r.not_run(teacher, name, "FAILED", "the Inception weights and reference were not written", [])
    else:
        inception, reference = eval_files
        for metric, key, ref in (("fid", "fid", True), ("is", "is", False), ("prec-recall", "precision", True)):
            out = root / f"eval-{metric}.json"
            argv = [*r.dd2, "eval", metric, str(shards), *(["--ref", str(reference)] if ref else []),
                    "--inception-weights", str(inception), "--device", "cpu", "--batch-size", "16",
                    "--threads", str(threads), "--json-out", str(out)]
            r.step(teacher, f"eval {metric}", argv, check=_metric(out, key))

    # 6. export (safetensors + the torch.export program), then load the bundle in Python
    bundle = root / "bundle"
    row = r.step(teacher, "export --format pt2", [*r.dd2, "export", str(main), "--out", str(bundle), "--format", "pt2"],
                 check=_files(bundle / "generator.pt2"))
    if row.status == "ok":
        r.step(teacher, "load_generator", [*me, "--load-bundle", str(bundle)])
    else:
        r.not_run(teacher, "load_generator", "FAILED", "the export it loads failed", [])
    drop(main)


def _teacher_sample(r: Runner, teacher: str, weights: list[str], root: Path, threads: int) -> None:
    out = root / "samples-teacher"
    n = 1 if teacher.startswith("llamagen") else 2  # LlamaGen draws 256 tokens one by one
    r.step(teacher, "sample --teacher", [*r.dd2, "sample", "--teacher", teacher, *weights, "-n", str(n), "--block-size", str(n),
                                         "--out", str(out), "--device", "cpu", "--threads", str(threads)],
           check=_sample_set(out, n))


# ---- report -------------------------------------------------------------------------------------------------

def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f} s" if s < 120 else f"{int(s // 60)} min {s % 60:02.0f} s"


def _fmt_mem(b: int | None) -> str:
    return "-" if b is None else f"{b / GiB:.2f} GiB"


def _fmt_row(row: Row) -> str:
    status = row.status + (f": {row.detail}" if row.detail and row.status != "ok" else "")
    return f"{row.step:<38} {_fmt_time(row.seconds):>12} {_fmt_mem(row.peak_rss_bytes):>10}  {status}"


def print_table(rows: list[Row]) -> None:
    print(f"\n{'teacher':<11} {'step':<38} {'wall time':>12} {'peak RSS':>10}  status")
    for row in rows:
        print(f"{row.teacher:<11} {_fmt_row(row)}")
    notes = [(r.teacher, r.step, r.detail) for r in rows if r.status == "ok" and r.detail]
    if notes:
        print()
        for teacher, step, detail in notes:
            print(f"  {teacher} {step}: {detail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teachers", default=",".join(TEACHERS), help=f"comma list of {', '.join(TEACHERS)}")
    ap.add_argument("--smallest", action="store_true", help="the fewest updates: no uninterrupted distill, the killed "
                    "and resumed run stands for it; llamagen-b only unless --teachers is given (CI's slow test)")
    ap.add_argument("--skip", default="", help="comma list of torchrun distill modes (ddp, fsdp) not to run, e.g. "
                    "where their peaks are already known not to fit this machine; their rows say 'skipped'")
    ap.add_argument("--work", type=Path, help="folder for weights, runs, samples and logs, kept (default: a "
                    "temporary folder, removed at the end)")
    ap.add_argument("--threads", type=int, default=-1, help="torch threads of a single process, each of 2 torchrun "
                    "workers gets half; -1 (default): dd2's auto, one per core idle when each process starts")
    ap.add_argument("--json-out", type=Path, default=HERE / "results" / "real_size.json", help="where to write the rows")
    # the child processes of the script itself (timed and measured like the dd2 steps)
    ap.add_argument("--write-weights", metavar="TEACHER", help=argparse.SUPPRESS)
    ap.add_argument("--write-eval-files", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--load-bundle", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.write_weights:
        write_weights(args.write_weights, args.work / "weights")
        return 0
    if args.write_eval_files:
        write_eval_files(args.work)
        return 0
    if args.load_bundle:
        load_bundle(args.load_bundle)
        return 0

    given = any(a == "--teachers" or a.startswith("--teachers=") for a in (argv if argv is not None else sys.argv[1:]))
    teachers = ["llamagen-b"] if args.smallest and not given else [t.strip() for t in args.teachers.split(",")
                                                                    if t.strip()]
    skip = frozenset(m.strip() for m in args.skip.split(",") if m.strip())
    if skip - {"ddp", "fsdp"}:
        ap.error(f"--skip takes a comma list of ddp, fsdp; got '{args.skip}'.")
    unknown = [t for t in teachers if t not in TEACHERS]
    if unknown or not teachers:
        ap.error(f"--teachers takes a comma list of {', '.join(TEACHERS)}; got '{args.teachers}'.")
    if args.threads == 0 or args.threads < -1:
        ap.error(f"--threads takes -1 (dd2's auto) or a count of at least 1, not {args.threads}.")
    if sys.platform != "linux":
        ap.error("real_size.py reads /proc for memory and process trees, so it runs on Linux only.")
    keep = args.work is not None
    work = args.work.resolve() if keep else Path(tempfile.mkdtemp(prefix="dd2-real-size-"))
    if keep and work.exists() and any(work.iterdir()):
        ap.error(f"--work {work} is not empty; give a new or empty folder.")
    work.mkdir(parents=True, exist_ok=True)

    started = time.time()
    header = {
        "command": " ".join(["python benchmarks/real_size.py", *(argv if argv is not None else sys.argv[1:])]),
        "smallest": args.smallest, "threads": args.threads,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "mem_available_at_start_bytes": mem_available(), "load_average_at_start": os.getloadavg()},
    }
    r = Runner(work, args.threads, args.json_out, header)
    try:
        eval_dir = work / "eval-inputs"
        row = r.step("-", "Inception weights + 256 px reference", [sys.executable, str(Path(__file__).resolve()),
                     "--write-eval-files", "--work", str(eval_dir)],
                     check=_files(eval_dir / INCEPTION_FILE, eval_dir / "reference_256.npz"))
        eval_files = (eval_dir / INCEPTION_FILE, eval_dir / "reference_256.npz") if row.status == "ok" else None
        for teacher in teachers:
            run_teacher(r, teacher, args.smallest, keep, eval_files, skip)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    total = time.time() - started
    print_table(r.rows)
    threads = "dd2's auto (one per idle core)" if args.threads < 0 else args.threads
    print(f"\ntotal {_fmt_time(total)}; threads: {threads}; {os.cpu_count()} CPU(s); "
          f"{mem_available() / GiB:.1f} GiB available now")
    r.save(total_seconds=round(total, 1), load_average_at_end=os.getloadavg())
    print(f"rows written to {args.json_out}")
    return 1 if any(row.status == "FAILED" for row in r.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
