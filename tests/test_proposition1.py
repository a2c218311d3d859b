"""Proposition 1 of the paper on a teacher whose joint distribution is known exactly.

Stages 1 + 2 on the synthetic teacher (3 positions, 4 codes in 2-d, strong correlations); the
one-step generator's joint over token ids (20k samples per class) is compared in total variation with
the teacher's exact joint, side by side with the set-prediction baseline, the generator as the paper
initialises it (a copy of ψ₀), the AR-diffusion model (10 Euler steps per token), the generator after
the flow-map regression that ends stage 1, and the teacher's own samples (the sampling-noise floor).

Recipe: the exact family's (`dd2_exact.EXACT_TEACHER_DEFAULTS`): stage 1 = 800 GTS steps + 2,400 flow-map
regression updates, stage 2 = 400 CSD updates (K = 4, generator lr 1e-4). Measured: TV 0.040 (flow map alone
0.044), baseline 0.571, floor 0.010; with the recipe first tuned here (800 flow-map updates,
docs/experiments/proposition1.md): 0.056 and 0.054 (seeds 0 and 1).
The same stage 2 without the initialisation stage (no GTS, no flow map: the paper's generator from the
teacher's backbone with an untrained head) ends at 0.39. Both runs go side by side, one core each.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from joint import report

from dd2_exact import EXACT_TEACHER_DEFAULTS

DRIVER = str(Path(__file__).parent / "distill_driver.py")


def _as_sets(settings: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in settings.items():
        if isinstance(value, dict):
            out += _as_sets(value, f"{prefix}{key}.")
        else:
            out += ["--set", f"{prefix}{key}={str(value).lower() if isinstance(value, bool) else value}"]
    return out


# the recipe the exact family ships (every setting spelled out), one thread, no intermediate checkpoints
RECIPE = _as_sets(EXACT_TEACHER_DEFAULTS) + ["--set", "run.checkpoint_every=100000", "--set", "threads=1"]
NO_INIT = ["--set", "stage1.steps=0", "--set", "flow_init.steps=0"]


@pytest.mark.slow
def test_proposition1_generator_matches_the_joint_and_needs_its_initialisation(synthetic_plugin, tmp_path):
    env = {**os.environ, "DD2_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1"}
    runs = {"full": tmp_path / "full", "no-init": tmp_path / "no-init"}
    procs = {name: subprocess.Popen([sys.executable, DRIVER, "--quiet", "distill", "--teacher", "synthetic-corr",
                                     "--out", str(out), *RECIPE, *(NO_INIT if name == "no-init" else [])],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, out in runs.items()}
    for name, p in procs.items():
        _, err = p.communicate(timeout=1800)
        assert p.returncode == 0, (name, err[-3000:])
    tv = report(runs["full"], n=20000)
    ablation = report(runs["no-init"], n=20000)
    tv["same stage 2 without the initialisation stage (EMA)"] = ablation["generator (EMA)"]
    (tmp_path / "proposition1.json").write_text(json.dumps(tv, indent=2))
    print("\n" + "\n".join(f"{k:55s} {v:.3f}" for k, v in tv.items()))
    assert tv["noise floor (teacher samples)"] < 0.03
    assert tv["AR-diffusion, 10 Euler steps/token"] < 0.12  # stage 1 alone is a sound (slow) sampler
    assert tv["generator (EMA)"] <= 0.10
    assert tv["generator (EMA)"] <= tv["set-prediction baseline"] / 5
    # CSD keeps what the flow map gave it (measured: 0.080 → 0.056, 0.072 → 0.054), and the initialisation is
    # what makes the budget suffice
    assert tv["generator (EMA)"] <= 1.25 * tv["generator after the flow-map init"]
    assert tv["same stage 2 without the initialisation stage (EMA)"] >= 3 * tv["generator (EMA)"]


@pytest.mark.slow
def test_proposition1_holds_on_generated_exact_teachers(tmp_path):
    """The same recipe on the exact family's two registered teachers (not the one it was tuned on): one step
    several times closer to the joint than set prediction, and two steps (the teacher re-samples the last AR
    step) closer still. Measured: exact-raster one step 0.156 / two steps 0.092 / baseline 0.824 (floor 0.030);
    exact-scales 0.094 / 0.042 / 0.712 (floor 0.032); docs/experiments/fidelity.md."""
    import torch

    from dd2cli import plugins
    from dd2cli.engine.joint import joint_report
    from dd2cli.engine.runs import load_generator_from_run

    env = {**os.environ, "DD2_LOAD_PLUGINS": "", "OMP_NUM_THREADS": "1", "DD2_TEST_EXACT": "1"}
    names = ("exact-raster", "exact-scales")
    procs = {name: subprocess.Popen([sys.executable, DRIVER, "--quiet", "distill", "--teacher", name, "--out",
                                     str(tmp_path / name), "--set", "threads=1", "--set", "run.checkpoint_every=100000"],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name in names}
    for name, p in procs.items():
        _, err = p.communicate(timeout=1800)
        assert p.returncode == 0, (name, err[-3000:])
    import dd2_exact

    plugins.register_plugin(dd2_exact, name="exact")
    for name in names:
        gen, teacher, _ = load_generator_from_run(tmp_path / name)
        target, m = teacher.spec.target, 20000
        labels = torch.arange(teacher.spec.num_classes).repeat_interleave(m)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            one = teacher.as_tokens(gen(torch.randn(len(labels), teacher.spec.num_tokens, teacher.spec.latent_dim,
                                                    generator=g), labels))
            two = teacher.sample(labels, target, prefix_BN=one, start_step=teacher.spec.num_steps - 1, generator=g)
        r1, r2 = joint_report(teacher, one, labels, target), joint_report(teacher, two, labels, target)
        print(f"\n{name}: floor {r1.noise_floor:.3f} baseline {r1.set_prediction:.3f} one step {r1.tv:.3f} "
              f"two steps {r2.tv:.3f} step errors {[round(e, 3) for e in r1.step_errors]}")
        assert r1.tv <= r1.set_prediction / 2.5, name
        assert r2.tv <= 0.75 * r1.tv, name
        assert r1.step_errors[0] <= 2 * r1.noise_floor, name  # the first AR step is right; the gap is later
