"""Variants of a hypothesis, scored together: each statement removed, and random circuits.

Takes a resolved `Hypothesis` and a `Scrubber`; gives what a causal claim needs
beside its own score, computed with many circuits along the batch of each pass
(`Scrubber.scrub_many`), never one scrub loop per variant:

* **the breakdown** (`claim_breakdown`): for each source statement, % recovered with
  that statement's claims removed, and the cost (the full score minus that). Removing
  a statement always makes the hypothesis sparser (`semantics paths`), so a cost near
  zero means the statement adds nothing the rest does not.
* **the null** (`permutation_null`): random circuits of the same size and shape (Shi
  et al. 2024): every head the hypothesis names is mapped to a distinct head, keeping
  positions, features, channels and which edges exist, every neuron (SAE latent) to a
  distinct neuron of the same MLP (latent of the same dictionary), and every subspace
  to a random subspace of the same place and dimension (the usual control for a DAS
  direction); these keep every edge; the hypothesis itself is never one of them.
  When there are no more such circuits than asked for, all of them are scored and
  the p-value is exact.

The checker reports both; the solver uses the same functions to explain a circuit it
found.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import networkx as nx
import numpy as np

from circuitlang import stats, topology
from circuitlang.errors import CircuitlangError
from circuitlang.ir import Hypothesis
from circuitlang.ir_to_graph import ir_to_graph
from circuitlang.sites import Channel, Head, Latent, ModelShape, Neuron, Subspace

__all__ = ["Null", "NullCircuits", "Statement", "claim_breakdown", "null_circuits", "permutation_null",
           "random_circuits", "statements"]

#: Enumerate every random circuit when the injective head maps number at most this many.
ENUMERATE_UP_TO = 50_000


@dataclass(frozen=True, slots=True)
class Statement:
    """One source statement and the indices (into `Hypothesis.claims`) of its claims."""

    text: str
    line: int | None
    claims: tuple[int, ...]


def statements(hypothesis: Hypothesis) -> list[Statement]:
    """The hypothesis's claims grouped by the statement they came from, in source order."""
    groups: dict = {}
    for i, claim in enumerate(hypothesis.claims):
        span = getattr(claim, "span", None)
        key = (claim.text or str(claim), span.line if span else None)
        groups.setdefault(key, []).append(i)
    return [Statement(text, line, tuple(idx)) for (text, line), idx in groups.items()]


def without(hypothesis: Hypothesis, statement: Statement) -> Hypothesis:
    """The hypothesis with one statement's claims removed."""
    drop = set(statement.claims)
    return dataclasses.replace(hypothesis, claims=tuple(c for i, c in enumerate(hypothesis.claims)
                                                        if i not in drop))


def claim_breakdown(hypothesis: Hypothesis, scrubber, clean: np.ndarray, random: np.ndarray,
                    full_score: float, seed: int, progress=None) -> list:
    """For each source statement: % recovered without it, and what it costs.

    Returns [] for a hypothesis of one statement (removing it is the empty hypothesis,
    whose score is 0 by definition).
    """
    from circuitlang.report import ClaimResult

    found = statements(hypothesis)
    if len(found) < 2:
        return []
    graphs = [ir_to_graph(without(hypothesis, st)) for st in found]
    results = scrubber.scrub_many(graphs, seed=seed, progress=progress)
    out = []
    for st, res in zip(found, results):
        score = stats.recovered(clean, res.scrubbed, random)
        out.append(ClaimResult(st.text, st.line, score, full_score - score))
    return out


@dataclass(frozen=True, slots=True)
class RandomCircuits:
    """Random circuits of a hypothesis's size and shape.

    Attributes:
        hypotheses: the circuits drawn (the hypothesis itself is never among them).
        total: how many distinct such circuits exist (None: too many to count).
        exact: True when `hypotheses` is every one of them.
    """

    hypotheses: list[Hypothesis]
    total: int | None
    exact: bool
    head_by_head: bool = False  # some were drawn slot by slot among the heads that keep every edge


@dataclass(frozen=True, slots=True)
class Null:
    """Scores of random circuits and the permutation test's p-value.

    Attributes:
        scores: % recovered of each random circuit.
        p_value: `(1 + #{null >= observed}) / (1 + len(scores))`.
        total: how many distinct random circuits exist (None: too many to count).
        exact: True when every one of them was scored (the p-value is then exact).
    """

    scores: np.ndarray
    p_value: float
    total: int | None
    exact: bool
    head_by_head: bool = False  # some circuits were drawn head by head (`random_circuits`)


