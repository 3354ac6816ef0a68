"""ACDC (Conmy et al. 2023, "Towards Automated Circuit Discovery for Mechanistic
Interpretability"): edge pruning in reverse topological order with a threshold tau.

Takes a `Problem` (edge space, ablated values, metric) and tau; gives the circuit (a
BoolTensor over the edge space, True = kept) and every decision (`Decisions`).

**The algorithm**, ACDC's own as auto-circuit 1.0.1 implements it
(`auto_circuit/prune_algos/ACDC.py`). The edges are tried one at a time in an order
e_1 ... e_M (below); S is the set removed so far (ablated), p the faith of the last
accepted state, starting at p = 0.0 (the faith of the full model)::

    for e in e_1 ... e_M:
        f = faith(S + {e})
        if f - p < tau:  S = S + {e}; p = f       # removing e costs less than tau
        else:            keep e                   # p unchanged

**faith(C)**, the performance a circuit C loses, meaned over the prompts. With the
`kl` metric (ACDC's default) it is KL(full model || C) of the next-token distributions
at END (auto-circuit: `multibatch_kl_div` at the last token). With a task metric m of
direction d (+1 when higher is better, -1 for losses) it is d (m(full) - m(C)) per
prompt: 0 for the full model, positive when C does worse. (KL is that formula too:
KL(full || full) = 0.) In a space of edges at named positions (`positions=("END",)`)
every edge elsewhere is always ablated, so the search starts from the circuit of every
candidate, not from the full model: p starts at that circuit's faith, measured.

**The order.** `order=` gives it (edge indices, or (sender, receiver[, position]) sites;
every edge once): the agreement tests pass auto-circuit's, which sorts its edges by the
receiver's layer, latest first, and leaves the order within a layer to a Python set's
iteration. The default (`default_order`) is deterministic: receivers in reverse
computation order (`topology.receivers` reversed: the logits, then for the last layer
down to the first its MLP and its heads' v, k and q inputs, last head first), and within
a receiver its senders latest first, one position slot after another (`positions`
order). Every outgoing edge of a node is then tried before its incoming ones.

**The batched search** makes the same decisions with fewer forward passes. At position
i of the order, in state (S, p), the next k undecided edges give k circuits, the
cumulative removals C_j = S + {e_i, ..., e_j}, scored together along the batch (rows
are (circuit, prompt) pairs). Then, for j = i, i+1, ...: the step is
f(C_j) - f(C_{j-1}), with f(C_{i-1}) = p. While steps are < tau the edges are removed,
and each is exactly the sequential decision: the sequential run reaches e_j with
e_i ... e_{j-1} removed, so in state C_{j-1} with p = f(C_{j-1}) (the faith it accepted
last), computes f(C_j) and compares `f - p < tau`: the same two numbers, subtracted and
compared the same way (a step equal to tau keeps the edge). The first e_j with a step
>= tau is kept; the rows after it assumed its removal, so they are dropped, and the
search goes on after e_j from state C_{j-1} and p = f(C_{j-1}). A pass is thus wasted
only past a kept edge: passes grow with the edges kept, plus the edges tried / k.

**Edges that cannot matter** are decided without a pass. A node (a head or an MLP) is
dead when no kept edge carries its output to a live receiver (the logits are live): its
output reaches the logits by no path (an ablated edge replaces the sender's current
output by its ablated one exactly), so removing an edge into it changes no output, its
step is exactly 0, and for tau > 0 it is removed (for tau = 0, `0 < 0` fails: kept).
Removals only shrink the set of live nodes, so an edge found dead now is dead when its
turn comes. In the default order all of a node's outgoing edges are decided before its
incoming ones, so a dead node's inputs all go without a pass.

**Floating point.** faith is the float64 mean over prompts of per-prompt metrics the
model computes in its dtype. A circuit scored among other rows may differ from the same
circuit scored alone in the last bits (the engine groups identical mask rows per batch;
GEMM blocking depends on the batch). So the batched search and a one-pass-per-edge loop
make the same decision for every edge whose step is farther from tau than that rounding
(about 1e-6 of the faith's scale); tests/discover/test_acdc.py checks equality on random
models, orders and taus with no step that close. The dead-node rule uses the exact
step, 0, where a loop computes a rounding-level number: the same caveat, at tau ~ 0.

**Layers below the receiver are not recomputed.** In reverse topological order every
edge removed so far enters a receiver at or above the current receiver's layer L, so the
blocks below L compute exactly the clean model (every edge into them is kept). Each
chunk of prompts gets one clean forward pass (`LoadedModel.clean_pass`: every block's
output and every sender's), and a pass whose masks ablate nothing below L resumes it at
L (`run(..., resume=(clean, L))`): only the blocks from L up run, the deltas of the
senders below L are read from the clean pass. Any order works (L is the lowest layer
whose receivers any circuit of the pass changes); orders that go down the layers
benefit. Kept while the chunk's ablated values and clean pass fit in 1 GiB.

**Nodes a pass does not change are not recomputed either.** The circuits of a pass
differ from the state ACDC goes on from in the edges into one receiver, so above L only
that receiver's node and the nodes its kept edges reach (and theirs) can change. Each
pass is given an `EdgeReference`: the last circuit accepted (at first the full model,
its clean pass) and what every node gave there; the run engine takes from it every head
and MLP whose inputs are as there (`edge_reference.reused_nodes`) and computes the rest
(`accept` makes the circuit of the last accepted removal the next reference; its nodes
below L are the clean pass's). On the 4-layer benchmark model about 70% of the heads and
a third of the MLPs above L are taken from the reference. One chunk of prompts only (a
pass over several chunks overwrites the buffer its deltas are read from), edges over
all positions, while the chunk's values fit in 1 GiB (as for resuming), and the same
float caveat as above (a node computed in another batch shape differs in the last bits).

**Checkpoints.** With a run directory, after every pass that finishes the edges of a
receiver, `acdc.pt` (tau, the order, the decisions so far and p) is written atomically,
then `acdc.json` (tau, metric, counts: for people); a resumed run loads `acdc.pt`,
checks tau, the order and the metric, and goes on after the last decision without
scoring any decided edge again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from circuitlang.discover import Found, register_method
from circuitlang.discover.problem import Problem
from circuitlang.errors import DiscoveryError
from circuitlang.models import EdgePatch, EdgeReference
from circuitlang.models.interventions import sender_key
from circuitlang.sites import Channel, Head, Logits, Mlp

__all__ = ["AcdcProgress", "Decisions", "acdc", "default_order", "faith_of"]

#: ablated values of every prompt are kept between passes when they fit in this many bytes
_KEEP_ABLATED_BYTES = 1 << 30


@dataclass(frozen=True)
class Decisions:
    """Every decision of an ACDC run, in the order tried.

    Attributes:
        order: LongTensor [M]: edge indices in the order tried.
        kept: BoolTensor [M]: True where the edge stayed in the circuit.
        faith: float64 [M]: faith(S + {e}) at the trial (NaN where not scored).
        step: float64 [M]: that minus the faith of the last accepted state (0 where the
            dead-node rule decided).
        scored: BoolTensor [M]: False where the dead-node rule decided without a pass.
        tau: the threshold.
        metric: what faith measures (`kl` or a task metric).
        passes: forward passes the search ran (this call, resumed work excluded).
        resumed: decisions loaded from a checkpoint.
    """

    order: torch.Tensor
    kept: torch.Tensor
    faith: torch.Tensor
    step: torch.Tensor
    scored: torch.Tensor
    tau: float
    metric: str
    passes: int = 0
    resumed: int = 0

    def circuit(self, n_edges: int) -> torch.Tensor:
        """The kept edges as a BoolTensor [n_edges] over the edge space."""
        out = torch.zeros(n_edges, dtype=torch.bool)
        out[self.order[self.kept]] = True
        return out

    def to_json(self) -> dict:
        return {"tau": self.tau, "metric": self.metric, "tried": len(self.order),
                "kept": int(self.kept.sum()), "scored": int(self.scored.sum()), "passes": self.passes,
                "resumed": self.resumed}


@dataclass(frozen=True)
class AcdcProgress:
    """What a progress callback gets after each receiver whose edges are all decided."""

    receiver: object
    receivers_done: int
    receivers_total: int
    edges_done: int
    edges_total: int
    kept: int
    passes: int


# ---- the order ----------------------------------------------------------------------
def default_order(space) -> torch.Tensor:
    """The default order (module docstring): receivers in reverse computation order, then
    position slots in order, then senders latest first. LongTensor [E] of edge indices."""
    n_pairs = len(space.pairs)
    r, s = space.pairs[:, 0], space.pairs[:, 1]
    slots = torch.arange(len(space.positions)).repeat_interleave(n_pairs)
    r_all, s_all = r.repeat(len(space.positions)), s.repeat(len(space.positions))
    # lexicographic sort: receiver descending, slot ascending, sender descending
    big = len(space.positions) * (len(space.edge_set.senders) + 1)
    key = -r_all * big + slots * (len(space.edge_set.senders) + 1) - s_all
    return torch.argsort(key, stable=True)


def _order(space, order) -> torch.Tensor:
    n = len(space)
    if order is None:
        return default_order(space)
    out = []
    for item in order:
        if isinstance(item, (tuple, list)):
            out.append(space.index(*item))
        else:
            out.append(int(item))
    tensor = torch.tensor(out, dtype=torch.long)
    if len(out) != n or len(set(out)) != n or (n and (min(out) < 0 or max(out) >= n)):
        raise DiscoveryError(f"an ACDC order must list each of the {n} candidate edges once "
                             f"(got {len(out)} entries, {len(set(out))} distinct)", code="discover.acdc-order",
                             hint="give edge indices 0..E-1 or (sender, receiver[, position]) sites, each once")
    return tensor


# ---- faith along the batch ------------------------------------------------------------
class _Faith:
    """faith of many circuits, scored along the batch in passes of at most `rows` rows."""

    def __init__(self, problem: Problem, rows: int):
        self.problem = problem
        n = problem.n
        per = max(1, min(n, rows))
        self.chunks = [torch.arange(s, min(n, s + per)) for s in range(0, n, per)]
        self.per_pass = max(1, rows // per)  # circuits per pass (of one chunk of prompts)
        self.kl = problem.metric == "kl"
        self.direction = problem.direction
        self._ablated: dict = {}  # chunk -> its ablated values; (chunk, k) -> them tiled k times
        self._keep = None
        self._clean: dict = {}  # chunk -> its clean pass; (chunk, k) -> it tiled k times
        #: an `EdgeReference` of the one chunk: a circuit scored before and what each node
        #: gave there, so that a pass computes only the nodes its circuits change (`accept`)
        self.reference = None
        self._full = None  # the full model as a reference: the clean pass's deltas
        # (run, masks, k, first circuit, resume layer) of the last pass: its deltas are views of
        # the reused buffer, valid until the next pass (held so that `accept` can copy them out)
        self._last = None
        self.reuse = len(self.chunks) == 1 and not problem.space.per_position
        shape = problem.model.shape
        self.layer = torch.tensor([shape.n_layers if isinstance(r, Logits) else r.layer
                                   for r in problem.space.edge_set.receivers])
        self.base = None if self.kl else self.metric(torch.ones(1, len(problem.space), dtype=torch.bool))[0]

    def _ablated_for(self, ci: int, index: torch.Tensor) -> torch.Tensor:
        if ci in self._ablated:
            return self._ablated[ci]
        values = self.problem.ablated(index)
        if self._keep is None:
            # the ablated values and a clean pass (senders' outputs and blocks' streams),
            # each once per chunk and tiled once for a full pass
            shape = self.problem.model.shape
            per_row = values[0].numel() * (1 + (shape.n_layers + 1) / max(1, values.shape[1]))
            size = values.element_size() * per_row * self.problem.n
            self._keep = size * (1 + self.per_pass) <= _KEEP_ABLATED_BYTES
        if self._keep:
            self._ablated[ci] = values
        return values

    def _tiled(self, ci: int, ablated: torch.Tensor, k: int) -> torch.Tensor:
        """The chunk's ablated values once per circuit of a pass (kept for full passes)."""
        if ablated.shape[0] == 1 or k == 1:
            return ablated
        key = (ci, k)
        if key in self._ablated:
            return self._ablated[key]
        tiled = ablated.repeat(k, 1, 1, 1)
        if self._keep and k == self.per_pass:
            self._ablated[key] = tiled
        return tiled

    def _resume(self, ci: int, index: torch.Tensor, masks: torch.Tensor, k: int):
        """`(clean pass, start)` for a pass whose masks ablate nothing below layer `start`
        (receivers in reverse topological order: the current receiver's layer), or None.
        The clean pass of a chunk is one forward pass, kept while the chunk's values fit."""
        changed = (masks != 0).reshape(-1, *masks.shape[-2:]).any(0).any(-1)  # [R]
        start = int(self.layer[changed].min()) if bool(changed.any()) else int(self.layer.max())
        if start == 0 or not self._keep:
            return None
        clean = self._clean_of(ci, index)
        if k > 1:
            key = (ci, k)
            if key not in self._clean:
                tiled = clean.rows(torch.arange(len(index)).repeat(k))
                if k != self.per_pass:
                    return tiled, start
                self._clean[key] = tiled
            clean = self._clean[key]
        return clean, start

    def metric(self, kept: torch.Tensor) -> np.ndarray:
        """The problem's metric per circuit and prompt [K, N] (float64)."""
        p = self.problem
        es = p.space.edge_set
        k = kept.shape[0]
        out = np.zeros((k, p.n))
        for ci, index in enumerate(self.chunks):
            ablated = self._ablated_for(ci, index)
            for c0 in range(0, k, self.per_pass):
                cs = torch.arange(c0, min(k, c0 + self.per_pass))
                rows = index.repeat(len(cs))
                circuit = cs.repeat_interleave(len(index))
                if len(cs) == 1 and not p.space.per_position:  # one mask for the batch: one GEMM
                    masks = p.space.masks(kept[cs], p.prompts)
                else:
                    masks = p.space.masks(kept[circuit], p.prompts, rows)
                abl = self._tiled(ci, ablated, len(cs))
                reference = self._reference(ci, index, ablated) if self.reuse and self._keep else None
                with torch.no_grad():
                    resume = self._resume(ci, index, masks, len(cs))
                    logits, run = p.forward_run(rows, edges=EdgePatch.from_set(es, abl, masks, reference),
                                                resume=resume)
                    out[circuit.numpy(), rows.numpy()] = p.metric_of(logits, rows).double().cpu().numpy()
                self._last = (run, masks, len(cs), c0, resume[1] if resume else 0) if reference is not None else None
        return out

    def _clean_of(self, ci: int, index: torch.Tensor):
        """The chunk's clean pass (one forward pass, kept)."""
        if ci not in self._clean:
            p = self.problem
            self._clean[ci] = p.model.clean_pass(p.prompts.input_ids[index], p.prompts.attention_mask[index],
                                                 senders=p.space.edge_set.senders)
            p.passes += 1
        return self._clean[ci]

    def _reference(self, ci: int, index: torch.Tensor, ablated: torch.Tensor):
        """The reference for the chunk's next pass: the last accepted circuit (`accept`),
        at first the full model (its clean pass)."""
        if self.reference is None:
            clean, es = self._clean_of(ci, index), self.problem.space.edge_set
            deltas = {s: clean.senders[s] - ablated[:, i] for i, s in enumerate(es.senders)}
            self._full = self.reference = EdgeReference(torch.zeros(len(es.receivers), len(es.senders)), deltas)
        return self.reference

    def accept(self, j: int) -> None:
        """Circuit `j` of the last call becomes the reference, while its pass's deltas are
        still in the buffer (the last pass held it): later passes compute only the nodes
        their circuits change from it. (Any circuit scored before is a valid reference:
        the state ACDC goes on from may differ from it by edges into dead nodes.)"""
        if self._last is None:
            return
        run, masks, k, c0, start = self._last
        if not c0 <= j < c0 + k or not run.deltas:
            return
        n, c = self.problem.n, j - c0
        below = {s: self._full.deltas[s] for s in run.deltas if sender_key(s)[0] < start}  # the clean pass's
        self.reference = EdgeReference.from_run(run, masks[0] if masks.shape[0] == 1 else masks[c * n],
                                                slice(c * n, (c + 1) * n), previous=self.reference, known=below)

    def __call__(self, kept: torch.Tensor) -> np.ndarray:
        """faith of each circuit [K] (float64)."""
        return faith_of(self.metric(kept), self.base, self.direction)


