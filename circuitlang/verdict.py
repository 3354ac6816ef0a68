"""The verdict: scores of a scrubbing graph in, a judged `CheckResult` out.

Takes the lowered graph of a hypothesis and the `Setup` it runs on (`checker.prepare`);
`score` runs it (clean, fully ablated and scrubbed metric per prompt) and `judge`
turns the numbers into what a reviewer needs to accept or reject a causal claim:

* % recovered with a paired bootstrap interval, and whether the task shows any
  behaviour at all: when the clean-vs-random gap's interval includes 0 there is
  nothing to recover, the score is undefined, the report says so, and no aggregate
  expectation about the circuit can hold;
* what each claimed node left to the remainder (the paths no claim covers), so a user
  sees what the hypothesis left out;
* the cost of each statement and the permutation test against random circuits of
  the same size (`circuitlang.variants`);
* every `expect` line (`circuitlang.properties`);
* notes on choices the user should know about: prompts that could not be built, a
  metric chosen because the default could not see the claims, a metric that cannot
  depend on any claimed site, a site whose edges reach no output.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from circuitlang import stats, variants
from circuitlang.execute import claimed_positions, metric_reads
from circuitlang.ir_to_graph import ir_to_graph
from circuitlang.progress import Progress
from circuitlang.report import CheckResult, PerPrompt
from circuitlang.stats import Interval

__all__ = ["Scores", "experiments_only", "judge", "null_circuits", "remainder_by_node", "score"]


@dataclass(frozen=True, slots=True)
class Scores:
    """Per-prompt metric values [N] of the unmodified, fully ablated and scrubbed model."""

    clean: np.ndarray
    random: np.ndarray
    scrubbed: np.ndarray


def score(graph, setup, *, progress=False, later=()) -> Scores:
    """Run a graph and its fully ablated baseline, level by level of the trees (a bar per
    tree level with an ETA when `progress`); `later`: graphs scrubbed afterwards whose
    plain reads are captured in the same pass (`Scrubber.scrub_many`)."""
    scrubber = setup.scrubber
    empty = ir_to_graph(_empty(graph))
    bar = None

    def on_level(done: int, total: int, what: str) -> None:
        nonlocal bar
        if bar is None:
            bar = Progress(total, "scrubbing", enabled=progress)
        bar.set(done, what)

    try:
        random, scrubbed = scrubber.scrub_many([empty, graph], seed=setup.seed, on_level=on_level, later=later)
    finally:
        if bar is not None:
            bar.close()
    return Scores(scrubber.clean(), random.scrubbed, scrubbed.scrubbed)


def null_circuits(hypothesis, setup, permutations: int):
    """The permutation test's random circuits (none when `permutations` is 0), drawn
    before `score` so that its capture pass reads what they read too (`later`)."""
    if not permutations:
        return variants.NullCircuits(variants.RandomCircuits([], 0, True), [])
    return variants.null_circuits(hypothesis, setup.model.shape, permutations, setup.seed)


def _empty(graph):
    """A hypothesis with no claims and the graph's ablation: the fully ablated model."""
    from circuitlang.ir import Ablation, Hypothesis

    return Hypothesis(model=None, task="", metric="", ablation=Ablation(graph.ablation, tuple(graph.given)),
                      semantics=graph.semantics)


