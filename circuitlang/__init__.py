"""circuitlang: circuit hypotheses as small programs, checked with causal scrubbing.

The public API is the names in `__all__`. They are imported lazily, so that
`import circuitlang` stays cheap (no torch until a model is touched) and nothing
happens at import time.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "parse": "circuitlang.text_to_ast",
    "format": "circuitlang.printer",
    "resolve": "circuitlang.ast_to_ir",
    "load_model": "circuitlang.models",
    "load_task": "circuitlang.tasks",
    "check": "circuitlang.checker",
    "run": "circuitlang.checker",
    "discover": "circuitlang.discover",
    "CircuitlangError": "circuitlang.errors",
    "ParseError": "circuitlang.errors",
    "ResolveError": "circuitlang.errors",
    "ModelError": "circuitlang.errors",
    "TaskError": "circuitlang.errors",
    "ExecutionError": "circuitlang.errors",
    "DiscoveryError": "circuitlang.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'circuitlang' has no attribute {name!r}")
    if module == f"circuitlang.{name}":  # a package that is its own function (discover)
        return importlib.import_module(module)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
