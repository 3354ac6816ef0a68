"""Sweep specs: a TOML grid file in, the list of work items it names out.

Takes the text of a spec (docs/sweeps.md) and the folder it lives in; gives a `Spec`
whose `items` are the grid's cells, each an `Item` with its resolved settings and a
stable key (a hash of those settings), or raises a `SweepError` naming the bad key
and what would have been valid. Nothing is loaded or run here: every value is checked
with the same functions the command line uses (`circuitlang.options`, the solver's
lists of methods and ablations), every hypothesis file is parsed, and every file is
resolved against every model and task it meets (`known_shape`: no weights), so a bad
spec fails before the first item starts.

A spec, in short (every list is an axis of the grid; a single value is fixed)::

    name = "toy seeds"
    models = ["toy-ioi"]            # default: each file's `model` line ([check] and
    tasks = ["ioi"]                 # [discover] may give their own models, tasks, seeds, n)
    seeds = [0, 1, 2]               # default [0]
    n = 32                          # default: the API's (check 64, discover 32)
    [task_params]
    prepend_bos = false
    [check]
    files = ["toy_ioi.circ"]        # relative to the spec's folder
    permutations = 0
    ablation = ["resample", "mean"]
    [discover]
    method = ["eap", "eap-ig"]
    edges = [10, 20]                # or threshold = [...], or target = [...]
"""
from __future__ import annotations

import difflib
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from circuitlang.errors import CircuitlangError

__all__ = ["Item", "Spec", "SweepError", "item_key", "load_spec", "parse_spec"]

#: the spec's top-level keys: shared by check and discovery items
TOP_KEYS = ("name", "models", "dtypes", "tasks", "seeds", "n", "batch_size", "task_params", "check", "discover")
#: keys of [check]
CHECK_KEYS = ("files", "models", "dtypes", "tasks", "seeds", "n", "permutations", "breakdown", "ablation", "metric", "semantics", "max_examples")
#: keys of [discover]
DISCOVER_KEYS = ("models", "dtypes", "tasks", "seeds", "n", "method", "edges", "threshold", "target", "ablation", "metric", "positions", "ig", "steps",
                 "curve", "check", "permutations")

# the solver's and the checker's choices, named here so a spec is checked without torch
# (tests/test_sweep.py checks they equal circuitlang's own lists)
METHODS = ("acdc", "eap", "eap-ig", "prune")
ABLATIONS = ("resample", "corrupt", "mean", "zero")
IG_VARIANTS = ("inputs", "activations", "clean-corrupt")
SEMANTICS = ("paths", "channels")
#: the weights' dtypes a sweep may load a model in (`load_model(dtype=)`; metrics stay fp32)
DTYPES = ("float32", "float16", "bfloat16", "float64")


class SweepError(CircuitlangError):
    """A sweep spec, or a sweep directory, that cannot be used."""

    stage = "sweep"


@dataclass(frozen=True)
class Item:
    """One cell of the grid: a check of one file, or one discovery, with every setting.

    Attributes:
        kind: "check" or "discover".
        settings: what runs, resolved (JSON-able; `key` is its hash): for a check the
            file (as the spec names it) and its text's sha256, model, task, seed, n and
            the check's options; for a discovery model, task, seed, n, method, selection.
        key: `item_key(settings)`, the item's file name in a sweep directory.
        source: the hypothesis text (checks), sent to the worker with the item.
        filename: where that text came from (for messages).
    """

    kind: str
    settings: dict
    key: str
    source: str | None = field(default=None, compare=False, repr=False)
    filename: str | None = field(default=None, compare=False, repr=False)

    @property
    def model(self) -> str:
        return self.settings["model"]

    @property
    def dtype(self) -> str | None:
        """The dtype the model is loaded in (None: its own)."""
        return self.settings.get("dtype")

    @property
    def loads(self) -> tuple[str, str | None]:
        """What a worker must hold to run the item: the model, in its dtype."""
        return self.model, self.dtype


@dataclass(frozen=True)
class Spec:
    """A parsed spec: its name, its text (copied into the sweep directory), its items,
    and the axes that vary (the summary's columns)."""

    name: str
    text: str
    items: tuple[Item, ...]
    axes: tuple[str, ...]


