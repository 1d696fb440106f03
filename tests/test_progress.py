"""The CLI's progress display: training steps and benchmark rounds become bars with an ETA, log lines print above
them, and a finished step's bar goes away."""

import io
import logging

from rich.console import Console

from squeezeflow.flows.progress_bars import progress_bars
from squeezeflow.tasks.progress import advance, log, making_now


def test_steps_become_bars_with_an_eta_and_finished_ones_are_removed():
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    token = making_now.set("teacher>distill[L3]")
    try:
        with progress_bars(console) as progress:
            advance("a", f"training {making_now.get()}", 3, 10)
            advance("b", "benchmark", 1, 6)
            assert [(t.description, t.completed, t.total) for t in progress.tasks] == [
                ("training teacher>distill[L3]", 3, 10),
                ("benchmark", 1, 6),
            ]
            progress.refresh()
            assert "ETA" in screen.getvalue() and "3/10" in screen.getvalue()
            advance("a", "training teacher>distill[L3]", 10, 10)
            assert [t.description for t in progress.tasks] == ["benchmark"]
    finally:
        making_now.reset(token)
    assert log.level == logging.NOTSET and log.propagate and not log.handlers  # the logger is put back


def test_without_the_display_progress_records_are_not_even_made(caplog):
    with caplog.at_level(logging.INFO):
        advance("a", "training", 1, 2)
    assert not [r for r in caplog.records if r.name == "squeezeflow.progress"]
