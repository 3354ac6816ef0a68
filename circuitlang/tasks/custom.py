"""Custom tasks from a JSONL file of prompt pairs.

Takes a path to a JSONL file (one JSON object per line, blank lines ignored) and a
tokenizer; gives a task whose prompts are the file's records. Each record is the
format other circuit tools use, plus two optional fields::

    {"clean": "When Mary and John went to the store, John gave a drink to",
     "corrupt": "When Alice and Bob went to the store, Carl gave a drink to",
     "answers": [" Mary"], "wrong_answers": [" John"],
     "positions": {"IO": "Mary", "S2": [40, 44]},      # optional
     "features": {"template": 3}}                      # optional

`answers` / `wrong_answers`: a string or a list of strings, each a continuation of
`clean` that must be one token. `positions`: a substring of `clean` (its first
occurrence) or a `[start, end)` character span, per position name; every record must
name the same positions. `features`: scalar values (string, number, bool) by name.

Positions: `END` plus the names the records give. Features: `prompt` (the record's
index) plus the names the records give. Counterfactual: the record's `corrupt`, which
must tokenize to as many tokens as `clean`. Metrics: `logit_diff` (default),
`prob_diff`, `loss`, `kl`. A bad record raises `TaskError` at `file:line` naming the
field and what was expected.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from circuitlang.errors import Span, TaskError
from circuitlang.tasks.base import Spec, Task
from circuitlang.tasks.signature import TaskSignature

if TYPE_CHECKING:  # pragma: no cover
    from hypothesis.strategies import SearchStrategy

REQUIRED = ("clean", "corrupt", "answers", "wrong_answers")
OPTIONAL = ("positions", "features")
METRICS = ("logit_diff", "prob_diff", "loss", "kl")


@dataclass(frozen=True, slots=True)
class CustomSpec(Spec):
    """One record of a custom task (or its counterfactual, with `is_corrupt`)."""

    index: int
    clean: str
    corrupt: str
    answers: tuple[str, ...]
    wrong: tuple[str, ...]
    spans: tuple[tuple[str, int, int], ...] = ()
    extra: tuple[tuple[str, Any], ...] = ()
    is_corrupt: bool = False

    @property
    def text(self) -> str:
        return self.corrupt if self.is_corrupt else self.clean

    def word_spans(self) -> dict[str, tuple[int, int]]:
        return {} if self.is_corrupt else {n: (s, e) for n, s, e in self.spans}

    def features(self) -> dict[str, Any]:
        return {"prompt": self.index, **dict(self.extra)}

    def answer_texts(self) -> tuple[str, ...]:
        return self.answers

    def wrong_answer_texts(self) -> tuple[str, ...]:
        return self.wrong


def _fail(path: str, line: int, message: str, hint: str) -> TaskError:
    return TaskError(message, code="task.bad-record", span=Span(line, 1, line, 2, path),
                     hint=hint)


def _strings(value: Any, field: str, path: str, line: int) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if (isinstance(value, list) and value
            and all(isinstance(v, str) and v for v in value)):
        return tuple(value)
    raise _fail(path, line, f"field {field!r} must be a string or a non-empty list of "
                f"strings, got {json.dumps(value)}",
                f'for example "{field}": [" Mary"]')


def read_records(path: str | Path) -> list[CustomSpec]:
    """Parse and validate a custom-task JSONL file.

    Raises:
        TaskError: the file is missing, or a record is malformed (at file:line).
    """
    path = str(path)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TaskError(f"cannot read custom task file {path!r}: {exc.strerror}",
                        code="task.file-not-found",
                        hint="give the path to a .jsonl file of prompt pairs") from exc
    records: list[CustomSpec] = []
    names: tuple[str, ...] | None = None
    feature_names: tuple[str, ...] | None = None
    first_line = 0
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _fail(path, number, f"not valid JSON: {exc.msg} (column {exc.colno})",
                        'each line must be one JSON object like {"clean": ..., '
                        '"corrupt": ..., "answers": ..., "wrong_answers": ...}') from exc
        if not isinstance(record, dict):
            raise _fail(path, number, f"a record must be a JSON object, got "
                        f"{type(record).__name__}", "write one {...} object per line")
        missing = [f for f in REQUIRED if f not in record]
        if missing:
            raise _fail(path, number, f"record is missing field {missing[0]!r}",
                        f"every record needs {', '.join(REQUIRED)}")
        unknown = [f for f in record if f not in REQUIRED + OPTIONAL]
        if unknown:
            raise _fail(path, number, f"unknown field {unknown[0]!r}",
                        f"valid fields: {', '.join(REQUIRED + OPTIONAL)}")
        for field in ("clean", "corrupt"):
            if not isinstance(record[field], str) or not record[field]:
                raise _fail(path, number, f"field {field!r} must be a non-empty string, "
                            f"got {json.dumps(record[field])}", f'"{field}": "some prompt"')
        clean = record["clean"]
        answers = _strings(record["answers"], "answers", path, number)
        wrong = _strings(record["wrong_answers"], "wrong_answers", path, number)
        spans = []
        positions = record.get("positions", {})
        if not isinstance(positions, dict):
            raise _fail(path, number, "field 'positions' must be an object of "
                        "name -> substring or [start, end]", '"positions": {"IO": "Mary"}')
        for name, where in positions.items():
            if not name.isidentifier() or name in ("END", "all"):
                raise _fail(path, number, f"position name {name!r} is not allowed",
                            "use an identifier other than END and all")
            if isinstance(where, str):
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
        bad = [k for k in features if not k.isidentifier() or k == "prompt"]
        if bad:
            raise _fail(path, number, f"feature name {bad[0]!r} is not allowed",
                        "use an identifier other than prompt")
        these = tuple(sorted(positions))
        these_f = tuple(sorted(features))
        if names is None:
            names, feature_names, first_line = these, these_f, number
        elif these != names or these_f != feature_names:
            what = "positions" if these != names else "features"
            expected = names if these != names else feature_names
            raise _fail(path, number, f"record names {what} {list(these if what == 'positions' else these_f)}"
                        f", but line {first_line} names {list(expected)}",
                        f"every record must name the same {what}")
        records.append(CustomSpec(index=len(records), clean=clean, corrupt=record["corrupt"],
                                  answers=answers, wrong=wrong, spans=tuple(spans),
                                  extra=tuple(sorted(features.items()))))
    if not records:
        raise TaskError(f"custom task file {path!r} has no records", code="task.empty-file",
                        hint='write one {"clean", "corrupt", "answers", "wrong_answers"} '
                        "object per line")
    return records


def _signature(path: str, records: list[CustomSpec]) -> TaskSignature:
    first = records[0]
    return TaskSignature(
        name="custom",
        positions=tuple(n for n, _, _ in first.spans) + ("END",),
        features=("prompt",) + tuple(k for k, _ in first.extra),
        metrics=METRICS,
        default_metric="logit_diff",
        description=f"prompt pairs from {path}",
    )


class CustomTask(Task):
    """A task read from a JSONL file of prompt pairs; see the module docstring.

    Parameters (besides `seed`, `prepend_bos`):
        path: the JSONL file (required).
        n: how many records `sample` draws by default (default: all, in file order).
    """

    SIGNATURE = TaskSignature("custom", ("END",), ("prompt",), METRICS, "logit_diff",
                              description="prompt pairs from a JSONL file (path=...)")
    COMMON_PARAMS = {"n": None, "seed": 0, "prepend_bos": True}
    PARAMS = {"path": None}

    def __init__(self, tokenizer: Any = None, **params: Any):
        if params.get("path") is None:
            raise TaskError("the custom task needs path=... (a JSONL file of prompt pairs)",
                            code="task.bad-param",
                            hint='load_task("custom", path="pairs.jsonl") or '
                            'load_task("pairs.jsonl")')
        self.records = read_records(params["path"])
        self.SIGNATURE = _signature(str(params["path"]), self.records)
        super().__init__(tokenizer, **params)
        self.TOKEN_FEATURES = {}
        self.POSITION_FEATURES = {p: ("prompt",) for p in self.SIGNATURE.positions}

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
        return CustomSpec(index=spec.index, clean=spec.clean, corrupt=spec.corrupt,
                          answers=spec.answers, wrong=spec.wrong, spans=spec.spans,
                          extra=spec.extra, is_corrupt=True)

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