def item_key(settings: dict) -> str:
    """A stable name for an item: the sha256 of its settings as canonical JSON, 16 hex
    digits, after its kind (`check-3f2a...`): the same settings give the same key on any
    machine, in any order of the spec's keys."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return f"{settings['kind']}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def load_spec(path: str | Path) -> Spec:
    """Read and check a spec file (see `parse_spec`).

    Raises:
        SweepError: no such file, or a bad spec.
    """
    spec_path = Path(path).expanduser()
    if not spec_path.is_file():
        raise SweepError(f"no sweep spec {str(path)!r}", code="sweep.spec",
                         hint="pass a .toml grid file (docs/sweeps.md; examples/sweeps/seeds.toml)")
    try:
        text = spec_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SweepError(f"{path}: cannot read the spec ({exc})", code="sweep.spec",
                         hint="pass a UTF-8 text file") from None
    return parse_spec(text, base=spec_path.parent, filename=str(path))


def parse_spec(text: str, *, base: str | Path = ".", filename: str = "<spec>") -> Spec:
    """Parse a spec's TOML text into its items, checking every key and value.

    Args:
        text: the spec (docs/sweeps.md).
        base: the folder that the spec's file paths are relative to.
        filename: the spec's name, for messages.

    Returns:
        The `Spec`, its items in grid order (files, models, tasks, then each option
        axis in the order the spec writes it, seeds last).

    Raises:
        SweepError: TOML that does not parse, an unknown key (with the valid ones), a
            value of the wrong type or out of range, a file that is missing or does not
            parse or resolve against a model or task of the grid, an empty grid.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SweepError(f"{filename}: not valid TOML: {exc}", code="sweep.toml",
                         hint="see docs/sweeps.md for the format (key = value, [check], [discover])") from None
    where = _Where(filename)
    _known_keys(data, TOP_KEYS, where, "the top level")
    if "check" not in data and "discover" not in data:
        raise SweepError(f"{filename}: the spec has neither a [check] nor a [discover] table", code="sweep.empty",
                         hint="add [check] with files = [\"hypothesis.circ\"], or [discover] with method = \"eap\"")
    name = data.get("name", Path(filename).stem)
    if not isinstance(name, str) or not name:
        raise where.bad("name", name, "a non-empty string, e.g. name = \"toy seeds\"")
    shared = _shared_axes(data, where)
    items: list[Item] = []
    varying: dict[str, None] = {}
    if "check" in data:
        items += _check_items(data["check"], shared, Path(base), where, varying)
    if "discover" in data:
        items += _discover_items(data["discover"], shared, where, varying)
    keys = [i.key for i in items]
    if len(set(keys)) != len(keys):
        raise SweepError(f"{filename}: two cells of the grid are the same item", code="sweep.duplicate",
                         hint="a file listed twice, or an axis with a value repeated")
    return Spec(name, text, tuple(items), tuple(varying))


# -- checking keys and values ----------------------------------------------------------


class _Where:
    def __init__(self, filename: str):
        self.filename = filename

    def bad(self, key: str, value: Any, valid: str, table: str | None = None) -> SweepError:
        at = f"[{table}] " if table else ""
        return SweepError(f"{self.filename}: {at}{key} = {_toml(value)} is not valid", code="sweep.value",
                          hint=f"{key} takes {valid}")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return str(value)


def _known_keys(table: Any, valid: tuple[str, ...], where: _Where, what: str) -> None:
    if not isinstance(table, dict):
        raise SweepError(f"{where.filename}: {what} must be a table", code="sweep.table",
                         hint=f"write it as [{what}] followed by key = value lines")
    for key in table:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = (f"did you mean {close[0]}? " if close else "") + f"valid keys in {what}: {', '.join(valid)}"
            raise SweepError(f"{where.filename}: unknown key {key!r} in {what}", code="sweep.key", hint=hint)


def _axis(table: dict, key: str, check, where: _Where, valid: str, table_name: str | None = None,
          default: list | None = None) -> list:
    """A key's values as a list (one value is an axis of one); each value checked."""
    if key not in table:
        return list(default) if default is not None else [None]
    raw = table[key]
    values = raw if isinstance(raw, list) else [raw]
    if not values:
        raise SweepError(f"{where.filename}: {'[' + table_name + '] ' if table_name else ''}{key} = [] makes "
                         "the grid empty", code="sweep.value", hint=f"give {key} at least one value ({valid})")
    out = []
    for v in values:
        try:
            ok = check(v)
        except CircuitlangError as exc:
            raise SweepError(f"{where.filename}: {'[' + table_name + '] ' if table_name else ''}{key} = "
                             f"{_toml(raw)}: {exc.message}", code="sweep.value",
                             hint=f"{key} takes {valid}") from None
        if ok is False:
            raise where.bad(key, raw, valid, table_name)
        out.append(v)
    if len({json.dumps(v, sort_keys=True) for v in out}) != len(out):
        raise SweepError(f"{where.filename}: {key} = {_toml(raw)} repeats a value", code="sweep.value",
                         hint="each value of an axis once")
    return out


