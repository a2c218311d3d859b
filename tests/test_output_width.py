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
    metrics = {"fid": 120.7, "sfid": 12.3, "is": 9.87, "precision": 0.939, "recall": 0.339,
               "class_consistency": 0.998}
    results = [SimpleNamespace(samples=Path("runs/var-digits-20261201-164000/samples") / name, source=source,
                               count=5000, features="digits", reference="digits train split (16 px)",
                               metrics=metrics, json_path=Path("eval.json"))
               for name, source in (("1step-20261201-170000", "var-digits one-step"),
                                    ("teacher-20261201-171000", "var-digits teacher"))]
    cli_eval._print_results(results, as_json=False)
    table = buffer.getvalue().splitlines()
    assert max(len(line) for line in table) <= 80
    for value in ("120.700", "12.300", "9.87", "0.939", "0.339", "0.998"):
        assert sum(value in line for line in table) == 2  # each on one line, in both rows
    # the source moved under the table with the full path of each set
    assert any(line.startswith("1step-20261201-170000: var-digits one-step, ") for line in lines)
    assert "Written: eval.json" in lines
