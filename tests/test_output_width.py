"""What the commands print fits an 80-column terminal or log (numbers never wrap)."""

import io
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console

from dd2cli import cli_eval


def test_the_eval_table_fits_80_columns_with_every_metric(monkeypatch):
    buffer, lines = io.StringIO(), []
    monkeypatch.setattr(cli_eval, "console", Console(file=buffer, width=80))
    monkeypatch.setattr(cli_eval, "say", lines.append)
    metrics = {"fid": 120.7, "sfid": 12.3, "kid": -0.0004561, "is": 9.87, "precision": 0.939, "recall": 0.339,
               "class_consistency": 0.998}
    results = [SimpleNamespace(samples=Path("runs/var-digits-20261201-164000/samples") / name, source=source,
                               count=5000, features="digits", reference="digits train split (16 px)",
                               metrics=metrics, json_path=Path("eval.json"))
               for name, source in (("1step-20261201-170000", "var-digits one-step"),
                                    ("teacher-20261201-171000", "var-digits teacher"))]
    cli_eval._print_results(results, as_json=False)
    table = buffer.getvalue().splitlines()
    assert max(len(line) for line in table) <= 80
    for value in ("120.700", "12.300", "-4.56e-04", "9.87", "0.939", "0.339", "0.998"):
        assert sum(value in line for line in table) == 2  # each on one line, in both rows
    # the source moved under the table with the full path of each set
    assert any(line.startswith("1step-20261201-170000: var-digits one-step, ") for line in lines)
    assert "Written: eval.json" in lines


def test_help_lists_the_choices_and_flags_show_no_value_type():
    from typer.testing import CliRunner

    from dd2cli.cli import app

    runner = CliRunner()
    sample = runner.invoke(app, ["sample", "--help"], env={"COLUMNS": "120"}).output
    assert "<ema|raw>" in sample and "<fp32|bf16>" in sample and "<set-prediction>" in sample
    export = runner.invoke(app, ["export", "--help"], env={"COLUMNS": "120"}).output
    assert "<fp32|bf16|fp16>" in export and "<safetensors|pt2>" in export
    for args in (["--help"], ["teachers", "--help"], ["sample", "--help"], ["eval", "fid", "--help"],
                 ["distill", "--help"]):
        text = runner.invoke(app, args, env={"COLUMNS": "120"}).output
        flags = [line for line in text.splitlines() if "<bool>" in line and "--help" not in line]
        assert not flags, flags  # a flag takes no value: no type label
