"""`circuitlang check` on bad input: a clear error and exit 2 (never a traceback, never
exit 1, which means "an expect failed"), before anything is run or lost; and the task
options a user can give (`--task-param`, `--tokenizer`, `--allow-pickle`)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from circuitlang.cli import main

TOY = Path(__file__).resolve().parent.parent / "circuitlang" / "models" / "toys"
FAST = ["-n", "8", "--permutations", "0", "--no-breakdown", "--max-examples", "2"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random GPT-2 folder (config + safetensors, no tokenizer), vocab 64, context 64."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cli") / "tiny"
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=None, eos_token_id=None)
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


def _hypothesis(tmp_path, folder, task="task induction length=4 vocab=20 prepend_bos=false",
                body="head 1.0 copies PREV+1 to END\nexpect recovered >= -100\n"):
    path = tmp_path / "h.circ"
    path.write_text(f'model "{folder}"\n{task}\n{body}')
    return path


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return code, out.out, out.err


# ------------------------------------------------------------------ tasks from the CLI


def test_a_model_folder_without_a_tokenizer_runs_a_task_over_token_ids(tmp_path, folder, capsys):
    code, out, err = _run(capsys, "check", _hypothesis(tmp_path, folder), *FAST)
    assert code in (0, 1), err
    assert "task induction" in out


def test_task_params_from_the_command_line_beat_the_files(tmp_path, folder, capsys):
    path = _hypothesis(tmp_path, folder, task="task induction length=40 vocab=60 "
                       "prepend_bos=false")
    code, _, err = _run(capsys, "check", path, *FAST)  # 80 tokens: more than n_ctx 64
    assert code == 2
    assert "the longest prompt is 80 tokens, but model" in err and "reads at most 64" in err
    code, _, err = _run(capsys, "check", path, *FAST, "--task-param", "length=4")
    assert code in (0, 1), err
    code, _, err = _run(capsys, "check", path, "--task-param", "lenght=4", "--resolve-only")
    assert code == 2 and "no parameter 'lenght' (--task-param)" in err
    assert "length (int)" in err
    code, _, err = _run(capsys, "check", path, "--task-param", "length", "--resolve-only")
    assert code == 2 and "expected NAME=VALUE" in err


def test_a_tokenizer_for_a_folder_without_one(tmp_path, folder, capsys):
    path = _hypothesis(tmp_path, folder, task="task induction length=4")
    code, _, err = _run(capsys, "check", path, *FAST, "--tokenizer", TOY / "toy-induction")
    assert code in (0, 1), err
    code, _, err = _run(capsys, "check", path, *FAST, "--tokenizer", tmp_path / "nope")
    assert code == 2 and "could not load tokenizer" in err


def test_parse_json_and_fmt_show_the_task_parameters(tmp_path, folder, capsys):
    path = _hypothesis(tmp_path, folder, task="task  induction vocab = 20 length=4")
    code, out, _ = _run(capsys, "parse", path, "--json")
    assert code == 0
    assert json.loads(out)["task_params"] == {"length": 4, "vocab": 20}
    assert _run(capsys, "fmt", path)[0] == 0
    assert "\ntask induction vocab=20 length=4\n" in path.read_text()


def test_a_jsonl_task_named_in_a_file_runs_from_anywhere(tmp_path, folder, capsys, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    records = [{"clean": [1, 2, 3, 4], "corrupt": [5, 6, 7, 4], "answers": [9],
                "positions": {"X": 1}} for _ in range(4)]
    (project / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    path = _hypothesis(project, folder, task='task "pairs.jsonl"',
                       body="head 1.0 at X depends on prompt\nexpect recovered >= -100\n")
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, "check", path, *FAST)
    assert code in (0, 1), err  # was "the custom task needs path=..." (exit 2)
    assert "metric answer_logit" in out


# ------------------------------------------------------------------ bad options


@pytest.mark.parametrize("argv, fragment", [
    (["--seed", "-1"], "--seed must be between 0 and 4,294,967,295, got -1"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["-n", "0"], "-n must be at least 1 prompt, got 0"),
    (["-n", "-5"], "-n must be at least 1 prompt, got -5"),
    (["-n", "1000000000"], "more prompts than the limit of 100,000"),
    (["--permutations", "-1"], "--permutations must be between 0 and 10,000, got -1"),
    (["--max-examples", "0"], "--max-examples must be between 1 and 100,000"),
    (["--json", "/proc/self/result.json"], "cannot write there"),
    (["--json", "."], "is a folder"),
    (["--json", "no/such/folder/out.json"], "does not exist"),
])
def test_bad_options_exit_2_before_anything_runs(tmp_path, capsys, argv, fragment):
    # the model does not even exist: the options are checked first
    path = _hypothesis(tmp_path, tmp_path / "no-model-here")
    code, out, err = _run(capsys, "check", path, *argv)
    assert code == 2, err
    assert fragment in err and out == ""


def test_cuda_on_a_cpu_only_torch_is_a_user_error(tmp_path, folder, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = _run(capsys, "check", _hypothesis(tmp_path, folder), "--device", "cuda")
    assert code == 2 and "--device cuda: this torch" in err and "--device cpu" in err


# ------------------------------------------------------------------ bad inputs


def test_a_truncated_safetensors_file_is_exit_2(tmp_path, folder, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code, _, err = _run(capsys, "check", _hypothesis(tmp_path, broken), *FAST)
    assert code == 2 and "could not load weights" in err


def test_a_config_with_no_heads_is_exit_2(tmp_path, folder, capsys):
    broken = tmp_path / "noheads"
    shutil.copytree(folder, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps(dict(config, n_head=0)))
    code, _, err = _run(capsys, "check", _hypothesis(tmp_path, broken), "--resolve-only")
    assert code == 2 and "config.json has n_head=0" in err


def test_pickle_weights_need_allow_pickle(tmp_path, folder, capsys):
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(folder / "config.json", pickled / "config.json")
    torch.save(load_file(folder / "model.safetensors"), pickled / "pytorch_model.bin")
    path = _hypothesis(tmp_path, pickled)
    code, _, err = _run(capsys, "check", path, *FAST)
    assert code == 2 and "pytorch_model.bin" in err and "--allow-pickle" in err
    code, _, err = _run(capsys, "check", path, *FAST, "--allow-pickle")
    assert code in (0, 1), err


def test_a_jsonl_task_that_is_not_utf8_is_exit_2(tmp_path, folder, capsys):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes('{"clean": "caf\xe9", "corrupt": "th\xe9", "answers": " x"}\n'
                    .encode("latin-1"))
    code, _, err = _run(capsys, "check", _hypothesis(tmp_path, folder), "--task", bad)
    assert code == 2 and "not UTF-8 text" in err


def test_depends_on_without_at_is_exit_2_with_the_real_problem(tmp_path, folder, capsys):
    path = _hypothesis(tmp_path, folder, task="task ioi",
                       body="group name_movers = heads 1.0, 1.1\nname_movers.q depends on IO\n")
    code, _, err = _run(capsys, "check", path, "--resolve-only")
    assert code == 2
    assert "a `depends on` claim needs a position" in err and "unknown verb" not in err


def test_fmt_never_writes_a_file_that_does_not_parse(tmp_path, capsys):
    empty_body = tmp_path / "verb.circ"
    empty_body.write_text("verb $h zaps $x:\n    \f\n")
    code, _, err = _run(capsys, "fmt", empty_body)
    assert code == 2 and "needs at least one claim" in err
    assert empty_body.read_text() == "verb $h zaps $x:\n    \f\n"
    zero = tmp_path / "zero.circ"
    zero.write_text("model gpt2\ntask ioi\nhead 1.0 moves IO+0 to END\n")
    assert _run(capsys, "check", zero, "--resolve-only")[0] == 0  # was: not a feature
    assert _run(capsys, "fmt", zero)[0] == 0
    assert _run(capsys, "check", zero, "--resolve-only")[0] == 0
    assert "moves IO to END" in zero.read_text()


def test_models_names_each_architecture_by_its_own_type(capsys):
    code, out, _ = _run(capsys, "models", "Qwen/Qwen2-0.5B")
    assert code == 0 and out.startswith("Qwen/Qwen2-0.5B: qwen2, 24 layers")
    code, out, _ = _run(capsys, "models", "Qwen/Qwen2-0.5B", "--json")
    assert json.loads(out)["architecture"] == "qwen2"


@pytest.mark.slow
def test_check_writes_nothing_into_the_working_directory(tmp_path):
    # the property search (`expect each`) made hypothesis write ./.hypothesis/
    shutil.copy(Path(__file__).resolve().parent.parent / "examples" / "induction" / "induction.circ",
                tmp_path / "induction.circ")
    cache = tmp_path / "cache"
    env = dict(os.environ, CIRCUITLANG_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1")
    env.pop("HYPOTHESIS_STORAGE_DIRECTORY", None)
    out = subprocess.run([sys.executable, "-m", "circuitlang", "check", "induction.circ",
                          *FAST, "--json", "result.json"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode in (0, 1), out.stderr[-2000:]
    assert not (tmp_path / ".hypothesis").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == [
        "induction.circ", "result.json"]
