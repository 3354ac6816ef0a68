"""The task interface: prompt specs in, tokenized prompt sets and metrics out.

Takes a task's abstract prompt descriptions (*specs*) and a Hugging Face tokenizer;
gives a `PromptSet` whose every position, answer and counterfactual was found by
token alignment, plus per-prompt metrics and `hypothesis` strategies.

The contract the checker relies on (every task implements it):

* `Task.SIGNATURE` — the names a hypothesis may use (`TaskSignature`).
* `load_task(name, tokenizer=None, **params)` builds a task; unknown parameters raise
  `TaskError` naming the valid ones. Every task accepts `n` and `seed` (defaults of
  `prompts()`), `prepend_bos` (put the tokenizer's BOS token first when it has one and
  does not add it itself; default True, as TransformerLens does).
* A *spec* is a frozen dataclass describing one prompt abstractly (IOI: template,
  order, IO, S, place, object). `spec.text` is the prompt; `spec.feature(name)` its
  value of a feature; `spec.word_spans()` the character span of each named position's
  word; `spec.answer_texts()` / `spec.wrong_answer_texts()` the continuations that
  count as right / wrong (`" Mary"`).
* `task.sample(n, seed)` — deterministic list of specs. `task.corrupt(spec)` — the
  task's counterfactual for that spec (deterministic given the task's seed and spec).
* `task.build(specs) -> PromptSet`; `task.prompts(n, seed) = build(sample(n, seed))`.
  Positions come from the tokenizer's offset mapping: the tokens overlapping a word's
  characters must be exactly one token whose text is that word (up to surrounding
  whitespace). A prompt where that fails, where an answer is not one token, or whose
  counterfactual tokenizes to a different length or puts a named position elsewhere,
  is dropped and the reason recorded in `PromptSet.dropped` — never silently
  misaligned. If every prompt is dropped the build raises `TaskError`.
* `task.metric(name, logits, prompts, reference_logits=None) -> Tensor[N]` reads
  full logits `[N, T, V]` (or logits already taken at `END`, `[N, V]`):
  `logit_diff` = mean logit of the answers minus mean logit of the wrong answers;
  `prob_diff` = summed probability of the answers minus that of the wrong answers
  (greater-than: p(years > YY) - p(years <= YY)); `loss` = -log of the summed
  probability of the answers; `kl` = KL(reference || logits) at END; and, needing
  no wrong answer, `answer_logit` = mean logit of the answers and `answer_prob` =
  their summed probability.
  `task.metric_direction(name)` is +1 when higher is better, -1 otherwise.
* `task.strategy()` — a `hypothesis` strategy of specs shrinking toward the simplest
  prompt (first template, first names); `task.resample_strategy(spec, agree_on)` —
  specs agreeing with `spec` on the named features and free otherwise.
"""
from __future__ import annotations

import random
import zlib
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Sequence

from circuitlang.errors import TaskError
from circuitlang.tasks.metrics import kl_divergence, masked_mean, masked_sum
from circuitlang.tasks.params import ParamType
from circuitlang.tasks.prompt_set import BUILTIN_FEATURE, Dropped, PromptSet, parse_position
from circuitlang.tasks.signature import TaskSignature

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from hypothesis.strategies import SearchStrategy

#: +1: higher is better; -1: lower is better.
METRIC_DIRECTIONS: dict[str, int] = {"logit_diff": 1, "prob_diff": 1, "loss": -1, "kl": -1,
                                     "answer_logit": 1, "answer_prob": 1}

__all__ = ["Dropped", "METRIC_DIRECTIONS", "PromptSet", "Spec", "Task", "check_params",
           "fixed_or", "parse_position", "stable_seed"]


