"""The discovery problem: a model, prompts, an ablation and a metric over a space of edges.

Takes a loaded model, a task and its prompts; gives what every discovery method
(attribution, ACDC, learned masks, hole filling) works on:

* **the edge space** (`EdgeSpace`): every edge of the model (`circuitlang.topology`),
  once for all positions, or once per named position (`positions=("END", "S2")`:
  an edge at END is a different candidate than the same edge at S2, and at every
  position not named every edge is ablated);
* **the ablated values**: what an ablated edge carries instead of its sender's output
  (`ablation`): the sender's output on the prompt's paired counterfactual
  (`corrupt`, what ACDC and EAP call patching), on another random prompt of the same
  length (`resample`), its dataset mean per position (`mean`), or zero (`zero`);
* **the metric**: the task's metrics, or `kl` (KL divergence from the full model's
  output at the task's END position, ACDC's default), differentiable;
* **scoring** many circuits along the batch (`score`): rows of a pass are (circuit,
  prompt) pairs, each with its own mask, so a faithfulness curve or ACDC's candidate
  removals are a few large passes;
* **mask gradients** (`gradients`): d(metric)/d(mask) at any mask value, exact, from one
  forward and one backward pass per batch of prompts.

A circuit is a BoolTensor over the edge space (True = kept); the engine's mask is its
complement on the valid edges (1 = ablate).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from circuitlang.errors import DiscoveryError
from circuitlang.execute import position_index, spread_columns
from circuitlang.models import EdgePatch, EdgeReference, EdgeSet, Patch, Run
from circuitlang.sites import ALL, Embed, Position, Site

__all__ = ["ABLATIONS", "EdgeSpace", "Problem", "resample_donors"]

ABLATIONS = ("corrupt", "resample", "mean", "zero")


_NONE = torch.zeros(0, dtype=torch.long)  # a capture pass computes no logits


def resample_donors(prompts, seed: int) -> np.ndarray:
    """Each prompt's donor under resample ablation: another prompt of the same length,
    uniform, drawn from `seed` (itself where it has none)."""
    rng = np.random.default_rng(seed)
    lengths = prompts.attention_mask.sum(1).numpy()
    donors = np.empty(len(lengths), dtype=np.int64)
    for i in range(len(lengths)):
        same = np.flatnonzero(lengths == lengths[i])
        others = same[same != i]
        donors[i] = rng.choice(others) if len(others) else i
    return donors


@dataclass(frozen=True, eq=False)
class EdgeSpace:
    """The candidate edges: every valid (receiver, sender) pair of an `EdgeSet`, once per
    position slot.

    Attributes:
        edge_set: the model's senders and receivers.
        positions: `(ALL,)` (edges over the whole sequence) or named positions.
        pairs: LongTensor [E0, 2] of (receiver index, sender index) of each valid edge.
    """

    edge_set: EdgeSet
    positions: tuple[Position, ...]
    pairs: torch.Tensor

    @classmethod
    def build(cls, edge_set: EdgeSet, positions: tuple[Position, ...] = (ALL,)) -> "EdgeSpace":
        pairs = edge_set.valid().nonzero()
        return cls(edge_set, tuple(positions), pairs)

    @property
    def per_position(self) -> bool:
        return not (len(self.positions) == 1 and self.positions[0].is_all)

    def __len__(self) -> int:
        return len(self.pairs) * len(self.positions)

    def edge(self, i: int) -> tuple[Site, Site, Position]:
        """Edge `i` as (sender, receiver, position)."""
        p, e = divmod(i, len(self.pairs))
        r, s = self.pairs[e].tolist()
        return self.edge_set.senders[s], self.edge_set.receivers[r], self.positions[p]

    def edges(self, kept: torch.Tensor | None = None) -> list[tuple[Site, Site, Position]]:
        """Every edge (or the kept ones) as (sender, receiver, position)."""
        idx = range(len(self)) if kept is None else kept.nonzero()[:, 0].tolist()
        return [self.edge(i) for i in idx]

    def index(self, sender: Site, receiver: Site, position: Position = ALL) -> int:
        """The index of an edge in this space.

        Raises:
            DiscoveryError: no such edge (or not at that position).
        """
        r, s = self.edge_set.index(sender, receiver)
        hits = ((self.pairs[:, 0] == r) & (self.pairs[:, 1] == s)).nonzero()
        if len(hits) == 0 or position not in self.positions:
            where = ", ".join(str(p) for p in self.positions)
            raise DiscoveryError(f"edge {sender} -> {receiver} at {position} is not a candidate",
                                 code="discover.unknown-edge", hint=f"candidate positions: {where}")
        return self.positions.index(position) * len(self.pairs) + int(hits[0, 0])

    def as_grid(self, values: torch.Tensor) -> torch.Tensor:
        """Per-edge values [..., E] as [..., P, R, S] (zeros where no edge)."""
        n_r, n_s = len(self.edge_set.receivers), len(self.edge_set.senders)
        lead = values.shape[:-1]
        out = torch.zeros(*lead, len(self.positions), n_r, n_s, dtype=values.dtype, device=values.device)
        v = values.reshape(*lead, len(self.positions), len(self.pairs))
        out[..., self.pairs[:, 0], self.pairs[:, 1]] = v
        return out

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """[..., P, R, S] grid values back to per-edge [..., E]."""
        v = grid[..., self.pairs[:, 0], self.pairs[:, 1]]
        return v.reshape(*grid.shape[:-3], len(self))

    def masks(self, kept: torch.Tensor, prompts, index: torch.Tensor | None = None) -> torch.Tensor:
        """Engine masks (1 = ablate) for circuits `kept` [K, E] (float in [0, 1]: fraction
        kept), one row per circuit, or [K, T, R, S] per-position rows for the prompts at
        `index` (one per row)."""
        ablate = 1.0 - kept.to(torch.float32)
        grid = self.as_grid(ablate)  # [K, P, R, S]
        valid = self.edge_set.valid().to(grid.dtype)
        if not self.per_position:
            return grid[:, 0] * valid
        n_t = prompts.input_ids.shape[1]
        k = kept.shape[0]
        out = valid.expand(k, n_t, *valid.shape).clone()  # not listed: ablated everywhere
        rows = torch.arange(k)
        for p, position in enumerate(self.positions):
            at = position_index(prompts, position)[index]
            out[rows, at] = grid[:, p] * valid
        return out


@dataclass
class Problem:
    """A discovery problem; see the module docstring.

    Attributes:
        model: the `LoadedModel`.
        task: the task (metrics, counterfactuals).
        prompts: its `PromptSet` (clean prompts, paired corrupt ones).
        metric: a task metric name, or "kl".
        ablation: one of `ABLATIONS`.
        space: the candidate edges.
        seed: for resample ablation.
        batch_size: rows per forward pass.
    """

    model: object
    task: object
    prompts: object
    metric: str
    ablation: str = "corrupt"
    space: EdgeSpace | None = None
    seed: int = 0
    batch_size: int = 32
    passes: int = 0
    _ablated: dict = field(default_factory=dict, repr=False)
    _reference: torch.Tensor | None = field(default=None, repr=False)
    _donors: np.ndarray | None = field(default=None, repr=False)
    _metric_columns: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.ablation not in ABLATIONS:
            raise DiscoveryError(f"unknown ablation {self.ablation!r}", code="discover.ablation",
                                 hint="use " + ", ".join(ABLATIONS))
        if self.space is None:
            self.space = EdgeSpace.build(self.model.edge_set())
        if self.metric != "kl" and self.metric not in self.task.SIGNATURE.metrics:
            raise DiscoveryError(f"task {self.task.SIGNATURE.name} has no metric {self.metric!r}",
                                 code="discover.metric",
                                 hint="metrics: kl, " + ", ".join(self.task.SIGNATURE.metrics))

    @property
    def n(self) -> int:
        return len(self.prompts.input_ids)

    @property
    def direction(self) -> int:
        """+1 when a higher metric is better (logit difference), -1 for losses and KL."""
        return -1 if self.metric == "kl" else self.task.metric_direction(self.metric)

    # ---- values -------------------------------------------------------------------
    def ablated(self, index: torch.Tensor) -> torch.Tensor:
        """Senders' ablated values for the prompts at `index`: [B, S, T, D] (B may be 1)."""
        es = self.space.edge_set
        if self.ablation in ("mean", "zero"):
            if "all" not in self._ablated:
                self._ablated["all"] = self._constant_values()
            return self._ablated["all"]
        ids = self.prompts.corrupt_input_ids if self.ablation == "corrupt" else self.prompts.input_ids
        rows = index if self.ablation == "corrupt" else torch.as_tensor(self.donors())[index]
        run = self.model.run(ids[rows], self.prompts.attention_mask[rows], capture=es.senders, logit_columns=_NONE)
        self.passes += 1
        return torch.stack([run.cache[s] for s in es.senders], 1).detach()

    def donors(self) -> np.ndarray:
        """For resample ablation: each prompt's donor, another prompt of the same length."""
        if self._donors is None:
            self._donors = resample_donors(self.prompts, self.seed)
        return self._donors

    def _constant_values(self) -> torch.Tensor:
        es = self.space.edge_set
        ids, mask = self.prompts.input_ids, self.prompts.attention_mask
        total, count = None, None
        for start in range(0, self.n, self.batch_size):
            sl = slice(start, start + self.batch_size)
            run = self.model.run(ids[sl], mask[sl], capture=es.senders, logit_columns=_NONE)
            self.passes += 1
            vals = torch.stack([run.cache[s] for s in es.senders], 1).detach()  # [b, S, T, D]
            m = mask[sl].to(vals.dtype).to(vals.device)[:, None, :, None]
            part, cnt = (vals * m).sum(0, keepdim=True), m.sum(0, keepdim=True)
            total = part if total is None else total + part
            count = cnt if count is None else count + cnt
        mean = total / count.clamp(min=1)
        return torch.zeros_like(mean) if self.ablation == "zero" else mean

    def reference(self, index: torch.Tensor) -> torch.Tensor | None:
        """The full model's logits at END for the prompts at `index` (for `kl`)."""
        if self.metric != "kl":
            return None
        if self._reference is None:
            parts = []
            end = self.prompts.positions["END"]
            for start in range(0, self.n, self.batch_size):
                sl = slice(start, start + self.batch_size)
                logits = self.model.run(self.prompts.input_ids[sl], self.prompts.attention_mask[sl]).logits
                self.passes += 1
                parts.append(logits[torch.arange(logits.shape[0]), end[sl].to(logits.device)].detach())
            self._reference = torch.cat(parts)
        return self._reference[index.to(self._reference.device)]

    def forward(self, rows: torch.Tensor, *, edges=None, patches=(), grad: bool = False, resume=None) -> torch.Tensor:
        """One pass of the prompts at `rows` (one batch row each): the logits `metric_of`
        reads. When the metric reads a few tokens' logits at END (a logit difference),
        only those columns of the unembedding are computed (`metric_columns`), at END
        only, laid into [B, V] with the others 0; for any other metric of END alone (kl,
        a probability) the whole vocabulary at END only, [B, V]; else [B, T, V]."""
        return self.forward_run(rows, edges=edges, patches=patches, grad=grad, resume=resume)[0]

    def forward_run(self, rows: torch.Tensor, *, edges=None, patches=(), grad: bool = False,
                    resume=None) -> tuple[torch.Tensor, Run]:
        """`forward`'s logits and the pass's `Run` (its `deltas` make an `EdgeReference`)."""
        columns = self._columns()
        at_end = columns is not None or self._end_only()
        end = self.prompts.positions["END"][rows] if at_end else None
        run = self.model.run(self.prompts.input_ids[rows], self.prompts.attention_mask[rows], edges=edges,
                             patches=patches, grad=grad, resume=resume, logit_columns=columns, logits_at=end)
        self.passes += 1
        if not at_end:
            return run.logits, run
        part = run.logits[:, 0]  # [B, V], or [B, len(columns)]
        if columns is None:
            return part, run
        return spread_columns(part, columns, self.model.shape.vocab_size), run

    def _end_only(self) -> bool:
        """Whether the current metric reads the logits at END only: kl (the distributions
        there), or a metric that takes END logits [N, V] (a task's metric refuses them
        when it reads other positions, as induction's loss does)."""
        key = ("end only", self.metric)
        if key not in self._metric_columns:
            from circuitlang.errors import TaskError

            found = self.metric == "kl"
            if not found and "END" in self.prompts.positions:
                sub = self.prompts.subset(torch.arange(min(2, self.n)))
                try:
                    self.task.metric(self.metric, torch.zeros(len(sub.input_ids), self.model.shape.vocab_size), sub)
                    found = True
                except TaskError:
                    found = False
            self._metric_columns[key] = found
        return self._metric_columns[key]

    def _columns(self) -> torch.Tensor | None:
        """The vocabulary ids the current metric reads at END (None: not END-only, or many)."""
        if self.metric not in self._metric_columns:
            from circuitlang.execute_inputs import metric_columns

            found = None
            if self.metric != "kl" and "END" in self.prompts.positions:
                found = metric_columns(self.task, self.metric, self.prompts, self.model.shape.vocab_size)
            self._metric_columns[self.metric] = found
        return self._metric_columns[self.metric]

    def metric_of(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The metric per row [B] for logits of the prompts at `index` (differentiable)."""
        sub = self.prompts.subset(index)
        if self.metric == "kl":
            return self.task.metric("kl", logits, sub, reference_logits=self.reference(index))
        return self.task.metric(self.metric, logits, sub)

    # ---- circuits -----------------------------------------------------------------
    def score(self, kept: torch.Tensor, *, metric: str | None = None, progress=None,
              chained: bool = False) -> np.ndarray:
        """The metric of circuits `kept` [K, E] (True/1 = kept; fractions mix) on every
        prompt: [K, N]. Rows of each pass are (circuit, prompt) pairs.

        Args:
            kept: circuits over the edge space.
            metric: another metric than the problem's (the task's, or "kl").
            progress: called with the number of rows done.
            chained: circuits that grow one from the next (the faithfulness curve's): each
                pass holding one circuit is given the previous circuit's pass as its
                `EdgeReference`, so that only the nodes the added edges reach are computed
                (edges over all positions; the numbers are the same to float rounding).
        """
        previous = self.metric
        if metric is not None:
            self.metric = metric
        try:
            return self._score(kept, progress, chained)
        finally:
            self.metric = previous

    def _score(self, kept: torch.Tensor, progress, chained: bool = False) -> np.ndarray:
        kept = kept.reshape(-1, len(self.space))
        k, n = kept.shape[0], self.n
        out = np.zeros((k, n))
        es = self.space.edge_set
        rows_done = 0
        per_chunk = max(1, self.batch_size)
        for start in range(0, n, per_chunk):
            index = torch.arange(start, min(n, start + per_chunk))
            ablated = self.ablated(index)
            group = max(1, self.batch_size // len(index))
            chain = chained and group == 1 and not self.space.per_position
            reference = self._empty_reference(ablated) if chain else None
            for c0 in range(0, k, group):
                cs = torch.arange(c0, min(k, c0 + group))
                rows = index.repeat(len(cs))
                circuit = cs.repeat_interleave(len(index))
                masks = self.space.masks(kept[circuit], self.prompts, rows)
                abl = ablated if ablated.shape[0] == 1 else ablated.repeat(len(cs), 1, 1, 1)
                with torch.no_grad():
                    logits, run = self.forward_run(rows, edges=EdgePatch.from_set(es, abl, masks, reference))
                    vals = self.metric_of(logits, rows).double().cpu().numpy()
                if chain:  # this circuit is the next one's reference
                    reference = EdgeReference.from_run(run, masks[0], previous=reference)
                out[circuit.numpy(), rows.numpy()] = vals
                rows_done += len(rows)
                if progress is not None:
                    progress(rows_done)
        return out

    def _empty_reference(self, ablated: torch.Tensor) -> EdgeReference:
        """A chain's first reference. When the ablated values are a forward pass of other
        prompts (corrupt, resample), the empty circuit: with every edge ablated each head
        and MLP reads those prompts' stream, so it gives its ablated value, a delta of 0
        (the empty circuit's own pass then computes no node). Otherwise (mean, zero) none:
        the first circuit is computed whole."""
        es = self.space.edge_set
        if self.ablation not in ("corrupt", "resample"):
            return EdgeReference(torch.zeros(len(es.receivers), len(es.senders)), {})
        zero = torch.zeros(1, *ablated.shape[2:], dtype=ablated.dtype, device=ablated.device)  # every row's
        return EdgeReference(es.valid().to(torch.float32), {s: zero for s in es.senders if s != Embed()})

    def full(self, *, metric: str | None = None) -> np.ndarray:
        """The metric of the full model per prompt [N]: the clean run, nothing ablated,
        what the checker calls `clean`.

        Over the whole sequence that is every candidate kept; with named positions it
        is not: keeping every candidate still ablates every edge at the positions not
        named (`score(torch.ones(1, len(space)))` measures that circuit).

        Args:
            metric: another metric than the problem's (the task's, or "kl").
        """
        previous = self.metric
        if metric is not None:
            self.metric = metric
        try:
            out = np.zeros(self.n)
            for start in range(0, self.n, max(1, self.batch_size)):
                index = torch.arange(start, min(self.n, start + max(1, self.batch_size)))
                with torch.no_grad():
                    out[index.numpy()] = self.metric_of(self.forward(index), index).double().cpu().numpy()
            return out
        finally:
            self.metric = previous

    def empty(self, *, metric: str | None = None) -> np.ndarray:
        """The metric with every edge ablated (at every position) per prompt [N]: the empty
        circuit, what the checker calls `random`."""
        return self.score(torch.zeros(1, len(self.space)), metric=metric)[0]

    # ---- gradients ------------------------------------------------------------------
    def gradients(self, kept_value: float | torch.Tensor = 1.0, *, inputs_alpha: float | None = None,
                  delta: str = "ablated") -> torch.Tensor:
        """d(mean metric)/d(ablation mask) for every edge [E], summed over prompts.

        The mask is `1 - kept_value` on every edge (scalar or per edge [E]); the gradient
        is with respect to the *ablation* mask, so it estimates the change of the metric
        when an edge is ablated (first order).

        Args:
            kept_value: how much of each edge is kept where the gradient is taken (1: the
                full model, EAP's point; fractions interpolate each sender's output).
            inputs_alpha: take the gradient on the input embeddings interpolated
                `corrupt + alpha (clean - corrupt)` instead of the clean prompt (EAP-IG
                over inputs), with each edge's delta the clean-minus-ablated difference
                of its sender (not the interpolated one).
            delta: "ablated" (the engine's `current - ablated`) — the only reading used.
        """
        es = self.space.edge_set
        total = torch.zeros(len(self.space), dtype=torch.float64)
        for start in range(0, self.n, self.batch_size):
            index = torch.arange(start, min(self.n, start + self.batch_size))
            ablated = self.ablated(index)
            if ablated.shape[0] == 1:
                ablated = ablated.expand(len(index), *ablated.shape[1:])
            patches = []
            if inputs_alpha is not None:
                ablated, patches = self._interpolated(index, ablated, inputs_alpha)
            value = torch.as_tensor(kept_value, dtype=torch.float32)
            kept = (torch.ones(1, len(self.space)) * value).requires_grad_(True)
            masks = self.space.masks(kept.expand(len(index), -1), self.prompts, index)
            with torch.enable_grad():
                logits = self.forward(index, edges=EdgePatch.from_set(es, ablated, masks), patches=patches, grad=True)
                loss = self.metric_of(logits, index).sum()
                (grad,) = torch.autograd.grad(loss, kept)
            # d/d(ablate) = -d/d(kept)
            total -= grad[0].double().cpu()
        return total / self.n

    def _interpolated(self, index: torch.Tensor, ablated: torch.Tensor, alpha: float):
        """Inputs `corrupt + alpha (clean - corrupt)` at the embedding, and ablated values
        that make every edge's delta its sender's clean-minus-ablated difference there."""
        es = self.space.edge_set
        ids, mask = self.prompts.input_ids[index], self.prompts.attention_mask[index]
        with torch.no_grad():
            clean = self.model.run(ids, mask, capture=list(es.senders) + [Embed()], logit_columns=_NONE).cache
            corrupt_embed = self.model.run(self.prompts.corrupt_input_ids[index], mask, capture=[Embed()],
                                           logit_columns=_NONE).cache[Embed()]
            embed = corrupt_embed + alpha * (clean[Embed()] - corrupt_embed)
            here = self.model.run(ids, mask, capture=es.senders, patches=[Patch(Embed(), embed)],
                                  logit_columns=_NONE).cache
            self.passes += 3
            clean_v = torch.stack([clean[s] for s in es.senders], 1)
            here_v = torch.stack([here[s] for s in es.senders], 1)
        return here_v - (clean_v - ablated), [Patch(Embed(), embed)]
