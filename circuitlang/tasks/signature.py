"""What a hypothesis may name about a task, known without a model or tokenizer.

The resolver checks positions, features and metrics against a `TaskSignature`;
the task itself (prompts, strategies, per-prompt position indices) is built later
against a tokenizer. Every task class exposes its signature as a class attribute
`SIGNATURE`, and `circuitlang.tasks.get_signature(name)` finds it by name.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TaskSignature:
    """The names a task defines.

    Attributes:
        name: the task's name (`ioi`, `induction`, ...).
        positions: named token positions (`IO`, `S1`, `S1+1`, `S2`, `END`). Offsets
            from a defined position (`S1+1`) are always allowed; names listed here
            with an offset are just the ones the task documents.
        features: features of a prompt that resampling can agree on (`IO`, `S`,
            `template`, ...). `token(P)` and `position(P)` are built in for every
            position or feature P.
        metrics: metric names the task can compute (`logit_diff`, `prob_diff`,
            `loss`, `kl`).
        default_metric: the metric used when a hypothesis names none.
        aliases: extra feature names mapped to a defined feature (IOI: `name` -> `IO`,
            the name the name movers move).
        description: one line for `circuitlang tasks`.
        params: parameters the names depend on, as (name, value) pairs: a custom
            task's `path` (absolute), which the hypothesis carries to the checker.
    """

    name: str
    positions: tuple[str, ...]
    features: tuple[str, ...]
    metrics: tuple[str, ...]
    default_metric: str
    aliases: tuple[tuple[str, str], ...] = ()
    description: str = ""
    params: tuple[tuple[str, object], ...] = ()

    def feature_names(self) -> tuple[str, ...]:
        return self.features + tuple(a for a, _ in self.aliases)

    def canonical_feature(self, name: str) -> str:
        return dict(self.aliases).get(name, name)
