"""Run directories: what a check or a discovery leaves behind, to show and diff later.

Takes a finished check (its result, resolved hypothesis, program text, model and
options) and gives a folder that holds everything needed to read the run again
without a model: `save_check`. `load_run` reads a check's folder, or one that
`circuitlang discover --out` wrote, back as a `Run` whose `render()` is the report
the run printed (`circuitlang show`).

A check's folder, written into a hidden temporary folder beside it and renamed into
place only when complete (so a crash leaves no folder that `load_run` accepts):

    run.json          what the folder is: kind "check", format, the options, its files
    environment.json  versions, model name and weights hash, seed, device, command, time
    program.circ      the program text (printed from the IR when there was no text)
    ir.json           the resolved hypothesis (`Hypothesis.to_json`, as `parse --json`)
    result.json       the full result (`CheckResult.to_json`)
    per_prompt.npz    the metric per prompt: clean, scrubbed, random, texts, and
                      experiment_K ([sites, prompts]) per experiment K
    report.txt        the report as printed
    figures/          circuit.svg, experiment-K.svg (when matplotlib is installed)

A discovery's folder is `circuitlang.discover.rundir.RunDir`: checkpoints written as
the run goes (it must resume), with `environment.json`, `report.txt`, `figures/`
(`discovery_figures`: circuit.svg, curve.svg), `found.circ` and, last, `result.json`; it counts as finished once `result.json` is there. Both
kinds write every file with `atomic_file` and the same `environment()` record.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from circuitlang.errors import CircuitlangError

__all__ = ["FORMAT", "Difference", "Run", "RunDirError", "atomic_file", "check_out_dir", "diff_runs",
           "discovery_figures", "draw_figures", "environment", "headline", "invocation", "load_run", "render_diff", "save_check", "weights_hash",
           "write_json", "write_text"]

#: the layout version written in run.json (bumped when a file changes meaning)
FORMAT = 1


class RunDirError(CircuitlangError):
    """A run directory cannot be written where asked, or a folder is not a finished run."""

    stage = "runs"


# -- the one atomic writer ---------------------------------------------------------


def atomic_file(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through `write(fh)` into a temporary name beside it, flush it to
    disk, then rename it over `path`: a reader sees the old file or the new, never half."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the run from collaborators
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


_UMASK: list[int] = []


def _umask() -> int:
    """The process's umask (read once: reading it means setting it)."""
    if not _UMASK:
        current = os.umask(0o022)
        os.umask(current)
        _UMASK.append(current)
    return _UMASK[0]


def write_text(path: str | os.PathLike, text: str) -> Path:
    data = text.encode("utf-8")
    return atomic_file(path, lambda fh: fh.write(data))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2) + "\n")


# -- the environment record ----------------------------------------------------------


