"""A sweep directory: the spec, one JSON per finished item, and the summary.

Takes a `Spec` and a folder; gives the folder a sweep writes into and reads back::

    spec.toml         the spec as given (copied in; a resumed sweep's replaces it)
    sweep.json        what the folder is: kind "sweep", format, the spec's name and
                      path, every item's key and settings (the grid), the environment
                      of the process that launched it (`circuitlang.runs.environment`)
    items/KEY.json    one finished item (`Worker.run`'s record): settings, status,
                      result, environment, where it ran; KEY is `spec.item_key`
    summary.txt       the table across the grid, written when the sweep ends

Every file is written with `circuitlang.runs.atomic_file` (by the process that runs
the sweep, the Ray driver included), so a kill at any moment leaves each item's file
whole or absent: `resume` keeps every item whose file says `ok`, and runs the rest.
"""
from __future__ import annotations

import json
from pathlib import Path

from circuitlang.sweeps.spec import SweepError

__all__ = ["FORMAT", "SweepDir"]

#: the layout version written in sweep.json
FORMAT = 1


class SweepDir:
    """The folder of one sweep (see the module docstring).

    Use `SweepDir.create(path, spec, resume=...)` to start or continue one, and
    `SweepDir.open(path)` to read one back (`circuitlang sweep --summary`).
    """

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.meta = meta

    @classmethod
    def create(cls, path, spec, *, resume: bool = False, spec_path=None, call: dict | None = None) -> SweepDir:
        """Start a sweep in a new (or empty) folder, or continue the one there.

        Args:
            path: the folder.
            spec: the parsed `Spec`.
            resume: continue a sweep already in `path` (its finished items are kept).
            spec_path: where the spec was read from (recorded).
            call: `circuitlang.runs.invocation(...)`; by default the command line.

        Raises:
            SweepError: without `resume`, a folder that is not empty; with it, a folder
                that holds no sweep.
            RunDirError: a folder that cannot be written.
        """
        from circuitlang.runs import check_out_dir, environment, write_json, write_text

        target = Path(path).expanduser()
        if resume:
            if not (target / "sweep.json").is_file():
                raise SweepError(f"--resume {path}: no sweep there (no sweep.json)", code="sweep.resume",
                                 hint="pass the folder of the interrupted sweep, or drop --resume to start one")
        elif target.is_dir() and any(target.iterdir()):
            hint = ("continue it with --resume" if (target / "sweep.json").is_file()
                    else "name a new folder with --out, or delete this one")
            raise SweepError(f"--out {path}: the folder is not empty", code="sweep.exists", hint=hint)
        else:
            check_out_dir(target, "--out")
        meta = {"kind": "sweep", "format": FORMAT, "name": spec.name,
                "spec": None if spec_path is None else str(Path(spec_path).absolute()),
                "axes": list(spec.axes),
                "items": [{"key": i.key, "kind": i.kind, "settings": i.settings} for i in spec.items],
                "environment": environment(invocation=call)}
        (target / "items").mkdir(parents=True, exist_ok=True)
        write_text(target / "spec.toml", spec.text)
        write_json(target / "sweep.json", meta)
        return cls(target, meta)

    @classmethod
    def open(cls, path) -> SweepDir:
        """Read a sweep directory back (nothing recomputed).

        Raises:
            SweepError: no such folder, or one without a readable sweep.json.
        """
        target = Path(path).expanduser()
        meta = _read(target / "sweep.json")
        if not isinstance(meta, dict) or meta.get("kind") != "sweep":
            raise SweepError(f"{str(path)!r} is not a sweep directory (no readable sweep.json)",
                             code="sweep.not-found", hint="pass a folder written by `circuitlang sweep`")
        return cls(target, meta)

    def item_file(self, key: str) -> Path:
        return self.path / "items" / f"{key}.json"

    def write(self, record: dict) -> Path:
        """Store one item's record, atomically."""
        from circuitlang.runs import write_json

        return write_json(self.item_file(record["key"]), record)

    def record(self, key: str) -> dict | None:
        """An item's stored record, or None when it has none (or a damaged one)."""
        try:
            return _read(self.item_file(key))
        except SweepError:
            return None

    def finished(self) -> dict[str, dict]:
        """The grid's items that finished without an error: key -> record."""
        out = {}
        for entry in self.meta["items"]:
            record = self.record(entry["key"])
            if record is not None and record.get("status") == "ok":
                out[entry["key"]] = record
        return out

    def records(self) -> list[tuple[dict, dict | None]]:
        """Every item of the grid, in grid order, with its record (None: not run yet)."""
        return [(entry, self.record(entry["key"])) for entry in self.meta["items"]]

    def write_summary(self, text: str) -> Path:
        from circuitlang.runs import write_text

        return write_text(self.path / "summary.txt", text + "\n")


def _read(file: Path):
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SweepError(f"cannot read {file} ({exc})", code="sweep.corrupt",
                         hint="the file was changed by hand or damaged; delete it and run with --resume") from None
