"""A sweep's summary: the grid's records in, a table across the grid out.

Takes the (item, record) pairs of a sweep directory (`SweepDir.records`); gives the
text `circuitlang sweep` prints at the end and `circuitlang sweep --summary DIR`
prints again without recomputing: one table per kind of item (checks, discoveries)
with a column per setting that varies across the grid and the headline numbers
(`circuitlang.runs.headline`: a check's % recovered with its interval, p-value and
verdict; a discovery's edges, faithfulness with its interval, CPR, CMD and its
re-check), then, when the grid has more than one seed, the same numbers over seeds
(mean, standard deviation, range, how many hold). Items not run yet read `pending`;
items that raised read `error` with their message below the table.
"""
from __future__ import annotations

import math
from pathlib import Path
from statistics import mean, stdev

__all__ = ["holds_all", "render_summary"]

_HIDDEN = ("kind", "file_sha256")


def holds_all(records: list[tuple[dict, dict | None]]) -> bool:
    """Every item finished, and every check (and discovery re-check) holds."""
    for _, record in records:
        if record is None or record.get("status") != "ok":
            return False
        numbers = _headline(record)
        if numbers.get("holds") is False:
            return False
    return True


def _headline(record: dict) -> dict:
    from circuitlang.runs import Run, headline

    return headline(Run(Path("."), record["kind"], {}, record.get("environment") or {}, record["result"]))


def render_summary(name: str, records: list[tuple[dict, dict | None]]) -> str:
    """The summary table of a sweep (see the module docstring)."""
    done = sum(1 for _, r in records if r is not None and r.get("status") == "ok")
    failed = sum(1 for _, r in records if r is not None and r.get("status") == "error")
    lines = [f"sweep {name}: {len(records)} items, {done} finished"
             + (f", {failed} failed" if failed else "") + (f", {len(records) - done - failed} pending"
                                                          if len(records) - done - failed else "")]
    for kind in ("check", "discover"):
        rows = [(e, r) for e, r in records if e["kind"] == kind]
        if rows:
            lines += ["", *_table(kind, rows)]
            if len({e["settings"]["seed"] for e, _ in rows}) > 1:
                lines += ["", *_over_seeds(kind, rows)]
    errors = [(e, r) for e, r in records if r is not None and r.get("status") == "error"]
    if errors:
        lines += ["", "errors:"]
        for e, r in errors:
            err = r.get("error") or {}
            lines.append(f"  {e['key']}: {err.get('type')}: {err.get('message')}")
    return "\n".join(lines)


def _varying(rows, skip=()) -> list[str]:
    keys = list(dict.fromkeys(k for e, _ in rows for k in _flat(e) if k not in _HIDDEN and k not in skip))
    out = [k for k in keys if len({_show(_flat(e).get(k)) for e, _ in rows}) > 1]
    if not out:  # one item: still say what it is
        out = [k for k in ("file", "method", "model", "seed") if k in keys and k not in skip]
    return sorted(out, key=lambda k: k == "seed")  # seeds last: the replicates of a row above


def _flat(entry: dict) -> dict:
    """An item's settings with each task parameter a setting of its own (a column)."""
    settings = dict(entry["settings"])
    for name, value in (settings.pop("task_params", None) or {}).items():
        settings[name] = value
    return settings


def _show(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return ",".join(f"{k}={_show(v)}" for k, v in sorted(value.items())) or "-"
    if isinstance(value, list):
        return ",".join(_show(v) for v in value)
    return str(value)


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _numbers(kind: str, record: dict | None) -> list[str]:
    width = 4 if kind == "check" else 5
    if record is None:
        return ["pending"] + [""] * (width - 1)
    if record.get("status") != "ok":
        return ["error"] + [""] * (width - 1)
    h = _headline(record)
    if kind == "check":
        return [_pct(h["recovered"]), f"[{_pct(h['recovered_low'])}, {_pct(h['recovered_high'])}]",
                "-" if h.get("p_value") is None else f"{h['p_value']:.3g}",
                "holds" if h.get("holds") else "FAILS"]
    faithful = f"{_num(h['faithfulness'])} [{_num(h['faithfulness_low'])}, {_num(h['faithfulness_high'])}]"
    check = "-" if h.get("check_recovered") is None else (
        f"{_pct(h['check_recovered'])} {'holds' if h.get('holds') else 'FAILS'}")
    return [f"{h['edges']}/{h['candidates']}", faithful, _num(h.get("cpr")), _num(h.get("cmd")), check]


def _table(kind: str, rows) -> list[str]:
    columns = _varying(rows)
    head = (["recovered", "95% CI", "p", "verdict"] if kind == "check"
            else ["kept", "faithfulness [95% CI]", "CPR", "CMD", "check"])
    body = [[_show(_flat(e).get(c)) for c in columns] + _numbers(kind, r) for e, r in rows]
    title = "checks" if kind == "check" else "discoveries"
    return [f"{title}:", *_grid(columns + head, body)]


def _over_seeds(kind: str, rows) -> list[str]:
    columns = _varying(rows, skip=("seed",))
    groups: dict[tuple, list] = {}
    for e, r in rows:
        groups.setdefault(tuple(_show(_flat(e).get(c)) for c in columns), []).append(r)
    what = "recovered" if kind == "check" else "faithfulness"
    body = []
    for label, records in groups.items():
        finished = [_headline(r) for r in records if r is not None and r.get("status") == "ok"]
        values = [h[what] for h in finished if h.get(what) is not None]
        verdicts = [h.get("holds") for h in finished if h.get("holds") is not None]
        show = _pct if kind == "check" else _num
        body.append([*label, f"{len(finished)}/{len(records)}",
                     show(mean(values)) if values else "n/a",
                     show(stdev(values)) if len(values) > 1 else "n/a",
                     f"{show(min(values))} .. {show(max(values))}" if values else "n/a",
                     f"{sum(bool(v) for v in verdicts)}/{len(verdicts)}" if verdicts else "-"])
    return [f"{'checks' if kind == 'check' else 'discoveries'} over seeds:",
            *_grid(columns + ["seeds", f"mean {what}", "sd", "range", "holds"], body)]


def _grid(head: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(head[i]), *(len(row[i]) for row in body)) if body else len(head[i]) for i in range(len(head))]
    fmt = lambda row: "  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
    return [fmt(head), fmt(["-" * w for w in widths]), *(fmt(row) for row in body)]
