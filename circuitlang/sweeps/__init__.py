"""Sweeps: one hypothesis (or discovery) across models, tasks, seeds and options.

`circuitlang.sweeps.sweep(...)` and `circuitlang sweep SPEC` are this pipeline::

    spec = load_spec(path)                        # the TOML grid, checked; its items (spec.py)
    folder = SweepDir.create(out, spec, resume)   # spec.toml, sweep.json, items/ (sweepdir.py)
    todo = [i for i in spec.items if not done]    # --resume keeps every finished item
    run_local(todo, folder) | run_ray(todo, ...)  # each item: circuitlang.check / discover (worker.py)
    render_summary(spec.name, folder.records())   # the table across the grid (summary.py)

The spec format, the backends, resuming and the summary are in docs/sweeps.md.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from circuitlang.sweeps.spec import (
    Item,
    Spec,
    SweepError,
    item_key,
    load_spec,
    parse_spec,
)
from circuitlang.sweeps.summary import holds_all, render_summary
from circuitlang.sweeps.sweepdir import SweepDir

__all__ = ["BACKENDS", "Item", "Spec", "SweepDir", "SweepError", "SweepResult", "item_key", "load_spec",
           "parse_spec", "summary", "sweep"]

BACKENDS = ("local", "ray")


@dataclass
class SweepResult:
    """What a sweep left behind.

    Attributes:
        folder: the sweep directory.
        summary: the table across the grid (as printed).
        ran: items run this time; kept: finished items a resumed sweep kept.
        redone: times an item was sent again because the worker running it died (ray).
        holds: every item finished and every check (and re-check) holds.
    """

    folder: Path
    summary: str
    ran: int
    kept: int
    holds: bool
    redone: int = 0


def sweep(spec, out, *, backend: str = "local", resume: bool = False, device=None, threads: int | None = None,
          address: str | None = None, workers: int | None = None, progress: bool | None = None,
          on_record: Callable[[dict], None] | None = None, call: dict | None = None) -> SweepResult:
    """Run a sweep's grid and write its directory.

    Args:
        spec: a spec file's path, or a parsed `Spec`.
        out: the sweep directory (new or empty; with `resume`, the one to continue).
        backend: "local" (this process) or "ray" (a Ray cluster's actors).
        resume: keep the finished items in `out` and run the rest.
        device: local backend: the torch device (default: CUDA when present).
        threads: torch's CPU threads per worker (default: local, as torch has it;
            ray, 1); equal threads give identical numbers on both backends.
        address: ray backend: the cluster's address (default `$RAY_ADDRESS`, else a
            local instance).
        workers: ray backend: how many actors (default: one per device).
        progress: a progress bar over the items on stderr (None: when it is a terminal).
        on_record: called with each item's record once it is written.
        call: how the sweep was asked for (`circuitlang.runs.invocation`).

    Returns:
        A `SweepResult`.

    Raises:
        SweepError: a bad spec, backend or folder, or ray missing for `backend="ray"`.
    """
    from circuitlang import options
    from circuitlang.progress import Progress
    from circuitlang.sweeps.backends import run_local, run_ray

    if backend not in BACKENDS:
        raise SweepError(f"unknown backend {backend!r}", code="sweep.backend", hint="use local or ray")
    if backend == "ray":
        from circuitlang.sweeps.backends import _ray

        _ray()  # missing ray is a user error before anything is written
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise SweepError(f"threads={threads!r} is not a number of threads", code="sweep.threads",
                         hint="a whole number >= 1, e.g. --threads 1")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise SweepError(f"workers={workers!r} is not a number of actors", code="sweep.workers",
                         hint="a whole number >= 1, or leave it out (one per device)")
    device = options.check_device(device, "--device")
    spec_path = None
    if not isinstance(spec, Spec):
        spec_path, spec = spec, load_spec(spec)
    folder = SweepDir.create(out, spec, resume=resume, spec_path=spec_path, call=call)
    finished = folder.finished() if resume else {}
    todo = [item for item in spec.items if item.key not in finished]
    bar = Progress(len(spec.items), f"sweep {spec.name}", enabled=progress)
    bar.set(len(finished))

    def arrived(record: dict) -> None:
        bar.step(f"{record['settings'].get('model')} seed={record['settings'].get('seed')}")
        if on_record is not None:
            on_record(record)

    try:
        if backend == "local":
            redone = run_local(todo, folder, arrived, device=device, threads=threads)
        else:
            redone = run_ray(todo, folder, arrived, address=address, workers=workers, threads=threads)
    finally:
        bar.close()
    records = folder.records()
    text = render_summary(spec.name, records)
    folder.write_summary(text)
    return SweepResult(folder.path, text, len(todo), len(finished), holds_all(records), redone)


def summary(path) -> tuple[str, bool]:
    """A sweep directory's summary table, from its records (nothing recomputed), and
    whether every item finished and holds.

    Raises:
        SweepError: not a sweep directory.
    """
    folder = SweepDir.open(path)
    records = folder.records()
    return render_summary(folder.meta.get("name", folder.path.name), records), holds_all(records)
