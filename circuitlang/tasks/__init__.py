"""Tasks: prompt distributions a circuit hypothesis is about.

Takes a task name (or a custom JSONL path, or a task a user-named Python module
registered) plus parameters and a tokenizer; gives a `Task` (see `base.py` for the
contract), or just its `TaskSignature` without a tokenizer.

Built-in tasks: `ioi`, `induction`, `greater_than`, `docstring`, `gendered_pronoun`,
`facts` (factual recall, for causal tracing), and `custom` (a JSONL file of prompt pairs: `load_task("custom", path=...)`, or
simply `load_task("path/to/pairs.jsonl")`).

Python task definitions run only from the stdlib or from a module the user names
explicitly: `load_task_module("my_tasks")` (or a `.py` path) imports it and
registers every `Task` subclass it defines, by `SIGNATURE.name`. A hypothesis file
never triggers that.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from circuitlang.errors import TaskError
from circuitlang.tasks.base import Dropped, PromptSet, Spec, Task
from circuitlang.tasks.params import merge_task_params, validate_task_params
from circuitlang.tasks.signature import TaskSignature

__all__ = [
    "Dropped",
    "PromptSet",
    "Spec",
    "Task",
    "TaskSignature",
    "get_signature",
    "list_tasks",
    "load_task",
    "load_task_module",
    "merge_task_params",
    "register_task",
    "task_for",
    "validate_task_params",
]

# name -> "module:Class"; imported only when asked for.
_BUILTIN: dict[str, str] = {
    "ioi": "circuitlang.tasks.ioi:IOITask",
    "induction": "circuitlang.tasks.induction:InductionTask",
    "greater_than": "circuitlang.tasks.greater_than:GreaterThanTask",
    "docstring": "circuitlang.tasks.docstring:DocstringTask",
    "gendered_pronoun": "circuitlang.tasks.gendered_pronoun:GenderedPronounTask",
    "custom": "circuitlang.tasks.custom:CustomTask",
    "facts": "circuitlang.tasks.facts:FactsTask",
}
_ALIASES = {"greater-than": "greater_than", "gendered-pronoun": "gendered_pronoun",
            "gp": "gendered_pronoun", "gt": "greater_than"}
_REGISTERED: dict[str, type[Task]] = {}


def _is_jsonl(name: str) -> bool:
    return name.endswith(".jsonl") or name.endswith(".json")


def list_tasks() -> list[str]:
    """Names of every task that `load_task` accepts (built-in, then registered)."""
    return list(_BUILTIN) + [n for n in _REGISTERED if n not in _BUILTIN]


def task_class(name: str) -> type[Task]:
    """The `Task` subclass registered under `name`.

    Raises:
        TaskError: no task has that name.
    """
    key = _ALIASES.get(name, name)
    if key in _REGISTERED:
        return _REGISTERED[key]
    if key in _BUILTIN:
        module, cls = _BUILTIN[key].split(":")
        return getattr(importlib.import_module(module), cls)
    raise TaskError(
        f"unknown task {name!r}",
        code="task.unknown",
        hint=f"valid tasks: {', '.join(list_tasks())}, or a path to a .jsonl file of "
        "prompt pairs",
    )


def get_signature(name: str, **params: Any) -> TaskSignature:
    """The names task `name` defines (positions, features, metrics); no tokenizer needed.

    A `.jsonl` path (or `custom` with `path=`) reads the file's records to learn the
    positions and features they define.

    Raises:
        TaskError: unknown task, or an unreadable custom file.
    """
    if _is_jsonl(name):
        params = {"path": name, **params}
        name = "custom"
    cls = task_class(name)
    if name == "custom" or getattr(cls, "SIGNATURE_FROM_PARAMS", False):
        return cls.signature_for(**params)
    return cls.SIGNATURE


def load_task(name: str, tokenizer: Any = None, **params: Any) -> Task:
    """Build task `name` for `tokenizer` (a Hugging Face fast tokenizer, or None).

    Args:
        name: a built-in or registered task name, or a path to a `.jsonl` file.
        tokenizer: the model's tokenizer; without one the task samples specs and texts
            but cannot build token ids.
        **params: task parameters (`n`, `seed`, `prepend_bos`, and each task's own).

    Raises:
        TaskError: unknown task or parameter (the message lists the valid ones).
    """
    if _is_jsonl(name):
        params = {"path": name, **params}
        name = "custom"
    return task_class(name)(tokenizer, **params)


def task_for(hypothesis: Any, tokenizer: Any = None, *, params: dict | None = None,
             shape: Any = None, model_name: str | None = None,
             source: str = "given by the caller") -> Task:
    """The task a resolved hypothesis runs on, built with every source of its parameters.

    Parameters, the later winning: what the model's own metadata asks for (an
    embedded toy trained without a BOS token says `prepend_bos: false`), the file's
    `task` line (`Hypothesis.task_params`, a JSONL task's path among them), and
    `params`, the caller's (`--task-param`, `task_params=` in Python).

    Args:
        hypothesis: the resolved `Hypothesis` (its `task` and `task_params`).
        tokenizer: the model's tokenizer, or None (tasks over token ids need none).
        params: the caller's parameters; each beats the file's.
        shape: the model's `ModelShape`: prompts longer than its context, or with ids
            outside its vocabulary, are then refused when built (`Task.for_model`).
        model_name: the model's name, for its metadata's parameters.
        source: what to call `params` in messages (`--task-param`).

    Raises:
        TaskError: a parameter the task does not have or of the wrong type, or a
            task that cannot be built with them.
    """
    from circuitlang.models.known import model_task_params

    merged = {**(model_task_params(model_name) if model_name else {}),
              **merge_task_params(hypothesis.task, hypothesis.task_params, params, source=source)}
    task = load_task(hypothesis.task, tokenizer, **merged)
    if shape is not None:
        task.for_model(shape)
    return task


def register_task(cls: type[Task]) -> type[Task]:
    """Make `cls` loadable by `cls.SIGNATURE.name` (usable as a class decorator).

    Raises:
        TaskError: `cls` is not a Task subclass with a signature, or its name is a
            built-in task's.
    """
    if not (isinstance(cls, type) and issubclass(cls, Task)
            and isinstance(getattr(cls, "SIGNATURE", None), TaskSignature)):
        raise TaskError(f"{cls!r} is not a Task subclass with a SIGNATURE",
                        code="task.bad-registration",
                        hint="subclass circuitlang.tasks.Task and set SIGNATURE")
    name = cls.SIGNATURE.name
    if name in _BUILTIN:
        raise TaskError(f"task name {name!r} is taken by a built-in task",
                        code="task.bad-registration", hint="give your task another name")
    _REGISTERED[name] = cls
    return cls


def load_task_module(module: str) -> list[str]:
    """Import a Python module the user named and register the tasks it defines.

    Args:
        module: a dotted module name (`my_tasks`) or a path to a `.py` file.

    Returns:
        The names of the tasks registered from it.

    Raises:
        TaskError: the module cannot be found or defines no Task subclass.
    """
    if module.endswith(".py") or "/" in module:
        path = Path(module)
        if not path.is_file():
            raise TaskError(f"task module {module!r} does not exist",
                            code="task.module-not-found", hint="give a path to a .py file")
        mod_name = f"circuitlang_user_tasks.{path.stem}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = mod
        spec.loader.exec_module(mod)
    else:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            raise TaskError(f"cannot import task module {module!r}: {exc}",
                            code="task.module-not-found",
                            hint="name an importable module or a .py file path") from exc
    names = []
    for value in vars(mod).values():
        if (isinstance(value, type) and issubclass(value, Task) and value is not Task
                and value.__module__ == mod.__name__
                and isinstance(getattr(value, "SIGNATURE", None), TaskSignature)):
            register_task(value)
            names.append(value.SIGNATURE.name)
    if not names:
        raise TaskError(f"task module {module!r} defines no Task subclass with a SIGNATURE",
                        code="task.module-empty",
                        hint="define class MyTask(circuitlang.tasks.Task) with SIGNATURE = ...")
    return names
