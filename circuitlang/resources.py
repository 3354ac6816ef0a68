"""Locates the files that ship with circuitlang: the grammar and the stdlib.

In a source checkout they are the top-level `grammar/` and `stdlib/` folders; in an
installed wheel they are the packages `circuitlang._grammar` and `circuitlang._stdlib`
(see setup.py). Everything else asks this module, never a hard-coded path.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def _folder(repo_name: str, package: str) -> Path:
    in_repo = _REPO_ROOT / repo_name
    if in_repo.is_dir() and (_REPO_ROOT / "pyproject.toml").is_file():
        return in_repo
    return Path(str(importlib.resources.files(package)))


def grammar_dir() -> Path:
    """The folder holding the `.lark` grammar files."""
    return _folder("grammar", "circuitlang._grammar")


def stdlib_dir() -> Path:
    """The folder holding the stdlib `.circ` files (`use stdlib.NAME` reads NAME.circ)."""
    return _folder("stdlib", "circuitlang._stdlib")
