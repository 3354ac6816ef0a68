"""A naive, independent reference for causal scrubbing (and for path patching).

Takes a resolved `ir.Hypothesis`, a Hugging Face causal LM (eager attention), the task's
`PromptSet`, the task's metric function and the prompts the product's `Scrubber` drew
for each node; gives the scrubbed metric per reference prompt, computed the slow and
obvious way from docs/checker.md ("The graph" and "Scrubbing"):

1. `build_tree` reads the claims into a tree of `Node`s by the documented rules
   (depends-claims make nodes, an edge makes its sender a child of its receiver through
   the receiver's channel, a pattern claim is one leaf, channel claims are input leaves,
   a claimed sender no edge reads is a child of the root, a site only edges name is a
   node on its parent's prompt, one that sends along no edge is dropped, shared
   sub-DAGs are copied, identical siblings merge). Where the documentation leaves a
   choice open the docstring of `build_tree` says which reading it takes.
2. The prompts are NOT drawn here: every node is looked up, by its path from the root
   (`Node.path`, the same key `InterventionGraph.path` gives), in the Scrubber's sample
   assignment, and checked independently: a node's prompts agree with its parent's on
   the node's features and token length, a remainder agrees with its node's prompts on
   the ablation's `given` features and length, and the two trees have the same nodes.
3. Values are computed with plain forward passes of the HF model with plain hooks on its
   modules, one pass per tree node (batched over the N reference prompts): a node with
   no claimed children runs on its own prompt; a node with claimed children assembles
   each input channel from the remainder, input leaves replace the channel at their
   positions, and each claimed sender adds (its value - its contribution on the prompt
   whose value the channel holds there). A head's output is `z_h @ W_O[h]` without the
   output bias; a neuron's, its activation (the input of its MLP's output projection)
   times its row of W_out; an SAE latent's (a plain ReLU SAE at resid L, weights read
   from its folder), its activation on the stream entering block L times its decoder
   row; a neuron or latent with claimed children computes it from its assembled stream
   (its MLP's input; the stream entering the SAE's block). The remainder of a channel is its value on the resampled prompt
   (`resample`), on the node's own prompts' counterfactuals (`corrupt`), its dataset
   mean per absolute position over real tokens (`mean`), or what is left of the stream
   when every sender contributes nothing (`zero`): the attention-output biases no
   sender owns, found here as the stream minus every sender's output.

Independence: nothing here imports circuitlang's execution code (execute.py,
ir_to_graph.py, models/run.py, edge_engine.py, patches.py, the adapters). The module
paths, q/k/v column layouts and output projections of each architecture are written out
below in `ARCHS`, deliberately a second copy of that knowledge: STYLE.md's "module paths
in one place" rule is for product code, and an oracle that shared the adapters would
share their bugs. Rotary embeddings and attention masking are left to the HF attention
module itself (the hooks replace only the projections' inputs).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from circuitlang.ir import DependsClaim, EdgeClaim, Feature, Hypothesis
from circuitlang.sites import ALL, Channel, Embed, Head, Latent, Logits, Mlp, Neuron, Position

INPUT = Feature("input", "input")


class OracleMismatch(AssertionError):
    """The oracle and the product read the rules differently (trees or samples)."""


class Ambiguous(Exception):
    """The tree asks for something the documentation gives no single answer to: two input
    leaves writing one channel at one index, or one sender site entering one channel twice
    at one index with two different values, neither of them a refinement of a claim at
    `all` by one at a named position (which value replaces its contribution?)."""


# ----------------------------------------------------------------- the architectures


@dataclass(frozen=True)
class Arch:
    """Where things are in one HF architecture.

    Attributes:
        blocks: the ModuleList of transformer blocks.
        attn_norm: (in a block) the norm the attention's q/k/v read; its input is the
            pre-norm stream a head's q/k/v channel means.
        mlp_norm: (in a block) the norm the MLP reads; its input is the MLP's channel.
        mlp: (in a block) the MLP module; its output is the MLP's contribution.
        qkv: (in a block) "fused" projections (one module) or three modules q, k, v.
        layout: how a fused projection's columns are laid out: "gpt2" (q | k | v, each
            heads-major) or "neox" (per head: q, k, v of that head).
        out_proj: (in a block) the attention output projection; its input is z.
        final_norm, unembed: (in the model) the final norm and the unembedding.
        mlp_out: (in a block) the MLP's output projection; its input holds the neurons.
    """

    blocks: str
    attn_norm: str
    mlp_norm: str
    mlp: str
    qkv: tuple[str, ...]
    layout: str
    out_proj: str
    final_norm: str
    unembed: tuple[str, ...]  # first that exists
    parallel: str | None = None  # the config flag of parallel attention and MLP, if any
    mlp_out: str = "mlp.down_proj"


_LLAMA_LIKE = Arch("model.layers", "input_layernorm", "post_attention_layernorm", "mlp",
                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "split",
                   "self_attn.o_proj", "model.norm", ("lm_head",))

ARCHS: dict[str, Arch] = {
    "gpt2": Arch("transformer.h", "ln_1", "ln_2", "mlp", ("attn.c_attn",), "gpt2", "attn.c_proj",
                 "transformer.ln_f", ("lm_head",), mlp_out="mlp.c_proj"),
    "gpt_neox": Arch("gpt_neox.layers", "input_layernorm", "post_attention_layernorm", "mlp",
                     ("attention.query_key_value",), "neox", "attention.dense",
                     "gpt_neox.final_layer_norm", ("lm_head", "embed_out"), "use_parallel_residual",
                     mlp_out="mlp.dense_4h_to_h"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
}

_CH = {"q": 0, "k": 1, "v": 2}


class _Stop(Exception):
    """Raised by a hook once it has what it needs: the rest of the pass is not run."""


def _weight_in_out(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A projection's weight as [in, out] (GPT-2's Conv1D stores it so, nn.Linear as [out, in])."""
    if isinstance(module, torch.nn.Linear):
        return module.weight.t(), module.bias
    return module.weight, module.bias  # transformers' Conv1D