def faith_of(values: np.ndarray, base: np.ndarray | None, direction: int) -> np.ndarray:
    """faith from per-prompt metric values [K, N]: their mean for `kl` (`base` None),
    else the mean of `direction * (base - values)` with `base` the full model's [N]."""
    if base is None:
        return values.mean(axis=1)
    return (direction * (base[None, :] - values)).mean(axis=1)


# ---- which receivers can still matter ----------------------------------------------
class _Liveness:
    """Which receivers are live: some path of kept edges leads from their node to the
    logits (see the module docstring)."""

    def __init__(self, space, shape):
        es = space.edge_set
        senders = list(es.senders)
        node = {site: i for i, site in enumerate(senders)}
        n_nodes = len(senders) + 1  # + the logits
        self.logits = len(senders)
        feeds = torch.zeros(len(es.receivers), n_nodes, dtype=torch.bool)
        group = shape.kv_group if shape is not None else 1
        for r, site in enumerate(es.receivers):
            if isinstance(site, Logits):
                feeds[r, self.logits] = True
            elif isinstance(site, Mlp):
                feeds[r, node[Mlp(site.layer)]] = True
            elif isinstance(site, Head):
                heads = [site.head]
                if site.channel in (Channel.K, Channel.V) and group > 1:
                    first = site.head - site.head % group
                    heads = range(first, first + group)
                for h in heads:
                    feeds[r, node[Head(site.layer, h)]] = True
        self.feeds = feeds
        n_pairs = len(space.pairs)
        reps = len(space.positions)
        self.receiver = space.pairs[:, 0].repeat(reps)  # per edge index
        self.sender = space.pairs[:, 1].repeat(reps)
        self.n_nodes = n_nodes
        self.n_pairs = n_pairs

    def receivers_live(self, present: torch.Tensor) -> torch.Tensor:
        """BoolTensor [R]: live receivers when the edges `present` [E] are not removed."""
        live = torch.zeros(self.n_nodes, dtype=torch.bool)
        live[self.logits] = True
        while True:
            r_live = (self.feeds & live).any(1)
            carries = present & r_live[self.receiver]
            new = torch.zeros_like(live)
            new[self.sender[carries]] = True
            new[self.logits] = True
            if torch.equal(new, live):
                return r_live
            live = new


