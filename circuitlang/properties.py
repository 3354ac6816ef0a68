"""Judging `expect` lines: aggregate ones on the numbers, per-prompt ones as properties.

Takes a resolved hypothesis's expectations (sympy expressions built by the
resolver from the program's syntax tree, never from a string) and the numbers a
check measured, and gives one `ExpectationResult` per line plus the smallest
counterexample prompts for the per-prompt ones that fail.

Names in expressions:

* `clean`, `scrubbed`, `random`: the check's metric on the unmodified, scrubbed,
  and fully ablated model; `recovered`: % recovered as a fraction; `p_value`: the
  permutation test's p-value.
* a metric name (`logit_diff`, `prob_diff`, `loss`, `kl`): the scrubbed model's
  value of that metric.

In an aggregate `expect` each name is a mean over the dataset. In `expect each`,
each name is one prompt's value, and the line is a property: it is checked on
every dataset prompt, then `hypothesis` searches the task's prompt distribution
for a prompt that breaks it and shrinks it to the simplest such prompt.
"""
from __future__ import annotations

import contextlib
import math
import os
import random as pyrandom
from pathlib import Path

import numpy as np
import sympy

from circuitlang.errors import CircuitlangError
from circuitlang.ir_to_graph import ir_to_graph
from circuitlang.report import Counterexample, ExpectationResult

_OPS = {
    ">=": np.greater_equal,
    "<=": np.less_equal,
    ">": np.greater,
    "<": np.less,
    "==": np.isclose,
    "!=": lambda a, b: ~np.isclose(a, b),
}

POOL_FOR_SEARCH = 15  # resampling pool size when judging one generated prompt
CACHE_VARIABLE = "CIRCUITLANG_CACHE_DIR"


def search_storage_dir() -> Path:
    """Where the property search may keep files (`hypothesis`'s caches): never the
    working directory.

    `$CIRCUITLANG_CACHE_DIR/hypothesis` when set, else the user's cache folder
    (`$XDG_CACHE_HOME/circuitlang/hypothesis`, `~/.cache/circuitlang/hypothesis`).
    """
    root = os.environ.get(CACHE_VARIABLE)
    if root:
        return Path(root).expanduser() / "hypothesis"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "circuitlang" / "hypothesis"


@contextlib.contextmanager
def _search_storage():
    """Point `hypothesis` at `search_storage_dir()` while a search runs, then back.

    The search keeps no example database (`database=None`), but `hypothesis` still
    writes caches under its home folder, `./.hypothesis` by default: into the user's
    working directory, on every `circuitlang check`. A user who set
    `HYPOTHESIS_STORAGE_DIRECTORY` has chosen a place; that is kept.
    """
    from hypothesis import configuration

    if os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
        yield
        return
    previous = getattr(configuration, "__hypothesis_home_directory", None)
    configuration.set_hypothesis_home_dir(search_storage_dir())
    try:
        yield
    finally:
        configuration.set_hypothesis_home_dir(previous)


def evaluate(expr: sympy.Expr, env: dict) -> np.ndarray | float:
    """Evaluate a sympy expression with numpy values for its symbols.

    Only arithmetic, `Abs`, `Min`, `Max`, `log`, `exp` and `sqrt` are allowed; the
    resolver builds nothing else.
    """
    if expr.is_Number:
        return float(expr)
    if expr.is_Symbol:
        try:
            return env[expr.name]
        except KeyError:
            raise CircuitlangError(
                f"unknown name {expr.name!r} in an expectation",
                hint="names: " + ", ".join(sorted(env)),
            ) from None
    args = [evaluate(a, env) for a in expr.args]
    if expr.is_Add:
        return sum(args[1:], args[0])
    if expr.is_Mul:
        out = args[0]
        for a in args[1:]:
            out = out * a
        return out
    if expr.is_Pow:
        return np.power(args[0], args[1])
    funcs = {
        sympy.Abs: np.abs,
        sympy.Min: lambda *a: np.minimum.reduce(np.broadcast_arrays(*a)),
        sympy.Max: lambda *a: np.maximum.reduce(np.broadcast_arrays(*a)),
        sympy.log: np.log,
        sympy.exp: np.exp,
    }
    for fn, impl in funcs.items():
        if expr.func == fn:
            return impl(*args)
    raise CircuitlangError(f"cannot evaluate {expr} in an expectation")


