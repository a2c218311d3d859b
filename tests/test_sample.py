"""`dd2 sample`: determinism per index, resume, the ADM npz, k-step refinement, baselines, bad input."""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_output import plain
from typer.testing import CliRunner

from dd2cli import plugins
from dd2cli.cli import app
from dd2cli.engine.labels import LabelSchedule, index_seed
from dd2cli.engine.sample import _SetPrediction

runner = CliRunner()
TINY = ["--set", "stage1.steps=6", "--set", "stage2.steps=4", "--set", "stage1.batch_size=8",
        "--set", "stage2.batch_size=8", "--set", "head.width=32", "--set", "head.depth=1",
        "--set", "run.checkpoint_every=2", "--set", "run.log_every=1", "--set", "run.grid_per_class=2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One tiny distillation run of the synthetic teacher, shared by the tests of this module."""
    from synthetic import SyntheticPlugin

    plugins.reset()
    plugins.register_plugin(SyntheticPlugin(), name="synthetic")
    out = tmp_path_factory.mktemp("runs") / "synthetic-run"
    res = runner.invoke(app, ["-q", "distill", "--teacher", "synthetic-corr", "--out", str(out), *TINY])
    plugins.reset()
    assert res.exit_code == 0, res.output
    return out


def _sample(*args):
    res = runner.invoke(app, ["-q", "sample", *[str(a) for a in args]])
    assert res.exit_code == 0, res.output
    return res


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("[0-9]*.png"))}


def _npz(folder: Path):
    (path,) = folder.glob("samples_*.npz")
    return np.load(path)


def test_one_step_is_deterministic_per_index_across_batch_sizes(synthetic_plugin, run_dir, tmp_path):
    _sample("--from", run_dir, "-n", 10, "--batch-size", 3, "--out", tmp_path / "a")
    _sample("--from", run_dir, "-n", 10, "--batch-size", 10, "--out", tmp_path / "b")
    _sample("--from", run_dir, "-n", 6, "--batch-size", 4, "--out", tmp_path / "c")
    a, b, c = _pngs(tmp_path / "a"), _pngs(tmp_path / "b"), _pngs(tmp_path / "c")
    assert len(a) == 10 and a == b
    assert c == {k: v for k, v in a.items() if int(k[:6]) < 6}  # sample i does not depend on n
    assert len(set(a.values())) > 1  # not one image repeated
    # another seed gives other images
    _sample("--from", run_dir, "-n", 10, "--seed", 1, "--out", tmp_path / "d")
    assert _pngs(tmp_path / "d") != a


def test_npz_is_the_adm_layout_and_matches_the_pngs(synthetic_plugin, run_dir, tmp_path):
    from PIL import Image

    out = tmp_path / "s"
    _sample("--from", run_dir, "-n", 12, "--labels", "balanced", "--out", out)
    data = _npz(out)
    assert (out / "samples_12x4x4x3.npz").is_file()
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (12, 4, 4, 3)
    for i in range(12):
        assert np.array_equal(data["arr_0"][i], np.asarray(Image.open(out / f"{i:06d}.png").convert("RGB")))
    assert data["arr_1"].tolist() == [i % 2 for i in range(12)]  # synthetic-corr has 2 classes
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["n"] == 12 and manifest["dd2_version"]
    src = manifest["settings"]["source"]
    assert src["kind"] == "run" and src["teacher"] == "synthetic-corr" and src["weights"] == "ema"
    assert src["checkpoint_step"] == 4 and len(src["checkpoint_sha256"]) == 64
    assert Path(src["run_dir"]) == run_dir.resolve()
    assert manifest["settings"]["mode"] == "one-step" and manifest["label_counts"] == [6, 6]
    assert (out / "preview.png").is_file()


