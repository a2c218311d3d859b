"""Token ids in sample sets and `dd2 eval joint-tv`: TV to an exact teacher's joint, by hand and end to end."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_output import plain
from typer.testing import CliRunner

from dd2cli import plugins
from dd2cli.cli import app
from dd2cli.engine.joint import empirical_joint, joint_report, product_of_marginals, set_prediction_tv, step_errors, tv

runner = CliRunner()
TINY = ["--set", "stage1.steps=4", "--set", "flow_init.steps=2", "--set", "stage2.steps=2", "--set",
        "stage1.batch_size=8", "--set", "flow_init.batch_size=8", "--set", "stage2.batch_size=8", "--set",
        "head.width=16", "--set", "head.depth=1", "--set", "threads=1"]


@pytest.fixture
def exact_plugin():
    import dd2_exact

    plugins.register_plugin(dd2_exact, name="exact")


def _ok(args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


# ---- the measures, by hand ---------------------------------------------------------------------------------------

def test_tv_and_baseline_of_a_two_token_joint_by_hand():
    # p(a, b) over {0,1}²: the paper's {(0,0),(1,1)} example
    joint = torch.tensor([[0.5, 0.0], [0.0, 0.5]], dtype=torch.float64)
    assert torch.allclose(product_of_marginals(joint), torch.full((2, 2), 0.25, dtype=torch.float64))
    assert set_prediction_tv(joint) == pytest.approx(0.5)  # ½(0.25 + 0.25 + 0.25 + 0.25)
    ids = torch.tensor([[0, 0], [0, 0], [1, 1], [0, 1]])  # empirical: (0,0) ½, (1,1) ¼, (0,1) ¼
    emp = empirical_joint(ids, 2)
    assert emp.tolist() == [[0.5, 0.25], [0.0, 0.25]]
    assert tv(emp, joint) == pytest.approx(0.25)  # ½(0 + 0.25 + 0 + 0.25)


def test_step_errors_by_hand():
    joint = torch.tensor([[0.5, 0.0], [0.0, 0.5]], dtype=torch.float64)
    emp = torch.tensor([[0.5, 0.25], [0.0, 0.25]], dtype=torch.float64)
    # step 0: marginal (0.75, 0.25) vs (0.5, 0.5) → 0.25; step 1 given a=0: (2/3, 1/3) vs (1, 0) → 1/3, weight
    # 0.75; given a=1: (0, 1) vs (0, 1) → 0
    assert step_errors(emp, joint, [0, 1]) == pytest.approx([0.25, 0.25])
    # one step of two tokens: only the marginal of the pair, i.e. the joint TV
    assert step_errors(emp, joint, [0, 0]) == pytest.approx([0.25])


def test_a_prefix_the_teacher_never_makes_counts_as_fully_wrong():
    joint = torch.tensor([[0.5, 0.5], [0.0, 0.0]], dtype=torch.float64)  # a is always 0
    emp = torch.tensor([[0.0, 0.0], [0.5, 0.5]], dtype=torch.float64)  # a is always 1
    assert step_errors(emp, joint, [0, 1]) == pytest.approx([1.0, 1.0])


def test_joint_report_of_the_teachers_own_samples_is_at_its_floor(exact_plugin):
    teacher = plugins.get_variant("exact-scales").load().eval()
    m = 20000
    labels = torch.arange(2).repeat_interleave(m)
    ids = teacher.sample(labels, teacher.spec.target, generator=torch.Generator().manual_seed(0))
    rep = joint_report(teacher, ids, labels)
    assert rep.tv < 1.3 * rep.noise_floor and rep.set_prediction > 10 * rep.noise_floor
    assert len(rep.step_errors) == 2 and max(rep.step_errors) < rep.tv + 1e-9
    shuffled = ids.clone()
    shuffled[:, 2:] = shuffled[torch.randperm(len(ids)), 2:]  # right marginals, broken dependence on step 0
    assert joint_report(teacher, shuffled, labels).step_errors[1] > 10 * rep.step_errors[1]


# ---- token ids in sample sets ------------------------------------------------------------------------------------

def test_teacher_sample_sets_carry_their_token_ids_and_joint_tv_scores_them(exact_plugin, tmp_path):
    out = tmp_path / "teacher"
    _ok(["-q", "sample", "--teacher", "exact-raster", "-n", 4000, "--out", out, "--batch-size", 500])
    manifest = json.loads((out / "manifest.json").read_text())
    ids = np.load(out / manifest["tokens"])
    assert ids.shape == (4000, 4) and manifest["ids_source"] == "sampled token ids"
    teacher = plugins.get_variant("exact-raster").load()
    # the images are the decoded ids, row for row
    from PIL import Image

    for i in (0, 1234, 3999):
        png = np.asarray(Image.open(out / f"{i:06d}.png").convert("RGB"))
        decoded = (teacher.decode(torch.from_numpy(ids[i:i + 1].astype(np.int64)))[0].permute(1, 2, 0) * 255)
        assert np.abs(png.astype(float) - decoded.round().numpy()).max() <= 1
    res = _ok(["eval", "joint-tv", "--teacher", "exact-raster", out])
    text = plain(res.output)
    assert "teacher" in text and "per-step conditional errors" in text
    report = json.loads((out / "joint-tv.json").read_text())
    assert report["n"] == 4000 and report["tv"] < 1.3 * report["noise_floor"]
    # the same numbers as the engine on the same ids
    labels = torch.from_numpy(np.arange(4000) % 2)
    eng = joint_report(teacher, torch.from_numpy(ids.astype(np.int64)), labels)
    assert report["tv"] == pytest.approx(eng.tv) and report["step_errors"] == pytest.approx(eng.step_errors)
    res = _ok(["eval", "joint-tv", "--teacher", "exact-raster", "--json", out])
    assert json.loads(res.stdout)[0]["set_prediction"] == pytest.approx(report["set_prediction"])


def test_one_step_sets_carry_nearest_codebook_ids_and_distances_and_resume(exact_plugin, tmp_path):
    run = tmp_path / "run"
    _ok(["-q", "distill", "--teacher", "exact-scales", "--out", run, *TINY])
    ref, out = tmp_path / "ref", tmp_path / "out"
    _ok(["-q", "sample", "--from", run, "-n", 40, "--batch-size", 16, "--out", ref])
    manifest = json.loads((ref / "manifest.json").read_text())
    ids, dist = np.load(ref / "tokens.npy"), np.load(ref / "token_distances.npy")
    assert ids.shape == dist.shape == (40, 4) and (dist >= 0).all() and dist.max() > 0
    assert manifest["ids_source"].startswith("nearest codebook")
    # the ids are the nearest codes of the generator's latents for the same per-index noise
    from dd2cli.engine.runs import load_generator_from_run
    from dd2cli.engine.sample import _fresh_eps

    gen, teacher, _ = load_generator_from_run(run)
    labels = torch.from_numpy(np.load(next(ref.glob("samples_*.npz")))["arr_1"].astype(np.int64))
    with torch.no_grad():
        q = gen(_fresh_eps(range(40), 0, (4, 3), "cpu"), labels)
    cb = teacher.codebook()
    d_all = torch.cdist(q, cb[None].expand(40, -1, -1))
    assert np.array_equal(ids, d_all.argmin(-1).numpy())
    assert np.allclose(dist, d_all.min(-1).values.numpy(), atol=1e-4)
    # an interrupted set (PNGs without their ids part, a missing PNG) resumes to the same files
    _ok(["-q", "sample", "--from", run, "-n", 40, "--batch-size", 16, "--out", out])
    parts = sorted((out / "ids-parts").glob("*.npz"))
    parts[1].unlink()
    (out / "000003.png").unlink()
    (out / "tokens.npy").unlink()
    res = _ok(["sample", "--from", run, "-n", 40, "--batch-size", 16, "--out", out])
    assert "17 new, 23 already there" in plain(res.output)
    assert np.array_equal(np.load(out / "tokens.npy"), ids)
    assert np.array_equal(np.load(out / "token_distances.npy"), dist)
    _ok(["eval", "joint-tv", "--teacher", "exact-scales", out])  # scored against the target joint


def test_k_step_and_set_prediction_sets_carry_their_sampled_ids(exact_plugin, tmp_path):
    run = tmp_path / "run"
    _ok(["-q", "distill", "--teacher", "exact-raster", "--out", run, *TINY])
    _ok(["-q", "sample", "--from", run, "--steps", 2, "-n", 30, "--out", tmp_path / "k2"])
    _ok(["-q", "sample", "--from", run, "-n", 30, "--out", tmp_path / "k1"])
    k2, k1 = np.load(tmp_path / "k2" / "tokens.npy"), np.load(tmp_path / "k1" / "tokens.npy")
    assert k2.shape == (30, 4) and np.array_equal(k2[:, :3], k1[:, :3])  # the last AR step re-sampled only
    assert not (tmp_path / "k2" / "token_distances.npy").exists()
    _ok(["-q", "sample", "--teacher", "exact-raster", "--baseline", "set-prediction", "-n", 30,
         "--out", tmp_path / "sp"])
    assert np.load(tmp_path / "sp" / "tokens.npy").shape == (30, 4)


def test_joint_tv_refuses_what_it_cannot_score(exact_plugin, synthetic_plugin, tmp_path):
    out = tmp_path / "s"
    _ok(["-q", "sample", "--teacher", "exact-raster", "-n", 10, "--out", out])
    res = runner.invoke(app, ["eval", "joint-tv", "--teacher", "exact-scales", str(out)])
    assert res.exit_code != 0 and "sampled from teacher exact-raster, not exact-scales" in plain(res.output)
    res = runner.invoke(app, ["eval", "joint-tv", "--teacher", "exact-raster", str(tmp_path)])
    assert res.exit_code != 0 and "not a dd2 sample set" in plain(res.output)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["tokens"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    res = runner.invoke(app, ["eval", "joint-tv", "--teacher", "exact-raster", str(out)])
    assert res.exit_code != 0 and "has no tokens.npy" in plain(res.output)


def test_a_teacher_without_an_exact_joint_is_refused(synthetic_plugin, tmp_path, monkeypatch):
    from synthetic import SyntheticTeacher

    out = tmp_path / "s"
    _ok(["-q", "sample", "--teacher", "synthetic-corr", "-n", 10, "--out", out])
    monkeypatch.setattr(SyntheticTeacher, "exact_joint", lambda self, label, settings=None: None)
    res = runner.invoke(app, ["eval", "joint-tv", "--teacher", "synthetic-corr", str(out)])
    assert res.exit_code != 0 and "does not expose its exact joint" in plain(res.output)


def test_a_set_started_before_token_ids_keeps_its_images(exact_plugin, tmp_path):
    out = tmp_path / "old"
    _ok(["-q", "sample", "--teacher", "exact-raster", "-n", 10, "--out", out])
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("ids_parts", "tokens", "ids_source"):
        manifest.pop(key)
    (out / "manifest.json").write_text(json.dumps(manifest))
    for p in (out / "ids-parts").glob("*"):
        p.unlink()
    (out / "tokens.npy").unlink()
    before = {p.name: p.read_bytes() for p in Path(out).glob("*.png")}
    res = _ok(["sample", "--teacher", "exact-raster", "-n", 10, "--out", out])
    assert "already there" in plain(res.output) and not (out / "tokens.npy").exists()
    assert before == {p.name: p.read_bytes() for p in Path(out).glob("*.png")}