def _project(module, x: torch.Tensor) -> torch.Tensor:
    w, b = _weight_in_out(module)
    y = x @ w
    return y if b is None else y + b


def _sae_weights(folder: str) -> dict:
    """A SAELens folder's weights, read with safetensors alone (a standard ReLU SAE: no input
    normalisation, `b_dec` not subtracted from the input; the tests write only such)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    cfg = json.loads((Path(folder) / "cfg.json").read_text())
    if cfg.get("apply_b_dec_to_input") or cfg.get("normalize_activations", "none") != "none":
        raise ValueError("the oracle reads plain ReLU SAEs only")
    return load_file(str(Path(folder) / "sae_weights.safetensors"))


def _first_arg(args, kwargs, name="hidden_states"):
    return args[0] if args else kwargs[name]


class NaiveModel:
    """Plain forward passes of an HF causal LM with hooks, written for the oracle only."""

    def __init__(self, hf_model):
        self.model = hf_model
        cfg = hf_model.config
        self.arch = ARCHS[cfg.model_type]
        self.n_layers = cfg.num_hidden_layers if hasattr(cfg, "num_hidden_layers") else cfg.n_layer
        self.n_heads = cfg.num_attention_heads if hasattr(cfg, "num_attention_heads") else cfg.n_head
        self.d_model = cfg.hidden_size if hasattr(cfg, "hidden_size") else cfg.n_embd
        self.d_head = self.d_model // self.n_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.group = self.n_heads // self.n_kv
        self.parallel = bool(self.arch.parallel and getattr(cfg, self.arch.parallel))
        self.blocks = hf_model.get_submodule(self.arch.blocks)
        self.final_norm = hf_model.get_submodule(self.arch.final_norm)
        for name in self.arch.unembed:
            if hasattr(hf_model, name):
                self.unembed_module = getattr(hf_model, name)
                break

    def block(self, layer: int, part: str):
        return self.blocks[layer].get_submodule(part)

    # -- columns --------------------------------------------------------------------

    def columns(self, channel: str, head: int) -> tuple[int, torch.Tensor]:
        """(which q/k/v module, the output columns head `head` reads for `channel`)."""
        dh = self.d_head
        unit = head if channel == "q" else head // self.group  # GQA: the kv head it uses
        span = torch.arange(dh)
        if self.arch.layout == "split":
            return _CH[channel], unit * dh + span
        if self.arch.layout == "gpt2":
            return 0, _CH[channel] * self.d_model + unit * dh + span
        if self.arch.layout == "neox":
            return 0, unit * 3 * dh + _CH[channel] * dh + span
        raise ValueError(self.arch.layout)

    def head_out(self, z: torch.Tensor, layer: int, head: int) -> torch.Tensor:
        """Head `head`'s own contribution z_h @ W_O[h] (no output bias)."""
        w, _ = _weight_in_out(self.block(layer, self.arch.out_proj))
        sl = slice(head * self.d_head, (head + 1) * self.d_head)
        return z[..., sl] @ w[sl, :]

    # -- passes -------------------------------------------------------------------

    @torch.no_grad()
    def plain(self, ids: torch.Tensor, mask: torch.Tensor) -> dict:
        """One plain pass: every stream and output the oracle reads.

        Keys: ("resid", l) the pre-norm stream layer l's q/k/v read (("resid", 0) is the
        embedding), ("mlp_in", l) the pre-norm stream MLP l reads, ("z", l) the input of
        layer l's output projection, ("mlp", l) MLP l's output, ("hidden", l) the input
        of MLP l's output projection (its neurons), "final" the final pre-norm stream,
        "logits".
        """
        cap: dict = {}
        hooks = []

        def keep(key):
            def hook(module, args, kwargs):
                cap[key] = _first_arg(args, kwargs).detach().clone()
            return hook

        try:
            for layer in range(self.n_layers):
                hooks.append(self.block(layer, self.arch.attn_norm).register_forward_pre_hook(
                    keep(("resid", layer)), with_kwargs=True))
                hooks.append(self.block(layer, self.arch.mlp_norm).register_forward_pre_hook(
                    keep(("mlp_in", layer)), with_kwargs=True))
                hooks.append(self.block(layer, self.arch.out_proj).register_forward_pre_hook(
                    keep(("z", layer)), with_kwargs=True))
                hooks.append(self.block(layer, self.arch.mlp_out).register_forward_pre_hook(
                    keep(("hidden", layer)), with_kwargs=True))

                def mlp_hook(module, args, out, layer=layer):
                    cap[("mlp", layer)] = (out[0] if isinstance(out, tuple) else out).detach().clone()

                hooks.append(self.block(layer, self.arch.mlp).register_forward_hook(mlp_hook))
            hooks.append(self.final_norm.register_forward_pre_hook(keep("final"), with_kwargs=True))
            cap["logits"] = self.model(input_ids=ids, attention_mask=mask).logits.detach()
        finally:
            for h in hooks:
                h.remove()
        return cap

    def site_value(self, cap: dict, site) -> torch.Tensor:
        """A sender's contribution from a plain capture: embed, a head's output, an MLP's."""
        if isinstance(site, Embed):
            return cap[("resid", 0)]
        if isinstance(site, Head):
            return self.head_out(cap[("z", site.layer)], site.layer, site.head)
        if isinstance(site, Mlp):
            return cap[("mlp", site.layer)]
        if isinstance(site, Neuron):  # its activation times its row of W_out
            w, _ = _weight_in_out(self.block(site.layer, self.arch.mlp_out))
            return cap[("hidden", site.layer)][..., site.index, None] * w[site.index].detach()
        if isinstance(site, Latent):  # a plain ReLU SAE on the stream entering its block
            return self.latent_output(site, cap[self.latent_stream(site)])
        raise ValueError(f"not a sender: {site}")

    def latent_stream(self, site: Latent):
        """The key of the stream an SAE latent reads (the oracle knows SAEs at resid L)."""
        if site.sae.hook != "resid":
            raise ValueError(f"the oracle reads SAEs at resid L only, not {site.sae}")
        return "final" if site.sae.layer == self.n_layers else ("resid", site.sae.layer)

    def latent_output(self, site: Latent, x: torch.Tensor) -> torch.Tensor:
        """A latent's write on the stream `x` it reads: ReLU(x W_enc[:, i] + b_enc[i]) W_dec[i]."""
        w = _sae_weights(site.sae.path)
        act = torch.relu(x @ w["W_enc"][:, site.index].to(x.dtype) + w["b_enc"][site.index].to(x.dtype))
        return act[..., None] * w["W_dec"][site.index].to(x.dtype)

    @torch.no_grad()
    def neuron_output(self, site: Neuron, stream: torch.Tensor) -> torch.Tensor:
        """A neuron's write when its MLP reads the pre-norm `stream`: the unit's entry of the
        MLP's output projection's input, times its row of W_out."""
        seen = {}

        def keep(module, args, kwargs):
            seen["hidden"] = _first_arg(args, kwargs).detach().clone()

        handle = self.block(site.layer, self.arch.mlp_out).register_forward_pre_hook(keep, with_kwargs=True)
        try:
            self.block(site.layer, self.arch.mlp)(self.block(site.layer, self.arch.mlp_norm)(stream))
        finally:
            handle.remove()
        w, _ = _weight_in_out(self.block(site.layer, self.arch.mlp_out))
        return seen["hidden"][..., site.index, None] * w[site.index].detach()

    def senders_of(self, key) -> list:
        """The senders whose outputs are summed into a stream (the rest of it is biases)."""
        if key == "final":
            before, own_heads = self.n_layers, False
        elif key[0] == "resid":
            before, own_heads = key[1], False
        else:  # ("mlp_in", l): the layer's own heads too, unless attention and MLP are parallel
            before, own_heads = key[1], not self.parallel
        out = [Embed()]
        for layer in range(before):
            out += [Head(layer, h) for h in range(self.n_heads)] + [Mlp(layer)]
        if own_heads:
            out += [Head(key[1], h) for h in range(self.n_heads)]
        return out

    def biases_in(self, key) -> torch.Tensor:
        """The attention-output biases summed into a stream (zero for models without)."""
        total = torch.zeros(self.d_model)
        for layer in range(self.n_layers):
            if not any(isinstance(s, Head) and s.layer == layer for s in self.senders_of(key)):
                continue
            bias = self.block(layer, self.arch.out_proj).bias
            if bias is not None:
                total = total.to(bias.dtype) + bias.detach()
        return total

    @torch.no_grad()
    def head_output(self, ids, mask, layer: int, head: int, channels: Mapping[str, torch.Tensor]):
        """Head (layer, head)'s output on `ids`, its q/k/v reading the given pre-norm
        streams instead of its own (channels not given are read as the pass computes them)."""
        norm = self.block(layer, self.arch.attn_norm)
        mods = [self.block(layer, name) for name in self.arch.qkv]
        edits: dict[int, list] = {}
        for channel, stream in channels.items():
            which, cols = self.columns(channel, head)
            edits.setdefault(which, []).append((cols, stream))
        got: dict = {}
        hooks = []

        def proj_hook(which):
            def hook(module, args, out):
                out = out.clone()
                for cols, stream in edits[which]:
                    out[..., cols] = _project(module, norm(stream))[..., cols]
                return out
            return hook

        def z_hook(module, args, kwargs):
            got["z"] = _first_arg(args, kwargs)
            raise _Stop

        try:
            for which in edits:
                hooks.append(mods[which].register_forward_hook(proj_hook(which)))
            hooks.append(self.block(layer, self.arch.out_proj).register_forward_pre_hook(z_hook, with_kwargs=True))
            try:
                self.model(input_ids=ids, attention_mask=mask)
            except _Stop:
                pass
        finally:
            for h in hooks:
                h.remove()
        return self.head_out(got["z"], layer, head)

    @torch.no_grad()
    def mlp_output(self, layer: int, stream: torch.Tensor) -> torch.Tensor:
        """MLP `layer`'s output on a pre-norm stream (an MLP mixes no positions)."""
        return self.block(layer, self.arch.mlp)(self.block(layer, self.arch.mlp_norm)(stream))

    @torch.no_grad()
    def unembed(self, stream: torch.Tensor) -> torch.Tensor:
        return self.unembed_module(self.final_norm(stream))

    @torch.no_grad()
    def path_patched_logits(self, ids, mask, receiver, positions: torch.Tensor | None,
                            delta: torch.Tensor) -> torch.Tensor:
        """Logits of a full pass whose `receiver` (a head's q/k/v, an MLP, the logits) reads
        its own input plus `delta` [B, T, D] at `positions` ([B] indices; None: everywhere),
        everything else computed as the pass goes (downstream sees the change)."""
        b = torch.arange(ids.shape[0])

        def add(x):
            x = x.clone()
            if positions is None:
                return x + delta
            x[b, positions] = x[b, positions] + delta[b, positions]
            return x

        hooks = []
        try:
            if isinstance(receiver, Logits):
                hooks.append(self.final_norm.register_forward_pre_hook(lambda m, a: (add(a[0]),) + tuple(a[1:])))
            elif isinstance(receiver, Mlp):
                hooks.append(self.block(receiver.layer, self.arch.mlp_norm).register_forward_pre_hook(
                    lambda m, a: (add(a[0]),) + tuple(a[1:])))
            else:
                layer = receiver.layer
                norm = self.block(layer, self.arch.attn_norm)
                which, cols = self.columns(receiver.channel.value, receiver.head)
                seen: dict = {}

                def keep(module, args, out):
                    seen.setdefault("x", args[0])  # the model's own call comes first

                def hook(module, args, out):
                    out = out.clone()
                    out[..., cols] = _project(module, norm(add(seen["x"])))[..., cols]
                    return out

                hooks.append(norm.register_forward_hook(keep))
                hooks.append(self.block(layer, self.arch.qkv[which]).register_forward_hook(hook))
            return self.model(input_ids=ids, attention_mask=mask).logits.detach()
        finally:
            for h in hooks:
                h.remove()


