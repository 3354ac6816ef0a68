"""Filling holes: a program with holes in, the filled program and its evidence out.

`fill_holes(program_or_text, model=..., task=...)` (and `circuitlang.discover(FILE)`,
`circuitlang discover FILE`) is this pipeline::

    hypothesis = load_hypothesis(program)          # parse, resolve: holes and their constraints
    domains = candidates(hypothesis)               # per hole: its constraints, then the topology
    setup = prepare(fill(first valid assignment))  # model, task, prompts, metric: as `check` would
    scores = eap_ig(Problem(ClaimSpace(positions of the claims with holes)))
    ranked = rank(claims, scores, domains)         # joint assignments, by scores shaped like each claim
    verified = scrub_many(best few, swaps, growth) # causal scrubbing of every one, in one batch
    chosen = choose(verified, expectations)        # every `expect` met; the smallest; then recovered
    check = judge(fill(chosen))                    # the checker's verdict, on the same scrubber

The candidates, the scores shaped like each claim and the search over assignments are
`circuitlang.discover.hole_search`; this module runs the pipeline and verifies.

**Candidates.** A head hole (`head ?h`, `?h.q`) is one head; a group hole (`heads ?g`)
a set of heads of unknown size (at least 1, `?g has at most N heads` and the like); an
MLP hole (`mlp ?m`) one layer's MLP; a latent hole (`feature res5.?f`) one latent of
that SAE, every latent a candidate, and a latent group hole (`features res5.?g`) a set of
them of unknown size, searched as a group of heads is. A hole may be filled with what its `in`
constraints allow (`?s in layers 7-8`; `circuitlang.ast_to_ir.holes.hole_domain`) such
that every edge claim naming it is an edge of the model (`circuitlang.topology`:
`?s -> ?h.q` needs ?s below ?h). Distinct holes get distinct heads. A hole with no
candidate is a `DiscoveryError`.

**Ranking.** Edge attribution with integrated gradients (`attribution.eap_ig`) on an
edge space with one slot per position the hole's claims name (`ClaimSpace`: every
other position keeps its clean input, so a score is the effect of ablating that edge at
that position alone). The ablated value follows the file's `ablation` (resample by
default: the task's counterfactual leaves some paths unchanged, such as the previous-token
head's output in the first copy of an induction prompt, which would score 0); EAP-IG
interpolates the inputs under `corrupt` and the activations otherwise. Each claim is
scored in its own shape, as the magnitude of the summed scores of the edges it names:

* `?h at P depends on F` (any verb that says so): ?h's node score at P, the sum of its
  outgoing edges at P; `?h.q at P depends on F`: the edges into ?h's query at P; a
  pattern: its query at P and its keys;
* `?s -> ?h.q at P`: that edge's score (an edge into a head with no channel: q, k and v);
* a claim about a group hole: the same, per head;
* a claim naming a latent hole: that latent's node score at the claim's position, from
  attribution patching over the whole dictionary, each latent moved to its value under
  the same ablation (`hole_search.latent_scores`; no edge attribution runs when every
  hole is a latent);
  the `LATENT_CANDIDATES` best latents go on to the search.

An assignment's score is the sum over the claims with holes. Assignments of the head and
MLP holes are searched jointly (a beam, exact for two holes); a group hole's heads are
ranked by their claims' scores given the other holes.

**Verification.** Filled into the program and scored together by causal scrubbing, in
one batch (`Scrubber.scrub_many`: one pass per height of the scrubbing trees for all of
them at once, plus one for the output; the fully ablated baseline rides along): the best
`top` assignments of the head and MLP holes, the best one with each hole moved to each of
its next `runners_up` candidates, and, beside the best one, the group holes' heads: every
choice within their bounds when there are at most `group_budget` (so the smallest that
meets the expectations is found), else grown best head first from the lower bound to the
upper one (`max_group` when there is none), with the head just added swapped for each of
the next `runners_up` at every step. Every `expect` line of the file is a constraint:
aggregate ones on the means (`p_value` is left to the final check), `expect each` on
every prompt of the dataset. Among the assignments that meet them all, the smallest
circuit wins (fewest heads and latents in group holes), then the highest recovered fraction; when
none does, the highest recovered fraction, and the report says so. When the winner is not
the best-ranked assignment, a second batch scores the groups and the runners-up around it.
Holes are filled, as a whole, by two or three batches of scrubbing passes plus the
attribution's `steps` gradient passes per batch of prompts.

**Result.** The program with each hole replaced by its heads (the user's verbs, comments
and layout kept; each constraint line becomes a comment saying what filled it; a header
comment records how), the filled hypothesis, the checker's `CheckResult` on it (from the
same scrubber and seed, so `circuitlang check` on the text gives the same numbers with
the same `-n` and `--seed`), and per hole the chosen head(s), the runners-up with their
attribution scores and their checked recovered fractions.
"""
from __future__ import annotations

