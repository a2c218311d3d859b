"""`dd2 export` bundles: every way of loading one gives the run's images; damaged bundles are one sentence.

Round trips compare, for the same labels and noise, the images of
1. the run directory (`load_generator_from_run` + `teacher.decode` of nearest-codebook ids),
2. `dd2 sample --from BUNDLE` (against `dd2 sample --from RUN`, PNG for PNG),
3. the Python API `dd2cli.load_generator` (explicit noise and seeds),
4. the `generator.pt2` program, run in a process where dd2 cannot be imported (marked slow: torch.export),
on the synthetic teacher, a tiny var-digits run and a tiny llamagen-digits run.
"""

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_output import plain
from typer.testing import CliRunner

import dd2cli
from dd2cli import plugins
from dd2cli.cli import app
from dd2cli.engine.bundle import BUNDLE_VERSION, BundleError, BundleVersionError, load_bundle
from dd2cli.engine.distill import DistillRequest, run
from dd2cli.engine.export import ExportRequest, export
from dd2cli.engine.runs import load_generator_from_run
from dd2cli.errors import CheckpointMismatchError, DD2Error, FileFormatError
from dd2cli.files import load_safetensors, save_safetensors
from dd2cli.images import to_uint8

runner = CliRunner()
TINY = ("stage1.steps=2", "stage2.steps=3", "stage1.batch_size=4", "stage2.batch_size=4", "head.width=32",
        "head.depth=1", "run.checkpoint_every=100", "run.log_every=1", "run.grid_per_class=1",
        "stage1.head_only_steps=0", "flow_init.steps=2", "flow_init.batch_size=4", "flow_init.euler_steps=2")
FAMILIES = {"synthetic": None, "var": "dd2_var", "llamagen": "dd2_llamagen"}


def _register(family: str) -> None:
    """Make `family` the only registered teacher family."""
    plugins.reset()
    if family == "synthetic":
        from synthetic import SyntheticPlugin

        plugins.register_plugin(SyntheticPlugin(), name="synthetic")
    else:
        plugins.register_plugin(importlib.import_module(FAMILIES[family]), name=family)


def _distill(family: str, teacher: str, out: Path) -> Path:
    _register(family)
    try:
        run(DistillRequest(teacher=teacher, out=out, overrides=TINY))
    finally:
        plugins.reset()
    return out


def _inputs(spec, batch: int = 4, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    labels_B = torch.arange(batch) % spec.num_classes
    eps_BNd = torch.randn(batch, spec.num_tokens, spec.latent_dim, generator=torch.Generator().manual_seed(seed))
    return labels_B, eps_BNd


def _run_images(run_dir: Path, family: str, labels_B, eps_BNd, which: str = "ema") -> torch.Tensor:
    """The reference: the run's generator, nearest-codebook ids, the teacher's decoder."""
    _register(family)
    gen, teacher, _ = load_generator_from_run(run_dir, which=which)
    with torch.no_grad():
        return teacher.decode(teacher.as_tokens(gen(eps_BNd, labels_B))).float()


def _installed_plugins_env() -> dict[str, str]:
    """The environment of a child process that loads every installed plugin (the tests load none by default)."""
    return {k: v for k, v in os.environ.items() if k != "DD2_LOAD_PLUGINS"}


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("[0-9]*.png"))}


PT2_SCRIPT = r"""
import sys
for name in ("dd2cli", "dd2_var", "dd2_llamagen", "synthetic"):
    sys.modules[name] = None  # importing dd2 (or a plugin) now fails: the program must not need it
import numpy as np
import torch
program = torch.export.load(sys.argv[1]).module()
data = np.load(sys.argv[2])
for key in ("", "_b1"):
    labels, noise = torch.from_numpy(data["labels" + key]), torch.from_numpy(data["noise" + key])
    out = program(labels, noise)
    assert out.dtype == torch.uint8, out.dtype
    np.save(sys.argv[3] + key + ".npy", out.numpy())
"""


