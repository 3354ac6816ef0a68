"""Where a sweep's items run: this process (`local`) or the actors of a Ray cluster (`ray`).

Takes the items still to run, a `SweepDir` and a callback; gives nothing back but
each item's record, written into the sweep directory (atomically, by this process)
the moment it arrives, then passed to the callback (the progress bar; tests).

* `run_local`: one `Worker` in this process, the items grouped by model, so each
  model loads once.
* `run_ray`: one `Worker` actor per device: per GPU (`num_gpus=1`) on a cluster that
  has GPUs, else per `threads` CPUs. Each actor keeps its model loaded; the driver
  routes an item to an actor that holds its model, and an actor whose model has no
  items left takes the model with the most items per actor holding it. An actor that
  dies (killed, out of memory, its node lost) is replaced and its item is sent again,
  up to `RETRIES` times; what finished stays finished.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable

from circuitlang.sweeps.spec import SweepError
from circuitlang.sweeps.worker import Worker

__all__ = ["RETRIES", "by_model", "run_local", "run_ray"]

#: how many times an item is sent again after the actor running it died
RETRIES = 2


def by_model(items) -> dict[tuple, deque]:
    """The items grouped by the model they load (and its dtype), each group in grid
    order, models in order of first use."""
    groups: dict[tuple, deque] = {}
    for item in items:
        groups.setdefault(item.loads, deque()).append(item)
    return groups


def run_local(items, sweepdir, on_record: Callable[[dict], None], *, device=None, threads=None) -> int:
    """Run the items here, one model at a time; 0 (no item is ever sent twice here)."""
    import torch

    before = torch.get_num_threads()
    worker = Worker(device=device, threads=threads, backend="local")
    try:
        for group in by_model(items).values():
            for item in group:
                record = worker.run(item)
                sweepdir.write(record)
                on_record(record)
    finally:
        torch.set_num_threads(before)  # the sweep's setting does not outlive it
    return 0


def _ray():
    try:
        import ray
    except ImportError:
        raise SweepError("--backend ray needs ray, which is not installed", code="sweep.ray",
                         hint="pip install 'circuitlang[ray]' (or pip install 'ray>=2.9'), or use "
                         "--backend local") from None
    return ray


def run_ray(items, sweepdir, on_record: Callable[[dict], None], *, address=None, workers=None,
            threads=None) -> int:
    """Run the items on a Ray cluster's actors (see the module docstring); gives how many
    times an item was sent again because its actor died.

    Args:
        address: the cluster (`ray.init(address=...)`; None: `$RAY_ADDRESS`, else a
            local instance). A Ray already initialised in this process is used as is.
        workers: how many actors (default, and at most: one per GPU, else one per
            `threads` CPUs; never more than there are items).
        threads: torch's CPU threads per actor (default 1).

    Raises:
        SweepError: ray is not installed, the cluster cannot be reached, or (on CPUs)
            `threads` is more than it has.
    """
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise SweepError(f"cannot reach the Ray cluster {address or '(local)'}: {exc}", code="sweep.ray",
                             hint="start one with `ray start --head`, pass --address HOST:PORT, or use "
                             "--backend local") from None
    try:
        return _schedule(ray, list(items), sweepdir, on_record, workers=workers, threads=threads or 1)
    finally:
        if started_here:
            ray.shutdown()


def _schedule(ray, items, sweepdir, on_record, *, workers, threads: int) -> int:
    from ray.exceptions import RayActorError

    if not items:
        return 0
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if gpus:
        count, options, device = gpus, {"num_gpus": 1, "num_cpus": 1}, "cuda"
    else:
        if threads > cpus:
            raise SweepError(f"--threads {threads} is more CPUs than the Ray cluster has ({cpus})",
                             code="sweep.threads", hint=f"use --threads {max(1, cpus)} or fewer")
        count, options, device = cpus // threads, {"num_cpus": threads}, "cpu"
    # more actors than the cluster has devices would wait for ever for theirs
    count = min(workers or count, count, len(items))
    actor_class = ray.remote(Worker).options(**options)

    def start():
        return actor_class.remote(device=device, threads=threads, backend="ray")

    actors = [start() for _ in range(count)]
    holding: list[tuple | None] = [None] * count
    pending = by_model(items)
    order = {m: i for i, m in enumerate(pending)}
    tries: dict[str, int] = {}
    running: dict = {}  # ObjectRef -> (actor index, item)

    def next_item(idx: int):
        model = holding[idx]
        if model is not None and pending.get(model):
            return pending[model].popleft()
        left = [m for m, group in pending.items() if group]
        if not left:
            return None
        held = {m: holding.count(m) for m in left}
        model = max(left, key=lambda m: (len(pending[m]) / (1 + held[m]), -order[m]))
        holding[idx] = model
        return pending[model].popleft()

    def submit(idx: int) -> None:
        item = next_item(idx)
        if item is not None:
            running[actors[idx].run.remote(item)] = (idx, item)

    for idx in range(count):
        submit(idx)
    try:
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            idx, item = running.pop(ready[0])
            try:
                record = ray.get(ready[0])
            except RayActorError as exc:
                ray.kill(actors[idx], no_restart=True)
                actors[idx], holding[idx] = start(), None
                tries[item.key] = tries.get(item.key, 0) + 1
                if tries[item.key] <= RETRIES:
                    pending[item.loads].appendleft(item)
                    submit(idx)
                    continue
                record = {"key": item.key, "kind": item.kind, "settings": item.settings, "status": "error",
                          "result": None, "error": {"type": type(exc).__name__, "hint": None,
                                                    "message": f"the worker died {tries[item.key]} times running it",
                                                    "rendered": str(exc)}}
            sweepdir.write(record)
            on_record(record)
            submit(idx)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
    return sum(tries.values())
