"""Models dispatched by accelerate (`device_map`): where a module computes, and its weights.

Takes a module of a model loaded with `transformers`' `device_map` (accelerate's
`dispatch_model`: layers on GPUs, on the CPU, or offloaded to CPU memory or to disk);
gives what the interventions need from it outside its own forward pass.

accelerate keeps an offloaded module's parameters on the `meta` device and loads them
(from CPU memory or a memory-mapped file on disk) onto its *execution device* only for
the length of its forward call, through a hook it attaches (`module._hf_hook`, an
`AlignDevicesHook` with a `weights_map`). circuitlang's hooks read some weights
themselves (a head's slice of a q/k/v projection, W_O per head, biases), after or
before that call, so they read them here: a parameter that is resident is returned as
it is; one that is offloaded is read from the hook's `weights_map` and moved to the
module's execution device in the parameter's dtype. Nothing is cached: an offloaded
weight is read when it is used and freed after, as accelerate itself does.

Without accelerate nothing here is needed: a module without a hook is resident.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _hook(module: nn.Module) -> Any:
    return getattr(module, "_hf_hook", None)


def is_offloaded(module: nn.Module) -> bool:
    """True when accelerate loads this module's own parameters only during its forward."""
    hook = _hook(module)
    if hook is None or not getattr(hook, "offload", False):
        return False
    return any(p.device.type == "meta" for p in module.parameters(recurse=False))


def execution_device(module: nn.Module, default: torch.device) -> torch.device:
    """Where `module` computes: its accelerate hook's execution device, else `default`."""
    hook = _hook(module)
    found = getattr(hook, "execution_device", None) if hook is not None else None
    if found is None:
        return default
    return torch.device(f"cuda:{found}" if isinstance(found, int) else found)


def resident(module: nn.Module, name: str) -> torch.Tensor | None:
    """The parameter `name` of `module` as a real tensor on the device it computes on.

    A resident parameter is returned unchanged (no copy); an offloaded one (`meta`) is
    read from accelerate's weights map. None when the module has no such parameter.
    """
    param = getattr(module, name, None)
    if param is None or not isinstance(param, torch.Tensor) or param.device.type != "meta":
        return param
    hook = _hook(module)
    weights = getattr(hook, "weights_map", None) if hook is not None else None
    if weights is None:
        raise RuntimeError(f"parameter {name!r} of {type(module).__name__} is on the meta device "
                           "and no accelerate hook says where its values are")
    value = weights[name]
    return value.to(device=execution_device(module, value.device), dtype=param.dtype)


def execution_devices(hf_model: Any) -> set[torch.device]:
    """Every device the modules of a dispatched model compute on (empty: not dispatched)."""
    found = set()
    for module in hf_model.modules():
        hook = _hook(module)
        where = getattr(hook, "execution_device", None) if hook is not None else None
        if where is not None:
            found.add(torch.device(f"cuda:{where}" if isinstance(where, int) else where))
    return found


def dispatch_devices(hf_model: Any) -> list[torch.device]:
    """The devices a dispatched model computes on (`hf_device_map`'s, without "disk");
    empty for a model that was not dispatched."""
    found: list[torch.device] = []
    for where in (getattr(hf_model, "hf_device_map", None) or {}).values():
        if where == "disk":
            continue
        dev = torch.device(f"cuda:{where}" if isinstance(where, int) else where)
        if dev not in found:
            found.append(dev)
    return found


def main_device(hf_model: Any) -> torch.device | None:
    """The device a dispatched model takes its inputs on, as accelerate chooses it: the
    first accelerator in its device map, else the CPU (None: not dispatched)."""
    if not getattr(hf_model, "hf_device_map", None):
        return None
    devices = dispatch_devices(hf_model)
    accelerators = [d for d in devices if d.type != "cpu"]
    return accelerators[0] if accelerators else torch.device("cpu")


__all__ = ["dispatch_devices", "execution_device", "execution_devices", "is_offloaded", "main_device",
           "resident"]