# ----------------------------------------------------------------------- the tree


@dataclass(eq=False)
class Node:
    """One node of the oracle's tree.

    Attributes:
        role: "root", "sender" or "input" (an input leaf).
        site: Logits() for the root; the sender (Embed, Head OUT, Mlp); for an input
            leaf the channel it gives (Head q/k/v/pattern, or Logits()).
        position: the node's position (where its claim put it).
        features: what its prompt agrees on with its parent's.
        channel: how it enters its parent: "q", "k", "v", "pattern" or "stream".
        at: the position at which it enters its parent.
    """

    role: str
    site: object
    position: Position
    features: frozenset
    channel: str | None = None
    at: Position | None = None
    parent: Node | None = None
    children: list = field(default_factory=list)

    def step(self) -> tuple:
        return (self.role, str(self.site), str(self.position), self.channel,
                None if self.at is None else str(self.at))

    def path(self) -> tuple:
        steps, n = [], self
        while n is not None:
            steps.append(n.step())
            n = n.parent
        return tuple(reversed(steps))

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()


@dataclass(eq=False)
class _Claimed:
    """A node of the claim DAG, before the tree is copied out of it."""

    role: str
    site: object
    position: Position
    features: frozenset
    claimed: bool = False  # a depends-claim on it or on one of its input channels
    read: bool = False  # some edge or leaf link makes it a child of something
    kids: list = field(default_factory=list)  # (_Claimed, channel, at), in link order


