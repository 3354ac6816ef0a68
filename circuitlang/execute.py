"""Run intervention graphs on a model: causal scrubbing, level by level of the tree.

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
3. **Levels**: nodes with children are computed bottom-up, one tree height at a
   time, every such node and reference prompt a row. A row's inputs are assembled
   (each channel starts from the remainder; children's values replace what they
   contribute at their positions) and the node is computed from them alone by
   `execute_nodes.NodeKernels`: one head at the query its parent reads (keys up to
   it; the query's stream assembled at that token alone, the keys and values read
   from the head's projection of a plain stream wherever claims change that stream
   at a few tokens only: `_keys_or_values`), one MLP at the positions read. Rows
   with the same identity (site, sampled
   prompts, sub-tree: `Scrubber._row_keys`) are computed once and kept for later
   graphs. Where a kernel does not reproduce the model's forward pass (checked once
   per model), that kind of node runs as patched forward passes instead.
4. **Root**: the final residual stream of each reference prompt is rebuilt the same
   way and unembedded where the metric reads it (or, where that kernel is not used,
   by a forward pass with the final stream patched).

The plain captures, resampling and positions live in `execute_inputs.py`.

Every resample agrees with its parent prompt on token length, so that whole
sequences line up; values at named positions are still moved by name (IOI's S2
sits at different indices in different templates of the same length). For IOI
this keeps random resamples among templates of the same length, a documented
departure from resampling over the whole distribution.
"""
from __future__ import annotations

import itertools

from dataclasses import dataclass, field

import numpy as np
import torch

from circuitlang import topology
from circuitlang.errors import ExecutionError

# the inputs of scrubbing live in execute_inputs; these names are this module's too
from circuitlang.execute_inputs import (  # noqa: F401
    DEFAULT_BATCH,
    PlainCache,
    Sampler,
    _chunks,
    claimed_positions,
    metric_columns,
    metric_positions,
    metric_reads,
    position_index,
    run_batched,
    spread_columns,
)
from circuitlang.execute_nodes import NodeKernels, Work
from circuitlang.ir import ABLATION_MODES
from circuitlang.ir_to_graph import InterventionGraph, enters
from circuitlang.sites import (
    ALL,
    Channel,
    Head,
    Latent,
    LatentIn,
    Logits,
    Mlp,
    MlpIn,
    Neuron,
    Position,
    Resid,
    Subspace,
    Written,
)

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
    # computed nodes: [N, D] where the parent reads one named position (the value there),
    # [N, T, D] where it reads every position; leaves read the cache
    value: torch.Tensor | None = None
    keys: tuple | None = None  # two uint64 [N] lanes: what the row is (see `Scrubber._row_keys`)
    home: tuple | None = None  # (the level's tensor `value` is rows of, its first row there)


@dataclass
class ScrubResult:
    """Per-reference metric values, what it took, and the prompts every node was given.

    Attributes:
        scrubbed: the metric per reference prompt [N].
        passes: batched forward passes this graph took part in.
        rows: node -> the prompt index it ran on, per reference [N].
        remainders: node -> the prompt its unclaimed paths came from, per reference
            (only for nodes that read a remainder; the root's too).
    """

    scrubbed: np.ndarray
    passes: int
    rows: dict = field(default_factory=dict)
    remainders: dict = field(default_factory=dict)


#: Graphs evaluated together keep at most this many floats of node values in memory
#: (values are [prompts, tokens, d_model] per computed node); more graphs are split.
VALUE_BUDGET = 2**26

#: Rows already computed are kept (and reused by later graphs with identical rows:
#: the per-claim breakdown, the permutation test) up to this many floats.
MEMO_BUDGET = 2**27

#: Many graphs scrubbed together capture every site they read in one pass while those
#: values (one [prompts, tokens, d_model] tensor a site; a layer's head inputs share one)
#: fit in this many floats.
CAPTURE_BUDGET = 2**28

#: Heads' keys and values projected from plain streams for every prompt (`_projection`)
#: are kept up to this many floats; beyond it a head's keys and values are projected
#: from each row's assembled stream.
PROJECTION_BUDGET = 2**27

#: Floats of streams one chunk of kernel rows assembles ([rows, tokens, d_model]); a
#: chunk holds at least the batch size of rows. Rows read at one position are small, and
#: many of them in one chunk share the chunk's fixed cost.
KERNEL_BUDGET = 2**24

#: A computed row's id is its chunk's place among the stored chunks times this, plus its
#: index in the chunk.
_STRIDE = 2**32

#: Floats of logits one chunk of the root pass holds ([rows, tokens, vocab]).
LOGITS_BUDGET = 2**24

_MASK = (1 << 64) - 1


_GOLDEN, _MUL1, _MUL2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_LANE_SALT = np.array([1, 2], dtype=np.uint64)[:, None, None]  # lane 0 adds 1 to a column, lane 1 adds 2
#: A row's key in the memo: its two 64-bit lanes as 16 bytes. Bytes, unlike tuples, are
#: not tracked by the garbage collector, so neither is a memo of millions of them.
_ROW_KEY = np.dtype((np.void, 16))


def _mix(x):
    """splitmix64's finaliser on uint64 arrays (at least 1-d: array arithmetic wraps
    around silently, as the hash wants; numpy warns only on scalars)."""
    x = np.atleast_1d(np.asarray(x, dtype=np.uint64)) + _GOLDEN
    x = (x ^ (x >> _S30)) * _MUL1
    x = (x ^ (x >> _S27)) * _MUL2
    return x ^ (x >> _S31)


def _gather_at(values: torch.Tensor, rows: np.ndarray, token: torch.Tensor) -> torch.Tensor:
    """values[rows[i], token[i]] for every i ([len(rows), D]), by one flat gather."""
    n, t = values.shape[:2]
    flat = torch.as_tensor(rows, dtype=torch.long) * t + token.to(torch.long)
    return values.reshape(n * t, -1).index_select(0, flat)


def _put(dest: torch.Tensor, hit: torch.Tensor | None, src: torch.Tensor, add: bool = False) -> None:
    """dest (+)= src on the rows `hit` ([rows] bools; None: every row), in place."""
    if hit is None:
        dest.add_(src) if add else dest.copy_(src)
    elif add:
        dest.add_(src * hit.unsqueeze(-1).to(src.dtype))
    else:
        dest.copy_(torch.where(hit.unsqueeze(-1), src, dest))


def _kernel(site) -> str | None:
    """The `NodeKernels` kernel that computes a node at `site`, if any (a subspace of a
    head's or an MLP's output: that head's or MLP's, then the projection)."""
    if isinstance(site, Subspace):
        return {"resid": "subspace", "head": "head", "mlp": "mlp"}[site.basis.hook]
    return "head" if isinstance(site, Head) else "mlp" if isinstance(site, Mlp) else None


def _owner(site):
    """The head or MLP whose kernel computes a node at `site` (a subspace of its output:
    that head or MLP); else the site itself."""
    if isinstance(site, Subspace):
        return topology.subspace_owner(site) or site
    return site