class Spec:
    """Base of every task's prompt spec (subclasses are frozen, slotted dataclasses)."""

    __slots__ = ()

    @property
    def text(self) -> str:  # pragma: no cover - every subclass defines it
        raise TypeError(f"{type(self).__name__} does not define .text")

    def features(self) -> dict[str, Any]:
        """Every feature of this prompt, by canonical name."""
        raise TypeError(f"{type(self).__name__} does not define .features()")

    def feature(self, name: str) -> Any:
        """This prompt's value of feature `name` (a hashable value).

        Raises:
            TaskError: the spec has no such feature.
        """
        values = self.features()
        if name not in values:
            raise TaskError(
                f"{type(self).__name__} has no feature {name!r}",
                code="task.unknown-feature",
                hint=f"valid features: {', '.join(sorted(values))}",
            )
        return values[name]

    def word_spans(self) -> dict[str, tuple[int, int]]:
        """Character span `[start, end)` in `text` of each named position's word."""
        return {}

    def answer_texts(self) -> tuple[str, ...]:
        """Continuations of `text` that count as correct (each must be one token)."""
        return ()

    def wrong_answer_texts(self) -> tuple[str, ...]:
        """Continuations of `text` that count as wrong (each must be one token)."""
        return ()


def stable_seed(*parts: Any) -> int:
    """A seed that is the same in every process (unlike `hash` on strings)."""
    return zlib.crc32(repr(parts).encode("utf-8"))


def check_params(task: str, given: dict[str, Any], allowed: dict[str, Any],
                 types: dict[str, "ParamType"] | None = None) -> dict[str, Any]:
    """Merge `given` over the defaults in `allowed`.

    Raises:
        TaskError: an unknown name (the message lists the valid ones), or a value not
            of its parameter's type in `types` (None, a default, is always accepted).
    """
    from circuitlang.tasks.params import check_value

    unknown = sorted(set(given) - set(allowed))
    if unknown:
        valid = ", ".join(f"{n} ({types[n].describe()})" if types and n in types else n
                          for n in sorted(allowed))
        raise TaskError(
            f"task {task} has no parameter {unknown[0]!r}",
            code="task.unknown-param",
            hint=f"valid parameters: {valid}",
        )
    merged = dict(allowed)
    for name, value in given.items():
        if types and name in types and value is not None:
            value = check_value(task, name, types[name], value)
        merged[name] = value
    return merged


