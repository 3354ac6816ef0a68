"""A run directory: a long discovery's checkpoints and results, written atomically.

Takes a folder; gives a place where each step of a run leaves its work, so that a run
killed at any moment (`kill -9` included) resumes with `--resume` without redoing what
finished. Every file is written to a temporary name in the same folder and renamed
over the old one, so a reader sees either the previous version or the new one, never
half a file.

Layout: `run.json` (what the run is: method, model, task, its parameters, prompts and
seed, options, batch size; a resumed run must match it), one `NAME.json` / `NAME.pt`
per checkpoint, and the results: `environment.json` (the record `circuitlang check
--out` writes too: versions, model hash, seed, command line, time), `report.txt`,
`figures/` (circuit.svg, curve.svg; when matplotlib is installed), `found.circ` and,
last, `result.json`, whose presence marks the run finished for
`circuitlang show` and `circuitlang diff` (`circuitlang.runs`). Files are written
by `circuitlang.runs.atomic_file`, the writer check's run directories use.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from circuitlang.errors import DiscoveryError
from circuitlang.runs import atomic_file

__all__ = ["RunDir"]


class RunDir:
    """Checkpoints under one folder (see the module docstring).

    Args:
        path: the folder (created if missing).
        spec: what the run is (JSON-able); with `resume`, it must equal the saved one.
        resume: keep the checkpoints a previous run of the same spec left.

    Raises:
        DiscoveryError: the folder holds another run, or a run exists and `resume` is off.
    """

    def __init__(self, path: str | os.PathLike, spec: dict, *, resume: bool = False):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DiscoveryError(f"cannot create run directory {str(self.path)!r}: {exc.strerror}",
                                 code="discover.rundir", hint="choose a writable folder") from exc
        if not os.access(self.path, os.W_OK):
            raise DiscoveryError(f"run directory {str(self.path)!r} is not writable", code="discover.rundir",
                                 hint="choose a writable folder")
        spec = json.loads(json.dumps(spec))
        saved = self.path / "run.json"
        if saved.is_file():
            old = json.loads(saved.read_text())
            if not resume:
                raise DiscoveryError(f"{str(self.path)!r} already holds a run", code="discover.rundir-exists",
                                     hint="pass --resume to continue it, or choose another --out folder")
            if old != spec:
                changed = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
                raise DiscoveryError(f"{str(self.path)!r} holds a different run (it differs in "
                                     f"{', '.join(changed)})", code="discover.rundir-mismatch",
                                     hint="resume with the same options, or choose another --out folder")
        else:
            self.write_json("run", spec)
        self.spec = spec

    def _atomic(self, name: str, write) -> Path:
        return atomic_file(self.path / name, write)  # the one atomic writer, shared with check --out

    def write_json(self, name: str, data: Any) -> Path:
        text = (json.dumps(data, indent=2) + "\n").encode()
        return self._atomic(f"{name}.json", lambda fh: fh.write(text))

    def read_json(self, name: str) -> Any | None:
        path = self.path / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> Path:
        return self._atomic(f"{name}.pt", lambda fh: torch.save({k: v.detach().cpu() for k, v in tensors.items()}, fh))

    def read_tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        path = self.path / f"{name}.pt"
        if not path.is_file():
            return None
        return torch.load(path, weights_only=True)

    def write_text(self, name: str, text: str) -> Path:
        data = text.encode()
        return self._atomic(name, lambda fh: fh.write(data))
