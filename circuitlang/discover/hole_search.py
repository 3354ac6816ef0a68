"""The search behind hole filling: candidates, scores shaped like each claim, assignments.

Takes a resolved `Hypothesis` with holes (and, for ranking, attribution `Scores` over a
`ClaimSpace`); gives what `circuitlang.discover.holes` verifies:

* `candidates`: per hole, the sites its `in` constraints allow
  (`circuitlang.ast_to_ir.holes.hole_domain`) such that every edge claim naming it and no
  other hole is an edge of the model (`circuitlang.topology`);
* `ClaimSpace`: the edge space at the claims' positions, every other position clean;
* `ClaimScores`: a claim's attribution in its own shape (a `depends on` claim: the
  site's node score at its position; an edge claim: that edge's score; see
  `circuitlang.discover.holes`);
* `HoleSearch`: joint assignments of the head and MLP holes by the sum of their claims'
  scores (a beam of `BEAM`; distinct holes are distinct components, and edges between two
  holes must exist), each hole's candidates with the others fixed, and the fills of the
  group holes to verify beside an assignment (every choice within their bounds when there
  are few, else grown best head (or latent) first, with swaps).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import torch

from circuitlang import ir, sites, topology
from circuitlang.ast_to_ir.holes import hole_domain, hole_size
from circuitlang.discover.attribution import Scores
from circuitlang.discover.problem import EdgeSpace
from circuitlang.errors import DiscoveryError
from circuitlang.execute import position_index
from circuitlang.sites import Channel, Head, Mlp, Position, Site

__all__ = ["BEAM", "LATENT_CANDIDATES", "ClaimScores", "ClaimSpace", "HoleSearch", "candidates", "holes_of",
           "latent_scores", "put", "shortlist_latents"]

#: Joint assignments of head and MLP holes kept at each step of the search.
BEAM = 512

#: Candidates of a latent hole kept for the search, best node scores first.
LATENT_CANDIDATES = 32


# ----------------------------------------------------------------------------- the edge space


class ClaimSpace(EdgeSpace):
    """Per-position edges at the claims' positions; every other position keeps its clean
    input (where `EdgeSpace` ablates it), so a score is the effect of ablating one edge at
    one position in the otherwise clean model."""

    def masks(self, kept: torch.Tensor, prompts, index: torch.Tensor | None = None) -> torch.Tensor:
        if not self.per_position:
            return super().masks(kept, prompts, index)
        grid = self.as_grid(1.0 - kept.to(torch.float32))  # [K, P, R, S]
        valid = self.edge_set.valid().to(grid.dtype)
        out = torch.zeros(kept.shape[0], prompts.input_ids.shape[1], *valid.shape, dtype=grid.dtype)
        rows = torch.arange(kept.shape[0])
        for p, position in enumerate(self.positions):
            out[rows, position_index(prompts, position)[index]] = grid[:, p] * valid
        return out


# ----------------------------------------------------------------------------- claims with holes


def holes_of(claim) -> list[ir.Hole]:
    parts = (claim.site,) if isinstance(claim, ir.DependsClaim) else (claim.sender, claim.receiver)
    return [p for p in parts if isinstance(p, ir.Hole)]


def put(site, fill: dict[str, Site]):
    """A claim's site with its hole filled by one site (a group hole: by one of its heads)."""
    if not isinstance(site, ir.Hole):
        return site
    found = fill[site.name]
    if isinstance(found, Head):
        return found.with_channel(site.channel)
    return found


def _as_receiver(site):
    """An edge's receiver: a head with no channel is read through its query (for validity)."""
    if isinstance(site, Head) and site.channel is Channel.OUT:
        return site.with_channel(Channel.Q)
    return site


def _edge_ok(shape, claim, fill: dict[str, Site]) -> bool:
    if not isinstance(claim, ir.EdgeClaim):
        return True
    return topology.edge_problem(shape, put(claim.sender, fill), _as_receiver(put(claim.receiver, fill))) is None


