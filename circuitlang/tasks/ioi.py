"""Indirect object identification (Wang et al. 2022, arXiv:2211.00593).

Takes a tokenizer (or none) and parameters; gives IOI prompt specs, prompt sets with
the positions `IO`, `S1`, `S1+1`, `S2`, `END`, the features `IO`, `S`, `template`,
`order` (alias `name` -> `IO`), the ABC counterfactual distribution, and the metrics
`logit_diff`, `prob_diff`, `loss`, `kl`.

A prompt is one of the paper's fifteen templates in ABBA or BABA order, with two
distinct names, a place and an object::

    ABBA: "Then, Mary and John went to the store. John gave a drink to"  -> " Mary"
    BABA: "Then, John and Mary went to the store. John gave a drink to"  -> " Mary"

`IO` is the indirect object (the answer), `S` the subject (named twice, at `S1` and
`S2`). The ABC distribution (the paper's p_ABC) keeps template, place and object and
puts three fresh distinct names at IO, S1 and S2, which removes the duplicated-name
signal the circuit relies on.

The data below are the paper's (Figure 14 / the authors' `ioi_dataset.py`): the
templates in BABA form (`[B]` = S, `[A]` = IO); the ABBA form swaps the first `[B]`
and `[A]`. The final `[A]` is the answer and not part of the prompt.
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

BABA_TEMPLATES: tuple[str, ...] = (
    "Then, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a lot of fun at the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] were working at the [PLACE]. [B] decided to give a [OBJECT] to [A]",
    "Then, [B] and [A] were thinking about going to the [PLACE]. [B] wanted to give a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument, and afterwards [B] said to [A]",
    "After [B] and [A] went to the [PLACE], [B] gave a [OBJECT] to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give it to [A]",
    "When [B] and [A] got a [OBJECT] at the [PLACE], [B] decided to give the [OBJECT] to [A]",
    "While [B] and [A] were working at the [PLACE], [B] gave a [OBJECT] to [A]",
    "While [B] and [A] were commuting to the [PLACE], [B] gave a [OBJECT] to [A]",
    "After the lunch, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Afterwards, [B] and [A] went to the [PLACE]. [B] gave a [OBJECT] to [A]",
    "Then, [B] and [A] had a long argument. Afterwards [B] said to [A]",
    "The [PLACE] [B] and [A] went to had a [OBJECT]. [B] gave it to [A]",
    "Friends [B] and [A] found a [OBJECT] at the [PLACE]. [B] gave it to [A]",
)


def _to_abba(template: str) -> str:
    """Swap the first `[B]` and the first `[A]` (the paper's ABBA construction)."""
    first_b = template.index("[B]")
    first_a = template.index("[A]")
    chars = list(template)
    chars[first_b + 1] = "A"
    chars[first_a + 1] = "B"
    return "".join(chars)


ABBA_TEMPLATES: tuple[str, ...] = tuple(_to_abba(t) for t in BABA_TEMPLATES)

#: The paper's first names (`ioi_dataset.py`). Which are single tokens depends on
#: the tokenizer; `IOITask.names` keeps those that are, `dropped_names` the rest.
NAMES: tuple[str, ...] = (
    "Aaron", "Adam", "Alan", "Alex", "Alice", "Amy", "Anderson", "Andre", "Andrew",
    "Andy", "Anna", "Anthony", "Arthur", "Austin", "Blake", "Brandon", "Brian",
    "Carter", "Charles", "Charlie", "Christian", "Christopher", "Clark", "Cole",
    "Collins", "Connor", "Crew", "Crystal", "Daniel", "David", "Dean", "Edward",
    "Elizabeth", "Emily", "Eric", "Eva", "Ford", "Frank", "George", "Georgia",
    "Graham", "Grant", "Henry", "Ian", "Jack", "Jacob", "Jake", "James", "Jamie",
    "Jane", "Jason", "Jay", "Jennifer", "Jeremy", "Jessica", "John", "Jonathan",
    "Jordan", "Joseph", "Joshua", "Justin", "Kate", "Kelly", "Kevin", "Kyle", "Laura",
    "Leon", "Lewis", "Lisa", "Louis", "Luke", "Madison", "Marco", "Marcus", "Maria",
    "Mark", "Martin", "Mary", "Matthew", "Max", "Michael", "Michelle", "Morgan",
    "Patrick", "Paul", "Peter", "Prince", "Rachel", "Richard", "River", "Robert",
    "Roman", "Rose", "Ruby", "Russell", "Ryan", "Sarah", "Scott", "Sean", "Simon",
    "Stephen", "Steven", "Sullivan", "Taylor", "Thomas", "Tyler", "Victoria",
    "Warren", "William",
)

PLACES: tuple[str, ...] = (
    "store", "garden", "restaurant", "school", "hospital", "office", "house", "station",
)

OBJECTS: tuple[str, ...] = (
    "ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack",
)

ORDERS: tuple[str, ...] = ("ABBA", "BABA")

SIGNATURE = TaskSignature(
    name="ioi",
    positions=("IO", "S1", "S1+1", "S2", "END"),
    features=("IO", "S", "template", "order", "place", "object"),
    metrics=("logit_diff", "prob_diff", "loss", "kl"),
    default_metric="logit_diff",
    aliases=(("name", "IO"),),
    description="indirect object identification (Wang et al. 2022): "
    "'When Mary and John went to the store, John gave a drink to' -> ' Mary'",
)

_SLOT = re.compile(r"\[(A|B|PLACE|OBJECT)\]")


@dataclass(frozen=True, slots=True)
class IOISpec(Spec):
    """One IOI prompt, abstractly.

    Attributes:
        template: index into the fifteen templates (0-14).
        order: "ABBA" (IO named first) or "BABA" (S named first).
        io: the indirect object, the correct answer.
        s: the subject, named at S1 (and at S2 unless `s2` is set).
        place: fills `[PLACE]`.
        obj: fills `[OBJECT]`.
        s2: the name at S2 when it is not `s` (the ABC counterfactual), else None.
    """

    template: int
    order: str
    io: str
    s: str
    place: str = PLACES[0]
    obj: str = OBJECTS[0]
    s2: str | None = None

    def _render(self) -> tuple[str, dict[str, tuple[int, int]]]:
        table = ABBA_TEMPLATES if self.order == "ABBA" else BABA_TEMPLATES
        template = table[self.template]
        template = template[: template.rindex(" [A]")]  # the answer is not in the prompt
        fill = {"A": self.io, "PLACE": self.place, "OBJECT": self.obj}
        parts: list[str] = []
        spans: dict[str, tuple[int, int]] = {}
        length, last, seen_b = 0, 0, 0
        for match in _SLOT.finditer(template):
            parts.append(template[last:match.start()])
            length += match.start() - last
            slot = match.group(1)
            if slot == "B":
                word = self.s if seen_b == 0 or self.s2 is None else self.s2
                spans["S1" if seen_b == 0 else "S2"] = (length, length + len(word))
                seen_b += 1
            else:
                word = fill[slot]
                if slot == "A":
                    spans["IO"] = (length, length + len(word))
            parts.append(word)
            length += len(word)
            last = match.end()
        parts.append(template[last:])
        return "".join(parts), spans

    @property
    def text(self) -> str:
        return self._render()[0]

    def word_spans(self) -> dict[str, tuple[int, int]]:
        return self._render()[1]

    def features(self) -> dict[str, Any]:
        return {"IO": self.io, "S": self.s, "template": self.template,
                "order": self.order, "place": self.place, "object": self.obj}

    def answer_texts(self) -> tuple[str, ...]:
        return (" " + self.io,)

    def wrong_answer_texts(self) -> tuple[str, ...]:
        return (" " + self.s,)


class IOITask(Task):
    """Indirect object identification; see the module docstring.

    Parameters (besides `n`, `seed`, `prepend_bos`):
        template_set: "both" (default), "ABBA" or "BABA".
        templates: indices of the templates to use (default all fifteen).
        names, places, objects: override the paper's lists.
        corruption: "abc" (the paper's p_ABC, default).
    """

    #: What the counterfactual changes (patching experiments and the solver's `corrupt`
    #: ablation read it; the report says it beside them).
    CORRUPTION = (
        "the ABC distribution: the same template with three fresh names for IO, S and S2, so "
        "every path that carries a name differs and everything the template fixes (positions, "
        "place, object) is the same"
    )

    SIGNATURE = SIGNATURE
    PARAMS = {"template_set": "both", "templates": None, "names": None, "places": None,
              "objects": None, "corruption": "abc"}
    PARAM_TYPES = {
        "template_set": ParamType("str", "which word orders", ("both", "ABBA", "BABA")),
        "templates": ParamType("list[int]", "indices of the templates to use (default all 15)"),
        "names": ParamType("list[str]", "names for IO and S (default the paper's)"),
        "places": ParamType("list[str]", "places (default the paper's)"),
        "objects": ParamType("list[str]", "objects (default the paper's)"),
        "corruption": ParamType("str", "the counterfactual", ("abc",)),
    }
    TOKEN_FEATURES = {"IO": ("IO",), "S1": ("S",), "S2": ("S",), "S1+1": ("template", "order"),
                      "END": ("template",)}
    POSITION_FEATURES = {p: ("template", "order", "place", "object")
                         for p in ("IO", "S1", "S1+1", "S2", "END")}

    def __init__(self, tokenizer: Any = None, **params: Any):
        super().__init__(tokenizer, **params)
        p = self.params
        orders = {"both": ORDERS, "ABBA": ("ABBA",), "BABA": ("BABA",)}
        if p["template_set"] not in orders:
            raise TaskError(f"template_set must be one of both, ABBA, BABA; "
                            f"got {p['template_set']!r}", code="task.bad-param",
                            hint="template_set='both'")
        self.orders: tuple[str, ...] = orders[p["template_set"]]
        templates = range(len(BABA_TEMPLATES)) if p["templates"] is None else p["templates"]
        self.templates: tuple[int, ...] = tuple(templates)
        bad = [t for t in self.templates
               if not isinstance(t, int) or not 0 <= t < len(BABA_TEMPLATES)]
        if bad or not self.templates:
            raise TaskError(f"templates must be indices 0-{len(BABA_TEMPLATES) - 1}; "
                            f"got {bad or 'none'}", code="task.bad-param",
                            hint="for example templates=[0, 1, 2]")
        if p["corruption"] != "abc":
            raise TaskError(f"IOI corruption {p['corruption']!r} is not defined",
                            code="task.bad-param", hint="valid corruptions: abc")
        self.places: tuple[str, ...] = tuple(p["places"] or PLACES)
        self.objects: tuple[str, ...] = tuple(p["objects"] or OBJECTS)
        self.names, self.dropped_names = self._filter_words(
            p["names"] or NAMES, prefix="Then,", what="names")
        if len(self.names) < 4:
            raise TaskError(
                f"IOI needs at least 4 single-token names (IO, S and three for the ABC "
                f"counterfactual); {len(self.names)} left after dropping "
                f"{len(self.dropped_names)}", code="task.too-few-names",
                hint="pass names=[...] with more names the tokenizer has as single tokens")

    def vocabulary(self) -> list[str]:
        words: list[str] = []
        texts = [t.replace("[A]", "").replace("[B]", "").replace("[PLACE]", "")
                 .replace("[OBJECT]", "") for t in BABA_TEMPLATES]
        for text in texts:
            words.extend(re.findall(r"\w+|[^\w\s]", text))
        words.extend(self.names + self.places + self.objects)
        return list(dict.fromkeys(words))

    def _sample_one(self, rng: random.Random) -> IOISpec:
        io, s = rng.sample(self.names, 2)
        return IOISpec(template=rng.choice(self.templates), order=rng.choice(self.orders),
                       io=io, s=s, place=rng.choice(self.places), obj=rng.choice(self.objects))

    def _corrupt(self, spec: IOISpec, rng: random.Random) -> IOISpec:
        fresh = [n for n in self.names if n not in (spec.io, spec.s)]
        pool = fresh if len(fresh) >= 3 else list(self.names)
        a, b, c = rng.sample(pool, 3)
        return IOISpec(template=spec.template, order=spec.order, io=a, s=b,
                       place=spec.place, obj=spec.obj, s2=c)

    def _spec_strategy(self, fixed: dict[str, Any]) -> "SearchStrategy":
        from hypothesis import strategies as st

        names = self.names

        @st.composite
        def specs(draw: Any) -> IOISpec:
            template = draw(fixed_or(fixed, "template", st.sampled_from(self.templates)))
            order = draw(fixed_or(fixed, "order", st.sampled_from(self.orders)))
            if "IO" in fixed:
                io = fixed["IO"]
                s = fixed.get("S") or draw(st.sampled_from([n for n in names if n != io]))
            elif "S" in fixed:
                s = fixed["S"]
                io = draw(st.sampled_from([n for n in names if n != s]))
            else:
                io = draw(st.sampled_from(names))
                s = draw(st.sampled_from([n for n in names if n != io]))
            place = draw(fixed_or(fixed, "place", st.sampled_from(self.places)))
            obj = draw(fixed_or(fixed, "object", st.sampled_from(self.objects)))
            return IOISpec(template=template, order=order, io=io, s=s, place=place, obj=obj)

        return specs()