import dataclasses
import math
import textwrap
import time
from pathlib import Path

import numpy as np

from circuitlang import ast, ir, stats
from circuitlang.discover.attribution import IG_VARIANTS, eap, eap_ig
from circuitlang.discover.hole_result import Candidate, HoleFill, HoleResult, Verified, _fmt, describe_ranking
from circuitlang.discover.hole_search import (LATENT_CANDIDATES, ClaimScores, ClaimSpace, HoleSearch, candidates,
                                              holes_of, latent_scores, shortlist_latents)
from circuitlang.discover.problem import ABLATIONS, Problem
from circuitlang.errors import CircuitlangError, DiscoveryError
from circuitlang.execute import Scrubber
from circuitlang.sites import ALL, Head, Position, Site

__all__ = ["Candidate", "HoleFill", "HoleResult", "Verified", "candidates", "fill_holes", "fill_program"]


# ----------------------------------------------------------------------------- the program


def fill_program(program: ast.Program, fill: dict[str, tuple[Site, ...]], *,
                 notes: dict[str, str] | None = None, header: tuple[str, ...] = ()) -> ast.Program:
    """The program with every hole replaced by the site(s) that fill it.

    Verbs, comments and layout stay as written; a hole constraint (`?s in layers 7-8`)
    becomes a comment (with `notes[name]` after it), since its hole is gone.

    Args:
        program: the program with holes.
        fill: hole name -> its sites (`Head(l, h)` or `Mlp(l)`; a group: its heads).
        notes: hole name -> text to add to its constraint lines' comments.
        header: comment lines to put above the first statement.
    """
    notes = notes or {}
    out: list = []
    carried: list[str | None] = []
    carried_blank = False
    for stmt in program.statements:
        if isinstance(stmt, (ast.HoleIn, ast.HoleSize)):
            from circuitlang.printer import format_statement

            text = f" {format_statement(stmt)}"
            if stmt.hole.name in notes:
                text += f"  ({notes[stmt.hole.name]})"
            if stmt.trivia.trailing is not None:
                text += f"  #{stmt.trivia.trailing}"
            if not carried and not stmt.trivia.leading:
                carried_blank = carried_blank or stmt.trivia.blank_before
            elif stmt.trivia.blank_before and (carried or stmt.trivia.leading):
                carried.append(None)
            carried += [*stmt.trivia.leading, text]
            continue
        stmt = _fill_statement(stmt, fill)
        if carried or carried_blank:
            trivia = stmt.trivia
            leading = tuple(carried) + ((None,) if trivia.blank_before and trivia.leading else ()) + trivia.leading
            stmt = dataclasses.replace(stmt, trivia=ast.Trivia(leading, trivia.trailing,
                                                                carried_blank or (trivia.blank_before and not carried)))
            carried, carried_blank = [], False
        out.append(stmt)
    trailing = program.trailing_comments + tuple(c for c in carried if c is not None)
    if header and out:
        first = out[0]
        lines = tuple(f" {h}" if h and not h.startswith(" ") else h for h in header)
        out[0] = dataclasses.replace(first, trivia=dataclasses.replace(
            first.trivia, leading=lines + ((None,) if first.trivia.leading else ()) + first.trivia.leading))
    return ast.Program(tuple(out), trailing, program.filename)


def _headref(site: Head, channel: str | None) -> ast.HeadRef:
    return ast.HeadRef(site.layer, site.head, channel)


