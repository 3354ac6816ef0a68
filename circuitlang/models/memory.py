"""Batch sizes from a memory budget: free memory measured, the cost of one row estimated.

Takes a model (its shape, dtype and device), the length of its prompts and what a pass
keeps (gradients for attribution, an edge patch's sender buffers); gives `BatchPlan`:
the number of rows per forward pass that fits the memory the machine has free now,
capped by what the caller's engine gains from (`cap`).

Free memory is measured, not guessed: on CUDA `torch.cuda.mem_get_info` (plus what
torch's caching allocator holds but does not use, which it hands back to new tensors);
on the CPU `psutil.virtual_memory().available` when psutil is installed, else
`MemAvailable` of /proc/meminfo. Where neither says (another OS, MPS), the cap is the
batch size, as before there was a budget.

A row's cost is estimated from the model's shape and the sequence length (`row_bytes`;
an upper bound of what one prompt keeps alive during the pass, not a measurement).
Only a `fraction` of the free memory is used (half on a CPU, which other programs
share; 0.8 on a GPU), since the estimate leaves out what the caller keeps beside the
pass. Where it is still wrong on CUDA, the executor halves a batch that runs out of
memory and retries (`circuitlang.execute`), so a budget never makes a run fail that a
smaller batch would have finished.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from circuitlang.sites import ModelShape

#: Share of the measured free memory a batch may use, by device type.
FRACTION = {"cpu": 0.5, "cuda": 0.8}
_MEMINFO = Path("/proc/meminfo")


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """A batch size and why.

    Attributes:
        size: rows per forward pass (>= 1).
        row_bytes: the estimated cost of one row.
        budget: the bytes the rows may use (None: nothing measured, the cap decided).
        free: the free memory measured on the device (None: not measurable here).
        device: where it was measured.
    """

    size: int
    row_bytes: int
    budget: int | None
    free: int | None
    device: str

    def describe(self) -> str:
        if self.budget is None:
            return f"batch {self.size} (free memory on {self.device} not measurable here)"
        return (f"batch {self.size}: {_gib(self.budget)} of {_gib(self.free) if self.free is not None else '?'} "
                f"free on {self.device}, ~{self.row_bytes / 2**20:.1f} MiB a row")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def free_memory(device: Any = "cpu") -> int | None:
    """Bytes free for new tensors on `device` now (None where it cannot be measured)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _total = torch.cuda.mem_get_info(dev)
        cached = torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
        return int(free + max(0, cached))
    if dev.type != "cpu":
        return None
    try:
        import psutil
    except ImportError:
        return _meminfo_available()
    return int(psutil.virtual_memory().available)


def _meminfo_available() -> int | None:
    try:
        text = _MEMINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            return int(parts[1]) * (1024 if len(parts) < 3 or parts[2].lower() == "kb" else 1)
    return None


def row_bytes(shape: ModelShape, tokens: int, dtype: torch.dtype = torch.float32, *, grad: bool = False,
              edges: bool = False) -> int:
    """An upper estimate of the memory one prompt (row) of `tokens` tokens holds in one pass.

    Counted: one block's transient values (the stream, q/k/v, z, the MLP's hidden units
    before and after its activation, attention scores and pattern), the residual stream
    kept per layer (captures, a clean pass's blocks), the logits and their fp32 metric
    copies; with `grad`, every block's transients saved for the backward pass and their
    gradients; with `edges` (an edge patch over every edge), each sender's clean, ablated
    and delta values and each receiver's own input (with gradients, their normed copies
    and what autograd keeps of them), and per layer the deltas of the senders below it.
    The edge term's factors were fitted to peak memory measured on CPU for EAP on
    Llama-shaped models (d_model 512 and 1024 with 8 layers, 2048 with 16: 98 MiB, 317
    MiB and 3.7 GiB a row; this estimate gives 122, 389 and 4,100 MiB: 10-25% over).

    Args:
        shape: the model's shape.
        tokens: the prompts' length.
        dtype: the weights' (and activations') dtype.
        grad: the pass keeps an autograd graph (attribution patching).
        edges: the pass patches every edge of the model (discovery).
    """
    e = torch.empty((), dtype=dtype).element_size()
    t, d, n_layers = max(1, int(tokens)), shape.d_model, shape.n_layers
    d_mlp = getattr(shape, "d_mlp", 0) or 4 * d
    heads = shape.n_heads * t  # scores and pattern per query position
    block = t * (6 * d + (2 * d_mlp if shape.has_mlp else 0) + 2 * heads) * e
    kept = t * (n_layers + 1) * d * e
    logits = t * shape.vocab_size * (e + 2 * 4)
    total = block + kept + logits
    if grad:
        total += 2 * n_layers * block + t * shape.vocab_size * 4
    if edges:
        senders = 1 + n_layers * (shape.n_heads + (1 if shape.has_mlp else 0))
        receivers = n_layers * (shape.n_heads + 2 * shape.n_kv_heads + (1 if shape.has_mlp else 0)) + 1
        # per sender and receiver a few [T, D] values; and per layer the senders below it
        # (on average half of them) stacked for that layer's receivers
        per_node, per_layer = (4.0, 2.5) if grad else (2.0, 1.0)
        units = per_node * (senders + receivers) + per_layer * n_layers * senders / 2
        total += int(units * t * d * e)
    return int(total)


def choose_batch_size(model: Any, tokens: int, *, grad: bool = False, edges: bool = False, cap: int = 64,
                      budget: int | None = None,
                      fraction: float | None = None) -> BatchPlan:
    """The batch size that fits the free memory of `model`'s device.

    Args:
        model: a `LoadedModel` (its shape, dtype and device are read).
        tokens: the prompts' length.
        grad, edges: what the pass keeps (see `row_bytes`).
        cap: the most rows per pass (what the engine gains from; the size when free
            memory cannot be measured). Engines pack several candidates' rows of one
            prompt into a batch, so the number of prompts does not cap it.
        budget: the bytes the rows may use, instead of measuring (`fraction` is then
            not applied).
        fraction: the share of the measured free memory to use (default `FRACTION`).

    Returns:
        A `BatchPlan` of at least 1 row (a single row over budget still runs: the
        executor's out-of-memory split has nothing smaller to try).
    """
    device = torch.device(getattr(model, "device", "cpu"))
    per_row = max(1, row_bytes(model.shape, tokens, getattr(model, "dtype", torch.float32), grad=grad,
                               edges=edges))
    limit = max(1, int(cap))
    free = None
    if budget is None:
        free = free_memory(device)
        if free is None:
            return BatchPlan(limit, per_row, None, None, str(device))
        budget = int(free * (FRACTION.get(device.type, 0.5) if fraction is None else fraction))
    size = max(1, min(limit, budget // per_row))
    return BatchPlan(size, per_row, int(budget), free, str(device))


__all__ = ["FRACTION", "BatchPlan", "choose_batch_size", "free_memory", "row_bytes"]