class Scrubber:
    """Evaluates intervention graphs for one model, task, prompt set and metric.

    The plain cache is shared by every graph evaluated with the same scrubber
    (the per-claim breakdown and the permutation test reuse it), and `scrub_many`
    evaluates many graphs in the same batched passes.
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
        self._clean: np.ndarray | None = None
        self._corrupt: PlainCache | None = None
        self.kernels = NodeKernels(model)
        self.work = Work()
        #: compute nodes with the kernels of `execute_nodes` where they reproduce the
        #: model (False: every node by a patched forward pass, as a reference)
        self.use_kernels = True
        #: compute identical rows once (False: every row, as a reference)
        self.use_memo = True
        #: assemble a chunk's alike head nodes together (False: node by node, as a reference)
        self.use_many = True
        self._memo: dict = {}  # row key -> row id (a place in _stores x _STRIDE + its index there)
        self._memo_floats = 0
        self._stores: list[torch.Tensor | None] = []  # chunks of computed rows
        self._levels_run = 0
        self._projections: dict = {}  # (stream, layer, key/value group, channel) -> [N, T, d_head]
        self._resample_groups: dict = {}  # the prompts' groups by features, for every graph's `Sampler`
        self._read_ahead: dict = {}  # id(graph) -> (graph, its reads), for the last call's `later`
        self._projection_floats = 0
        self._reads: torch.Tensor | None = None
        self._positions: dict = {}  # Position -> its token index in every prompt
        self._columns: torch.Tensor | None = None
        self._columns_known = False  # whether _columns has been asked of the metric

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
        where = self._positions.get(position)
        if where is None:
            where = self._positions[position] = position_index(self.prompts, position)
        return where.index_select(0, torch.as_tensor(rows))

    def _plain(self, site, rows: np.ndarray) -> torch.Tensor:
        return self.cache.get(site).index_select(0, torch.as_tensor(rows))

    def _remainder(self, site, rows: np.ndarray, mode: str) -> torch.Tensor:
        """What unclaimed paths give a site, by ablation: its plain value on `rows`
        (resample), on their counterfactuals (corrupt), its dataset mean (mean), or, with
        every sender zeroed (zero), what is left: nothing for a sender's output, the
        shared attention-output biases for an input stream."""
        if mode == "resample":
            return self._plain(site, rows)
        if mode == "corrupt":
            return self.corrupt_cache.get(site)[torch.as_tensor(rows)]
        full = self.cache.get(site)
        n, t = len(rows), full.shape[1]
        if mode == "mean":
            return self.cache.mean(site).unsqueeze(0).expand(n, t, -1).clone()
        if mode == "zero":
            out = torch.zeros(n, t, full.shape[2], dtype=full.dtype)
            bias = self._bias_stream(site)
            return out if bias is None else out + bias.to(out.dtype)
        raise ExecutionError(f"unknown ablation {mode!r}", hint="use " + ", ".join(ABLATION_MODES))

    def _bias_stream(self, site) -> torch.Tensor | None:
        """The part of an input stream that no sender writes: the attention output biases
        of the layers before it (each head's output excludes the shared bias). None for a
        sender's own output."""
        if isinstance(site, Head) and site.channel.is_input:
            layers = range(site.layer)
        elif isinstance(site, MlpIn):
            layers = range(site.layer + (0 if self.model.shape.parallel_residual else 1))
        elif isinstance(site, Resid):
            layers = range(site.layer)
        elif isinstance(site, LatentIn):  # its dictionary's hook point
            sae = site.sae
            layers = range(sae.layer) if sae.hook == "resid" else [sae.layer] if sae.hook == "attn" else ()
        else:
            return None
        total = None
        for layer in layers:
            bias = self.model.adapter.out_bias(layer)
            if bias is not None:
                total = bias.detach().to("cpu") if total is None else total + bias.detach().to("cpu")
        return total

    @property
    def corrupt_cache(self) -> PlainCache:
        """Plain activations of the task's counterfactual prompts (`ablation corrupt`)."""
        if self._corrupt is None:
            self._corrupt = PlainCache(self.model, self.prompts, batch_size=self.batch_size, which="corrupt")
        return self._corrupt

    def _child_value(self, graph: InterventionGraph, c: int, insts: dict, sel: np.ndarray,
                     channel=None) -> torch.Tensor:
        """A child's value for the references `sel`, laid out in its own prompts'
        positions (an input leaf's: the channel it replaces, on its own sample); a
        computed child read at a named position gives its value there ([len(sel), D])."""
        node, inst = graph.node(c), insts[c]
        if inst.value is not None:
            return inst.value[torch.as_tensor(sel)]
        if node.role == "input":
            return self._plain(self._leaf_site(node.site, channel), inst.rows[sel])
        return self._plain(self._sender_site(node.site), inst.rows[sel])

    def _input_site(self, site):
        return self.final if isinstance(site, Logits) else site

    def _leaf_site(self, site, channel):
        """What an input leaf at `site` gives the channel it enters (a pattern leaf: the
        query or the keys' stream, whichever `channel` is)."""
        site = self._input_site(site)
        if isinstance(site, Head) and site.channel is Channel.PATTERN:
            return site.with_channel(channel)
        return site

    @staticmethod
    def _leaf_position(transplant, channel) -> Position:
        """Where an input leaf replaces `channel`: its position (a pattern leaf: the keys
        at every position, its query at its own)."""
        if transplant.channel is Channel.PATTERN and channel is Channel.K:
            return ALL
        return transplant.position

    def _channel_site(self, site, channel):
        """The input site of a node through a channel: a head's q/k/v, an MLP's input."""
        if isinstance(site, Head):
            return site.with_channel(channel)
        if isinstance(site, (Mlp, Neuron)):  # a neuron reads its MLP's input
            return MlpIn(site.layer)
        if isinstance(site, Latent):
            return LatentIn(site.sae, site.index)
        if isinstance(site, Subspace):  # what its stream is, or what its head or MLP reads
            if site.basis.hook == "resid":
                return Resid(site.basis.layer)
            return self._channel_site(_owner(site), channel)
        return self.final

    def _sender_site(self, site):
        """What a sender adds into the stream: a head's output, a unit's write, else itself."""
        if isinstance(site, Head):
            return site.with_channel(Channel.OUT)
        if isinstance(site, (Neuron, Latent, Subspace)):
            return Written(site)
        return site

    # -- the work ------------------------------------------------------------------

    def sites_needed(self, graph: InterventionGraph) -> list:
        """Every site whose plain value the graph reads: senders' outputs (leaf values,
        and what they contribute to a remainder), the inputs of nodes with children (the
        remainder), input leaves' channels, and the final stream."""
        sites = [self.final]
        for n in graph.graph.nodes:
            node = graph.node(n)
            if node.role == "sender":
                sites.append(self._sender_site(node.site))
                for channel in graph.input_channels(n):
                    if graph.reads_from_remainder(n, channel):
                        sites.append(self._channel_site(node.site, channel))
            elif node.role == "input":
                site = self._input_site(node.site)
                if isinstance(site, Head) and site.channel is Channel.PATTERN:
                    sites += [site.with_channel(Channel.Q), site.with_channel(Channel.K)]
                else:
                    sites.append(site)
        return sites

    def scrub(self, graph: InterventionGraph, *, seed: int) -> ScrubResult:
        """Scrubbed per-reference metric values for one graph (every prompt a reference)."""
        return self.scrub_many([graph], seed=seed)[0]

    def scrub_many(self, graphs: list[InterventionGraph], *, seed: int, progress=None,
                   on_level=None, later: list[InterventionGraph] = ()) -> list[ScrubResult]:
        """Scrub many graphs, level by level of their trees, all graphs of a group at once.

        Each graph draws its resamples from its own generator seeded with `seed`, so a
        graph scores the same alone or among others. Graphs are taken in groups whose
        node values fit `VALUE_BUDGET`. A row (one node on one reference prompt) that is
        identical to one computed before, in this call or an earlier one, is not
        computed again (see `_row_keys`).

        Args:
            graphs: intervention graphs over this scrubber's model and prompts.
            seed: the resampling seed (the same for every graph).
            progress: called with the number of graphs finished after each group.
            on_level: called as `on_level(done, total, what)` after each tree level
                (`done` and `total` in rows of the current group).
            later: graphs to be scrubbed by a later call (the permutation test's random
                circuits): what they read is captured in this call's pass where it fits
                `CAPTURE_BUDGET` with this call's own, so that the later call runs none.
        """
        results: list[ScrubResult | None] = [None] * len(graphs)
        done = 0
        reads = [self._graph_reads(g) for g in graphs]
        ahead = [self._graph_reads(g) for g in later]
        self._read_ahead = {id(g): (g, sites) for g, sites in zip(later, ahead)}
        if not (ahead and self._capture_up_front(list(graphs) + list(later), reads + ahead)):
            self._capture_up_front(graphs, reads)
        for group in self._groups(graphs):
            sites = [s for i in group for s in reads[i]]
            self.cache.ensure(sites)
            if any(graphs[i].ablation == "corrupt" for i in group):
                self.corrupt_cache.ensure(sites)
            insts = {i: self._sample(graphs[i], seed) for i in group}
            heights: dict[int, list[tuple[int, int]]] = {}
            for i in group:
                g = graphs[i]
                for v in g.graph.nodes:
                    if v != g.root and not g.is_leaf(v):
                        heights.setdefault(g.height(v), []).append((i, v))
            n = len(self.prompts.input_ids)
            total = n * (sum(len(items) for items in heights.values()) + len(group))
            finished = 0
            passes = 0
            for step, h in enumerate(sorted(heights), 1):
                items = [(graphs[i], v, insts[i]) for i, v in heights[h]]
                passes += self._level(items)
                finished += n * len(items)
                self.work.levels.append((h, len(items) * n))
                if on_level is not None:
                    on_level(finished, total, f"tree level {step} of {len(heights)}")
            scrubbed = self._root_pass([(graphs[i], insts[i]) for i in group])
            passes += 0 if self._direct("logits") else 1
            if on_level is not None:
                on_level(total, total, "logits")
            self.passes += passes
            for i, values in zip(group, scrubbed):
                g, inst = graphs[i], insts[i]
                remainders = {v: inst[v].remainder for v in inst
                              if v == g.root or any(g.reads_from_remainder(v, c) for c in g.input_channels(v))}
                results[i] = ScrubResult(values, passes, {v: inst[v].rows for v in inst}, remainders)
            done += len(group)
            if progress is not None:
                progress(done)
        return results

    def _graph_reads(self, graph: InterventionGraph) -> list:
        """The sites a graph reads (`sites_needed`, and its nodes' own channels), found
        once for a graph the previous call was given as `later`."""
        known = self._read_ahead.pop(id(graph), None)
        if known is not None and known[0] is graph:
            return known[1]
        return self.sites_needed(graph) + self._own_channel_sites(graph)

    def _capture_up_front(self, graphs: list[InterventionGraph], reads: list[list]) -> bool:
        """Capture what every graph reads (`reads[i]`: graph i's sites) in one pass (one per
        cache), when it fits `CAPTURE_BUDGET`; else each group of graphs captures what it
        lacks. Many graphs (the permutation test's random circuits) would otherwise cost a
        capture pass per group, each for the few heads it adds. Gives whether it captured."""
        if len(graphs) < 2:
            return False
        sites = list(dict.fromkeys(s for sites in reads for s in sites))
        missing = [s for s in sites if s not in self.cache.values]
        streams = {self._capture_key(s) for s in missing}
        n, t = self.prompts.input_ids.shape
        if len(streams) * n * t * self.model.shape.d_model > CAPTURE_BUDGET:
            return False
        self.cache.ensure(sites)
        if any(g.ablation == "corrupt" for g in graphs):
            self.corrupt_cache.ensure(sites)
        return True

    @staticmethod
    def _capture_key(site):
        """Sites a plain pass captures as one tensor (`PlainCache.ensure`): a head's q, k
        and v inputs are the stream entering its block."""
        if isinstance(site, Head) and site.channel in (Channel.Q, Channel.K, Channel.V):
            return Resid(site.layer)
        return site

    def _own_channel_sites(self, graph: InterventionGraph) -> list:
        """Input sites the kernels read on a node's own prompt: channels of nodes with
        children that do not start from the remainder (`semantics channels`)."""
        sites = []
        for v in graph.graph.nodes:
            node = graph.node(v)
            if v == graph.root or graph.is_leaf(v):
                continue
            for channel in graph.input_channels(v):
                if not graph.reads_from_remainder(v, channel):
                    sites.append(self._channel_site(node.site, channel))
        return sites

    def _groups(self, graphs: list[InterventionGraph]) -> list[list[int]]:
        """Consecutive groups of graph indices whose computed node values fit the budget
        (a node read at one named position keeps [prompts, d_model]; at every position
        [prompts, tokens, d_model])."""
        n, t = self.prompts.input_ids.shape
        d = self.model.shape.d_model
        groups: list[list[int]] = [[]]
        used = 0
        for i, g in enumerate(graphs):
            cost = n * t * d  # the root's stream while it is rebuilt
            for v in g.graph.nodes:
                if v != g.root and not g.is_leaf(v):
                    cost += n * d * (t if self._out_position(g, v).is_all else 1)
            if groups[-1] and used + cost > VALUE_BUDGET:
                groups.append([])
                used = 0
            groups[-1].append(i)
            used += cost
        return [grp for grp in groups if grp]

    def _sample(self, graph: InterventionGraph, seed: int) -> dict[int, _Inst]:
        """Top-down: the prompt each node runs on, and its remainder prompt."""
        rng = np.random.default_rng(seed)
        sampler = Sampler(self.prompts, rng, same_length=True, groups=self._resample_groups)
        refs = np.arange(len(self.prompts.input_ids))
        given = tuple(graph.given)
        insts: dict[int, _Inst] = {}
        for v in reversed(graph.postorder()):  # parents before children
            node = graph.node(v)
            parent = graph.parent(v)
            rows = refs if parent is None else sampler.agree(insts[parent].rows, node.features)
            if graph.ablation == "corrupt" or (graph.is_leaf(v) and parent is not None):
                remainder = rows  # a leaf needs none; `corrupt`: the node's own counterfactual
            else:
                remainder = sampler.agree(rows, given)
            insts[v] = _Inst(rows=rows, remainder=remainder)
        return insts

    def _assemble(self, graph, v: int, insts, channel, input_site, sel: np.ndarray) -> torch.Tensor | None:
        """Node `v`'s input through `channel` for the references `sel`, laid out in the
        node's prompts' positions [len(sel), T, D].

        None when the node reads this channel on its own prompt, which its forward pass
        computes by itself (a leaf; or, with `semantics channels`, a channel no claim
        mentions). Otherwise the channel starts from the remainder (its value on the
        random prompt, the mean, or zero): input leaves replace it whole at their
        positions (a pattern leaf: the query at its position, the keys everywhere), and
        each claimed sender replaces, at its position, what its site contributes there.
        """
        if not graph.reads_from_remainder(v, channel):
            return None
        kids = [(c, t) for c, t in graph.children(v) if enters(t, channel)]
        inst, mode = insts[v], graph.ablation
        rows, remainder = inst.rows[sel], inst.remainder[sel]
        leaves = []  # (position, the leaf's prompts, its value), in order
        for c, t in kids:
            if graph.node(c).role != "input":
                continue
            leaves.append((self._leaf_position(t, channel), insts[c].rows[sel],
                           self._child_value(graph, c, insts, sel, channel)))
        covered = [(position, kid_rows) for position, kid_rows, _ in leaves]  # where leaves replaced it
        value = self._covered(leaves, lambda: self._remainder(input_site, remainder, mode), rows)
        # claimed senders, those read at every position first, so that a claim at a named
        # position refines one at `all` there instead of adding the site twice
        current: dict = {}  # site -> what it contributes to the channel as it stands
        senders = [(c, t) for c, t in kids if graph.node(c).role != "input"]
        for c, t in sorted(senders, key=lambda item: not item[1].position.is_all):
            site = self._sender_site(graph.node(c).site)
            base = current.get(site)
            if base is None:
                # its remainder value, and where an input leaf replaced the channel, its
                # value on the leaf's prompt
                base = self._covered([(position, kid_rows, None) for position, kid_rows in covered],
                                     lambda site=site: self._remainder(site, remainder, mode), rows, site)
                current[site] = base
            child = self._child_value(graph, c, insts, sel)
            kid_rows = insts[c].rows[sel]
            at = insts[c].value is not None  # a computed child holds its value at its position
            self._place(value, child, t.position, rows, kid_rows, minus=(base, rows), at=at)
            self._place(base, child, t.position, rows, kid_rows, replace=True, at=at)
        return value

    def _covered(self, leaves: list, start, rows: np.ndarray, site=None) -> torch.Tensor:
        """A channel (or, with `site`, that site's contribution to it) as input leaves leave
        it: `start()` (a fresh tensor: the remainder's), each leaf's value replacing it at
        its position in order (`site`: the site's plain value on the leaf's prompts). A
        leaf at every position replaces all before it, so the value starts from the last
        such leaf instead of being gathered and overwritten."""
        last = max((i for i, (position, _, _) in enumerate(leaves) if position.is_all), default=None)

        def leaf_value(i):
            _, kid_rows, val = leaves[i]
            return self._plain(site, kid_rows) if site is not None else val

        if last is None:
            value, rest = start(), range(len(leaves))
        else:
            value = leaf_value(last)  # a fresh gather, ours to write
            rest = range(last + 1, len(leaves))
        for i in rest:
            position, kid_rows, _ = leaves[i]
            self._place(value, leaf_value(i), position, rows, kid_rows, replace=True)
        return value

    def _place(self, dest, src, position, dest_rows, src_rows, *, replace=False, minus=None, at=False):
        """dest[P] (+)= src[P] (- base[P]), each read where P is in its own prompt.

        `minus` is (base tensor, the prompts whose positions index it); `at`: `src`
        is already the value at P ([B, D]).
        """
        if position.is_all:
            delta = src if minus is None else src - minus[0]
            dest.copy_(src) if replace else dest.add_(delta)
            return
        ar = torch.arange(dest.shape[0])
        piece = src if at else src[ar, self._index(position, src_rows)]
        if minus is not None:
            piece = piece - minus[0][ar, self._index(position, minus[1])]
        td = self._index(position, dest_rows)
        if replace:
            dest[ar, td] = piece
        else:
            dest[ar, td] += piece

    # -- one token per row: what a node read at a named position needs -----------------

    def _assemble_at(self, graph, v: int, insts, channel, input_site, sel: np.ndarray,
                     token: torch.Tensor) -> torch.Tensor | None:
        """`_assemble` at one token of each row ([len(sel), D]): `token` [len(sel)] is the
        index, in the node's own prompts, where the node is read (a head's query, an MLP
        or a subspace read at a named position). It places exactly what `_assemble` places,
        at that token only, and gathers nothing else (`_assemble_at_many` for one node)."""
        plan = self._channel_plan(graph, v, insts, channel)
        if plan is None:
            return None
        signature, parts = plan
        return self._assemble_at_many([(insts, v, sel, parts)], input_site, signature, graph.ablation, token)

    def _plain_at(self, site, rows: np.ndarray, token: torch.Tensor) -> torch.Tensor:
        """A site's plain value on `rows` at one token each ([len(rows), D])."""
        return _gather_at(self.cache.get(site), rows, token)

    def _remainder_at(self, site, rows: np.ndarray, mode: str, token: torch.Tensor) -> torch.Tensor:
        """`_remainder` at one token of each row ([len(rows), D])."""
        if mode == "resample":
            return self._plain_at(site, rows, token)
        if mode == "corrupt":
            return _gather_at(self.corrupt_cache.get(site), rows, token)
        if mode == "mean":
            return self.cache.mean(site)[token].clone()
        if mode == "zero":
            full = self.cache.get(site)
            out = torch.zeros(len(rows), full.shape[-1], dtype=full.dtype)
            bias = self._bias_stream(site)
            return out if bias is None else out + bias.to(out.dtype)
        raise ExecutionError(f"unknown ablation {mode!r}", hint="use " + ", ".join(ABLATION_MODES))

    def _child_at(self, graph: InterventionGraph, c: int, insts: dict, sel: np.ndarray,
                  token: torch.Tensor) -> torch.Tensor:
        """A sender child's value for the references `sel` at one token of its own prompts
        ([len(sel), D]; a computed child read at a named position holds only that)."""
        inst = insts[c]
        if inst.value is not None:
            value = inst.value[torch.as_tensor(sel)]
            return value if value.dim() == 2 else value[torch.arange(len(sel)), token]
        return self._plain_at(self._sender_site(graph.node(c).site), inst.rows[sel], token)

    # -- levels: identical rows once, each by its kernel ------------------------------

    def _out_position(self, graph: InterventionGraph, v: int) -> Position:
        """Where node `v`'s parent reads it."""
        parent = graph.parent(v)
        return ALL if parent is None else graph.graph.edges[v, parent]["transplant"].position

    def _direct(self, kind: str | None) -> bool:
        """Whether `kind`'s kernel ("head", "mlp", "logits") is used for this model (None:
        a node no kernel computes, such as a latent, runs as patched forward passes)."""
        if kind == "subspace":  # a projection of the rebuilt stream: no forward pass reproduces it
            return True
        # (a subspace of a head's or an MLP's output: that kernel's, else a forward pass)
        return kind is not None and self.use_kernels and self.kernels.verify(kind, self.prompts)

    def _row_keys(self, graph: InterventionGraph, v: int, insts: dict) -> tuple:
        """What each row of node `v` is, as two 64-bit hash lanes [N] (2^-128 odds of two
        different rows colliding): its site, where its parent reads it, the ablation,
        its prompt and remainder prompt, and each child's way in and key. Rows with equal
        keys have equal inputs, hence equal values."""
        static, cols = self._key_parts(graph, v, insts)
        return self._hash_rows([static], [cols])[0]

    def _key_parts(self, graph: InterventionGraph, v: int, insts: dict) -> tuple:
        """What `_row_keys` hashes for node `v`: (what is the same on every row, the
        per-row columns), its children's keys computed first where they are missing."""
        node, inst = graph.node(v), insts[v]
        kids = graph.children(v)
        if not kids:  # a leaf is its plain value on its own prompt
            return ("leaf", node.site, node.role), [inst.rows]
        static = ("node", node.site, self._out_position(graph, v), graph.ablation, graph.semantics,
                  tuple(graph.given), tuple(t for _, t in kids))
        cols = [inst.rows, inst.remainder]
        for c, _ in kids:
            if insts[c].keys is None:
                insts[c].keys = self._row_keys(graph, c, insts)
            cols += list(insts[c].keys)
        return static, cols

    @staticmethod
    def _hash_rows(statics: list, columns: list) -> list[tuple]:
        """`_row_keys` of many nodes: each node's two lanes [N] from its static part and
        its columns, the nodes with as many columns hashed together (one chain of mixes
        for all of them)."""
        out: list = [None] * len(statics)
        by_width: dict = {}
        for i, cols in enumerate(columns):
            by_width.setdefault(len(cols), []).append(i)
        for width, which in by_width.items():
            stacked = np.stack([np.stack([c.astype(np.uint64) for c in columns[i]]) for i in which])  # [K, cols, N]
            # both lanes at once: lane L hashes each column as mix(col + L + 1), then chains
            mixed = _mix(stacked[None] + _LANE_SALT[:, None])  # [2, K, cols, N]
            base = [hash(statics[i]) for i in which]  # (a tuple's hash is one of its items' hashes)
            seeds = _mix(np.array([[hash((b, lane)) & _MASK for b in base] for lane in (0, 1)],
                                  dtype=np.uint64))  # [2, K]
            h = np.repeat(seeds[:, :, None], stacked.shape[-1], axis=2)  # [2, K, N]
            for j in range(width):
                h = _mix(h ^ mixed[:, :, j])
            for k, i in enumerate(which):
                out[i] = (h[0, k], h[1, k])
        return out

    def _level(self, items: list[tuple[InterventionGraph, int, dict]]) -> int:
        """Compute every (graph, node) of one height for every reference prompt; gives the
        number of forward passes it took (0 when the kernels cover every node).

        The rows' bookkeeping runs over whole arrays, not row by row: each row's key
        (`_row_keys`) is looked up in the memo, the rows neither there nor seen earlier in
        this level are computed in chunks by site (in order of first appearance), and
        every node's value is gathered from the chunks that hold its rows."""
        for graph, v, _ in items:
            if not graph.input_channels(v):
                raise ExecutionError(f"{graph.node(v).site} cannot receive edges; heads, MLPs, SAE latents "
                                     "and logits can")
        direct = [it for it in items if self._direct(_kernel(it[0].node(it[1]).site))]
        chosen = {id(it) for it in direct}
        forward = [it for it in items if id(it) not in chosen]
        if forward:
            self._forward_level(forward)
        if not direct:
            return int(bool(forward))
        n = len(self.prompts.input_ids)
        self._levels_run += 1
        keys: list = []  # one key per row, item after item (row i: item i // n, reference i % n)
        leaves = [(graph, c, insts) for graph, v, insts in direct for c, _ in graph.children(v)
                  if insts[c].keys is None and graph.is_leaf(c)]
        for (graph, c, insts), lanes in zip(leaves, self._hash_rows(
                [self._key_parts(*leaf)[0] for leaf in leaves], [[insts[c].rows] for _, c, insts in leaves])):
            insts[c].keys = lanes
        parts = [self._key_parts(graph, v, insts) for graph, v, insts in direct]
        hashed = self._hash_rows([p[0] for p in parts], [p[1] for p in parts])
        for k, (graph, v, insts) in enumerate(direct):
            insts[v].keys = hashed[k]
            if self.use_memo:  # a row's two lanes as one bytes object (`_ROW_KEY`)
                keys += np.stack(insts[v].keys, 1).view(_ROW_KEY).ravel().tolist()
            else:  # every row its own
                keys += zip(itertools.repeat(self._levels_run), itertools.repeat(k), range(n))
        memo = self._memo if self.use_memo else {}
        found = np.fromiter(map(memo.get, keys, itertools.repeat(-1)), dtype=np.int64, count=len(keys))
        missing = np.flatnonzero(found < 0)
        missed = [keys[i] for i in missing.tolist()]
        first = dict(zip(reversed(missed), reversed(missing.tolist())))  # key -> its first row
        todo = np.sort(np.fromiter(first.values(), dtype=np.int64, count=len(first)))
        self.work.reused += len(keys) - len(todo)
        # the rows to compute, by site and where the parent reads them (every position or
        # one), in order of first appearance; within a site in row order
        group_of: dict = {}
        item_group = np.array([group_of.setdefault((g.node(v).site, self._out_position(g, v).is_all), len(group_of))
                               for g, v, _ in direct], dtype=np.int64)
        groups = list(group_of)
        row_group = item_group[todo // n]
        firsts = np.unique(row_group, return_index=True)[1]
        rank = np.empty(len(groups), dtype=np.int64)
        rank[row_group[np.sort(firsts)]] = np.arange(len(firsts))
        todo = todo[np.argsort(rank[row_group], kind="stable")]
        row_group = item_group[todo // n]
        t, d = self.prompts.input_ids.shape[1], self.model.shape.d_model
        size = max(self.batch_size, KERNEL_BUDGET // (t * d))
        pending: dict = {}  # key -> where this level computed it
        local: list[int] = []  # stores of this level the memo keeps nothing of
        bounds = np.flatnonzero(np.diff(row_group)) + 1
        for rows in np.split(todo, bounds) if len(todo) else []:
            site, every = groups[int(item_group[rows[0] // n])]
            for start in range(0, len(rows), size):
                chunk = rows[start:start + size]
                out = self._compute(direct, site, every, chunk // n, chunk % n)
                where = self._store(out)
                ids = (where * _STRIDE + np.arange(len(chunk), dtype=np.int64)).tolist()
                chunk_keys = [keys[i] for i in chunk.tolist()]
                pending.update(zip(chunk_keys, ids))
                kept = self._remember(chunk_keys, ids, out) if self.use_memo else 0
                if not kept:
                    local.append(where)
        if len(missing):
            found[missing] = np.fromiter(map(pending.__getitem__, missed), dtype=np.int64, count=len(missed))
        self._gather_values(direct, found, n)
        for where in local:  # rows only this level reads
            self._stores[where] = None
        for graph, v, insts in items:  # children's values are read: let them go
            for c, _ in graph.children(v):
                insts[c].value = insts[c].home = None
        return int(bool(forward))

    def _store(self, out: torch.Tensor) -> int:
        """Hold a chunk of computed rows; gives its place (a row's id is place x _STRIDE +
        its index in the chunk)."""
        if len(out) >= _STRIDE:  # pragma: no cover - KERNEL_BUDGET keeps chunks far smaller
            raise ExecutionError(f"a chunk of {len(out)} kernel rows is more than {_STRIDE}")
        self._stores.append(out)
        return len(self._stores) - 1

    def _remember(self, keys: list, ids: list, out: torch.Tensor) -> int:
        """Put a chunk's rows in the memo while it has room (`MEMO_BUDGET`); gives how many."""
        per_row = out[0].numel() if len(out) else 1
        room = max(0, (MEMO_BUDGET - self._memo_floats) // per_row)
        kept = min(room, len(keys))
        self._memo.update(zip(keys[:kept], ids[:kept]))
        self._memo_floats += kept * per_row
        return kept

    def _gather_values(self, direct: list, ids: np.ndarray, n: int) -> None:
        """Each node's value [n, ...] from the stores holding its rows (`ids`, item after
        item): one gather a store for the nodes whose values have one shape."""
        shapes: dict = {}
        for k, (graph, v, insts) in enumerate(direct):
            shapes.setdefault(self._out_position(graph, v).is_all, []).append(k)
        for ks in shapes.values():
            ks_arr = np.asarray(ks, dtype=np.int64)
            rows = (ks_arr[:, None] * n + np.arange(n)).reshape(-1)
            mine = ids[rows]
            place, index = mine // _STRIDE, mine % _STRIDE
            sample = self._stores[int(place[0])]
            out = torch.empty(len(rows), *sample.shape[1:], dtype=sample.dtype)
            order = np.argsort(place, kind="stable")
            bounds = np.flatnonzero(np.diff(place[order])) + 1
            for part in np.split(order, bounds):
                store = self._stores[int(place[part[0]])]
                out.index_copy_(0, torch.as_tensor(part), store.index_select(0, torch.as_tensor(index[part])))
            for j, k in enumerate(ks):
                graph, v, insts = direct[k]
                insts[v].value = out[j * n:(j + 1) * n]
                insts[v].home = (out, j * n)

    def _compute(self, items: list, site, every: bool, ks: np.ndarray, refs: np.ndarray) -> torch.Tensor:
        """Rows of nodes at `site` (row j: item `ks[j]` on reference `refs[j]`), by the
        kernel: [B, D] at the position each parent reads, or [B, T, D] when `every`.

        A channel read at the query alone (a head's query; an MLP's or a subspace's input
        read at a named position) is assembled at that token only. A head's keys and
        values come, where `_sparse_channel` finds the stream to be one plain stream
        with a few tokens changed, from that stream's keys or values projected once for
        every prompt (`_projection`), with only the changed tokens projected anew."""
        inputs: dict = {}
        rows_in = len(refs)
        prompt_rows = np.empty(rows_in, dtype=np.int64)
        query = torch.empty(rows_in, dtype=torch.long)
        owner = _owner(site)  # the head or MLP that computes it (a subspace of its output: then projected)
        head = isinstance(owner, Head)
        changed: dict = {Channel.K: [], Channel.V: []}  # (chunk rows, token, stream) to project anew
        together: dict = {}  # a head's nodes read at one position, by how they are assembled
        for k in dict.fromkeys(ks.tolist()):
            graph, v, insts = items[k]
            here = np.flatnonzero(ks == k)
            sel = refs[here]
            rows = insts[v].rows[sel]
            prompt_rows[here] = rows
            plan = self._node_plan(graph, v, insts) if head and not every and self.use_many else None
            if plan is not None:
                together.setdefault(plan[0], []).append((k, here, sel, plan[1]))
                continue
            at = None
            if not every:
                at = self._index(self._out_position(graph, v), rows)
                query[torch.as_tensor(here)] = at
            for ch in graph.input_channels(v):
                channel_site = self._channel_site(site, ch)
                if head and ch in (Channel.K, Channel.V):  # as keys or values [n, T, d_head]
                    mine: list = []
                    val = self._keys_or_values(graph, v, insts, ch, channel_site, sel, mine)
                    changed[ch] += [(here, token, stream) for token, stream in mine]
                elif at is not None:  # read at the query alone
                    val = self._assemble_at(graph, v, insts, ch, channel_site, sel, at)
                    if val is None:
                        val = self._plain_at(channel_site, rows, at)
                else:
                    val = self._assemble(graph, v, insts, ch, channel_site, sel)
                    if val is None:  # read on the node's own prompt
                        val = self._plain(channel_site, rows)
                if ch not in inputs:
                    inputs[ch] = torch.empty(rows_in, *val.shape[1:], dtype=val.dtype)
                inputs[ch][torch.as_tensor(here)] = val
        for signature, group in together.items():
            self._compute_many(items, site, signature, group, inputs, query, changed, rows_in)
        mask = self.prompts.attention_mask[torch.as_tensor(prompt_rows)]
        for ch, parts in changed.items():  # the changed tokens' keys and values, in one projection
            if parts:
                where = torch.as_tensor(np.concatenate([here for here, _, _ in parts]))
                tokens = torch.cat([token for _, token, _ in parts])
                projected = self.kernels.project(owner, ch, torch.cat([stream for _, _, stream in parts]))
                inputs[ch][where, tokens] = projected.to(inputs[ch].device, inputs[ch].dtype)
        if head:
            q_in = inputs[Channel.Q]
            k_proj, v_proj = inputs[Channel.K], inputs[Channel.V]  # already projected: [B, T, d_head]
            if not every:
                width = int(query.max()) + 1  # causal: no key after the last query is read
                k_proj, v_proj, q_in = k_proj[:, :width], v_proj[:, :width], q_in.unsqueeze(1)
            q = self.kernels.project(owner, Channel.Q, q_in)
            out = self.kernels.attend(owner, q, k_proj.to(q.device), v_proj.to(q.device), mask,
                                      None if every else query)
            read = mask.sum(1) if every else query + 1
            self.work.head_token_layers += int(read.sum())
        elif isinstance(owner, Mlp):  # (at a named position the stream is there already)
            out = self.kernels.mlp(owner, inputs[None])
            self.work.mlp_token_layers += int(mask.sum()) if every else rows_in
        else:  # a subspace of a stream
            out = inputs[None]
        if isinstance(site, Subspace):
            out = self.kernels.subspace(site, out.to("cpu"))
            self.work.subspace_rows += rows_in
        elif head:
            self.work.head_rows += rows_in
        else:
            self.work.mlp_rows += rows_in
        return out.detach().to("cpu")

    # -- many nodes at once: one set of tensor operations for a chunk's nodes alike ------

    def _node_plan(self, graph, v: int, insts) -> tuple:
        """How head node `v`, read at one position, is assembled, as (signature, parts): nodes
        with one signature (where they are read, the ablation, and per channel q, k, v
        `_channel_plan`'s signature) are assembled together by `_compute_many`; the parts
        are each channel's children and senders' sites."""
        signatures, parts = [], []
        for channel in (Channel.Q, Channel.K, Channel.V):
            plan = self._channel_plan(graph, v, insts, channel)
            signatures.append(None if plan is None else plan[0])
            parts.append(None if plan is None else plan[1])
        return (self._out_position(graph, v), graph.ablation, tuple(signatures)), tuple(parts)

    def _channel_plan(self, graph, v: int, insts, channel) -> tuple | None:
        """Node `v`'s `channel` as `_assemble_at` builds it, as (signature, parts): the
        signature is the input leaves' positions and sites and the claimed senders'
        positions (those read at every position first), which of them share a site, and
        whether each is computed (and its value's rank); the parts are the leaf children,
        the sender children and the senders' sites. None when the channel is read on the
        node's own prompt."""
        if not graph.reads_from_remainder(v, channel):
            return None
        kids = [(c, t) for c, t in graph.children(v) if enters(t, channel)]
        leaves, leaf_kids = [], []
        for c, t in kids:
            node = graph.node(c)
            if node.role == "input":
                leaves.append((self._leaf_position(t, channel), self._leaf_site(node.site, channel)))
                leaf_kids.append(c)
        senders = sorted(((c, t) for c, t in kids if graph.node(c).role != "input"),
                         key=lambda item: not item[1].position.is_all)
        first: dict = {}
        shape, sender_kids, sites = [], [], []
        for c, t in senders:
            site = self._sender_site(graph.node(c).site)
            value = insts[c].value
            shape.append((t.position, first.setdefault(site, len(first)), None if value is None else value.dim()))
            sender_kids.append(c)
            sites.append(site)
        return (tuple(leaves), tuple(shape)), (leaf_kids, sender_kids, sites)

    def _compute_many(self, items, site, signature, group, inputs, query, changed, rows_in: int) -> None:
        """Fill `inputs` (q at the query token; keys and values, with the changed tokens'
        streams added to `changed`) and `query` for a chunk's head nodes that share one
        `_node_plan` signature: each row where `_compute` would put it, with one set of
        tensor operations for all of them (gathers from many sites read banked captures:
        `PlainCache.gather_many`)."""
        out_position, mode, plans = signature
        here = np.concatenate([h for _, h, _, _ in group])
        where = torch.as_tensor(here)
        rows = np.concatenate([items[k][2][items[k][1]].rows[sel] for k, _, sel, _ in group])
        at = self._index(out_position, rows)
        query[where] = at
        owner = _owner(site)
        for i, (channel, plan) in enumerate(zip((Channel.Q, Channel.K, Channel.V), plans)):
            channel_site = self._channel_site(site, channel)
            entries = [(items[k][2], items[k][1], sel, parts[i]) for k, _, sel, parts in group]
            if channel is Channel.Q:
                val = (_gather_at(self.cache.get(channel_site), rows, at) if plan is None
                       else self._assemble_at_many(entries, channel_site, plan, mode, at))
            else:
                val = self._keys_or_values_many(items, group, entries, channel, channel_site, plan, mode, rows,
                                                here, changed)
            if channel not in inputs and len(here) == rows_in and (np.diff(here) == 1).all():
                inputs[channel] = val  # the whole chunk, in order
                continue
            if channel not in inputs:
                inputs[channel] = torch.empty(rows_in, *val.shape[1:], dtype=val.dtype)
            inputs[channel].index_copy_(0, where, val.to(inputs[channel].dtype))

    def _keys_or_values_many(self, items, group, entries, channel, channel_site, plan, mode, rows, here,
                             changed) -> torch.Tensor:
        """`_keys_or_values` for a `_compute_many` group ([rows, T, d_head])."""
        owner = _owner(items[group[0][0]][0].node(items[group[0][0]][1]).site)
        plans = [self._sparse_plan(items[k][0], items[k][1], items[k][2], channel, channel_site, sel)
                 for k, _, sel, _ in group]
        projected = None
        if plans[0] is not None:
            (cache, stream_site, _), positions = plans[0]
            projected = self._projection(cache, stream_site, owner, channel)
        if projected is None:  # node by node (the whole stream assembled)
            out = None
            start = 0
            for (k, h, sel, _), _plan in zip(group, plans):
                graph, v, insts = items[k]
                mine: list = []
                val = self._keys_or_values(graph, v, insts, channel, channel_site, sel, mine)
                changed[channel] += [(h, token, stream) for token, stream in mine]
                if out is None:
                    out = torch.empty(len(rows), *val.shape[1:], dtype=val.dtype)
                out[start:start + len(sel)] = val
                start += len(sel)
            return out
        stream_rows = np.concatenate([p[0][2] for p in plans])
        out = projected.index_select(0, torch.as_tensor(stream_rows))
        for position in positions:  # where a claim changes the stream, assembled anew
            token = self._index(position, rows)
            changed[channel].append((here, token, self._assemble_at_many(entries, channel_site, plan, mode, token)))
        return out

    def _assemble_at_many(self, entries: list, input_site, signature, mode: str, token: torch.Tensor) -> torch.Tensor:
        """`_assemble_at` for nodes whose channel shares one `_channel_plan` signature, at one
        token of each row ([rows, D]). `entries`: per node (insts, node, references, the
        plan's parts), their rows in order; `token` [rows]."""
        leaves, senders = signature
        counts = np.array([len(sel) for _, _, sel, _ in entries], dtype=np.int64)
        rows = np.concatenate([insts[v].rows[sel] for insts, v, sel, _ in entries])
        remainder = np.concatenate([insts[v].remainder[sel] for insts, v, sel, _ in entries])

        def kid_rows(which: int, j: int) -> np.ndarray:  # child j's prompts (0: leaves, 1: senders)
            return np.concatenate([insts[parts[which][j]].rows[sel] for insts, _, sel, parts in entries])

        hit_at: dict = {}

        def hits(position: Position) -> torch.Tensor | None:
            if position.is_all:
                return None
            if position not in hit_at:  # (a token every row reads there: None, a plain copy or add)
                hit = self._index(position, rows) == token
                hit_at[position] = None if bool(hit.all()) else hit
            return hit_at[position]

        def there(position: Position, prompts: np.ndarray) -> torch.Tensor:
            return token if position.is_all else self._index(position, prompts)

        def gather(cache, sites, prompts, tok):  # plain values (one site, or one per node)
            if not isinstance(sites, list):
                return _gather_at(cache.get(sites), prompts, tok)
            distinct = list(dict.fromkeys(sites))
            if len(distinct) == 1:
                return _gather_at(cache.get(distinct[0]), prompts, tok)
            cache.ensure(distinct)
            return cache.gather_many(sites, counts, prompts, tok)

        def remainder_of(sites):  # the remainder's value of `sites` (one, or one per node) at the token
            if mode in ("resample", "corrupt"):
                return gather(self.cache if mode == "resample" else self.corrupt_cache, sites, remainder, token)
            each = sites if isinstance(sites, list) else [sites] * len(entries)
            bounds = np.concatenate([[0], np.cumsum(counts)])
            parts = [self._remainder_at(site, remainder[i:j], mode, token[i:j])
                     for site, i, j in zip(each, bounds[:-1], bounds[1:])]
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        leaf_rows = [kid_rows(0, j) for j in range(len(leaves))]

        def covered(sites, start) -> torch.Tensor:
            last = max((i for i, (position, _) in enumerate(leaves) if position.is_all), default=None)
            if last is None:
                out, rest = start(), range(len(leaves))
            else:
                out = gather(self.cache, sites if sites is not None else leaves[last][1], leaf_rows[last], token)
                rest = range(last + 1, len(leaves))
            for i in rest:
                position, leaf_site = leaves[i]
                _put(out, hits(position), gather(self.cache, sites if sites is not None else leaf_site, leaf_rows[i],
                                                 there(position, leaf_rows[i])))
            return out

        value = covered(None, lambda: remainder_of(input_site))
        current: dict = {}
        for j, (position, shared, rank) in enumerate(senders):
            sites = [parts[2][j] for _, _, _, parts in entries]
            base = current.get(shared)
            if base is None:
                base = current[shared] = covered(sites, lambda sites=sites: remainder_of(sites))
            prompts = kid_rows(1, j)
            tok = there(position, prompts)
            if rank is None:
                child = gather(self.cache, sites, prompts, tok)
            else:
                homes = [insts[parts[1][j]].home for insts, _, _, parts in entries]
                if all(h is not None and h[0] is homes[0][0] for h in homes):  # rows of one tensor: one gather
                    flat = np.concatenate([h[1] + sel for h, (_, _, sel, _) in zip(homes, entries)])
                    child = homes[0][0].index_select(0, torch.as_tensor(flat))
                else:
                    child = torch.cat([insts[parts[1][j]].value[torch.as_tensor(sel)]
                                       for insts, _, sel, parts in entries])
                if rank == 3:
                    child = child[torch.arange(len(child)), tok]
            hit = hits(position)
            _put(value, hit, child - base, add=True)
            _put(base, hit, child)
        return value

    # -- a head's keys and values: plain streams projected once -------------------------

    def _keys_or_values(self, graph, v: int, insts, channel, input_site, sel: np.ndarray,
                        changed: list | None = None) -> torch.Tensor:
        """Head node `v`'s keys or values (`channel` K or V) for the references `sel`
        ([len(sel), T, d_head]): as `_assemble` builds the stream, projected.

        With `changed` (a list), the streams at the tokens a claim changes are not
        projected here: (token, stream [len(sel), D]) pairs are appended to it, for the
        caller to project (one projection for many nodes) and write at those tokens."""
        site = _owner(graph.node(v).site)
        sparse = self._sparse_channel(graph, v, insts, channel, input_site, sel)
        if sparse is not None:
            (cache, stream_site, stream_rows), tokens = sparse
            projected = self._projection(cache, stream_site, site, channel)
            if projected is not None:
                out = projected.index_select(0, torch.as_tensor(stream_rows))
                ar = torch.arange(len(sel))
                for token in tokens:  # where a claim changes the stream, project it anew
                    stream = self._assemble_at(graph, v, insts, channel, input_site, sel, token)
                    if changed is not None:
                        changed.append((token, stream))
                    else:
                        out[ar, token] = self.kernels.project(site, channel, stream).to(out.device, out.dtype)
                return out
        stream = self._assemble(graph, v, insts, channel, input_site, sel)
        if stream is None:
            stream = self._plain(input_site, insts[v].rows[sel])
        return self.kernels.project(site, channel, stream).to("cpu")

    def _sparse_channel(self, graph, v: int, insts, channel, input_site, sel: np.ndarray):
        """A channel that is one plain stream per row except at a few tokens, as
        ((cache, site, prompts), tokens): the stream is `site`'s value in `cache` on
        `prompts` (the node's own, its remainder's, or an input leaf's read at every
        position) except at `tokens`, a list of [len(sel)] indices (one per named
        position where a claim changes it). None where a claimed sender is read at every
        position, or the remainder is a mean or zeros."""
        plan = self._sparse_plan(graph, v, insts, channel, input_site, sel)
        if plan is None:
            return None
        base, positions = plan
        rows = insts[v].rows[sel]
        return base, [self._index(p, rows) for p in positions]

    def _sparse_plan(self, graph, v: int, insts, channel, input_site, sel: np.ndarray):
        """`_sparse_channel` with the named positions in place of their tokens."""
        inst = insts[v]
        if not graph.reads_from_remainder(v, channel):
            return (self.cache, input_site, inst.rows[sel]), []
        if graph.ablation == "resample":
            base = (self.cache, input_site, inst.remainder[sel])
        elif graph.ablation == "corrupt":
            base = (self.corrupt_cache, input_site, inst.remainder[sel])
        else:
            base = None
        leaf_positions: list = []  # named positions leaves replace, after the last one at every position
        sender_positions: list = []
        for c, t in graph.children(v):
            if not enters(t, channel):
                continue
            node = graph.node(c)
            if node.role != "input":
                if t.position.is_all:
                    return None
                sender_positions.append(t.position)
                continue
            position = self._leaf_position(t, channel)
            if not position.is_all:
                leaf_positions.append(position)
                continue
            base, leaf_positions = (self.cache, self._leaf_site(node.site, channel), insts[c].rows[sel]), []
        if base is None:
            return None
        return base, list(dict.fromkeys(leaf_positions + sender_positions))

    def _projection(self, cache, stream_site, head: Head, channel) -> torch.Tensor | None:
        """Head `head`'s keys or values computed from `stream_site`'s plain value on every
        prompt of `cache` ([N, T, d_head]), once per stream and key/value group; None
        when no more fit `PROJECTION_BUDGET`."""
        stream = cache.get(stream_site)
        unit = head.head // self.model.adapter.kv_group()
        key = (id(stream), head.layer, unit, channel)
        got = self._projections.get(key)
        if got is None:
            d_head = self.kernels.project(head, channel, stream[:1, :1]).shape[-1]
            size = stream.shape[0] * stream.shape[1] * d_head
            if self._projection_floats + size > PROJECTION_BUDGET:
                return None
            got = torch.cat([self.kernels.project(head, channel, stream[sl]).to("cpu")
                             for sl in _chunks(stream.shape[0], self.batch_size)])
            self._projections[key] = got
            self._projection_floats += size
        return got

    def _metric_reads(self) -> torch.Tensor:
        """BoolTensor [N, T]: where the metric reads the logits (`metric_reads`, by chunks
        of prompts so that its random logits stay small)."""
        if self._reads is None:
            n = len(self.prompts.input_ids)
            vocab = self.model.shape.vocab_size
            parts = [metric_reads(self.task, self.metric, self.prompts.subset(list(range(sl.start, sl.stop))), vocab)
                     for sl in _chunks(n, 16)]
            self._reads = torch.cat(parts)
        return self._reads

    def _metric_columns(self) -> torch.Tensor | None:
        """The vocabulary ids the metric reads, when it reads the logits at END only and
        few of them (`metric_columns`); else None."""
        if not self._columns_known:
            self._columns_known = True
            end = self.prompts.positions.get("END")
            reads = self._metric_reads()
            if end is not None:
                only_end = torch.zeros_like(reads)
                only_end[torch.arange(len(end)), end] = True
                if torch.equal(reads, only_end):
                    self._columns = metric_columns(self.task, self.metric, self.prompts,
                                                   self.model.shape.vocab_size)
        return self._columns

    def _root_pass(self, items: list[tuple[InterventionGraph, dict]]) -> list[np.ndarray]:
        """Rebuild the final residual stream of every reference prompt, for every graph,
        unembed it where the metric reads, and read the metric."""
        if not self._direct("logits"):
            return self._forward_root(items)
        n, t = self.prompts.input_ids.shape
        vocab = self.model.shape.vocab_size
        reads = self._metric_reads()
        columns = self._metric_columns()  # the metric reads END only, and few tokens there
        size = max(1, min(self.batch_size, LOGITS_BUDGET // max(1, (1 if columns is not None else t) * vocab)))
        per_graph: list[list[np.ndarray]] = [[] for _ in items]
        for k, (graph, insts) in enumerate(items):
            for sl in _chunks(n, size):
                sel = np.arange(sl.start, sl.stop)
                stream = self._assemble(graph, graph.root, insts, None, self.final, sel)
                if stream is None:
                    stream = self._remainder(self.final, insts[graph.root].remainder[sel], graph.ablation)
                where = reads[sl]
                if columns is not None:  # [rows, V] at END, only the columns read computed
                    part = self.kernels.logits(stream[where], columns).detach().to("cpu", stream.dtype)
                    logits = spread_columns(part, columns, vocab)
                else:
                    logits = torch.zeros(len(sel), t, vocab, dtype=stream.dtype)
                    logits[where] = self.kernels.logits(stream[where]).detach().to("cpu", stream.dtype)
                self.work.root_rows += len(sel)
                self.work.logit_positions += int(where.sum())
                per_graph[k].append(self._metric_rows(logits, sel))
        return [np.concatenate(v) for v in per_graph]

    def _forward_level(self, items: list[tuple[InterventionGraph, int, dict]]) -> None:
        """Compute every (graph, node) of one height in one batched forward pass (the way
        for nodes the kernels do not cover on this model).

        Rows of the batch are (node, reference) pairs; each chunk of rows assembles only
        its own nodes' inputs, so memory grows with the batch, not the level."""
        from circuitlang.models import Patch

        n = len(self.prompts.input_ids)
        for graph, v, _ in items:
            if not graph.input_channels(v):
                raise ExecutionError(f"{graph.node(v).site} cannot receive edges; heads, MLPs, SAE latents "
                                     "and logits can")
        capture = list(dict.fromkeys(self._sender_site(g.node(v).site) for g, v, _ in items))
        outs: list[list[torch.Tensor]] = [[] for _ in items]
        pairs = [(k, r) for k in range(len(items)) for r in range(n)]
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            ks = np.array([k for k, _ in chunk])
            prompt_rows = np.empty(len(chunk), dtype=np.int64)
            values: dict = {}
            for k in dict.fromkeys(ks.tolist()):
                graph, v, insts = items[k]
                here = np.flatnonzero(ks == k)
                sel = np.array([chunk[j][1] for j in here])
                prompt_rows[here] = insts[v].rows[sel]
                for ch in graph.input_channels(v):
                    site = self._channel_site(graph.node(v).site, ch)
                    val = self._assemble(graph, v, insts, ch, site, sel)
                    if val is None:
                        continue
                    if site not in values:
                        values[site] = (torch.zeros(len(chunk), *val.shape[1:], dtype=val.dtype),
                                        torch.zeros(len(chunk), dtype=torch.bool))
                    values[site][0][here] = val
                    values[site][1][here] = True
            idx = torch.as_tensor(prompt_rows)
            patches = [Patch(site, val, rows=mask) for site, (val, mask) in values.items()]
            run = run_batched(self.model, self.prompts.input_ids[idx], self.prompts.attention_mask[idx],
                              capture=capture, patches=patches)
            for k in dict.fromkeys(ks.tolist()):  # a node's rows are contiguous in a chunk
                graph, v, _ = items[k]
                here = np.flatnonzero(ks == k)
                value = run.cache[self._sender_site(graph.node(v).site)]
                outs[k].append(value[here[0]:here[-1] + 1].detach().to("cpu"))
        t = self.prompts.input_ids.shape[1]
        for k, (graph, v, insts) in enumerate(items):
            value = torch.cat(outs[k])
            position = self._out_position(graph, v)
            if not position.is_all:  # keep the value where the parent reads it
                value = value[torch.arange(n), self._index(position, insts[v].rows)]
            insts[v].value = value
            self.work.forward_rows += n
            self.work.forward_token_layers += n * t * self.n_layers

    def _forward_root(self, items: list[tuple[InterventionGraph, dict]]) -> list[np.ndarray]:
        """Rebuild the final residual stream of every reference prompt, for every graph,
        and read the metric through a forward pass with that stream patched."""
        from circuitlang.models import Patch

        n = len(self.prompts.input_ids)
        per_graph: list[list[np.ndarray]] = [[] for _ in items]
        pairs = [(k, r) for k in range(len(items)) for r in range(n)]
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            ks = np.array([k for k, _ in chunk])
            refs = np.array([r for _, r in chunk])
            value = None
            for k in dict.fromkeys(ks.tolist()):
                graph, insts = items[k]
                here = np.flatnonzero(ks == k)
                sel = refs[here]
                part = self._assemble(graph, graph.root, insts, None, self.final, sel)
                if part is None:
                    part = self._remainder(self.final, insts[graph.root].remainder[sel], graph.ablation)
                if value is None:
                    value = torch.zeros(len(chunk), *part.shape[1:], dtype=part.dtype)
                value[here] = part
            idx = torch.as_tensor(refs)
            run = run_batched(self.model, self.prompts.input_ids[idx], self.prompts.attention_mask[idx],
                              patches=[Patch(self.final, value)])
            self.work.forward_rows += len(chunk)
            self.work.forward_token_layers += len(chunk) * value.shape[1] * self.n_layers
            metric = self._metric_rows(run.logits, refs)
            for k in dict.fromkeys(ks.tolist()):
                per_graph[k].append(metric[ks == k])
        return [np.concatenate(v) for v in per_graph]

    def _metric_rows(self, logits, refs: np.ndarray) -> np.ndarray:
        """The metric of logits computed for the reference prompts `refs` (any order)."""
        sub = self.prompts.subset(refs.tolist())
        reference = None
        if self.metric == "kl":
            reference = self._clean_logits(refs)
        out = self.task.metric(self.metric, logits, sub, reference_logits=reference)
        return out.detach().to("cpu", torch.float64).numpy()

    def _clean_logits(self, refs: np.ndarray) -> torch.Tensor:
        idx = torch.as_tensor(refs)
        return run_batched(self.model, self.prompts.input_ids[idx], self.prompts.attention_mask[idx]).logits
