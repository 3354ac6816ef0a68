"""Factual recall: "SUBJECT RELATION" -> OBJECT (Meng et al. 2022, ROME's causal tracing).

Takes a JSONL file of facts (or, with no `path`, the built-in synthetic facts the
embedded `toy-facts` model was trained on) and a tokenizer; gives prompts whose
subject span is known token by token, so causal tracing can noise it and report
effects at the subject's tokens.

A record is one fact, in either of two forms::

    {"subject": "Miles Davis", "relation": "plays the", "object": "trumpet"}
    {"subject": "Miles Davis", "prompt": "{} plays the", "object": "trumpet"}

With `relation` the prompt is `subject + " " + relation`; with `prompt`, the text in
which `{}` (exactly once) stands for the subject. The answer is `" " + object`,
which must be one token after the prompt (a prompt whose object is not is dropped,
with the reason, as every task drops prompts it cannot align). A bad record (not
JSON, not an object, a missing or empty field, both or neither of `relation` and
`prompt`, a `prompt` without exactly one `{}`) raises `TaskError` at `file:line`.

Positions: `SUBJ_FIRST` and `SUBJ_LAST` (the subject's first and last token), `END`
(the last token). The *span* `SUBJ` is every token from `SUBJ_FIRST` to `SUBJ_LAST`
(`subject_span(prompts)`); causal tracing noises it. Offsets work as everywhere
(`SUBJ_LAST+1` is the first token after the subject).
Features: `subject`, `relation` (the prompt with the subject taken out), `object`.
Counterfactual: the same relation with another subject of the data (one of as many
words, with a different object when there is one), so activation patching has a
clean/corrupt pair; a pair whose subjects tokenize to different spans is dropped.
Metrics: `answer_prob` (default: the probability of the object, what causal tracing
reads), `answer_logit`, `loss`, `kl`; and, with the counterfactual's object as the
wrong answer, `logit_diff` and `prob_diff`.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from circuitlang.errors import Span, TaskError
from circuitlang.tasks.base import Spec, Task
from circuitlang.tasks.params import ParamType
from circuitlang.tasks.signature import TaskSignature

if TYPE_CHECKING:  # pragma: no cover
    from hypothesis.strategies import SearchStrategy

    from circuitlang.tasks.base import PromptSet

SIGNATURE = TaskSignature(
    name="facts",
    positions=("SUBJ_FIRST", "SUBJ_LAST", "END"),
    features=("subject", "relation", "object"),
    metrics=("answer_prob", "answer_logit", "loss", "kl", "logit_diff", "prob_diff"),
    default_metric="answer_prob",
    description="factual recall (Meng et al. 2022): subject + relation -> object; the subject "
    "span SUBJ is what causal tracing noises (path=facts.jsonl, or the built-in synthetic facts)",
)

#: The built-in synthetic facts (what `toy-facts` was trained on): subjects of two or
#: three words from these lists, each with one object per relation.
SUBJECT_FIRST = ("ala", "bor", "cen", "dar", "eli", "fen", "gor", "hal")
SUBJECT_MIDDLE = ("van", "del")
SUBJECT_LAST = ("kim", "lor", "mux", "nas", "ora", "pel")
RELATIONS: dict[str, tuple[str, ...]] = {
    "lives in": ("paris", "rome", "oslo", "lima", "cairo", "delhi", "tokyo", "quito"),
    "works as": ("baker", "nurse", "pilot", "judge", "miner", "tailor", "farmer", "poet"),
    "plays the": ("piano", "drums", "flute", "harp", "cello", "tuba", "oboe", "lute"),
}
SYNTHETIC_SUBJECTS = 48


def synthetic_facts(n_subjects: int = SYNTHETIC_SUBJECTS, seed: int = 0) -> list[dict[str, str]]:
    """The built-in synthetic facts: `n_subjects` subjects x every relation, as records.

    Subjects are `first last` or `first middle last` (a third of them three words);
    no single word identifies a subject, so a model must combine the subject's tokens.
    Objects are drawn uniformly per (subject, relation), deterministically for `seed`.
    """
    rng = random.Random(seed)
    pairs = [(f, l) for f in SUBJECT_FIRST for l in SUBJECT_LAST]
    rng.shuffle(pairs)
    subjects = []
    for i, (first, last) in enumerate(pairs[:n_subjects]):
        subjects.append(f"{first} {rng.choice(SUBJECT_MIDDLE)} {last}" if i % 3 == 2 else f"{first} {last}")
    return [{"subject": s, "relation": rel, "object": rng.choice(objects)}
            for s in subjects for rel, objects in RELATIONS.items()]


@dataclass(frozen=True, slots=True)
class FactSpec(Spec):
    """One fact: `template` holds `{}` where the subject goes."""

    subject: str
    template: str
    object: str
    wrong: str = ""  # the counterfactual's object, when it differs

    @property
    def text(self) -> str:
        return self.template.replace("{}", self.subject)

    def subject_chars(self) -> tuple[int, int]:
        start = self.template.index("{}")
        return start, start + len(self.subject)

    def features(self) -> dict[str, Any]:
        return {"subject": self.subject, "relation": self.template, "object": self.object}

    def answer_texts(self) -> tuple[str, ...]:
        return (" " + self.object,)

    def wrong_answer_texts(self) -> tuple[str, ...]:
        return (" " + self.wrong,) if self.wrong else ()


def _fail(path: str, line: int, message: str, hint: str) -> TaskError:
    return TaskError(message, code="task.bad-record", span=Span(line, 1, line, 2, path), hint=hint)


_EXAMPLE = '{"subject": "Miles Davis", "relation": "plays the", "object": "trumpet"}'


def parse_fact(record: Any, path: str = "<facts>", line: int = 1) -> FactSpec:
    """One record (a parsed JSON value) as a `FactSpec`.

    Raises:
        TaskError: a record that is not a fact (see the module docstring), at path:line.
    """
    if not isinstance(record, dict):
        raise _fail(path, line, f"a fact must be a JSON object, got {json.dumps(record)[:60]}",
                    f"one object per line, like {_EXAMPLE}")
    unknown = sorted(set(record) - {"subject", "relation", "prompt", "object"})
    if unknown:
        raise _fail(path, line, f"a fact has no field {unknown[0]!r}",
                    "valid fields: subject, relation or prompt, object")
    for name in ("subject", "object"):
        value = record.get(name)
        if not isinstance(value, str) or not value.strip():
            got = "nothing" if value is None else json.dumps(value)
            raise _fail(path, line, f"field {name!r} must be a non-empty string, got {got}",
                        f"for example {_EXAMPLE}")
    has_rel, has_prompt = "relation" in record, "prompt" in record
    if has_rel == has_prompt:
        raise _fail(path, line, "a fact needs exactly one of 'relation' and 'prompt', got "
                    + ("both" if has_rel else "neither"),
                    'relation: the text after the subject ("plays the"); prompt: the whole '
                    'prompt with {} for the subject ("{} plays the")')
    key = "relation" if has_rel else "prompt"
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, line, f"field {key!r} must be a non-empty string, got {json.dumps(value)}",
                    f"for example {_EXAMPLE}")
    template = "{} " + value.strip() if has_rel else value.strip()
    if template.count("{}") != 1:
        raise _fail(path, line, f"field 'prompt' must hold {{}} exactly once (where the subject "
                    f"goes), got {json.dumps(value)}", 'for example "{} plays the"')
    return FactSpec(record["subject"].strip(), template, record["object"].strip())


def read_facts(path: str | Path) -> list[FactSpec]:
    """Parse and validate a JSONL file of facts (blank lines ignored).

    Raises:
        TaskError: the file is missing, not UTF-8, empty, or a record is bad (at file:line).
    """
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TaskError(f"cannot read facts file {path!r}: {exc.strerror}", code="task.file-not-found",
                        hint="give the path to a .jsonl file of facts") from None
    except UnicodeDecodeError as exc:
        raise TaskError(f"facts file {path!r} is not UTF-8 text ({exc.reason})", code="task.bad-record",
                        hint="save it as UTF-8 (JSON files are UTF-8)") from None
    facts = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _fail(path, number, f"not valid JSON: {exc.msg} (column {exc.colno})",
                        f"one object per line, like {_EXAMPLE}") from None
        facts.append(parse_fact(record, path, number))
    if not facts:
        raise TaskError(f"facts file {path!r} has no records", code="task.empty-file",
                        hint=f"write one fact per line, like {_EXAMPLE}")
    return facts


def subject_span(prompts: PromptSet):
    """The subject span `SUBJ` as a BoolTensor [N, T]: True from SUBJ_FIRST to SUBJ_LAST.

    Raises:
        TaskError: the prompts have no SUBJ_FIRST / SUBJ_LAST (not a facts task).
    """
    import torch

    if "SUBJ_FIRST" not in prompts.positions or "SUBJ_LAST" not in prompts.positions:
        raise TaskError(f"task {prompts.task} names no subject span (SUBJ_FIRST..SUBJ_LAST)",
                        code="task.no-subject", hint="causal tracing needs a factual-recall task: task facts")
    t = torch.arange(prompts.input_ids.shape[1])[None]
    first = prompts.positions["SUBJ_FIRST"][:, None]
    last = prompts.positions["SUBJ_LAST"][:, None]
    return (t >= first) & (t <= last)


class FactsTask(Task):
    """Factual recall; see the module docstring.

    Parameters (besides `seed`, `prepend_bos`):
        path: a JSONL file of facts (default: the built-in synthetic facts).
        n: how many facts `sample` draws by default (default: all, in file order).
    """

    CORRUPTION = ("the same relation with another subject (as many words, another object where "
                  "one exists); causal tracing ignores it and noises the subject's embeddings instead")
    SIGNATURE = SIGNATURE
    COMMON_PARAMS = {"n": None, "seed": 0, "prepend_bos": True}
    PARAMS = {"path": None}
    PARAM_TYPES = {"path": ParamType("path", "a JSONL file of facts (default: the built-in "
                                     "synthetic facts of toy-facts)")}
    TOKEN_FEATURES = {"SUBJ_LAST": ("subject",), "SUBJ_FIRST": ("subject",)}
    POSITION_FEATURES = {"SUBJ_FIRST": ("subject", "relation"), "SUBJ_LAST": ("subject", "relation"),
                         "END": ("subject", "relation")}

    def __init__(self, tokenizer: Any = None, **params: Any):
        super().__init__(tokenizer, **params)
        path = self.params["path"]
        if path is None:
            self.facts = [parse_fact(r) for r in synthetic_facts()]
        else:
            self.facts = read_facts(path)

    def vocabulary(self) -> list[str]:
        words = []
        for f in self.facts:
            words += f.text.split() + [f.object]
        return list(dict.fromkeys(words))

    def sample(self, n: int | None = None, seed: int | None = None) -> list[FactSpec]:
        """All facts in order when `n` is None, else `n` drawn without replacement
        (with replacement once `n` exceeds the data)."""
        n = self.params["n"] if n is None else n
        if n is None:
            return list(self.facts)
        rng = random.Random(self.seed if seed is None else seed)
        if n <= len(self.facts):
            return rng.sample(self.facts, n)
        return [rng.choice(self.facts) for _ in range(n)]

    def corrupt(self, spec: FactSpec) -> FactSpec:
        from circuitlang.tasks.base import stable_seed

        rng = random.Random(stable_seed("corrupt", self.seed, spec.subject, spec.template))
        words = len(spec.subject.split())
        same = [f for f in self.facts if f.template == spec.template and f.subject != spec.subject]
        pool = ([f for f in same if len(f.subject.split()) == words and f.object != spec.object]
                or [f for f in same if len(f.subject.split()) == words] or same)
        if not pool:
            return spec
        other = rng.choice(pool)
        wrong = other.object if other.object != spec.object else ""
        return FactSpec(other.subject, other.template, other.object, spec.object if wrong else "")

    def build(self, specs):
        # the counterfactual's object is the clean prompt's wrong answer
        with_wrong = []
        for spec in specs:
            c = self.corrupt(spec)
            with_wrong.append(FactSpec(spec.subject, spec.template, spec.object,
                                       c.object if c.object != spec.object else ""))
        return super().build(with_wrong)

    def _subject_tokens(self, spec: FactSpec, ids: list[int], offsets: list) -> tuple[int, int] | str:
        start, end = spec.subject_chars()
        hits = [j for j, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        if not hits:
            return f"subject {spec.subject!r} covers no token"
        if hits != list(range(hits[0], hits[-1] + 1)):
            return f"subject {spec.subject!r} is not a contiguous run of tokens"
        return hits[0], hits[-1]

    def _tokenize_one(self, spec: FactSpec, corrupt: FactSpec) -> dict[str, Any] | str:
        ids, offsets = self._encode(spec.text)
        span = self._subject_tokens(spec, ids, offsets)
        if isinstance(span, str):
            return span
        answers = self._answer_ids(spec, spec.answer_texts(), "object")
        if isinstance(answers, str):
            return answers
        wrong = self._answer_ids(spec, spec.wrong_answer_texts(), "wrong answer")
        if isinstance(wrong, str):
            wrong = []
        c_ids, c_offsets = self._encode(corrupt.text)
        c_span = self._subject_tokens(corrupt, c_ids, c_offsets)
        if len(c_ids) != len(ids) or c_span != span:
            return (f"counterfactual subject {corrupt.subject!r} does not take the same tokens as "
                    f"{spec.subject!r}")
        return {"ids": ids, "positions": {"SUBJ_FIRST": span[0], "SUBJ_LAST": span[1],
                                          "END": len(ids) - 1},
                "answers": answers, "wrong": wrong, "corrupt_ids": c_ids}

    def _spec_strategy(self, fixed: dict[str, Any]) -> SearchStrategy:
        from hypothesis import strategies as st

        matching = [f for f in self.facts if all(f.feature(k) == v for k, v in fixed.items())]
        if not matching:
            raise TaskError("no fact agrees on " + ", ".join(f"{k}={v!r}" for k, v in fixed.items()),
                            code="task.no-resample", hint="resample on fewer features")
        return st.sampled_from(matching)
