"""Experiment tracking (circuitlang/tracking.py): wandb offline, and a clear error without it."""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

import circuitlang
from circuitlang import tracking
from circuitlang.cli import main

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = ("model toy-ioi\ntask ioi\nhead 1.1 at END depends on IO\nhead 1.2 at END depends on IO\n"
           "patch head 1.* at END\nexpect recovered >= 0.1\n")

needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                 reason="wandb is not installed (pip install 'circuitlang[tracking]')")


def test_without_wandb_the_error_says_how_to_install_it_before_anything_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tracking, "_wandb_installed", lambda: False)

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("circuitlang.models.load_model", no_load)
    program = tmp_path / "p.circ"
    program.write_text(PROGRAM)
    assert main(["check", str(program), "--wandb"]) == 2
    err = capsys.readouterr().err
    assert "needs the wandb package" in err and "pip install 'circuitlang[tracking]'" in err
    with pytest.raises(tracking.TrackingError):
        circuitlang.check(PROGRAM, wandb=True)


@needs_wandb
def test_settings_take_true_a_project_or_init_arguments():
    assert tracking.wandb_settings(True) == {}
    assert tracking.wandb_settings("ioi") == {"project": "ioi"}
    assert tracking.wandb_settings({"project": "p", "tags": ["a"]}) == {"project": "p", "tags": ["a"]}
    with pytest.raises(tracking.TrackingError) as err:
        tracking.wandb_settings(3)
    assert "a project name" in err.value.hint


@needs_wandb
@pytest.mark.slow  # wandb's service takes ~10 s to start
def test_check_logs_the_run_record_to_wandb_offline(tmp_path, monkeypatch):
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    model = circuitlang.load_model("toy-ioi")
    result = circuitlang.check(PROGRAM, model=model, task="ioi", n=8, permutations=0, max_examples=2,
                               out=tmp_path / "run", wandb={"project": "circuitlang-test", "name": "t1"})
    [run_dir] = (tmp_path / "WANDB_DIR" / "wandb").glob("offline-run-*")
    files = run_dir / "files"
    # the run's files, copied (not linked: a run without out= writes a temporary folder)
    saved = json.loads((files / "result.json").read_text())
    assert saved["recovered"] == pytest.approx(result.recovered.value)
    assert not (files / "result.json").is_symlink()
    env = json.loads((files / "environment.json").read_text())
    assert env["model"]["weights_sha256"] == json.loads((tmp_path / "run" / "environment.json").read_text())[
        "model"]["weights_sha256"]
    # config, summary and artifact live in the offline transaction log until `wandb sync`
    [log] = run_dir.glob("run-*.wandb")
    expected = (b"circuitlang-test", b"weights_sha256", b"recovered_low", b"cost/", b"holds/expect",
                b"circuitlang-run", b"per_prompt.npz")
    deadline = time.monotonic() + 20  # wandb's service may still be writing its last records
    while True:
        data = log.read_bytes()
        missing = [e for e in expected if e not in data]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert missing == []


def test_a_tracker_that_fails_keeps_the_run(tmp_path, monkeypatch):
    from circuitlang import runs

    monkeypatch.setattr(tracking, "_wandb_installed", lambda: True)

    def offline_server(folder, settings):
        raise RuntimeError("no route to api.wandb.ai")

    monkeypatch.setattr(tracking, "log_run", offline_server)
    model = circuitlang.load_model("toy-ioi")
    with pytest.raises(tracking.TrackingError) as err:
        circuitlang.check(PROGRAM, model=model, task="ioi", n=8, permutations=0, breakdown=False, max_examples=2,
                          wandb=True)
    assert "no route to api.wandb.ai" in err.value.message and "saved in" in err.value.message
    kept = Path(err.value.message.split("saved in ")[1])
    assert runs.load_run(kept).result["n"] == 8