def _metric_names(expectations) -> set[str]:
    names = set()
    for e in expectations:
        names |= {s.name for s in (e.lhs.free_symbols | e.rhs.free_symbols)}
    return names - {"clean", "scrubbed", "random", "recovered", "p_value"}


def _per_prompt_recovered(clean, scrubbed, random):
    gap = random - clean
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gap != 0, (random - scrubbed) / gap, np.nan)


def judge_expectations(hypothesis, *, scrubber, per_prompt, summary, seed, max_examples, graph=None):
    """Judge every `expect` of a hypothesis.

    When the task shows no behaviour on the model (`summary.behaviour` is False: the
    clean-vs-random gap's interval includes 0), an aggregate expectation about the
    circuit (one naming anything but `clean`) is not met, whatever its numbers say.

    Args:
        hypothesis: the resolved hypothesis.
        scrubber: the `Scrubber` the check used (model, task, prompts, metric).
        per_prompt: {"clean", "scrubbed", "random"}: per-prompt arrays of the metric.
        summary: the `CheckResult` so far (means, recovered, p-value).
        seed: the check's seed.
        max_examples: how many generated prompts to try per per-prompt property.
        graph: the hypothesis's lowered graph (lowered here when not given).

    Returns:
        (expectation results, counterexamples).
    """
    expectations = list(getattr(hypothesis, "expectations", ()))
    if not expectations:
        return [], []
    graph = ir_to_graph(hypothesis) if graph is None else graph
    other = {}
    for name in _metric_names(expectations):
        if name == scrubber.metric:
            other[name] = per_prompt["scrubbed"]
            continue
        other[name] = _scrubbed_metric(scrubber, name, graph, seed)
    env_each = dict(per_prompt)
    env_each["recovered"] = _per_prompt_recovered(per_prompt["clean"], per_prompt["scrubbed"], per_prompt["random"])
    env_each.update(other)
    env_mean = {
        "clean": summary.clean.value,
        "scrubbed": summary.scrubbed.value,
        "random": summary.random.value,
        "recovered": summary.recovered.value,
        "p_value": summary.p_value,
    }
    env_mean.update({k: float(np.mean(v)) for k, v in other.items()})

    results, counterexamples = [], []
    for e in expectations:
        op = _OPS[e.op]
        line = e.span.line if getattr(e, "span", None) else None
        if e.kind != "each":
            lhs, rhs = float(evaluate(e.lhs, env_mean)), float(evaluate(e.rhs, env_mean))
            holds = bool(op(lhs, rhs)) and not (math.isnan(lhs) or math.isnan(rhs))
            note = None
            if not getattr(summary, "behaviour", True) and set(e.symbols()) - {"clean"}:
                holds, note = False, "no behaviour to recover"
            elif math.isnan(lhs) or math.isnan(rhs):
                note = "not measured" if "p_value" in e.symbols() else "undefined"
            results.append(ExpectationResult(e.text, "aggregate", holds, lhs, lhs, rhs, line=line, note=note))
            continue
        env = {**env_each, "p_value": summary.p_value}
        lhs = np.broadcast_to(evaluate(e.lhs, env), per_prompt["clean"].shape)
        rhs = np.broadcast_to(evaluate(e.rhs, env), per_prompt["clean"].shape)
        ok = op(lhs, rhs) & ~np.isnan(lhs) & ~np.isnan(rhs)
        failures = int((~ok).sum())
        found = _search_counterexample(e, scrubber, graph, seed, max_examples)
        if found is not None:
            counterexamples.append(found)
        elif failures:
            counterexamples.append(_dataset_counterexample(e, scrubber, ~ok, lhs))
        holds = failures == 0 and found is None
        results.append(
            ExpectationResult(e.text, "each", holds, float(ok.mean()), failures=failures + (found is not None), line=line)
        )
    return results, counterexamples


