"""Sweeps (circuitlang/sweeps/): the spec and its errors, a local sweep's directory and
summary, --resume after a kill -9, and the Ray backend (numbers identical to local,
a worker killed mid-sweep)."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import circuitlang
from circuitlang.cli import main
from circuitlang.sweeps import SweepError, load_spec, parse_spec, summary, sweep
from circuitlang.sweeps.worker import with_ablation

ROOT = Path(__file__).resolve().parents[1]

# 2 files (on their own models) x 2 seeds x 2 ablations, and 2 discoveries: 10 items
SPEC = """
name = "toys"
seeds = [0, 1]
n = 8

[check]
files = ["stdlib/toy_ioi.circ", "stdlib/toy_induction.circ"]
permutations = 0
breakdown = false
ablation = ["resample", "mean"]

[discover]
models = ["toy-ioi"]
tasks = ["ioi"]
method = "eap"
edges = 6
curve = false
check = false
"""


def _spec_file(folder: Path, text: str = SPEC) -> Path:
    """The spec beside the repository's files (its paths are relative to ROOT)."""
    path = folder / "toys.toml"
    path.write_text(text.replace('"stdlib/', f'"{ROOT}/stdlib/'))
    return path


def _numbers(record: dict) -> dict:
    """An item's record without what differs between two runs of it (time, versions,
    where it ran)."""
    result = dict(record["result"])
    result.pop("seconds", None)
    result.pop("versions", None)
    return {"key": record["key"], "status": record["status"], "settings": record["settings"], "result": result}


def _items(folder: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (folder / "items").glob("*.json")}


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    """The spec run once on the local backend: (spec path, result, records by key)."""
    base = tmp_path_factory.mktemp("sweep")
    spec = _spec_file(base)
    result = sweep(spec, base / "local", threads=1, progress=False)
    return spec, result, _items(base / "local")


# -- the spec ---------------------------------------------------------------------------


def test_the_spec_names_one_item_per_cell_with_stable_keys():
    spec = parse_spec(SPEC, base=ROOT)
    checks = [i for i in spec.items if i.kind == "check"]
    discoveries = [i for i in spec.items if i.kind == "discover"]
    assert len(checks) == 8 and len(discoveries) == 2
    assert {i.model for i in checks} == {"toy-ioi", "toy-induction"}  # each file's `model` line
    assert {(i.settings["ablation"], i.settings["seed"]) for i in checks} == {
        (a, s) for a in ("resample", "mean") for s in (0, 1)}
    assert all(i.settings["edges"] == 6 and i.settings["method"] == "eap" for i in discoveries)
    assert set(spec.axes) == {"file", "ablation", "seed"}
    # the same grid written in another order has the same keys; another value, others
    reordered = SPEC.replace('permutations = 0\nbreakdown = false', 'breakdown = false\npermutations = 0')
    assert [i.key for i in parse_spec(reordered, base=ROOT).items] == [i.key for i in spec.items]
    other = parse_spec(SPEC.replace("n = 8", "n = 9"), base=ROOT)
    assert not {i.key for i in other.items} & {i.key for i in spec.items}


def test_the_example_spec_names_its_grid():
    """examples/sweeps/seeds.toml (its run and summary: tests/test_examples.py)."""
    spec = load_spec(ROOT / "examples" / "sweeps" / "seeds.toml")
    assert spec.name == "toy-seeds" and len(spec.items) == 18
    assert sum(i.kind == "check" for i in spec.items) == 12
    assert "toy-seeds: 18 items" in (ROOT / "examples" / "sweeps" / "README.md").read_text()


def test_the_spec_lists_equal_circuitlangs_own():
    from circuitlang import ir
    from circuitlang.discover import METHODS
    from circuitlang.discover.attribution import IG_VARIANTS
    from circuitlang.sweeps import spec

    assert set(spec.METHODS) == set(METHODS)
    assert set(spec.ABLATIONS) == set(ir.ABLATION_MODES)
    assert set(spec.IG_VARIANTS) == set(IG_VARIANTS)
    assert set(spec.SEMANTICS) == set(ir.SEMANTICS)


