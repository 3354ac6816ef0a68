"""The language commands: `circuitlang fmt`, `parse`, `check` (front half)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from circuitlang.cli import main

IOI_FILE = """\
model gpt2
task ioi
group name_movers = heads 9.9, 9.6, 10.0
head 9.6 moves name to END
name_movers moves IO to END
patch head * at END
expect recovered >= 0.85
"""


@pytest.fixture()
def ioi_file(tmp_path: Path) -> Path:
    path = tmp_path / "ioi.circ"
    path.write_text(IOI_FILE)
    return path



def test_check_resolves_and_summarises(ioi_file: Path, capsys):
    assert main(["check", str(ioi_file), "--resolve-only"]) == 0
    out = capsys.readouterr().out
    assert f"{ioi_file}: model gpt2, task ioi, metric logit_diff" in out
    assert "head 9.6 moves name to END" in out
    assert "head 9.6 at END depends on IO" in out
    assert "(sweep: 12 x 12 grid over layer x head)" in out
    assert "expect recovered >= 0.85" in out


def test_check_reports_every_problem_and_exits_2(tmp_path: Path, capsys):
    bad = tmp_path / "bad.circ"
    bad.write_text("model gpt2\ntask ioi\nhead 12.1 moves name to END\n"
                   "head 9.6 moves name to EDN\n")
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3:6: error: head 12.1 out of range (model has layers 0-11)\n" \
           "  head 12.1 moves name to END\n       ^^^^\nhint: did you mean 11.1?" in err
    assert f"{bad}:4:24: error: unknown position 'EDN'" in err
    assert "hint: task ioi defines positions IO, S1, S1+1, S2, END" in err


def test_check_overrides_model_and_task(ioi_file: Path, capsys):
    assert main(["check", str(ioi_file), "--model", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert main(["check", str(ioi_file), "--task", "induction"]) == 2
    assert "unknown position 'END'" not in capsys.readouterr().err  # induction has END
    assert main(["check", str(ioi_file), "--task", "no_such_task"]) == 2
    assert "unknown task 'no_such_task'" in capsys.readouterr().err


def test_check_syntax_error_exits_2(tmp_path: Path, capsys):
    bad = tmp_path / "syntax.circ"
    bad.write_text("task ioi\nhead 9.6 at\n")
    assert main(["check", str(bad)]) == 2
    assert "hint: expected a position such as END" in capsys.readouterr().err


def test_missing_file_exits_2(tmp_path: Path, capsys):
    assert main(["check", str(tmp_path / "nope.circ")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_parse_json_prints_the_ir(ioi_file: Path, capsys):
    assert main(["parse", str(ioi_file), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "gpt2" and data["task"] == "ioi"
    assert data["groups"]["name_movers"][1]["text"] == "head 9.6"
    assert len(data["claims"]) == 4
    assert data["experiments"][0]["grid"] == [12, 12]
    assert data["expectations"][0]["rhs"] == "17/20"


def test_parse_without_json_prints_canonical_text(tmp_path: Path, capsys):
    path = tmp_path / "messy.circ"
    path.write_text("head   9.6 moves name to END   # hi\n")
    assert main(["parse", str(path)]) == 0
    assert capsys.readouterr().out == "head 9.6 moves name to END  # hi\n"


def test_fmt_rewrites_and_check_reports(tmp_path: Path, capsys):
    messy = tmp_path / "messy.circ"
    messy.write_text("group g = heads 9.9,9.6\ng moves IO to END\n")
    tidy = tmp_path / "tidy.circ"
    tidy.write_text("head 9.6 moves name to END\n")
    assert main(["fmt", "--check", str(messy), str(tidy)]) == 1
    assert capsys.readouterr().out == f"would reformat {messy}\n"
    assert messy.read_text() == "group g = heads 9.9,9.6\ng moves IO to END\n"
    assert main(["fmt", str(messy), str(tidy)]) == 0
    assert messy.read_text() == "group g = heads 9.9, 9.6\ng moves IO to END\n"
    assert main(["fmt", "--check", str(messy), str(tidy)]) == 0


def test_fmt_stops_on_syntax_errors_but_tries_every_file(tmp_path: Path, capsys):
    bad = tmp_path / "bad.circ"
    bad.write_text("head 9.6 at\n")
    ok = tmp_path / "ok.circ"
    ok.write_text("head  9.6 moves name to END\n")
    assert main(["fmt", str(bad), str(ok)]) == 2
    assert ok.read_text() == "head 9.6 moves name to END\n"
    assert "bad.circ:1:12: error" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["fmt", "parse", "check"])
def test_help_is_useful(command: str, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: circuitlang {command}" in out
    assert "FILE" in out


def test_the_console_entry_point_runs(ioi_file: Path):
    done = subprocess.run([sys.executable, "-m", "circuitlang", "check", str(ioi_file), "--resolve-only"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "task ioi" in done.stdout
