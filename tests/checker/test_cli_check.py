"""`circuitlang check` end to end on the embedded toy models, from the command line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from circuitlang.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_readme_quickstart_checks_the_toy_induction_circuit(tmp_path, capsys):
    out = tmp_path / "result.json"
    code = main(["check", str(ROOT / "examples" / "induction" / "induction.circ"), "-n", "64", "--permutations", "0",
                 "--max-examples", "5", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    data = json.loads(out.read_text())
    assert data["model"] == "toy-induction" and data["task"] == "induction"
    assert data["recovered"] >= 0.8 and data["ci"]["low"] <= data["recovered"] <= data["ci"]["high"]
    assert all(e["holds"] for e in data["expectations"])
    assert data["experiments"][0]["grid"] == [2, 4]
    assert "recovered" in text and "patch head * at END" in text
    # a patching experiment says what the corruption changes (a path it keeps reads 0.000)
    assert "patching experiments use the task's corruption: the same first copy" in text


def test_a_failing_expectation_exits_1_with_a_counterexample(tmp_path, capsys):
    circ = tmp_path / "wrong.circ"
    circ.write_text(
        "model toy-ioi\ntask ioi\n"
        "head 0.2 at END depends on S\n"  # a head that is not a name mover, on the wrong feature
        "expect recovered >= 0.9\n"
        "expect each logit_diff > 0\n"
    )
    code = main(["check", str(circ), "-n", "24", "--permutations", "0", "--max-examples", "6"])
    text = capsys.readouterr().out
    assert code == 1
    assert "FAIL expect recovered >= 0.9" in text
    assert "smallest counterexamples" in text and "tokens:" in text


def test_check_runs_as_a_console_command(tmp_path):
    circ = tmp_path / "ok.circ"
    circ.write_text((ROOT / "stdlib" / "toy_ioi.circ").read_text())
    done = subprocess.run(
        [sys.executable, "-m", "circuitlang", "check", str(circ), "-n", "16", "--permutations", "0",
         "--max-examples", "3", "--no-breakdown"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every expectation holds" in done.stdout


def test_graph_command_writes_each_format(tmp_path, capsys):
    for suffix in ("dot", "json", "svg"):
        out = tmp_path / f"g.{suffix}"
        assert main(["graph", str(ROOT / "stdlib" / "toy_ioi.circ"), "-o", str(out)]) == 0
        assert out.stat().st_size > 100
    assert json.loads((tmp_path / "g.json").read_text())["nodes"][0]["role"] == "root"
    assert main(["graph", str(ROOT / "stdlib" / "toy_ioi.circ"), "-o", str(tmp_path / "g.png")]) == 2
    assert "name the output .dot, .json or .svg" in capsys.readouterr().err


def test_edges_into_an_mlp_are_scrubbed(capsys):
    """Edges may end at an MLP: its input is rebuilt like a head's q/k/v."""
    import circuitlang

    text = "model toy-ioi\ntask ioi\n0.0 -> mlp 1 at END\nmlp 1 -> logits at END\n"
    with_edge = circuitlang.check(text, n=16, permutations=0, breakdown=False)
    without = circuitlang.check("model toy-ioi\ntask ioi\nmlp 1 -> logits at END\n", n=16,
                                permutations=0, breakdown=False)
    assert with_edge.scrubbed.value != without.scrubbed.value
    assert with_edge.random.value == without.random.value


def test_an_indented_string_from_python_reads_as_the_same_program():
    """DSL embedded in Python is an indented triple-quoted string; its common indentation
    is dropped (a verb body keeps its own), so it resolves as the flush-left text does."""
    from circuitlang.checker import load_hypothesis

    flush = "model toy-ioi\ntask ioi\nheads 1.0, 1.1 moves name from IO to END\nexpect recovered >= 0.5\n"
    indented = "\n".join("        " + line for line in flush.splitlines()) + "\n    "
    assert load_hypothesis(indented)[0] == load_hypothesis(flush)[0]