def candidates(hypothesis: ir.Hypothesis, shape: sites.ModelShape | None = None) -> dict[str, tuple[Site, ...]]:
    """Every site each hole may be filled with: what its `in` constraints allow
    (`hole_domain`), such that each edge claim naming it and no other hole is an edge of the
    model. Edges between two holes are checked per assignment.

    Raises:
        DiscoveryError: a hole that no claim names, a kind the solver does not fill
            (`resid ?r`), or a hole with no candidate (code `discover.no-candidate`).
    """
    shape = shape or hypothesis.shape
    out: dict[str, tuple[Site, ...]] = {}
    for hole in hypothesis.holes():
        mine = [c for c in hypothesis.claims if any(h.name == hole.name for h in holes_of(c))]
        if not mine:
            raise DiscoveryError(f"hole ?{hole.name} is in no claim, so nothing says what it should do",
                                 code="discover.hole-unused",
                                 hint=f"claim something about it (`head ?{hole.name} moves IO to END`), or "
                                 "name the component")
        if hole.kind in ir.LATENT_HOLES:  # every latent of its SAE (an `in` line is refused earlier)
            # the latents of one dictionary read and write at one place: one is checked for all
            first = {hole.name: sites.Latent(hole.sae, 0)}
            if not all(_edge_ok(shape, c, first) for c in mine if len({h.name for h in holes_of(c)}) == 1):
                raise DiscoveryError(f"hole ?{hole.name} has no candidate: no latent of SAE {hole.sae.name} "
                                     "makes its edge claims edges of the model", code="discover.no-candidate",
                                     hint=f"SAE {hole.sae.name} reads {hole.sae.hook} {hole.sae.layer}: a latent "
                                     "there receives from the layers below it and sends to the layers above")
            out[hole.name] = tuple(sites.Latent(hole.sae, i) for i in range(hole.sae.d_sae))
            continue
        if hole.kind == "resid":
            raise DiscoveryError(f"cannot fill `{hole}`: the residual stream is a sum of senders, not a "
                                 "component", code="discover.hole-kind",
                                 hint="make the hole a head (`head ?h`), a group (`heads ?g`) or an MLP (`mlp ?m`)")
        constraints = tuple(c for c in hypothesis.hole_constraints if c.hole == hole.name)
        domain = list(hole_domain(shape, hole.kind, constraints))
        if not domain:
            what = "the model has no MLPs" if hole.kind == "mlp" else "its constraints allow none"
            raise DiscoveryError(f"hole ?{hole.name} has no candidate: {what}", code="discover.no-candidate",
                                 hint="widen its constraints" if constraints else "use a head hole instead")
        allowed = len(domain)
        for claim in mine:
            if len({h.name for h in holes_of(claim)}) != 1:
                continue
            kept = [c for c in domain if _edge_ok(shape, claim, {hole.name: c})]
            if not kept:
                what = "MLPs" if hole.kind == "mlp" else "heads"
                where = (f"none of the {allowed} {what} its constraints allow" if constraints
                         else f"none of the model's {allowed} {what}")
                raise DiscoveryError(
                    f"hole ?{hole.name} has no candidate: {where} makes `{claim.text or claim}` an edge "
                    "of the model", code="discover.no-candidate", span=claim.span,
                    hint="a site reads only what was computed before it (a head: senders of earlier "
                    "layers); change the claim or widen the hole's constraints")
            domain = kept
        out[hole.name] = tuple(domain)
    return out