def judge(hypothesis, graph, setup, scores: Scores, *, experiments=(), permutations: int, breakdown: bool,
          max_examples: int, progress=False, started: float | None = None, drawn=None) -> CheckResult:
    """Everything `check` reports about one hypothesis; see the module docstring. `drawn`:
    the permutation test's circuits, when `null_circuits` drew them before `score`."""
    started = time.perf_counter() if started is None else started
    seed = setup.seed
    clean, random, scrubbed = scores.clean, scores.random, scores.scrubbed
    recovered = stats.bootstrap_recovered(clean, scrubbed, random, seed=seed)
    gap = stats.bootstrap_mean(random - clean, seed=seed)
    behaviour = not (gap.low <= 0.0 <= gap.high) and gap.value != 0.0
    if not behaviour:
        recovered = Interval(math.nan, math.nan, math.nan, recovered.level)
    result = CheckResult(
        model=setup.model.name,
        task=setup.task.SIGNATURE.name,
        metric=setup.metric,
        seed=seed,
        n=len(clean),
        clean=stats.bootstrap_mean(clean, seed=seed),
        scrubbed=stats.bootstrap_mean(scrubbed, seed=seed),
        random=stats.bootstrap_mean(random, seed=seed),
        recovered=recovered,
        gap=gap,
        behaviour=behaviour,
        reported={r.name: r.value for r in hypothesis.reported},
        ablation=graph.ablation,
        semantics=graph.semantics,
        source=getattr(hypothesis, "filename", None),
        experiments=list(experiments),
        remainder=remainder_by_node(graph),
        per_prompt=PerPrompt(clean, scrubbed, random, tuple(getattr(setup.prompts, "texts", ()))),
    )
    result.notes += setup.notes
    result.notes += [w.message + (f" ({w.hint})" if w.hint else "") for w in graph.warnings]
    if not behaviour:
        result.notes.append(
            f"no behaviour to recover: the clean-vs-random gap of `{setup.metric}` is "
            f"{gap.value:.4g} with a 95% interval [{gap.low:.4g}, {gap.high:.4g}] that includes 0, so "
            "% recovered is undefined and no expectation about the circuit can hold")
    blind = _metric_blind(graph, setup)
    if blind:
        result.notes.append(blind)
    corruption = getattr(setup.task, "CORRUPTION", None)
    if experiments and corruption:
        result.notes.append(f"patching experiments use the task's corruption: {corruption}")

    steps = (len(variants.statements(hypothesis)) if breakdown else 0) + (permutations or 0)
    bar = Progress(max(steps, 1), "checking", enabled=progress)
    if breakdown and behaviour:
        result.claims = variants.claim_breakdown(hypothesis, setup.scrubber, clean, random, recovered.value,
                                                 seed, progress=lambda done: bar.set(done, "claims"))
    if permutations and behaviour:
        offset = bar.done
        null = variants.permutation_null(hypothesis, setup.scrubber, clean, random, setup.model.shape,
                                         permutations, seed, recovered.value,
                                         progress=lambda done: bar.set(offset + done, "random circuits"),
                                         drawn=drawn)
        result.null_scores = [float(x) for x in null.scores]
        result.p_value = null.p_value
        result.null_exact = null.exact
        result.null_total = null.total
        if len(null.scores) == 0 and null.exact:
            result.notes.append("permutation test: this model has no other circuit of the same size and "
                                "shape, so there is nothing to compare against")
        elif len(null.scores) == 0:
            result.notes.append("permutation test: no random circuit of the same size and shape was found "
                                "(every map drawn broke an edge's layer order), so there is nothing to "
                                "compare against")
        elif null.head_by_head:
            result.notes.append("permutation test: uniform draws of the circuit's heads rarely keep every edge "
                                "in layer order, so random circuits were drawn head by head, each head uniform "
                                "among those that keep its edges (close to, not exactly, uniform over valid "
                                "circuits)")
        elif null.exact and len(null.scores) < permutations:
            result.notes.append(f"permutation test: all {len(null.scores)} other circuits of the same size "
                                "and shape were scored, so the p-value is exact")

    from circuitlang.properties import judge_expectations

    per_prompt = {"clean": clean, "scrubbed": scrubbed, "random": random}
    result.expectations, result.counterexamples = judge_expectations(
        hypothesis, scrubber=setup.scrubber, per_prompt=per_prompt, summary=result, seed=seed,
        max_examples=max_examples, graph=graph)
    bar.close()
    result.passes = setup.scrubber.passes + setup.scrubber.cache.passes
    result.work = setup.scrubber.work.describe()
    result.seconds = time.perf_counter() - started
    return result


def remainder_by_node(graph) -> list[tuple[str, list[str]]]:
    """What each claimed node left to the remainder: one `(node, parts)` per node label
    (`"head 0.0 at all"`), each part (`"k: all but embed at all"`) once.

    Treeification copies a shared node once per parent (and per channel it enters), so
    one claimed node is many graph nodes, each reading the same inputs from the
    remainder; they are merged here. Nodes come in the order of their first copy in the
    tree (the root first), parts by channel (q, k, v), then as their copies list them. Should the
    copies of one label ever differ, each distinct part is listed once, marked with how
    many of the label's copies read it (`"q: all of it (in 1 of 2 copies)"`).
    """
    copies: dict[str, int] = {}
    seen: dict[str, list[str]] = {}
    counts: dict[tuple[str, str], int] = {}
    for v in sorted(graph.graph.nodes):
        label = graph.node(v).label_short()
        copies[label] = copies.get(label, 0) + 1
        for part in graph.remainder_inputs(v):
            parts = seen.setdefault(label, [])
            if part not in parts:
                parts.append(part)
            counts[label, part] = counts.get((label, part), 0) + 1
    rank = {"q": 0, "k": 1, "v": 2}  # a head's channels; an MLP or the root has one
    out = []
    for label, parts in seen.items():
        ordered = sorted(parts, key=lambda part: (rank.get(part.split(":", 1)[0], 3), parts.index(part)))
        out.append((label, [part if counts[label, part] == copies[label]
                            else f"{part} (in {counts[label, part]} of {copies[label]} copies)"
                            for part in ordered]))
    return out


def _metric_blind(graph, setup) -> str | None:
    """A note when the metric reads no logit that any claimed site can reach."""
    where = claimed_positions(graph, setup.prompts)
    if where is None or not graph.children(graph.root):
        return None
    reads = metric_reads(setup.task, setup.metric, setup.prompts, setup.model.shape.vocab_size)
    if bool((reads & where).any()):
        return None
    at = sorted({str(t.position) for _, t in graph.children(graph.root)})
    return (f"the metric `{setup.metric}` reads none of the positions where the claims reach the output "
            f"({', '.join(at)}), so the scrubbed score cannot depend on them; choose a metric that reads "
            "them (`metric ...`)")


def experiments_only(hypothesis, setup, experiments, started: float) -> CheckResult:
    """The result of a file with experiments and nothing to scrub."""
    nan = Interval(math.nan, math.nan, math.nan)
    result = CheckResult(
        model=setup.model.name, task=setup.task.SIGNATURE.name, metric=setup.metric, seed=setup.seed,
        n=len(setup.prompts.input_ids), clean=nan, scrubbed=nan, random=nan, recovered=nan,
        reported={r.name: r.value for r in hypothesis.reported},
        ablation=hypothesis.ablation.mode, semantics=hypothesis.semantics, source=hypothesis.filename,
        experiments=list(experiments),
    )
    result.notes += setup.notes
    corruption = getattr(setup.task, "CORRUPTION", None)
    if corruption:
        result.notes.append(f"patching experiments use the task's corruption: {corruption}")
    result.seconds = time.perf_counter() - started
    return result
