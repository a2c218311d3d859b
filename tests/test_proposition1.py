"""Proposition 1 of the paper on a teacher whose joint distribution is known exactly.

Stages 1 + 2 on the synthetic teacher (3 positions, 4 codes in 2-d, strong correlations) must give a
one-step generator whose joint over token ids, estimated from 20k samples per class, is within total
variation 0.10 of the teacher's exact joint and at most 1/5 of the set-prediction baseline's. Without
the initialisation stage, the same budget does clearly worse.
"""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dd2cli.cli import app
from joint import report

# The recipe (documented in README "Proposition 1"); see the test below for the numbers it reaches.
RECIPE = ["--set", "stage1.steps=800", "--set", "stage1.batch_size=128", "--set", "head.width=128",
          "--set", "stage2.steps=800", "--set", "stage2.batch_size=128",
          "--set", "stage2.timesteps.t_min=0.05", "--set", "stage2.lr=1e-3", "--set", "stage2.guidance_lr=1e-3",
          "--set", "stage2.grad_clip=10", "--set", "stage2.generator_draws=4", "--set", "stage2.guidance_draws=4",
          "--set", "run.checkpoint_every=100000", "--set", "run.sample_every=0", "--set", "run.log_every=50"]


def _distill(out: Path, extra=()):
    res = CliRunner().invoke(app, ["--quiet", "distill", "--teacher", "synthetic-corr", "--out", str(out),
                                   *RECIPE, *extra])
    assert res.exit_code == 0, res.output


@pytest.mark.slow
def test_proposition1_joint_matches_teacher(synthetic_plugin, tmp_path):
    _distill(tmp_path / "run")
    tv = report(tmp_path / "run", n=20000)
    (tmp_path / "report.json").write_text(json.dumps(tv, indent=2))
    print("\n" + "\n".join(f"{k:40s} {v:.3f}" for k, v in tv.items()))
    assert tv["noise floor (teacher samples)"] < 0.03
    assert tv["AR-diffusion, 10 Euler steps/token"] < 0.15  # stage 1 is a sound sampler on its own
    assert tv["generator (EMA)"] <= 0.10
    assert tv["generator (EMA)"] <= tv["set-prediction baseline"] / 5
    assert tv["generator (EMA)"] < tv["generator at initialisation"] / 3


@pytest.mark.slow
def test_without_initialisation_the_same_budget_does_clearly_worse(synthetic_plugin, tmp_path):
    _distill(tmp_path / "with")
    _distill(tmp_path / "without", ["--set", "stage1.steps=0"])
    with_init = report(tmp_path / "with", n=10000)["generator (EMA)"]
    without = report(tmp_path / "without", n=10000)["generator (EMA)"]
    print(f"\nwith GTS initialisation {with_init:.3f}, without {without:.3f}")
    assert without > 2 * with_init
