"""Run directories (circuitlang/runs.py): `check --out`, `show`, `diff`, discovery runs."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import circuitlang
from circuitlang import runs
from circuitlang.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOY_IOI = ROOT / "stdlib" / "toy_ioi.circ"

# Two claims (so each has a cost), a sweep (a figure and per-site values) and expectations.
PROGRAM = """model toy-ioi
task ioi
head 1.1 at END depends on IO
head 1.2 at END depends on IO
patch head 1.* at END
expect recovered >= 0.2
expect each logit_diff > -100
"""


@pytest.fixture(scope="module")
def check_run(tmp_path_factory):
    """One `circuitlang check --out` run: (its folder, what it printed)."""
    folder = tmp_path_factory.mktemp("runs") / "a"
    program = folder.parent / "two.circ"
    program.write_text(PROGRAM)
    capture = []
    old = sys.stdout
    try:
        import io

        sys.stdout = buffer = io.StringIO()
        code = main(["check", str(program), "-n", "12", "--permutations", "4", "--max-examples", "2",
                     "--out", str(folder)])
    finally:
        sys.stdout = old
    capture.append(buffer.getvalue())
    assert code == 0, capture[0]
    return folder, capture[0]


def test_check_out_writes_every_part_of_the_run(check_run):
    folder, printed = check_run
    meta = json.loads((folder / "run.json").read_text())
    assert meta["kind"] == "check" and meta["format"] == runs.FORMAT
    for name in ("program.circ", "ir.json", "result.json", "per_prompt.npz", "environment.json", "report.txt"):
        assert name in meta["files"] and (folder / name).is_file(), name
    assert (folder / "program.circ").read_text() == PROGRAM
    ir = json.loads((folder / "ir.json").read_text())
    assert ir["model"] == "toy-ioi" and len(ir["claims"]) == 2
    result = json.loads((folder / "result.json").read_text())
    assert result["n"] == 12 and len(result["claims"]) == 2 and len(result["null_scores"]) == 4
    arrays = np.load(folder / "per_prompt.npz")
    assert arrays["clean"].shape == (12,) and arrays["scrubbed"].shape == (12,) and len(arrays["texts"]) == 12
    assert arrays["experiment_0"].shape == (4, 12)  # four heads of layer 1, per prompt
    np.testing.assert_allclose(arrays["clean"].mean(), result["clean"], rtol=1e-9)
    assert (folder / "report.txt").read_text() == printed
    # nothing half-written beside it
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []


def test_the_environment_record_names_versions_weights_seed_and_command(check_run):
    folder, _ = check_run
    env = json.loads((folder / "environment.json").read_text())
    model = circuitlang.load_model("toy-ioi")
    assert env["model"]["name"] == "toy-ioi"
    assert env["model"]["weights_sha256"] == runs.weights_hash(model)
    assert env["seed"] == 0 and env["device"] == "cpu"
    assert {"python", "circuitlang", "torch", "transformers"} <= set(env["versions"])
    assert "--out" in env["invocation"]["call"] or "check" in env["invocation"]["call"]
    assert env["invocation"]["call"].startswith("circuitlang.check(") and "n=12" in env["invocation"]["call"]
    assert env["time"].endswith("+00:00")


def test_figures_are_written_or_skipped_with_the_reason(check_run):
    folder, _ = check_run
    meta = json.loads((folder / "run.json").read_text())
    if meta["figures"]:
        for name in meta["figures"]:
            assert (folder / name).read_text().lstrip().startswith(("<?xml", "<svg"))
        assert "figures/circuit.svg" in meta["figures"] and meta["figures_skipped"] is None
    else:
        assert meta["figures_skipped"] and not (folder / "figures").exists()


def test_show_prints_the_report_identically_and_loads_no_model(check_run):
    folder, printed = check_run
    # no transformers (so no Hugging Face model can load), and circuitlang's loader never called
    probe = ("import sys\nimport circuitlang.models, circuitlang.models.load\n"
             "def boom(*a, **k):\n    raise SystemExit('a model was loaded')\n"
             "circuitlang.models.load_model = circuitlang.models.load.load_model = boom\n"
             "from circuitlang.cli import main\ncode = main(['show', sys.argv[1]])\n"
             "print('TRANSFORMERS', 'transformers' in sys.modules, code, file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", probe, str(folder)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.stdout == printed
    assert "TRANSFORMERS False 0" in done.stderr, done.stderr


def test_python_check_with_out_records_the_call(tmp_path):
    model = circuitlang.load_model("toy-ioi")
    folder = tmp_path / "runs" / "seed0" / "py"  # the folders above are made
    result = circuitlang.check("head 1.1 at END depends on IO", model=model, task="ioi", n=8, permutations=0,
                               breakdown=False, max_examples=2, out=folder)
    run = runs.load_run(folder)
    assert run.render() == result.render()
    assert run.environment["invocation"]["call"].startswith(
        "circuitlang.check(program='head 1.1 at END depends on IO', model='toy-ioi', task='ioi', n=8")
    assert (folder / "program.circ").read_text() == "head 1.1 at END depends on IO"


def test_a_crash_while_writing_leaves_no_run(tmp_path, monkeypatch):
    model = circuitlang.load_model("toy-ioi")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "_write_per_prompt", crash)
    with pytest.raises(KeyboardInterrupt):
        circuitlang.check("head 1.1 at END depends on IO", model=model, task="ioi", n=8, permutations=0,
                          breakdown=False, max_examples=2, out=tmp_path / "crashed")
    assert list(tmp_path.iterdir()) == []  # neither the run nor its temporary folder
    half = tmp_path / "half"
    half.mkdir()
    (half / "run.json").write_text(json.dumps({"method": "eap"}))
    assert main(["show", str(half)]) == 2  # a discovery with checkpoints only is not a run yet


def test_out_into_a_folder_that_holds_files_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("circuitlang.models.load_model", no_load)
    assert main(["check", str(TOY_IOI), "--out", str(taken)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "nowhere")]) == 2


def _planted(folder: Path, into: Path) -> Path:
    """A copy of a run with its numbers changed by hand: % recovered far below its
    interval, the first claim's cost doubled, the first expectation flipped."""
    shutil.copytree(folder, into)
    data = json.loads((into / "result.json").read_text())
    data["recovered"], data["ci"]["low"], data["ci"]["high"] = 0.05, 0.01, 0.09
    data["claims"][0]["cost"] = data["claims"][0]["cost"] * 2 + 1.0
    data["expectations"][0]["holds"] = not data["expectations"][0]["holds"]
    data["holds"] = False
    (into / "result.json").write_text(json.dumps(data))
    return into


