"""Custom tasks from a JSONL file of prompt pairs, as text or as token ids.

Takes a path to a JSONL file (one JSON object per line, blank lines ignored) and a
tokenizer (or none, for token ids); gives a task whose prompts are the file's
records. A text record is the format other circuit tools use, plus two optional
fields::

    {"clean": "When Mary and John went to the store, John gave a drink to",
     "corrupt": "When Alice and Bob went to the store, Carl gave a drink to",
     "answers": [" Mary"], "wrong_answers": [" John"],
     "positions": {"IO": "Mary", "S2": [40, 44]},      # optional
     "features": {"template": 3}}                      # optional

A token-id record gives `clean` and `corrupt` as lists of ids (of equal length, used
exactly as given: put a BOS id first yourself), answers as ids, and positions as
token indices (negative ones count from the end), so a TransformerLens-style
experiment is one file and needs no tokenizer::

    {"clean": [50256, 464, 3290, 318], "corrupt": [50256, 464, 3797, 318],
     "answers": [257], "positions": {"SUBJ": 2}}

`answers` / `wrong_answers`: a string or a list of strings (continuations of `clean`
that must be one token), or token ids (an int or a list of ints; the only form a
token-id record takes). `wrong_answers` is optional: a file whose records have none
has the metrics that need none (`answer_logit`, `answer_prob`, `loss`, `kl`; default
`answer_logit`); every record has them or none does. `positions`: for text, a
substring of `clean` (its first occurrence) or a `[start, end)` character span; for
ids, a token index. Every record names the same positions and features, and is text
or ids like the first. `features`: scalar values (string, number, bool) by name.

Positions: `END` (the last token) plus the names the records give. Features:
`prompt` (the record's index) plus the names the records give. Counterfactual: the
record's `corrupt`, which must have as many tokens as `clean`. Metrics: `logit_diff`
(default, with wrong answers), `prob_diff`, `loss`, `kl`, `answer_logit`,
`answer_prob`. A bad record raises `TaskError` at `file:line` naming the field and
what was expected; a file that is not UTF-8 says where it stops being so.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from circuitlang.errors import Span, TaskError
from circuitlang.tasks.base import Spec, Task
from circuitlang.tasks.params import ParamType
from circuitlang.tasks.signature import TaskSignature

if TYPE_CHECKING:  # pragma: no cover
    from hypothesis.strategies import SearchStrategy

REQUIRED = ("clean", "corrupt", "answers")
OPTIONAL = ("wrong_answers", "positions", "features")
METRICS = ("logit_diff", "prob_diff", "loss", "kl", "answer_logit", "answer_prob")
#: The metrics of a file whose records name no wrong answers.
METRICS_WITHOUT_WRONG = ("answer_logit", "answer_prob", "loss", "kl")

Answer = Union[str, int]  # a continuation's text, or a token id


@dataclass(frozen=True, slots=True)
class CustomSpec(Spec):
    """One record of a custom task (or its counterfactual, with `is_corrupt`).

    A token-id record has `clean_ids` / `corrupt_ids` and `token_positions`; its
    `clean` / `corrupt` text is for display (decoded by the tokenizer, or the ids).
    """

    index: int
    clean: str
    corrupt: str
    answers: tuple[Answer, ...]
    wrong: tuple[Answer, ...]
    spans: tuple[tuple[str, int, int], ...] = ()
    extra: tuple[tuple[str, Any], ...] = ()
    is_corrupt: bool = False
    clean_ids: tuple[int, ...] | None = None
    corrupt_ids: tuple[int, ...] | None = None
    token_positions: tuple[tuple[str, int], ...] = ()

    @property
    def text(self) -> str:
        return self.corrupt if self.is_corrupt else self.clean

    @property
    def ids(self) -> tuple[int, ...] | None:
        """The token ids of a token-id record (None for a text record)."""
        return self.corrupt_ids if self.is_corrupt else self.clean_ids

    def word_spans(self) -> dict[str, tuple[int, int]]:
        return {} if self.is_corrupt else {n: (s, e) for n, s, e in self.spans}

    def features(self) -> dict[str, Any]:
        return {"prompt": self.index, **dict(self.extra)}

    def answer_texts(self) -> tuple[Answer, ...]:
        return self.answers

    def wrong_answer_texts(self) -> tuple[Answer, ...]:
        return self.wrong


def _fail(path: str, line: int, message: str, hint: str) -> TaskError:
    return TaskError(message, code="task.bad-record", span=Span(line, 1, line, 2, path),
                     hint=hint)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _answers(value: Any, field: str, path: str, line: int, ids_only: bool) -> tuple[Answer, ...]:
    items = value if isinstance(value, list) else [value]
    if items and all(_is_id(v) for v in items):
        return tuple(items)
    if not ids_only and items and all(isinstance(v, str) and v for v in items):
        return tuple(items)
    if ids_only:
        raise _fail(path, line, f"field {field!r} of a token-id record must be a token id or "
                    f"a non-empty list of token ids, got {json.dumps(value)}",
                    f'for example "{field}": [257]')
    raise _fail(path, line, f"field {field!r} must be a string, a token id, or a non-empty "
                f"list of strings or of token ids, got {json.dumps(value)}",
                f'for example "{field}": [" Mary"]')


def _read_text(path: str) -> list[str]:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TaskError(f"cannot read custom task file {path!r}: {exc.strerror}",
                        code="task.file-not-found",
                        hint="give the path to a .jsonl file of prompt pairs") from None
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise _fail(path, line, f"the file is not UTF-8 text ({exc.reason} at byte "
                    f"{exc.start:,})", "save it as UTF-8 (JSON files are UTF-8)") from None


def read_records(path: str | Path) -> list[CustomSpec]:
    """Parse and validate a custom-task JSONL file.

    Raises:
        TaskError: the file is missing or not UTF-8, or a record is malformed (at
            file:line).
    """
    path = str(path)
    lines = _read_text(path)
    records: list[CustomSpec] = []
    first: dict[str, Any] | None = None  # what line 1's record fixes for every other
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        spec, shape = _record(raw, number, path, len(records))
        if first is None:
            first = dict(shape, line=number)
        else:
            for key, what in (("ids", "token ids" if shape["ids"] else "text"),
                              ("positions", None), ("features", None), ("wrong", None)):
                if shape[key] == first[key]:
                    continue
                if key == "ids":
                    other = "token ids" if first["ids"] else "text"
                    raise _fail(path, number, f"this record is {what}, but line "
                                f"{first['line']} is {other}",
                                "every record of a file is text, or every record token ids")
                if key == "wrong":
                    has = "has" if shape["wrong"] else "has no"
                    had = "has" if first["wrong"] else "has none"
                    raise _fail(path, number, f"this record {has} wrong_answers, but line "
                                f"{first['line']} {had}",
                                "give every record wrong_answers, or none (then use "
                                "metric answer_logit or answer_prob)")
                raise _fail(path, number, f"record names {key} {list(shape[key])}, but line "
                            f"{first['line']} names {list(first[key])}",
                            f"every record must name the same {key}")
        records.append(spec)
    if not records:
        raise TaskError(f"custom task file {path!r} has no records", code="task.empty-file",
                        hint='write one {"clean", "corrupt", "answers", "wrong_answers"} '
                        "object per line")
    return records


def _record(raw: str, number: int, path: str, index: int) -> tuple[CustomSpec, dict]:
    """One line's record, and what every other record must share with it."""
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        msg = f"{exc.msg} (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) \
            else "nested too deeply"
        raise _fail(path, number, f"not valid JSON: {msg}",
                    'each line must be one JSON object like {"clean": ..., '
                    '"corrupt": ..., "answers": ..., "wrong_answers": ...}') from None
    if not isinstance(record, dict):
        raise _fail(path, number, f"a record must be a JSON object, got "
                    f"{type(record).__name__}", "write one {...} object per line")
    missing = [f for f in REQUIRED if f not in record]
    if missing:
        raise _fail(path, number, f"record is missing field {missing[0]!r}",
                    f"every record needs {', '.join(REQUIRED)} (and may have "
                    f"{', '.join(OPTIONAL)})")
    unknown = [f for f in record if f not in REQUIRED + OPTIONAL]
    if unknown:
        raise _fail(path, number, f"unknown field {unknown[0]!r}",
                    f"valid fields: {', '.join(REQUIRED + OPTIONAL)}")
    as_ids = isinstance(record["clean"], list)
    clean_ids = corrupt_ids = None
    if as_ids:
        for field in ("clean", "corrupt"):
            value = record[field]
            if not (isinstance(value, list) and value and all(_is_id(v) for v in value)):
                raise _fail(path, number, f"field {field!r} of a token-id record must be a "
                            f"non-empty list of token ids, got {json.dumps(value)[:80]}",
                            f'"{field}": [50256, 464, 3290]')
        clean_ids, corrupt_ids = tuple(record["clean"]), tuple(record["corrupt"])
        if len(clean_ids) != len(corrupt_ids):
            raise _fail(path, number, f"'corrupt' has {len(corrupt_ids)} token ids, 'clean' "
                        f"has {len(clean_ids)}", "a counterfactual has as many tokens as its "
                        "prompt")
        clean = " ".join(map(str, clean_ids))
        corrupt = " ".join(map(str, corrupt_ids))
    else:
        for field in ("clean", "corrupt"):
            if not isinstance(record[field], str) or not record[field]:
                raise _fail(path, number, f"field {field!r} must be a non-empty string (or, "
                            f"for a token-id record, a list of ids), got "
                            f"{json.dumps(record[field])[:80]}", f'"{field}": "some prompt"')
        clean, corrupt = record["clean"], record["corrupt"]
    answers = _answers(record["answers"], "answers", path, number, as_ids)
    wrong: tuple[Answer, ...] = ()
    if "wrong_answers" in record:
        wrong = _answers(record["wrong_answers"], "wrong_answers", path, number, as_ids)
    positions = record.get("positions", {})
    if not isinstance(positions, dict):
        raise _fail(path, number, "field 'positions' must be an object of name -> "
                    + ("token index" if as_ids else "substring or [start, end]"),
                    '"positions": {"IO": 3}' if as_ids else '"positions": {"IO": "Mary"}')
    spans, token_positions = [], []
    for name, where in positions.items():
        if not name.isidentifier() or not name.isascii() or name in ("END", "all"):
            raise _fail(path, number, f"position name {name!r} is not allowed",
                        "use an identifier other than END and all")
        if as_ids:
            size = len(clean_ids)
            if not (isinstance(where, int) and not isinstance(where, bool)
                    and -size <= where < size):
                raise _fail(path, number, f"position {name!r} must be a token index of "
                            f"'clean' (0-{size - 1}, or negative from the end), got "
                            f"{json.dumps(where)}", f'"positions": {{"{name}": 0}}')
            token_positions.append((name, where % size))
        elif isinstance(where, str):
            start = clean.find(where)
            if start < 0 or not where:
                raise _fail(path, number, f"position {name!r}: {where!r} does not occur "
                            "in 'clean'", "give a substring of the clean prompt")
            spans.append((name, start, start + len(where)))
        elif (isinstance(where, list) and len(where) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in where)
              and 0 <= where[0] < where[1] <= len(clean)):
            spans.append((name, where[0], where[1]))
        else:
            raise _fail(path, number, f"position {name!r} must be a substring of "
                        f"'clean' or [start, end] within it, got {json.dumps(where)}",
                        f"for example [0, {min(4, len(clean))}]")
    features = record.get("features", {})
    if not isinstance(features, dict) or not all(
            isinstance(v, (str, int, float, bool)) for v in features.values()):
        raise _fail(path, number, "field 'features' must be an object of name -> "
                    "string, number or bool", '"features": {"template": 3}')
    bad = [k for k in features if not k.isidentifier() or not k.isascii() or k == "prompt"]
    if bad:
        raise _fail(path, number, f"feature name {bad[0]!r} is not allowed",
                    "use an identifier other than prompt")
    spec = CustomSpec(index=index, clean=clean, corrupt=corrupt, answers=answers, wrong=wrong,
                      spans=tuple(spans), extra=tuple(sorted(features.items())),
                      clean_ids=clean_ids, corrupt_ids=corrupt_ids,
                      token_positions=tuple(token_positions))
    shape = {"ids": as_ids, "positions": tuple(sorted(positions)),
             "features": tuple(sorted(features)), "wrong": bool(wrong)}
    return spec, shape