def _covers(node_pos: Position, at: Position) -> bool:
    return node_pos == at or node_pos.is_all or at.is_all


def build_tree(hypothesis: Hypothesis) -> Node:
    """The treeified scrubbing tree of a hypothesis, by docs/checker.md's rules.

    Readings where the documentation is silent (taken from ir_to_graph's docstring or,
    failing that, the only reading that keeps each claim's meaning):

    * A sender node is a (site, position) pair; depends-claims on the same pair merge
      their features (the prompt must agree on all of them).
    * An edge `S -> R at P` reads every node of S whose position is P or `all` (every
      node of S when P is `all`); with none, an edge-only node (S, P) on its parent's
      prompt. Which of them enters where (docs/checker.md's table): at a named P, the
      node of S claimed at P if there is one, else the one claimed at `all`; an edge at
      `all` reads a node claimed at `all` everywhere and each node claimed at a named
      position at that position (a claim at a named position refines one at `all`).
      They enter every node of R that reads R's channel at P: for a query or an MLP the
      nodes at P or `all` (every node when P is `all`); for a key or value every node
      of R (a key at P feeds the head's output at every later position). With none, an
      edge-only node (R, P), or (R, all) for a key/value edge.
    * Edges are read in source order, after the depends-claims: a node an earlier edge
      made is found by a later one.
    * An input leaf is a child of the nodes of its head that read it: for a query or a
      pattern at P the nodes at P or `all` (a query at P feeds only the output at P, the
      rule a query edge follows), for a key or value every node; with none, of a new node
      at its position (`all` for a key or value). A logits leaf is a child of the root
      through the stream at its position. A head with an input leaf counts as claimed;
      claims on one leaf (site and position) merge their features, as on one sender.
    * The root always reads its stream from the remainder (an empty hypothesis is the
      fully scrubbed "random" model).
    """
    senders: list[_Claimed] = []
    root = _Claimed("root", Logits(), ALL, frozenset([INPUT]), claimed=True)
    leaves: dict = {}

    def find(site, at: Position) -> list[_Claimed]:
        return [t for t in senders if t.site == site and _covers(t.position, at)]

    def new(site, pos, features, claimed=False) -> _Claimed:
        t = _Claimed("sender", site, pos, frozenset(features), claimed)
        senders.append(t)
        return t

    def link(child: _Claimed, parent: _Claimed, channel: str, at: Position):
        entry = (child, channel, at)
        if not any(k is child and c == channel and a == at for k, c, a in parent.kids):
            parent.kids.append(entry)
        child.read = True

    def out(site):
        return site.with_channel(Channel.OUT) if isinstance(site, Head) else site

    depends = [c for c in hypothesis.claims if isinstance(c, DependsClaim)]
    edges = [c for c in hypothesis.claims if isinstance(c, EdgeClaim)]
    channel_claims = []
    for c in depends:
        site = c.site
        if isinstance(site, Logits) or (isinstance(site, Head) and site.channel is not Channel.OUT):
            channel_claims.append(c)
            continue
        existing = [t for t in senders if t.site == site and t.position == c.position]
        t = existing[0] if existing else new(site, c.position, ())
        t.features = t.features | frozenset(c.features)
        t.claimed = True

    def place(e, linking: bool) -> None:
        sender, receiver, at = out(e.sender), e.receiver, e.position
        found = find(sender, at)
        if at.is_all:  # the nodes claimed for the sender, else one edge-only node at `all`
            from_nodes = [t for t in found if t.claimed] or [t for t in found if t.position.is_all] \
                or [new(sender, at, [INPUT])]
        else:
            from_nodes = found or [new(sender, at, [INPUT])]
        if isinstance(receiver, Logits):
            parents, channel = [root], "stream"
        elif isinstance(receiver, Head):
            channel = receiver.channel.value if receiver.channel.is_input else "q"
            head = out(receiver)
            if channel == "q":
                parents = find(head, at) or [new(head, at, [INPUT])]
            else:
                parents = [t for t in senders if t.site == head] or [new(head, ALL, [INPUT])]
        elif isinstance(receiver, (Mlp, Neuron, Latent)):  # a stream read position by position
            channel = "stream"
            parents = find(receiver, at) or [new(receiver, at, [INPUT])]
        else:
            raise TypeError(f"{receiver} cannot receive an edge")
        if at.is_all:  # each node where it is claimed
            entries = [(t, t.position) for t in from_nodes]
        else:  # the claim at P itself, else the one at `all`
            here = [t for t in from_nodes if t.position == at]
            entries = [(t, at) for t in (here or from_nodes)]
        if linking:
            for p in parents:
                for s, where in entries:
                    link(s, p, channel, where)

    # docs/checker.md: the nodes edges need are made first, edges at `all` before those at
    # named positions and edges into keys and values last (whatever the statement order);
    # then every edge is linked to every node of its receiver it reaches
    def made_first(e) -> tuple:
        kv = isinstance(e.receiver, Head) and e.receiver.channel in (Channel.K, Channel.V)
        return (kv, not e.position.is_all, str(e.sender), str(e.receiver), str(e.position))

    for e in sorted(edges, key=made_first):
        place(e, linking=False)
    for e in edges:
        place(e, linking=True)

    for c in channel_claims:
        site, pos = c.site, c.position
        key = (site, pos)
        if key not in leaves:
            leaves[key] = _Claimed("input", site, pos, frozenset(), claimed=True)
        leaf = leaves[key]
        leaf.features = leaf.features | frozenset(c.features)  # as for senders: all must hold
        if isinstance(site, Logits):
            link(leaf, root, "stream", pos)
            continue
        head = site.with_channel(Channel.OUT)
        parents = [t for t in senders if t.site == head
                   and (site.channel in (Channel.K, Channel.V) or _covers(t.position, pos))]
        if not parents:
            parents = [new(head, pos if site.channel in (Channel.Q, Channel.PATTERN) else ALL, [INPUT])]
        for p in parents:
            p.claimed = True
            link(leaf, p, site.channel.value, pos)

    for t in senders:
        if not t.read and t.claimed:
            link(t, root, "stream", t.position)
        # an unclaimed site no edge reads has no path to the output: dropped

    def copy(t: _Claimed, parent: Node | None, channel, at) -> Node:
        n = Node(t.role, t.site, t.position, t.features, channel, at, parent)
        for kid, ch, a in t.kids:
            n.children.append(copy(kid, n, ch, a))
        return n

    return copy(root, None, None, None)


