"""Task parameters: their types, checking values against them, and merging sources.

Takes parameter values from a hypothesis file (`task induction length=20 vocab=32`),
the command line (`--task-param length=20`) or Python (`task_params={...}`); gives
the validated keyword arguments `load_task` builds the task with, or a `TaskError`
that names the parameter, what it must be, and every valid parameter with its type.

Every task class declares `PARAMS` (name -> default) and `PARAM_TYPES` (name ->
`ParamType`); a task registered from a user's module without `PARAM_TYPES` gets
types inferred from its defaults. `n` and `seed` are run options (`samples` / `seed`
in a file, `-n` / `--seed` on the command line), not task parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from circuitlang.errors import TaskError

if TYPE_CHECKING:  # pragma: no cover
    from circuitlang.tasks.base import Task

__all__ = ["ParamType", "RUN_OPTIONS", "check_value", "describe_params", "merge_task_params",
           "param_types", "validate_task_params"]

#: Parameters every task has that are set as run options, not as task parameters.
RUN_OPTIONS = {"n": "`samples N` in the file, -n on the command line, n= in Python",
               "seed": "`seed N` in the file, --seed on the command line, seed= in Python"}

_KINDS = ("int", "bool", "str", "number", "path", "list[int]", "list[str]", "any")


@dataclass(frozen=True, slots=True)
class ParamType:
    """What one task parameter accepts.

    Attributes:
        kind: `int`, `bool`, `str`, `number` (int or decimal), `path` (a file; in a
            hypothesis file, relative to the file's folder), `list[int]`,
            `list[str]`, or `any` (a task from a user's module, default None).
        help: one line for `circuitlang tasks`.
        choices: the values a `str` parameter may take (empty: any).
    """

    kind: str
    help: str = ""
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.choices:
            return " | ".join(self.choices)
        return self.kind


def _inferred(default: Any) -> ParamType:
    if isinstance(default, bool):
        return ParamType("bool")
    if isinstance(default, int):
        return ParamType("int")
    if isinstance(default, (float, Decimal)):
        return ParamType("number")
    if isinstance(default, str):
        return ParamType("str")
    return ParamType("any")


def param_types(cls: type["Task"]) -> dict[str, ParamType]:
    """Every parameter of task class `cls` (run options included) with its type."""
    declared = {**getattr(cls, "COMMON_PARAM_TYPES", {}), **getattr(cls, "PARAM_TYPES", {})}
    defaults = {**cls.COMMON_PARAMS, **cls.PARAMS}
    return {name: declared.get(name) or _inferred(default) for name, default in defaults.items()}


def _kind_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (list, tuple)):
        return "list"
    if isinstance(value, Decimal):
        return "decimal"
    return type(value).__name__


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return str(value)


def check_value(task: str, name: str, kind: ParamType, value: Any) -> Any:
    """`value` as parameter `name` of `task` takes it (lists become tuples).

    Raises:
        TaskError: the value is not of the parameter's type (or not one of its choices).
    """

    def bad(what: str) -> TaskError:
        if kind.choices:
            hint = f"valid values of {name}: {', '.join(kind.choices)}"
        else:
            hint = f"for example {name}={_example(kind)}"
            if kind.help:
                hint = f"{name}: {kind.help}; {hint}"
        return TaskError(
            f"task {task} parameter {name} must be {what}, got {_shown(value)} "
            f"({_kind_name(value)})", code="task.bad-param", hint=hint)

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    k = kind.kind
    if k == "any":
        return tuple(value) if isinstance(value, list) else value
    if k == "int":
        if not is_int(value):
            raise bad("a whole number")
        return value
    if k == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if k == "number":
        if isinstance(value, Decimal):
            return int(value) if value == value.to_integral_value() else float(value)
        if not (is_int(value) or isinstance(value, float)):
            raise bad("a number")
        return value
    if k in ("str", "path"):
        if not isinstance(value, str) or (k == "path" and not value):
            raise bad("a string" if k == "str" else "a file path")
        if kind.choices and value not in kind.choices:
            raise bad("one of " + ", ".join(kind.choices))
        return value
    if k in ("list[int]", "list[str]"):
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise bad("a list such as " + _example(kind))
        items = tuple(value)
        ok = is_int if k == "list[int]" else (lambda v: isinstance(v, str))
        if not items or not all(ok(v) for v in items):
            raise bad("a non-empty list of " + ("whole numbers" if k == "list[int]"
                                               else "strings"))
        return items
    raise ValueError(f"unknown parameter kind {k!r}; kinds are {', '.join(_KINDS)}")


def _example(kind: ParamType) -> str:
    if kind.choices:
        return kind.choices[0]
    return {"int": "20", "bool": "true", "str": "word", "number": "0.5",
            "path": '"pairs.jsonl"', "list[int]": "[0, 1, 2]",
            "list[str]": "[Mary, John]"}.get(kind.kind, "20")


def describe_params(cls: type["Task"], *, run_options: bool = False) -> list[dict]:
    """The parameters of task class `cls`: name, type, default, help (for listings)."""
    defaults = {**cls.COMMON_PARAMS, **cls.PARAMS}
    kinds = param_types(cls)
    out = []
    for name in [*cls.PARAMS, *(n for n in cls.COMMON_PARAMS if n not in cls.PARAMS)]:
        kind = kinds[name]
        if name in RUN_OPTIONS and not run_options:
            continue
        out.append({"name": name, "type": kind.describe(), "default": defaults[name],
                    "help": kind.help})
    return out


def _valid_list(cls: type["Task"]) -> str:
    return ", ".join(f"{p['name']} ({p['type']})" for p in describe_params(cls)) or "none"


def validate_task_params(task: str, params: Mapping[str, Any], *,
                         source: str = "") -> dict[str, Any]:
    """Check parameters a user gave for `task` (a file, the command line, Python).

    Args:
        task: the task's name (`induction`; `custom` for a JSONL file).
        params: name -> value.
        source: where they came from, for messages (`--task-param`).

    Returns:
        The values as `load_task` takes them (lists as tuples, decimals as numbers).

    Raises:
        TaskError: an unknown parameter (the message lists the valid ones with their
            types), a run option (`n`, `seed`), or a value of the wrong type.
    """
    from circuitlang.tasks import task_class

    cls = task_class(task)
    kinds = param_types(cls)
    where = f" ({source})" if source else ""
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name in RUN_OPTIONS:
            raise TaskError(f"{name} is a run option, not a parameter of task {task}{where}",
                            code="task.run-option", hint=f"set it with {RUN_OPTIONS[name]}")
        if name not in kinds:
            raise TaskError(f"task {task} has no parameter {name!r}{where}",
                            code="task.unknown-param",
                            hint=f"parameters of {task}: {_valid_list(cls)}")
        out[name] = check_value(task, name, kinds[name], value)
    return out


def merge_task_params(task: str, file_params: Mapping[str, Any] | Iterable = (),
                      explicit: Mapping[str, Any] | None = None, *,
                      source: str = "given by the caller") -> dict[str, Any]:
    """The task parameters a run uses: the file's, overridden by the caller's.

    Args:
        task: the task's name (`Hypothesis.task`).
        file_params: the hypothesis's own (`Hypothesis.task_params`: pairs, already
            checked by the resolver; for a JSONL task they hold its resolved `path`).
        explicit: what the caller passed (`--task-param`, `task_params=` in Python);
            each beats the file's value of the same name.
        source: what to call the explicit ones in messages (`--task-param`).

    Returns:
        The merged, validated parameters, to pass to `load_task`.

    Raises:
        TaskError: an explicit parameter the task does not have, a run option, or a
            value of the wrong type.
    """
    merged = dict(file_params)
    merged.update(validate_task_params(task, dict(explicit or {}), source=source))
    return merged