_ENDS = ("site", "sender", "receiver")  # where a claim names sites


def _named(hypothesis: Hypothesis):
    """Every site the claims name, in order (with repeats)."""
    for claim in hypothesis.claims:
        for attr in _ENDS:
            site = getattr(claim, attr, None)
            if site is not None:
                yield site


def _rewrite(hypothesis: Hypothesis, fix) -> Hypothesis:
    """The hypothesis with every site its claims name replaced by `fix(site)`."""
    claims = [dataclasses.replace(c, **{a: fix(getattr(c, a)) for a in _ENDS if hasattr(c, a)})
              for c in hypothesis.claims]
    return dataclasses.replace(hypothesis, claims=tuple(claims))


def _heads(hypothesis: Hypothesis) -> list[tuple[int, int]]:
    return list(dict.fromkeys((s.layer, s.head) for s in _named(hypothesis) if isinstance(s, Head)))


def _remap(hypothesis: Hypothesis, mapping: dict) -> Hypothesis:
    def fix(site):
        if isinstance(site, Head) and (site.layer, site.head) in mapping:
            layer, head = mapping[(site.layer, site.head)]
            return Head(layer, head, site.channel)
        return site

    return _rewrite(hypothesis, fix)


class _Template:
    """A hypothesis with its heads as slots: fast to remap, check and compare by key."""

    def __init__(self, hypothesis: Hypothesis, heads: list[tuple[int, int]]):
        self.hypothesis = hypothesis
        slot = {h: i for i, h in enumerate(heads)}
        self.parts = []  # per claim: (kind, site-or-slot per attribute, position, features)
        for claim in hypothesis.claims:
            ends = []
            for attr in _ENDS:
                site = getattr(claim, attr, None)
                if isinstance(site, Head) and (site.layer, site.head) in slot:
                    ends.append((slot[(site.layer, site.head)], site.channel))
                else:
                    ends.append(site)
            self.parts.append((type(claim).__name__, tuple(ends), claim.position,
                               getattr(claim, "features", None)))
        self.edges = [ends[1:] for kind, ends, _, _ in self.parts if kind == "EdgeClaim"]
        self._slots = [tuple(e[0] if isinstance(e, tuple) else None for e in edge) for edge in self.edges]
        kinds: dict = {}  # an end as the edge check sees it, less its pick: a slot's channel, or a fixed site
        self._kinds = [tuple(kinds.setdefault(e[1:] if isinstance(e, tuple) else e, len(kinds)) for e in edge)
                       for edge in self.edges]

    @staticmethod
    def _site(end, pool, picks):
        if isinstance(end, tuple):
            layer, head = pool[picks[end[0]]]
            return Head(layer, head, end[1])
        return end

    def _exists(self, pool, shape: ModelShape) -> dict:
        """Which edges exist, by their ends' kinds and picks (`_edge_ok`), for this pool and
        shape: filled as edges are asked for (ints hash fast)."""
        tables = self.__dict__.setdefault("_tables", {})
        key = (id(pool), shape)
        if key not in tables:
            tables[key] = (pool, {})  # (the pool kept alive, so that its id stays its own)
        return tables[key][1]

    def _edge_ok(self, j: int, s_pick: int, r_pick: int, pool, shape: ModelShape, known: dict) -> bool:
        """Whether edge `j` exists with its slot ends given the pool heads `s_pick`, `r_pick`
        (-1 for a fixed end)."""
        key = (self._kinds[j], s_pick, r_pick)
        ok = known.get(key)
        if ok is None:
            sender, receiver = self.edges[j]
            r = receiver if r_pick < 0 else Head(*pool[r_pick], receiver[1])
            if isinstance(r, Head) and not r.channel.is_input:
                r = r.with_channel(Channel.Q)
            s = sender if s_pick < 0 else Head(*pool[s_pick], sender[1])
            ok = known[key] = topology.edge_exists(shape, s, r)
        return ok

    def valid(self, pool, picks, shape: ModelShape) -> bool:
        known = self._exists(pool, shape)
        return all(self._edge_ok(j, -1 if s is None else picks[s], -1 if r is None else picks[r], pool, shape, known)
                   for j, (s, r) in enumerate(self._slots))

    def allows(self, pool, picks, slot: int, candidate: int, shape: ModelShape, known: dict | None = None) -> bool:
        """Whether giving `slot` the pool head `candidate` keeps every edge that joins it to
        a fixed site or to a slot already given (`picks[i]` None: not given yet)."""
        known = self._exists(pool, shape) if known is None else known
        for j, s, r in self._edges_of(slot):
            s_pick = -1 if s is None else candidate if s == slot else picks[s]
            r_pick = -1 if r is None else candidate if r == slot else picks[r]
            if s_pick is None or r_pick is None:
                continue
            if not self._edge_ok(j, s_pick, r_pick, pool, shape, known):
                return False
        return True

    def _edges_of(self, slot: int) -> list:
        """The edges with an end at `slot`: (edge index, sender's slot, receiver's slot), None
        for a fixed end."""
        if getattr(self, "_by_slot", None) is None:
            self._by_slot = {}
            for j, ends in enumerate(self._slots):
                for end in {e for e in ends if e is not None}:
                    self._by_slot.setdefault(end, []).append((j, *ends))
        return self._by_slot.get(slot, [])

    def _plan(self, n_slots: int) -> tuple[list[int], dict[int, list[int]]]:
        """Slots senders first, and for each slot `need[d]`: how many slots it reaches by a
        chain of at least d edges, each needing a free head at least d layers above it (a
        head reads earlier layers). Computed once per template."""
        if getattr(self, "_plan_cache", None) is None:
            graph = nx.DiGraph()
            graph.add_nodes_from(range(n_slots))
            graph.add_edges_from((s[0], r[0]) for s, r in self.edges
                                 if isinstance(s, tuple) and isinstance(r, tuple) and s[0] != r[0])
            try:
                order = list(nx.lexicographical_topological_sort(graph))
            except nx.NetworkXUnfeasible:  # a cycle: no valid circuit, `allows` refuses it
                order = list(range(n_slots))
            chain: dict[int, dict[int, int]] = {}  # slot -> slot it reaches -> longest chain
            for slot in reversed(order):
                chain[slot] = {}
                for r in graph.successors(slot):
                    for t, d in [(r, 0), *chain[r].items()]:
                        chain[slot][t] = max(chain[slot].get(t, 0), d + 1)
            longest = max((d for c in chain.values() for d in c.values()), default=0)
            need = {slot: [sum(1 for d in chain[slot].values() if d >= k) for k in range(longest + 1)]
                    for slot in order}
            self._plan_cache = (order, need)
        return self._plan_cache

    def draw(self, pool, n_slots: int, shape: ModelShape, rng) -> tuple[int, ...] | None:
        """One map drawn slot by slot, senders first, each slot uniform among the unused heads
        that keep its edges to the slots before it and leave enough free heads above it for
        the slots it feeds; None when some slot has no such head."""
        order, need = self._plan(n_slots)
        picks: list[int | None] = [None] * n_slots
        used: set[int] = set()
        for slot in order:
            free = [0] * (shape.n_layers + 1)  # free[l]: unused heads in layers >= l
            for i, (layer, _) in enumerate(pool):
                if i not in used:
                    free[layer] += 1
            for layer in range(shape.n_layers - 1, -1, -1):
                free[layer] += free[layer + 1]
            room = [all(need[slot][k] <= free[min(layer + k, shape.n_layers)] for k in range(1, len(need[slot])))
                    for layer in range(shape.n_layers)]
            known = self._exists(pool, shape)
            options = [i for i in range(len(pool)) if i not in used and room[pool[i][0]]
                       and self.allows(pool, picks, slot, i, shape, known)]
            if not options:
                return None
            picks[slot] = int(options[int(rng.integers(len(options)))])
            used.add(picks[slot])
        return tuple(picks)

    def key(self, pool, picks) -> frozenset:
        """What makes two circuits the same circuit: their set of claims."""
        return frozenset((kind, tuple(self._site(e, pool, picks) for e in ends), position, features)
                         for kind, ends, position, features in self.parts)

    def build(self, heads, pool, picks) -> Hypothesis:
        return _remap(self.hypothesis, {old: pool[i] for old, i in zip(heads, picks)})


