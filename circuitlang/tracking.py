"""Experiment tracking: a run directory's record, logged where researchers keep runs.

Takes a finished run directory (`circuitlang.runs`) and gives a Weights & Biases run
holding the same record: the config is the environment record and the options, the
summary the headline numbers (`runs.headline`), and the folder itself (result JSON,
per-prompt values, program, figures) an artifact, with result.json and the figures
also saved as the run's files. wandb is a soft dependency (`pip install
'circuitlang[tracking]'`): asking for it without it installed is an error with that
hint, raised before the check starts. Its own settings apply as usual
(`WANDB_MODE=offline`, `WANDB_DIR`, `WANDB_PROJECT`, ...).
"""
from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

from circuitlang.errors import CircuitlangError

__all__ = ["TrackingError", "log_run", "wandb_settings"]

DEFAULT_PROJECT = "circuitlang"


class TrackingError(CircuitlangError):
    """Tracking was asked for and cannot be done (its library missing, bad settings)."""

    stage = "tracking"


def wandb_settings(spec) -> dict:
    """`wandb=` as `wandb.init` arguments: True (defaults), a project name, or a dict.

    Raises:
        TrackingError: wandb is not installed, or `spec` is none of those.
    """
    if not _wandb_installed():
        raise TrackingError("--wandb needs the wandb package, which is not installed", code="tracking.missing",
                            hint="pip install 'circuitlang[tracking]' (or pip install wandb)")
    if spec is True:
        return {}
    if isinstance(spec, str) and spec:
        return {"project": spec}
    if isinstance(spec, dict):
        return dict(spec)
    raise TrackingError(f"wandb={spec!r} is not a tracking setting", code="tracking.settings",
                        hint="pass True, a project name, or a dict of wandb.init arguments")


def _wandb_installed() -> bool:
    return importlib.util.find_spec("wandb") is not None


def log_run(folder: str | Path, settings: dict | None = None) -> str:
    """Log a finished run directory to Weights & Biases as one wandb run.

    Args:
        folder: a run directory (`circuitlang.runs.load_run` must accept it).
        settings: `wandb.init` arguments (project, entity, name, tags, ...).

    Returns:
        The wandb run's local folder (its files, as wandb keeps them).
    """
    import wandb

    from circuitlang.runs import headline, load_run

    run = load_run(folder)
    folder = Path(folder)
    init = {"project": DEFAULT_PROJECT, "job_type": run.kind,
            "config": {"environment": run.environment, "options": run.meta.get("options", run.meta)},
            **(settings or {})}
    with wandb.init(**init) as tracked:
        tracked.summary.update(headline(run))
        artifact = wandb.Artifact(_artifact_name(run), type="circuitlang-run",
                                  metadata={"kind": run.kind, "model": run.result.get("model"),
                                            "task": run.result.get("task")})
        artifact.add_dir(str(folder))
        tracked.log_artifact(artifact)
        # copies in the run's own folder, which wandb uploads at the end (wandb.save would
        # link to the run directory, which may be a temporary one)
        for name in ["result.json", "environment.json", *run.meta.get("figures", [])]:
            if (folder / name).is_file():
                copy = Path(tracked.dir) / name
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(folder / name, copy)
        return str(Path(tracked.dir))


def _artifact_name(run) -> str:
    text = f"{run.kind}-{run.result.get('model', '')}-{run.result.get('task', '')}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or run.kind
