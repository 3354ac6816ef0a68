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


def test_lists_each_tasks_parameters_with_types_and_defaults(capsys):
    assert main(["tasks", "induction"]) == 0
    out = capsys.readouterr().out
    assert "  params:    length=10 (int): tokens in each copy, at least 2\n" in out
    assert "             vocab (int): sample from the first N non-special token ids only" in out
    assert "             prepend_bos=true (bool)" in out
    assert " n=" not in out and "seed" not in out  # run options, not task parameters
    assert main(["tasks", "ioi", "--json"]) == 0
    (info,) = json.loads(capsys.readouterr().out)
    by_name = {p["name"]: p for p in info["params"]}
    assert by_name["template_set"] == {"name": "template_set", "type": "both | ABBA | BABA",
                                       "default": "both", "help": "which word orders"}
    assert by_name["templates"]["type"] == "list[int]"