# ---- the search ---------------------------------------------------------------------
def _default_rows(problem: Problem) -> int:
    """Rows per pass when not given: the batch size on a GPU (many circuits per pass cost
    about one); on a CPU one circuit per pass. A pass costs its rows there, so batching
    circuits saves passes but not time, and with the edge reference (`_Faith.reuse`)
    each pass is then referred to the very state ACDC goes on from: docs/benchmarks.md,
    10.8x auto-circuit against 9.3x with two circuits per pass."""
    rows = max(problem.batch_size, 1)
    if torch.device(problem.model.device).type == "cpu":
        rows = min(rows, max(problem.n, 1))
    return rows


def _check_tau(tau) -> float:
    try:
        value = float(tau)
    except (TypeError, ValueError):
        raise DiscoveryError(f"ACDC's threshold must be a number, got {tau!r}", code="discover.threshold",
                             hint="for example --threshold 0.01") from None
    if not math.isfinite(value) or value < 0:
        raise DiscoveryError(f"ACDC's threshold tau = {tau} is {'negative' if value < 0 else 'not finite'}",
                             code="discover.threshold",
                             hint="tau >= 0: an edge is removed when removing it raises the faithfulness "
                                  "loss by less than tau (e.g. --threshold 0.01)")
    return value


def acdc(problem: Problem, tau: float, *, order: Sequence | torch.Tensor | None = None, rundir=None,
         progress: Callable[[AcdcProgress], None] | None = None, rows: int | None = None,
         skip_dead: bool = True) -> tuple[torch.Tensor, Decisions]:
    """ACDC at threshold `tau` (module docstring): the circuit and every decision.

    Args:
        problem: the discovery problem (its metric is what faith measures: `kl`, or a
            task metric).
        tau: the threshold (>= 0).
        order: the order edges are tried in (edge indices or (sender, receiver[,
            position]) sites, every edge once); None: `default_order`.
        rundir: a `RunDir` for checkpoints (`acdc.pt`), resumed when it holds one.
        progress: called after each receiver whose edges are all decided (after the
            checkpoint), with an `AcdcProgress`.
        rows: rows (circuit, prompt pairs) per forward pass; default the problem's
            `batch_size` on a GPU, and on a CPU one circuit per pass (at most the batch
            size). A pass holds `rows // n` circuits (at least one; with more prompts
            than rows, a circuit takes several passes). On a GPU, where a pass costs
            about the same for any number of rows up to its capacity, give many; on a
            CPU, where its cost grows with the rows, few waste less past kept edges.
        skip_dead: decide edges into dead nodes without a pass (module docstring).

    Returns:
        (circuit BoolTensor [E], Decisions).

    Raises:
        DiscoveryError: tau negative or not a number, an order that is not a permutation
            of the edges, or a checkpoint made with another tau or order.
    """
    tau = _check_tau(tau)
    space = problem.space
    order_t = _order(space, order)
    m = len(order_t)
    n_edges = len(space)
    kept = torch.zeros(m, dtype=torch.bool)
    faith = torch.full((m,), float("nan"), dtype=torch.float64)
    step = torch.zeros(m, dtype=torch.float64)
    scored = torch.zeros(m, dtype=torch.bool)
    done, p = 0, 0.0
    saved = rundir.read_tensors("acdc") if rundir is not None else None
    if saved is not None:
        about = rundir.read_json("acdc") or {}
        if (float(saved["tau"]) != tau or not torch.equal(saved["order"], order_t)
                or about.get("metric", problem.metric) != problem.metric):
            raise DiscoveryError("the run directory's ACDC checkpoint was made with another threshold, metric "
                                 "or edge order", code="discover.rundir-mismatch",
                                 hint="resume with the same options, or choose another run directory")
        done = int(saved["done"])
        kept[:done], faith[:done] = saved["kept"][:done], saved["faith"][:done]
        step[:done], scored[:done] = saved["step"][:done], saved["scored"][:done]
        p = float(saved["p"])
    resumed = done
    passes_before = problem.passes

    receivers = space.pairs[:, 0].repeat(len(space.positions))[order_t]  # receiver of each tried edge
    ends = torch.ones(m, dtype=torch.bool)  # the last edge of each run of one receiver in the order
    if m > 1:
        ends[:-1] = receivers[1:] != receivers[:-1]
    groups_total = int(ends.sum())
    end_positions = ends.nonzero()[:, 0].tolist()
    groups_done = sum(1 for e in end_positions if e < done)

    live = _Liveness(space, problem.model.shape) if skip_dead else None
    present = torch.ones(n_edges, dtype=torch.bool)  # not removed (kept or undecided)
    removed_idx = order_t[:done][~kept[:done]]
    present[removed_idx] = False

    def checkpoint() -> None:
        if rundir is not None:
            rundir.write_tensors("acdc", {"tau": torch.tensor(tau, dtype=torch.float64), "order": order_t,
                                          "done": torch.tensor(done), "p": torch.tensor(p, dtype=torch.float64),
                                          "kept": kept[:done], "faith": faith[:done], "step": step[:done],
                                          "scored": scored[:done]})
            # for people and front ends (a resumed run reads acdc.pt, checking only the metric here)
            rundir.write_json("acdc", {"tau": tau, "metric": problem.metric, "edges": m, "decided": done,
                                       "kept": int(kept[:done].sum()), "faith": p})

    if done < m:
        evaluator = _Faith(problem, rows if rows is not None else _default_rows(problem))
        if done == 0 and space.per_position:  # unnamed positions are always ablated: measure the start
            p = float(evaluator(torch.ones(1, n_edges, dtype=torch.bool))[0])
    while done < m:
        r_live = live.receivers_live(present) if live is not None else None
        # the next entries: dead edges (no row) and up to `per_pass` live edges (one row each)
        entries, circuits = [], []
        state = present.clone()
        i = done
        while i < m and len(circuits) < evaluator.per_pass:
            e = int(order_t[i])
            dead = r_live is not None and not bool(r_live[receivers[i]])
            if dead and tau == 0.0:  # exact step 0, not < 0: kept, and the state is unchanged
                entries.append((i, None))
            else:
                state[e] = False
                if dead:
                    entries.append((i, None))
                else:
                    entries.append((i, len(circuits)))
                    circuits.append(state.clone())
            i += 1
        values = evaluator(torch.stack(circuits)) if circuits else np.zeros(0)
        accepted = None
        for i, row in entries:
            e = int(order_t[i])
            if row is None:  # the dead-node rule: step exactly 0
                keep = not (0.0 < tau)
                step[i], kept[i] = 0.0, keep
                if not keep:
                    present[e] = False
                done = i + 1
                continue
            f = float(values[row])
            s = f - p
            faith[i], step[i], scored[i] = f, s, True
            done = i + 1
            if s < tau:
                present[e] = False
                p = f
                accepted = row
            else:
                kept[i] = True
                break  # the rows after this one assumed its removal
        if accepted is not None:
            evaluator.accept(accepted)
        finished = [g for g in end_positions[groups_done:] if g < done]
        if finished:
            checkpoint()
            for g in finished:
                groups_done += 1
                if progress is not None:
                    progress(AcdcProgress(space.edge_set.receivers[int(receivers[g])], groups_done, groups_total,
                                          done, m, int(kept[:done].sum()), problem.passes - passes_before))
    checkpoint()
    decisions = Decisions(order_t, kept, faith, step, scored, tau, problem.metric,
                          problem.passes - passes_before, resumed)
    return decisions.circuit(n_edges), decisions