class ClaimScores:
    """Scores shaped like each claim, read from the attribution grid [P, R, S] and, for
    latents, from node attribution at each claim's position (`latent_scores`)."""

    def __init__(self, scores: Scores | None, space: EdgeSpace | None, shape,
                 latents: dict[tuple[sites.Dictionary, Position], "np.ndarray"] | None = None):
        self.shape = shape
        self.latents = latents or {}
        if scores is None:  # latent holes only: no edge attribution was run
            self.grid = None
            return
        grid = space.as_grid(scores.edges.double()).numpy()
        self.grid = grid
        self.out_sum = grid.sum(1)  # [P, S]: a sender's outgoing edges at each position
        self.in_sum = grid.sum(2)  # [P, R]: a receiver's incoming edges
        es = space.edge_set
        self.s_index = {s: i for i, s in enumerate(es.senders)}
        self.r_index = {r: i for i, r in enumerate(es.receivers)}
        self.positions = {p: i for i, p in enumerate(space.positions)}
        self.all = not space.per_position

    def _p(self, position) -> int | None:
        if self.all:
            return 0
        return self.positions.get(position)

    def latent(self, site, position) -> float:
        """|a latent's node score at the claim's position| (0 where none was computed)."""
        table = self.latents.get((site.sae, position))
        return 0.0 if table is None else abs(float(table[site.index]))

    def _r(self, site) -> int | None:
        return self.r_index.get(topology.canonical(self.shape, site))

    def value(self, claim, fill: dict[str, Site]) -> float:
        """|the summed scores of the edges the claim names|, its holes filled by `fill`; a
        claim naming a latent hole: that latent's node score at the claim's position (an
        edge claim too: how much the latent matters there)."""
        for hole in holes_of(claim):
            if hole.kind in ir.LATENT_HOLES:
                return self.latent(fill[hole.name], claim.position)
        if self.grid is None:
            return 0.0
        p = self._p(claim.position)
        if p is None:
            return 0.0
        if isinstance(claim, ir.DependsClaim):
            site = put(claim.site, fill)
            if isinstance(site, Head) and site.channel is Channel.PATTERN:
                q, k = self._r(site.with_channel(Channel.Q)), self._r(site.with_channel(Channel.K))
                total = (self.in_sum[p, q] if q is not None else 0.0) + (self.in_sum[:, k].sum() if k is not None else 0.0)
            elif isinstance(site, Head) and site.channel.is_input:
                r = self._r(site)
                total = self.in_sum[p, r] if r is not None else 0.0
            else:
                s = self.s_index.get(site)
                total = self.out_sum[p, s] if s is not None else 0.0
            return abs(float(total))
        sender, receiver = put(claim.sender, fill), put(claim.receiver, fill)
        s = self.s_index.get(sender)
        if s is None:
            return 0.0
        receivers = [receiver]
        if isinstance(receiver, Head) and receiver.channel is Channel.OUT:
            receivers = [receiver.with_channel(c) for c in (Channel.Q, Channel.K, Channel.V)]
        total = 0.0
        for r in receivers:
            i = self._r(r)
            if i is not None:
                total += self.grid[p, i, s]
        return abs(float(total))


def latent_scores(lm, task, prompts, metric: str, hypothesis: ir.Hypothesis, ablation: str = "corrupt",
                  seed: int = 0, batch_size: int = 32
                  ) -> tuple[dict[tuple[sites.Dictionary, Position], np.ndarray], int]:
    """Node attribution of every latent of each SAE a latent hole names, at each position a
    claim naming it is at: (SAE, position) -> [d_sae] mean estimated effect on the metric
    of that latent alone taking its ablated value (attribution patching over latents, as
    Marks et al. 2024; `circuitlang.models.attribution`), and the forward passes it ran.

    The ablated value follows `ablation`, as the edge ranking's does
    (`circuitlang.discover.problem`): the latent on the task's counterfactual prompt
    (`corrupt`), on another prompt of the same length drawn from `seed` (`resample`), its
    mean per position over the prompts (`mean`), or zero (`zero`)."""
    from circuitlang.discover.problem import resample_donors
    from circuitlang.experiments import rows_metric
    from circuitlang.models.attribution import attribute_nodes

    wanted: dict[tuple[sites.Dictionary, Position], None] = {}
    for claim in hypothesis.claims:
        for hole in holes_of(claim):
            if hole.kind in ir.LATENT_HOLES:
                wanted.setdefault((hole.sae, claim.position), None)
    value = rows_metric(lm, task, prompts, metric)
    donors, baseline = None, "paired"
    if ablation == "corrupt":
        donors = prompts.corrupt_input_ids
    elif ablation == "resample":
        donors = prompts.input_ids[torch.as_tensor(resample_donors(prompts, seed))]
    else:
        baseline = ablation
    out, passes = {}, 0
    for sae, position in wanted:
        at = None if position.is_all else position_index(prompts, position)
        found = attribute_nodes(lm, prompts.input_ids, donors, value, [sites.AllLatents(sae)],
                                attention_mask=prompts.attention_mask, positions=at, batch_size=batch_size,
                                baseline=baseline)
        out[(sae, position)] = found.scores.double().numpy()
        passes += found.passes
    return out, passes


