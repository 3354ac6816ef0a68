"""The model's computational graph: which sites send, which receive, which edges exist.

The one authority every stage asks: the resolver checks `5.5 -> 8.6.q at END` with it,
the lowering orders its scrubbing tree by it, the edge engine builds its masks from it,
and the solver enumerates candidate edges with it. It needs only a `ModelShape`
(never weights), so a hypothesis is checked before any model loads.

The graph (ACDC's, as auto-circuit draws it). The residual stream is a sum of node
outputs, so an edge `sender -> receiver` means "the stream the receiver reads contains
the sender's output":

* **Senders** add to the stream: `Embed()` (token + positional embedding), each head's
  own output `Head(l, h)` (channel OUT), each MLP's output `Mlp(l)`.
* **Receivers** read it: a head's query, key or value input `Head(l, h, Q|K|V)`, an
  MLP's input `Mlp(l)`, and the final stream `Logits()`.
* An edge exists when the sender is computed before the receiver reads the stream:
  anything reaches the logits; a head of layer l reads every sender of earlier layers;
  the MLP of layer l also reads the heads of its own layer, except in models with
  parallel attention and MLP (`ModelShape.parallel_residual`: GPT-NeoX / Pythia), where
  both read the block's input.
* Under grouped-query attention one key/value head serves a group of query heads, so
  `Head(l, h, K)` and `Head(l, h + 1, K)` may be the same receiver: `canonical` maps a
  receiver to the first query head of its group.

`Resid(l)` is not a node: it is the sum of the senders before layer l.

Below the component, a neuron `Neuron(l, n)` sends as part of MLP l (it writes
`act * W_out[n]`), and an SAE's latents and error term (`Latent`, `SaeError`) send
where their dictionary is spliced in: a dictionary at `resid L` writes into the
stream entering block L, one at `attn L` beside layer L's heads, one at `mlp L` as
MLP L. A latent also receives: its hook point holds the senders before it (a
dictionary at `attn L`: layer L's heads; at `mlp L`: MLP L); a neuron receives what
its MLP reads; a subspace sends where its state is and, for a stream's (`resid L`),
receives the senders before it. All of them are nodes of the causal-scrubbing graph
(`site_order` places them); the edge engine's own lists (`senders`, `receivers`) are
components only.
"""
from __future__ import annotations

from circuitlang.sites import Channel, Embed, Head, Latent, Logits, Mlp, ModelShape, Neuron, SaeError, Site, Subspace

__all__ = ["canonical", "edge_exists", "edge_problem", "edges", "is_receiver", "is_sender",
           "receivers", "sender_key", "senders", "site_order", "subspace_owner"]

SENDERS_HINT = ("senders are embed, head L.H (its output), mlp L, neuron L.N, feature S.I, "
                "error S and subspace S")
RECEIVERS_HINT = ("receivers are head L.H.q / .k / .v, mlp L and neuron L.N (the MLP's input), logits, "
                  "feature S.I (what the latent reads) and subspace S (of a stream: that stream; of a "
                  "head's or an MLP's output: what that head or MLP reads)")


def is_sender(site: Site) -> bool:
    """True for sites whose output adds into the residual stream."""
    return isinstance(site, (Embed, Mlp, Neuron, Latent, SaeError, Subspace)) or (
        isinstance(site, Head) and site.channel is Channel.OUT)


def subspace_owner(site: Subspace) -> Head | Mlp | None:
    """The head or MLP whose output a subspace lies in (None: a subspace of a stream)."""
    basis = site.basis
    if basis.hook == "head":
        return Head(basis.layer, basis.head)
    if basis.hook == "mlp":
        return Mlp(basis.layer)
    return None


def is_receiver(site: Site) -> bool:
    """True for sites that read the residual stream (an SAE latent reads its hook point)."""
    return (isinstance(site, (Mlp, Neuron, Logits, Latent, Subspace))
            or (isinstance(site, Head) and site.channel.is_input))