def _param_value(v) -> bool:
    scalar = (str, int, float, bool)
    return isinstance(v, scalar) or (isinstance(v, list) and all(isinstance(x, scalar) for x in v))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _one_of(choices):
    return lambda v: isinstance(v, str) and v in choices


def _grid_axes(table: dict, where: _Where, name: str | None = None, defaults: dict | None = None) -> dict:
    """The axes a table may give for itself or share: models, tasks, seeds, n (each
    absent one from `defaults`, the top level's)."""
    from circuitlang import options

    checks = {
        "models": (lambda v: isinstance(v, str) and bool(v), "model names or folders, e.g. models = [\"toy-ioi\"]"),
        "dtypes": (_one_of(DTYPES), "dtypes of the weights: " + ", ".join(DTYPES)
                   + " (e.g. dtypes = [\"float32\", \"bfloat16\"]; absent: the model's own)"),
        "tasks": (lambda v: isinstance(v, str) and bool(v), "task names, e.g. tasks = [\"ioi\"]"),
        "seeds": (lambda v: _is_int(v) and options.check_seed(v, "seeds") is not None,
                  "whole numbers 0 .. 2**32-1, e.g. seeds = [0, 1, 2]"),
        "n": (lambda v: _is_int(v) and options.check_n(v, "n") is not None,
              "numbers of prompts, e.g. n = 32 or n = [16, 64]"),
    }
    out = {}
    for key, (check, valid) in checks.items():
        if defaults is not None and key not in table:
            out[key] = defaults[key]
        else:
            out[key] = _axis(table, key, check, where, valid, name, default=[0] if key == "seeds" else None)
    return out


def _shared_axes(data: dict, where: _Where) -> dict:
    out = _grid_axes(data, where)
    batch = data.get("batch_size")
    if batch is not None and not (_is_int(batch) and batch >= 1):
        raise where.bad("batch_size", batch, "one whole number >= 1 (rows per forward pass)")
    out["batch_size"] = batch
    params = data.get("task_params", {})
    if not isinstance(params, dict):
        raise where.bad("task_params", params, "a table: [task_params] then name = value lines")
    out["task_params"] = [(k, _axis(params, k, _param_value, where,
                                    "strings, numbers or booleans (a list is an axis; a list-valued "
                                    "parameter goes inside one: names = [[\"Ann\", \"Bob\"]])",
                                    "task_params"))
                          for k in params]
    return out


# -- the grid's items ------------------------------------------------------------------


def _product(axes: list[tuple[str, list]]) -> list[dict]:
    names = [a for a, _ in axes]
    return [dict(zip(names, combo)) for combo in itertools.product(*(values for _, values in axes))]


def _varying(axes: list[tuple[str, list]], varying: dict) -> None:
    for name, values in axes:
        if len(values) > 1:
            varying[name] = None


def _own_axes(table: dict, shared: dict, where: _Where, name: str) -> dict:
    """The shared axes, with the table's own models, tasks, seeds and n in place of the
    top level's (check files on their own models beside discoveries on others)."""
    return {**shared, **_grid_axes(table, where, name, defaults=shared)}


def _params_axes(shared: dict) -> list[tuple[str, list]]:
    return [(f"task_params.{k}", v) for k, v in shared["task_params"]]