BAD_SPECS = [
    ("seed = [0]\n[check]\nfiles = ['stdlib/toy_ioi.circ']", "unknown key 'seed' in the top level",
     "did you mean seeds?"),
    ("[check]\nfiles = ['stdlib/toy_ioi.circ']\nablations = 'mean'", "unknown key 'ablations' in check",
     "did you mean ablation?"),
    ("[check]\nfiles = ['stdlib/toy_ioi.circ']\nablation = ['mean', 'noise']",
     "[check] ablation = [\"mean\", \"noise\"] is not valid", "resample, corrupt, mean, zero"),
    ("seeds = [-1]\n[check]\nfiles = ['stdlib/toy_ioi.circ']", "seeds must be between 0", "whole numbers"),
    ("n = 0\n[check]\nfiles = ['stdlib/toy_ioi.circ']", "n must be at least 1", "numbers of prompts"),
    ("seeds = []\n[check]\nfiles = ['stdlib/toy_ioi.circ']", "seeds = [] makes the grid empty", "at least one"),
    ("seeds = [1, 1]\n[check]\nfiles = ['stdlib/toy_ioi.circ']", "repeats a value", "each value"),
    ("[check]\nfiles = ['stdlib/none.circ']", "no hypothesis file 'stdlib/none.circ'", "relative to the spec"),
    ("[check]\npermutations = 0", "[check] has no files", "files = "),
    ("tasks = ['induction']\n[check]\nfiles = ['stdlib/toy_ioi.circ']",
     "stdlib/toy_ioi.circ on model toy-ioi, task induction does not resolve", "leave that model or task out"),
    ("[discover]\nmodels = ['toy-ioi']\ntasks = ['ioi']\nedges = 5\nthreshold = 0.1",
     "[discover] gives edges and threshold", "choose one of edges, threshold and target"),
    ("[discover]\nmodels = ['toy-ioi']\ntasks = ['ioi']\nmethod = 'acdcx'", "method = \"acdcx\" is not valid",
     "acdc, eap, eap-ig, prune"),
    ("[discover]\ntasks = ['ioi']", "[discover] has no models", "models = "),
    ("[discover]\nmodels = ['toy-ioi']\ntasks = ['nope']", "unknown task 'nope'", "valid tasks"),
    ("[discover]\nmodels = ['nope-model']\ntasks = ['ioi']", "unknown model 'nope-model'", None),
    ("[check]\nfiles = ['stdlib/toy_ioi.circ']\nmetric = ['logit_diff', 'accuracy']",
     "[check] metric = \"accuracy\" is not a metric of task ioi", "logit_diff, prob_diff, loss, kl"),
    ("[discover]\nmodels = ['toy-ioi']\ntasks = ['induction']\nmetric = 'logitdiff'",
     "[discover] metric = \"logitdiff\" is not a metric of task induction", "its metrics: loss"),
    ("[task_params]\nbogus = [1, 2]\n[check]\nfiles = ['stdlib/toy_ioi.circ']",
     "task ioi has no parameter 'bogus' ([task_params])", "prepend_bos (bool)"),
    ("[task_params]\nprepend_bos = 3\n[discover]\nmodels = ['toy-ioi']\ntasks = ['ioi']", "prepend_bos", None),
    ("name = 'x'", "neither a [check] nor a [discover] table", "[check]"),
    ("seeds = [0,\n", "not valid TOML", "docs/sweeps.md"),
]


@pytest.mark.parametrize("text,message,hint", BAD_SPECS, ids=[b[1][:30] for b in BAD_SPECS])
def test_a_bad_spec_names_the_key_and_what_was_valid(text, message, hint):
    with pytest.raises(circuitlang.CircuitlangError) as info:
        parse_spec(text, base=ROOT, filename="bad.toml")
    rendered = info.value.render()
    assert message in rendered
    if hint is not None:
        assert hint in (info.value.hint or "")


