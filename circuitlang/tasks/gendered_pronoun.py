"""Gendered pronoun (Mathwin et al. 2023, "Identifying a preliminary circuit for
predicting gendered pronouns in GPT-2 small").

Takes a tokenizer (or none) and parameters; gives prompts
"So {name} is a really great friend, isn't" whose continuation should be " he" for a
male name and " she" for a female one; positions `NAME`, `IS` (the " is" after the
name), `END` (the last token: "'t" for GPT-2); features `name`, `gender`; the
counterfactual swaps the name for one of the other gender; metrics `logit_diff`
(default: correct pronoun minus the other), `prob_diff`, `loss`, `kl`.

Names must be single tokens for the tokenizer; the others are dropped
(`task.dropped_names`).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from circuitlang.errors import TaskError
from circuitlang.tasks.base import Spec, Task, fixed_or
from circuitlang.tasks.params import ParamType
from circuitlang.tasks.signature import TaskSignature

if TYPE_CHECKING:  # pragma: no cover
    from hypothesis.strategies import SearchStrategy

TEMPLATE = "So {name} is a really great friend, isn't"

MALE_NAMES: tuple[str, ...] = (
    "John", "David", "Mark", "Paul", "Ryan", "Gary", "Jack", "Sean", "Carl", "Joe",
    "Michael", "James", "Robert", "William", "Thomas", "Daniel", "Kevin", "Brian",
    "Steven", "Andrew", "Peter", "George", "Frank", "Henry", "Eric", "Adam", "Scott",
    "Jason", "Matthew", "Richard",
)
FEMALE_NAMES: tuple[str, ...] = (
    "Mary", "Lisa", "Anna", "Sarah", "Amy", "Emily", "Laura", "Rachel", "Jessica",
    "Jennifer", "Elizabeth", "Susan", "Karen", "Nancy", "Linda", "Kate", "Jane", "Alice",
    "Rose", "Maria", "Emma", "Julia", "Helen", "Grace", "Sophie", "Claire", "Lucy",
    "Hannah", "Michelle", "Victoria",
)
GENDERS = ("male", "female")
PRONOUNS = {"male": " he", "female": " she"}

SIGNATURE = TaskSignature(
    name="gendered_pronoun",
    positions=("NAME", "IS", "END"),
    features=("name", "gender"),
    metrics=("logit_diff", "prob_diff", "loss", "kl"),
    default_metric="logit_diff",
    description="gendered pronoun (Mathwin et al. 2023): "
    "\"So Mary is a really great friend, isn't\" -> ' she'",
)


@dataclass(frozen=True, slots=True)
class PronounSpec(Spec):
    """One prompt: the name and its gender ("male" or "female")."""

    name: str
    gender: str

    @property
    def text(self) -> str:
        return TEMPLATE.format(name=self.name)

    def word_spans(self) -> dict[str, tuple[int, int]]:
        start = len("So ")
        end = start + len(self.name)
        return {"NAME": (start, end), "IS": (end + 1, end + 3)}

    def features(self) -> dict[str, Any]:
        return {"name": self.name, "gender": self.gender}

    def answer_texts(self) -> tuple[str, ...]:
        return (PRONOUNS[self.gender],)

    def wrong_answer_texts(self) -> tuple[str, ...]:
        other = "female" if self.gender == "male" else "male"
        return (PRONOUNS[other],)


class GenderedPronounTask(Task):
    """The gendered-pronoun task; see the module docstring.

    Parameters (besides `n`, `seed`, `prepend_bos`):
        male_names, female_names: override the name lists.
    """

    #: What the counterfactual changes (patching experiments and the solver's `corrupt`
    #: ablation read it; the report says it beside them).
    CORRUPTION = (
        "the name swapped for one of the other gender; the rest of the sentence is the same"
    )

    SIGNATURE = SIGNATURE
    PARAMS = {"male_names": None, "female_names": None}
    PARAM_TYPES = {
        "male_names": ParamType("list[str]", "names answered with he"),
        "female_names": ParamType("list[str]", "names answered with she"),
    }
    TOKEN_FEATURES = {"NAME": ("name",), "IS": (), "END": ()}
    POSITION_FEATURES = {"NAME": (), "IS": (), "END": ()}

    def __init__(self, tokenizer: Any = None, **params: Any):
        super().__init__(tokenizer, **params)
        p = self.params
        male, dropped_m = self._filter_words(p["male_names"] or MALE_NAMES, "So",
                                             what="male_names")
        female, dropped_f = self._filter_words(p["female_names"] or FEMALE_NAMES, "So",
                                               what="female_names")
        self.names: dict[str, tuple[str, ...]] = {"male": male, "female": female}
        self.dropped_names = dropped_m + dropped_f
        overlap = set(male) & set(female)
        if overlap:
            raise TaskError(f"names listed as both male and female: {sorted(overlap)}",
                            code="task.bad-param", hint="give each name one gender")

    def vocabulary(self) -> list[str]:
        words = re.findall(r"\w+|[^\w\s]", TEMPLATE.replace("{name}", ""))
        words += ["he", "she"] + list(self.names["male"]) + list(self.names["female"])
        return list(dict.fromkeys(words))

    def _sample_one(self, rng: random.Random) -> PronounSpec:
        gender = rng.choice(GENDERS)
        return PronounSpec(name=rng.choice(self.names[gender]), gender=gender)

    def _corrupt(self, spec: PronounSpec, rng: random.Random) -> PronounSpec:
        other = "female" if spec.gender == "male" else "male"
        return PronounSpec(name=rng.choice(self.names[other]), gender=other)

    def _spec_strategy(self, fixed: dict[str, Any]) -> "SearchStrategy":
        from hypothesis import strategies as st

        @st.composite
        def specs(draw: Any) -> PronounSpec:
            if "name" in fixed:
                name = fixed["name"]
                gender = fixed.get("gender") or ("male" if name in self.names["male"]
                                                 else "female")
                return PronounSpec(name=name, gender=gender)
            gender = draw(fixed_or(fixed, "gender", st.sampled_from(GENDERS)))
            return PronounSpec(name=draw(st.sampled_from(self.names[gender])), gender=gender)

        return specs()
