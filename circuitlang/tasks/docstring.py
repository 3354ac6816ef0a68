'''Docstring (Heimersheim & Janiak 2023, "A circuit for Python docstrings in a
4-layer attention-only transformer").

Takes a tokenizer (or none) and parameters; gives prompts of a Python function whose
docstring documents its parameters in order and stops where the next one's name is
due::

    def port(self, load, size, files, last):
        """oil column piece

        :param load: crime population
        :param size: unit dark
        :param                         -> " files"

Positions: `A_def`, `B_def`, `C_def` (the first three arguments in the signature),
`A_doc`, `B_doc` (their names after `:param`), `END` (the final `param`).
Features: `A`, `B`, `C` (argument names; alias `answer` -> `C`), `fn`, `desc`,
`param_desc`. The answer is C; the wrong answers are the other argument names.
Counterfactuals (the paper's dataset variants): `random_random` (default: every
argument name, in the signature and the docstring, replaced by fresh random words),
`random_def` (signature only), `random_doc` (docstring only).
Metrics: `logit_diff` (default), `prob_diff`, `loss`, `kl`.

Every word must be a single token after a space for the tokenizer; the others are
dropped (`task.dropped_words`).
'''
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

#: Common short English words (argument names and descriptions are drawn from them).
WORDS: tuple[str, ...] = tuple(
    "load size files last port oil column piece crime population unit dark file "
    "image name data value key model user text line page state mode type node item "
    "path field color shape order group table frame event token query index count "
    "target source result output input server client message error option config "
    "sample label score layer block chunk stream buffer record entry window task "
    "job plan rule level range limit width height depth angle price cost money "
    "store market trade house room door wall floor road car train plane ship boat "
    "river lake sea fire water earth wind light sound voice word song game team "
    "player match card board ball field goal point time date year month week day "
    "hour night morning city town country world place area region zone part side".split()
)
CORRUPTIONS = ("random_random", "random_def", "random_doc")

SIGNATURE = TaskSignature(
    name="docstring",
    positions=("A_def", "B_def", "C_def", "A_doc", "B_doc", "END"),
    features=("A", "B", "C", "fn", "desc", "param_desc"),
    metrics=("logit_diff", "prob_diff", "loss", "kl"),
    default_metric="logit_diff",
    aliases=(("answer", "C"),),
    description="docstring (Heimersheim & Janiak 2023): predict the next :param "
    "name from the function signature",
)


@dataclass(frozen=True, slots=True)
class DocstringSpec(Spec):
    """One docstring prompt.

    Attributes:
        fn: the function name.
        args: the signature's arguments after `self` (at least three; C = args[2]).
        desc: the three words of the docstring's first line.
        param_desc: two words describing each of the first two parameters.
        doc_args: the names after `:param` (default: args[0], args[1]).
    """

    fn: str
    args: tuple[str, ...]
    desc: tuple[str, str, str]
    param_desc: tuple[tuple[str, str], tuple[str, str]]
    doc_args: tuple[str, str] | None = None

    def _render(self) -> tuple[str, dict[str, tuple[int, int]]]:
        parts: list[str] = []
        spans: dict[str, tuple[int, int]] = {}
        length = 0

        def put(piece: str, name: str | None = None) -> None:
            nonlocal length
            if name is not None:
                spans[name] = (length, length + len(piece))
            parts.append(piece)
            length += len(piece)

        put(f"def {self.fn}(self")
        for i, arg in enumerate(self.args):
            put(", ")
            put(arg, ("A_def", "B_def", "C_def")[i] if i < 3 else None)
        put('):\n    """' + " ".join(self.desc) + "\n\n")
        doc = self.doc_args or (self.args[0], self.args[1])
        for name, arg, words in zip(("A_doc", "B_doc"), doc, self.param_desc):
            put("    :param ")
            put(arg, name)
            put(": " + " ".join(words) + "\n")
        put("    :param")
        return "".join(parts), spans

    @property
    def text(self) -> str:
        return self._render()[0]

    def word_spans(self) -> dict[str, tuple[int, int]]:
        return self._render()[1]

    def features(self) -> dict[str, Any]:
        return {"A": self.args[0], "B": self.args[1], "C": self.args[2], "fn": self.fn,
                "desc": self.desc, "param_desc": self.param_desc}

    def answer_texts(self) -> tuple[str, ...]:
        return (" " + self.args[2],)

    def wrong_answer_texts(self) -> tuple[str, ...]:
        return tuple(" " + a for i, a in enumerate(self.args) if i != 2)


