import json
import os
import subprocess
import sys

from typer.testing import CliRunner

from dd2cli import __version__, plugins
from dd2cli.cli import app

runner = CliRunner()


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output


def test_teachers_lists_fake_plugin_and_weights(tmp_path):
    from test_plugins import FakeA  # noqa: F401  (fake plugin defined there)

    from dd2cli import hookimpl
    from dd2cli.teachers import Family, Variant, WeightFile

    class WithWeights:
        @hookimpl
        def dd2_register_teachers(self, register):
            register(Family(name="w", description="", variants=(
                Variant(name="w-1", description="needs a file", loader=lambda v, w, d: None,
                        weights=(WeightFile("net", "net.pth", "the network"),)),)))

    plugins.register_plugin(WithWeights(), name="with-weights")
    res = runner.invoke(app, ["teachers", "--json", "--weights-dir", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    (row,) = data["teachers"]
    assert row["variant"] == "w-1" and row["ready"] is False
    assert row["weights"][0]["expected"] == str(tmp_path / "net.pth")
    (tmp_path / "net.pth").write_bytes(b"x")
    data = json.loads(runner.invoke(app, ["teachers", "--json", "--weights-dir", str(tmp_path)]).output)
    assert data["teachers"][0]["ready"] is True
    res = runner.invoke(app, ["teachers"])
    assert "w-1" in res.output


def test_plugins_json(synthetic_plugin):
    res = runner.invoke(app, ["plugins", "--json"])
    assert res.exit_code == 0
    assert json.loads(res.output) == [{"name": "synthetic", "hooks": ["dd2_register_teachers"],
                                      "version": None, "distribution": None}]


def test_real_cli_entry_point_lists_first_party_teachers():
    env = {k: v for k, v in os.environ.items() if k != "DD2_LOAD_PLUGINS"}
    proc = subprocess.run([sys.executable, "-m", "dd2cli", "plugins", "--json"], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    names = {p["name"] for p in json.loads(proc.stdout)}
    assert {"var", "llamagen"} <= names


def test_broken_plugin_is_one_sentence_and_nonzero_exit():
    from test_plugins import FakeA, FakeB

    plugins.register_plugin(FakeA(), name="fake-a")
    plugins.register_plugin(FakeB(), name="fake-b")
    res = runner.invoke(app, ["teachers"])
    assert res.exit_code == 2
    assert "Error:" in res.output and "fake-a" in res.output and "Traceback" not in res.output


def test_unknown_teacher_name_is_one_sentence(synthetic_plugin):
    res = runner.invoke(app, ["teachers", "vaar"])
    assert res.exit_code == 2
    assert "No teacher 'vaar'. Installed: synthetic-corr, synthetic-scales." in res.output
    res = runner.invoke(app, ["teachers", "synthetic-corr", "--json"])
    assert res.exit_code == 0 and [r["variant"] for r in json.loads(res.output)["teachers"]] == ["synthetic-corr"]


def test_inspect_good_corrupted_and_pickled_files(tmp_path):
    import pickle

    import torch
    from test_files import Evil

    from dd2cli.files import save_safetensors

    good = tmp_path / "g.safetensors"
    save_safetensors(good, {"w": torch.ones(2, 3)})
    res = runner.invoke(app, ["inspect", str(good), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["numel"] == 6
    bad = tmp_path / "b.safetensors"
    bad.write_bytes(good.read_bytes()[:-5])
    res = runner.invoke(app, ["inspect", str(bad)])
    assert res.exit_code == 2 and "truncated or corrupted" in res.output
    evil = tmp_path / "e.pth"
    with open(evil, "wb") as fh:
        pickle.dump({"w": Evil()}, fh)
    res = runner.invoke(app, ["inspect", str(evil)])
    assert res.exit_code == 2 and "not a plain-weights checkpoint" in res.output


def test_sample_and_eval_take_a_thread_count_and_refuse_a_negative_one():
    from cli_output import plain

    from dd2cli.cli import app as cli_app

    runner = CliRunner()
    for args in (["sample", "--threads", "-2", "-n", "1"], ["eval", "fid", "--threads", "-2"],
                 ["eval", "speed", "--threads", "-2"]):  # (-1 is "one per idle core", the default)
        res = runner.invoke(cli_app, args)
        assert res.exit_code == 2, (args, res.output)
        assert "--threads must be -1 (one per idle core), 0 (torch's default) or a count" in plain(res.output)
    for args in (["sample", "--help"], ["eval", "fid", "--help"], ["eval", "speed", "--help"]):
        assert "--threads" in runner.invoke(cli_app, args).output
