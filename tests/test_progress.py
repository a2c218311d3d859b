"""The progress display of the command line where stderr is not a terminal: plain lines, not a live bar."""

import io

from rich.console import Console

from dd2cli.cli_common import RichProgress


def _console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=80), buffer


def test_training_progress_prints_a_line_every_tenth_with_losses_and_eta():
    console, buffer = _console()
    p = RichProgress(console=console)
    p.start("stage 2 (CSD)", 100, 40, unit="it")  # a resumed stage: 40 steps already done
    for step in range(41, 101):
        p.update(step, {"loss_csd": 0.5, "it_s": 3.0})
    p.stop()
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "stage 2 (CSD): 40/100"
    assert [line.split()[3] for line in lines[1:]] == [f"{k}0/100" for k in range(5, 11)]  # 50/100 ... 100/100
    assert all("csd 0.5" in line and "it/s" in line and "ETA" in line for line in lines[1:])
    assert "\x1b" not in buffer.getvalue()  # no control codes in a log file


def test_image_progress_counts_advances_and_a_quiet_minute_still_prints(monkeypatch):
    console, buffer = _console()
    p = RichProgress(console=console)
    p.start("one-step samples", 1000)
    for _ in range(3):
        p.advance(10)  # 30 of 1000: under a tenth, so nothing yet
    assert buffer.getvalue().splitlines() == ["one-step samples: 0/1000"]
    monkeypatch.setattr(RichProgress, "LINE_EVERY_S", 0.0)  # as if a minute had passed
    p.advance(10)
    assert buffer.getvalue().splitlines()[-1].startswith("one-step samples: 40/1000  ")
    assert "images/s" in buffer.getvalue().splitlines()[-1]


def test_a_terminal_gets_the_live_bar_and_no_plain_lines():
    buffer = io.StringIO()
    p = RichProgress(console=Console(file=buffer, force_terminal=True, width=80))
    p.start("stage 1 (GTS)", 10, unit="it")
    for step in range(1, 11):
        p.update(step, {"loss_gts": 1.0, "it_s": 2.0})
    p.stop()
    assert "stage 1 (GTS): " not in buffer.getvalue()