def _units(hypothesis: Hypothesis) -> dict:
    """The neurons and latents the hypothesis names, by the pool each is drawn from:
    ("neuron", layer) or ("latent", dictionary) -> the units, in order of appearance."""
    found: dict = {}
    for site in _named(hypothesis):
        if isinstance(site, Neuron):
            found.setdefault(("neuron", site.layer), {}).setdefault(site, None)
        elif isinstance(site, Latent):
            found.setdefault(("latent", site.sae), {}).setdefault(site, None)
    return {pool: list(units) for pool, units in found.items()}


def _pool_size(pool, shape: ModelShape) -> int:
    kind, where = pool
    return shape.d_mlp if kind == "neuron" else where.d_sae


def _remap_units(hypothesis: Hypothesis, mapping: dict) -> Hypothesis:
    return _rewrite(hypothesis, lambda site: mapping.get(site, site))


def _claims_key(hypothesis: Hypothesis) -> frozenset:
    return frozenset((type(c).__name__, getattr(c, "site", None), getattr(c, "sender", None),
                      getattr(c, "receiver", None), c.position, getattr(c, "features", None))
                     for c in hypothesis.claims)


def _with_random_units(hypothesis: Hypothesis, circuits: RandomCircuits, units: dict, shape: ModelShape,
                       k: int, rng) -> RandomCircuits:
    """Circuits whose neurons and latents are drawn too: each maps the units of one pool
    (an MLP's neurons, a dictionary's latents) to distinct units of that pool, on top of a
    head map (the head circuits in turn, or the hypothesis's own heads)."""
    sizes = {pool: _pool_size(pool, shape) for pool in units}
    if any(sizes[pool] < len(found) for pool, found in units.items()):
        return RandomCircuits([], 0, True)
    maps = math.prod(math.perm(sizes[pool], len(found)) for pool, found in units.items())
    bases = [hypothesis] + list(circuits.hypotheses)
    total = None if circuits.total is None else maps * (circuits.total + 1) - 1
    own = _claims_key(hypothesis)
    if total is not None and total <= min(k, ENUMERATE_UP_TO):  # every one there is
        out = []
        for base in bases:
            for picks in itertools.product(*(itertools.permutations(range(sizes[pool]), len(found))
                                             for pool, found in units.items())):
                mapping = {u: _unit(u, i) for (pool, found), pick in zip(units.items(), picks)
                           for u, i in zip(found, pick)}
                h = _remap_units(base, mapping)
                if _claims_key(h) != own:
                    out.append(h)
        return RandomCircuits(out, len(out), True, circuits.head_by_head)
    drawn: dict = {}
    tries = 0
    while len(drawn) < k and tries < 50 * k:
        tries += 1
        base = bases[int(rng.integers(len(bases)))]
        mapping = {}
        for pool, found in units.items():
            pick = rng.choice(sizes[pool], size=len(found), replace=False)
            mapping.update({u: _unit(u, int(i)) for u, i in zip(found, pick)})
        h = _remap_units(base, mapping)
        key = _claims_key(h)
        if key != own and key not in drawn:
            drawn[key] = h
    return RandomCircuits(list(drawn.values()), total, False, circuits.head_by_head)