def _check_items(table: Any, shared: dict, base: Path, where: _Where, varying: dict) -> list[Item]:
    from circuitlang import options

    _known_keys(table, CHECK_KEYS, where, "check")
    shared = _own_axes(table, shared, where, "check")
    if "files" not in table:
        raise SweepError(f"{where.filename}: [check] has no files", code="sweep.files",
                         hint="add files = [\"hypothesis.circ\"] (paths relative to the spec's folder)")
    files = _axis(table, "files", lambda v: isinstance(v, str) and v.endswith(".circ"), where,
                  "paths of .circ files relative to the spec's folder", "check")
    axes = [
        ("permutations", _axis(table, "permutations",
                               lambda v: _is_int(v) and options.check_permutations(v, "permutations") is not None,
                               where, "whole numbers 0 .. 10000 (0 skips the permutation test)", "check")),
        ("breakdown", _axis(table, "breakdown", lambda v: isinstance(v, bool), where, "true or false", "check")),
        ("ablation", _axis(table, "ablation", _one_of(ABLATIONS), where, ", ".join(ABLATIONS), "check")),
        ("metric", _axis(table, "metric", lambda v: isinstance(v, str) and bool(v), where,
                         "metric names of the task, e.g. \"logit_diff\"", "check")),
        ("semantics", _axis(table, "semantics", _one_of(SEMANTICS), where, " or ".join(SEMANTICS), "check")),
        ("max_examples", _axis(table, "max_examples",
                               lambda v: _is_int(v) and options.check_max_examples(v, "max_examples") is not None,
                               where, "whole numbers >= 1", "check")),
    ]
    sources = {f: _read_circ(f, base, where) for f in files}  # the options first: they need no file
    grid = [("file", files), ("model", shared["models"]), ("dtype", shared["dtypes"]), ("task", shared["tasks"]),
            ("n", shared["n"]),
            *_params_axes(shared), *axes, ("seed", shared["seeds"])]
    _varying(grid, varying)
    resolved: dict = {}
    items = []
    for cell in _product(grid):
        file = cell["file"]
        text, path = sources[file]
        model = cell["model"] or _declared_model(text, str(path), where)
        combo = (file, model, cell["task"])
        if combo not in resolved:  # (task name, its metrics)
            try:
                resolved[combo] = _preflight_check(text, str(path), model, cell["task"])
            except CircuitlangError as exc:
                on = f"model {model}" + (f", task {cell['task']}" if cell["task"] else "")
                raise SweepError(f"{where.filename}: [check] {file} on {on} does not resolve:\n"
                                 + "\n".join(exc.render().splitlines()), code="sweep.resolve",
                                 hint="fix the file, or leave that model or task out of the grid") from None
        task_name, metrics = resolved[combo]
        _check_task_params(task_name, cell, where)
        if cell["metric"] is not None and metrics and cell["metric"] not in metrics:
            raise SweepError(f"{where.filename}: [check] metric = {_toml(cell['metric'])} is not a metric of task "
                             f"{task_name} ({file})", code="sweep.metric", hint="its metrics: " + ", ".join(metrics))
        settings = {"kind": "check", "file": file, "file_sha256": hashlib.sha256(text.encode()).hexdigest(),
                    "model": model, "task": cell["task"], "seed": cell["seed"], "n": cell["n"],
                    "batch_size": shared["batch_size"],
                    "task_params": {k.split(".", 1)[1]: v for k, v in cell.items() if k.startswith("task_params.")},
                    **{name: cell[name] for name, _ in axes}, **_dtype(cell)}
        items.append(Item("check", settings, item_key(settings), text, str(path)))
    return items


def _dtype(cell: dict) -> dict:
    """The cell's dtype as a setting, only where the spec gives one (so that the keys of
    items without one, and the sweep directories made before dtypes, stay the same)."""
    return {} if cell["dtype"] is None else {"dtype": cell["dtype"]}


def _read_circ(file: str, base: Path, where: _Where) -> tuple[str, Path]:
    path = (base / file).expanduser()
    if not path.is_file():
        raise SweepError(f"{where.filename}: [check] files: no hypothesis file {file!r} (looked in {base})",
                         code="sweep.files", hint="paths are relative to the spec's own folder")
    return path.read_text(encoding="utf-8"), path


def _declared_model(text: str, filename: str, where: _Where) -> str:
    from circuitlang import ast
    from circuitlang.text_to_ast import parse

    for statement in parse(text, filename).statements:
        if isinstance(statement, ast.ModelDecl):
            return statement.name
    raise SweepError(f"{where.filename}: {filename} has no `model` line and the spec names no models",
                     code="sweep.models", hint="add models = [\"toy-ioi\"] to the spec, or a model line to the file")


def _preflight_check(text: str, filename: str, model: str, task: str | None) -> tuple[str, tuple[str, ...]]:
    """Parse and resolve a file against a model's shape and a task (no weights); gives
    the task's name and metrics."""
    from circuitlang.checker import load_hypothesis, refuse_holes
    from circuitlang.text_to_ast import parse

    program = parse(text, filename)
    hypothesis, _ = load_hypothesis(program, model=model, task=task, filename=filename)
    refuse_holes(hypothesis)
    return hypothesis.task, _metrics(hypothesis.task)


def _check_task_params(task: str, cell: dict, where: _Where) -> None:
    """The cell's task parameters are ones its task has, of their types."""
    from circuitlang.tasks.params import validate_task_params

    params = {k.split(".", 1)[1]: v for k, v in cell.items() if k.startswith("task_params.")}
    if params and not task.endswith((".jsonl", ".json")):
        try:
            validate_task_params(task, params, source="[task_params]")
        except CircuitlangError as exc:
            raise SweepError(f"{where.filename}: {exc.message}", code="sweep.task-params", hint=exc.hint) from None


