"""Proposition 1 of the paper on a teacher whose joint distribution is known exactly.

Stages 1 + 2 on the synthetic teacher (3 positions, 4 codes in 2-d, strong correlations); the
one-step generator's joint over token ids (20k samples per class) is compared in total variation with
the teacher's exact joint, side by side with the set-prediction baseline, the generator right after
initialisation, the AR-diffusion model (10 Euler steps per token) and the teacher's own samples.

This is a regression guard at a CI-sized budget (800 + 800 steps, a few minutes): the trained
generator must be far closer to the joint than the baseline and than its initialisation. The
tighter bar of issue 3 (TV ≤ 0.10 and ≤ 1/5 of the baseline) is NOT reached reliably yet — 0.075
and 0.120 in two runs of 2400 generator updates (README, "Proposition 1") — and is not asserted.
"""

import json

import pytest
from typer.testing import CliRunner

from dd2cli.cli import app
from joint import report

RECIPE = ["--set", "stage1.steps=800", "--set", "stage1.batch_size=128", "--set", "head.width=128",
          "--set", "stage2.steps=800", "--set", "stage2.batch_size=128", "--set", "stage2.weighting=false",
          "--set", "stage2.timesteps.t_min=0.05", "--set", "stage2.lr=1e-3", "--set", "stage2.guidance_lr=1e-3",
          "--set", "stage2.grad_clip=10", "--set", "stage2.generator_draws=4", "--set", "stage2.guidance_draws=4",
          "--set", "run.checkpoint_every=100000", "--set", "run.sample_every=0", "--set", "run.log_every=100",
          "--set", "threads=1"]


@pytest.mark.slow
def test_proposition1_generator_joint_far_closer_than_baseline(synthetic_plugin, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["--quiet", "distill", "--teacher", "synthetic-corr", "--out", str(out), *RECIPE])
    assert res.exit_code == 0, res.output
    tv = report(out, n=20000)
    (out / "proposition1.json").write_text(json.dumps(tv, indent=2))
    print("\n" + "\n".join(f"{k:40s} {v:.3f}" for k, v in tv.items()))
    assert tv["noise floor (teacher samples)"] < 0.03
    assert tv["AR-diffusion, 10 Euler steps/token"] < 0.15  # stage 1 alone is a sound (slow) sampler
    assert tv["generator (EMA)"] < 0.5 * tv["set-prediction baseline"]
    assert tv["generator (EMA)"] < 0.5 * tv["generator at initialisation"]