def _scrubbed_metric(scrubber, metric, graph, seed) -> np.ndarray:
    from circuitlang.execute import Scrubber

    other = Scrubber(scrubber.model, scrubber.task, scrubber.prompts, metric, batch_size=scrubber.batch_size)
    other.cache = scrubber.cache
    return other.scrub(graph, seed=seed).scrubbed


def _tokens(scrubber, prompts, i) -> list[str]:
    ids = prompts.input_ids[i][prompts.attention_mask[i].bool()].tolist()
    if scrubber.model.tokenizer is None:  # a task over token ids: show the ids
        return [str(t) for t in ids]
    return list(scrubber.model.tokenizer.convert_ids_to_tokens(ids))


def _dataset_counterexample(e, scrubber, failing, lhs) -> Counterexample:
    """The shortest dataset prompt on which a per-prompt expectation fails."""
    prompts = scrubber.prompts
    lengths = prompts.attention_mask.sum(1).numpy()
    idx = [i for i in np.flatnonzero(failing)]
    best = min(idx, key=lambda i: (lengths[i], i))
    return Counterexample(prompts.texts[best], _tokens(scrubber, prompts, best), float(lhs[best]), e.text, False)


def _search_counterexample(e, scrubber, graph, seed, max_examples) -> Counterexample | None:
    """Search the task's prompt distribution for a prompt breaking `e`; shrink it."""
    import hypothesis
    from hypothesis import HealthCheck, Phase, Verbosity, settings
    from hypothesis.errors import NoSuchExample

    from circuitlang.execute import Scrubber

    task = scrubber.task
    pool_specs = list(scrubber.prompts.specs[:POOL_FOR_SEARCH])
    calls = {"n": 0}
    budget = 3 * max_examples
    seen: dict = {}

    def value_of(spec):
        key = repr(spec)
        if key in seen:
            return seen[key]
        prompts = task.build([spec] + pool_specs)
        if len(prompts.specs) == 0 or prompts.specs[0] != spec:
            seen[key] = None  # the task could not build this prompt with this tokenizer
            return None
        sub = Scrubber(scrubber.model, task, prompts, scrubber.metric, batch_size=scrubber.batch_size)
        names = set(e.symbols())
        scrubbed = sub.scrub(graph, seed=seed).scrubbed
        env = {"scrubbed": scrubbed, "p_value": np.nan}
        if names & {"clean", "recovered"}:
            env["clean"] = sub.clean()
        if names & {"random", "recovered"}:
            empty = type(graph)(graph.graph.subgraph([graph.root]).copy(), graph.root, graph.ablation, graph.given)
            env["random"] = sub.scrub(empty, seed=seed).scrubbed
        if "recovered" in names:
            env["recovered"] = _per_prompt_recovered(env["clean"], scrubbed, env["random"])
        for name in _metric_names([e]):
            env[name] = scrubbed if name == sub.metric else _scrubbed_metric(sub, name, graph, seed)
        lhs = float(np.broadcast_to(evaluate(e.lhs, env), scrubbed.shape)[0])
        rhs = float(np.broadcast_to(evaluate(e.rhs, env), scrubbed.shape)[0])
        result = (lhs, rhs, prompts)
        seen[key] = result
        return result

    def breaks(spec) -> bool:
        if repr(spec) not in seen:
            if calls["n"] >= budget:
                return False  # out of budget: stop exploring, keep answers consistent
            calls["n"] += 1
        got = value_of(spec)
        if got is None:
            return False
        lhs, rhs, _ = got
        if math.isnan(lhs) or math.isnan(rhs):
            return False
        return not bool(_OPS[e.op](lhs, rhs))

    try:
        with _search_storage():
            spec = hypothesis.find(
                task.strategy(),
                breaks,
                settings=settings(
                    max_examples=max_examples,
                    phases=(Phase.generate, Phase.shrink),
                    database=None,
                    deadline=None,
                    suppress_health_check=list(HealthCheck),
                    verbosity=Verbosity.quiet,  # its own notes (slow shrinking) are not the report's
                ),
                random=pyrandom.Random(seed),
            )
    except NoSuchExample:
        return None
    lhs, rhs, prompts = seen[repr(spec)]
    return Counterexample(prompts.texts[0], _tokens(scrubber, prompts, 0), lhs, e.text, True)