# ------------------------------------------------------------------ sample checks


def _index(prompts, position: Position, rows: np.ndarray) -> torch.Tensor:
    """Token index of a named position (with its offset) in each of the given prompts."""
    base = prompts.positions[position.name][torch.as_tensor(rows)]
    return base + position.offset


def _feature(prompts, feature: Feature, rows: np.ndarray) -> list:
    if feature.kind == "task":
        return [prompts.features[feature.name][r] for r in rows]
    if feature.name in prompts.features and feature.name not in prompts.positions:
        return [prompts.features[feature.name][r] for r in rows]  # token(IO): IO a feature
    idx = _index(prompts, Position.parse(feature.name), rows)
    if feature.kind == "position":
        return idx.tolist()
    return prompts.input_ids[torch.as_tensor(rows), idx].tolist()


def _check_agree(prompts, what: str, rows, parent_rows, features) -> None:
    lengths = prompts.attention_mask.sum(1)
    if not torch.equal(lengths[torch.as_tensor(rows)], lengths[torch.as_tensor(parent_rows)]):
        raise OracleMismatch(f"{what}: a sample has another token length than its parent's prompt")
    for f in features:
        if f == INPUT:
            if not np.array_equal(rows, parent_rows):
                raise OracleMismatch(f"{what}: should run on its parent's own prompt")
            continue
        if _feature(prompts, f, rows) != _feature(prompts, f, parent_rows):
            raise OracleMismatch(f"{what}: a sample disagrees with its parent's prompt on {f}")