def sender_key(site: Site) -> tuple[int, int, int]:
    """Where a sender's output enters the stream: (layer, 0 heads | 1 MLP, head); embed first.

    Sorting senders by it gives the order of computation.

    Raises:
        ValueError: `site` is not a sender.
    """
    if isinstance(site, Embed):
        return (-1, 0, 0)
    if isinstance(site, Head) and site.channel is Channel.OUT:
        return (site.layer, 0, site.head)
    if isinstance(site, Mlp):
        return (site.layer, 1, 0)
    if isinstance(site, Neuron):
        return (site.layer, 1, 1 + site.index)
    if isinstance(site, (Latent, SaeError)):
        return _unit_key(site)
    if isinstance(site, Subspace):  # where its state is: a head's output is the head's place
        basis = site.basis
        if basis.hook == "head":
            return (basis.layer, 0, basis.head)
        return (basis.layer - 1, 2, _AFTER_HEADS) if basis.hook == "resid" else (basis.layer, 1, _AFTER_HEADS)
    raise ValueError(f"{site} is not a sender ({SENDERS_HINT})")


_AFTER_HEADS = 1 << 40  # a dictionary at `attn L` sorts after every head of layer L


def _unit_key(site) -> tuple[int, int, int]:
    sae = site.sae
    index = site.index if isinstance(site, Latent) else sae.d_sae
    if sae.hook == "resid":  # the stream entering block L: after everything of layer L - 1
        return (sae.layer - 1, 2, index)
    if sae.hook == "attn":
        return (sae.layer, 0, _AFTER_HEADS + index)
    return (sae.layer, 1, 1 + index)


def site_order(site: Site) -> float:
    """Where a site sits in the forward pass, for ordering nodes of any kind: a sender
    where its output enters the stream, a receiver where it reads it (a head's output
    and its q/k/v inputs share a place; an MLP comes after its layer's heads)."""
    if isinstance(site, Embed):
        return -1.0
    if isinstance(site, Head):
        return float(2 * site.layer)
    if isinstance(site, Mlp):
        return 2 * site.layer + 1.0
    if isinstance(site, Neuron):
        return 2 * site.layer + 1.0
    if isinstance(site, (Latent, SaeError)):  # where its dictionary's hook point is
        offset = {"resid": -0.5, "attn": 0.5, "mlp": 1.0}[site.sae.hook]
        return 2 * site.sae.layer + offset
    if isinstance(site, Subspace):
        offset = {"resid": -0.5, "head": 0.0, "mlp": 1.0}[site.basis.hook]
        return 2 * site.basis.layer + offset
    if isinstance(site, Logits):
        return float("inf")
    raise ValueError(f"{site} is not a node of the computational graph ({SENDERS_HINT}; {RECEIVERS_HINT})")