def _unit(unit, index: int):
    return Neuron(unit.layer, index) if isinstance(unit, Neuron) else Latent(unit.sae, index)


def random_circuits(hypothesis: Hypothesis, shape: ModelShape, k: int, seed: int) -> RandomCircuits:
    """Up to `k` distinct random circuits of the hypothesis's size and shape.

    Each maps every head the hypothesis names to a distinct head of the model, keeping
    positions, features and channels, and keeping only circuits whose edges exist; and
    every neuron or latent to a distinct unit of its MLP or dictionary (any such map
    keeps every edge). When the maps are few enough to enumerate, all valid circuits are
    listed and, if there are at most `k`, returned (`exact`); otherwise `k` are drawn
    without replacement.
    """
    units = _units(hypothesis)
    circuits = _random_head_circuits(hypothesis, shape, k, seed)
    if units:
        circuits = _with_random_units(hypothesis, circuits, units, shape, k, np.random.default_rng(seed + 2))
    if _subspaces(hypothesis):
        circuits = _with_random_subspaces(hypothesis, circuits, k, np.random.default_rng(seed + 3))
    return circuits


def _subspaces(hypothesis: Hypothesis) -> list:
    # (a basis of unknown dimension, k = 0, stays as it is: the resolver gives every basis its k,
    # a file's width or an `align`'s dims, so the subspaces `align` learns are drawn too)
    return list(dict.fromkeys(s for s in _named(hypothesis) if isinstance(s, Subspace) and s.basis.k > 0))