def _fill_target(target, fill):
    match target:
        case ast.HeadTarget(ref=ast.Hole(name=name, channel=channel)) if name in fill:
            return dataclasses.replace(target, ref=_headref(fill[name][0], channel))
        case ast.HeadsTarget(items=items):
            new = []
            for item in items:
                if isinstance(item, ast.Hole) and item.name in fill:
                    new += [_headref(h, item.channel) for h in fill[item.name]]
                else:
                    new.append(item)
            return dataclasses.replace(target, items=tuple(new))
        case ast.MlpTarget(layer=ast.Hole(name=name)) | ast.ResidTarget(layer=ast.Hole(name=name)) if name in fill:
            return dataclasses.replace(target, layer=fill[name][0].layer)
        case ast.FeatureTarget(index=ast.Hole(name=name)) if name in fill:
            return dataclasses.replace(target, index=fill[name][0].index)
        case ast.FeaturesTarget(items=items):
            new = []
            for item in items:
                if isinstance(item.index, ast.Hole) and item.index.name in fill:
                    new += [dataclasses.replace(item, index=latent.index)
                            for latent in sorted(fill[item.index.name], key=lambda x: x.index)]
                else:
                    new.append(item)
            return dataclasses.replace(target, items=tuple(new))
    return target


def _fill_term(term, fill):
    if isinstance(term, ast.Hole) and term.name in fill and isinstance(fill[term.name][0], Head):
        return _headref(fill[term.name][0], term.channel)
    return term


def _fill_statement(stmt, fill):
    match stmt:
        case ast.Depends() | ast.Patch() | ast.Ablate() | ast.GroupDef():
            return dataclasses.replace(stmt, target=_fill_target(stmt.target, fill))
        case ast.Edge() | ast.PathPatch():
            return dataclasses.replace(stmt, sender=_fill_target(stmt.sender, fill),
                                       receiver=_fill_target(stmt.receiver, fill))
        case ast.VerbUse():
            return dataclasses.replace(stmt, subject=_fill_target(stmt.subject, fill),
                                       terms=tuple(_fill_term(t, fill) for t in stmt.terms))
        case ast.VerbDef():
            return dataclasses.replace(stmt, body=tuple(_fill_statement(s, fill) for s in stmt.body))
    return stmt


# ----------------------------------------------------------------------------- the pipeline


def _read(program_or_text, filename):
    from circuitlang.text_to_ast import parse

    if isinstance(program_or_text, ast.Program):
        return program_or_text, None, filename or program_or_text.filename
    if isinstance(program_or_text, Path) or (isinstance(program_or_text, str) and program_or_text.endswith(".circ")
                                             and "\n" not in program_or_text):
        path = Path(program_or_text)
        if not path.is_file():
            raise DiscoveryError(f"no hypothesis file {str(path)!r}", code="discover.file",
                                 hint="pass a .circ file with holes, or the program's text")
        text = path.read_text(encoding="utf-8")
        filename = filename or str(path)
        return parse(text, filename), text, filename
    if not isinstance(program_or_text, str):
        raise DiscoveryError(f"expected a program, its text or a .circ path, got {type(program_or_text).__name__}",
                             code="discover.input", hint='e.g. "head ?h moves IO to END"')
    text = textwrap.dedent(program_or_text)  # an indented string in Python, as check reads it
    return parse(text, filename), text, filename


def _load(program, text, filename, model, task):
    from circuitlang.checker import load_hypothesis

    try:
        hypothesis, _ = load_hypothesis(program, model=model, task=task, filename=filename)
    except CircuitlangError as exc:
        raise (exc.with_source(text) if text is not None else exc) from None
    return hypothesis


def _expectation_metrics(hypothesis) -> set[str]:
    from circuitlang.properties import _metric_names

    return _metric_names(hypothesis.expectations)


def _failed(hypothesis, clean, scrubbed, random, others: dict, behaviour: bool) -> tuple[str, ...]:
    """The `expect` lines (but p_value ones, left to the check) an assignment does not meet."""
    from circuitlang.properties import _OPS, _per_prompt_recovered, evaluate

    env_mean = {"clean": float(np.mean(clean)), "scrubbed": float(np.mean(scrubbed)),
                "random": float(np.mean(random)), "recovered": stats.recovered(clean, scrubbed, random),
                **{k: float(np.mean(v)) for k, v in others.items()}}
    env_each = {"clean": clean, "scrubbed": scrubbed, "random": random,
                "recovered": _per_prompt_recovered(clean, scrubbed, random), **others}
    failed = []
    for e in hypothesis.expectations:
        names = set(e.symbols())
        if "p_value" in names:
            continue
        op = _OPS[e.op]
        if e.kind == "each":
            lhs = np.broadcast_to(evaluate(e.lhs, env_each), clean.shape)
            rhs = np.broadcast_to(evaluate(e.rhs, env_each), clean.shape)
            ok = bool((op(lhs, rhs) & ~np.isnan(lhs) & ~np.isnan(rhs)).all())
        else:
            lhs, rhs = float(evaluate(e.lhs, env_mean)), float(evaluate(e.rhs, env_mean))
            ok = bool(op(lhs, rhs)) and not (math.isnan(lhs) or math.isnan(rhs))
            if not behaviour and names - {"clean"}:
                ok = False
        if not ok:
            failed.append(e.text)
    return tuple(failed)


