"""The IR: a hypothesis with every name resolved against a model's shape and a task.

`circuitlang.ast_to_ir.resolve` produces a `Hypothesis`; the checker (lowering to an
intervention graph, then execution) and the solver consume it. Everything here is a
frozen value built from the typed sites of `circuitlang.sites`: there are no names
left to look up, no verbs (they are expanded into core claims), no groups in claims
(expanded into their heads), no wildcards (expanded into explicit site lists).

What the parts mean, in causal-scrubbing terms (Chan et al. 2022):

* `DependsClaim(site, position, features)`: the value of `site` at `position` is a
  function of these features of the prompt only. The scrubber may feed that site
  any prompt that agrees with the clean prompt on every listed feature (an empty
  tuple: any prompt at all). A claimed site keeps its place in the circuit: its
  inputs are scrubbed recursively, never replaced by the unconditioned ablation.
* `EdgeClaim(sender, receiver, position)`: the receiver reads the sender at
  `position` (for a head receiver, through the channel on the receiver: `q`, `k`
  or `v`). That path is part of the circuit; paths not claimed get the ablation
  (`Hypothesis.ablation`: resample, corrupt, mean or zero).
* A `Hole` stands where a site would be; the solver fills it, the checker refuses
  to run a hypothesis that still has one (`Hypothesis.holes()`). `HoleConstraint`s
  (`Hypothesis.hole_constraints`) say where a hole may be and how many heads (or
  latents) a group hole holds.

Experiments (`Patch`, `PathPatch`, `Ablate`) are the classic measurements, run with
the same executor; `Expectation`s are the properties the checker tests.
Every claim, experiment and expectation keeps the span and the text of the source
statement it came from (for verb claims: the verb use the user wrote), so reports
can point back at the file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import sympy

from circuitlang import sites
from circuitlang.errors import Span

#: How unclaimed paths are replaced: a random resample of the dataset, the task's paired
#: counterfactual of the prompt (what ACDC, EAP and path patching call patching), the
#: dataset mean, or zero (every unclaimed sender contributes nothing).
ABLATION_MODES = ("resample", "corrupt", "mean", "zero")
#: `patch ... attribution` also patches this many of its strongest units exactly.
ATTRIBUTION_TOP_K = 10
#: How the scrubber reads a claimed node's inputs that no claimed child covers:
#: "paths" (Chan et al. 2022: every such input path is scrubbed, on every channel) or
#: "channels" (a channel no claim mentions is read on the node's own sample).
SEMANTICS = ("paths", "channels")
DEFAULT_SEMANTICS = "paths"
BUILTIN_METRICS = ("recovered", "clean", "scrubbed", "random", "p_value")


def _span() -> Any:
    return field(default=None, compare=False, repr=False, kw_only=True)


@dataclass(frozen=True, slots=True)
class Feature:
    """A feature of a prompt that resampling can agree on.

    Attributes:
        kind: "token" (the token at a position: `token(IO)`), "position" (where a
            position or feature sits in the prompt: `position(S)`), or "task" (a
            feature the task defines: `template`, `IO`).
        name: the position or feature name (aliases already mapped, so IOI's
            `name` is `IO`); a position with an offset reads `S1+1`.
    """

    kind: str
    name: str

    def __str__(self) -> str:
        return self.name if self.kind == "task" else f"{self.kind}({self.name})"


@dataclass(frozen=True, slots=True)
class Hole:
    """An unknown component for the solver: `head ?h`, `head ?h.q`, `mlp ?m`, `heads ?g`,
    `feature res5.?f`.

    Attributes:
        name: the hole's name without `?`; one name is one unknown everywhere it occurs.
        kind: "head", "group" (`heads ?g`: a set of heads of unknown size; a claim about
            it is a claim about each of its heads), "mlp", "resid", "latent" (one
            latent of `sae`) or "latents" (`features res5.?g`: a set of latents of `sae`
            of unknown size, claimed each).
        channel: for head and group holes, the channel the claim is about.
        sae: for a latent or latent group hole, the dictionary whose latents it holds.
    """

    name: str
    kind: str
    channel: sites.Channel = sites.Channel.OUT
    sae: "sites.Dictionary | None" = None

    def __str__(self) -> str:
        if self.kind == "latent":
            return f"feature {self.sae.name}.?{self.name}"
        if self.kind == "latents":
            return f"features {self.sae.name}.?{self.name}"
        base = f"{'heads' if self.kind == 'group' else self.kind} ?{self.name}"
        if self.kind in ("head", "group") and self.channel is not sites.Channel.OUT:
            return f"{base}.{self.channel.value}"
        return base


#: Hole kinds that hold a set of unknown size (a claim about one is a claim about each member).
GROUP_HOLES = ("group", "latents")
#: Hole kinds filled with SAE latents.
LATENT_HOLES = ("latent", "latents")


@dataclass(frozen=True, slots=True)
class HoleConstraint:
    """A constraint on a hole: where it may be (`?s in layers 7-8`, `?s in heads 9.6, 9.9`)
    or how many heads a group hole holds (`?g has at most 4 heads`; latents: `?g has at
    most 8 features`).

    Attributes:
        hole: the hole's name, without `?`.
        allowed: for `in`: the sites the hole may be filled with (heads, channel `out`, for
            a head or group hole; `Mlp`s for an MLP hole), in model order; None for a size.
        at_least, at_most: for a size: the bounds on a group hole's number of heads (or
            latents; `exactly N` sets both); None where unbounded.
        unit: what a size counts: "heads" (`heads ?g`) or "features" (`features res5.?g`);
            None for `in`.
        text: the source statement.
    """

    hole: str
    allowed: tuple[sites.Site, ...] | None = None
    at_least: int | None = None
    at_most: int | None = None
    unit: str | None = None
    text: str = field(default="", compare=False)
    span: Span | None = _span()


SiteOrHole = Union[sites.Embed, sites.TokenEmbed, sites.PosEmbed, sites.Head, sites.Mlp,
                   sites.Resid, sites.Logits, Hole, sites.Neuron, sites.Latent, sites.SaeError,
                   sites.Subspace]


@dataclass(frozen=True, slots=True)
class DependsClaim:
    """`site` at `position` is a function of `features` only (see module docstring)."""

    site: SiteOrHole
    position: sites.Position
    features: tuple[Feature, ...]
    text: str = field(default="", compare=False)
    verb: str | None = field(default=None, compare=False)
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class EdgeClaim:
    """`receiver` reads `sender` at `position`: that path belongs to the circuit."""

    sender: SiteOrHole
    receiver: SiteOrHole
    position: sites.Position
    text: str = field(default="", compare=False)
    verb: str | None = field(default=None, compare=False)
    span: Span | None = _span()


Claim = Union[DependsClaim, EdgeClaim]


@dataclass(frozen=True, slots=True)
class Patch:
    """Activation patching: run on the clean prompt, patch in corrupted activations.

    Attributes:
        sites: the sites patched. With `sweep`, each site is patched on its own and
            the results form a grid; without, all of them are patched together.
        position: where (`ALL` for every position).
        sweep: True when the statement had a wildcard (`patch head * at END`).
        grid: the shape of the result grid for a sweep, e.g. (12, 12); () otherwise.
            `sites` lists the grid's cells in row-major order.
        axes: what each grid dimension indexes ("layer", "head").
        direction: "noise" (the clean run, patched with corrupt values), "denoise"
            (the corrupt run, patched with clean values) or "attribution" (noising
            estimated for every unit at once, `Experiments.attribution`, the strongest
            `ATTRIBUTION_TOP_K` patched exactly); `circuitlang.experiments`.
    """

    sites: tuple[SiteOrHole, ...]
    position: sites.Position
    sweep: bool = False
    grid: tuple[int, ...] = ()
    axes: tuple[str, ...] = ()
    text: str = field(default="", compare=False)
    span: Span | None = _span()
    direction: str = "noise"


@dataclass(frozen=True, slots=True)
class PathPatch:
    """Path patching: patch `senders`' corrupted outputs into `receivers` only.

    With `sweep`, each sender is patched on its own (grid as in `Patch`).
    """

    senders: tuple[SiteOrHole, ...]
    receivers: tuple[SiteOrHole, ...]
    position: sites.Position
    sweep: bool = False
    grid: tuple[int, ...] = ()
    axes: tuple[str, ...] = ()
    text: str = field(default="", compare=False)
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class Ablate:
    """Ablate `sites` together with `mode` ("resample", "mean" or "zero") at `position`."""

    sites: tuple[SiteOrHole, ...]
    mode: str
    position: sites.Position
    text: str = field(default="", compare=False)
    span: Span | None = _span()


#: The columns of `trace ... at all` (ROME's figure), in order; `circuitlang.tracing`.
TRACE_COLUMNS = ("BEFORE", "SUBJ_FIRST", "SUBJ_MIDDLE", "SUBJ_LAST", "SUBJ_LAST+1", "FURTHER", "END")


@dataclass(frozen=True, slots=True)
class Trace:
    """Causal tracing (`circuitlang.tracing`): noise the task's subject span, restore
    each clean `site` state ("resid", "mlp" or "attn") of every layer at `position`
    (`ALL`: every token, in ROME's columns).

    Attributes:
        sites: every layer's state of that kind (`Mlp(0)`, ...; attention as its heads).
        noise: the noise's std in units of the subject embeddings' std (ROME: 3).
        window: layers restored together around each layer (1: one layer).
    """

    site: str
    position: sites.Position
    sites: tuple[SiteOrHole, ...] = ()
    noise: float = 3.0
    window: int = 1
    grid: tuple[int, ...] = ()
    text: str = field(default="", compare=False)
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class Probe:
    """Linear probes (`circuitlang.probes`): one per layer's `site` state at `position`,
    predicting task feature `feature`.

    Attributes:
        sites: the states probed (`Resid(0)`, ..., or `Mlp(0)`, ...), one per layer.
        heldout: the share of prompts held out to score each probe.
        save: a safetensors file to write the probe directions to (None: not saved).
    """

    site: str
    position: sites.Position
    feature: str
    sites: tuple[SiteOrHole, ...] = ()
    heldout: float = 0.25
    save: str | None = None
    grid: tuple[int, ...] = ()
    text: str = field(default="", compare=False)
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class Align:
    """Distributed alignment search (`circuitlang.das`): learn `basis` (its place, its file,
    k = `basis.k` dimensions) at `position` for task feature `feature`, from the task's
    counterfactual pairs; later statements use it as `subspace NAME`.

    Attributes:
        steps, pairs, heldout: Adam steps, at most this many pairs, the share held out.
        sites: empty (what it learns is not a site yet; as other experiments, for passes
            that look for holes in `sites`).
    """

    basis: sites.Basis
    position: sites.Position
    feature: str
    steps: int = 300
    pairs: int = 200
    heldout: float = 0.25
    sites: tuple[SiteOrHole, ...] = ()
    text: str = field(default="", compare=False)
    span: Span | None = _span()


Experiment = Union[Patch, PathPatch, Ablate, Trace, Probe, Align]


@dataclass(frozen=True, slots=True)
class Expectation:
    """A property the checker tests: `lhs op rhs`.

    Attributes:
        kind: "aggregate" (over the prompt distribution, with a confidence interval)
            or "each" (for every prompt; the checker searches for a counterexample).
        lhs, rhs: sympy expressions over metric symbols (`recovered`, `clean`,
            `scrubbed`, `random` and the task's metrics); numbers are exact rationals.
        op: one of `>=`, `<=`, `>`, `<`, `==`, `!=`.
        text: the source statement.
    """

    kind: str
    lhs: sympy.Expr
    op: str
    rhs: sympy.Expr
    text: str = field(default="", compare=False)
    span: Span | None = _span()

    def symbols(self) -> tuple[str, ...]:
        """Metric names the expectation reads, sorted."""
        names = {s.name for s in (self.lhs.free_symbols | self.rhs.free_symbols)}
        return tuple(sorted(names))


@dataclass(frozen=True, slots=True)
class Ablation:
    """How unclaimed paths are replaced: `mode` and, for resampling, what to agree on."""

    mode: str = "resample"
    given: tuple[Feature, ...] = ()


@dataclass(frozen=True, slots=True)
class Reported:
    """A number the paper reports (`reported clean = 3.56`), shown beside the measurement."""

    name: str
    value: float


@dataclass(frozen=True, slots=True)
class Hypothesis:
    """A resolved hypothesis: what the checker runs and the solver completes.

    Attributes:
        model: the model's name (the override, or the file's `model` line).
        task: the task's name.
        metric: the metric recovered is measured in (the task's default if unnamed).
        metric_named: whether the file named it (`metric ...`); when not, the checker
            may choose a metric that can see the claimed positions.
        ablation: how unclaimed paths are replaced.
        semantics: how a claimed node's uncovered inputs are read (`SEMANTICS`).
        seed: the random seed, if the file sets one.
        samples: how many prompts to use, if the file sets it.
        task_params: the task's parameters, (name, value) pairs sorted by name: the
            `task` line's (`task induction length=20`), and a JSONL task's `path`.
        citations: `cite` lines.
        reported: numbers from the paper.
        groups: group name -> heads, in definition order (imports first).
        claims: core claims after verb expansion, in source order.
        experiments: patching and ablation statements.
        expectations: `expect` statements.
        imports: the files imported with `use` (`stdlib.ioi`).
        hole_constraints: the constraints on its holes (`?s in layers 7-8`, `?g has at most
            4 heads`), in source order; the solver fills holes within them.
        filename: the file it came from, if any.
        saes: the sparse autoencoders the file declares (`sae NAME = "path" at resid L`).
        shape: the `ModelShape` it was resolved against (what edges exist; None for
            a hypothesis built by hand). Not part of equality.
    """

    model: str | None
    task: str
    metric: str
    metric_named: bool = False
    ablation: Ablation = Ablation()
    semantics: str = DEFAULT_SEMANTICS
    seed: int | None = None
    samples: int | None = None
    task_params: tuple[tuple[str, Any], ...] = ()
    citations: tuple[str, ...] = ()
    reported: tuple[Reported, ...] = ()
    groups: tuple[tuple[str, tuple[sites.Head, ...]], ...] = ()
    claims: tuple[Claim, ...] = ()
    experiments: tuple[Experiment, ...] = ()
    expectations: tuple[Expectation, ...] = ()
    imports: tuple[str, ...] = ()
    hole_constraints: tuple[HoleConstraint, ...] = ()
    filename: str | None = field(default=None, compare=False)
    shape: sites.ModelShape | None = field(default=None, compare=False, repr=False)
    saes: tuple[sites.Dictionary, ...] = ()

    def group(self, name: str) -> tuple[sites.Head, ...]:
        """The heads of group `name` (KeyError if there is none)."""
        return dict(self.groups)[name]

    def holes(self) -> tuple[Hole, ...]:
        """Every distinct hole in claims and experiments, in order of appearance.

        One name is one unknown: `?h` and `?h.q` are listed once, as first seen.
        """
        found: dict[str, Hole] = {}
        for claim in self.claims:
            for site in _claim_sites(claim):
                if isinstance(site, Hole):
                    found.setdefault(site.name, site)
        for exp in self.experiments:
            for site in _experiment_sites(exp):
                if isinstance(site, Hole):
                    found.setdefault(site.name, site)
        return tuple(found.values())

    def claimed_sites(self) -> tuple[SiteOrHole, ...]:
        """Every site some claim names, in order of first appearance."""
        found: dict[Any, None] = {}
        for claim in self.claims:
            for site in _claim_sites(claim):
                found.setdefault(site, None)
        return tuple(found)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict of the whole hypothesis (what `circuitlang parse --json` prints)."""
        return {
            "model": self.model,
            "task": self.task,
            "metric": self.metric,
            "ablation": {"mode": self.ablation.mode,
                         "given": [feature_to_json(f) for f in self.ablation.given]},
            "semantics": self.semantics,
            "task_params": {k: list(v) if isinstance(v, tuple) else v for k, v in self.task_params},
            "seed": self.seed,
            "samples": self.samples,
            "citations": list(self.citations),
            "reported": {r.name: r.value for r in self.reported},
            "groups": {name: [site_to_json(h) for h in heads] for name, heads in self.groups},
            "claims": [claim_to_json(c) for c in self.claims],
            "experiments": [experiment_to_json(e) for e in self.experiments],
            "expectations": [expectation_to_json(e) for e in self.expectations],
            "holes": [site_to_json(h) for h in self.holes()],
            "hole_constraints": [hole_constraint_to_json(c) for c in self.hole_constraints],
            "imports": list(self.imports),
            "filename": self.filename,
            "saes": [{"name": d.name, "path": d.path, "hook": d.hook, "layer": d.layer,
                      "d_sae": d.d_sae} for d in self.saes],
        }


def _claim_sites(claim: Claim) -> tuple[SiteOrHole, ...]:
    if isinstance(claim, DependsClaim):
        return (claim.site,)
    return (claim.sender, claim.receiver)


def _experiment_sites(exp: Experiment) -> tuple[SiteOrHole, ...]:
    if isinstance(exp, PathPatch):
        return exp.senders + exp.receivers
    return exp.sites


# ------------------------------------------------------------------- JSON


def span_to_json(span: Span | None) -> dict[str, Any] | None:
    """A span as {file, line, column, end_line, end_column} (None stays None)."""
    if span is None:
        return None
    return {"file": span.filename, "line": span.line, "column": span.column,
            "end_line": span.end_line, "end_column": span.end_column}


def site_to_json(site: SiteOrHole) -> dict[str, Any]:
    """A site as a dict with `kind`, its numbers, and `text` (`head 9.6.q`)."""
    if isinstance(site, Hole):
        return {"kind": "hole", "hole_kind": site.kind, "name": site.name,
                "channel": site.channel.value, "text": str(site)}
    if isinstance(site, sites.Head):
        return {"kind": "head", "layer": site.layer, "head": site.head,
                "channel": site.channel.value, "text": str(site)}
    if isinstance(site, (sites.Mlp, sites.Resid)):
        kind = "mlp" if isinstance(site, sites.Mlp) else "resid"
        return {"kind": kind, "layer": site.layer, "text": str(site)}
    if isinstance(site, sites.Neuron):
        return {"kind": "neuron", "layer": site.layer, "index": site.index, "text": str(site)}
    if isinstance(site, sites.Latent):
        return {"kind": "feature", "sae": site.sae.name, "index": site.index, "text": str(site)}
    if isinstance(site, sites.SaeError):
        return {"kind": "error", "sae": site.sae.name, "text": str(site)}
    if isinstance(site, sites.Subspace):
        b = site.basis
        return {"kind": "subspace", "name": b.name, "hook": b.hook, "layer": b.layer, "head": b.head,
                "k": b.k, "text": str(site)}
    return {"kind": str(site), "text": str(site)}


def hole_constraint_to_json(constraint: HoleConstraint) -> dict[str, Any]:
    """A hole constraint as {hole, allowed (site texts or None), at_least, at_most, unit, text, span}."""
    allowed = None if constraint.allowed is None else [str(s) for s in constraint.allowed]
    return {"hole": constraint.hole, "allowed": allowed, "at_least": constraint.at_least,
            "at_most": constraint.at_most, "unit": constraint.unit, "text": constraint.text,
            "span": span_to_json(constraint.span)}


def feature_to_json(feature: Feature) -> dict[str, str]:
    """A feature as {kind, name, text}."""
    return {"kind": feature.kind, "name": feature.name, "text": str(feature)}


def claim_to_json(claim: Claim) -> dict[str, Any]:
    """A claim as a dict with `kind` "depends" or "edge"."""
    common = {"text": claim.text, "verb": claim.verb, "span": span_to_json(claim.span)}
    if isinstance(claim, DependsClaim):
        return {"kind": "depends", "site": site_to_json(claim.site),
                "position": str(claim.position),
                "features": [feature_to_json(f) for f in claim.features], **common}
    return {"kind": "edge", "sender": site_to_json(claim.sender),
            "receiver": site_to_json(claim.receiver), "position": str(claim.position),
            **common}


def experiment_to_json(exp: Experiment) -> dict[str, Any]:
    """An experiment as a dict with `kind` "patch", "path_patch" or "ablate"."""
    common = {"text": exp.text, "span": span_to_json(exp.span), "position": str(exp.position)}
    if isinstance(exp, Trace):
        return {"kind": "trace", "site": exp.site, "noise": exp.noise, "window": exp.window,
                "grid": list(exp.grid), **common}
    if isinstance(exp, Align):
        b = exp.basis
        return {"kind": "align", "name": b.name, "hook": b.hook, "layer": b.layer, "head": b.head,
                "dims": b.k, "feature": exp.feature, "steps": exp.steps, "pairs": exp.pairs,
                "heldout": exp.heldout, "save": b.path, **common}
    if isinstance(exp, Probe):
        return {"kind": "probe", "site": exp.site, "feature": exp.feature, "heldout": exp.heldout,
                "save": exp.save, "grid": list(exp.grid), **common}
    if isinstance(exp, Patch):
        return {"kind": "patch", "sites": [site_to_json(s) for s in exp.sites],
                "sweep": exp.sweep, "grid": list(exp.grid), "axes": list(exp.axes), **common}
    if isinstance(exp, PathPatch):
        return {"kind": "path_patch", "senders": [site_to_json(s) for s in exp.senders],
                "receivers": [site_to_json(s) for s in exp.receivers], "sweep": exp.sweep,
                "grid": list(exp.grid), "axes": list(exp.axes), **common}
    return {"kind": "ablate", "sites": [site_to_json(s) for s in exp.sites],
            "mode": exp.mode, **common}


def expectation_to_json(exp: Expectation) -> dict[str, Any]:
    """An expectation as a dict; expressions as sympy's string form."""
    return {"kind": exp.kind, "lhs": str(exp.lhs), "op": exp.op, "rhs": str(exp.rhs),
            "symbols": list(exp.symbols()), "text": exp.text, "span": span_to_json(exp.span)}
