"""Progress bars on a terminal, silence everywhere else (circuitlang/progress.py)."""
from __future__ import annotations

import io
import logging
import subprocess
import sys
import warnings
from pathlib import Path

from circuitlang.cli import main
from circuitlang.progress import Progress, quiet_loading

ROOT = Path(__file__).resolve().parents[1]
TOY_IOI = ROOT / "stdlib" / "toy_ioi.circ"


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal, so tqdm draws on it."""

    def isatty(self) -> bool:
        return True


def test_a_bar_draws_with_an_eta_on_a_terminal():
    tty = FakeTerminal()
    with Progress(10, "checking", stream=tty, min_interval=0) as bar:
        for i in range(4):
            bar.step("claims")
    text = tty.getvalue()
    assert bar.enabled and bar.done == 4
    assert "checking" in text and "4/10" in text and "claims" in text
    assert "<" in text  # tqdm's [elapsed<remaining] is the ETA


def test_a_bar_is_silent_when_piped_or_disabled():
    piped = io.StringIO()
    bar = Progress(5, "checking", stream=piped)
    bar.set(3, "random circuits")
    bar.close()
    assert not bar.enabled and bar.done == 3 and piped.getvalue() == ""
    tty = FakeTerminal()
    quiet = Progress(5, "checking", enabled=False, stream=tty)
    quiet.set(5)
    quiet.close()
    assert tty.getvalue() == ""


def test_quiet_loading_restores_what_it_silenced():
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    before = (hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled(), hf_logging.get_verbosity(),
              logging.getLogger("huggingface_hub").level)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_loading():
            assert not hf_logging.is_progress_bar_enabled()
            assert hf_logging.get_verbosity() == hf_logging.ERROR
            warnings.warn("third-party chatter")
        warnings.warn("ours, after the load")
    assert [str(w.message) for w in seen] == ["ours, after the load"]
    after = (hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled(), hf_logging.get_verbosity(),
             logging.getLogger("huggingface_hub").level)
    assert after == before


def test_a_piped_check_writes_nothing_to_stderr(tmp_path):
    """No bar, no "Loading weights", no third-party warnings: stderr stays empty."""
    done = subprocess.run(
        [sys.executable, "-m", "circuitlang", "check", str(TOY_IOI), "-n", "8", "--permutations", "0",
         "--no-breakdown", "--max-examples", "2"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every expectation holds" in done.stdout
    assert done.stderr == ""


def test_a_check_on_a_terminal_shows_the_bar_and_quiet_hides_it(tmp_path, monkeypatch, capsys):
    program = tmp_path / "sweep.circ"
    program.write_text("model toy-ioi\ntask ioi\nhead 1.1 at END depends on IO\nhead 1.2 at END depends on IO\n"
                       "patch head * at END\nexpect recovered >= 0.1\n")
    args = ["check", str(program), "-n", "8", "--permutations", "3", "--max-examples", "2"]
    monkeypatch.setattr("circuitlang.progress.MIN_INTERVAL", 0)  # draw every step, however fast
    tty = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main(args) == 0
    drawn = tty.getvalue()
    assert "patching" in drawn and "(site, prompt) rows" in drawn  # the sweep
    assert "checking" in drawn and "random circuits" in drawn and "it/s" in drawn  # claims, permutations
    assert "Loading weights" not in drawn

    tty = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", tty)
    assert main(args + ["--quiet"]) == 0
    assert tty.getvalue() == ""
    assert "every expectation holds" in capsys.readouterr().out