def _metrics(task: str) -> tuple[str, ...]:
    """A task's metric names (none known for a task file that cannot be read here)."""
    from circuitlang.tasks import get_signature

    try:
        return tuple(get_signature(task).metrics)
    except CircuitlangError:
        return ()


def _discover_items(table: Any, shared: dict, where: _Where, varying: dict) -> list[Item]:
    from circuitlang import options
    from circuitlang.models import known_shape
    from circuitlang.tasks import task_class

    _known_keys(table, DISCOVER_KEYS, where, "discover")
    shared = _own_axes(table, shared, where, "discover")
    chosen = [k for k in ("edges", "threshold", "target") if k in table]
    if len(chosen) > 1:
        raise SweepError(f"{where.filename}: [discover] gives {' and '.join(chosen)}", code="sweep.selection",
                         hint="choose one of edges, threshold and target (each may be a list)")
    if shared["models"] == [None] or shared["tasks"] == [None]:
        missing = "models" if shared["models"] == [None] else "tasks"
        raise SweepError(f"{where.filename}: [discover] has no {missing}", code="sweep.discover",
                         hint="name them in [discover] or at the top level, e.g. models = [\"toy-ioi\"] "
                         "and tasks = [\"ioi\"]")
    for model in shared["models"]:
        known_shape(model)
    metrics = {}
    for task in shared["tasks"]:
        if not task.endswith((".jsonl", ".json")):
            task_class(task)
        metrics[task] = _metrics(task)
    selection = chosen[0] if chosen else "target"
    checks = {"edges": (lambda v: _is_int(v) and v >= 1, "whole numbers >= 1 (the top N edges)"),
              "threshold": (lambda v: _is_number(v) and v >= 0, "numbers >= 0 (ACDC's tau)"),
              "target": (lambda v: _is_number(v) and 0 < v <= 1.5, "faithfulness targets in (0, 1.5]")}
    positions = table.get("positions")
    if positions is not None:
        if isinstance(positions, str):
            positions = [p.strip() for p in positions.split(",") if p.strip()]
        if not (isinstance(positions, list) and positions and all(isinstance(p, str) and p for p in positions)):
            raise where.bad("positions", table["positions"], "position names, e.g. positions = [\"END\", \"S2\"]",
                            "discover")
    axes = [
        ("method", _axis(table, "method", _one_of(METHODS), where, ", ".join(METHODS), "discover",
                         default=["eap-ig"])),
        (selection, _axis(table, selection, checks[selection][0], where, checks[selection][1], "discover")),
        ("ablation", _axis(table, "ablation", _one_of(ABLATIONS), where, ", ".join(ABLATIONS), "discover")),
        ("metric", _axis(table, "metric", lambda v: isinstance(v, str) and bool(v), where,
                         "metric names, e.g. \"kl\" or \"logit_diff\"", "discover")),
        ("ig", _axis(table, "ig", _one_of(IG_VARIANTS), where, ", ".join(IG_VARIANTS), "discover")),
        ("steps", _axis(table, "steps", lambda v: _is_int(v) and v >= 1, where, "whole numbers >= 1", "discover")),
        ("curve", _axis(table, "curve", lambda v: isinstance(v, bool), where, "true or false", "discover",
                        default=[True])),
        ("check", _axis(table, "check", lambda v: isinstance(v, bool), where, "true or false", "discover",
                        default=[True])),
        ("permutations", _axis(table, "permutations",
                               lambda v: _is_int(v) and options.check_permutations(v, "permutations") is not None,
                               where, "whole numbers 0 .. 10000", "discover")),
    ]
    grid = [("model", shared["models"]), ("dtype", shared["dtypes"]), ("task", shared["tasks"]), ("n", shared["n"]),
            *_params_axes(shared),
            *axes, ("seed", shared["seeds"])]
    _varying(grid, varying)
    items = []
    for cell in _product(grid):
        _check_task_params(cell["task"], cell, where)
        known = metrics[cell["task"]]
        if cell["metric"] is not None and known and cell["metric"] not in known:
            raise SweepError(f"{where.filename}: [discover] metric = {_toml(cell['metric'])} is not a metric of "
                             f"task {cell['task']}", code="sweep.metric", hint="its metrics: " + ", ".join(known))
        settings = {"kind": "discover", "model": cell["model"], "task": cell["task"], "seed": cell["seed"],
                    "n": cell["n"], "batch_size": shared["batch_size"], "positions": positions,
                    "task_params": {k.split(".", 1)[1]: v for k, v in cell.items() if k.startswith("task_params.")},
                    "edges": None, "threshold": None, "target": None,
                    **{name: cell[name] for name, _ in axes}, **_dtype(cell)}
        items.append(Item("discover", settings, item_key(settings)))
    return items