def _pt2_outputs(bundle: Path, tmp: Path, labels_B, eps_BNd) -> tuple[np.ndarray, np.ndarray]:
    """Run generator.pt2 in a fresh process that cannot import dd2; (batch output, batch-of-1 output)."""
    np.savez(tmp / "inputs.npz", labels=labels_B.numpy(), noise=eps_BNd.numpy(), labels_b1=labels_B[:1].numpy(),
             noise_b1=eps_BNd[:1].numpy())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    res = subprocess.run([sys.executable, "-c", PT2_SCRIPT, str(bundle / "generator.pt2"), str(tmp / "inputs.npz"),
                          str(tmp / "pt2")], env=env, capture_output=True, text=True, timeout=300, cwd=tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    return np.load(tmp / "pt2.npy"), np.load(tmp / "pt2_b1.npy")


def _round_trip(family: str, run_dir: Path, tmp_path: Path, pt2: bool = True, n_sample: int = 6) -> dict:
    """Export (with generator.pt2 when `pt2`) and compare every way of getting images; returns measurements."""
    bundle = tmp_path / "bundle"
    _register(family)
    res = runner.invoke(app, ["export", str(run_dir), "--out", str(bundle), "--format", "pt2" if pt2 else
                              "safetensors"])
    assert res.exit_code == 0, res.output
    assert "Bundle:" in res.output
    # loading a bundle needs the family's plugin (registered above), never the teacher's weights

    # 3. Python API
    t0 = time.perf_counter()
    gen = dd2cli.load_generator(bundle)
    load_seconds = time.perf_counter() - t0
    assert isinstance(gen, torch.nn.Module) and gen.teacher is None
    labels_B, eps_BNd = _inputs(gen.spec)
    api = gen(labels_B, noise=eps_BNd)
    assert api.dtype == torch.float32 and api.shape == (4, 3, gen.image_size, gen.image_size)
    assert 0 <= float(api.min()) and float(api.max()) <= 1
    assert torch.equal(api, gen.generate(labels_B, eps_BNd))
    assert torch.equal(gen(labels_B, seed=3), gen.generate(labels_B, gen.noise(4, seed=3)))
    assert not torch.equal(gen(labels_B, seed=3), gen(labels_B, seed=4))

    # 1. the run directory
    reference = _run_images(run_dir, family, labels_B, eps_BNd)
    diff = float((api - reference).abs().max())
    assert diff <= 1e-6, diff

    # 4. the torch.export program, without dd2
    if pt2:
        images, images_b1 = _pt2_outputs(bundle, tmp_path, labels_B, eps_BNd)
        expected = to_uint8(reference).numpy()
        assert images.shape == (4, gen.image_size, gen.image_size, 3)
        assert np.array_equal(images, expected)
        assert np.array_equal(images_b1, expected[:1])  # the batch dimension is dynamic
    else:
        assert not (bundle / "generator.pt2").exists()

    # 2. dd2 sample --from BUNDLE gives the PNGs of dd2 sample --from RUN
    for src, name in ((bundle, "from-bundle"), (run_dir, "from-run")):
        out = runner.invoke(app, ["-q", "sample", "--from", str(src), "-n", str(n_sample), "--batch-size", "4",
                                  "--labels", "balanced", "--out", str(tmp_path / name)])
        assert out.exit_code == 0, out.output
    from_bundle, from_run = _pngs(tmp_path / "from-bundle"), _pngs(tmp_path / "from-run")
    assert len(from_bundle) == n_sample and from_bundle == from_run
    manifest = json.loads((tmp_path / "from-bundle" / "manifest.json").read_text())
    assert manifest["settings"]["source"]["kind"] == "bundle"
    return {"bundle": bundle, "gen": gen, "load_seconds": load_seconds, "max_abs_diff": diff}


# ---- the synthetic teacher -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    return _distill("synthetic", "synthetic-scales", tmp_path_factory.mktemp("runs") / "synthetic-run")


def test_synthetic_round_trip_run_sample_api(synthetic_run, tmp_path):
    r = _round_trip("synthetic", synthetic_run, tmp_path, pt2=False)
    bundle = r["bundle"]
    names = {p.name for p in bundle.iterdir()}
    assert {"bundle.json", "config.json", "generator.safetensors", "decoder.safetensors", "codebook.safetensors",
            "README.md", "samples.png"} == names
    marker = json.loads((bundle / "bundle.json").read_text())
    assert marker["format"] == "dd2-generator-bundle" and marker["version"] == BUNDLE_VERSION
    config = json.loads((bundle / "config.json").read_text())
    assert config["spec"]["num_tokens"] == 6 and config["spec"]["steps"] == [0, 1, 1, 2, 2, 2]
    assert config["run"]["checkpoint_step"] == 3 and config["weights"] == {"which": "ema", "dtype": "fp32",
                                                                           "codebook_dtype": "fp32"}
    assert config["backbone"]["factory"] == "synthetic:build_bundle_backbone"
    assert config["distillation"]["settings"]["stage2"]["steps"] == 3
    assert config["pt2"] is None and config["check"]["max_abs_pixel_diff_vs_run"] == 0.0
    assert not list(bundle.parent.glob(".bundle.*"))  # no temporary folder left behind


def test_export_refuses_bad_requests_and_leaves_nothing(synthetic_run, tmp_path, monkeypatch):
    _register("synthetic")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    cases = [
        (["export", str(synthetic_run), "--out", str(busy)], "already exists and is not empty"),
        (["export", str(synthetic_run), "--out", str(tmp_path / "a"), "--dtype", "fp8"],
         "is not one of 'fp32', 'bf16', 'fp16'"),
        (["export", str(synthetic_run), "--out", str(tmp_path / "a"), "--generator", "best"],
         "is not one of 'ema', 'raw'"),
        (["export", str(synthetic_run), "--out", str(tmp_path / "a"), "--format", "onnx"],
         "is not one of 'safetensors', 'pt2'"),
        (["export", str(tmp_path / "nope"), "--out", str(tmp_path / "a")], "is not a distillation run"),
    ]
    for args, message in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert message in plain(res.output) and "Traceback" not in res.output, (args, res.output)
    assert (busy / "keep.txt").read_text() == "x" and not (tmp_path / "a").exists()

    # a teacher whose plugin has no bundle_parts: one sentence, nothing written
    from synthetic import SyntheticTeacher

    from dd2cli.teacher import Teacher

    monkeypatch.setattr(SyntheticTeacher, "bundle_parts", Teacher.bundle_parts)
    res = runner.invoke(app, ["export", str(synthetic_run), "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "does not implement bundle_parts()" in res.output, res.output
    assert not (tmp_path / "b").exists()


def test_export_of_a_run_without_stage2_is_refused(tmp_path):
    _register("synthetic")
    run_dir = tmp_path / "run"
    run(DistillRequest(teacher="synthetic-corr", out=run_dir, overrides=TINY, stage="1"))
    res = runner.invoke(app, ["export", str(run_dir), "--out", str(tmp_path / "b")])
    assert res.exit_code == 2 and "no stage-2 checkpoint" in res.output
    assert not (tmp_path / "b").exists()


def test_interrupted_export_leaves_no_bundle(synthetic_run, tmp_path, monkeypatch):
    from dd2cli.engine import export as export_module

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    _register("synthetic")
    monkeypatch.setattr(export_module, "model_card", boom)  # dies after the weights are written
    with pytest.raises(KeyboardInterrupt):
        export(ExportRequest(run_dir=synthetic_run, out=tmp_path / "b"))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    # a SIGKILL gives no chance to clean up: the next export to the same place removes what it left
    (tmp_path / ".b.k1ll3d.tmp").mkdir()
    (tmp_path / ".b.k1ll3d.tmp" / "generator.safetensors").write_bytes(b"half")
    _register("synthetic")
    export(ExportRequest(run_dir=synthetic_run, out=tmp_path / "b"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_raw_weights_and_half_precision(synthetic_run, tmp_path):
    _register("synthetic")
    export(ExportRequest(run_dir=synthetic_run, out=tmp_path / "raw", weights="raw"))
    export(ExportRequest(run_dir=synthetic_run, out=tmp_path / "fp32"))
    raw, ema = load_bundle(tmp_path / "raw"), load_bundle(tmp_path / "fp32")
    labels_B, eps_BNd = _inputs(raw.spec)
    expected = _run_images(synthetic_run, "synthetic", labels_B, eps_BNd, which="raw")
    assert torch.equal(raw.generate(labels_B, eps_BNd), expected)
    assert not torch.equal(raw.latents(labels_B, eps_BNd), ema.latents(labels_B, eps_BNd))

    size32 = (tmp_path / "fp32" / "generator.safetensors").stat().st_size
    for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        _register("synthetic")
        res = export(ExportRequest(run_dir=synthetic_run, out=tmp_path / dtype, dtype=dtype))
        tensors, _ = load_safetensors(tmp_path / dtype / "generator.safetensors")
        assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch_dtype}
        assert (tmp_path / dtype / "generator.safetensors").stat().st_size < 0.6 * size32
        codebook, _ = load_safetensors(tmp_path / dtype / "codebook.safetensors")
        assert codebook["codebook"].dtype == torch.float32
        half = load_bundle(tmp_path / dtype)
        assert all(p.dtype == torch.float32 for p in half.parameters())  # computes in fp32
        q_half, q_full = half.latents(labels_B, eps_BNd), ema.latents(labels_B, eps_BNd)
        assert q_half.dtype == torch.float32 and 0 < float((q_half - q_full).abs().max()) < 0.2
        assert res.check_max_abs_diff is not None


def test_model_card_describes_the_bundle_and_the_run_metrics(synthetic_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(synthetic_run, run_dir)
    sample_set = run_dir / "samples" / "1step-set"
    sample_set.mkdir()
    (sample_set / "eval-digits.json").write_text(json.dumps({
        "samples": str(sample_set), "count": 500, "features": "digits",
        "metrics": {"fid": 12.5, "class_consistency": 0.875},
        "sample_settings": {"mode": "one-step", "steps": 1, "source": {"weights": "ema", "checkpoint_step": 3}}}))
    _register("synthetic")
    export(ExportRequest(run_dir=run_dir, out=tmp_path / "b", dtype="fp16"))
    card = (tmp_path / "b" / "README.md").read_text()
    for text in ("synthetic-scales", "fid 12.5", "class_consistency 0.875", "| 500 |", "stage 2 (conditional score",
                 "3 generator updates", "stored as fp16", "`generator.safetensors`", "dd2 sample --from b",
                 "dd2cli.load_generator(\"b\"", "step 3"):
        assert text in card, text
    assert "generator.pt2" not in card  # no program was exported
    # YAML front matter, as model hubs read it
    front, _, body = card.removeprefix("---\n").partition("\n---\n")
    fields = dict(line.split(": ", 1) for line in front.splitlines() if ": " in line)
    assert card.startswith("---\n") and body.lstrip().startswith("# dd2 one-step generator")
    assert fields["library_name"] == "dd2" and fields["license"] == "other"  # the synthetic teacher declares none
    assert fields["pipeline_tag"] == "unconditional-image-generation" and "- synthetic-scales" in front
    tensors_meta = load_safetensors(tmp_path / "b" / "generator.safetensors")[1]
    assert tensors_meta["format"] == "pt" and tensors_meta["dd2_format"] == "dd2-generator-bundle"


# ---- damaged bundles -------------------------------------------------------------------------------

@pytest.fixture
def bundle(synthetic_run, tmp_path) -> Path:
    _register("synthetic")  # (loading a bundle resolves its family through the registry)
    export(ExportRequest(run_dir=synthetic_run, out=tmp_path / "bundle"))
    return tmp_path / "bundle"


def _resign(bundle: Path) -> None:
    """Record the content hash of the bundle's files as they are now (what a crafted bundle would carry)."""
    from dd2cli.engine.bundle import content_hash

    marker = json.loads((bundle / "bundle.json").read_text())
    (bundle / "bundle.json").write_text(json.dumps({**marker, "content_sha256": content_hash(bundle)}))


def _error(path: Path, kind: type) -> str:
    with pytest.raises(kind) as info:
        load_bundle(path)
    message = str(info.value)
    assert message.count(". ") == 0 and message.endswith("."), message  # one sentence
    return message


def test_missing_file(bundle):
    (bundle / "decoder.safetensors").unlink()
    assert "incomplete: decoder.safetensors is missing" in _error(bundle, BundleError)
    (bundle / "bundle.json").unlink()
    assert "not a dd2 generator bundle (bundle.json is missing)" in _error(bundle, BundleError)


def test_newer_format_version(bundle):
    config = json.loads((bundle / "config.json").read_text())
    (bundle / "config.json").write_text(json.dumps({**config, "format_version": BUNDLE_VERSION + 1}))
    message = _error(bundle, BundleVersionError)
    assert "newer dd2" in message and f"version {BUNDLE_VERSION + 1}" in message
    marker = json.loads((bundle / "bundle.json").read_text())
    (bundle / "bundle.json").write_text(json.dumps({**marker, "version": BUNDLE_VERSION + 1}))
    assert "bundle.json was written by a newer dd2" in _error(bundle, BundleVersionError)


def test_weights_that_do_not_match_the_config(bundle):
    tensors, meta = load_safetensors(bundle / "generator.safetensors")
    key = "model.head.out.weight"
    save_safetensors(bundle / "generator.safetensors", {k: v for k, v in tensors.items() if k != key}, meta)
    _resign(bundle)  # (past the content hash: the checks a crafted bundle meets next)
    assert f"Key '{key}' is missing" in _error(bundle, CheckpointMismatchError)
    tensors[key] = torch.zeros(5, 5)
    save_safetensors(bundle / "generator.safetensors", tensors, meta)
    _resign(bundle)
    assert f"Key '{key}'" in _error(bundle, CheckpointMismatchError)
    config = json.loads((bundle / "config.json").read_text())
    config["head"]["width"] = 48  # the config, not the file, is wrong: still the first mismatching key
    _rewrite_config(bundle, config)
    assert "model.head" in _error(bundle, CheckpointMismatchError)


def test_truncated_and_corrupted_safetensors(bundle):
    path = bundle / "generator.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _resign(bundle)
    assert "truncated or corrupted" in _error(bundle, FileFormatError)
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    path.write_bytes(bytes(flipped))
    _resign(bundle)
    assert "is corrupted" in _error(bundle, FileFormatError)


def _rewrite_config(bundle: Path, config: dict) -> None:
    """Change config.json and re-sign the bundle, as someone crafting a bundle would (the hash is no secret)."""
    (bundle / "config.json").write_text(json.dumps(config))
    _resign(bundle)


def test_unknown_factory_and_cli_errors(bundle, tmp_path):
    config = json.loads((bundle / "config.json").read_text())
    for factory in ("os:system", "synthetic:SyntheticPlugin", "synthetic.nonexistent:build", None):
        config["decoder"]["factory"] = factory  # none of them declared by the family: never imported or called
        _rewrite_config(bundle, config)
        assert "is not one of the bundle factories the installed 'synthetic' plugin declares" in _error(
            bundle, BundleError)
    res = runner.invoke(app, ["sample", "--from", str(bundle), "-n", "2", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "bundle factories" in plain(res.output) and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change, message", [
    ({"head": {"width": 10**9}}, "far more than the weights it ships"),
    ({"head": {"width": -5}}, "does not describe a generator this dd2 can build"),
    ({"backbone": {"config": {"depth": 10**6}}}, "far more than the weights it ships"),
    ({"spec": None}, "has no 'spec' table"),
    ({"spec": {"num_classes": 0}}, "spec.num_classes = 0, not a whole number >= 1"),
    ({"spec": {"num_tokens": 5}}, "does not describe a generator this dd2 can build"),  # 6 steps recorded
    ({"spec": {"steps": "0,1,2"}}, "no list of whole numbers in spec.steps"),
])
def test_hostile_config_values_are_refused_before_anything_is_allocated(bundle, tmp_path, change, message):
    import time

    config = json.loads((bundle / "config.json").read_text())
    for section, values in change.items():
        if values is None:
            config[section] = None
        elif section == "backbone":
            config[section]["config"].update(values["config"])
        else:
            config[section].update(values)
    _rewrite_config(bundle, config)
    t0 = time.perf_counter()
    assert message in _error(bundle, BundleError)
    assert time.perf_counter() - t0 < 30  # (a depth of a million used to build for minutes)
    res = runner.invoke(app, ["sample", "--from", str(bundle), "-n", "2", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "Traceback" not in res.output and not (tmp_path / "o").exists()


def test_a_declared_factory_must_be_marked(bundle, monkeypatch):
    import dataclasses

    config = json.loads((bundle / "config.json").read_text())
    config["decoder"]["factory"] = "synthetic:SyntheticPlugin"
    _rewrite_config(bundle, config)
    reg = plugins.registry()
    family = reg.families["synthetic"]
    monkeypatch.setitem(reg.families, "synthetic", dataclasses.replace(
        family, bundle_factories=(*family.bundle_factories, "synthetic:SyntheticPlugin")))
    assert "is not a dd2 bundle factory" in _error(bundle, BundleError)


def test_a_bundle_that_names_code_of_its_own_runs_none_of_it(bundle, tmp_path):
    """A module shipped in the bundle folder (or any module) named by config.json is never imported."""
    marker = tmp_path / "payload-ran"
    (bundle / "payload.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                       "def build(config):\n    raise SystemExit\n")
    config = json.loads((bundle / "config.json").read_text())
    config["backbone"]["factory"] = "payload:build"
    _rewrite_config(bundle, config)
    with pytest.raises(BundleError, match="bundle factories"):
        dd2cli.load_generator(bundle)
    res = runner.invoke(app, ["sample", "--from", str(bundle), "-n", "2", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "bundle factories" in plain(res.output)
    # `python -m dd2cli` with the working directory, here the bundle folder, first on the import path (runpy is
    # what `-m` runs; the test family is registered first, as an installed plugin would be)
    code = ("import runpy, sys; sys.path.insert(1, sys.argv[1]); from dd2cli import plugins; "
            "from synthetic import SyntheticPlugin; plugins.register_plugin(SyntheticPlugin(), name='synthetic'); "
            "sys.argv = ['dd2', 'sample', '--from', '.', '-n', '2', '--out', sys.argv[2]]; "
            "runpy.run_module('dd2cli', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(tmp_path / "p")], cwd=bundle,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "DD2_LOAD_PLUGINS": ""})
    assert proc.returncode == 2 and "bundle factories" in plain(proc.stderr), proc.stderr
    assert not marker.exists() and not (tmp_path / "p").exists()


def test_a_bundle_whose_files_were_changed_is_refused(bundle):
    tensors, meta = load_safetensors(bundle / "generator.safetensors")
    save_safetensors(bundle / "generator.safetensors", {k: torch.zeros_like(v) for k, v in tensors.items()}, meta)
    assert "do not match the content hash" in _error(bundle, BundleError)


def test_a_bundle_whose_family_is_not_installed_or_left_out_is_refused(bundle, tmp_path, monkeypatch):
    config = json.loads((bundle / "config.json").read_text())
    assert config["family"] == "synthetic"
    _rewrite_config(bundle, {**config, "plugin_package": "dd2-synthetic"})
    plugins.reset()  # nothing registered: the family is not installed here
    message = _error(bundle, BundleError)
    assert "teacher family 'synthetic', which is not installed" in message
    assert "pip install dd2-synthetic" in message
    monkeypatch.setenv("DD2_LOAD_PLUGINS", "var")  # installed families, but not this one
    plugins.reset()
    message = _error(bundle, BundleError)
    assert "is left out by DD2_LOAD_PLUGINS='var'" in message and "pip install dd2-synthetic" in message
    res = runner.invoke(app, ["sample", "--from", str(bundle), "-n", "2", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "teacher family 'synthetic'" in plain(res.output) and not (tmp_path / "o").exists()


def test_bad_inputs_to_the_loaded_generator(bundle):
    gen = load_bundle(bundle)
    with pytest.raises(DD2Error, match="Class labels must be in 0..1"):
        gen([0, 5], seed=0)
    with pytest.raises(DD2Error, match=r"Noise must have shape \(2, 6, 2\)"):
        gen([0, 1], noise=torch.zeros(2, 3, 2))


def test_import_dd2cli_stays_torch_free():
    code = ("import sys, dd2cli, dd2cli.cli_export; assert 'torch' not in sys.modules; "
            "f = dd2cli.load_generator; assert 'torch' in sys.modules and callable(f)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


# ---- VAR and LlamaGen miniatures ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def var_run(tmp_path_factory):
    return _distill("var", "var-digits", tmp_path_factory.mktemp("runs") / "var-run")


def test_var_digits_round_trip_sizes_and_load_time(var_run, tmp_path):
    r = _round_trip("var", var_run, tmp_path, pt2=False)
    config = json.loads((r["bundle"] / "config.json").read_text())
    assert config["backbone"]["factory"] == "dd2_var.export:build_backbone"
    assert config["teacher_identity"]["weights"]["var"]["sha256"]
    # the bundle holds no teacher transformer weights: no classification head, no encoder
    gen_keys = load_safetensors(r["bundle"] / "generator.safetensors")[0].keys()
    dec_keys = load_safetensors(r["bundle"] / "decoder.safetensors")[0].keys()
    assert not any(k.startswith(("model.backbone.body.head", "model.backbone.body.head_nm")) for k in gen_keys)
    assert not any(k.startswith(("encoder.", "quant_conv.")) for k in dec_keys)
    assert r["load_seconds"] < 2.0, r["load_seconds"]  # about 0.05 s here
    _register("var")
    export(ExportRequest(run_dir=var_run, out=tmp_path / "fp16", dtype="fp16"))
    size = {name: sum(p.stat().st_size for p in (folder).glob("*.safetensors"))
            for name, folder in (("fp32", r["bundle"]), ("fp16", tmp_path / "fp16"))}
    assert size["fp16"] < 0.55 * size["fp32"]
    print(f"\nvar-digits bundle weights: fp32 {size['fp32'] / 2**20:.2f} MiB, fp16 {size['fp16'] / 2**20:.2f} MiB; "
          f"load {r['load_seconds'] * 1000:.0f} ms; max |run − bundle| {r['max_abs_diff']}")


def test_var_factories_draw_no_random_weights():
    """Bundle factories run with random initialisation off: no RNG draws, no wasted init."""
    from dd2_var.config import VARConfig, VQVAEConfig
    from dd2cli.engine.bundle import build_skeleton

    var = VARConfig(depth=2, width=64, num_heads=2, num_classes=3, vocab_size=16, z_channels=4, patch_nums=(1, 2))
    vae = VQVAEConfig(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2))
    _register("var")
    config = {"family": "var", "backbone": {"factory": "dd2_var.export:build_backbone", "config": {"var": var.to_dict(),
                                                                                  "vae": vae.to_dict()}},
              "decoder": {"factory": "dd2_var.export:build_decoder", "config": {"vae": vae.to_dict()}},
              "head": {"latent_dim": 4, "feature_dim": 64, "width": 32, "depth": 1, "mlp_ratio": 2.0}}
    state = torch.get_rng_state()
    generator, decoder = build_skeleton(json.loads(json.dumps(config)))
    assert torch.equal(state, torch.get_rng_state())
    assert "quantize.ema_vocab_hit_SV" not in decoder.state_dict()
    assert any(k.startswith("model.backbone.phi.") for k in generator.state_dict())


def test_cold_load_is_fast(var_run, tmp_path):
    """A fresh process loads a bundle without torch._dynamo (which alone takes seconds to import)."""
    _register("var")
    export(ExportRequest(run_dir=var_run, out=tmp_path / "b"))
    code = ("import sys, time, torch, dd2cli; t = time.perf_counter(); g = dd2cli.load_generator(sys.argv[1]); "
            "dt = time.perf_counter() - t; g([0, 1], seed=0); print(dt, 'torch._dynamo' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], capture_output=True, text=True,
                         timeout=120, env={**_installed_plugins_env(), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    seconds, dynamo = res.stdout.split()
    assert dynamo == "False" and float(seconds) < 2.0, res.stdout  # about 0.17 s here


@pytest.fixture(scope="module")
def llamagen_run(tmp_path_factory):
    return _distill("llamagen", "llamagen-digits", tmp_path_factory.mktemp("runs") / "llamagen-run")


def test_llamagen_digits_round_trip(llamagen_run, tmp_path):
    r = _round_trip("llamagen", llamagen_run, tmp_path, pt2=False)
    config = json.loads((r["bundle"] / "config.json").read_text())
    assert config["backbone"]["factory"] == "dd2_llamagen.export:build_backbone"
    gen_keys = load_safetensors(r["bundle"] / "generator.safetensors")[0].keys()
    dec_keys = load_safetensors(r["bundle"] / "decoder.safetensors")[0].keys()
    # no teacher-only weights: token embedding table, output head, tokenizer encoder
    assert not any("tok_embeddings" in k or k.endswith("output.weight") for k in gen_keys)
    assert not any(k.startswith(("vq.encoder.", "vq.quant_conv.")) for k in dec_keys)
    assert r["load_seconds"] < 2.0, r["load_seconds"]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["synthetic", "var", "llamagen"])
def test_pt2_programs_match_the_run(family, request, tmp_path):
    """generator.pt2: dynamic batch, the run's images byte for byte, in a process without dd2."""
    run_dir = request.getfixturevalue(f"{family}_run")
    r = _round_trip(family, run_dir, tmp_path, pt2=True, n_sample=2)
    pt2 = json.loads((r["bundle"] / "config.json").read_text())["pt2"]
    assert pt2["batch"] == "dynamic" and pt2["torch_version"] == torch.__version__
    card = (r["bundle"] / "README.md").read_text()
    assert "torch.export.load" in card and "any batch size" in card and "Loading a `.pt2` file runs code" in card
