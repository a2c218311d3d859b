"""Distances between a sample set's token ids and a teacher's exact joint distribution (`dd2 eval joint-tv`).

For teachers that can enumerate their joint over token-id sequences (`Teacher.exact_joint`, e.g. the `exact`
family), per class:

- **TV** between the empirical joint of the samples and the exact one: `½ Σ_x |p̂(x) − p(x)|`;
- **per-step conditional error** of AR step `s`: `Σ_prefix p̂(prefix) · TV(p̂(x_s | prefix), p(x_s | prefix))`,
  the prefix being the tokens of steps `< s` (step 0: the TV of its marginal). It says where a sampler goes
  wrong (first step vs later conditionals); the joint TV is at most the sum over steps;
- the **noise floor**: the TV of the same number of draws from the exact joint itself (what a perfect sampler
  scores at this sample size, averaged over a few draws);
- the **set-prediction baseline**: the TV between the joint and the product of its per-position marginals
  (exact, no sampling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import DD2Error
from ..files import read_json, write_json
from ..plugins import get_variant
from ..teachers import SamplingSettings
from .labels import labels_from_manifest
from .sample_sets import TOKENS_FILE

#: draws of the noise floor: its spread over draws is small next to the differences it is used to judge
FLOOR_DRAWS = 5


@dataclass
class JointReport:
    n: int  # samples scored
    tv: float  # mean over classes
    noise_floor: float
    set_prediction: float
    step_errors: list[float]  # per AR step, mean over classes
    per_class: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"n": self.n, "tv": self.tv, "noise_floor": self.noise_floor, "set_prediction": self.set_prediction,
                "tv_over_floor": self.tv / self.noise_floor if self.noise_floor > 0 else math.inf,
                "step_errors": self.step_errors, "worst_step_error": max(self.step_errors),
                "per_class": self.per_class}


def empirical_joint(ids_MN: Tensor, vocab_size: int) -> Tensor:
    """`(V,)*n` float64 frequencies of the token-id rows."""
    n = ids_MN.shape[1]
    flat_M = torch.zeros(ids_MN.shape[0], dtype=torch.long)
    for i in range(n):
        flat_M = flat_M * vocab_size + ids_MN[:, i].long().cpu()
    counts = torch.bincount(flat_M, minlength=vocab_size ** n).double()
    return (counts / max(ids_MN.shape[0], 1)).reshape((vocab_size,) * n)


def tv(p: Tensor, q: Tensor) -> float:
    return 0.5 * float((p.double() - q.double()).abs().sum())


def product_of_marginals(joint: Tensor) -> Tensor:
    out = torch.ones((), dtype=torch.float64)
    for axis in range(joint.ndim):
        others = tuple(a for a in range(joint.ndim) if a != axis)
        out = out[..., None] * joint.double().sum(dim=others)
    return out


def set_prediction_tv(joint: Tensor) -> float:
    """TV of the set-prediction baseline with exact marginals: every position drawn on its own."""
    return tv(joint, product_of_marginals(joint))


def step_errors(empirical: Tensor, exact: Tensor, steps: Sequence[int]) -> list[float]:
    """Per AR step: the empirical-prefix-weighted TV of the step's tokens given the earlier steps."""
    order = sorted(range(len(steps)), key=lambda i: steps[i])  # positions in AR order
    emp, ex = empirical.permute(order).double(), exact.permute(order).double()
    ordered = [steps[i] for i in order]
    V, out = exact.shape[0], []
    for s in sorted(set(steps)):
        upto = sum(1 for t in ordered if t <= s)
        before = sum(1 for t in ordered if t < s)
        drop = tuple(range(upto, len(ordered)))
        e = (emp.sum(dim=drop) if drop else emp).reshape(V ** before, V ** (upto - before))
        p = (ex.sum(dim=drop) if drop else ex).reshape(V ** before, V ** (upto - before))
        e_prefix, p_prefix = e.sum(1, keepdim=True), p.sum(1, keepdim=True)
        seen = e_prefix.squeeze(1) > 0
        cond_e = e[seen] / e_prefix[seen]
        possible = p_prefix[seen].squeeze(1) > 0
        cond_p = torch.where(possible[:, None], p[seen] / p_prefix[seen].clamp_min(1e-300), torch.zeros_like(cond_e))
        tv_rows = 0.5 * (cond_e - cond_p).abs().sum(1)
        tv_rows = torch.where(possible, tv_rows, torch.ones_like(tv_rows))  # a prefix the teacher never makes
        out.append(float((e_prefix[seen].squeeze(1) * tv_rows).sum()))
    return out