def _signature(path: str, records: list[CustomSpec]) -> TaskSignature:
    first = records[0]
    names = [n for n, _, _ in first.spans] + [n for n, _ in first.token_positions]
    with_wrong = bool(first.wrong)
    return TaskSignature(
        name="custom",
        positions=tuple(names) + ("END",),
        features=("prompt",) + tuple(k for k, _ in first.extra),
        metrics=METRICS if with_wrong else METRICS_WITHOUT_WRONG,
        default_metric="logit_diff" if with_wrong else "answer_logit",
        description=f"prompt pairs from {path}",
        params=(("path", str(Path(path).resolve())),),
    )


class CustomTask(Task):
    """A task read from a JSONL file of prompt pairs; see the module docstring.

    Parameters (besides `seed`, `prepend_bos`):
        path: the JSONL file (required).
        n: how many records `sample` draws by default (default: all, in file order).
    """

    #: What the counterfactual changes (patching experiments and the solver's `corrupt`
    #: ablation read it; the report says it beside them).
    CORRUPTION = (
        "each record's own `corrupt` prompt"
    )

    SIGNATURE = TaskSignature("custom", ("END",), ("prompt",), METRICS, "logit_diff",
                              description="prompt pairs from a JSONL file (path=...)")
    COMMON_PARAMS = {"n": None, "seed": 0, "prepend_bos": True}
    PARAMS = {"path": None}
    PARAM_TYPES = {"path": ParamType("path", "the JSONL file of prompt pairs (in a hypothesis "
                                     "file: relative to its folder)")}

    def __init__(self, tokenizer: Any = None, **params: Any):
        if params.get("path") is None:
            raise TaskError("the custom task needs path=... (a JSONL file of prompt pairs)",
                            code="task.bad-param",
                            hint='load_task("custom", path="pairs.jsonl") or '
                            'load_task("pairs.jsonl")')
        self.records = read_records(params["path"])
        self.SIGNATURE = _signature(str(params["path"]), self.records)
        super().__init__(tokenizer, **params)
        if tokenizer is not None and self.records[0].clean_ids is not None:
            self.records = [replace(r, clean=self._decode(r.clean_ids),
                                    corrupt=self._decode(r.corrupt_ids)) for r in self.records]
        self.TOKEN_FEATURES = {}
        self.POSITION_FEATURES = {p: ("prompt",) for p in self.SIGNATURE.positions}

    def _decode(self, ids: tuple[int, ...]) -> str:
        try:
            return self.tokenizer.decode(list(ids))
        except (TypeError, ValueError, OverflowError, IndexError):
            return " ".join(map(str, ids))  # an id the tokenizer lacks: the model decides

    @classmethod
    def signature_for(cls, **params: Any) -> TaskSignature:
        """The signature of the file at `path` (positions and features its records name)."""
        if params.get("path") is None:
            return cls.SIGNATURE
        return _signature(str(params["path"]), read_records(params["path"]))

    def sample(self, n: int | None = None, seed: int | None = None) -> list[CustomSpec]:
        """All records in file order when `n` is None, else `n` drawn without replacement
        (with replacement once `n` exceeds the file)."""
        n = self.params["n"] if n is None else n
        if n is None:
            return list(self.records)
        rng = random.Random(self.seed if seed is None else seed)
        if n <= len(self.records):
            return rng.sample(self.records, n)
        return [rng.choice(self.records) for _ in range(n)]

    def corrupt(self, spec: CustomSpec) -> CustomSpec:
        return replace(spec, is_corrupt=True)

    def _tokenize_one(self, spec: CustomSpec, corrupt: CustomSpec) -> dict[str, Any] | str:
        if spec.clean_ids is None:
            return super()._tokenize_one(spec, corrupt)
        ids = list(spec.clean_ids)  # exactly as given: no BOS is added to token ids
        positions = dict(spec.token_positions)
        positions["END"] = len(ids) - 1
        return {"ids": ids, "positions": positions, "answers": list(spec.answers),
                "wrong": list(spec.wrong), "corrupt_ids": list(spec.corrupt_ids)}

    def _answer_ids(self, spec: Any, texts: tuple[Answer, ...], what: str) -> list[int] | str:
        out = []
        for cont in texts:
            if isinstance(cont, int):  # a token id, as given
                out.append(cont)
                continue
            token = self.continuation_token(spec.text, cont)
            if token is None:
                return f"{what} {cont!r} is not a single token after the prompt"
            out.append(token)
        return out

    def continuation_token(self, prompt: str, continuation: str) -> int | None:
        # Arbitrary user text: use the whole prompt as context, not just its end.
        key = (prompt, continuation)
        if key not in self._continuation_cache:
            base = self._plain_ids(prompt)
            full = self._plain_ids(prompt + continuation)
            ok = full[: len(base)] == base and len(full) == len(base) + 1
            token = full[-1] if ok and not self._is_unknown(full[-1]) else None
            self._continuation_cache[key] = token
        return self._continuation_cache[key]

    def _spec_strategy(self, fixed: dict[str, Any]) -> "SearchStrategy":
        from hypothesis import strategies as st

        matching = [r for r in self.records
                    if all(r.feature(k) == v for k, v in fixed.items())]
        return st.sampled_from(matching)