def weights_hash(model) -> str:
    """sha256 over a model's parameters and buffers (names, dtypes, shapes and bytes, in
    name order): two runs with one hash ran on the same weights."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.hf_model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def invocation(function: str | None = None, arguments: dict | None = None) -> dict:
    """How a run was asked for: the process's command line, and for a Python call the
    function with its arguments as written (objects by their name or repr)."""
    out: dict = {"argv": list(sys.argv)}
    if function is not None:
        shown = ", ".join(f"{k}={_shown(v)}" for k, v in (arguments or {}).items())
        out["call"] = f"{function}({shown})"
    return out


def _shown(value) -> str:
    name = getattr(value, "name", None)
    if hasattr(value, "hf_model") and isinstance(name, str):  # a LoadedModel
        return repr(name)
    signature = getattr(value, "SIGNATURE", None)  # a task object
    if signature is not None:
        return repr(signature.name)
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def environment(model=None, *, seed: int | None = None, invocation: dict | None = None) -> dict:
    """The record of where a run ran: software versions, the model (name, weights hash,
    dtype, parameter count), the device, the seed, how it was asked for, and when (UTC)."""
    from circuitlang.report import versions

    record: dict = {"versions": versions(), "platform": platform.platform()}
    if model is not None:
        device = getattr(model, "device", None)
        record["model"] = {
            "name": model.name,
            "weights_sha256": weights_hash(model),
            "dtype": str(getattr(model, "dtype", "")).replace("torch.", ""),
            "parameters": int(sum(p.numel() for p in model.hf_model.parameters())),
        }
        record["device"] = _device_text(device)
    record["seed"] = seed
    record["invocation"] = invocation or {"argv": list(sys.argv)}
    record["time"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return record


def _device_text(device) -> str | None:
    if device is None:
        return None
    text = str(device)
    if text.startswith("cuda"):
        import torch

        text += f" ({torch.cuda.get_device_name(device)})"
    return text


# -- writing a check's folder -----------------------------------------------------------


def check_out_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """A folder a run can be written to, checked before the run (before weights load).

    It must not exist yet, or be an empty folder; the folders above it are created
    when missing, and the nearest one that exists must take new files.

    Raises:
        RunDirError: what is wrong with the path.
    """
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        raise RunDirError(f"{option} {path}: is a file", code="runs.out",
                          hint="name a new folder for the run, e.g. runs/ioi-seed0")
    if target.is_dir() and any(target.iterdir()):
        raise RunDirError(f"{option} {path}: the folder is not empty", code="runs.exists",
                          hint="name a new folder (each run gets its own), or delete this one")
    parent = target.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RunDirError(f"{option} {path}: {parent} is not a folder", code="runs.out",
                          hint="name a folder path for the run")
    try:
        tempfile.TemporaryDirectory(dir=parent, prefix=".circuitlang-probe-").cleanup()
    except OSError as exc:
        raise RunDirError(f"{option} {path}: cannot write in {parent} ({exc.strerror})", code="runs.out",
                          hint="choose a folder you can write to") from None
    return target


def save_check(out: str | os.PathLike, *, result, hypothesis, source: str | None, model,
               options: dict, call: dict | None = None, figures: bool = True) -> Path:
    """Write a check's run directory (the layout in the module docstring), atomically.

    Args:
        out: the folder to create (see `check_out_dir`).
        result: the `CheckResult`.
        hypothesis: the resolved `Hypothesis` that was checked.
        source: the program text, or None to print it from the IR.
        model: the `LoadedModel` it ran on (for the environment record).
        options: the run's options as given (JSON-able).
        call: `invocation(...)`; by default the command line.
        figures: draw the figures (skipped, with the reason, without matplotlib).

    Returns:
        The folder.
    """
    target = check_out_dir(out)
    parent = target.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=parent))
    try:
        if source is None:
            from circuitlang.ir_to_ast import ir_to_ast
            from circuitlang.printer import format

            source = format(ir_to_ast(hypothesis))
        write_text(tmp / "program.circ", source)
        write_json(tmp / "ir.json", hypothesis.to_json())
        write_json(tmp / "result.json", result.to_json())
        _write_per_prompt(tmp / "per_prompt.npz", result)
        write_text(tmp / "report.txt", result.render() + "\n")
        write_json(tmp / "environment.json", environment(model, seed=result.seed, invocation=call))
        drawn, skipped = _write_figures(tmp / "figures", hypothesis, result) if figures else ([], "not asked for")
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        write_json(tmp / "run.json", {"kind": "check", "format": FORMAT, "options": _plain(options),
                                      "files": files + ["run.json"], "figures": drawn,
                                      "figures_skipped": skipped})
        os.chmod(tmp, 0o777 & ~_umask())
        if target.is_dir():  # an empty folder the user made: the rename replaces it
            target.rmdir()
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_per_prompt(path: Path, result) -> None:
    import numpy as np

    arrays = {}
    per_prompt = getattr(result, "per_prompt", None)
    if per_prompt is not None:
        for name in per_prompt.COLUMNS:
            arrays[name] = np.asarray(getattr(per_prompt, name), dtype=np.float64)
        arrays["texts"] = np.asarray(list(per_prompt.texts), dtype=str)
    for k, exp in enumerate(result.experiments):
        arrays[f"experiment_{k}"] = np.asarray(exp.per_prompt, dtype=np.float64)
    atomic_file(path, lambda fh: np.savez(fh, **arrays))


def _write_figures(folder: Path, hypothesis, result) -> tuple[list[str], str | None]:
    """A check's circuit diagram and one heatmap per two-axis sweep."""
    def draw(figures):
        if hypothesis.claims:
            yield "circuit.svg", lambda: figures.circuit_diagram(hypothesis, check=result)
        for k, exp in enumerate(result.experiments):
            if exp.grid and len(exp.grid) == 2:
                yield f"experiment-{k}.svg", lambda exp=exp: figures.sweep_heatmap(exp)

    return draw_figures(folder, draw)


