"""Run intervention graphs on a model: causal scrubbing in a few large batched passes.

Takes an `InterventionGraph` (see `ir_to_graph.py` for what it means), a loaded
model (`circuitlang.models.LoadedModel`) and a task's `PromptSet`, and gives
per-prompt metric values: clean, scrubbed, and fully ablated ("random").

How the work is laid out
------------------------
1. **Plain pass** (`PlainCache`): one batched forward pass over every prompt in the
   dataset captures what the graph reads: each claimed sender's output, each
   claimed receiver's input, the final residual stream. Every leaf of the graph
   and every unclaimed path is then a lookup: a leaf's value is the plain value on
   its own sampled prompt; an unclaimed path's value is the plain value on a
   random one. That is the memoisation of identical (site, input) work.
2. **Sampling**: for each reference prompt, walking the graph from the root, each
   node gets a prompt agreeing with its parent's on the node's features, and each
   node with children gets a random "remainder" prompt for its unclaimed inputs.
   The resampling pool is the dataset itself (Chan et al. 2022).
3. **Level passes**: nodes with children are computed bottom-up, one batched
   forward pass per height of the tree, every such node and reference prompt a
   row: the node runs on its remainder prompt with its q/k/v inputs replaced by
   remainder + (child value - child's remainder contribution) at the transplant
   positions.
4. **Root pass**: the final residual stream at the metric positions of each
   reference prompt is rebuilt the same way and unembedded by one forward pass on
   the reference prompts with the final residual patched.

Every resample agrees with its parent prompt on token length, so that whole
sequences line up; values at named positions are still moved by name (IOI's S2
sits at different indices in different templates of the same length). For IOI
this keeps random resamples among templates of the same length, a documented
departure from resampling over the whole distribution.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from circuitlang.errors import ExecutionError
from circuitlang.ir_to_graph import INPUT, Feature, InterventionGraph
from circuitlang.sites import Channel, Head, Logits, Mlp, MlpIn, Position, Resid

DEFAULT_BATCH = 64


def metric_positions(task, metric: str) -> str:
    """Where the task's metric reads the logits: "END" or "all".

    A task says so with a `metric_positions(metric)` method; otherwise a task that
    defines an `END` position is read there, and any other at every position.
    """
    explicit = getattr(task, "metric_positions", None)
    if callable(explicit):
        return explicit(metric)
    return "END" if "END" in task.SIGNATURE.positions else "all"


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


class PlainCache:
    """Plain (un-intervened) activations of every prompt, captured on demand.

    `ensure(sites)` runs one batched pass over the prompts for the sites not yet
    held; `get(site)` returns a CPU tensor [M, T, D]. Means for mean ablation are
    taken over real (unpadded) tokens, per absolute position.
    """

    def __init__(self, model, prompts, *, batch_size: int = DEFAULT_BATCH):
        self.model = model
        self.prompts = prompts
        self.batch_size = batch_size
        self.values: dict = {}
        self.passes = 0

    def ensure(self, sites) -> None:
        missing = [s for s in dict.fromkeys(sites) if s not in self.values]
        if not missing:
            return
        parts = {s: [] for s in missing}
        for sl in _chunks(len(self.prompts.input_ids), self.batch_size):
            run = run_batched(
                self.model,
                self.prompts.input_ids[sl],
                self.prompts.attention_mask[sl],
                capture=missing,
            )
            for s in missing:
                parts[s].append(run.cache[s].detach().to("cpu"))
        self.passes += 1
        for s in missing:
            self.values[s] = torch.cat(parts[s])

    def get(self, site) -> torch.Tensor:
        self.ensure([site])
        return self.values[site]

    def mean(self, site) -> torch.Tensor:
        """Mean over prompts at each absolute position (padding excluded): [T, D]."""
        key = ("mean", site)
        if key not in self.values:
            v = self.get(site)
            mask = self.prompts.attention_mask.to(v.dtype).unsqueeze(-1)
            self.values[key] = (v * mask).sum(0) / mask.sum(0).clamp(min=1)
        return self.values[key]


def run_batched(model, input_ids, attention_mask, *, capture=(), patches=()):
    """`model.run` that halves the batch and retries when CUDA runs out of memory."""
    try:
        return model.run(input_ids, attention_mask, capture=capture, patches=patches)
    except torch.cuda.OutOfMemoryError:
        n = input_ids.shape[0]
        if n <= 1:
            raise ExecutionError(
                "out of GPU memory even with a batch of one prompt",
                hint="use a smaller model, shorter prompts, or --device cpu",
            )
        torch.cuda.empty_cache()
        from circuitlang.models import Patch, Run  # local: models imports torch-heavy code

        def part(sl):
            cut = [Patch(p.site, p.value[sl], None if p.positions is None else p.positions[sl],
                         None if p.rows is None else p.rows[sl]) for p in patches]
            return run_batched(model, input_ids[sl], attention_mask[sl], capture=capture, patches=cut)

        a, b = part(slice(0, n // 2)), part(slice(n // 2, n))
        return Run(torch.cat([a.logits, b.logits]), {k: torch.cat([a.cache[k], b.cache[k]]) for k in a.cache})


# --------------------------------------------------------------------------- sampling


class Sampler:
    """Draws resamples that agree with given prompts on given features.

    Args:
        prompts: the task's `PromptSet` (the resampling pool).
        rng: a numpy Generator (the run's seed).
        same_length: also agree on the prompt's token length.
    """

    def __init__(self, prompts, rng: np.random.Generator, *, same_length: bool):
        self.prompts = prompts
        self.rng = rng
        self.same_length = same_length
        self.lengths = prompts.attention_mask.sum(1).numpy()
        self._groups: dict = {}

    def feature_values(self, feature: Feature) -> list:
        p = self.prompts
        if feature.kind == "task":
            try:
                return list(p.features[feature.name])
            except KeyError:
                raise ExecutionError(
                    f"the task has no feature {feature.name!r}",
                    hint="it defines: " + ", ".join(sorted(p.features)),
                ) from None
        if feature.kind in ("token", "position"):
            if feature.name in p.features and feature.name not in p.positions:
                # token(IO) where IO is a feature (a name): agree on that feature
                return list(p.features[feature.name])
            idx = position_index(p, Position(*_split_offset(feature.name)))
            if feature.kind == "position":
                return idx.tolist()
            return p.input_ids[torch.arange(len(idx)), idx].tolist()
        raise ExecutionError(f"cannot resample on feature {feature}")

    def _group_keys(self, features: tuple) -> np.ndarray:
        cols = [self.feature_values(f) for f in features if f.kind != INPUT]
        if self.same_length:
            cols.append(self.lengths.tolist())
        n = len(self.prompts.input_ids)
        keys = [tuple(col[i] for col in cols) for i in range(n)]
        return keys

    def agree(self, parent_rows: np.ndarray, features: tuple) -> np.ndarray:
        """For each parent prompt, a pool prompt agreeing with it on `features`."""
        if any(f.kind == INPUT for f in features):
            return parent_rows.copy()
        key = tuple(features)
        if key not in self._groups:
            keys = self._group_keys(features)
            groups: dict = {}
            for i, k in enumerate(keys):
                groups.setdefault(k, []).append(i)
            self._groups[key] = (keys, {k: np.array(v) for k, v in groups.items()})
        keys, groups = self._groups[key]
        out = np.empty_like(parent_rows)
        for j, row in enumerate(parent_rows):
            members = groups[keys[row]]
            out[j] = members[self.rng.integers(len(members))]
        return out


def _split_offset(text: str) -> tuple[str, int]:
    for sign in ("+", "-"):
        if sign in text[1:]:
            name, _, num = text.rpartition(sign)
            if num.isdigit():
                return name, int(num) * (1 if sign == "+" else -1)
    return text, 0


def position_index(prompts, position: Position) -> torch.Tensor:
    """Token index of a named position in every prompt: LongTensor [M]."""
    try:
        base = prompts.positions[position.name]
    except KeyError:
        raise ExecutionError(
            f"the task defines no position {position.name!r}",
            hint="it defines: " + ", ".join(sorted(prompts.positions)),
        ) from None
    idx = base + position.offset
    lengths = prompts.attention_mask.sum(1)
    if bool(((idx < 0) | (idx >= lengths)).any()):
        raise ExecutionError(f"position {position} falls outside some prompts")
    return idx


# --------------------------------------------------------------------------- scrubbing


@dataclass
class _Inst:
    """A node's sampled prompts and, once computed, its value for every reference.

    `rows` is the prompt the node runs on (agreeing with its parent's on the node's
    features): its value is laid out in that prompt's positions. `remainder` is the
    random prompt (or, with mean/zero ablation, only a placeholder) that feeds the
    paths into it nobody claimed.
    """

    rows: np.ndarray
    remainder: np.ndarray
    value: torch.Tensor | None = None  # [N, T, D] for computed nodes; leaves read the cache


@dataclass
class ScrubResult:
    """Per-reference metric values and what it took."""

    scrubbed: np.ndarray
    passes: int
    rows: dict = field(default_factory=dict)


class Scrubber:
    """Evaluates intervention graphs for one model, task, prompt set and metric.

    The plain cache is shared by every graph evaluated with the same scrubber
    (the per-claim breakdown and the permutation test reuse it).
    """

    def __init__(self, model, task, prompts, metric: str, *, batch_size: int = DEFAULT_BATCH):
        self.model = model
        self.task = task
        self.prompts = prompts
        self.metric = metric
        self.batch_size = batch_size
        self.cache = PlainCache(model, prompts, batch_size=batch_size)
        self.n_layers = model.shape.n_layers
        self.final = Resid(self.n_layers)
        self.passes = 0
        self.metric_at = metric_positions(task, metric)
        self._clean: np.ndarray | None = None

    # -- metrics ---------------------------------------------------------------

    def clean(self) -> np.ndarray:
        """Per-prompt metric of the unmodified model."""
        if self._clean is None:
            vals = []
            for sl in _chunks(len(self.prompts.input_ids), self.batch_size):
                run = run_batched(self.model, self.prompts.input_ids[sl], self.prompts.attention_mask[sl])
                vals.append(self._metric(run.logits, sl, reference=run.logits))
            self.passes += 1
            self._clean = np.concatenate(vals)
        return self._clean

    def _metric(self, logits, sl: slice, reference=None) -> np.ndarray:
        sub = self.prompts.subset(list(range(sl.start, sl.stop)))
        if self.metric == "kl" and reference is None:
            reference = run_batched(self.model, sub.input_ids, sub.attention_mask).logits
        out = self.task.metric(self.metric, logits, sub, reference_logits=reference)
        return out.detach().to("cpu", torch.float64).numpy()

    # -- values --------------------------------------------------------------------

    def _index(self, position: Position, rows: np.ndarray) -> torch.Tensor | None:
        """Token indices of `position` in the given prompts ([N]); None for `all`."""
        if position.is_all:
            return None
        return position_index(self.prompts, position)[torch.as_tensor(rows)]

    def _plain(self, site, rows: np.ndarray) -> torch.Tensor:
        return self.cache.get(site)[torch.as_tensor(rows)]

    def _remainder(self, site, rows: np.ndarray, mode: str) -> torch.Tensor:
        """What unclaimed paths give a site: its plain value on `rows`, the mean, or zero."""
        if mode == "resample":
            return self._plain(site, rows)
        full = self.cache.get(site)
        n, t = len(rows), full.shape[1]
        if mode == "mean":
            return self.cache.mean(site).unsqueeze(0).expand(n, t, -1).clone()
        if mode == "zero":
            return torch.zeros(n, t, full.shape[2], dtype=full.dtype)
        raise ExecutionError(f"unknown ablation {mode!r}", hint="use resample, mean or zero")

    def _child_value(self, graph: InterventionGraph, c: int, insts: dict) -> torch.Tensor:
        """A child's value, laid out in its own prompt's positions."""
        node, inst = graph.node(c), insts[c]
        if inst.value is not None:
            return inst.value
        site = self._input_site(node.site) if node.role == "input" else self._sender_site(node.site)
        return self._plain(site, inst.rows)

    def _input_site(self, site):
        return self.final if isinstance(site, Logits) else site

    def _channel_site(self, site, channel):
        """The input site of a node through a channel: a head's q/k/v, an MLP's input."""
        if isinstance(site, Head):
            return site.with_channel(channel)
        if isinstance(site, Mlp):
            return MlpIn(site.layer)
        return self.final

    def _sender_site(self, site):
        return site.with_channel(Channel.OUT) if isinstance(site, Head) else site

    # -- the work ------------------------------------------------------------------

    def sites_needed(self, graph: InterventionGraph) -> list:
        sites = [self.final]
        for n in graph.graph.nodes:
            node = graph.node(n)
            if node.role == "sender":
                sites.append(self._sender_site(node.site))
                for _, t in graph.children(n):
                    sites.append(self._channel_site(node.site, t.channel))
            elif node.role == "input":
                sites.append(self._input_site(node.site))
        return sites

    def scrub(self, graph: InterventionGraph, *, seed: int) -> ScrubResult:
        """Scrubbed per-reference metric values for one graph (every prompt a reference)."""
        self.cache.ensure(self.sites_needed(graph))
        rng = np.random.default_rng(seed)
        sampler = Sampler(self.prompts, rng, same_length=True)
        refs = np.arange(len(self.prompts.input_ids))
        given = tuple(graph.given)

        # top-down: the prompt each node runs on, and its remainder prompt
        insts: dict[int, _Inst] = {}
        for v in reversed(graph.postorder()):  # parents before children
            node = graph.node(v)
            parent = graph.parent(v)
            rows = refs if parent is None else sampler.agree(insts[parent].rows, node.features)
            remainder = sampler.agree(rows, given) if not graph.is_leaf(v) or parent is None else rows
            insts[v] = _Inst(rows=rows, remainder=remainder)

        # bottom-up, one batched pass per height: nodes with children
        heights: dict[int, list[int]] = {}
        for v in graph.graph.nodes:
            if v != graph.root and not graph.is_leaf(v):
                heights.setdefault(graph.height(v), []).append(v)
        passes = 0
        for h in sorted(heights):
            self._level_pass(graph, heights[h], insts)
            passes += 1
        scrubbed = self._root_pass(graph, insts)
        passes += 1
        self.passes += passes
        return ScrubResult(scrubbed, passes, {v: insts[v].rows for v in insts})

    def _assemble(self, graph, v: int, insts, channel, input_site) -> torch.Tensor | None:
        """Node `v`'s input through `channel`, laid out in its prompt's positions [N, T, D].

        None when no claim concerns this channel: the node then reads it on its own
        prompt, which its forward pass computes by itself. Otherwise the channel
        starts from the remainder (random prompt / mean / zero) and each claimed child
        replaces, at its position, what its site contributes there.
        """
        kids = [(c, t) for c, t in graph.children(v) if t.channel == channel]
        if not kids:
            return None
        inst, mode = insts[v], graph.ablation
        value = self._remainder(input_site, inst.remainder, mode)
        # input leaves replace the channel's whole value at their position
        leaf_at: dict[Position, np.ndarray] = {}
        for c, t in kids:
            if graph.node(c).role == "input":
                self._place(value, self._child_value(graph, c, insts), t.position, inst.rows, insts[c].rows,
                            replace=True)
                leaf_at[t.position] = insts[c].rows
        # claimed senders swap their own contribution for the child's value
        for c, t in kids:
            if graph.node(c).role == "input":
                continue
            site = self._sender_site(graph.node(c).site)
            leaf_rows = leaf_at.get(t.position)
            if leaf_rows is None:
                base, base_rows = self._remainder(site, inst.remainder, mode), inst.rows
            else:
                base, base_rows = self._plain(site, leaf_rows), leaf_rows
            self._place(value, self._child_value(graph, c, insts), t.position, inst.rows, insts[c].rows,
                        minus=(base, base_rows))
        return value

    def _place(self, dest, src, position, dest_rows, src_rows, *, replace=False, minus=None):
        """dest[P] (+)= src[P] (- base[P]), each read where P is in its own prompt.

        `minus` is (base tensor, the prompts whose positions index it).
        """
        if position.is_all:
            delta = src if minus is None else src - minus[0]
            dest.copy_(src) if replace else dest.add_(delta)
            return
        ar = torch.arange(dest.shape[0])
        piece = src[ar, self._index(position, src_rows)]
        if minus is not None:
            piece = piece - minus[0][ar, self._index(position, minus[1])]
        td = self._index(position, dest_rows)
        if replace:
            dest[ar, td] = piece
        else:
            dest[ar, td] += piece

    def _level_pass(self, graph: InterventionGraph, nodes: list[int], insts) -> None:
        """Compute every node of one height in one batched forward pass."""
        from circuitlang.models import Patch

        n = len(self.prompts.input_ids)
        rows = np.concatenate([insts[v].rows for v in nodes])
        input_ids = self.prompts.input_ids[torch.as_tensor(rows)]
        attention_mask = self.prompts.attention_mask[torch.as_tensor(rows)]
        patch_values: dict = {}
        patch_rows: dict = {}
        for k, v in enumerate(nodes):
            node = graph.node(v)
            if isinstance(node.site, Head):
                channels = (Channel.Q, Channel.K, Channel.V)
            elif isinstance(node.site, Mlp):
                channels = (None,)
            else:
                raise ExecutionError(f"{node.site} cannot receive edges; heads, MLPs and logits can")
            for ch in channels:
                site = self._channel_site(node.site, ch)
                val = self._assemble(graph, v, insts, ch, site)
                if val is None:
                    continue
                if site not in patch_values:
                    patch_values[site] = torch.zeros(len(rows), *val.shape[1:], dtype=val.dtype)
                    patch_rows[site] = torch.zeros(len(rows), dtype=torch.bool)
                patch_values[site][k * n : (k + 1) * n] = val
                patch_rows[site][k * n : (k + 1) * n] = True
        capture = list(dict.fromkeys(self._sender_site(graph.node(v).site) for v in nodes))
        outs = {s: [] for s in capture}
        for sl in _chunks(len(rows), self.batch_size):
            patches = [Patch(s, val[sl], rows=patch_rows[s][sl]) for s, val in patch_values.items()]
            run = run_batched(self.model, input_ids[sl], attention_mask[sl], capture=capture, patches=patches)
            for s in capture:
                outs[s].append(run.cache[s].detach().to("cpu"))
        outs = {s: torch.cat(v) for s, v in outs.items()}
        for k, v in enumerate(nodes):
            insts[v].value = outs[self._sender_site(graph.node(v).site)][k * n : (k + 1) * n]

    def _root_pass(self, graph: InterventionGraph, insts) -> np.ndarray:
        """Rebuild the final residual stream of every reference prompt and read the metric."""
        from circuitlang.models import Patch

        root = graph.root
        value = self._assemble(graph, root, insts, None, self.final)
        if value is None:
            value = self._remainder(self.final, insts[root].remainder, graph.ablation)
        vals = []
        for sl in _chunks(len(value), self.batch_size):
            run = run_batched(
                self.model,
                self.prompts.input_ids[sl],
                self.prompts.attention_mask[sl],
                patches=[Patch(self.final, value[sl])],
            )
            vals.append(self._metric(run.logits, sl))
        return np.concatenate(vals)
