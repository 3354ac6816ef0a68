"""A sweep's worker: one item in, one record out, through the public API.

Takes an `Item` (a check of one hypothesis text, or one discovery) and gives the
record a sweep directory stores for it: the item's settings, its status (`ok`, or
`error` with the message), the result as `CheckResult.to_json()` or
`DiscoveryResult.to_json()`, the environment record (`circuitlang.runs.environment`)
and where it ran. Every item runs through `circuitlang.check` or `circuitlang.discover`
and nothing else, so a sweep's number is the number those calls give.

A `Worker` is one device's runner: it keeps the last model it loaded (a sweep sends it
the items of one model together) and sets torch's CPU threads once, so that the local
backend and every Ray actor compute with the same reductions (torch's CPU sums depend
on the thread count; the numbers of two backends are identical at equal `threads` on
the same kind of device). The Ray backend makes this class an actor.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import time
import traceback

from circuitlang.errors import CircuitlangError

__all__ = ["Worker", "with_ablation"]


class Worker:
    """Runs sweep items on one device, keeping its model loaded between items.

    Args:
        device: the torch device for models ("cpu", "cuda"; None: CUDA when present).
        threads: torch's CPU threads for this worker (None: leave torch's setting).
        backend: "local" or "ray", recorded with each item.
    """

    def __init__(self, device: str | None = None, threads: int | None = None, backend: str = "local"):
        self.device = device
        self.threads = threads
        self.backend = backend
        self._model = None
        self._loaded: tuple | None = None  # (name it was loaded by, dtype): a path stays a path
        self._environment: dict | None = None
        if threads is not None:
            import torch

            torch.set_num_threads(int(threads))

    def model(self, name: str, dtype: str | None = None):
        """The loaded model `name` (in `dtype`; None: its own), loading it (and dropping
        the last one) when it is not."""
        if self._model is None or self._loaded != (name, dtype):
            import circuitlang
            from circuitlang.runs import environment

            self._model = self._loaded = self._environment = None  # free the last model first
            self._model = circuitlang.load_model(name, device=self.device, dtype=dtype)
            self._environment = environment(self._model)  # the weights hash, once per model
            self._loaded = (name, dtype)
        return self._model

    def run(self, item) -> dict:
        """Run one item; the record to store (an error is recorded, not raised)."""
        import torch

        started = time.perf_counter()
        record = {"key": item.key, "kind": item.kind, "settings": item.settings, "status": "ok", "result": None,
                  "error": None}
        try:
            model = self.model(item.model, item.dtype)
            result = run_check(item, model) if item.kind == "check" else run_discover(item, model)
            record["result"] = result.to_json()
        except CircuitlangError as exc:
            record["status"] = "error"
            record["error"] = {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint,
                               "rendered": exc.render()}
        except Exception as exc:  # noqa: BLE001 - a bug or out of memory in one item must not end the sweep
            record["status"] = "error"
            record["error"] = {"type": type(exc).__name__, "message": str(exc), "hint": None,
                               "rendered": traceback.format_exc()}
        environment = dict(self._environment or {})
        environment["seed"] = item.settings["seed"]
        environment["time"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        record["environment"] = environment
        record["worker"] = {"backend": self.backend, "host": platform.node(), "pid": os.getpid(),
                            "device": str(self._model.device) if self._model is not None else self.device,
                            "threads": torch.get_num_threads()}
        record["seconds"] = round(time.perf_counter() - started, 3)
        return record


def run_check(item, model):
    """`circuitlang.check` on the item's hypothesis text, with the item's options."""
    import circuitlang

    s = item.settings
    program = circuitlang.parse(item.source, item.filename)
    if s.get("ablation") is not None:
        program = with_ablation(program, s["ablation"])
    given = {k: s.get(k) for k in ("task", "n", "metric", "semantics", "permutations", "breakdown",
                                   "max_examples", "batch_size")}
    given["task_params"] = s.get("task_params") or None
    return circuitlang.check(program, model=model, seed=s["seed"], progress=False,
                             **{k: v for k, v in given.items() if v is not None})


def run_discover(item, model):
    """`circuitlang.discover` on the item's model and task, with the item's options."""
    import circuitlang

    s = item.settings
    given = {k: s.get(k) for k in ("method", "edges", "threshold", "target", "ablation", "metric", "ig", "steps",
                                   "n", "permutations", "batch_size")}
    given["positions"] = tuple(s["positions"]) if s.get("positions") else None
    given["task_params"] = s.get("task_params") or None
    return circuitlang.discover(model=model, task=s["task"], seed=s["seed"], with_curve=s.get("curve", True),
                                check=s.get("check", True), progress=False,
                                **{k: v for k, v in given.items() if v is not None})


def with_ablation(program, mode: str):
    """The program with its `ablation` line set to `mode` (added first when it has none).

    The file's own line is kept as it is when it already names `mode` (its `given`
    features included); another mode replaces it whole, since conditioning belongs to
    resampling.
    """
    from circuitlang import ast

    statements = list(program.statements)
    for i, statement in enumerate(statements):
        if isinstance(statement, ast.AblationDecl):
            if statement.mode != mode:
                statements[i] = ast.AblationDecl(mode)
            break
    else:
        statements.insert(0, ast.AblationDecl(mode))
    return dataclasses.replace(program, statements=tuple(statements))
