"""Prompt sets: tokenized prompts with positions, features, answers and counterfactuals.

Takes what `Task.build` computed per prompt; gives the `PromptSet` the checker runs on
(see `circuitlang.tasks.base` for how each field is found) and `Dropped`, the record of
prompts left out and why.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from circuitlang.errors import TaskError
from circuitlang.sites import Position

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: `token(P)` / `position(P)`, the built-in features every task has.
BUILTIN_FEATURE = re.compile(r"^(token|position)\((\w+(?:[+-]\d+)?)\)$")


@dataclass(frozen=True, slots=True)
class Dropped:
    """Prompts left out of a `PromptSet`, each with the reason.

    Attributes:
        reasons: `(prompt text, reason)` pairs in sample order.
    """

    reasons: tuple[tuple[str, str], ...] = ()

    @property
    def count(self) -> int:
        return len(self.reasons)

    def summary(self) -> str:
        """One line: how many were dropped and the first reason."""
        if not self.reasons:
            return "no prompts dropped"
        text, why = self.reasons[0]
        return f"{self.count} prompt(s) dropped; first: {text!r}: {why}"


@dataclass(frozen=True, slots=True)
class PromptSet:
    """A batch of tokenized prompts with everything a hypothesis can refer to.

    Attributes:
        task: the task's name.
        specs: the prompt specs kept (after drops), in order.
        texts: their texts.
        input_ids: LongTensor [N, T], right-padded.
        attention_mask: LongTensor [N, T], 1 on real tokens.
        positions: position name -> LongTensor [N] of token indices (`END` is the
            last real token); every position the task's signature lists.
        features: feature name -> list of N hashable values (aliases included).
        answers: LongTensor [N, A] of correct next-token ids, padded with -1.
        wrong_answers: LongTensor [N, W] of wrong next-token ids, padded with -1.
        corrupt_specs: the counterfactual spec of each prompt.
        corrupt_texts: their texts.
        corrupt_input_ids: LongTensor [N, T], aligned position for position.
        corrupt_attention_mask: LongTensor [N, T].
        dropped: prompts left out and why.
    """

    task: str
    specs: tuple[Any, ...]
    texts: tuple[str, ...]
    input_ids: "torch.Tensor"
    attention_mask: "torch.Tensor"
    positions: dict[str, "torch.Tensor"]
    features: dict[str, list]
    answers: "torch.Tensor"
    wrong_answers: "torch.Tensor"
    corrupt_specs: tuple[Any, ...]
    corrupt_texts: tuple[str, ...]
    corrupt_input_ids: "torch.Tensor"
    corrupt_attention_mask: "torch.Tensor"
    dropped: Dropped = field(default_factory=Dropped)

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def lengths(self) -> "torch.Tensor":
        """Number of real tokens per prompt, LongTensor [N]."""
        return self.attention_mask.sum(dim=1)

    def subset(self, indices: Sequence[int] | "torch.Tensor") -> "PromptSet":
        """The prompts at `indices`, in that order (padding is kept as it is)."""
        import torch

        idx = torch.as_tensor(list(indices) if not torch.is_tensor(indices) else indices,
                              dtype=torch.long)
        picks = idx.tolist()
        return PromptSet(
            task=self.task,
            specs=tuple(self.specs[i] for i in picks),
            texts=tuple(self.texts[i] for i in picks),
            input_ids=self.input_ids[idx],
            attention_mask=self.attention_mask[idx],
            positions={k: v[idx] for k, v in self.positions.items()},
            features={k: [v[i] for i in picks] for k, v in self.features.items()},
            answers=self.answers[idx],
            wrong_answers=self.wrong_answers[idx],
            corrupt_specs=tuple(self.corrupt_specs[i] for i in picks),
            corrupt_texts=tuple(self.corrupt_texts[i] for i in picks),
            corrupt_input_ids=self.corrupt_input_ids[idx],
            corrupt_attention_mask=self.corrupt_attention_mask[idx],
            dropped=self.dropped,
        )

    def position(self, position: str | Position) -> "torch.Tensor":
        """Token indices [N] of a named position, with an optional offset (`S1+1`).

        Raises:
            TaskError: unknown name, or an offset that leaves some prompt.
        """
        if isinstance(position, str):
            position = parse_position(position)
        key = str(position)
        if key in self.positions:
            return self.positions[key]
        if position.name not in self.positions:
            raise TaskError(
                f"task {self.task} defines no position {position.name!r}",
                code="task.unknown-position",
                hint=f"valid positions: {', '.join(self.positions)}",
            )
        index = self.positions[position.name] + position.offset
        bad = (index < 0) | (index >= self.lengths)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            raise TaskError(
                f"position {key} falls outside prompt {first} ({self.texts[first]!r})",
                code="task.position-out-of-range",
                hint="use an offset that stays inside every prompt",
            )
        return index

    def feature(self, name: str) -> list:
        """Per-prompt values of a feature: a task feature, an alias, `token(P)` or `position(P)`.

        `token(P)` is the token id at position P, `position(P)` its index.

        Raises:
            TaskError: the name is none of those.
        """
        if name in self.features:
            return self.features[name]
        match = BUILTIN_FEATURE.match(name.replace(" ", ""))
        if match:
            kind, pos = match.groups()
            index = self.position(pos)
            if kind == "position":
                return index.tolist()
            rows = self.input_ids.gather(1, index[:, None])[:, 0]
            return rows.tolist()
        raise TaskError(
            f"task {self.task} has no feature {name!r}",
            code="task.unknown-feature",
            hint=f"valid features: {', '.join(self.features)}, token(P), position(P)",
        )


def parse_position(text: str) -> Position:
    """`"S1+1"` -> `Position("S1", 1)`: `Position.parse`, the one reading of a position's
    text, as a task error.

    Raises:
        TaskError: the text is not a position name with an optional offset.
    """
    try:
        return Position.parse(text)
    except ValueError:
        raise TaskError(
            f"{text!r} is not a position",
            code="task.bad-position",
            hint="write a name with an optional offset, like END or S1+1",
        ) from None
