"""`circuitlang tasks` lists tasks with positions, features and metrics."""
from __future__ import annotations

import json

from circuitlang.cli import main


def test_lists_every_task(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in ("ioi", "induction", "greater_than", "docstring", "gendered_pronoun", "custom"):
        assert f"\n{name}: " in "\n" + out
    assert "positions: IO, S1, S1+1, S2, END, all" in out
    assert "aliases: name -> IO" in out
    assert "metrics:   prob_diff (default), logit_diff, loss, kl" in out


def test_json_and_example(capsys):
    assert main(["tasks", "greater_than", "--json", "--example"]) == 0
    (info,) = json.loads(capsys.readouterr().out)
    assert info["positions"] == ["NOUN", "XX1", "YY", "XX2", "END"]
    assert info["default_metric"] == "prob_diff"
    assert info["example"].startswith("The ") and " lasted from the year " in info["example"]


def test_custom_file_and_unknown_task(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"clean": "a b", "corrupt": "c d", "answers": " x",
                                "wrong_answers": " y", "positions": {"P": "b"}}) + "\n")
    assert main(["tasks", str(path)]) == 0
    assert "positions: P, END, all" in capsys.readouterr().out
    assert main(["tasks", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown task 'nope'" in err and "valid tasks: ioi" in err


def test_load_module_registers_tasks(tmp_path, capsys):
    module = tmp_path / "cli_tasks_mod.py"
    module.write_text(
        "from circuitlang.tasks import Task, TaskSignature\n"
        "class T(Task):\n"
        "    SIGNATURE = TaskSignature('cli_demo', ('X', 'END'), ('f',), ('loss',), 'loss',\n"
        "                              description='a demo')\n")
    assert main(["tasks", "--load-module", str(module), "cli_demo"]) == 0
    assert "cli_demo: a demo" in capsys.readouterr().out