def test_a_bad_spec_exits_2_before_anything_runs(tmp_path, capsys):
    spec = tmp_path / "bad.toml"
    spec.write_text("[check]\nfiles = ['x.circ']\nablation = 'noise'\n")
    assert main(["sweep", str(spec), "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "ablation" in err and "hint:" in err
    assert not (tmp_path / "out").exists()
    assert main(["sweep", str(tmp_path / "missing.toml"), "-q"]) == 2
    assert main(["sweep", "--summary", str(tmp_path)]) == 2  # not a sweep directory


def test_the_command_runs_a_sweep_and_exits_0_when_it_holds(tmp_path, capsys):
    spec = tmp_path / "one.toml"
    spec.write_text("n = 4\n[discover]\nmodels = 'toy-ioi'\ntasks = 'ioi'\nmethod = 'eap'\nedges = 3\n"
                    "curve = false\ncheck = false\n")
    out = tmp_path / "one"
    assert main(["sweep", str(spec), "-o", str(out), "-q", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "sweep one: 1 items, 1 finished" in printed and f"1 items run; results in {out}" in printed
    (record,) = _items(out).values()
    assert record["status"] == "ok" and record["result"]["method"] == "eap" and record["result"]["n"] == 4


def test_a_dtype_axis_loads_each_model_in_each_dtype(tmp_path):
    """`dtypes` is an axis: one item per dtype, the model loaded in it (the worker holds
    one (model, dtype) at a time), numbers within the dtype's tolerance of float32's;
    items without it keep the keys they had before dtypes existed."""
    text = ("n = 4\ndtypes = ['float32', 'float64']\n[discover]\nmodels = 'toy-ioi'\ntasks = 'ioi'\n"
            "method = 'eap'\nedges = 3\ncurve = false\ncheck = false\n")
    spec = parse_spec(text)
    assert [i.dtype for i in spec.items] == ["float32", "float64"] and spec.axes == ("dtype",)
    assert len({i.loads for i in spec.items}) == 2
    plain = parse_spec(text.replace("dtypes = ['float32', 'float64']\n", ""))
    assert "dtype" not in plain.items[0].settings and plain.items[0].dtype is None
    path = tmp_path / "dtypes.toml"
    path.write_text(text)
    sweep(path, tmp_path / "out", threads=1, progress=False)
    records = {r["settings"]["dtype"]: r for r in _items(tmp_path / "out").values()}
    assert {d: r["status"] for d, r in records.items()} == {"float32": "ok", "float64": "ok"}
    assert {d: r["environment"]["model"]["dtype"] for d, r in records.items()} == {"float32": "float32",
                                                                                     "float64": "float64"}
    a, b = (records[d]["result"]["edges"] for d in ("float32", "float64"))
    assert [e[:2] for e in a] == [e[:2] for e in b]  # the same top edges
    with pytest.raises(SweepError, match="dtypes"):
        parse_spec(text.replace("'float64'", "'int8'"))


def test_an_item_that_raises_is_recorded_and_redone_on_resume(tmp_path, monkeypatch):
    from circuitlang.sweeps import worker

    spec = _spec_file(tmp_path, "seeds = [0, 1]\nn = 8\n[check]\nfiles = [\"stdlib/toy_ioi.circ\"]\n"
                                "permutations = 0\nbreakdown = false\n")
    real = worker.run_check

    def broken(item, model):
        if item.settings["seed"] == 1:
            raise RuntimeError("boom")
        return real(item, model)

    monkeypatch.setattr(worker, "run_check", broken)
    first = sweep(spec, tmp_path / "out", threads=1, progress=False)
    statuses = {r["settings"]["seed"]: r for r in _items(tmp_path / "out").values()}
    assert statuses[0]["status"] == "ok" and statuses[1]["status"] == "error"
    assert statuses[1]["error"]["type"] == "RuntimeError" and "boom" in statuses[1]["error"]["rendered"]
    assert not first.holds and "1 failed" in first.summary and "RuntimeError: boom" in first.summary
    monkeypatch.setattr(worker, "run_check", real)
    again = sweep(spec, tmp_path / "out", resume=True, threads=1, progress=False)
    assert (again.kept, again.ran) == (1, 1) and again.holds
    assert all(r["status"] == "ok" for r in _items(tmp_path / "out").values())


def test_with_ablation_replaces_or_adds_the_line():
    from circuitlang import ast

    program = circuitlang.parse("ablation resample given template\nhead 1.0 at END depends on IO\n")
    modes = lambda p: [s.mode for s in p.statements if isinstance(s, ast.AblationDecl)]
    assert modes(with_ablation(program, "mean")) == ["mean"]
    assert with_ablation(program, "resample") == program  # its conditioning kept
    assert modes(with_ablation(circuitlang.parse("head 1.0 at END depends on IO\n"), "zero")) == ["zero"]


def test_ray_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(SweepError) as info:
        sweep(_spec_file(tmp_path), tmp_path / "out", backend="ray")
    assert "circuitlang[ray]" in info.value.hint
    assert not (tmp_path / "out").exists()


# -- a local sweep ----------------------------------------------------------------------


def test_a_local_sweep_writes_one_result_per_item_and_a_summary(local_sweep):
    spec_path, result, records = local_sweep
    spec = load_spec(spec_path)
    assert set(records) == {i.key for i in spec.items} and result.ran == 10 and result.kept == 0
    assert all(r["status"] == "ok" for r in records.values())
    folder = result.folder
    assert (folder / "spec.toml").read_text() == spec_path.read_text()
    meta = json.loads((folder / "sweep.json").read_text())
    assert meta["kind"] == "sweep" and [e["key"] for e in meta["items"]] == [i.key for i in spec.items]
    assert "versions" in meta["environment"]
    some = next(r for r in records.values() if r["kind"] == "check")
    assert some["environment"]["model"]["weights_sha256"] and some["worker"]["backend"] == "local"
    # the summary: a row per item, then the seeds' aggregate; toy_induction under mean
    # ablation fails its `expect recovered >= 0.8`, so the sweep does not hold
    text = (folder / "summary.txt").read_text()
    assert text.rstrip("\n") == result.summary
    assert "checks:" in result.summary and "discoveries:" in result.summary
    assert "checks over seeds:" in result.summary
    assert result.summary.count("holds") + result.summary.count("FAILS") >= 8
    assert not result.holds and "FAILS" in result.summary
    assert summary(folder) == (result.summary, False)


def test_an_item_is_what_circuitlang_check_gives(local_sweep):
    """The sweep adds no second way of checking: an item's numbers are check's."""
    _, _, records = local_sweep
    record = next(r for r in records.values() if r["kind"] == "check" and r["settings"]["model"] == "toy-ioi"
                  and r["settings"]["ablation"] == "mean" and r["settings"]["seed"] == 1)
    text = (ROOT / "stdlib" / "toy_ioi.circ").read_text().replace("ablation resample", "ablation mean")
    direct = circuitlang.check(text, n=8, seed=1, permutations=0, breakdown=False).to_json()
    assert record["result"]["recovered"] == direct["recovered"]
    assert record["result"]["per_prompt"] == direct["per_prompt"]


def test_the_summary_command_prints_it_again(local_sweep, capsys):
    _, result, _ = local_sweep
    assert main(["sweep", "--summary", str(result.folder)]) == 1  # an expectation fails
    assert capsys.readouterr().out.rstrip("\n") == result.summary


@pytest.mark.slow
def test_resume_after_kill_9_keeps_finished_items_and_redoes_the_rest(local_sweep, tmp_path, capsys):
    spec_path, _, reference = local_sweep
    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-m", "circuitlang", "sweep", str(spec_path), "-o", str(out), "-q",
                              "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list((out / "items").glob("*.json")):
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    before = {p.name: p.read_bytes() for p in (out / "items").glob("*.json")}
    assert 1 <= len(before) < len(reference)
    text, holds = summary(out)
    assert "pending" in text and not holds
    # a second start without --resume refuses the folder
    with pytest.raises(SweepError, match="not empty"):
        sweep(spec_path, out, progress=False)

    capsys.readouterr()
    result = sweep(spec_path, out, resume=True, threads=1, progress=True)  # the bar, drawn on request
    assert "sweep toys" in capsys.readouterr().err
    assert result.kept == len(before) and result.ran == len(reference) - len(before)
    after = _items(out)
    for name, data in before.items():  # kept as they were, not rewritten
        assert (out / "items" / name).read_bytes() == data
    assert {k: _numbers(r) for k, r in after.items()} == {k: _numbers(r) for k, r in reference.items()}


# -- the Ray backend --------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_instance():
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (pip install 'circuitlang[ray]')")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_gives_the_local_numbers_with_a_worker_killed_mid_sweep(ray_instance, local_sweep, tmp_path):
    spec_path, _, reference = local_sweep
    arrived, killed = [], []

    def on_record(record):
        arrived.append(record)
        if not killed:  # kill the worker that sent the first result: its next item is redone
            killed.append(record["worker"]["pid"])
            os.kill(record["worker"]["pid"], signal.SIGKILL)

    result = sweep(spec_path, tmp_path / "ray", backend="ray", threads=1, on_record=on_record, progress=False)
    assert result.ran == len(reference) and result.redone >= 1  # the dead worker's next item, sent again
    assert sorted(r["key"] for r in arrived) == sorted(reference)  # each item written once
    assert all(r["status"] == "ok" and r["worker"]["backend"] == "ray" for r in arrived)
    for pid in {r["worker"]["pid"] for r in arrived}:  # an actor keeps its model: one run of items per model
        models = [r["settings"]["model"] for r in arrived if r["worker"]["pid"] == pid]
        runs = [m for i, m in enumerate(models) if i == 0 or models[i - 1] != m]
        assert len(runs) == len(set(runs)), models
    pids = {r["worker"]["pid"] for r in arrived}
    assert len(pids) >= 2 and killed[0] in pids  # the killed actor's finished item kept, the rest elsewhere
    after = _items(tmp_path / "ray")
    assert {k: _numbers(r) for k, r in after.items()} == {k: _numbers(r) for k, r in reference.items()}
    assert ray_instance.is_initialized()  # a Ray the caller started is left running