def discovery_figures(folder: str | os.PathLike, result) -> tuple[list[str], str | None]:
    """A discovery's circuit diagram and, for a ranking method, its faithfulness curve."""
    def draw(figures):
        yield "circuit.svg", lambda: figures.circuit_diagram(result)
        if result.curve is not None:
            yield "curve.svg", lambda: figures.faithfulness_curves(result)

    return draw_figures(Path(folder), draw)


def draw_figures(folder: Path, draw) -> tuple[list[str], str | None]:
    """Save each (file name, figure maker) that `draw(circuitlang.figures)` yields into
    `folder`, atomically; gives (the files drawn, relative to the run, or the reason none
    or not all were: matplotlib or the figure functions missing, a figure that cannot be
    drawn)."""
    try:
        from circuitlang import figures
        from circuitlang.figures import FigureError
    except ImportError as exc:
        return [], f"the figure functions are not available ({exc})"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return [], "matplotlib is not installed (pip install 'circuitlang[figures]')"
    drawn = []
    try:
        for name, make in draw(figures):
            svg = figures.svg_text(make())
            write_text(folder / name, svg)
            drawn.append(f"{folder.name}/{name}")
    except FigureError as exc:
        return drawn, exc.message
    return drawn, None


def _plain(value):
    """Options as JSON keeps them (objects by name)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return _shown(value).strip("'")


# -- reading a folder back -------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """A finished run read back from its folder (no model, nothing recomputed).

    Attributes:
        path: the folder.
        kind: "check" or "discover".
        meta: run.json (a discovery's: what the run is, as it resumes).
        environment: environment.json ({} for a folder from before it was written).
        result: result.json.
    """

    path: Path
    kind: str
    meta: dict
    environment: dict
    result: dict

    def check_result(self):
        """The `CheckResult` of a check run (of a discovery's re-check: None)."""
        if self.kind != "check":
            return None
        from circuitlang.report import CheckResult

        return CheckResult.from_json(self.result)

    def render(self) -> str:
        """The report the run printed: a check's re-rendered from result.json, a
        discovery's as it was written."""
        if self.kind == "check":
            return self.check_result().render()
        report = self.path / "report.txt"
        if report.is_file():
            return report.read_text(encoding="utf-8").rstrip("\n")
        r = self.result  # a discovery from before report.txt was written
        f = r["faithfulness"]
        return (f"{r['method']} on {r['model']}, task {r['task']}, n={r['n']}, seed={r['seed']}: "
                f"{r['n_edges']} of {r['candidates']} edges, faithfulness {f['value']:.3f} "
                f"[{f['low']:.3f}, {f['high']:.3f}]")


def load_run(path: str | os.PathLike) -> Run:
    """Read a finished run directory.

    Raises:
        RunDirError: no such folder, not a run directory, or a discovery that has not
            finished (checkpoints only).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise RunDirError(f"no run directory {str(path)!r}", code="runs.not-found",
                          hint="pass a folder written by `circuitlang check --out` or `discover --out`")
    meta = _read_json(folder / "run.json", path)
    if meta is None:
        raise RunDirError(f"{str(path)!r} is not a run directory (it has no run.json)", code="runs.not-a-run",
                          hint="pass a folder written by `circuitlang check --out` or `discover --out`")
    if meta.get("kind") == "check":
        kind = "check"
        if meta.get("format", 0) > FORMAT:
            raise RunDirError(f"{str(path)!r} was written by a newer circuitlang (format {meta['format']})",
                              code="runs.format", hint="upgrade circuitlang to read it")
    elif "method" in meta:
        kind = "discover"
    else:
        raise RunDirError(f"{str(path)!r}: run.json does not say what kind of run it is", code="runs.not-a-run",
                          hint="pass a folder written by `circuitlang check --out` or `discover --out`")
    result = _read_json(folder / "result.json", path)
    if result is None:
        raise RunDirError(f"{str(path)!r} holds a run that has not finished (no result.json)",
                          code="runs.unfinished",
                          hint="continue it with `circuitlang discover ... --out DIR --resume`"
                          if kind == "discover" else "run it again")
    return Run(folder, kind, meta, _read_json(folder / "environment.json", path) or {}, result)


def _read_json(file: Path, run) -> Any | None:
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{str(run)!r}: cannot read {file.name} ({exc})", code="runs.corrupt",
                          hint="the folder was changed by hand or damaged; run it again") from None


# -- the numbers of a run, and what moved between two ----------------------------------


def headline(run: Run) -> dict:
    """A run's headline numbers, flat (the tracking summary): for a check, % recovered
    with its interval, the three means, the p-value, whether it holds, and each claim's
    cost; for a discovery, the edge count, faithfulness with its interval, CPR/CMD and
    the re-check's % recovered."""
    r = run.result
    if run.kind == "check":
        out = {"recovered": r.get("recovered"), "recovered_low": r["ci"].get("low"),
               "recovered_high": r["ci"].get("high"), "clean": r.get("clean"), "scrubbed": r.get("scrubbed"),
               "random": r.get("random"), "p_value": r.get("p_value"), "holds": r.get("holds"),
               "n": r.get("n"), "seed": r.get("seed"), "passes": r.get("passes"), "seconds": r.get("seconds")}
        for c in r.get("claims", []):
            out[f"cost/{c['text']}"] = c.get("cost")
        for e in r.get("expectations", []):
            out[f"holds/{e['text']}"] = e.get("holds")
        return out
    f = r.get("faithfulness") or {}
    out = {"edges": r.get("n_edges"), "candidates": r.get("candidates"), "faithfulness": f.get("value"),
           "faithfulness_low": f.get("low"), "faithfulness_high": f.get("high"), "n": r.get("n"),
           "seed": r.get("seed")}
    if r.get("curve"):
        out["cpr"], out["cmd"] = r["curve"].get("cpr"), r["curve"].get("cmd")
    if r.get("check"):
        out["check_recovered"] = r["check"].get("recovered")
        out["holds"] = r["check"].get("holds")
    return out


@dataclass(frozen=True)
class Difference:
    """One number (or verdict) of two runs side by side.

    Attributes:
        what: its name ("recovered", "cost: head 1.0 at END depends on IO").
        a, b: the two runs' values as shown (with their intervals).
        moved: True when it moved beyond its intervals (or a verdict flipped, or it is
            in one run only).
        why: how that was decided, in words.
    """

    what: str
    a: str
    b: str
    moved: bool
    why: str = ""


def diff_runs(a: Run, b: Run) -> list[Difference]:
    """Every comparable number of two runs of one kind (docs/runs.md, "diff").

    A number with an interval in each run moved when the two intervals do not overlap
    (a value merely outside the other run's interval is what two draws of the same
    prompts' distribution give about one time in six; disjoint 95% intervals, about
    one in 150). A claim's cost has no interval of its own: it moved when it changed by
    more than the two runs' % recovered half-widths together.
    A p-value's interval is the binomial (Wilson, 95%) one over its random circuits (a
    point when the test was exact). An expectation moved when it holds in one run and
    fails in the other; a claim, expectation, experiment site or edge in one run only
    moved too. A sweep's site: its mean with +-1.96 standard errors over the prompts.

    Raises:
        RunDirError: runs of different kinds.
    """
    if a.kind != b.kind:
        raise RunDirError(f"cannot diff a {a.kind} run with a {b.kind} run", code="runs.diff-kinds",
                          hint="diff two check runs, or two discovery runs")
    return _diff_checks(a.result, b.result) if a.kind == "check" else _diff_discoveries(a.result, b.result)


def _diff_checks(ra: dict, rb: dict) -> list[Difference]:
    out = [_interval_diff("recovered", _iv(ra["recovered"], ra["ci"]), _iv(rb["recovered"], rb["ci"]), pct=True)]
    for name in ("clean", "scrubbed", "random"):
        out.append(_interval_diff(name, _iv(ra[name], ra["intervals"][name]), _iv(rb[name], rb["intervals"][name])))
    if ra.get("p_value") is not None or rb.get("p_value") is not None:
        out.append(_interval_diff("p_value", _p_interval(ra), _p_interval(rb)))
    scale = _half_width(ra) + _half_width(rb)
    claims_a = {c["text"]: c for c in ra.get("claims", [])}
    claims_b = {c["text"]: c for c in rb.get("claims", [])}
    for text in dict.fromkeys([*claims_a, *claims_b]):
        what = f"cost: {text}"
        if text not in claims_a or text not in claims_b:
            out.append(_one_sided(what, claims_a.get(text), claims_b.get(text), lambda c: _pct(c.get("cost"))))
            continue
        ca, cb = claims_a[text].get("cost"), claims_b[text].get("cost")
        if ca is None or cb is None:
            out.append(Difference(what, _pct(ca), _pct(cb), (ca is None) != (cb is None), "measured in one run only"))
            continue
        moved = abs(ca - cb) > scale
        out.append(Difference(what, _pct(ca), _pct(cb), moved,
                              f"changed by {_pct(abs(ca - cb))}, {'more' if moved else 'less'} than "
                              f"% recovered's half-widths together ({_pct(scale)})"))
    exp_a = {e["text"]: e for e in ra.get("expectations", [])}
    exp_b = {e["text"]: e for e in rb.get("expectations", [])}
    for text in dict.fromkeys([*exp_a, *exp_b]):
        what = f"expect: {text.removeprefix('expect ')}"
        if text not in exp_a or text not in exp_b:
            out.append(_one_sided(what, exp_a.get(text), exp_b.get(text), _verdict))
            continue
        ea, eb = exp_a[text], exp_b[text]
        flipped = bool(ea["holds"]) != bool(eb["holds"])
        out.append(Difference(what, _verdict(ea), _verdict(eb), flipped, "flipped" if flipped else "same verdict"))
    experiments_b = {e["text"]: e for e in rb.get("experiments", [])}
    for ea in ra.get("experiments", []):
        eb = experiments_b.pop(ea["text"], None)
        if eb is None:
            out.append(Difference(f"experiment: {ea['text']}", "run", "-", True, "in one run only"))
            continue
        out += _experiment_diff(ea, eb)
    for text in experiments_b:
        out.append(Difference(f"experiment: {text}", "-", "run", True, "in one run only"))
    return out


def _diff_discoveries(ra: dict, rb: dict) -> list[Difference]:
    fa, fb = ra["faithfulness"], rb["faithfulness"]
    out = [_interval_diff("faithfulness", (fa["value"], fa["low"], fa["high"]),
                          (fb["value"], fb["low"], fb["high"]))]
    edges_a = {(e["sender"], e["receiver"], e["position"]) for e in ra.get("edges", [])}
    edges_b = {(e["sender"], e["receiver"], e["position"]) for e in rb.get("edges", [])}
    only_a, only_b = len(edges_a - edges_b), len(edges_b - edges_a)
    out.append(Difference("edges", str(len(edges_a)), str(len(edges_b)), bool(only_a or only_b),
                          f"{only_a} in A only, {only_b} in B only"))
    ca, cb = ra.get("check"), rb.get("check")
    if ca and cb:
        out.append(_interval_diff("check: recovered", (ca["recovered"], *ca["ci"]), (cb["recovered"], *cb["ci"]),
                                  pct=True))
        flipped = bool(ca["holds"]) != bool(cb["holds"])
        out.append(Difference("check: holds", _verdict(ca), _verdict(cb), flipped,
                              "flipped" if flipped else "same verdict"))
    return out


def _iv(value, bounds) -> tuple:
    return value, bounds.get("low"), bounds.get("high")


def _half_width(r: dict) -> float:
    low, high = r["ci"].get("low"), r["ci"].get("high")
    return 0.0 if low is None or high is None else (high - low) / 2


def _p_interval(r: dict) -> tuple:
    """The p-value with a 95% Wilson interval over its K random circuits."""
    p, k = r.get("p_value"), len(r.get("null_scores") or ())
    if p is None or k == 0 or r.get("null_exact"):
        return p, p, p
    z = 1.96
    centre = (p + z * z / (2 * k)) / (1 + z * z / k)
    half = z * ((p * (1 - p) / k + z * z / (4 * k * k)) ** 0.5) / (1 + z * z / k)
    return p, max(0.0, centre - half), min(1.0, centre + half)


def _interval_diff(what: str, a: tuple, b: tuple, *, pct: bool = False) -> Difference:
    show = _pct if pct else _fmt
    (va, la, ha), (vb, lb, hb) = a, b

    def text(v, lo, hi):
        return show(v) if lo is None or hi is None else f"{show(v)} [{show(lo)}, {show(hi)}]"

    if va is None or vb is None:
        moved = (va is None) != (vb is None)
        return Difference(what, text(va, la, ha), text(vb, lb, hb), moved,
                          "measured in one run only" if moved else "measured in neither")
    if la is None and lb is None:
        return Difference(what, text(*a), text(*b), va != vb, "changed" if va != vb else "unchanged")
    # a run without an interval counts as its point
    la, ha = (va, va) if la is None or ha is None else (la, ha)
    lb, hb = (vb, vb) if lb is None or hb is None else (lb, hb)
    if hb < la:
        return Difference(what, text(*a), text(*b), True, "B's interval lies below A's")
    if lb > ha:
        return Difference(what, text(*a), text(*b), True, "B's interval lies above A's")
    return Difference(what, text(*a), text(*b), False, "the intervals overlap")


def _experiment_diff(ea: dict, eb: dict) -> list[Difference]:
    """Each site of an experiment in both runs, as a mean with +-1.96 SE over prompts."""
    import numpy as np

    def sites(e):
        values = np.asarray([np.nan if v is None else v for v in np.ravel(np.asarray(e["values"], dtype=object))],
                            dtype=float)
        per_prompt = e.get("per_prompt")
        se = np.full(len(values), np.nan)
        if per_prompt:
            rows = np.asarray(per_prompt, dtype=object).astype(float).reshape(len(values), -1)
            if rows.shape[1] > 1:
                se = np.nanstd(rows, axis=1, ddof=1) / np.sqrt(rows.shape[1])
        return dict(zip(e["sites"], zip(values, se)))

    a, b = sites(ea), sites(eb)
    out = []
    for site in dict.fromkeys([*a, *b]):
        what = f"{ea['text']}: {site}"
        if site not in a or site not in b:
            out.append(Difference(what, "run" if site in a else "-", "run" if site in b else "-", True,
                                  "in one run only"))
            continue
        (va, sa), (vb, sb) = a[site], b[site]
        if np.isnan(va) and np.isnan(vb):
            continue  # no path in either
        bounds_a = (None, None) if np.isnan(sa) else (va - 1.96 * sa, va + 1.96 * sa)
        bounds_b = (None, None) if np.isnan(sb) else (vb - 1.96 * sb, vb + 1.96 * sb)
        out.append(_interval_diff(what, (None if np.isnan(va) else float(va), *bounds_a),
                                  (None if np.isnan(vb) else float(vb), *bounds_b)))
    return out


def _one_sided(what: str, a, b, show) -> Difference:
    return Difference(what, "-" if a is None else show(a), "-" if b is None else show(b), True,
                      "in A only" if b is None else "in B only")


def _verdict(e: dict) -> str:
    return "holds" if e.get("holds") else "FAILS"


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def render_diff(diffs: list[Difference], a: Run, b: Run, *, every: bool = False) -> str:
    """The diff as a table of the numbers that moved (with `every`, of every number
    compared), under a line naming each run."""

    def about(letter: str, run: Run) -> str:
        r = run.result
        return (f"{letter}: {run.path}   {run.kind}, model {r.get('model')}, task {r.get('task')}, "
                f"n={r.get('n')}, seed={r.get('seed')}")

    lines = [about("A", a), about("B", b)]
    hashes = [r.environment.get("model", {}).get("weights_sha256") for r in (a, b)]
    if None not in hashes and hashes[0] != hashes[1]:
        lines.append("note: the runs used different weights (their hashes differ)")
    moved = [d for d in diffs if d.moved]
    shown = diffs if every else moved
    if shown:
        width = max(len(d.what) for d in shown)
        wa = max(len(d.a) for d in shown)
        wb = max(len(d.b) for d in shown)
        lines += ["", f"  {'':<{width}}  {'A':<{wa}}  {'B':<{wb}}"]
        for d in shown:
            mark = "MOVED" if d.moved else "     "
            lines.append(f"  {d.what:<{width}}  {d.a:<{wa}}  {d.b:<{wb}}  {mark} {d.why}")
    lines += ["", f"{len(moved)} of {len(diffs)} numbers moved beyond their intervals" if moved
              else f"nothing moved beyond its interval ({len(diffs)} numbers compared)"]
    return "\n".join(lines)