def shortlist_latents(hypothesis: ir.Hypothesis, domains: dict[str, tuple[Site, ...]], shapes: "ClaimScores",
                      keep: int, max_group: int = 16) -> dict[str, tuple[Site, ...]]:
    """`domains` with each latent hole's candidates cut to the `keep` with the largest node
    scores summed over the claims that name the hole (a dictionary has thousands of
    latents; the joint search and the verification need a few). A latent group hole keeps
    at least as many as it may hold (its upper bound, else `max_group`, and its lower
    bound), so the cut never caps its size."""
    out = dict(domains)
    for hole in hypothesis.holes():
        if hole.kind not in ir.LATENT_HOLES:
            continue
        mine = keep
        if hole.kind == "latents":
            lo, hi = hole_size(tuple(c for c in hypothesis.hole_constraints if c.hole == hole.name))
            mine = max(keep, lo, hi if hi is not None else max_group)
        where = [c.position for c in hypothesis.claims if any(h.name == hole.name for h in holes_of(c))]
        total = {c: sum(shapes.latent(c, p) for p in where) for c in domains[hole.name]}
        out[hole.name] = tuple(sorted(total, key=lambda c: (-total[c], c.index))[:mine])
    return out


# ----------------------------------------------------------------------------- the search


class HoleSearch:
    """Joint assignments of the head and MLP holes, and the growth of the group holes."""

    def __init__(self, hypothesis, domains, shapes: ClaimScores | None, shape):
        self.shape = shape
        self.shapes = shapes
        self.domains = domains
        holes = hypothesis.holes()
        self.kinds = {h.name: h.kind for h in holes}
        self.singles = [h.name for h in holes if h.kind not in ir.GROUP_HOLES]
        self.groups = [h.name for h in holes if h.kind in ir.GROUP_HOLES]
        self.claims = [c for c in hypothesis.claims if holes_of(c)]
        constraints = hypothesis.hole_constraints
        self.bounds = {g: hole_size(tuple(c for c in constraints if c.hole == g)) for g in self.groups}
        self._memo: dict = {}
        self._best: dict = {}

    def _value(self, claim, fill) -> float:
        if self.shapes is None:
            return 0.0
        key = (id(claim), tuple(sorted((h.name, fill[h.name]) for h in holes_of(claim))))
        if key not in self._memo:
            self._memo[key] = self.shapes.value(claim, fill)
        return self._memo[key]

    def _claim_names(self, claim) -> set[str]:
        return {h.name for h in holes_of(claim)}

    def score(self, fill: dict[str, tuple[Site, ...]]) -> float:
        """The attribution of a whole assignment: every claim with holes, once per head of
        each group hole it names."""
        total = 0.0
        for claim in self.claims:
            names = sorted(self._claim_names(claim))
            for combo in itertools.product(*(fill[n] for n in names)):
                total += self._value(claim, dict(zip(names, combo)))
        return total

    # -- singles
    def single_score(self, fill: dict[str, Site], only: str | None = None) -> float:
        """The attribution of the claims whose head/MLP holes are all in `fill` (a claim that
        also names a group hole counts with that group's best head); with `only`, of the
        claims that name that hole."""
        total = 0.0
        for claim in self.claims:
            names = self._claim_names(claim)
            if only is not None and only not in names:
                continue
            singles = names - set(self.groups)
            if not singles <= set(fill):
                continue
            if names <= set(fill):
                total += self._value(claim, fill)
                continue
            total += self._best_member(claim, {n: fill[n] for n in singles})
        return total

    def _best_member(self, claim, fill: dict[str, Site]) -> float:
        """A claim naming a group hole, for the single holes' `fill`: its best head's score
        (an optimistic bound, over the group's whole domain)."""
        key = (id(claim), tuple(sorted(fill.items())))
        if key not in self._best:
            groups = sorted(self._claim_names(claim) - set(fill))
            self._best[key] = max((self._value(claim, {**fill, **dict(zip(groups, combo))})
                                   for combo in itertools.product(*(self.domains[g] for g in groups))),
                                  default=0.0)
        return self._best[key]

    def valid(self, fill: dict[str, Site]) -> bool:
        heads = [s for s in fill.values() if isinstance(s, Head)]
        if len(heads) != len(set(heads)):
            return False
        mlps = [s for n, s in fill.items() if isinstance(s, Mlp)]
        if len(mlps) != len(set(mlps)):
            return False
        latents = [s for s in fill.values() if isinstance(s, sites.Latent)]
        if len(latents) != len(set(latents)):
            return False
        return all(_edge_ok(self.shape, c, fill) for c in self.claims if self._claim_names(c) <= set(fill))

    def first(self) -> dict[str, Site]:
        """A valid assignment of the single holes (the first in domain order), or a
        `DiscoveryError` when there is none."""
        def extend(fill: dict[str, Site], i: int) -> dict[str, Site] | None:
            if i == len(self.singles):
                return fill
            for c in self.domains[self.singles[i]]:
                new = {**fill, self.singles[i]: c}
                if self.valid(new):
                    found = extend(new, i + 1)
                    if found is not None:
                        return found
            return None

        found = extend({}, 0)
        if found is None:
            raise DiscoveryError(
                "no assignment of the holes makes every claim an edge of the model ("
                + ", ".join(f"?{n}" for n in self.singles) + ")", code="discover.no-candidate",
                hint="an edge between two holes needs the sender below the receiver, and distinct "
                "holes are distinct heads; widen the holes' constraints")
        return found

    def ranked(self) -> list[tuple[dict[str, Site], float]]:
        """Joint assignments of the single holes, best first (a beam of `BEAM`)."""
        beam: list[tuple[dict[str, Site], float]] = [({}, 0.0)]
        for name in self.singles:
            grown = []
            for fill, _ in beam:
                for c in self.domains[name]:
                    new = {**fill, name: c}
                    if self.valid(new):
                        grown.append((new, self.single_score(new)))
            grown.sort(key=lambda item: -item[1])
            beam = grown[:BEAM]
            if not beam:
                raise DiscoveryError(
                    "no assignment of the holes makes every claim an edge of the model: "
                    + ", ".join(f"?{n}" for n in self.singles[: self.singles.index(name) + 1]),
                    code="discover.no-candidate",
                    hint="an edge between two holes needs the sender below the receiver, and distinct "
                    "holes are distinct heads; widen the holes' constraints")
        return beam

    def marginal(self, name: str, fill: dict[str, Site]) -> list[tuple[Site, float]]:
        """Every valid candidate of one single hole, the others as in `fill`, best first, with
        the attribution of the claims that name it."""
        out = []
        for c in self.domains[name]:
            new = {**fill, name: c}
            if self.valid(new):
                out.append((c, self.single_score(new, only=name)))
        out.sort(key=lambda item: -item[1])
        return out

    # -- groups
    def unit(self, g: str) -> str:
        """What group hole `g` holds: "heads", or "features" (SAE latents)."""
        return "features" if self.kinds[g] == "latents" else "heads"

    def group_domain(self, g: str, fill: dict[str, Site]) -> list[Site]:
        used = {s for n, s in fill.items() if n != g}
        return [c for c in self.domains[g] if c not in used
                and all(_edge_ok(self.shape, claim, {**fill, g: c}) for claim in self.claims
                        if g in self._claim_names(claim) and self._claim_names(claim) <= set(fill) | {g})]

    def group_order(self, g: str, fill: dict[str, Site]) -> list[tuple[Site, float]]:
        """The heads (or latents) a group hole may hold, given the single holes' fill, best first."""
        out = []
        for c in self.group_domain(g, fill):
            here = {**fill, g: c}
            total = 0.0
            for claim in self.claims:
                names = self._claim_names(claim)
                if g in names and names <= set(here):
                    total += self._value(claim, here)
            out.append((c, total))
        out.sort(key=lambda item: -item[1])
        return out

    def group_fills(self, fill: dict[str, Site], max_group: int, budget: int, k: int
                    ) -> tuple[list[dict[str, tuple[Site, ...]]], dict]:
        """The fills of the group holes to verify beside the single holes' `fill`, and each
        group's heads by attribution (its order).

        Every choice of heads within the groups' bounds (`max_group` for a group with no
        upper bound) when there are at most `budget` of them; otherwise the groups grown
        together, the best next head first, from their lower bounds to their upper ones,
        and at each step the head just added swapped for each of the next `k`.
        """
        if not self.groups:
            return [{}], {}
        orders = {g: self.group_order(g, fill) for g in self.groups}
        sizes = {}
        for g in self.groups:
            lo, hi = self.bounds[g]
            top = min(hi if hi is not None else max_group, len(orders[g]))
            if lo > len(orders[g]):
                raise DiscoveryError(f"hole ?{g} needs at least {lo} {self.unit(g)}, but only {len(orders[g])} fit "
                                     "beside the other holes", code="discover.no-candidate",
                                     hint="lower its bound" + (" or widen where it may be" if self.unit(g) == "heads"
                                                               else ""))
            sizes[g] = range(lo, max(lo, top) + 1)
        count = math.prod(sum(math.comb(len(orders[g]), n) for n in sizes[g]) for g in self.groups)
        if count <= budget:
            choices = [[c for n in sizes[g] for c in itertools.combinations([h for h, _ in orders[g]], n)]
                       for g in self.groups]
            out = []
            for combo in itertools.product(*choices):
                heads = [h for c in combo for h in c]
                if len(heads) == len(set(heads)):
                    out.append(dict(zip(self.groups, combo)))
            return out, orders
        return self._grown(orders, sizes, k), orders

    def _grown(self, orders, sizes, k: int) -> list[dict[str, tuple[Site, ...]]]:
        current: dict[str, list[Site]] = {g: [] for g in self.groups}
        taken: set[Site] = set()

        def following(g: str) -> list[tuple[Site, float]]:
            return [(c, v) for c, v in orders[g] if c not in taken]

        for g in self.groups:
            while len(current[g]) < sizes[g].start:
                nxt = following(g)
                if not nxt:
                    raise DiscoveryError(f"hole ?{g} needs at least {sizes[g].start} {self.unit(g)}, but only "
                                         f"{len(current[g])} fit beside the other holes",
                                         code="discover.no-candidate", hint="lower its bound")
                current[g].append(nxt[0][0])
                taken.add(nxt[0][0])
        out = [{g: tuple(v) for g, v in current.items()}]
        while True:
            best = None
            for g in self.groups:
                nxt = following(g)
                if len(current[g]) < sizes[g].stop - 1 and nxt and (best is None or nxt[0][1] > best[2]):
                    best = (g, nxt[0][0], nxt[0][1])
            if best is None:
                return out
            g, head, _ = best
            for other, _ in following(g)[1:k + 1]:  # the step with the next heads instead
                out.append({**{x: tuple(v) for x, v in current.items()}, g: tuple(current[g]) + (other,)})
            current[g].append(head)
            taken.add(head)
            out.append({x: tuple(v) for x, v in current.items()})