def _key(fill: dict[str, tuple[Site, ...]]) -> tuple:
    """An assignment as a canonical key: holes by name, a group's heads in model order."""
    return tuple(sorted((name, tuple(sorted(found, key=_model_order))) for name, found in fill.items()))


def _model_order(site) -> tuple[int, int]:
    return getattr(site, "layer", -1), getattr(site, "head", -1)


def fill_holes(
    program_or_text,
    *,
    model=None,
    task=None,
    n: int | None = None,
    seed: int | None = None,
    metric: str | None = None,
    method: str = "eap-ig",
    ig: str | None = None,
    ablation: str | None = None,
    steps: int = 5,
    top: int = 8,
    runners_up: int = 3,
    max_group: int = 16,
    group_budget: int = 64,
    check: bool = True,
    permutations: int | None = None,
    breakdown: bool = False,
    max_examples: int = 5,
    batch_size: int = 32,
    device=None,
    task_params: dict | None = None,
    filename: str | None = None,
) -> HoleResult:
    """Fill a program's holes with the components that best meet its claims and `expect`s.

    See the module docstring for what is ranked, verified and chosen.

    Args:
        program_or_text: the program with holes: its text, a `.circ` path or a parsed `Program`.
        model: a model name, path or `LoadedModel` (default: the file's `model`).
        task: a task name or object (default: the file's `task`).
        n, seed: prompts and seed (default: the file's `samples` / `seed`, else 64 and 0),
            for the ranking, the verification and the check alike.
        metric: the metric (default: as `check` chooses it).
        method: `eap-ig` (integrated gradients) or `eap` (the gradient at the clean model).
        ig: EAP-IG's variant (default: `inputs` under `ablation corrupt`, else `activations`;
            `inputs` needs `corrupt`).
        ablation: `corrupt`, `resample`, `mean` or `zero`: replaces the file's `ablation`
            line (the filled program carries it, so `check` re-measures the same), for the
            ranking, the verification and the check alike (default: the file's line, else
            resample).
        steps: EAP-IG's points.
        top: how many of the best-ranked assignments of head and MLP holes to verify.
        runners_up: per hole, how many next candidates to verify and report.
        max_group: how far a group hole with no upper bound grows.
        group_budget: verify every choice of the group holes' heads when there are at most
            this many (so the smallest that meets the expectations is found); else the
            growth by attribution, with swaps.
        check: judge the chosen program like `circuitlang.check` (`result.check`).
        permutations: random circuits for that check's permutation test (default: the
            checker's 200 when the program has an `expect` on `p_value`, else 0; with 0 such
            an expectation is not measured, and fails).
        breakdown, max_examples: that check's options.
        batch_size: rows per forward pass.
        device: torch device.
        task_params: task parameters (beat the file's).
        filename: the name errors point at.

    Returns:
        A `HoleResult`: the filled program and the evidence.

    Raises:
        DiscoveryError: a program without holes, a hole with no candidate, a bad option.
        CircuitlangError: a program that does not parse or resolve.
    """
    from circuitlang import options, verdict
    from circuitlang.checker import prepare, run_experiments
    from circuitlang.ir_to_graph import ir_to_graph
    from circuitlang.printer import format

    started = time.perf_counter()
    if method not in ("eap", "eap-ig"):
        raise DiscoveryError(f"holes are ranked by attribution (eap or eap-ig), not {method!r}",
                             code="discover.method", hint="drop --method, or use --method eap")
    for name, value, low in (("top", top, 1), ("runners_up", runners_up, 0), ("max_group", max_group, 1),
                             ("group_budget", group_budget, 0), ("steps", steps, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise DiscoveryError(f"{name} must be a whole number of at least {low}, got {value!r}",
                                 code="discover.option", hint=f"e.g. {name}={max(low, 3)}")
    if ablation is not None and ablation not in ABLATIONS:
        raise DiscoveryError(f"unknown ablation {ablation!r}", code="discover.ablation",
                             hint="use " + ", ".join(ABLATIONS))
    if ig is not None and ig not in IG_VARIANTS:
        raise DiscoveryError(f"unknown EAP-IG variant {ig!r}", code="discover.ig-variant",
                             hint="variants: " + ", ".join(IG_VARIANTS))
    if permutations is not None:
        permutations = options.check_permutations(permutations, "permutations")
    max_examples = options.check_max_examples(max_examples, "max_examples")
    program, text, filename = _read(program_or_text, filename)
    if ablation is not None:
        program = _with_ablation(program, ablation)  # the other statements keep their spans
    hypothesis = _load(program, text, filename, model, task)
    wants_p = any("p_value" in set(e.symbols()) for e in hypothesis.expectations)
    if ig is not None and method == "eap":
        raise DiscoveryError(f"--ig {ig} is EAP-IG's variant; --method eap takes no variant",
                             code="discover.ig-variant", hint="drop --ig, or use --method eap-ig")
    if ig == "inputs" and hypothesis.ablation.mode != "corrupt":
        raise DiscoveryError(f"EAP-IG over inputs interpolates toward the counterfactual: it needs "
                             f"`ablation corrupt`, not {hypothesis.ablation.mode}",
                             code="discover.ig-ablation",
                             hint="use --ig activations, or --ablation corrupt (or the file's "
                             "`ablation corrupt` line)")
    holes = hypothesis.holes()
    if not holes:
        raise DiscoveryError("this program has no holes to fill", code="discover.no-holes",
                             hint="write `head ?h` (or `heads ?g`, `mlp ?m`, `feature a.?f`, `features a.?g`) where a "
                             "component is unknown, "
                             "or test the program with `circuitlang check`")
    shape = hypothesis.shape
    try:
        domains = candidates(hypothesis, shape)
        # a first valid assignment: the model, task, prompts and metric `check` would use on it
        search = HoleSearch(hypothesis, domains, None, shape)
        first = search.first()
        groups0, _ = search.group_fills(first, max_group, 0, 0)
    except CircuitlangError as exc:
        raise (exc.with_source(text) if text is not None else exc) from None
    provisional = _resolve_fill(program, {**{k: (v,) for k, v in first.items()}, **groups0[0]}, filename,
                                model, task)
    setup = prepare(provisional, model=model, task=task, n=n, seed=seed, metric=metric, device=device,
                    batch_size=batch_size, task_params=task_params)
    lm, the_task, prompts = setup.model, setup.task, setup.prompts

    # rank: attribution on the claims' positions
    positions = _claim_positions(hypothesis)
    ablation = hypothesis.ablation.mode if hypothesis.ablation.mode in ABLATIONS else "resample"
    notes = list(setup.notes)
    if permutations is None:
        from circuitlang.checker import DEFAULT_PERMUTATIONS

        permutations = DEFAULT_PERMUTATIONS if wants_p else 0
    elif wants_p and permutations == 0 and check:
        notes.append("permutations=0: the permutation test does not run, so an `expect` on p_value "
                     "is not measured and fails")
    if hypothesis.ablation.given:
        notes.append("the ranking resamples unconditioned; the scrubbing conditions on "
                     + ", ".join(str(f) for f in hypothesis.ablation.given))
    scores = space = None
    rank_passes = 0
    names = []
    if any(h.kind not in ir.LATENT_HOLES for h in holes):  # heads and MLPs: edge attribution
        space = ClaimSpace.build(lm.edge_set(), positions)
        problem = Problem(lm, the_task, prompts, setup.metric, ablation, space, seed=setup.seed,
                          batch_size=batch_size)
        if method == "eap":
            scores = eap(problem)
        else:
            scores = eap_ig(problem, ig or ("inputs" if ablation == "corrupt" else "activations"), steps)
        names.append(scores.method if method != "eap" else "eap")
    latents = {}
    if any(h.kind in ir.LATENT_HOLES for h in holes):  # latents: node attribution over each dictionary
        latents, passes = latent_scores(lm, the_task, prompts, setup.metric, hypothesis, ablation,
                                        setup.seed, batch_size)
        rank_passes += passes
        names.append("latent-attribution")
    method_name = "+".join(names)
    shapes = ClaimScores(scores, space, shape, latents)
    domains = shortlist_latents(hypothesis, domains, shapes, LATENT_CANDIDATES, max_group)
    search = HoleSearch(hypothesis, domains, shapes, shape)
    ranked = search.ranked()

    # verify: the best few, the runners-up around the best, every step of the groups' growth
    graphs = _Verifier(program, text, filename, setup, hypothesis, search, max_group)
    best_single = dict(ranked[0][0])
    if search.groups:  # every choice of the groups beside the best, their growth beside the others
        graphs.verify([best_single], group_budget, runners_up)
        graphs.verify([dict(f) for f, _ in ranked[1:top]] + _swaps(search, best_single, runners_up), 0, 0)
    else:
        graphs.verify([dict(f) for f, _ in ranked[:top]] + _swaps(search, best_single, runners_up), 0, 0)
    chosen = graphs.choose()
    chosen_single = {k: v[0] for k, v in chosen.fill if k in search.singles}
    if chosen_single != best_single:  # the groups and the runners-up around the winner
        graphs.verify([chosen_single], group_budget, runners_up)
        graphs.verify(_swaps(search, chosen_single, runners_up), 0, 0)
        chosen = graphs.choose()
        chosen_single = {k: v[0] for k, v in chosen.fill if k in search.singles}
    if not chosen.meets:
        notes.append("no verified assignment meets every expectation; the one that recovers the most was "
                     "chosen (" + "; ".join(chosen.failed) + " fails)")

    # the evidence
    fills = _evidence(search, graphs, chosen, chosen_single, runners_up)
    fill = dict(chosen.fill)
    where = ", ".join(str(p) for p in positions)
    header = (f"Holes filled by circuitlang discover (n={len(prompts.input_ids)}, seed {setup.seed}, metric "
              f"{setup.metric}): ranked by {describe_ranking(method_name, ablation)}",
              f"at {where}; {len(graphs.done)} assignments checked by causal scrubbing ({ablation} ablation),"
              f" recovered {_fmt(chosen.recovered)}.")
    for name, f in fills.items():
        line = f"  ?{name} = {f.chosen.text()}"
        if f.runners_up:
            line += "; runners-up " + ", ".join(
                c.text() + (f" ({_fmt(c.recovered)})" if c.recovered is not None else "") for c in f.runners_up)
        header += (line,)
    note_of = {name: "filled with " + f.chosen.text() for name, f in fills.items()}
    program = _with_settings(program, n, seed)
    filled = fill_program(program, fill, notes=note_of, header=header)
    filled_text = format(filled)
    filled_h = _resolve_fill(program, fill, filename, lm, the_task)
    result_check = None
    if check:  # what `circuitlang.check` says of the filled program, on the same scrubber
        graph = ir_to_graph(filled_h)
        scored = verdict.Scores(graphs.clean, graphs.random, graphs.scrubbed[_key(fill)])
        result_check = verdict.judge(filled_h, graph, setup, scored, experiments=run_experiments(filled_h, setup),
                                     permutations=permutations, breakdown=breakdown, max_examples=max_examples)
    verified = sorted(graphs.done.values(), key=lambda v: (v is not chosen, not v.meets, -_safe(v.recovered)))
    passes = (problem.passes if scores is not None else 0) + rank_passes + setup.scrubber.passes \
        + setup.scrubber.cache.passes
    return HoleResult(
        text=filled_text, program=filled, hypothesis=filled_h, holes=fills, verified=verified, check=result_check,
        method=method_name, ablation=ablation, positions=positions, model=lm.name,
        task=the_task.SIGNATURE.name, n=len(prompts.input_ids), seed=setup.seed, metric=setup.metric,
        seconds=time.perf_counter() - started, passes=passes, scrub_batches=graphs.batches, notes=notes)


def _with_settings(program: ast.Program, n: int | None, seed: int | None) -> ast.Program:
    """The program with `samples n` and `seed s` where they differ from what `check` would
    use on it, so that checking the filled program re-measures the same prompts."""
    from circuitlang.checker import DEFAULT_N

    current = {s.name: s.value for s in program.statements if isinstance(s, ast.Setting)}
    wanted = {}
    if n is not None and n != current.get("samples", DEFAULT_N):
        wanted["samples"] = n
    if seed is not None and seed != current.get("seed", 0):
        wanted["seed"] = seed
    if not wanted:
        return program
    out = []
    for stmt in program.statements:
        if isinstance(stmt, ast.Setting) and stmt.name in wanted:
            stmt = dataclasses.replace(stmt, value=wanted.pop(stmt.name))
        out.append(stmt)
    at = next((i + 1 for i, st in enumerate(out) if isinstance(st, ast.TaskDecl)), 0)
    for name in ("seed", "samples"):
        if name in wanted:
            out.insert(at, ast.Setting(name, wanted[name]))
    return dataclasses.replace(program, statements=tuple(out))


def _with_ablation(program: ast.Program, mode: str) -> ast.Program:
    """The program with `ablation mode` in place of its `ablation` line (kept as written,
    `given` included, when it already says `mode`), or with one added after its `task` line."""
    out, found = [], False
    for stmt in program.statements:
        if isinstance(stmt, ast.AblationDecl):
            found = True
            if stmt.mode != mode:
                stmt = dataclasses.replace(stmt, mode=mode, given=())
        out.append(stmt)
    if not found:
        at = next((i + 1 for i, st in enumerate(out) if isinstance(st, ast.TaskDecl)), 0)
        out.insert(at, ast.AblationDecl(mode))
    return dataclasses.replace(program, statements=tuple(out))


def _safe(x: float) -> float:
    return x if x is not None and math.isfinite(x) else -math.inf


def _claim_positions(hypothesis) -> tuple[Position, ...]:
    found: dict[Position, None] = {}
    for claim in hypothesis.claims:
        if holes_of(claim):
            found.setdefault(claim.position, None)
    if any(p.is_all for p in found):
        return (ALL,)
    return tuple(found)


def _resolve_fill(program, fill, filename, model, task) -> ir.Hypothesis:
    """The hypothesis of the program with `fill` (hole -> sites) put in its holes."""
    filled = fill_program(program, fill)
    return _load(filled, None, filename, model, task)


def _swaps(search: HoleSearch, fill: dict[str, Site], k: int) -> list[dict[str, Site]]:
    """`fill` with one single hole moved to each of its next `k` candidates."""
    out = []
    for name in search.singles:
        for c, _ in [item for item in search.marginal(name, fill) if item[0] != fill[name]][:k]:
            out.append({**fill, name: c})
    return out


class _Verifier:
    """Fills, resolves, lowers and scrubs assignments in batches; remembers every result."""

    def __init__(self, program, text, filename, setup, hypothesis, search: HoleSearch, max_group: int):
        self.program, self.text, self.filename = program, text, filename
        self.setup, self.hypothesis, self.search, self.max_group = setup, hypothesis, search, max_group
        self.done: dict[tuple, Verified] = {}
        self.scrubbed: dict[tuple, np.ndarray] = {}
        self.orders: dict[tuple, dict] = {}
        self.steps: dict[tuple, list] = {}
        self.batches = 0
        scrubber = setup.scrubber
        self.clean = scrubber.clean()
        self.random = None
        self.others = sorted(n for n in _expectation_metrics(hypothesis) if n != setup.metric)
        self.behaviour = True

    def _empty(self):
        from circuitlang.ir import Ablation, Hypothesis
        from circuitlang.ir_to_graph import ir_to_graph

        h = self.hypothesis
        return ir_to_graph(Hypothesis(model=None, task="", metric="", ablation=Ablation(h.ablation.mode,
                                                                                        h.ablation.given),
                                      semantics=h.semantics))

    def verify(self, singles: list[dict[str, Site]], budget: int, k: int) -> None:
        """Score the single holes' `singles`, each with the group fills `HoleSearch.group_fills`
        gives with `budget` and `k`, in one `scrub_many` (what was scored before is kept)."""
        from circuitlang.ir_to_graph import ir_to_graph

        todo: dict[tuple, tuple[dict, float, object]] = {}
        for single in singles:
            skey = _key({k: (v,) for k, v in single.items()})
            steps, order = self.search.group_fills(single, self.max_group, budget, k)
            self.orders.setdefault(skey, order)
            self.steps.setdefault(skey, [])
            self.steps[skey] += [st for st in steps if st not in self.steps[skey]]
            for step in steps:
                fill = {**{k: (v,) for k, v in single.items()}, **step}
                key = _key(fill)
                if key in self.done or key in todo:
                    continue
                try:
                    h = _resolve_fill(self.program, fill, self.filename, self.setup.model, self.setup.task)
                    graph = ir_to_graph(h)
                except CircuitlangError:
                    continue  # a fill the resolver or the lowering refuses is no candidate
                todo[key] = (fill, self.search.score(fill), graph)
        if not todo:
            return
        graphs = [g for _, _, g in todo.values()]
        seed = self.setup.seed
        scrubber = self.setup.scrubber
        if self.random is None:
            graphs = [self._empty()] + graphs
        results = scrubber.scrub_many(graphs, seed=seed)
        self.batches += 1
        if self.random is None:
            self.random = results[0].scrubbed
            results = results[1:]
            gap = stats.bootstrap_mean(self.random - self.clean, seed=seed)
            self.behaviour = not (gap.low <= 0.0 <= gap.high) and gap.value != 0.0
        others = {}
        for name in self.others:
            other = Scrubber(scrubber.model, scrubber.task, scrubber.prompts, name, batch_size=scrubber.batch_size)
            other.cache = scrubber.cache
            others[name] = other.scrub_many([g for _, _, g in todo.values()], seed=seed)
            scrubber.passes += other.passes
        for i, (key, (fill, score, _)) in enumerate(todo.items()):
            scrubbed = results[i].scrubbed
            extra = {name: others[name][i].scrubbed for name in self.others}
            failed = _failed(self.hypothesis, self.clean, scrubbed, self.random, extra, self.behaviour)
            size = sum(len(fill[g]) for g in self.search.groups)
            self.done[key] = Verified(key, score, stats.recovered(self.clean, scrubbed, self.random), size, failed)
            self.scrubbed[key] = scrubbed

    def choose(self) -> Verified:
        found = list(self.done.values())
        if not found:
            raise DiscoveryError("no assignment of the holes gives a program the checker can run",
                                 code="discover.no-candidate", hint="check the claims that name the holes")
        meets = [v for v in found if v.meets]
        if meets:
            return min(meets, key=lambda v: (v.size, -_safe(v.recovered), -v.score))
        return max(found, key=lambda v: (_safe(v.recovered), -v.size, v.score))


def _evidence(search: HoleSearch, graphs: _Verifier, chosen: Verified, single: dict[str, Site],
              count: int) -> dict[str, HoleFill]:
    """Per hole: the chosen candidate, the next `count` by attribution with what they recover
    (when verified), every candidate's score, and for a group the best fill of each size."""
    fill = dict(chosen.fill)
    out: dict[str, HoleFill] = {}
    skey = _key({k: (v,) for k, v in single.items()})
    orders = graphs.orders.get(skey, {})
    for name in search.kinds:
        if name in search.singles:
            ranking = search.marginal(name, single)
            score = dict(ranking).get(single[name], 0.0)
            mine = Candidate((single[name],), score, chosen.recovered)
            others = []
            for c, v in [item for item in ranking if item[0] != single[name]][:count]:
                alt = {**fill, name: (c,)}
                done = graphs.done.get(_key(alt))
                others.append(Candidate((c,), v, done.recovered if done else None))
            out[name] = HoleFill(name, search.kinds[name], mine, others, ranking)
            continue
        order = orders.get(name) or search.group_order(name, single)
        per_head = dict(order)
        heads = fill[name]
        mine = Candidate(tuple(heads), sum(per_head.get(h, 0.0) for h in heads), chosen.recovered)
        others = []
        for c, v in [item for item in order if item[0] not in heads][:count]:
            alt = {**fill, name: tuple(heads) + (c,)}
            done = graphs.done.get(_key(alt))
            others.append(Candidate((c,), v, done.recovered if done else None))
        by_size: dict[int, Verified] = {}
        for step in graphs.steps.get(skey, []):
            v = graphs.done.get(_key({**{x: (c,) for x, c in single.items()}, **step}))
            if v is not None:
                size = len(step[name])
                if size not in by_size or (v.meets, _safe(v.recovered)) > (by_size[size].meets,
                                                                           _safe(by_size[size].recovered)):
                    by_size[size] = v
        growth = [(size, v.recovered, v.meets) for size, v in sorted(by_size.items())]
        out[name] = HoleFill(name, search.kinds[name], mine, others, order, growth)
    return out