class Task:
    """Base class of every task; see the module docstring for the contract.

    Subclasses set `SIGNATURE` and `PARAMS` (name -> default), and implement
    `_sample_one(rng)`, `_corrupt(spec, rng)` and `_spec_strategy(fixed)`.
    """

    SIGNATURE: ClassVar[TaskSignature]
    PARAMS: ClassVar[dict[str, Any]] = {}
    #: name -> `ParamType` of each of `PARAMS` (`circuitlang tasks` lists them).
    PARAM_TYPES: ClassVar[dict[str, "ParamType"]] = {}
    COMMON_PARAMS: ClassVar[dict[str, Any]] = {"n": 100, "seed": 0, "prepend_bos": True}
    COMMON_PARAM_TYPES: ClassVar[dict[str, "ParamType"]] = {
        "n": ParamType("int", "prompts drawn by default"),
        "seed": ParamType("int", "seed of the default draw"),
        "prepend_bos": ParamType("bool", "put the tokenizer's BOS token first (when it has "
                                 "one and does not add it itself)"),
    }
    #: position name -> features that fix the token there (for `token(P)` agreement).
    TOKEN_FEATURES: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: position name -> features that fix its index (for `position(P)` agreement).
    POSITION_FEATURES: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: what the counterfactual prompt changes, in a sentence; the report prints it
    #: beside patching experiments. Every built-in task says; a user's may leave None.
    CORRUPTION: ClassVar[str | None] = None

    def __init__(self, tokenizer: Any = None, **params: Any):
        from circuitlang.tasks.params import param_types

        allowed = {**self.COMMON_PARAMS, **self.PARAMS}
        self.params = check_params(self.SIGNATURE.name, params, allowed,
                                   param_types(type(self)))
        self.tokenizer = tokenizer
        if tokenizer is not None and not getattr(tokenizer, "is_fast", False):
            raise TaskError(
                f"task {self.SIGNATURE.name} needs a fast tokenizer (offset mappings); "
                f"got {type(tokenizer).__name__}",
                code="task.slow-tokenizer",
                hint="load it with AutoTokenizer.from_pretrained(..., use_fast=True)",
            )
        n = self.params["n"]
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 1):
            raise TaskError(f"n must be a positive integer, got {n!r}", code="task.bad-param",
                            hint="for example n=100")
        self.dropped_names: tuple[str, ...] = ()
        #: the shape of the model the prompts are for; when set (`for_model`), `build`
        #: refuses prompts longer than its context or ids outside its vocabulary
        self.model_shape: Any = None
        self._encode_cache: dict[str, Any] = {}
        self._continuation_cache: dict[tuple[str, str], int | None] = {}

    # -- names and metadata -------------------------------------------------------
    @property
    def name(self) -> str:
        return self.SIGNATURE.name

    @property
    def seed(self) -> int:
        return self.params["seed"]

    def metric_direction(self, name: str) -> int:
        """+1 if higher values of metric `name` are better, -1 if lower are."""
        self._check_metric(name)
        return METRIC_DIRECTIONS[name]

    def vocabulary(self) -> list[str]:
        """Every word the task's prompts and answers use (to build word-level tokenizers)."""
        return []

    def describe(self) -> dict[str, Any]:
        """Positions, features, metrics and parameters, for `circuitlang tasks`."""
        sig = self.SIGNATURE
        return {
            "name": sig.name,
            "description": sig.description,
            "positions": list(sig.positions),
            "features": list(sig.features),
            "aliases": dict(sig.aliases),
            "metrics": list(sig.metrics),
            "default_metric": sig.default_metric,
            "params": dict(self.params),
        }

    # -- sampling -------------------------------------------------------------------
    def sample(self, n: int | None = None, seed: int | None = None) -> list[Any]:
        """`n` specs drawn with `seed` (defaults: the task's `n` and `seed`)."""
        n = self.params["n"] if n is None else n
        seed = self.seed if seed is None else seed
        rng = random.Random(stable_seed(self.name, seed))
        return [self._sample_one(rng) for _ in range(n)]

    def corrupt(self, spec: Any) -> Any:
        """The counterfactual of `spec`, the same for the same task seed and spec."""
        return self._corrupt(spec, random.Random(stable_seed("corrupt", self.seed, spec)))

    def for_model(self, shape: Any) -> "Task":
        """Build prompts for a model of this `ModelShape` from now on.

        `build` then refuses a prompt longer than the model's context (`n_ctx`) or a
        token id outside its vocabulary, with a `TaskError` that says which, instead
        of an index error deep in the model's forward pass.

        Returns:
            The task itself.
        """
        self.model_shape = shape
        return self

    def prompts(self, n: int | None = None, seed: int | None = None) -> PromptSet:
        """`build(sample(n, seed))`."""
        return self.build(self.sample(n, seed))

    def _sample_one(self, rng: random.Random) -> Any:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} does not define _sample_one")

    def _corrupt(self, spec: Any, rng: random.Random) -> Any:  # pragma: no cover
        raise TypeError(f"{type(self).__name__} does not define _corrupt")

    # -- tokenization ---------------------------------------------------------------
    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise TaskError(
                f"task {self.name} was loaded without a tokenizer, so it can sample specs "
                "and texts but not token ids",
                code="task.no-tokenizer",
                hint="pass tokenizer=... to load_task (a model's tokenizer); on the command "
                "line, --tokenizer PATH gives a model folder without one its tokenizer",
            )
        return self.tokenizer

    def _encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character offsets of `text`, BOS handled per `prepend_bos`."""
        cached = self._encode_cache.get(text)
        if cached is not None:
            return cached
        tok = self._require_tokenizer()
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        bos = getattr(tok, "bos_token_id", None)
        if self.params["prepend_bos"] and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
            offsets = [(0, 0)] + offsets
        self._encode_cache[text] = (ids, offsets)
        return ids, offsets

    def _plain_ids(self, text: str) -> list[int]:
        return list(self._require_tokenizer()(text, add_special_tokens=False)["input_ids"])

    def _is_unknown(self, token_id: int) -> bool:
        unk = getattr(self.tokenizer, "unk_token_id", None)
        return unk is not None and token_id == unk

    def continuation_token(self, prompt: str, continuation: str) -> int | None:
        """The single token that `continuation` adds after `prompt`, or None.

        Found by tokenizing the end of the prompt with and without the continuation:
        the prompt's tokens must be a prefix and exactly one known token must follow.
        Only the prompt's last two words are used as context (BPE merges never cross
        them), so results are cached across prompts.
        """
        context = " ".join(prompt.split(" ")[-2:])
        key = (context, continuation)
        if key in self._continuation_cache:
            return self._continuation_cache[key]
        base = self._plain_ids(context)
        full = self._plain_ids(context + continuation)
        token = None
        if full[: len(base)] == base and len(full) == len(base) + 1:
            if not self._is_unknown(full[-1]):
                token = full[-1]
        self._continuation_cache[key] = token
        return token

    def is_single_token(self, word: str, prefix: str = "Then,", sep: str = " ") -> bool:
        """Whether `word` is one known token after `prefix + sep` for this tokenizer."""
        return self.continuation_token(prefix, sep + word) is not None

    def _filter_words(self, words: Iterable[str], prefix: str, sep: str = " ",
                      what: str = "words") -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Split `words` into (single-token, dropped) for the tokenizer; none -> all kept."""
        words = tuple(words)
        if self.tokenizer is None:
            return words, ()
        kept = tuple(w for w in words if self.is_single_token(w, prefix, sep))
        dropped = tuple(w for w in words if w not in kept)
        if not kept:
            raise TaskError(
                f"task {self.name}: none of the {len(words)} {what} is a single token "
                f"for this tokenizer (e.g. {words[0]!r})",
                code="task.no-single-token",
                hint=f"pass {what}=[...] with words the tokenizer has as single tokens",
            )
        return kept, dropped

    def _locate(self, spec: Any, ids: list[int], offsets: list[tuple[int, int]],
                text: str, strict: bool = True) -> dict[str, int] | str:
        """Token index of every signature position in one prompt, or a drop reason.

        With `strict=False` (counterfactuals), positions the spec does not place are
        left out instead of being an error.
        """
        found: dict[str, int] = {}
        for name, (start, end) in spec.word_spans().items():
            hits = [j for j, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
            word = text[start:end]
            if len(hits) != 1:
                pieces = [self.tokenizer.convert_ids_to_tokens(ids[j]) for j in hits]
                return f"{name} {word!r} is {len(hits)} tokens {pieces}, not one"
            a, b = offsets[hits[0]]
            if text[a:b].strip() != word.strip():
                return f"{name} {word!r} shares its token {text[a:b]!r} with other text"
            if self._is_unknown(ids[hits[0]]):
                return f"{name} {word!r} is an unknown token for this tokenizer"
            found[name] = hits[0]
        found["END"] = len(ids) - 1
        for pos in self.SIGNATURE.positions:
            if pos in found:
                continue
            parsed = parse_position(pos)
            if parsed.name not in found:
                if not strict:
                    continue
                raise TaskError(f"task {self.name} does not locate position {pos}",
                                code="task.internal-position")
            index = found[parsed.name] + parsed.offset
            if not 0 <= index < len(ids):
                return f"position {pos} falls outside the prompt"
            found[pos] = index
        return found

    def _answer_ids(self, spec: Any, texts: tuple[str, ...], what: str) -> list[int] | str:
        out = []
        for cont in texts:
            token = self.continuation_token(spec.text, cont)
            if token is None:
                return f"{what} {cont!r} is not a single token after the prompt"
            out.append(token)
        return out

    def _tokenize_one(self, spec: Any, corrupt: Any) -> dict[str, Any] | str:
        """Everything `build` needs about one clean/corrupt pair, or a drop reason."""
        text = spec.text
        ids, offsets = self._encode(text)
        where = self._locate(spec, ids, offsets, text)
        if isinstance(where, str):
            return where
        answers = self._answer_ids(spec, spec.answer_texts(), "answer")
        if isinstance(answers, str):
            return answers
        wrong = self._answer_ids(spec, spec.wrong_answer_texts(), "wrong answer")
        if isinstance(wrong, str):
            return wrong
        c_text = corrupt.text
        c_ids, c_offsets = self._encode(c_text)
        if len(c_ids) != len(ids):
            return (f"counterfactual {c_text!r} has {len(c_ids)} tokens, "
                    f"the prompt has {len(ids)}")
        c_where = self._locate(corrupt, c_ids, c_offsets, c_text, strict=False)
        if isinstance(c_where, str):
            return "counterfactual: " + c_where
        moved = [p for p in where if p in c_where and c_where[p] != where[p]]
        if moved:
            p = moved[0]
            return (f"counterfactual puts {p} at token {c_where[p]}, "
                    f"the prompt at {where[p]}")
        return {"ids": ids, "positions": where, "answers": answers, "wrong": wrong,
                "corrupt_ids": c_ids}

    def build(self, specs: Sequence[Any]) -> PromptSet:
        """Tokenize specs and their counterfactuals into a `PromptSet`.

        Raises:
            TaskError: no tokenizer (for a task whose prompts are text), every prompt
                had to be dropped, or (for a task made for a model) a prompt longer
                than the model's context or a token id outside its vocabulary.
        """
        rows, kept, corrupts, reasons = [], [], [], []
        for spec in specs:
            corrupt = self.corrupt(spec)
            row = self._tokenize_one(spec, corrupt)
            if isinstance(row, str):
                reasons.append((spec.text, row))
                continue
            rows.append(row)
            kept.append(spec)
            corrupts.append(corrupt)
        prompts = self._assemble(kept, corrupts, rows, Dropped(tuple(reasons)))
        if self.model_shape is not None:
            from circuitlang.options import check_prompts_fit

            check_prompts_fit(prompts, self.model_shape)
        return prompts

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
            value = getattr(tok, attr, None)
            if value is not None:
                return value
        return 0

    def _assemble(self, specs: list, corrupts: list, rows: list[dict],
                  dropped: Dropped) -> PromptSet:
        import torch

        if not rows:
            first = dropped.reasons[0] if dropped.reasons else ("", "no prompts given")
            raise TaskError(
                f"task {self.name}: all {dropped.count} prompt(s) were dropped; "
                f"first: {first[0]!r}: {first[1]}",
                code="task.all-dropped",
                hint="use a tokenizer that fits the task's words, or other parameters",
            )
        width = max(len(r["ids"]) for r in rows)
        pad = self._pad_id()

        def padded(key: str) -> tuple[torch.Tensor, torch.Tensor]:
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r[key])] = torch.tensor(r[key], dtype=torch.long)
                mask[i, : len(r[key])] = 1
            return ids, mask

        def ragged(key: str) -> torch.Tensor:
            most = max(1, max(len(r[key]) for r in rows))
            out = torch.full((len(rows), most), -1, dtype=torch.long)
            for i, r in enumerate(rows):
                if r[key]:
                    out[i, : len(r[key])] = torch.tensor(r[key], dtype=torch.long)
            return out

        input_ids, mask = padded("ids")
        c_ids, c_mask = padded("corrupt_ids")
        positions = {
            p: torch.tensor([r["positions"][p] for r in rows], dtype=torch.long)
            for p in rows[0]["positions"]
        }
        return PromptSet(
            task=self.name,
            specs=tuple(specs),
            texts=tuple(s.text for s in specs),
            input_ids=input_ids,
            attention_mask=mask,
            positions=positions,
            features=self._feature_table(specs),
            answers=ragged("answers"),
            wrong_answers=ragged("wrong"),
            corrupt_specs=tuple(corrupts),
            corrupt_texts=tuple(c.text for c in corrupts),
            corrupt_input_ids=c_ids,
            corrupt_attention_mask=c_mask,
            dropped=dropped,
        )

    def _feature_table(self, specs: Sequence[Any]) -> dict[str, list]:
        table = {f: [s.feature(f) for s in specs] for f in self.SIGNATURE.features}
        for alias, target in self.SIGNATURE.aliases:
            table[alias] = table[target]
        return table

    # -- metrics --------------------------------------------------------------------
    def _check_metric(self, name: str) -> None:
        if name not in self.SIGNATURE.metrics:
            raise TaskError(
                f"task {self.name} has no metric {name!r}",
                code="task.unknown-metric",
                hint=f"valid metrics: {', '.join(self.SIGNATURE.metrics)}",
            )

    def metric(self, name: str, logits: "torch.Tensor", prompts: PromptSet,
               reference_logits: "torch.Tensor | None" = None) -> "torch.Tensor":
        """Per-prompt values [N] of metric `name` (see the module docstring).

        Args:
            name: one of `SIGNATURE.metrics`.
            logits: [N, T, V] full logits, or [N, V] already taken at END.
            prompts: the prompt set the logits were computed on.
            reference_logits: the clean run's logits, needed by `kl`.

        Raises:
            TaskError: unknown metric, wrong shapes, or `kl` without reference.
        """
        self._check_metric(name)
        final = self.logits_at_end(logits, prompts)
        if name == "kl":
            if reference_logits is None:
                raise TaskError("metric kl needs reference_logits (the clean run's logits)",
                                code="task.kl-needs-reference",
                                hint="pass reference_logits=clean_logits")
            ref = self.logits_at_end(reference_logits, prompts)
            return kl_divergence(ref, final)
        if name == "logit_diff":
            return masked_mean(final, prompts.answers) - masked_mean(final, prompts.wrong_answers)
        if name == "answer_logit":
            return masked_mean(final, prompts.answers)
        probs = final.float().softmax(dim=-1)
        if name == "answer_prob":
            return masked_sum(probs, prompts.answers)
        if name == "prob_diff":
            return masked_sum(probs, prompts.answers) - masked_sum(probs, prompts.wrong_answers)
        if name == "loss":
            return -masked_sum(probs, prompts.answers).clamp_min(1e-30).log()
        raise TaskError(f"task {self.name} does not compute metric {name!r}",
                        code="task.unknown-metric",
                        hint=f"valid metrics: {', '.join(self.SIGNATURE.metrics)}")

    def logits_at_end(self, logits: "torch.Tensor", prompts: PromptSet) -> "torch.Tensor":
        """Logits [N, V] at each prompt's END token."""
        n = len(prompts)
        if logits.dim() == 2 and logits.shape[0] == n:
            return logits
        if logits.dim() != 3 or logits.shape[0] != n:
            raise TaskError(
                f"logits of shape {tuple(logits.shape)} do not match {n} prompts",
                code="task.bad-logits",
                hint=f"pass [N, T, V] or [N, V] logits with N = {n}",
            )
        import torch

        index = prompts.positions["END"].to(logits.device)
        return logits[torch.arange(n, device=logits.device), index]

    # -- strategies -----------------------------------------------------------------
    def strategy(self) -> "SearchStrategy":
        """Specs of this task, shrinking toward the simplest prompt."""
        return self._spec_strategy({})

    def resample_strategy(self, spec: Any, agree_on: Sequence[str] = ()) -> "SearchStrategy":
        """Specs agreeing with `spec` on the features in `agree_on`, free otherwise.

        `agree_on` may name features, aliases, `token(P)` and `position(P)`.

        Raises:
            TaskError: a name the task does not define.
        """
        fixed: dict[str, Any] = {}
        for name in agree_on:
            for feature in self._features_behind(name):
                fixed[feature] = spec.feature(feature)
        return self._spec_strategy(fixed)

    def _features_behind(self, name: str) -> tuple[str, ...]:
        sig = self.SIGNATURE
        canonical = sig.canonical_feature(name)
        if canonical in sig.features:
            return (canonical,)
        match = BUILTIN_FEATURE.match(name.replace(" ", ""))
        if match:
            kind, pos = match.groups()
            table = self.TOKEN_FEATURES if kind == "token" else self.POSITION_FEATURES
            if pos in table:
                return table[pos]
            raise TaskError(
                f"task {self.name} cannot resample agreeing on {name}",
                code="task.unknown-feature",
                hint=f"{kind}(P) is defined for P in: {', '.join(table) or 'none'}",
            )
        raise TaskError(
            f"task {self.name} has no feature {name!r}",
            code="task.unknown-feature",
            hint=f"valid features: {', '.join(sig.feature_names())}, token(P), position(P)",
        )

    def _spec_strategy(self, fixed: dict[str, Any]) -> "SearchStrategy":  # pragma: no cover
        raise TypeError(f"{type(self).__name__} does not define _spec_strategy")


def fixed_or(fixed: dict[str, Any], name: str, strategy: "SearchStrategy") -> "SearchStrategy":
    """`just(fixed[name])` when the feature is pinned, else `strategy`."""
    from hypothesis import strategies as st

    return st.just(fixed[name]) if name in fixed else strategy