# ------------------------------------------------------------------ the computation


class _Provenance:
    """Which prompt (and which of its token indices) a channel holds at each index.

    `src[b, i]` is an index into `caps` (the plain passes of prompts aligned with the
    references), -1 for the dataset mean, -2 for zero; `idx[b, i]` the token index in it.
    """

    def __init__(self, n: int, t: int, src: int):
        self.src = torch.full((n, t), src, dtype=torch.long)
        self.idx = torch.arange(t).expand(n, t).clone()


def naive_scrub(hypothesis: Hypothesis, hf_model, prompts, metric_fn: Callable, metric: str,
                rows: Mapping[tuple, np.ndarray], remainders: Mapping[tuple, np.ndarray]) -> np.ndarray:
    """The scrubbed metric per reference prompt, computed naively.

    Args:
        hypothesis: the resolved hypothesis (claims, ablation, semantics).
        hf_model: the HF causal LM (eager attention), as the product's model wraps it.
        prompts: the task's PromptSet (every prompt a reference and the resampling pool).
        metric_fn: `task.metric(name, logits, prompts, reference_logits=None)`.
        metric: the metric's name.
        rows: node path -> the prompt that node ran on, per reference ([N]).
        remainders: node path -> its remainder prompt per reference, for every node that
            reads a remainder (the root and every node with children).

    Raises:
        OracleMismatch: the trees differ, or a sample breaks the documented rules.
        Ambiguous: the tree asks for something the documentation does not decide.
    """
    model = NaiveModel(hf_model)
    tree = build_tree(hypothesis)
    mode = hypothesis.ablation.mode
    given = tuple(hypothesis.ablation.given)
    semantics = hypothesis.semantics
    n, t = prompts.input_ids.shape
    refs = np.arange(n)

    # -- the two trees must have the same nodes; the samples must follow the rules
    mine = {node.path(): node for node in tree.walk()}
    if len(mine) != sum(1 for _ in tree.walk()):
        raise OracleMismatch("two nodes of the oracle's tree share a path")
    if set(mine) != set(rows):
        raise OracleMismatch(
            "the trees differ:\n  only in the oracle's: "
            + "\n    ".join(map(str, sorted(set(mine) - set(rows), key=str)))
            + "\n  only in the scrubber's: "
            + "\n    ".join(map(str, sorted(set(rows) - set(mine), key=str))))
    reads_remainder = {p for p, node in mine.items() if node.role == "root" or node.children}
    if set(remainders) != reads_remainder:
        raise OracleMismatch(f"remainders given for {sorted(set(remainders) ^ reads_remainder, key=str)} "
                             "differ from the nodes that read one")
    if not np.array_equal(rows[tree.path()], refs):
        raise OracleMismatch("the root must run on the reference prompts")
    for path, node in mine.items():
        if node.parent is not None:
            _check_agree(prompts, f"node {path[-1]}", rows[path], rows[node.parent.path()], node.features)
        if path in remainders and mode == "corrupt":
            if not np.array_equal(remainders[path], rows[path]):
                raise OracleMismatch(f"remainder of {path[-1]}: `corrupt` reads the node's own "
                                     "prompts' counterfactuals")
        elif path in remainders:
            _check_agree(prompts, f"remainder of {path[-1]}", remainders[path], rows[path], given)

    # -- plain passes, one per prompt assignment (aligned with the references)
    caps: list[dict] = []
    cap_of: dict = {}

    def plain(prompt_rows: np.ndarray, corrupt: bool = False) -> int:
        """The plain pass of these prompts (or of their counterfactuals), by index in `caps`."""
        key = (corrupt,) + tuple(int(r) for r in prompt_rows)
        if key not in cap_of:
            idx = torch.as_tensor(prompt_rows)
            ids = prompts.corrupt_input_ids if corrupt else prompts.input_ids
            cap_of[key] = len(caps)
            caps.append(model.plain(ids[idx], prompts.attention_mask[idx]))
        return cap_of[key]

    dataset = caps[plain(refs)]
    real = prompts.attention_mask.to(dataset["final"].dtype)[..., None]

    def mean(values: torch.Tensor) -> torch.Tensor:  # [N, T, D] -> [T, D], padding excluded
        return (values * real).sum(0) / real.sum(0).clamp(min=1)

    def unwritten(key) -> torch.Tensor:
        """What is left of a stream when every sender contributes nothing: the output biases
        of the attention layers it sums (no head owns them). Checked against the stream
        minus every sender's output on the dataset, which is what it means."""
        left = model.biases_in(key).to(dataset[key].dtype)
        rest = dataset[key] - sum(model.site_value(dataset, s) for s in model.senders_of(key))
        if not torch.allclose(rest, left.expand_as(rest), atol=1e-4, rtol=0):
            raise AssertionError(f"the oracle's senders and biases do not add up to the stream {key}")
        return left.expand(n, t, -1).clone()

    def stream_key(node: Node, channel: str):
        if node.role == "root":
            return "final"
        if isinstance(node.site, (Mlp, Neuron)):
            return ("mlp_in", node.site.layer)
        if isinstance(node.site, Latent):
            return model.latent_stream(node.site)
        return ("resid", node.site.layer)

    def sender_value_in(cap: dict, site) -> torch.Tensor:
        return model.site_value(cap, site)

    def enters(child: Node, channel: str) -> bool:
        if child.channel == "pattern":
            return channel in ("q", "k")
        return child.channel == channel

    def reads_from_remainder(node: Node, channel: str) -> bool:
        if node.role == "root":
            return True
        if not node.children:
            return False
        if semantics == "paths":
            return True
        return any(enters(c, channel) for c in node.children)

    ar = torch.arange(n)

    def assemble(node: Node, channel: str) -> torch.Tensor:
        """The node's input through `channel`, laid out in its own prompts' positions."""
        path = node.path()
        node_rows = rows[path]
        key = stream_key(node, channel)
        if mode in ("resample", "corrupt"):
            rem = plain(remainders[path], corrupt=mode == "corrupt")
            value = caps[rem][key].clone()
            prov = _Provenance(n, t, rem)
        elif mode == "mean":
            value = mean(dataset[key]).expand(n, t, -1).clone()
            prov = _Provenance(n, t, -1)
        elif mode == "zero":
            value = unwritten(key)
            prov = _Provenance(n, t, -2)
        else:
            raise ValueError(mode)
        kids = [c for c in node.children if enters(c, channel)]

        def where(c: Node) -> torch.Tensor:  # [N, T] the indices of the node's prompt c writes
            mask = torch.zeros(n, t, dtype=torch.bool)
            if c.at.is_all or (c.channel == "pattern" and channel == "k"):
                mask[:] = True
            else:
                mask[ar, _index(prompts, c.at, node_rows)] = True
            return mask

        def placed(c: Node, values: torch.Tensor) -> torch.Tensor:
            """c's values (in its own prompts' positions) moved by name into the node's."""
            if c.at.is_all or (c.channel == "pattern" and channel == "k"):
                return values
            out = torch.zeros_like(values)
            out[ar, _index(prompts, c.at, node_rows)] = values[ar, _index(prompts, c.at, rows[c.path()])]
            return out

        written = torch.zeros(n, t, dtype=torch.bool)
        for c in kids:  # input leaves replace the whole channel at their positions
            if c.role != "input":
                continue
            mask = where(c)
            if (written & mask).any():
                raise Ambiguous(f"two input leaves write {node.step()}'s {channel} at one index")
            written |= mask
            leaf = plain(rows[c.path()])
            value[mask] = placed(c, caps[leaf][key])[mask]
            prov.src[mask] = leaf
            prov.idx[mask] = placed(c, torch.arange(t).expand(n, t)[..., None])[..., 0][mask]
        # Senders replace what their site contributes there with their own value, so one
        # site entering twice at one index counts once; a claim at `all` goes first and one
        # at a named position refines it there.
        held: dict = {}  # sender site -> (what it contributes to the channel now, named mask)
        written_by: dict = {}  # sender site -> indices some sender of it has written

        def swapped_by(site) -> torch.Tensor:
            return written_by.get(site, torch.zeros(n, t, dtype=torch.bool))

        senders = sorted((c for c in kids if c.role == "sender"), key=lambda c: not c.at.is_all)
        for c in senders:
            if c.site not in held:
                # its contribution on whatever prompt the channel holds, index by index
                contribution = torch.zeros_like(value)
                for src in prov.src.unique().tolist():
                    at = prov.src == src
                    if src == -1:
                        contribution[at] = mean(sender_value_in(dataset, c.site)).expand(n, t, -1)[at]
                    elif src >= 0:
                        bi, ti = at.nonzero(as_tuple=True)
                        contribution[bi, ti] = sender_value_in(caps[src], c.site)[bi, prov.idx[bi, ti]]
                held[c.site] = (contribution, torch.zeros(n, t, dtype=torch.bool))
            current, named = held[c.site]  # named: indices a claim at a named position wrote
            mask, new = where(c), placed(c, evaluate(c))
            clash = (named if not c.at.is_all else torch.ones_like(named)) & mask & swapped_by(c.site)
            if clash.any() and not torch.allclose(current[clash], new[clash], atol=1e-9, rtol=0):
                raise Ambiguous(f"two values of {c.site} for one index of {node.step()}'s {channel}")
            value[mask] += new[mask] - current[mask]
            current[mask] = new[mask]
            if not c.at.is_all:
                named |= mask
            written_by.setdefault(c.site, torch.zeros(n, t, dtype=torch.bool)).__ior__(mask)
        return value

    values: dict = {}

    def evaluate(node: Node) -> torch.Tensor:
        """A sender node's output, [N, T, D] in its own prompts' positions."""
        path = node.path()
        if path in values:
            return values[path]
        node_rows = rows[path]
        if not node.children:
            out = sender_value_in(caps[plain(node_rows)], node.site)
        elif isinstance(node.site, Head):
            channels = {ch: assemble(node, ch) for ch in ("q", "k", "v") if reads_from_remainder(node, ch)}
            idx = torch.as_tensor(node_rows)
            out = model.head_output(prompts.input_ids[idx], prompts.attention_mask[idx],
                                    node.site.layer, node.site.head, channels)
        elif isinstance(node.site, Mlp):
            out = model.mlp_output(node.site.layer, assemble(node, "stream"))
        elif isinstance(node.site, Neuron):
            out = model.neuron_output(node.site, assemble(node, "stream"))
        elif isinstance(node.site, Latent):
            out = model.latent_output(node.site, assemble(node, "stream"))
        else:
            raise ValueError(f"{node.site} cannot have children")
        values[path] = out
        return out

    final = assemble(tree, "stream")
    logits = model.unembed(final)
    reference = dataset["logits"]
    with torch.no_grad():
        out = metric_fn(metric, logits, prompts, reference_logits=reference)
    return out.detach().to(torch.float64).numpy()
