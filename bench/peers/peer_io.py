"""Shared input/output for the peer-tool scripts: the prompts file, the metric, timing.

Takes a prompts JSON file; gives tensors, the logit-difference metric, a best-of-N
timer and a JSON writer. Imported by `tl_patching.py` and `ac_edges.py`, which run
inside the peer venvs (.peers/tl, .peers/ac), so it needs nothing beyond torch and
the standard library — never circuitlang.

The prompts file (written by `make_model.py` or by the agreement tests)::

    {
      "clean":    [[int, ...], ...],   # [B, T] token ids, every row the same length
      "corrupt":  [[int, ...], ...],   # [B, T] token ids, the corrupted prompts
      "answer":   [int, ...],          # [B] the token the clean prompt should predict
      "wrong":    [int, ...],          # [B] the competing token
      "position": int                  # the position patched in single-position sweeps
    }                                  # (optional; default -1, the last)

The metric is the logit difference `logit[answer] - logit[wrong]` at the last
position, per prompt; sweeps report the batch mean and the per-prompt values.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch


class PromptsError(ValueError):
    """The prompts file is not in the format described in this module's docstring."""


@dataclass(frozen=True, slots=True)
class Prompts:
    """A batch of clean/corrupt prompt pairs with their answer tokens.

    Attributes:
        clean: [B, T] token ids.
        corrupt: [B, T] token ids.
        answer: [B] answer token ids.
        wrong: [B] wrong-answer token ids.
        position: the non-negative position index single-position sweeps patch.
    """

    clean: torch.Tensor
    corrupt: torch.Tensor
    answer: torch.Tensor
    wrong: torch.Tensor
    position: int

    @property
    def batch(self) -> int:
        return int(self.clean.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.clean.shape[1])


def _ids(data: dict, key: str, ndim: int) -> torch.Tensor:
    if key not in data:
        raise PromptsError(f"prompts file has no {key!r} (needs clean, corrupt, answer, wrong)")
    try:
        value = torch.tensor(data[key], dtype=torch.long)
    except (TypeError, ValueError) as exc:
        raise PromptsError(f"{key!r} must be {'a list of equal-length lists' if ndim == 2 else 'a list'} "
                           f"of token ids: {exc}") from exc
    if value.dim() != ndim or value.numel() == 0:
        raise PromptsError(f"{key!r} has shape {tuple(value.shape)}, expected {ndim} non-empty dimension(s)")
    return value


def read_prompts(path: str | Path) -> Prompts:
    """Read and check a prompts file.

    Args:
        path: the JSON file.

    Returns:
        The prompts as tensors.

    Raises:
        PromptsError: a key is missing, shapes disagree, or the position is out of range.
    """
    data = json.loads(Path(path).read_text())
    clean, corrupt = _ids(data, "clean", 2), _ids(data, "corrupt", 2)
    answer, wrong = _ids(data, "answer", 1), _ids(data, "wrong", 1)
    if clean.shape != corrupt.shape:
        raise PromptsError(f"clean {tuple(clean.shape)} and corrupt {tuple(corrupt.shape)} differ in shape")
    if not answer.shape[0] == wrong.shape[0] == clean.shape[0]:
        raise PromptsError(f"answer/wrong need one id per prompt ({clean.shape[0]}), "
                           f"got {answer.shape[0]} and {wrong.shape[0]}")
    tokens = clean.shape[1]
    position = int(data.get("position", -1))
    if not -tokens <= position < tokens:
        raise PromptsError(f"position {position} out of range for {tokens} tokens "
                           f"(valid: {-tokens}..{tokens - 1})")
    return Prompts(clean, corrupt, answer, wrong, position % tokens)


def logit_diff(logits: torch.Tensor, prompts: Prompts) -> torch.Tensor:
    """Per-prompt `logit[answer] - logit[wrong]` at the last position, shape [B]."""
    last = logits[:, -1, :]
    rows = torch.arange(last.shape[0], device=last.device)
    return last[rows, prompts.answer.to(last.device)] - last[rows, prompts.wrong.to(last.device)]


def best_of(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Smallest wall time (seconds) of `repeats` calls of `fn` (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def set_threads(threads: int) -> None:
    """Pin torch's intra-op threads (the same number in every tool being compared).

    On a shared 2-core machine, torch's default (all cores) lets OpenMP spin-wait
    against other processes: a tiny model's forward went from 0.02 s to 0.5 s.
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)


def environment(tool: str, version: str) -> dict:
    """What ran: the tool and its version, torch, the machine, the thread count."""
    return {
        "tool": tool,
        "version": version,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }


def to_list(value: torch.Tensor) -> list:
    """A tensor as nested Python floats (float64 precision kept)."""
    return value.detach().to(torch.float64).cpu().tolist()


def write_json(path: str | Path, payload: dict) -> None:
    """Write `payload` as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def script_parser(doc: str):
    """The command line every peer script shares: MODEL_DIR PROMPTS.json OUT.json [--dtype]."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("prompts")
    parser.add_argument("out")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    return parser