def test_raw_and_ema_generators_are_both_available(synthetic_plugin, run_dir, tmp_path):
    _sample("--from", run_dir, "-n", 8, "--generator", "raw", "--out", tmp_path / "raw")
    _sample("--from", run_dir, "-n", 8, "--out", tmp_path / "ema")
    raw = json.loads((tmp_path / "raw" / "manifest.json").read_text())
    assert raw["settings"]["source"]["weights"] == "raw"
    assert len(_pngs(tmp_path / "raw")) == 8


def test_resume_after_interruption_gives_identical_files(synthetic_plugin, run_dir, tmp_path, monkeypatch):
    from dd2cli.engine import sample as sample_mod

    ref, out = tmp_path / "ref", tmp_path / "out"
    _sample("--from", run_dir, "-n", 10, "--batch-size", 4, "--out", ref)
    # 1. a run that dies after its first batch leaves an incomplete set (no npz, manifest not complete)
    real, calls = sample_mod._fresh_eps, {"n": 0}

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sample_mod, "_fresh_eps", dies)
    res = runner.invoke(app, ["-q", "sample", "--from", str(run_dir), "-n", "10", "--batch-size", "4",
                              "--out", str(out)])
    assert res.exit_code != 0
    monkeypatch.setattr(sample_mod, "_fresh_eps", real)
    assert len(_pngs(out)) == 4 and not list(out.glob("*.npz"))
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    # 2. rerun: only the missing images are made
    res = runner.invoke(app, ["sample", "--from", str(run_dir), "-n", "10", "--batch-size", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "6 new, 4 already there" in res.output
    # 3. delete some PNGs and the npz, rerun with another batch size
    for name in ("000001.png", "000007.png"):
        (out / name).unlink()
    (out / ".000001.png.abc123.tmp").write_bytes(b"half a png")  # what a kill during a write leaves
    next(out.glob("*.npz")).unlink()
    res = runner.invoke(app, ["sample", "--from", str(run_dir), "-n", "10", "--batch-size", "3", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "2 new, 8 already there" in res.output
    assert _pngs(out) == _pngs(ref)
    assert next(out.glob("*.npz")).read_bytes() == next(ref.glob("*.npz")).read_bytes()
    assert not list(out.glob(".*.tmp"))


def test_resume_refuses_other_settings_and_fewer_images(synthetic_plugin, run_dir, tmp_path):
    out = tmp_path / "s"
    _sample("--from", run_dir, "-n", 6, "--out", out)
    res = runner.invoke(app, ["sample", "--from", str(run_dir), "-n", "6", "--seed", "3", "--out", str(out)])
    assert res.exit_code != 0 and "other settings (seed is 0 there but 3 now)" in res.output
    res = runner.invoke(app, ["sample", "--from", str(run_dir), "-n", "4", "--out", str(out)])
    assert res.exit_code != 0 and "already holds 6 samples" in res.output
    # more images extend the set; the first ones stay as they were
    before = _pngs(out)
    _sample("--from", run_dir, "-n", 9, "--out", out)
    after = _pngs(out)
    assert len(after) == 9 and {k: after[k] for k in before} == before
    assert _npz(out)["arr_0"].shape[0] == 9 and len(list(out.glob("*.npz"))) == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    res = runner.invoke(app, ["sample", "--from", str(run_dir), "-n", "2", "--out", str(tmp_path / "other")])
    assert res.exit_code != 0 and "not a dd2 sample set" in res.output


def test_teacher_sampling_is_deterministic_across_batch_sizes_and_n(synthetic_plugin, tmp_path):
    base = ["--teacher", "synthetic-corr", "--block-size", 4]
    _sample(*base, "-n", 10, "--batch-size", 3, "--out", tmp_path / "a")
    _sample(*base, "-n", 10, "--batch-size", 8, "--out", tmp_path / "b")
    _sample(*base, "-n", 6, "--out", tmp_path / "c")  # the last block is partial: still the same images
    a = _pngs(tmp_path / "a")
    assert len(a) == 10 and a == _pngs(tmp_path / "b")
    assert _pngs(tmp_path / "c") == {k: v for k, v in a.items() if int(k[:6]) < 6}
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["settings"]["mode"] == "teacher" and manifest["settings"]["steps"] == 3
    assert manifest["settings"]["sampling"] == {"cfg": 1.5, "top_k": 3, "top_p": 1.0, "temperature": 1.0,
                                                "cfg_interval": -1}  # the variant's evaluation settings
    _sample(*base, "-n", 10, "--cfg", 1.0, "--top-k", 0, "--out", tmp_path / "d")
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["settings"]["sampling"]["top_k"] == 0


def test_a_block_draws_all_its_tokens_but_decodes_only_the_images_asked_for(synthetic_plugin, tmp_path, monkeypatch):
    from synthetic import SyntheticTeacher

    decoded = []
    decode = SyntheticTeacher.decode
    monkeypatch.setattr(SyntheticTeacher, "decode", lambda self, x, *a, **k: decoded.append(len(x)) or decode(self, x))
    _sample("--teacher", "synthetic-corr", "--block-size", 8, "-n", 10, "--out", tmp_path / "a")
    assert sum(decoded) == 10  # blocks of 8 and 2, not 16
    decoded.clear()
    _sample("--teacher", "synthetic-corr", "--block-size", 8, "-n", 3, "--out", tmp_path / "b")
    assert sum(decoded) == 3
    a = _pngs(tmp_path / "a")
    assert _pngs(tmp_path / "b") == {k: v for k, v in a.items() if int(k[:6]) < 3}


def test_teacher_blocks_match_the_teachers_own_sampler(synthetic_plugin, tmp_path):
    """Block b of a teacher sample set is `teacher.sample(labels, settings, generator seeded (seed, b))`."""
    _sample("--teacher", "synthetic-corr", "-n", 5, "--block-size", 5, "--seed", 7, "--out", tmp_path / "a")
    teacher = plugins.get_variant("synthetic-corr").load().eval()
    labels = LabelSchedule("uniform", 2, 7)(range(5))
    g = torch.Generator().manual_seed(index_seed(7, "block", 0))
    images = teacher.decode(teacher.sample(labels, teacher.spec.evaluation, generator=g))
    expected = (images.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(_npz(tmp_path / "a")["arr_0"], expected)


def test_k_step_keeps_the_generator_prefix_and_resamples_the_last_steps(synthetic_plugin, run_dir, tmp_path,
                                                                        monkeypatch):
    from synthetic import SyntheticTeacher

    calls = []
    real = SyntheticTeacher.sample

    def spy(self, labels_B, settings, prefix_BN=None, start_step=0, generator=None, return_logits=False):
        calls.append((None if prefix_BN is None else prefix_BN.clone(), start_step, settings))
        return real(self, labels_B, settings, prefix_BN, start_step, generator, return_logits)

    monkeypatch.setattr(SyntheticTeacher, "sample", spy)
    _sample("--from", run_dir, "-n", 6, "--steps", 2, "--block-size", 4, "--batch-size", 3, "--top-k", 0,
            "--out", tmp_path / "k2")
    assert [c[1] for c in calls] == [2, 2]  # 3 AR steps, k=2: the teacher re-samples the last step only
    assert all(c[0] is not None and c[0].shape == (4, 3) and c[0].dtype == torch.long for c in calls)
    assert calls[0][2].top_k == 0 and calls[0][2].cfg == 1.5
    # the prefix is the one-step sample's nearest-codebook tokens of the same indices
    from dd2cli.engine.runs import load_generator_from_run
    from dd2cli.engine.sample import _fresh_eps

    gen, teacher, _ = load_generator_from_run(run_dir)
    labels = LabelSchedule("uniform", 2, 0)(range(4))
    with torch.no_grad():
        tokens = teacher.as_tokens(gen(_fresh_eps(range(4), 0, (3, 2), "cpu"), labels))
    assert torch.equal(calls[0][0], tokens)
    # batch size does not change k-step samples either
    _sample("--from", run_dir, "-n", 6, "--steps", 2, "--block-size", 4, "--batch-size", 6, "--top-k", 0,
            "--out", tmp_path / "k2b")
    assert _pngs(tmp_path / "k2") == _pngs(tmp_path / "k2b")


def test_set_prediction_draws_each_position_from_its_class_marginal():
    # class 0: position 0 is always token 1; position 1 is 2 or 3 with frequencies 1/4, 3/4
    tokens = torch.tensor([[1, 2, 0], [1, 3, 0], [1, 3, 0], [1, 3, 0], [0, 0, 2], [0, 1, 2]])
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    sp = _SetPrediction(tokens, labels, num_classes=2)
    out = sp.tokens(0, list(range(4000)), torch.zeros(4000, dtype=torch.long))
    assert (out[:, 0] == 1).all() and (out[:, 2] == 0).all()
    frac3 = (out[:, 1] == 3).float().mean().item()
    assert abs(frac3 - 0.75) < 0.03
    out1 = sp.tokens(0, list(range(2000)), torch.ones(2000, dtype=torch.long))
    assert set(out1[:, 1].tolist()) == {0, 1} and (out1[:, 2] == 2).all()
    # positions are independent: (pos 0, pos 1) pairs that no teacher sample had do occur for class 1
    pairs = set(map(tuple, out1[:, :2].tolist()))
    assert (0, 1) in pairs and (0, 0) in pairs
    # the same index gives the same tokens whatever batch it is in
    assert torch.equal(sp.tokens(0, [5, 9], torch.zeros(2, dtype=torch.long))[1], out[9])


def test_set_prediction_baseline_end_to_end_and_cache(synthetic_plugin, tmp_path):
    out = tmp_path / "samples" / "sp"
    args = ["--teacher", "synthetic-corr", "--baseline", "set-prediction", "--baseline-samples", 40]
    _sample(*args, "-n", 8, "--out", out)
    (cache,) = (tmp_path / "samples" / ".cache").glob("set-prediction-synthetic-corr-40-*.safetensors")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["mode"] == "set-prediction" and manifest["settings"]["baseline_samples"] == 40
    mtime = cache.stat().st_mtime_ns
    _sample(*args, "-n", 8, "--out", tmp_path / "samples" / "sp2")
    assert cache.stat().st_mtime_ns == mtime  # reused, not redrawn
    assert _pngs(out) == _pngs(tmp_path / "samples" / "sp2")


def test_set_prediction_from_a_run_caches_in_the_run(synthetic_plugin, run_dir, tmp_path):
    _sample("--from", run_dir, "--baseline", "set-prediction", "--baseline-samples", 20, "-n", 4,
            "--out", tmp_path / "sp")
    assert list((run_dir / "baseline").glob("set-prediction-synthetic-corr-20-*.safetensors"))


def test_default_source_is_the_latest_run_and_a_rerun_resumes(synthetic_plugin, run_dir, monkeypatch):
    monkeypatch.setenv("DD2_RUNS_DIR", str(run_dir.parent))
    res = runner.invoke(app, ["sample", "--steps", "1", "-n", "5"])
    assert res.exit_code == 0, res.output
    assert f"most recent run: {run_dir}" in res.output.replace("\n", "")
    (folder,) = [p for p in (run_dir / "samples").glob("ema-1step-*") if (p / "manifest.json").is_file()
                 and json.loads((p / "manifest.json").read_text())["n"] == 5]
    before = (folder / "manifest.json").read_text()
    res = runner.invoke(app, ["sample", "--steps", "1", "-n", "5"])
    assert res.exit_code == 0 and "Nothing to do" in res.output
    assert (folder / "manifest.json").read_text() == before  # still complete
    assert len([p for p in (run_dir / "samples").glob("ema-1step-*")
                if json.loads((p / "manifest.json").read_text())["n"] == 5]) == 1


def test_labels_are_a_pure_function_of_the_index():
    u = LabelSchedule("uniform", 10, 3)
    full = u(range(2100))
    assert torch.equal(u([5, 1500, 2099]), full[[5, 1500, 2099]])
    assert 150 < int((full == 4).sum()) < 270  # roughly uniform
    assert not torch.equal(full, LabelSchedule("uniform", 10, 4)(range(2100)))
    assert LabelSchedule("balanced", 3, 0)(range(7)).tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert LabelSchedule("4, 1", 10, 0)(range(5)).tolist() == [4, 1, 4, 1, 4]


@pytest.mark.parametrize("args, message", [
    (["-n", "0"], "-n must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--steps", "2"], "samples in its own 3 steps"),
    (["--labels", "7"], "class 7, outside 0..1"),
    (["--labels", "a,b"], "not uniform, balanced or a comma list"),
    (["--baseline", "marginal"], "is not one of 'set-prediction'"),
    (["--generator", "raw"], "applies to a distillation run"),
    (["--weights", "oops"], "is not of the form KEY=PATH"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--device", "tpu"], "Unknown device 'tpu'; use auto, cpu, cuda or cuda:N."),
    (["--from", "/nonexistent/run"], "neither a distillation run"),
    (["--teacher", "nope"], "No teacher 'nope'"),
])
def test_bad_input_is_one_sentence(synthetic_plugin, tmp_path, args, message):
    base = [] if any(a in ("--from", "--teacher") for a in args) else ["--teacher", "synthetic-corr"]
    res = runner.invoke(app, ["sample", *base, *args, "--out", str(tmp_path / "o")])
    assert res.exit_code != 0, res.output
    assert message in plain(res.output), res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "o" / "000000.png").exists()


def test_steps_out_of_range_for_a_run(synthetic_plugin, run_dir, tmp_path):
    res = runner.invoke(app, ["sample", "--from", str(run_dir), "--steps", "4", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "more than the teacher's 3 AR steps" in res.output


def test_bundle_source_uses_its_generator_codebook_and_decoder(tmp_path, monkeypatch):
    """A bundle (dd2cli.engine.bundle.load_bundle) is sampled through `.latents(labels, eps)`, its codebook (the
    ids and distances written to tokens.npy) and its `.decoder(ids)`."""
    from dd2cli.engine import sample as sample_mod
    from dd2cli.teachers import TeacherSpec

    seen = []

    class FakeBundle:
        spec = TeacherSpec(num_tokens=3, vocab_size=4, latent_dim=2, num_classes=2, null_class=2, steps=(0, 1, 2),
                           image_size=4)
        codebook_Vd = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])

        def latents(self, labels_B, eps_BNd):
            seen.append(eps_BNd.shape)
            return eps_BNd

        def decoder(self, ids_BN):
            return (ids_BN.float().sum(1) / 9)[:, None, None, None].expand(-1, 3, 4, 4)

    monkeypatch.setattr(sample_mod, "load_bundle", lambda path, device: FakeBundle())
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text(json.dumps({"teacher": "fake"}))
    _sample("--from", bundle, "-n", 5, "--batch-size", 2, "--out", tmp_path / "o")
    assert seen == [(2, 3, 2), (2, 3, 2), (1, 3, 2)]
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["settings"]["source"]["kind"] == "bundle" and len(_pngs(tmp_path / "o")) == 5
    ids, dist = np.load(tmp_path / "o" / "tokens.npy"), np.load(tmp_path / "o" / "token_distances.npy")
    eps = torch.stack([sample_mod._fresh_eps([i], 0, (3, 2), "cpu")[0] for i in range(5)])
    expected = torch.cdist(eps, FakeBundle.codebook_Vd[None].expand(5, -1, -1))
    assert ids.shape == (5, 3) and np.array_equal(ids, expected.argmin(-1).numpy())
    assert np.allclose(dist, expected.min(-1).values.numpy(), atol=1e-5)
    res = runner.invoke(app, ["sample", "--from", str(bundle), "--steps", "2", "--out", str(tmp_path / "p")])
    assert res.exit_code != 0 and "needs the teacher" in res.output


def test_bundled_digits_teachers_sample(tmp_path):
    for module, name, variant in (("dd2_var", "var", "var-digits"), ("dd2_llamagen", "llamagen", "llamagen-digits")):
        plugins.register_plugin(importlib.import_module(module), name=name)
        _sample("--teacher", variant, "-n", 12, "--labels", "balanced", "--out", tmp_path / variant)
        data = _npz(tmp_path / variant)
        assert data["arr_0"].shape == (12, 16, 16, 3) and data["arr_0"].std() > 10


@pytest.mark.slow
def test_torchrun_shards_blocks_and_matches_one_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DD2_LOAD_PLUGINS"}  # the bundled teachers load
    env["OMP_NUM_THREADS"] = "1"
    common = ["-q", "sample", "--teacher", "var-digits", "-n", "20", "--block-size", "4", "--device", "cpu"]
    one = subprocess.run([sys.executable, "-m", "dd2cli", *common, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29531", "-m", "dd2cli", *common, "--out", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert _pngs(tmp_path / "one") == _pngs(tmp_path / "two")
    assert np.array_equal(_npz(tmp_path / "one")["arr_0"], _npz(tmp_path / "two")["arr_0"])
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["last_invocation"]["world_size"] == 2


def test_paths_with_brackets_are_printed_as_they_are(synthetic_plugin, tmp_path):
    """User text is never read as rich markup (`[/1]` would close a tag that was never opened)."""
    out = tmp_path / "exp[/1]"
    res = runner.invoke(app, ["sample", "--teacher", "synthetic-corr", "-n", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"Samples: {out}" in plain(res.output)
    res = runner.invoke(app, ["sample", "--from", str(tmp_path / "[/x]"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and f"{tmp_path / '[/x]'} is neither a distillation run" in plain(res.output)


def test_defaults_a_newcomer_expects(synthetic_plugin, tmp_path, monkeypatch):
    """`dd2 sample --teacher T` alone: 1,000 images (not 50,000), balanced labels when the class count divides n,
    written under ./dd2-samples/, which the repository's .gitignore covers."""
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["-q", "sample", "--teacher", "synthetic-corr"])
    assert res.exit_code == 0, res.output
    (folder,) = (tmp_path / "dd2-samples").iterdir()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["n"] == 1000 and manifest["settings"]["labels"] == "balanced"
    assert manifest["label_counts"] == [500, 500] and len(_pngs(folder)) == 1000
    res = runner.invoke(app, ["-q", "sample", "--teacher", "synthetic-corr", "-n", "7", "--out", "odd"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "odd" / "manifest.json").read_text())["settings"]["labels"] == "uniform"
    gitignore = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().split()
    assert "dd2-samples/" in gitignore


def test_the_preview_has_one_row_per_class_like_the_runs_sample_grids(synthetic_plugin, tmp_path):
    from PIL import Image

    from dd2cli.engine.sample_sets import preview_rows

    assert preview_rows(np.array([0, 1, 0, 1, 0, 1, 0])) == [[0, 2, 4], [1, 3, 5]]  # rows as long as the shortest
    assert preview_rows(np.arange(30) % 3, classes=2, per_class=4) == [[0, 3, 6, 9], [1, 4, 7, 10]]
    _sample("--teacher", "synthetic-corr", "-n", 8, "--labels", "balanced", "--out", tmp_path / "s")
    size = Image.open(tmp_path / "s" / "000000.png").size[0]
    tile = size * max(1, 64 // size)
    assert Image.open(tmp_path / "s" / "preview.png").size == (4 * (tile + 1) + 1, 2 * (tile + 1) + 1)  # 2 classes
