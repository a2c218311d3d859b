"""Sampling options: `--precision` (bf16 refused off CUDA) and `--compile`, and the
benchmarks' token-only timing path."""

import pytest
import torch
from typer.testing import CliRunner

from dd2cli.cli import app
from dd2cli.engine.runtime import check_precision, maybe_compile
from dd2cli.errors import DD2Error

runner = CliRunner()


def test_bf16_is_refused_on_cpu_with_one_sentence():
    check_precision("fp32", "cpu")
    check_precision("bf16", "cuda")  # only a check of the name: no GPU needed
    with pytest.raises(DD2Error, match=r"--precision bf16 needs a CUDA device .* drop --precision bf16"):
        check_precision("bf16", "cpu")
    with pytest.raises(DD2Error, match="not one of fp32, bf16"):
        check_precision("fp16", "cuda")


@pytest.mark.parametrize("command", [["eval", "speed"], ["sample", "-n", "2"]])
def test_cli_refuses_bf16_on_cpu_before_loading_anything(synthetic_plugin, tmp_path, command):
    res = runner.invoke(app, [*command, "--teacher", "synthetic-corr", "--device", "cpu", "--precision", "bf16",
                              *(["--out", str(tmp_path / "s")] if command[0] == "sample" else [])])
    assert res.exit_code != 0
    assert "needs a CUDA device" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "s").exists()


def test_compile_applies_to_a_generator_only(synthetic_plugin, tmp_path):
    res = runner.invoke(app, ["sample", "--teacher", "synthetic-corr", "-n", "2", "--device", "cpu", "--compile",
                              "--out", str(tmp_path / "s")])
    assert res.exit_code != 0 and "--compile applies to a distilled generator" in res.output


def test_time_sampling_without_decode_times_tokens(synthetic_teacher):
    from dd2cli.engine.speed import time_sampling, untrained_generator

    decoded = []
    synthetic_teacher.decode = lambda x: decoded.append(x) or x  # noqa: E731 - a spy
    gen = untrained_generator(synthetic_teacher)
    rows = time_sampling(synthetic_teacher, gen, "cpu", [2], warmup=0, repeats=1, decode=False)
    assert [r.mode for r in rows] == ["teacher (3 steps)", "dd2 1 step"] and not decoded
    time_sampling(synthetic_teacher, gen, "cpu", [2], warmup=0, repeats=1)
    assert decoded


@pytest.mark.slow
def test_compiled_generator_matches_eager_or_fails_clearly(synthetic_teacher):
    """torch.compile on CPU needs a working C++ toolchain: either the compiled generator gives the
    eager output, or the first call raises one DD2Error naming --compile."""
    from dd2cli.engine.speed import untrained_generator

    gen = untrained_generator(synthetic_teacher)
    spec = synthetic_teacher.spec
    eps = torch.randn(2, spec.num_tokens, spec.latent_dim, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        eager = gen(eps, labels)
        compiled = maybe_compile(gen, True)
        try:
            out = compiled(eps, labels)
        except DD2Error as exc:
            assert "--compile failed" in str(exc) and "drop --compile" in str(exc)
            return
        assert torch.allclose(out, eager, atol=1e-5)
        assert torch.allclose(compiled(eps, labels), eager, atol=1e-5)  # the second call skips the check
