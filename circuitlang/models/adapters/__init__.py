"""Architecture adapters: the only place module paths appear.

Takes a HF `config.model_type`; gives the `Adapter` subclass that knows that
architecture's modules. See `base.py` for the contract.
"""
from circuitlang.models.adapters.base import (
    Adapter,
    Projection,
    adapter_class,
    check_config,
    register,
    shape_from_config,
    supported_model_types,
)

__all__ = [
    "Adapter",
    "Projection",
    "adapter_class",
    "check_config",
    "register",
    "shape_from_config",
    "supported_model_types",
]