class DocstringTask(Task):
    """The docstring task; see the module docstring.

    Parameters (besides `n`, `seed`, `prepend_bos`):
        words: the word list (default `WORDS`).
        n_extra: arguments after C in the signature (default 1, as in the paper's
            example; at most 3).
        corruption: one of `random_random` (default), `random_def`, `random_doc`.
    """

    #: What the counterfactual changes (patching experiments and the solver's `corrupt`
    #: ablation read it; the report says it beside them).
    CORRUPTION = (
        "the `corruption` parameter's variant of the paper (by default every argument name in "
        "the definition and the docstring replaced by fresh words)"
    )

    SIGNATURE = SIGNATURE
    PARAMS = {"words": None, "n_extra": 1, "corruption": "random_random"}
    PARAM_TYPES = {
        "words": ParamType("list[str]", "argument names and descriptions (default WORDS)"),
        "n_extra": ParamType("int", "arguments after C in the signature, 0-3"),
        "corruption": ParamType("str", "the counterfactual", CORRUPTIONS),
    }
    TOKEN_FEATURES = {"A_def": ("A",), "B_def": ("B",), "C_def": ("C",),
                      "A_doc": ("A",), "B_doc": ("B",), "END": ()}
    POSITION_FEATURES = {p: ("fn", "desc", "param_desc") for p in SIGNATURE.positions}

    def __init__(self, tokenizer: Any = None, **params: Any):
        super().__init__(tokenizer, **params)
        p = self.params
        if p["corruption"] not in CORRUPTIONS:
            raise TaskError(f"docstring corruption {p['corruption']!r} is not defined",
                            code="task.bad-param",
                            hint=f"valid corruptions: {', '.join(CORRUPTIONS)}")
        if not isinstance(p["n_extra"], int) or not 0 <= p["n_extra"] <= 3:
            raise TaskError(f"n_extra must be 0-3, got {p['n_extra']!r}",
                            code="task.bad-param", hint="n_extra=1")
        self.words, self.dropped_words = self._filter_words(
            p["words"] or WORDS, prefix="def", what="words")
        self.n_args = 3 + p["n_extra"]
        if len(self.words) < 2 * self.n_args + 2:
            raise TaskError(
                f"docstring needs at least {2 * self.n_args + 2} single-token words; "
                f"{len(self.words)} remain", code="task.too-few-words",
                hint="pass words=[...] with more single-token words")

    def vocabulary(self) -> list[str]:
        skeleton = DocstringSpec("f", ("a", "b", "c"), ("d", "e", "g"),
                                 (("h", "i"), ("j", "k"))).text
        words = re.findall(r"\w+|[^\w\s]+", skeleton) + list(self.words)
        return [w for w in dict.fromkeys(words) if len(w) > 1 or not w.isalpha()]

    def _sample_one(self, rng: random.Random) -> DocstringSpec:
        args = tuple(rng.sample(self.words, self.n_args))
        w = [rng.choice(self.words) for _ in range(8)]
        return DocstringSpec(fn=w[0], args=args, desc=(w[1], w[2], w[3]),
                             param_desc=((w[4], w[5]), (w[6], w[7])))

    def _corrupt(self, spec: DocstringSpec, rng: random.Random) -> DocstringSpec:
        pool = [w for w in self.words if w not in spec.args]
        if len(pool) < self.n_args + 2:
            pool = list(self.words)
        fresh = rng.sample(pool, self.n_args + 2)
        kind = self.params["corruption"]
        args = tuple(fresh[: self.n_args]) if kind != "random_doc" else spec.args
        doc = (tuple(fresh[self.n_args:]) if kind != "random_def"
               else (spec.args[0], spec.args[1]))
        return DocstringSpec(fn=spec.fn, args=args, desc=spec.desc,
                             param_desc=spec.param_desc, doc_args=doc)

    def _spec_strategy(self, fixed: dict[str, Any]) -> "SearchStrategy":
        from hypothesis import strategies as st

        words = self.words
        word = st.sampled_from(words)

        @st.composite
        def specs(draw: Any) -> DocstringSpec:
            pinned = [fixed[k] for k in ("A", "B", "C") if k in fixed]
            args: list[str] = []
            for key in ("A", "B", "C"):
                if key in fixed:
                    args.append(fixed[key])
                else:
                    args.append(draw(word.filter(lambda w: w not in args + pinned)))
            for _ in range(self.n_args - 3):
                args.append(draw(word.filter(lambda w: w not in args)))
            fn = draw(fixed_or(fixed, "fn", word))
            desc = draw(fixed_or(fixed, "desc", st.tuples(word, word, word)))
            param_desc = draw(fixed_or(fixed, "param_desc", st.tuples(
                st.tuples(word, word), st.tuples(word, word))))
            return DocstringSpec(fn=fn, args=tuple(args), desc=desc, param_desc=param_desc)

        return specs()
