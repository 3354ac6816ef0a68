"""Run options: checking what a caller asks a run to do, before anything runs.

Takes the options of a check or a run as a user gave them (the command line's `-n`,
`--seed`, `--batch-size`, `--permutations`, `--max-examples`, `--device`, `--json`;
the same keywords of `circuitlang.check` and `circuitlang.run`); gives them back
checked, or raises an `OptionError` that names the option, the value and what would
have been valid. The command line and the Python API call the same functions, so a
value means the same, and fails the same way, in both.

`check_prompts_fit` is the one check that needs the prompts: it runs once a task has
built them for a model (`Task.for_model` makes the task call it itself).

Limits (docs/language.md, "Limits"):

* prompts per run: at most `MAX_PROMPTS` (each prompt's tokens and per-prompt metrics
  stay in memory); the environment variable `CIRCUITLANG_MAX_PROMPTS` raises it;
* seeds: 0 .. 2**32 - 1 (what numpy's and torch's generators accept alike);
* permutations: 0 .. `MAX_PERMUTATIONS`; max examples: 1 .. `MAX_EXAMPLES`.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from circuitlang.errors import CircuitlangError, TaskError

if TYPE_CHECKING:  # pragma: no cover
    from circuitlang.sites import ModelShape
    from circuitlang.tasks.prompt_set import PromptSet

__all__ = ["MAX_EXAMPLES", "MAX_PERMUTATIONS", "MAX_PROMPTS", "MAX_SEED", "OptionError",
           "check_batch_size", "check_device", "check_max_examples", "check_n",
           "check_output_path", "check_permutations", "check_prompts_fit", "check_seed",
           "max_prompts", "prompt_count"]

MAX_PROMPTS = 100_000
MAX_SEED = 2**32 - 1
MAX_PERMUTATIONS = 10_000
MAX_EXAMPLES = 100_000
PROMPTS_VARIABLE = "CIRCUITLANG_MAX_PROMPTS"


class OptionError(CircuitlangError):
    """An option of a run (a number of prompts, a seed, a device, an output path) is
    not one the run can use."""

    stage = "options"


def _whole(value: Any, option: str, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            is_whole = not isinstance(value, (bool, str)) and int(value) == value
        except (TypeError, ValueError, OverflowError):
            is_whole = False
        if not is_whole:
            raise OptionError(f"{option} must be a whole number, got {value!r}",
                              code="options.type", hint=f"for example {example}")
        value = int(value)
    return value


def max_prompts() -> int:
    """The most prompts one run may use: `MAX_PROMPTS`, or `$CIRCUITLANG_MAX_PROMPTS`.

    Raises:
        OptionError: the environment variable is set to something that is not a
            positive whole number.
    """
    raw = os.environ.get(PROMPTS_VARIABLE)
    if raw is None or not raw.strip():
        return MAX_PROMPTS
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if limit < 1:
        raise OptionError(f"{PROMPTS_VARIABLE}={raw!r} is not a positive whole number",
                          code="options.limit", hint=f"unset it (default {MAX_PROMPTS:,}) "
                          f"or set e.g. {PROMPTS_VARIABLE}=500000")
    return limit


def check_n(n: Any, option: str = "-n") -> int:
    """A number of prompts: at least 1, at most `max_prompts()`.

    Args:
        n: the value given.
        option: how the caller names it (`-n`, `n`, `samples`), for messages.

    Raises:
        OptionError: not a whole number, below 1, or over the limit (the message names
            the limit and how to raise it).
    """
    n = _whole(n, option, f"{option} 64")
    if n < 1:
        raise OptionError(f"{option} must be at least 1 prompt, got {n}",
                          code="options.n", hint=f"for example {option} 64 (the default)")
    limit = max_prompts()
    if n > limit:
        raise OptionError(
            f"{option} {n:,} is more prompts than the limit of {limit:,} (every prompt's "
            "tokens and per-prompt metrics are kept in memory)", code="options.n",
            hint=f"use fewer prompts, or raise the limit: {PROMPTS_VARIABLE}={n}")
    return n


def prompt_count(n: Any, samples: int | None, default: int) -> int:
    """How many prompts a run uses: the caller's `n`, else the file's `samples`, else
    `default`, checked with `check_n`.

    `n=0` is an error, not "the default": only None means "not given".

    Raises:
        OptionError: as `check_n`.
    """
    if n is not None:
        return check_n(n)
    if samples is not None:
        return check_n(samples, "samples")
    return check_n(default)


def check_seed(seed: Any, option: str = "--seed") -> int:
    """A seed: a whole number in 0 .. 2**32 - 1.

    Raises:
        OptionError: anything else.
    """
    seed = _whole(seed, option, f"{option} 0")
    if not 0 <= seed <= MAX_SEED:
        raise OptionError(f"{option} must be between 0 and {MAX_SEED:,}, got {seed:,}",
                          code="options.seed", hint=f"for example {option} 0")
    return seed


def check_batch_size(batch_size: Any, option: str = "--batch-size") -> int:
    """Prompts per forward pass: at least 1.

    Raises:
        OptionError: not a whole number, or below 1.
    """
    batch_size = _whole(batch_size, option, f"{option} 64")
    if batch_size < 1:
        raise OptionError(f"{option} must be at least 1, got {batch_size}",
                          code="options.batch_size", hint=f"for example {option} 64")
    return batch_size


def check_permutations(k: Any, option: str = "--permutations") -> int:
    """Random circuits for the permutation test: 0 (skip the test) .. MAX_PERMUTATIONS.

    Raises:
        OptionError: not a whole number, negative, or over the limit.
    """
    k = _whole(k, option, f"{option} 20")
    if not 0 <= k <= MAX_PERMUTATIONS:
        raise OptionError(
            f"{option} must be between 0 and {MAX_PERMUTATIONS:,}, got {k:,}",
            code="options.permutations",
            hint=f"{option} 0 skips the permutation test; the default is 20")
    return k


def check_max_examples(k: Any, option: str = "--max-examples") -> int:
    """Prompts `hypothesis` tries per per-prompt expectation: 1 .. MAX_EXAMPLES.

    Raises:
        OptionError: not a whole number, below 1, or over the limit.
    """
    k = _whole(k, option, f"{option} 25")
    if not 1 <= k <= MAX_EXAMPLES:
        raise OptionError(f"{option} must be between 1 and {MAX_EXAMPLES:,}, got {k:,}",
                          code="options.max_examples", hint=f"for example {option} 25")
    return k


def check_device(device: Any, option: str = "--device") -> str | None:
    """A torch device this machine has: `cpu`, `cuda`, `cuda:N`, `mps` (None: the default).

    Raises:
        OptionError: a device name torch does not know, or one this machine (or this
            build of torch) does not have.
    """
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise OptionError(f"unknown device {device!r}", code="options.device",
                          hint="use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cpu":
        return str(dev)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = "was built without CUDA" if torch.version.cuda is None else \
                "sees no CUDA device"
            raise OptionError(f"{option} {device}: this torch ({torch.__version__}) {built}",
                              code="options.device",
                              hint=f"use {option} cpu, or leave {option} out (CUDA when "
                              "present, else CPU)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise OptionError(f"{option} {device}: this machine has {count} CUDA device"
                              f"{'s' if count != 1 else ''} (cuda:0-cuda:{count - 1})",
                              code="options.device", hint=f"use {option} cuda:0")
        return str(dev)
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise OptionError(f"{option} {device}: no Apple-silicon (MPS) device here",
                              code="options.device", hint=f"use {option} cpu")
        return str(dev)
    raise OptionError(f"{option} {device}: circuitlang runs models on cpu, cuda or mps",
                      code="options.device", hint=f"use {option} cpu or {option} cuda")


def check_output_path(path: Any, option: str = "--json") -> Path:
    """A file a result can be written to, checked before the run that makes it.

    The folder must exist and take a new file (tried, not guessed from permission
    bits), the path must not be a folder, and an existing file must be writable.

    Raises:
        OptionError: what is wrong with the path.
    """
    target = Path(path).expanduser()
    if target.is_dir():
        raise OptionError(f"{option} {path}: is a folder", code="options.output",
                          hint=f"name a file, e.g. {option} {target / 'result.json'}")
    folder = target.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise OptionError(f"{option} {path}: {folder} {what}", code="options.output",
                          hint="create the folder first, or write somewhere else")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".circuitlang-probe-"):
            pass
        if target.exists():
            with open(target, "a", encoding="utf-8"):
                pass
    except OSError as exc:
        raise OptionError(f"{option} {path}: cannot write there ({exc.strerror})",
                          code="options.output",
                          hint="write to a folder you can write to") from None
    return target


def check_prompts_fit(prompts: "PromptSet", shape: "ModelShape") -> None:
    """Every prompt (and counterfactual) fits the model: its context and its vocabulary.

    Args:
        prompts: what a task built (`input_ids`, `attention_mask`, answers, ...).
        shape: the model's shape (`n_ctx`, `vocab_size`; 0 means unknown: unchecked).

    Raises:
        TaskError: the longest prompt is longer than `n_ctx` (the message gives both
            lengths and the prompt), or a token id is outside the vocabulary.
    """
    name = f"model {shape.name}" if getattr(shape, "name", "") else "the model"
    n_ctx = int(getattr(shape, "n_ctx", 0) or 0)
    if n_ctx:
        for what, mask, texts in (("prompt", prompts.attention_mask, prompts.texts),
                                  ("counterfactual", prompts.corrupt_attention_mask,
                                   prompts.corrupt_texts)):
            if mask.numel() == 0:
                continue
            lengths = mask.sum(dim=1)
            longest = int(lengths.max())
            if longest > n_ctx:
                i = int(lengths.argmax())
                text = texts[i] if i < len(texts) else ""
                shown = text if len(text) <= 60 else text[:57] + "..."
                raise TaskError(
                    f"the longest {what} is {longest:,} tokens, but {name} reads at most "
                    f"{n_ctx:,} (its context length); {what} {i}: {shown!r}",
                    code="task.too-long",
                    hint="use shorter prompts (for induction a smaller length=), or a "
                    "model with a longer context")
    vocab = int(getattr(shape, "vocab_size", 0) or 0)
    if vocab:
        for what, ids in (("prompt", prompts.input_ids),
                          ("counterfactual", prompts.corrupt_input_ids),
                          ("answer", prompts.answers), ("wrong answer", prompts.wrong_answers)):
            if ids.numel() == 0:
                continue
            top = int(ids.max())
            low = int(ids.min())
            if top >= vocab or (what in ("prompt", "counterfactual") and low < 0):
                bad = top if top >= vocab else low
                raise TaskError(
                    f"a {what} has token id {bad:,}, outside {name}'s vocabulary of "
                    f"{vocab:,} ids (0-{vocab - 1:,})", code="task.bad-token-id",
                    hint="give ids the model has (without a tokenizer, induction takes "
                    "vocab=N; check the ids of a JSONL file)")