def test_diff_of_a_run_with_itself_moves_nothing(check_run, capsys):
    folder, _ = check_run
    assert main(["diff", str(folder), str(folder)]) == 0
    assert "nothing moved beyond its interval" in capsys.readouterr().out


def test_diff_flags_a_planted_change_and_exits_1(check_run, tmp_path, capsys):
    folder, _ = check_run
    planted = _planted(folder, tmp_path / "b")
    assert main(["diff", str(folder), str(planted)]) == 1
    out = capsys.readouterr().out
    moved = [line for line in out.splitlines() if "MOVED" in line]
    assert any(line.lstrip().startswith("recovered") and "below" in line for line in moved)
    assert any("cost: head 1.1 at END depends on IO" in line for line in moved)
    assert any("expect: recovered >= 0.2" in line for line in moved)
    assert not any(line.lstrip().startswith(("clean", "scrubbed", "random")) for line in moved)
    assert main(["diff", str(folder), str(planted), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert {d["what"] for d in data["numbers"] if d["moved"]} == {
        "recovered", "cost: head 1.1 at END depends on IO", "expect: recovered >= 0.2"}


def test_diff_rules_on_intervals():
    overlap = runs._interval_diff("x", (1.0, 0.5, 1.5), (1.6, 1.2, 2.0))  # B's value outside A's interval
    assert not overlap.moved
    apart = runs._interval_diff("x", (1.0, 0.5, 1.5), (2.0, 1.6, 2.4))
    assert apart.moved and "above" in apart.why
    assert runs._interval_diff("x", (0.2, None, None), (0.3, None, None)).moved
    assert not runs._interval_diff("x", (0.2, None, None), (0.2, None, None)).moved
    assert runs._interval_diff("x", (None, None, None), (0.2, 0.1, 0.3)).moved
    _, low, high = runs._p_interval({"p_value": 0.2, "null_scores": [0.0] * 50, "null_exact": False})
    assert low < 0.2 < high and high - low < 0.3


def test_a_discovery_run_shows_and_diffs(check_run, tmp_path, capsys):
    model = circuitlang.load_model("toy-ioi")
    first, second = tmp_path / "d1", tmp_path / "d2"
    found = circuitlang.discover(model=model, task="ioi", method="eap", edges=8, n=8, with_curve=False,
                                 check=False, out=first)
    more = circuitlang.discover(model=model, task="ioi", method="eap", edges=16, n=8, with_curve=False,
                                check=False, out=second)
    extra = len(set(more.edges) - set(found.edges))
    assert extra > 0
    env = json.loads((first / "environment.json").read_text())
    assert env["model"]["weights_sha256"] == runs.weights_hash(model)
    if importlib.util.find_spec("matplotlib") is not None:
        assert "<svg" in (first / "figures" / "circuit.svg").read_text()
        assert not (first / "figures" / "curve.svg").exists()  # with_curve=False: no curve to draw
    assert env["invocation"]["call"].startswith("circuitlang.discover(method='eap'")
    assert main(["show", str(first)]) == 0
    assert capsys.readouterr().out == found.render() + "\n"
    assert main(["diff", str(first), str(second)]) == 1  # more edges: another circuit
    out = capsys.readouterr().out
    assert "edges" in out and f"{extra} in B only" in out
    assert main(["diff", str(first), str(first)]) == 0
    capsys.readouterr()
    assert main(["diff", str(first), str(check_run[0])]) == 2
    assert "cannot diff a discover run with a check run" in capsys.readouterr().err
    (first / "result.json").unlink()
    assert main(["show", str(first)]) == 2
    assert "has not finished" in capsys.readouterr().err


def test_without_matplotlib_figures_are_skipped_with_the_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails

    def draw(figures):
        raise AssertionError("no figure should be attempted")
        yield  # pragma: no cover

    drawn, why = runs.draw_figures(tmp_path / "figures", draw)
    assert drawn == [] and "pip install 'circuitlang[figures]'" in why
    assert not (tmp_path / "figures").exists()
