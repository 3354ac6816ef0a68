"""Lower a resolved hypothesis (IR) to a causal-scrubbing intervention graph.

Takes the core claims of a `Hypothesis` (after verb expansion) and gives an
`InterventionGraph`: the treeified correspondence that `execute.py` runs. This is
the one place that says what the graph means.

What the graph is
-----------------
A networkx `DiGraph` whose nodes are integers with a `ScrubNode` payload under the
key ``"node"``, and whose edges point **from a child to the parent that reads it**
with a `Transplant` payload under the key ``"transplant"``.

* The **root** is the model's output: `ScrubNode(site=Logits())`. It is evaluated
  on the reference prompt's answer; its input is the final residual stream.
* Every other node is a **claimed sender**: a head output (`Head(l, h, OUT)`), an
  MLP output, the embedding, a neuron, an SAE latent or an SAE's error term (a unit's
  value is what it writes into the stream: `sites.Written`), at a position, with the
  features its input must agree on, or an **input leaf**: one input channel of a head (`Head(l, h, Q)` ...),
  a head's attention pattern (`Head(l, h, PATTERN)`: its query at the position and
  its keys everywhere, taken together from one sample), or the root's stream
  (`Logits()`), claimed to depend only on some features.
* An edge child -> parent with `Transplant(channel, position)` says: in the
  parent's `channel` input (q/k/v of a head, or PATTERN for a pattern leaf; `None`
  for an MLP's or a latent's input or the root's residual stream), at `position`, the child's
  output replaces what the child contributes there in the parent's own run.

Semantics (Chan et al. 2022, causal scrubbing), as `execute.py` implements it:
the root gets the reference prompt x. Walking down, each node n gets an input x_n
sampled from the dataset among prompts that agree with its parent's input on
`n.features` (`Feature("input", ...)` means: the parent's input itself).

* A node with **no claimed children** is a leaf: it runs entirely on x_n.
* A node **with claimed children** reads each child's contribution on that
  child's own input, and every other path into it, on every channel and position,
  from the "remainder": an unconditioned random resample r_n (or the dataset mean,
  or zero, by the hypothesis's `ablation`). Each input channel (q, k, v of a head;
  an MLP's input; the root's final stream) starts from its value on r_n, and each
  claimed child's output is swapped in for that child's own contribution, at the
  child's position; an input leaf replaces the whole channel there with its value
  on its own sample. So removing a claim always makes a hypothesis sparser (that
  path scrubbed), never coarser. This is `semantics paths`, the default.
* `semantics channels` (an explicit option, not Chan et al.'s reading): a channel of
  a claimed node that no claim mentions is read on x_n, as if the node's features
  covered the inputs the hypothesis says nothing more about.

`InterventionGraph.remainder_inputs(n)` lists, per node with children, what it
reads from the remainder (the report shows it, so a user sees what was left out).

How claims become nodes
-----------------------
* `DependsClaim(site, position, features)` on a sender makes a node; on an input
  channel (`head L.H.q`, `head L.H.pattern`, `logits`) it makes an input leaf under
  its head (or root). A pattern leaf's query and keys come from one sample, so a head
  that attends by content keeps its match.
* `EdgeClaim(sender, receiver, position)` makes sender a child of receiver through
  the receiver's channel. Which node of the sender enters where: an edge at a named
  position reads the sender's node claimed there if it has one, else its node claimed
  at `all`; an edge at `all` reads a node claimed at `all` everywhere and each node
  claimed at a named position at that position (claims at named positions refine one
  at `all`). An edge into a key or value at P is read by every node of its head. The
  nodes edges need are made before any edge is linked, so statement order never matters. A sender or receiver with no claim of its
  own is added with `Feature("input")`: it sees exactly what its parent sees (ACDC's
  reading of an edge-only circuit).
* A claimed sender that feeds nothing is a child of the root at its position.
* Which edges exist is `circuitlang.topology`'s decision (the same rule the resolver
  and the edge engine use), with the `ModelShape` the hypothesis was resolved against.
* The claim graph is a DAG in layer order; treeification copies every shared
  sub-DAG once per parent, and identical siblings are merged.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import networkx as nx

from circuitlang import topology
from circuitlang.errors import Diagnostic, LowerError
from circuitlang.ir import DEFAULT_SEMANTICS, Feature
from circuitlang.sites import ALL, Channel, Head, Latent, Logits, Mlp, Neuron, Position, Site, Subspace

INPUT = "input"  # the feature "the whole prompt": agree on it = same prompt


SAME_INPUT = (Feature(INPUT, INPUT),)  # "the parent's own prompt"


@dataclass(frozen=True, slots=True)
class ScrubNode:
    """What one node of the treeified graph computes.

    Attributes:
        site: `Logits()` for the root; a sender (`Head(l,h,OUT)`, `Mlp(l)`,
            `Embed()`); or an input channel (`Head(l,h,Q|K|V)`, `Logits()` under the
            root) for input leaves.
        position: where its output is used by its parent (`ALL` for every position).
        features: what its input agrees on with its parent's input.
        role: "root", "sender" or "input".
        claims: indices (into `Hypothesis.claims`) of the claims that made it.
    """

    site: Site
    position: Position
    features: tuple
    role: str
    claims: tuple[int, ...] = field(default=(), compare=False)

    def label_short(self) -> str:
        """The site and where its parent reads it: `head 1.0 at END`, `logits`."""
        if self.role == "root":
            return "logits"
        return f"{self.site} at {self.position}"

    def label(self) -> str:
        if self.role == "root":
            return "logits"
        feats = ", ".join(str(f) for f in self.features) or "nothing"
        return f"{self.site} at {self.position} | {feats}"


@dataclass(frozen=True, slots=True)
class Transplant:
    """How a child's value enters its parent: through `channel` at `position`.

    `channel` is `Channel.Q/K/V` for a head parent (`Channel.PATTERN` for a pattern
    leaf: the query at `position` and the keys at every position) and `None` for an
    MLP parent (the stream it reads) or the root (the final residual stream).
    """

    channel: Channel | None
    position: Position


@dataclass
class InterventionGraph:
    """A treeified causal-scrubbing graph; see the module docstring."""

    graph: nx.DiGraph
    root: int
    ablation: str = "resample"
    given: tuple = ()
    semantics: str = DEFAULT_SEMANTICS
    warnings: list[Diagnostic] = field(default_factory=list)
    # what is read of each node, read once (the tree is built whole before it is used, and not
    # changed): its children, its payload, its input channels, whether each starts from the
    # remainder, its parent, its height
    _children: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _nodes: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _channels: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _remainder: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _parents: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _heights: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def node(self, n: int) -> ScrubNode:
        node = self._nodes.get(n)
        if node is None:
            node = self._nodes[n] = self.graph.nodes[n]["node"]
        return node

    def children(self, n: int) -> tuple[tuple[int, Transplant], ...]:
        """Children of `n` with the way each enters it, in a stable order (increasing id)."""
        kids = self._children.get(n)
        if kids is None:
            kids = [(c, edge["transplant"]) for c, edge in self.graph.pred[n].items()]
            kids = self._children[n] = tuple(sorted(kids, key=lambda item: item[0]))
        return kids

    def parent(self, n: int) -> int | None:
        if n in self._parents:
            return self._parents[n]
        parents = list(self.graph.successors(n))
        parent = self._parents[n] = parents[0] if parents else None
        return parent

    def is_leaf(self, n: int) -> bool:
        kids = self._children.get(n)
        return not (self.graph.pred[n] if kids is None else kids)

    def postorder(self) -> list[int]:
        """Nodes with every child before its parent (the order of evaluation)."""
        return list(nx.topological_sort(self.graph))

    def height(self, n: int) -> int:
        known = self._heights.get(n)
        if known is None:
            kids = self.children(n)
            known = self._heights[n] = 0 if not kids else 1 + max(self.height(c) for c, _ in kids)
        return known

    def path(self, n: int) -> tuple:
        """Node `n`'s place in the tree, independent of node numbering: one step per node
        from the root down, `(role, site, position, channel, transplant position)` as
        text (channel: how the node enters its parent: "q", "k", "v", "pattern" or
        "stream"; the root's step has None for both). Two trees built from one
        hypothesis by the documented rules give their nodes the same paths."""
        steps = []
        while True:
            node = self.node(n)
            parent = self.parent(n)
            if parent is None:
                steps.append((node.role, str(node.site), str(node.position), None, None))
                break
            t = self.graph.edges[n, parent]["transplant"]
            channel = t.channel.value if t.channel is not None else "stream"
            steps.append((node.role, str(node.site), str(node.position), channel, str(t.position)))
            n = parent
        return tuple(reversed(steps))

    def input_channels(self, n: int) -> tuple[Channel | None, ...]:
        """The input channels of node `n`'s site: q, k, v of a head; the one stream of an
        MLP or of the root (None); none for the embedding or an input leaf."""
        channels = self._channels.get(n)
        if channels is None:
            channels = self._channels[n] = self._input_channels(self.node(n))
        return channels

    @staticmethod
    def _input_channels(node: ScrubNode) -> tuple[Channel | None, ...]:
        if node.role == "input":
            return ()
        if isinstance(node.site, Head) or (isinstance(node.site, Subspace) and node.site.basis.hook == "head"):
            return (Channel.Q, Channel.K, Channel.V)  # a head's, or a subspace of its output's
        if isinstance(node.site, (Mlp, Logits, Latent)) or topology.is_receiver(node.site):
            return (None,)
        return ()

    def reads_from_remainder(self, n: int, channel: Channel | None) -> bool:
        """Whether node `n`'s `channel` input starts from the remainder (is rebuilt)."""
        known = self._remainder.get((n, channel))
        if known is None:
            known = self._remainder[(n, channel)] = self._reads_from_remainder(n, channel)
        return known

    def _reads_from_remainder(self, n: int, channel: Channel | None) -> bool:
        kids = self.children(n)
        if not kids or channel not in self.input_channels(n):
            return False
        if self.semantics == "paths":
            return True
        return any(enters(t, channel) for _, t in kids)

    def remainder_inputs(self, n: int) -> list[str]:
        """What node `n` reads from the remainder, in words, one entry per channel:
        `"k: all but head 0.3 at PREV+1"`, `"v: all of it"`. Empty for a leaf."""
        out = []
        for channel in self.input_channels(n):
            if not self.reads_from_remainder(n, channel):
                continue
            name = channel.value if channel is not None else ("stream" if self.node(n).role == "root" else "input")
            kept = [f"{self.node(c).site} (every key)" if t.channel is Channel.PATTERN and channel is Channel.K
                    else f"{self.node(c).site} at {t.position}"
                    for c, t in self.children(n) if enters(t, channel)]
            out.append(f"{name}: all but " + ", ".join(kept) if kept else f"{name}: all of it")
        return out

    def uses_all_positions(self) -> bool:
        return any(
            self.graph.edges[e]["transplant"].position.is_all for e in self.graph.edges
        )

    def to_json(self) -> dict:
        """A JSON-able description: nodes with payloads, edges child -> parent."""
        nodes = []
        for n in sorted(self.graph.nodes):
            node = self.node(n)
            nodes.append(
                {
                    "id": n,
                    "role": node.role,
                    "site": str(node.site),
                    "position": str(node.position),
                    "features": [str(f) for f in node.features],
                    "claims": list(node.claims),
                    "leaf": self.is_leaf(n),
                    "remainder": self.remainder_inputs(n),
                }
            )
        edges = [
            {
                "child": c,
                "parent": p,
                "channel": (t.channel.value if t.channel else "resid"),
                "position": str(t.position),
            }
            for c, p in sorted(self.graph.edges)
            for t in [self.graph.edges[c, p]["transplant"]]
        ]
        return {"root": self.root, "ablation": self.ablation, "semantics": self.semantics,
                "nodes": nodes, "edges": edges}

    def to_dot(self) -> str:
        """Graphviz text: parents above children, edges labelled by channel@position."""
        lines = ["digraph scrub {", "  rankdir=BT;", '  node [shape=box, fontname="monospace"];']
        for n in sorted(self.graph.nodes):
            node = self.node(n)
            style = ', style="bold"' if node.role == "root" else ""
            lines.append(f'  n{n} [label={json.dumps(node.label())}{style}];')
        for c, p in sorted(self.graph.edges):
            t = self.graph.edges[c, p]["transplant"]
            label = f"{t.channel.value if t.channel else 'resid'}@{t.position}"
            lines.append(f"  n{c} -> n{p} [label={json.dumps(label)}];")
        lines.append("}")
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- lowering


def enters(transplant: Transplant, channel: Channel | None) -> bool:
    """Whether a child entering by `transplant` feeds its parent's `channel` input."""
    if transplant.channel is Channel.PATTERN:
        return channel in (Channel.Q, Channel.K)
    return transplant.channel == channel


def _order(site: Site) -> float:
    try:
        return topology.site_order(site)
    except ValueError:
        raise LowerError(f"{site} cannot take part in a causal scrubbing graph",
                         hint="claim embed, heads, MLPs, neurons, SAE latents or errors, subspaces, "
                              "or logits") from None


@dataclass
class _Template:
    """A claim-graph node before treeification."""

    key: tuple
    site: Site
    position: Position
    features: tuple
    role: str
    claims: list[int]
    # (child template key, Transplant)
    children: list[tuple[tuple, Transplant]] = field(default_factory=list)
    has_parent: bool = False
    # made by a depends-claim on the site or one of its input channels (not only by edges)
    claimed: bool = False


def _covers(claimed: Position, wanted: Position) -> bool:
    return claimed == wanted or claimed.is_all


def ir_to_graph(hypothesis) -> InterventionGraph:
    """Lower a resolved hypothesis to its treeified intervention graph.

    Args:
        hypothesis: a `circuitlang.ir.Hypothesis` (anything with `claims`, each a
            depends- or edge-claim, and `ablation`).

    Returns:
        The `InterventionGraph` that `execute.scrub` runs.

    Raises:
        LowerError: an edge runs backwards in layer order, or a claim names a site
            that cannot be scrubbed.
    """
    claims = list(getattr(hypothesis, "claims", ()))
    shape = getattr(hypothesis, "shape", None)
    problems: list[Diagnostic] = []
    templates: dict[tuple, _Template] = {}
    root_key = ("root",)
    templates[root_key] = _Template(root_key, Logits(), ALL, SAME_INPUT, "root", [])

    def add_sender(site, position, features, claim_idx) -> _Template:
        key = ("sender", site, position)
        t = templates.get(key)
        if t is None:
            t = templates[key] = _Template(key, site, position, tuple(features), "sender", [])
        elif features and t.features == SAME_INPUT:
            t.features = tuple(features)
        elif features and tuple(features) != SAME_INPUT:
            merged = tuple(dict.fromkeys(t.features + tuple(features)))
            t.features = merged
        if claim_idx is not None:
            t.claims.append(claim_idx)
            t.claimed = True
        return t

    def find_senders(site, position) -> list[_Template]:
        return [
            t
            for t in templates.values()
            if t.role == "sender" and t.site == site and (_covers(t.position, position) or position.is_all)
        ]

    def link(child: _Template, parent: _Template, transplant: Transplant):
        entry = (child.key, transplant)
        if entry not in parent.children:
            parent.children.append(entry)
        child.has_parent = True

    # 1. senders from depends-claims (input channels wait until heads exist)
    channel_claims = []
    edge_claims = []
    for i, claim in enumerate(claims):
        kind = type(claim).__name__
        if kind == "DependsClaim":
            site = claim.site
            feats = tuple(claim.features)
            if isinstance(site, Head) and site.channel.is_input:
                channel_claims.append((i, claim, feats))
            elif isinstance(site, Head) and site.channel is Channel.PATTERN:
                # a pattern row at P is computed from q at P and k everywhere: one leaf
                # gives both, from one sample (a content match survives)
                channel_claims.append((i, claim, feats))
            elif isinstance(site, Logits):
                channel_claims.append((i, claim, feats))
            else:
                _order(site)
                add_sender(site, claim.position, feats or (), i)
        elif kind == "EdgeClaim":
            edge_claims.append((i, claim))

    # 2. edges: sender -> receiver channel. Every node the edges need is made first, in an
    # order that does not depend on the statements' (edges at `all` before those at named
    # positions, edges into keys and values last: they join whatever nodes the head has),
    # and only then is each edge linked, to every node of its receiver it reaches: an edge
    # into a key or value at P changes the head's output at every query, so a node of the
    # head that a later statement made reads it too.
    def place(i, claim, linking: bool) -> None:
        sender, receiver, pos = claim.sender, claim.receiver, claim.position
        if isinstance(sender, Head):
            sender = sender.with_channel(Channel.OUT)
        problem = topology.edge_problem(shape, sender, _as_receiver(receiver))
        if problem is not None:
            if not linking:
                return
            problems.append(Diagnostic("lower.not-an-edge", f"edge {sender} -> {receiver} is not in the model: "
                                       f"{problem}", getattr(claim, "span", None)))
            return
        # which node of the sender enters where (statement order never matters): an edge
        # at `all` reads each node claimed for the sender at its own position (claims at
        # named positions refine one at `all`); an edge at P reads the node claimed at P,
        # else the one at `all`. A sender no claim describes is one edge-only node at the
        # edge's position (at `all` never a node another edge made at a named position).
        found = find_senders(sender, pos)
        if pos.is_all:
            claimed = [s for s in found if s.claimed]
            senders = claimed or [add_sender(sender, pos, SAME_INPUT, None)]
            entries = [(s, s.position) for s in senders]
        else:
            senders = [s for s in found if s.position == pos] or found or [add_sender(sender, pos, SAME_INPUT, None)]
            entries = [(s, pos) for s in senders]
        if linking:
            for s in senders:
                s.claims.append(i)
        if isinstance(receiver, Logits):
            parents, channel = [templates[root_key]], None
        elif isinstance(receiver, Head):
            channel = receiver.channel if receiver.channel.is_input else Channel.Q
            out = receiver.with_channel(Channel.OUT)
            parents = [
                t
                for t in templates.values()
                if t.role == "sender"
                and t.site == out
                and (channel is not Channel.Q or _covers(t.position, pos) or pos.is_all)
            ]
            if not parents:
                parents = [add_sender(out, pos if channel is Channel.Q else ALL, SAME_INPUT, None)]
        elif isinstance(receiver, Subspace) and receiver.basis.hook == "head":
            # a subspace of a head's output reads what the head reads: the edge enters its
            # q (at the edge's position), k and v (at every query), as `-> head L.H` does
            nodes = [t for t in templates.values() if t.role == "sender" and t.site == receiver]
            at_query = [t for t in nodes if _covers(t.position, pos) or pos.is_all]
            if not at_query:
                at_query = [add_sender(receiver, pos, SAME_INPUT, None)]
                nodes.append(at_query[0])
            if not linking:
                return
            for p in nodes:
                p.claims.append(i)
                for ch in (Channel.Q, Channel.K, Channel.V):
                    if ch is not Channel.Q or any(p is t for t in at_query):
                        for s, at in entries:
                            link(s, p, Transplant(ch, at))
            return
        elif isinstance(receiver, (Mlp, Neuron, Latent, Subspace)):
            channel = None
            parents = [
                t
                for t in templates.values()
                if t.role == "sender" and t.site == receiver and (_covers(t.position, pos) or pos.is_all)
            ]
            if not parents:
                parents = [add_sender(receiver, pos, SAME_INPUT, None)]
        else:
            if not linking:
                return
            problems.append(
                Diagnostic(
                    "lower.unsupported-receiver",
                    f"{receiver} cannot receive an edge: {topology.RECEIVERS_HINT}",
                    getattr(claim, "span", None),
                )
            )
            return
        if not linking:
            return
        for p in parents:
            p.claims.append(i)
            for s, at in entries:
                link(s, p, Transplant(channel, at))

    def creation_order(item):
        _, claim = item
        kv = isinstance(claim.receiver, Head) and claim.receiver.channel in (Channel.K, Channel.V)
        return (kv, not claim.position.is_all, str(claim.sender), str(claim.receiver), str(claim.position))

    for i, claim in sorted(edge_claims, key=creation_order):
        place(i, claim, linking=False)
    for i, claim in edge_claims:
        place(i, claim, linking=True)

    # 3. input-channel claims: leaves under their head (or the root)
    for i, claim, feats in channel_claims:
        site, pos = claim.site, claim.position
        key = ("input", site, pos)
        leaf = templates.get(key)
        if leaf is None:
            leaf = templates[key] = _Template(key, site, pos, feats, "input", [i])
        else:  # two claims on one input: its sample agrees on the features of both
            leaf.features = tuple(dict.fromkeys(leaf.features + tuple(feats)))
            leaf.claims.append(i)
        if isinstance(site, Logits):
            link(leaf, templates[root_key], Transplant(None, pos))
            continue
        out = site.with_channel(Channel.OUT)
        # a query (or a pattern's query) at P is read only by the head's output at P
        by_position = site.channel in (Channel.Q, Channel.PATTERN)
        parents = [t for t in templates.values() if t.role == "sender" and t.site == out
                   and (not by_position or _covers(t.position, pos) or pos.is_all)]
        if not parents:
            parents = [add_sender(out, pos if by_position else ALL, SAME_INPUT, None)]
        for p in parents:
            p.claimed = True
            link(leaf, p, Transplant(site.channel, pos))

    if problems:
        raise LowerError(problems)

    # 4. claimed senders that feed nothing are read by the root at their position; a
    # site only edges name, that sends along none, has no path to the output: its
    # sub-tree is dropped (an edge-only circuit says where each path goes)
    root = templates[root_key]
    warnings: list[Diagnostic] = []
    for t in list(templates.values()):
        if t.role == "sender" and not t.has_parent:
            if t.claimed:
                link(t, root, Transplant(None, t.position))
            else:
                span = getattr(claims[t.claims[0]], "span", None) if t.claims else None
                warnings.append(Diagnostic(
                    "lower.dangling", f"{t.site} receives edges but sends along none, so no path "
                    "from it reaches the output and those edges cannot matter", span,
                    f"add an edge from it (e.g. `{_edge_text(t.site)} -> logits at {t.position}`) or a "
                    "claim about it", severity="warning"))

    # 5. treeify from the root: copy shared sub-DAGs per parent, merge equal siblings
    graph = nx.DiGraph()
    counter = iter(range(10**9))

    nodes: list = []  # (id, attributes), edges (child, parent, attributes): added at once, in this order
    edges: list = []
    payloads: dict = {}  # template key -> its ScrubNode (one for all of its copies: it is frozen)

    def build(key: tuple) -> int:
        t = templates[key]
        n = next(counter)
        if key not in payloads:
            payloads[key] = ScrubNode(t.site, t.position, t.features, t.role, tuple(sorted(set(t.claims))))
        nodes.append((n, {"node": payloads[key]}))
        seen = set()
        for child_key, transplant in t.children:
            if (child_key, transplant) in seen:
                continue
            seen.add((child_key, transplant))
            c = build(child_key)
            edges.append((c, n, {"transplant": transplant}))
        return n

    root_id = build(root_key)
    graph.add_nodes_from(nodes)
    graph.add_edges_from(edges)
    ablation = getattr(hypothesis, "ablation", None)
    mode = getattr(ablation, "mode", ablation) or "resample"
    given = tuple(getattr(ablation, "given", ()) or ())
    semantics = getattr(hypothesis, "semantics", DEFAULT_SEMANTICS) or DEFAULT_SEMANTICS
    return InterventionGraph(graph, root_id, str(mode), given, str(semantics), warnings)


def _edge_text(site: Site) -> str:
    return f"{site.layer}.{site.head}" if isinstance(site, Head) else str(site)


def _as_receiver(site: Site) -> Site:
    """An edge's receiver as the graph names it (an edge into a head's output means q)."""
    if isinstance(site, Head) and not site.channel.is_input:
        return site.with_channel(Channel.Q)
    return site
