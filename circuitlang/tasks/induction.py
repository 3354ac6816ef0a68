"""Induction: a random token sequence followed by its repeat (Olsson et al. 2022).

Takes a tokenizer (or none) and parameters; gives prompts `[BOS] t0 .. tL-1 t0 .. tL-1`
built directly from token ids sampled from the tokenizer's vocabulary (special tokens
excluded), so they fit any tokenizer. `vocab=N` samples from the first N non-special
ids only (a model trained on a small vocabulary, or a TransformerLens-style
experiment on ids 0..N-1). The task needs no tokenizer: without one the ids are
0 .. len(WORDS)-1 (or 0 .. N-1 with `vocab=N`), no BOS is put first, and the text
(for display only) names each id by a word of the built-in list `WORDS`.

Positions (by repeat offset; b = 1 with a BOS token, else 0; L = `length`):
    `FIRST` = b (t0, first copy), `PREV` = b+L-1 (the first copy of END's token),
    `PREV+1` = `REPEAT` = b+L (t0, second copy: what an induction head at END
    attends to), `END` = b+2L-1 (the last token). Offsets (`END-3`, `PREV+1`)
    work as everywhere.
Features: `tokens` (the whole sequence), `next` (t0, what should follow END),
    `last` (tL-1, the token at END and PREV), `distractor` (the wrong answer).
Counterfactual: the same first copy followed by fresh random tokens (no repeat).
Metrics: `logit_diff` (t0 vs the distractor at END), `prob_diff`, `kl` at END, and
    `loss` (default): the mean next-token loss over the repeated half, predicting
    tokens REPEAT+1 .. END from positions REPEAT .. END-1.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from circuitlang.errors import TaskError
from circuitlang.tasks.base import Spec, Task
from circuitlang.tasks.params import ParamType
from circuitlang.tasks.signature import TaskSignature

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from hypothesis.strategies import SearchStrategy

    from circuitlang.tasks.base import PromptSet

#: Words used as the vocabulary when the task has no tokenizer.
WORDS: tuple[str, ...] = tuple(
    "apple river stone cloud green table music paper light quick house water bread "
    "chair window garden yellow planet silver forest orange button candle dragon "
    "engine feather guitar hammer island jacket kettle ladder marble needle oyster "
    "pencil quilt rocket saddle tunnel umbrella violin wagon zebra anchor basket "
    "carpet donkey eagle falcon glove harbor igloo jungle kitten lemon mirror nest "
    "olive parrot queen rabbit sugar tiger valley walnut yacht almond bridge copper "
    "desert ember fossil galaxy helmet ivory jigsaw kayak lantern meadow nickel "
    "orchid pepper quartz ribbon shadow thistle velvet willow canyon dolphin".split()
)

SIGNATURE = TaskSignature(
    name="induction",
    positions=("FIRST", "PREV", "PREV+1", "REPEAT", "END"),
    features=("tokens", "next", "last", "distractor"),
    metrics=("loss", "logit_diff", "prob_diff", "kl"),
    default_metric="loss",
    description="induction (Olsson et al. 2022): a random sequence repeated; "
    "predict the repeat",
)


@dataclass(frozen=True, slots=True)
class InductionSpec(Spec):
    """One induction prompt: the random sequence (token ids) and a distractor id.

    `rendered` is the prompt's text, kept for display only (not compared).
    """

    tokens: tuple[int, ...]
    distractor: int
    second: tuple[int, ...] | None = None  # the second half, when not a repeat
    rendered: str = field(default="", compare=False)

    @property
    def text(self) -> str:
        return self.rendered

    @property
    def ids(self) -> tuple[int, ...]:
        return self.tokens + (self.tokens if self.second is None else self.second)

    def features(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "next": self.tokens[0], "last": self.tokens[-1],
                "distractor": self.distractor}


class InductionTask(Task):
    """Induction on repeated random tokens; see the module docstring.

    Parameters (besides `n`, `seed`, `prepend_bos`):
        length: tokens in each copy (default 10, at least 2; short enough for
            small models trained on short periods).
        tokens: token strings to sample from (default: the whole vocabulary without
            special tokens; with no tokenizer, `WORDS`).
        vocab: sample from the first `vocab` non-special token ids only (with no
            tokenizer: ids 0 .. vocab-1). Not together with `tokens`.
    """

    #: What the counterfactual changes (patching experiments and the solver's `corrupt`
    #: ablation read it; the report says it beside them).
    CORRUPTION = (
        "the same first copy of the sequence followed by fresh random tokens (no repeat): every "
        "path that reads only the first copy (the previous-token head at PREV+1, the keys "
        "there) carries the same values in both runs, so patching it moves nothing however much "
        "the circuit needs it"
    )

    SIGNATURE = SIGNATURE
    PARAMS = {"length": 10, "tokens": None, "vocab": None}
    PARAM_TYPES = {
        "length": ParamType("int", "tokens in each copy, at least 2"),
        "tokens": ParamType("list[str]", "token strings to sample from (default: the "
                            "whole vocabulary without special tokens)"),
        "vocab": ParamType("int", "sample from the first N non-special token ids only"),
    }
    TOKEN_FEATURES = {"END": ("last",), "PREV": ("last",), "FIRST": ("next",),
                      "REPEAT": ("next",), "PREV+1": ("next",)}
    POSITION_FEATURES = {p: () for p in SIGNATURE.positions}

    def __init__(self, tokenizer: Any = None, **params: Any):
        super().__init__(tokenizer, **params)
        length = self.params["length"]
        if not isinstance(length, int) or length < 2:
            raise TaskError(f"induction length must be an integer >= 2, got {length!r}",
                            code="task.bad-param", hint="for example length=20")
        self.length = length
        chosen, vocab = self.params["tokens"], self.params["vocab"]
        if vocab is not None and vocab < 1:
            raise TaskError(f"induction vocab must be a positive number of tokens, got {vocab}",
                            code="task.bad-param", hint="for example vocab=32")
        if vocab is not None and chosen:
            raise TaskError("induction takes tokens=[...] or vocab=N, not both",
                            code="task.bad-param",
                            hint="vocab=N samples the first N ids; tokens=[...] names them")
        self._words = tuple(chosen or WORDS)
        if tokenizer is None:
            size = vocab if vocab is not None else len(self._words)
            self.candidates: tuple[int, ...] = tuple(range(size))
        else:
            special = set(tokenizer.all_special_ids)
            if chosen:
                ids = tokenizer.convert_tokens_to_ids(list(chosen))
                missing = [t for t, i in zip(chosen, ids) if i is None or self._is_unknown(i)]
                if missing:
                    raise TaskError(f"induction tokens not in the vocabulary: {missing[:5]}",
                                    code="task.bad-param",
                                    hint="give token strings exactly as the tokenizer has them")
                self.candidates = tuple(dict.fromkeys(i for i in ids if i not in special))
            else:
                self.candidates = tuple(i for i in range(len(tokenizer)) if i not in special)
                if vocab is not None:
                    if vocab > len(self.candidates):
                        raise TaskError(
                            f"induction vocab={vocab}, but the tokenizer has only "
                            f"{len(self.candidates)} non-special tokens",
                            code="task.bad-param",
                            hint=f"use vocab={len(self.candidates)} or less")
                    self.candidates = self.candidates[:vocab]
        if len(self.candidates) < self.length + 1:
            raise TaskError(
                f"induction needs at least length+1 = {self.length + 1} distinct tokens; "
                f"the vocabulary offers {len(self.candidates)}",
                code="task.bad-param", hint="use a smaller length or more tokens")

    def vocabulary(self) -> list[str]:
        return list(self._words) if self.tokenizer is None else []

    def _render(self, ids: tuple[int, ...]) -> str:
        if self.tokenizer is None:
            return " ".join(self._words[i] if i < len(self._words) else f"<{i}>" for i in ids)
        return self.tokenizer.decode(list(ids))

    def make_spec(self, tokens: tuple[int, ...], distractor: int,
                  second: tuple[int, ...] | None = None) -> InductionSpec:
        """A spec for these token ids, with its text rendered by the tokenizer."""
        tokens = tuple(tokens)
        ids = tokens + (tokens if second is None else tuple(second))
        return InductionSpec(tokens=tokens, distractor=distractor,
                             second=None if second is None else tuple(second),
                             rendered=self._render(ids))

    def _sample_one(self, rng: random.Random) -> InductionSpec:
        picks = rng.sample(self.candidates, self.length + 1)
        return self.make_spec(tuple(picks[:-1]), picks[-1])

    def _corrupt(self, spec: InductionSpec, rng: random.Random) -> InductionSpec:
        pool = [c for c in self.candidates if c not in spec.tokens]
        if len(pool) < self.length:
            pool = list(self.candidates)
        return self.make_spec(spec.tokens, spec.distractor,
                              second=tuple(rng.sample(pool, self.length)))

    def _bos(self) -> list[int]:
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return [bos] if self.params["prepend_bos"] and bos is not None else []

    def _tokenize_one(self, spec: InductionSpec, corrupt: InductionSpec) -> dict[str, Any] | str:
        if len(spec.tokens) != self.length:
            return f"sequence has {len(spec.tokens)} tokens, the task's length is {self.length}"
        bos = self._bos()
        b, length = len(bos), self.length
        positions = {"FIRST": b, "PREV": b + length - 1, "PREV+1": b + length,
                     "REPEAT": b + length, "END": b + 2 * length - 1}
        return {"ids": bos + list(spec.ids), "positions": positions,
                "answers": [spec.tokens[0]], "wrong": [spec.distractor],
                "corrupt_ids": bos + list(corrupt.ids)}

    def metric(self, name: str, logits: "torch.Tensor", prompts: "PromptSet",
               reference_logits: "torch.Tensor | None" = None) -> "torch.Tensor":
        """As `Task.metric`, except `loss`: mean next-token loss over the repeated half."""
        if name != "loss":
            return super().metric(name, logits, prompts, reference_logits)
        if logits.dim() != 3 or logits.shape[:2] != prompts.input_ids.shape:
            raise TaskError(
                f"induction loss needs full logits [N, T, V] matching input_ids "
                f"{tuple(prompts.input_ids.shape)}; got {tuple(logits.shape)}",
                code="task.bad-logits", hint="pass the model's logits for every position")
        start = int(prompts.positions["REPEAT"][0])
        end = int(prompts.positions["END"][0])
        pred = logits[:, start:end].float().log_softmax(dim=-1)
        target = prompts.input_ids[:, start + 1: end + 1].to(logits.device)
        return -pred.gather(2, target[..., None])[..., 0].mean(dim=1)

    def _spec_strategy(self, fixed: dict[str, Any]) -> "SearchStrategy":
        from hypothesis import strategies as st

        candidates = self.candidates
        # Indices into the candidates shrink toward the vocabulary's first tokens.
        index = st.integers(0, len(candidates) - 1)
        sequence = st.lists(index, min_size=self.length, max_size=self.length, unique=True)

        @st.composite
        def specs(draw: Any) -> InductionSpec:
            if "tokens" in fixed:
                tokens = list(fixed["tokens"])
            else:
                tokens = [candidates[i] for i in draw(sequence)]
            for slot, name in ((0, "next"), (len(tokens) - 1, "last")):
                if name in fixed and tokens[slot] != fixed[name]:
                    value = fixed[name]
                    if value in tokens:  # keep the sequence free of repeats
                        tokens[tokens.index(value)] = tokens[slot]
                    tokens[slot] = value
            if "distractor" in fixed and fixed["distractor"] not in tokens:
                distractor = fixed["distractor"]
            else:
                distractor = candidates[draw(index.filter(lambda i: candidates[i] not in tokens))]
            return self.make_spec(tuple(tokens), distractor)

        return specs()