def edge_problem(shape: ModelShape | None, sender: Site, receiver: Site) -> str | None:
    """Why `sender -> receiver` is not an edge of this model, or None when it is one.

    Args:
        shape: the model's shape (None: a model without parallel residuals, ranges unchecked).
        sender: a sender site.
        receiver: a receiver site.
    """
    if not is_sender(sender):
        return f"{sender} cannot send an edge ({SENDERS_HINT})"
    if not is_receiver(receiver):
        return f"{receiver} cannot receive an edge ({RECEIVERS_HINT})"
    if shape is not None:
        for site in (sender, receiver):
            layer = getattr(site, "layer", None)
            if layer is not None and not 0 <= layer < shape.n_layers:
                return f"{site}: the model has layers 0-{shape.n_layers - 1}"
            if isinstance(site, Head) and not 0 <= site.head < shape.n_heads:
                return f"{site}: the model has heads 0-{shape.n_heads - 1} per layer"
            if isinstance(site, Mlp) and not shape.has_mlp:
                return f"{site}: the model is attention-only"
    if isinstance(receiver, Logits):
        return None
    if isinstance(receiver, Latent):
        return _latent_reads(sender, receiver)
    if isinstance(receiver, Subspace):
        basis = receiver.basis
        if basis.hook == "resid":  # of the stream entering block L: every sender before it
            if sender_key(sender) < (basis.layer - 1, 2, -1):
                return None
            return f"{sender} is computed after the stream entering block {basis.layer}, which {receiver} lies in"
        # of a head's or an MLP's output: it receives what that head or MLP reads
        owner = subspace_owner(receiver)
        reader = owner.with_channel(Channel.Q) if isinstance(owner, Head) else owner
        problem = edge_problem(shape, sender, reader)
        return None if problem is None else f"{problem} ({receiver} is part of {owner}'s output)"
    s_layer, s_kind, _ = sender_key(sender)
    if isinstance(receiver, Head):
        if s_layer < receiver.layer:
            return None
        return (f"{sender} is computed after {receiver} reads the residual stream: a head reads "
                "only senders of earlier layers")
    if s_layer < receiver.layer:
        return None
    if s_layer == receiver.layer and s_kind == 0:
        if shape is not None and shape.parallel_residual:
            return (f"{receiver} reads its block's input, beside the attention (parallel attention "
                    f"and MLP), so {sender} does not reach it")
        return None
    return f"{sender} is computed after {receiver} reads the residual stream"


def _latent_reads(sender: Site, receiver: Latent) -> str | None:
    """Whether a latent's hook point holds `sender`'s output directly: the stream entering
    block L holds every sender before it; an attention block's output its layer's heads; an
    MLP's output that MLP (and its neurons)."""
    sae = receiver.sae
    if sae.hook == "resid":
        if sender_key(sender) < (sae.layer - 1, 2, -1):
            return None
        return f"{sender} is computed after the stream entering block {sae.layer}, which {receiver} reads"
    if sae.hook == "attn":
        if isinstance(sender, Head) and sender.layer == sae.layer:
            return None
        return f"{receiver} reads attention block {sae.layer}'s output: only that layer's heads send to it"
    if isinstance(sender, (Mlp, Neuron)) and sender.layer == sae.layer:
        return None
    return f"{receiver} reads MLP {sae.layer}'s output: only that MLP (and its neurons) sends to it"


def edge_exists(shape: ModelShape | None, sender: Site, receiver: Site) -> bool:
    """True when `sender`'s output is part of the stream `receiver` reads (see module docstring)."""
    return edge_problem(shape, sender, receiver) is None


def canonical(shape: ModelShape | None, receiver: Site) -> Site:
    """A receiver as the edge engine names it: under grouped-query attention a key or value
    input is named by the first query head of its group; everything else is itself."""
    if (shape is not None and isinstance(receiver, Head) and receiver.channel in (Channel.K, Channel.V)
            and shape.kv_group > 1):
        return Head(receiver.layer, receiver.head - receiver.head % shape.kv_group, receiver.channel)
    return receiver


def senders(shape: ModelShape) -> list[Site]:
    """Every sender, in the order of computation."""
    out: list[Site] = [Embed()]
    for layer in range(shape.n_layers):
        out += [Head(layer, h) for h in range(shape.n_heads)]
        if shape.has_mlp:
            out.append(Mlp(layer))
    return out


def receivers(shape: ModelShape) -> list[Site]:
    """Every receiver: per layer each head's q, k, v (k and v once per key/value group),
    then the MLP; finally the logits."""
    out: list[Site] = []
    for layer in range(shape.n_layers):
        for channel in (Channel.Q, Channel.K, Channel.V):
            step = 1 if channel is Channel.Q else shape.kv_group
            out += [Head(layer, h, channel) for h in range(0, shape.n_heads, step)]
        if shape.has_mlp:
            out.append(Mlp(layer))
    out.append(Logits())
    return out


def edges(shape: ModelShape) -> list[tuple[Site, Site]]:
    """Every edge of the model as (sender, receiver), receivers in order, then senders."""
    return [(s, r) for r in receivers(shape) for s in senders(shape) if edge_exists(shape, s, r)]
