"""Locates the files that ship with circuitlang: the grammar and the stdlib.

In a source checkout they are the top-level `grammar/` and `stdlib/` folders; in an
installed wheel they are the packages `circuitlang._grammar` and `circuitlang._stdlib`
(see setup.py). Everything else asks this module, never a hard-coded path.
"""
from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def _folder(repo_name: str, package: str) -> Path:
    in_repo = _REPO_ROOT / repo_name
    if in_repo.is_dir() and (_REPO_ROOT / "pyproject.toml").is_file():
        return in_repo
    # the shipped folders have no __init__.py (namespace packages), for which
    # importlib.resources.files() gives a MultiplexedPath that str() does not unwrap
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(str(importlib.resources.files(package)))


def grammar_dir() -> Path:
    """The folder holding the `.lark` grammar files."""
    return _folder("grammar", "circuitlang._grammar")


def stdlib_dir() -> Path:
    """The folder holding the stdlib `.circ` files (`use stdlib.NAME` reads NAME.circ)."""
    return _folder("stdlib", "circuitlang._stdlib")
