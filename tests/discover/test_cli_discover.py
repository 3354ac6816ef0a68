"""`circuitlang discover` from the command line and `circuitlang.discover` from Python: the
circuit comes back as a program that `circuitlang check` re-measures."""
from __future__ import annotations

import json

import pytest

import circuitlang
from circuitlang.cli import main
from circuitlang.cli import discover as cli_discover


def test_the_command_line_names_the_solvers_choices():
    from circuitlang.discover import METHODS
    from circuitlang.discover.attribution import IG_VARIANTS
    from circuitlang.discover.problem import ABLATIONS

    assert set(cli_discover.IG_VARIANTS) == set(IG_VARIANTS)
    assert set(cli_discover.ABLATIONS) == set(ABLATIONS)
    assert set(METHODS) <= set(cli_discover.METHODS)


def test_discover_writes_a_program_that_check_re_measures(tmp_path, capsys):
    found = tmp_path / "found.circ"
    report = tmp_path / "found.json"
    code = main(["discover", "--task", "induction", "--model", "toy-induction", "--method", "eap-ig",
                 "--edges", "12", "-n", "16", "--task-param", "length=6", "-o", str(found),
                 "--json", str(report)])
    err = capsys.readouterr().err
    assert code == 0, err
    text = found.read_text()
    assert text.startswith("# Found by circuitlang")
    assert "ablation corrupt\n" in text and "samples 16\n" in text and "task induction length=6\n" in text
    data = json.loads(report.read_text())
    assert data["n_edges"] == len(data["edges"]) <= 12
    assert "CPR" in err and data["curve"]["cpr"] == pytest.approx(data["curve"]["cpr"])
    # the checker reads the program as the engine did: the same faithfulness, exactly
    checked = circuitlang.check(str(found), permutations=0, breakdown=False, max_examples=3)
    assert checked.recovered.value == pytest.approx(data["faithfulness"]["value"], abs=1e-4)
    assert checked.holds
    assert main(["check", str(found), "--permutations", "0", "--no-breakdown", "--max-examples", "3"]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--threshold", "-1"], "is negative"),
    (["--edges", "0"], "keeps no edge"),
    (["--target", "2"], "outside (0, 1.5]"),
    (["--positions", "EDN"], "defines no position 'EDN'"),
    (["--resume"], "--resume continues a run directory"),
    (["-n", "0"], "-n"),
    (["--steps", "0"], "--steps 0"),
])
def test_bad_requests_exit_2_with_a_clear_message(argv, message, capsys):
    code = main(["discover", "--task", "induction", "--model", "toy-induction", "--task-param", "length=6",
                 "-n", "8", "--no-curve", "--no-check"] + argv)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err


def test_too_many_edges_is_a_clear_error(capsys):
    code = main(["discover", "--task", "induction", "--model", "toy-induction", "--task-param", "length=6",
                 "-n", "8", "--no-curve", "--no-check", "--method", "eap", "--edges", "100000"])
    assert code == 2 and "candidate edges" in capsys.readouterr().err


def test_python_discover_returns_program_scores_curve_and_check():
    result = circuitlang.discover(model="toy-induction", task="induction", method="eap", edges=8, n=8,
                                  task_params={"length": 6})
    assert "->" in result.text and result.check is not None
    assert len(result.edges) <= 8
    by_edge = result.scores.by_edge()
    assert len(by_edge) == len(result.space) and result.curve.cpr > 0
    assert repr(result).startswith("DiscoveryResult(eap on toy-induction, induction, n=8: ")


def test_acdc_from_the_command_line_writes_a_program_that_check_re_measures(tmp_path, capsys):
    found = tmp_path / "acdc.circ"
    report = tmp_path / "acdc.json"
    code = main(["discover", "--task", "induction", "--model", "toy-induction", "--method", "acdc",
                 "--threshold", "0.02", "-n", "16", "--task-param", "length=6", "--no-curve",
                 "-o", str(found), "--json", str(report)])
    err = capsys.readouterr().err
    assert code == 0, err
    data = json.loads(report.read_text())
    assert 0 < data["n_edges"] < data["acdc"]["tried"] and data["acdc"]["kept"] == data["n_edges"]
    assert "acdc (tau=0.02" in found.read_text()
    checked = circuitlang.check(str(found), permutations=0, breakdown=False, max_examples=3)
    assert checked.recovered.value == pytest.approx(data["faithfulness"]["value"], abs=1e-4)


@pytest.mark.parametrize("argv, message", [
    ([], "ACDC needs a threshold"),
    (["--edges", "5"], "by its threshold alone"),
])
def test_acdc_needs_its_threshold_and_nothing_else(argv, message, capsys):
    code = main(["discover", "--task", "induction", "--model", "toy-induction", "--task-param", "length=6",
                 "-n", "8", "--no-curve", "--no-check", "--method", "acdc"] + argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_python_resume_without_a_run_directory_is_refused_like_the_command_line(monkeypatch):
    """`resume=True` without `out=` would start a fresh run: refused, as `--resume` without
    `--out` is, before any model loads."""
    import circuitlang.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(circuitlang.DiscoveryError) as info:
        circuitlang.discover(model="toy-induction", task="induction", method="eap", edges=4, n=4,
                             resume=True)
    assert info.value.diagnostics[0].code == "discover.resume"
    assert "out=" in info.value.hint


def test_a_resume_with_other_task_parameters_or_batch_size_is_refused(tmp_path, capsys):
    """run.json records the task's parameters and the batch size: a resumed run that would
    reuse scores computed on other prompts is the mismatch error, naming what differs."""
    run = tmp_path / "run"
    base = ["discover", "--task", "induction", "--model", "toy-induction", "--method", "eap", "--edges", "4",
            "-n", "4", "--no-curve", "--no-check", "--out", str(run)]
    assert main(base + ["--task-param", "length=6"]) == 0
    spec = json.loads((run / "run.json").read_text())
    assert spec["task_params"] == {"length": 6} and spec["batch_size"] == 32
    capsys.readouterr()
    assert main(base + ["--task-param", "length=8", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "holds a different run (it differs in task_params)" in err
    assert main(base + ["--task-param", "length=6", "--batch-size", "8", "--resume"]) == 2
    assert "differs in batch_size" in capsys.readouterr().err
    assert main(base + ["--task-param", "length=6", "--resume"]) == 0  # the same run resumes