def noise_floor(exact: Tensor, m: int, seed: int = 0, draws: int = FLOOR_DRAWS) -> float:
    """Mean TV of `m` draws from `exact` itself (a perfect sampler's score at this sample size)."""
    g = torch.Generator().manual_seed(seed)
    flat = exact.flatten().double()
    out = []
    for _ in range(draws):
        picks = torch.multinomial(flat, m, replacement=True, generator=g)
        emp = torch.bincount(picks, minlength=flat.numel()).double() / m
        out.append(0.5 * float((emp - flat).abs().sum()))
    return sum(out) / len(out)


def joint_report(teacher, ids_MN: Tensor, labels_M: Tensor, settings=None, seed: int = 0) -> JointReport:
    """Score token-id samples (with their labels) against `teacher.exact_joint` under `settings`."""
    spec = teacher.spec
    if ids_MN.ndim != 2 or ids_MN.shape[1] != spec.num_tokens:
        raise DD2Error(f"The token ids have shape {tuple(ids_MN.shape)}, not (N, {spec.num_tokens}) as teacher "
                       f"{getattr(teacher, 'variant_name', '')} has {spec.num_tokens} tokens; score a sample set "
                       f"made from this teacher.")
    if int(ids_MN.min()) < 0 or int(ids_MN.max()) >= spec.vocab_size:
        raise DD2Error(f"Token ids outside 0..{spec.vocab_size - 1}: the samples come from another teacher.")
    per_class, steps = [], list(spec.steps)
    for c in range(spec.num_classes):
        rows = labels_M == c
        m = int(rows.sum())
        if m == 0:
            continue
        exact = teacher.exact_joint(c, settings)
        if exact is None:
            raise DD2Error(f"Teacher {getattr(teacher, 'variant_name', '')} does not expose its exact joint "
                           f"distribution; joint-tv needs a teacher that does (e.g. the exact family).")
        emp = empirical_joint(ids_MN[rows], spec.vocab_size)
        per_class.append({"class": c, "n": m, "tv": tv(emp, exact), "noise_floor": noise_floor(exact, m, seed + c),
                          "set_prediction": set_prediction_tv(exact), "step_errors": step_errors(emp, exact, steps)})
    if not per_class:
        raise DD2Error("The sample set has no samples with a class of this teacher.")
    mean = lambda key: sum(r[key] for r in per_class) / len(per_class)
    errors = [sum(r["step_errors"][s] for r in per_class) / len(per_class) for s in range(len(set(steps)))]
    return JointReport(n=int(ids_MN.shape[0]), tv=mean("tv"), noise_floor=mean("noise_floor"),
                       set_prediction=mean("set_prediction"), step_errors=errors, per_class=per_class)


def score_sample_sets(teacher_name: str, folders: Sequence, weights=None, device: str = "cpu",
                      write: bool = True) -> list[tuple[str, JointReport, str]]:
    """`dd2 eval joint-tv`: each finished dd2 sample set's `tokens.npy` against `teacher_name`'s exact joint.

    The joint is the teacher's under the sampling settings the set records (teacher and k-step sets), else
    under `spec.target`, the distribution a generator is distilled to. Returns `(folder, report, settings
    text)` per set and, with `write`, puts `joint-tv.json` next to each set's manifest.
    """
    if not folders:
        raise DD2Error("Give the sample sets to score (folders written by dd2 sample).")
    teacher = get_variant(teacher_name).load(weights or None, device=device).eval()
    out = []
    for folder in map(Path, folders):
        manifest_path = folder / "manifest.json"
        if not manifest_path.is_file():
            raise DD2Error(f"{folder} is not a dd2 sample set (no manifest.json); joint-tv reads the token ids "
                           f"that dd2 sample writes.")
        manifest = read_json(manifest_path)
        if not manifest.get("complete") or not manifest.get("tokens"):
            raise DD2Error(f"{folder} has no {TOKENS_FILE}: finish the set with the same dd2 sample command (a set "
                           f"written before dd2 kept token ids has none; sample it again into a new folder).")
        made_from = (manifest.get("source") or {}).get("teacher")
        if made_from not in (None, teacher_name):
            raise DD2Error(f"{folder} was sampled from teacher {made_from}, not {teacher_name}; pass --teacher "
                           f"{made_from}.")
        ids_MN = torch.from_numpy(np.load(folder / manifest["tokens"]).astype(np.int64))
        labels_M = torch.from_numpy(labels_from_manifest(manifest).astype(np.int64))
        recorded = (manifest.get("settings") or {}).get("sampling")
        settings = SamplingSettings(**recorded) if recorded else teacher.spec.target
        report = joint_report(teacher, ids_MN, labels_M, settings)
        text = " ".join(f"{k}={v}" for k, v in settings.as_dict().items())
        if write:
            write_json(folder / "joint-tv.json", {"teacher": teacher_name, "sampling": settings.as_dict(),
                                                  **report.as_dict()})
        out.append((str(folder), report, text))
    return out