def _with_random_subspaces(hypothesis: Hypothesis, circuits: RandomCircuits, k: int, rng) -> RandomCircuits:
    """Circuits whose subspaces are random ones of the same place and dimension (on top of
    the head and unit maps, taken in turn): there are infinitely many, so `k` are drawn."""
    bases = [hypothesis] + list(circuits.hypotheses)
    out = []
    for i in range(k):
        mapping = {s: Subspace(dataclasses.replace(s.basis, seed=int(rng.integers(2**31)))) for s in
                   _subspaces(hypothesis)}
        out.append(_remap_units(bases[i % len(bases)], mapping))
    return RandomCircuits(out, None, False, circuits.head_by_head)


def _random_head_circuits(hypothesis: Hypothesis, shape: ModelShape, k: int, seed: int) -> RandomCircuits:
    """`random_circuits` over the heads alone (every other site stays)."""
    heads = _heads(hypothesis)
    pool = [(layer, h) for layer in range(shape.n_layers) for h in range(shape.n_heads)]
    rng = np.random.default_rng(seed + 1)
    if not heads or len(heads) > len(pool):
        return RandomCircuits([], 0, True)
    template = _Template(hypothesis, heads)
    own = template.key(pool, [pool.index(h) for h in heads])
    if math.perm(len(pool), len(heads)) <= ENUMERATE_UP_TO:
        found: dict[frozenset, tuple[int, ...]] = {}
        for picks in itertools.permutations(range(len(pool)), len(heads)):
            if not template.valid(pool, picks, shape):
                continue
            key = template.key(pool, picks)
            if key != own:
                found.setdefault(key, picks)
        every = list(found.values())
        if len(every) <= k:
            return RandomCircuits([template.build(heads, pool, p) for p in every], len(every), True)
        chosen = sorted(rng.choice(len(every), size=k, replace=False))
        return RandomCircuits([template.build(heads, pool, every[i]) for i in chosen], len(every), False)
    # Uniform draws, kept when every edge exists. A large circuit (IOI's 28 heads and their
    # edges) almost never draws a map that keeps layer order, so once uniform draws stall
    # the rest are drawn head by head among the heads that keep each edge (not exactly
    # uniform over valid maps; the report says so).
    drawn: dict[frozenset, tuple[int, ...]] = {}
    tries, head_by_head = 0, False
    while len(drawn) < k and tries < 50 * k:
        tries += 1
        if tries <= 10 * k:
            picks = tuple(int(i) for i in rng.choice(len(pool), size=len(heads), replace=False))
            if not template.valid(pool, picks, shape):
                continue
        else:
            picks = template.draw(pool, len(heads), shape, rng)
            if picks is None or not template.valid(pool, picks, shape):
                continue
        key = template.key(pool, picks)
        if key != own and key not in drawn:
            drawn[key] = picks
            head_by_head = head_by_head or tries > 10 * k
    return RandomCircuits([template.build(heads, pool, p) for p in drawn.values()], None, False, head_by_head)


@dataclass(frozen=True, slots=True)
class NullCircuits:
    """The permutation test's random circuits (`random_circuits`), drawn and lowered.

    Drawn before the hypothesis's own scrub, their graphs can go to it as `later`
    (`Scrubber.scrub_many`), so that one capture pass serves both."""

    circuits: RandomCircuits
    graphs: list


def null_circuits(hypothesis: Hypothesis, shape: ModelShape, k: int, seed: int) -> NullCircuits:
    """`random_circuits` and their intervention graphs."""
    circuits = random_circuits(hypothesis, shape, k, seed)
    graphs = []
    for h in circuits.hypotheses:
        try:
            graphs.append(ir_to_graph(h))
        except CircuitlangError:  # pragma: no cover - `_valid` already kept edges forward
            continue
    return NullCircuits(circuits, graphs)


def permutation_null(hypothesis: Hypothesis, scrubber, clean: np.ndarray, random: np.ndarray,
                     shape: ModelShape, k: int, seed: int, observed: float, progress=None,
                     drawn: NullCircuits | None = None) -> Null:
    """Score random circuits of the same size (`random_circuits`; `drawn`: those
    `null_circuits` drew with the same arguments) and test `observed`."""
    drawn = drawn if drawn is not None else null_circuits(hypothesis, shape, k, seed)
    circuits, graphs = drawn.circuits, drawn.graphs
    results = scrubber.scrub_many(graphs, seed=seed, progress=progress) if graphs else []
    scores = np.array([stats.recovered(clean, r.scrubbed, random) for r in results])
    return Null(scores, stats.permutation_p_value(observed, scores), circuits.total, circuits.exact,
                circuits.head_by_head)
