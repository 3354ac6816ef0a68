"""Greater-than (Hanna, Liu & Variengien 2023, arXiv:2305.00586).

Takes a tokenizer (or none) and parameters; gives prompts
"The {noun} lasted from the year {XX}{YY} to the year {XX}" whose continuation should
be a two-digit year greater than YY, the positions `NOUN`, `XX1`, `YY`, `XX2`, `END`
(`END` is the second XX), the features `YY`, `XX`, `noun`, `year`, the paper's
counterfactual (YY -> 01: "... from the year 1701 to the year 17"), and the metrics
`prob_diff` (default: p(years > YY) - p(years <= YY) summed over two-digit tokens),
`logit_diff`, `loss` (-log p(years > YY)), `kl`.

As in the paper, XX ranges over the centuries 11-17 and YY over 02-98, and a year is
used only where the tokenizer splits "XXYY" into the tokens XX and YY (and "XX01"
into XX and 01); `task.dropped_years` lists the others. The nouns are the paper's
(`cache/potential_nouns.txt` in hannamw/gpt2-greater-than).
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

NOUNS: tuple[str, ...] = (
    "abduction", "accord", "affair", "agreement", "appraisal", "assaults", "assessment",
    "attack", "attempts", "campaign", "captivity", "case", "challenge", "chaos", "clash",
    "collaboration", "coma", "competition", "confrontation", "consequence", "conspiracy",
    "construction", "consultation", "contact", "contract", "convention", "cooperation",
    "custody", "deal", "decline", "decrease", "demonstrations", "development",
    "disagreement", "disorder", "dispute", "domination", "dynasty", "effect", "effort",
    "employment", "endeavor", "engagement", "epidemic", "evaluation", "exchange",
    "existence", "expansion", "expedition", "experiments", "fall", "fame", "flights",
    "friendship", "growth", "hardship", "hostility", "illness", "impact", "imprisonment",
    "improvement", "incarceration", "increase", "insurgency", "invasion", "investigation",
    "journey", "kingdom", "marriage", "modernization", "negotiation", "notoriety",
    "obstruction", "operation", "order", "outbreak", "outcome", "overhaul", "patrols",
    "pilgrimage", "plague", "plan", "practice", "process", "program", "progress",
    "project", "pursuit", "quest", "raids", "reforms", "reign", "relationship",
    "retaliation", "riot", "rise", "rivalry", "romance", "rule", "sanctions", "shift",
    "siege", "slump", "stature", "stint", "strikes", "study", "test", "testing", "tests",
    "therapy", "tour", "tradition", "treaty", "trial", "trip", "unemployment", "voyage",
    "warfare", "work",
)

CENTURIES: tuple[int, ...] = tuple(range(11, 18))
YEARS: tuple[int, ...] = tuple(range(2, 99))  # YY in 02..98
TEMPLATE = "The {noun} lasted from the year {xx}{yy:02d} to the year {xx}"

SIGNATURE = TaskSignature(
    name="greater_than",
    positions=("NOUN", "XX1", "YY", "XX2", "END"),
    features=("YY", "XX", "noun", "year"),
    metrics=("prob_diff", "logit_diff", "loss", "kl"),
    default_metric="prob_diff",
    description="greater-than (Hanna et al. 2023): "
    "'The war lasted from the year 1732 to the year 17' -> a year > 32",
)


@dataclass(frozen=True, slots=True)
class GreaterThanSpec(Spec):
    """One greater-than prompt: noun, century XX (11-17), start year YY (0-99)."""

    noun: str
    xx: int
    yy: int

    @property
    def text(self) -> str:
        return TEMPLATE.format(noun=self.noun, xx=self.xx, yy=self.yy)

    def word_spans(self) -> dict[str, tuple[int, int]]:
        text = self.text
        noun = len("The ")
        first = text.index(" from the year ") + len(" from the year ")
        second = len(text) - len(str(self.xx))
        return {"NOUN": (noun, noun + len(self.noun)),
                "XX1": (first, first + 2), "YY": (first + 2, first + 4),
                "XX2": (second, len(text))}

    def features(self) -> dict[str, Any]:
        return {"YY": self.yy, "XX": self.xx, "noun": self.noun,
                "year": self.xx * 100 + self.yy}

    def answer_texts(self) -> tuple[str, ...]:
        return tuple(f"{y:02d}" for y in range(self.yy + 1, 100))

    def wrong_answer_texts(self) -> tuple[str, ...]:
        return tuple(f"{y:02d}" for y in range(0, self.yy + 1))


class GreaterThanTask(Task):
    """Greater-than; see the module docstring.

    Parameters (besides `n`, `seed`, `prepend_bos`):
        nouns: override the paper's nouns.
        centuries: the XX values (default 11-17).
        years: the YY values (default 2-98).
    """

    #: What the counterfactual changes (patching experiments and the solver's `corrupt`
    #: ablation read it; the report says it beside them).
    CORRUPTION = (
        "the same sentence with the year's last two digits set to 01 ('... from the year 1701 "
        "to the year 17'): only what depends on YY changes"
    )

    SIGNATURE = SIGNATURE
    PARAMS = {"nouns": None, "centuries": None, "years": None}
    PARAM_TYPES = {
        "nouns": ParamType("list[str]", "the event nouns (default the paper's)"),
        "centuries": ParamType("list[int]", "the XX values, 10-99 (default 11-17)"),
        "years": ParamType("list[int]", "the YY values, 1-98 (default 2-98)"),
    }
    TOKEN_FEATURES = {"YY": ("YY",), "XX1": ("XX",), "XX2": ("XX",), "END": ("XX",),
                      "NOUN": ("noun",)}
    POSITION_FEATURES = {p: ("noun",) for p in SIGNATURE.positions}

    def __init__(self, tokenizer: Any = None, **params: Any):
        super().__init__(tokenizer, **params)
        p = self.params
        self.nouns: tuple[str, ...] = tuple(p["nouns"] or NOUNS)
        centuries = tuple(p["centuries"] or CENTURIES)
        years = tuple(p["years"] or YEARS)
        for label, values, low, high in (("centuries", centuries, 10, 99),
                                         ("years", years, 1, 98)):
            bad = [v for v in values if not isinstance(v, int) or not low <= v <= high]
            if bad:
                raise TaskError(f"greater_than {label} must be integers {low}-{high}; got {bad}",
                                code="task.bad-param", hint=f"for example {label}=[...]")
        self.dropped_years: tuple[int, ...] = ()
        self._digit_tokens: dict[tuple[int, int], int] = {}
        if tokenizer is None:
            self.valid: dict[int, tuple[int, ...]] = {xx: years for xx in centuries}
        else:
            self.valid = {}
            dropped = []
            for xx in centuries:
                if not self._splits(xx, 1):
                    dropped.extend(xx * 100 + yy for yy in years)
                    continue
                ok = tuple(yy for yy in years if self._splits(xx, yy))
                dropped.extend(xx * 100 + yy for yy in years if yy not in ok)
                if ok:
                    self.valid[xx] = ok
            self.dropped_years = tuple(dropped)
            if not self.valid:
                raise TaskError(
                    "greater_than: no year XXYY tokenizes as the two tokens XX and YY for "
                    "this tokenizer (the paper's prompts need that)",
                    code="task.no-single-token",
                    hint="use a tokenizer that splits four-digit years into two-digit tokens",
                )
        self.centuries: tuple[int, ...] = tuple(self.valid)

    def _splits(self, xx: int, yy: int) -> bool:
        """Whether "the year XXYY" ends in exactly the tokens XX and YY."""
        base = self._plain_ids("the year")
        enc = self.tokenizer(f"the year {xx}{yy:02d}", add_special_tokens=False,
                             return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if ids[: len(base)] != base or len(ids) != len(base) + 2:
            return False
        text = f"the year {xx}{yy:02d}"
        pieces = [text[a:b].strip() for a, b in offsets[-2:]]
        return pieces == [str(xx), f"{yy:02d}"] and not any(self._is_unknown(i) for i in ids)

    def vocabulary(self) -> list[str]:
        words = re.findall(r"\w+", TEMPLATE.replace("{noun}", "").replace("{xx}{yy:02d}", "")
                           .replace("{xx}", ""))
        words += list(self.nouns) + [str(xx) for xx in self.centuries]
        words += [f"{y:02d}" for y in range(100)]
        return list(dict.fromkeys(words))

    def digit_token(self, digits: str) -> int | None:
        """The vocabulary token that is exactly `digits` ("05"), or None.

        The paper sums probabilities over the 100 two-digit tokens themselves, even
        where "XX05" would not tokenize as XX + 05, so tokens are looked up directly.
        """
        key = (0, int(digits))
        if key not in self._digit_tokens:
            token = self.tokenizer.convert_tokens_to_ids(digits)
            if (token is None or self._is_unknown(token)
                    or self.tokenizer.decode([token]) != digits):
                token = -1
            self._digit_tokens[key] = token
        token = self._digit_tokens[key]
        return None if token < 0 else token

    def _answer_ids(self, spec: Any, texts: tuple[str, ...], what: str) -> list[int] | str:
        # Two-digit strings that are not one token are left out of the sums (for GPT-2
        # all of 00-99 are); at least one must remain.
        ids = [t for t in (self.digit_token(c) for c in texts) if t is not None]
        if texts and not ids:
            return f"no {what} year after {spec.xx} is a single two-digit token"
        return ids

    def _sample_one(self, rng: random.Random) -> GreaterThanSpec:
        xx = rng.choice(self.centuries)
        return GreaterThanSpec(noun=rng.choice(self.nouns), xx=xx, yy=rng.choice(self.valid[xx]))

    def _corrupt(self, spec: GreaterThanSpec, rng: random.Random) -> GreaterThanSpec:
        return GreaterThanSpec(noun=spec.noun, xx=spec.xx, yy=1)

    def _spec_strategy(self, fixed: dict[str, Any]) -> "SearchStrategy":
        from hypothesis import strategies as st

        @st.composite
        def specs(draw: Any) -> GreaterThanSpec:
            noun = draw(fixed_or(fixed, "noun", st.sampled_from(self.nouns)))
            if "year" in fixed:
                xx, yy = divmod(fixed["year"], 100)
            elif "YY" in fixed and "XX" not in fixed:
                yy = fixed["YY"]
                fits = [c for c in self.centuries if yy in self.valid[c]] or self.centuries
                xx = draw(st.sampled_from(fits))
            else:
                xx = draw(fixed_or(fixed, "XX", st.sampled_from(self.centuries)))
                choices = self.valid.get(xx) or tuple(sorted({y for v in self.valid.values()
                                                              for y in v}))
                yy = draw(fixed_or(fixed, "YY", st.sampled_from(choices)))
            return GreaterThanSpec(noun=noun, xx=xx, yy=yy)

        return specs()