# ---- the method ------------------------------------------------------------------------
@register_method("acdc")
def _acdc_method(problem, selection, options, rundir) -> Found:
    """`discover(method="acdc", threshold=tau)`: tau from `options["threshold"]`, an
    optional `options["order"]` and `options["rows"]`, progress on stderr with
    `options["progress"]`."""
    from circuitlang.progress import Progress

    if selection.edges is not None or selection.target is not None:
        raise DiscoveryError("ACDC chooses its circuit by its threshold alone", code="discover.selection",
                             hint="use --threshold TAU with acdc (not --edges or --target)")
    tau = options.get("threshold")
    if tau is None:
        raise DiscoveryError("ACDC needs a threshold tau", code="discover.threshold",
                             hint="pass --threshold TAU (e.g. 0.01): an edge is removed when removing it "
                                  "raises the faithfulness loss by less than tau")
    tau = _check_tau(tau)
    bar = Progress(len(problem.space), f"acdc tau={tau:g}", enabled=True) if options.get("progress") else None

    def show(info: AcdcProgress) -> None:
        bar.set(info.edges_done, f"{info.receiver}: kept {info.kept}")

    try:
        circuit, decisions = acdc(problem, tau, order=options.get("order"), rundir=rundir,
                                  progress=show if bar is not None else None, rows=options.get("rows"))
    finally:
        if bar is not None:
            bar.close()
    options["method_name"] = f"acdc (tau={tau:g}, metric {problem.metric})"
    skipped = int((~decisions.scored).sum())
    notes = [f"ACDC at tau={tau:g}: kept {int(decisions.kept.sum())} of {len(decisions.order)} edges in "
             f"{decisions.passes} forward passes; {skipped} edge(s) decided without a pass (into nodes no "
             f"kept path connects to the output)"]
    if decisions.resumed:
        notes.append(f"resumed after {decisions.resumed} decided edges")
    return Found(circuit, notes=notes, extra={"acdc": decisions.to_json()})
