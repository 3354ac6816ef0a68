"""Typed sites: a place in a transformer is a value, never a hook-name string.

These values are shared by every stage: the resolver produces them from the
language (`head 9.6.q at END`), the model adapters turn them into tensors (the only
place that knows module paths), and the intervention graph uses them as node keys.

Conventions (the same for every architecture):

* `Embed()` is the residual stream's starting value: token plus learned positional
  embeddings (rotary models have only the token part). `TokenEmbed()` and
  `PosEmbed()` name the two parts separately.
* `Head(layer, head, channel)` is one attention head. Channel `Q`, `K`, `V` is the
  *input* of that head's query/key/value computation: the normalised residual
  stream the head reads, at the given positions (so an edge `5.5 -> 8.6.q` changes
  what 8.6's query sees). Channel `OUT` is the head's own contribution to the
  residual stream (its `z @ W_O` slice, without the shared output bias). Channel
  `PATTERN` is its attention pattern (after softmax), shape [query, key].
* `Mlp(layer)` is the MLP block's output (its contribution to the residual stream);
  `MlpIn(layer)` is the stream it reads, before its layer norm.
* `Resid(layer)` is the residual stream entering block `layer`;
  `Resid(n_layers)` is the final residual stream before the final norm.
* `Logits()` is the unembedded output.
* `Neuron(layer, index)` is one MLP hidden unit: its activation, one number per
  position, where it enters the MLP's output projection (GELU MLPs: `act(x W_in)[N]`;
  gated MLPs (Llama family): `act(gate)[N] * up[N]`). Its contribution to the
  residual stream is `activation * W_out[N]`.
* `Latent(sae, index)` is one latent of a sparse autoencoder spliced in at the
  dictionary's hook point (`Dictionary`), its activation after the SAE's
  nonlinearity; `SaeError(sae)` is what the dictionary misses there (`x - x_hat`,
  Marks et al. 2024), [B, T, D]. `AllNeurons(layer)` and `AllLatents(sae)` are every
  unit of one MLP or one dictionary as one value (the last axis indexes the unit).
* `Written(unit)` is what a neuron or a latent writes into the residual stream,
  [B, T, D]: `activation * W_out[N]`, or the latent's decoder row times its activation
  (scaled as the dictionary un-normalises). It is how the scrubber reads a unit as a
  sender: its value adds into the stream the way a head's output does.

Positions are names a task defines (`Position("S1", 1)` is `S1+1`); `ALL` is every
position. The model layer receives concrete per-row token indices, never names.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Union


class Channel(enum.Enum):
    """Which part of an attention head a site refers to."""

    Q = "q"
    K = "k"
    V = "v"
    OUT = "out"
    PATTERN = "pattern"

    # members are singletons compared by identity: hashing by identity agrees with that,
    # and is a C slot where Enum's hashes the name in Python (sites hash their channel
    # wherever they key a dict, millions of times in a permutation test)
    __hash__ = object.__hash__

    @classmethod
    def parse(cls, text: str) -> "Channel":
        for channel in cls:
            if channel.value == text:
                return channel
        raise ValueError(f"unknown channel {text!r}")

    @property
    def is_input(self) -> bool:
        return self in (Channel.Q, Channel.K, Channel.V)


#: A head's input channels, in the order its projections compute them.
QKV = (Channel.Q, Channel.K, Channel.V)


@dataclass(frozen=True, slots=True)
class Embed:
    """Token + positional embedding: the residual stream before block 0."""

    def __str__(self) -> str:
        return "embed"


@dataclass(frozen=True, slots=True)
class TokenEmbed:
    """The token embedding alone."""

    def __str__(self) -> str:
        return "embed.token"


@dataclass(frozen=True, slots=True)
class PosEmbed:
    """The learned positional embedding alone (absent in rotary models)."""

    def __str__(self) -> str:
        return "embed.position"


@dataclass(frozen=True, slots=True, order=True)
class Head:
    """One attention head; `channel` picks its q/k/v input, output, or pattern."""

    layer: int
    head: int
    channel: Channel = Channel.OUT

    def with_channel(self, channel: Channel) -> "Head":
        return Head(self.layer, self.head, channel)

    def __str__(self) -> str:
        base = f"head {self.layer}.{self.head}"
        return base if self.channel is Channel.OUT else f"{base}.{self.channel.value}"


@dataclass(frozen=True, slots=True, order=True)
class Mlp:
    """The output of MLP block `layer`."""

    layer: int

    def __str__(self) -> str:
        return f"mlp {self.layer}"


@dataclass(frozen=True, slots=True, order=True)
class MlpIn:
    """The residual stream MLP block `layer` reads, before its layer norm.

    Patching it changes only what the MLP sees, not the residual stream itself.
    """

    layer: int

    def __str__(self) -> str:
        return f"mlp {self.layer}.in"


@dataclass(frozen=True, slots=True, order=True)
class Resid:
    """The residual stream entering block `layer` (`n_layers` means the final one)."""

    layer: int

    def __str__(self) -> str:
        return f"resid {self.layer}"


@dataclass(frozen=True, slots=True)
class Logits:
    """The model's output logits."""

    def __str__(self) -> str:
        return "logits"


@dataclass(frozen=True, slots=True, order=True)
class Neuron:
    """One hidden unit of MLP `layer` (its activation; it writes `act * W_out[index]`)."""

    layer: int
    index: int

    def __str__(self) -> str:
        return f"neuron {self.layer}.{self.index}"


#: Where a dictionary reads and writes: the stream entering a block, an attention
#: block's output (every head plus the output bias), or an MLP block's output.
SAE_HOOKS = ("resid", "attn", "mlp")


@dataclass(frozen=True, slots=True, order=True)
class Dictionary:
    """A sparse autoencoder declared in a file: `sae res5 = "path" at resid 5`.

    Attributes:
        name: what the file calls it (`res5`).
        path: the folder its weights are in (resolved, absolute).
        hook: one of `SAE_HOOKS`.
        layer: the block (`resid` takes 0..n_layers, n_layers being the final stream).
        d_sae: its number of latents (read from its cfg.json by the resolver; 0 unknown).
    """

    name: str
    path: str
    hook: str
    layer: int
    d_sae: int = 0

    def __str__(self) -> str:
        return f"sae {self.name} at {self.hook} {self.layer}"


@dataclass(frozen=True, slots=True, order=True)
class Latent:
    """Latent `index` of a spliced-in dictionary: its activation, [B, T]."""

    sae: Dictionary
    index: int

    def __str__(self) -> str:
        return f"feature {self.sae.name}.{self.index}"


@dataclass(frozen=True, slots=True, order=True)
class LatentIn:
    """The stream latent `index` reads at its dictionary's hook point, [B, T, D]: patching it
    changes that latent only (path patching into a latent), as `MlpIn` does for an MLP."""

    sae: Dictionary
    index: int

    def __str__(self) -> str:
        return f"feature {self.sae.name}.{self.index}.in"


@dataclass(frozen=True, slots=True, order=True)
class SaeError:
    """A dictionary's reconstruction error at its hook point: `x - decode(encode(x))`."""

    sae: Dictionary

    def __str__(self) -> str:
        return f"error {self.sae.name}"


@dataclass(frozen=True, slots=True, order=True)
class AllNeurons:
    """Every hidden unit of MLP `layer` at once, [B, T, d_mlp] (sweeps, attribution)."""

    layer: int

    def __str__(self) -> str:
        return f"neuron {self.layer}.*"


@dataclass(frozen=True, slots=True, order=True)
class AllLatents:
    """Every latent of a spliced-in dictionary at once, [B, T, d_sae] (sweeps, attribution)."""

    sae: Dictionary

    def __str__(self) -> str:
        return f"feature {self.sae.name}.*"


@dataclass(frozen=True, slots=True, order=True)
class Written:
    """What a neuron or an SAE latent writes into the residual stream, or the part of a
    subspace's state that lies in it (`c B^T`), [B, T, D]. Captured only; to change it,
    patch the unit or the subspace itself."""

    unit: "Neuron | Latent | Subspace"

    def __str__(self) -> str:
        return f"{self.unit}.written"


#: Where a subspace lies: the stream entering a block, one head's output, an MLP's output.
SUBSPACE_HOOKS = ("resid", "head", "mlp")


@dataclass(frozen=True, slots=True, order=True)
class Basis:
    """A subspace declared in a file: `subspace io = "io.safetensors" at resid 6`, or
    learned by `align io at resid 6 at END with IO dims 1` (DAS).

    Attributes:
        name: what the file calls it (`io`).
        path: the safetensors file its [d_model, k] orthonormal basis is in (absolute).
        hook: one of `SUBSPACE_HOOKS`.
        layer: the block (`resid` takes 0..n_layers, n_layers being the final stream).
        head: the head, for `hook == "head"` (its output, `z_h @ W_O[h]`); else None.
        k: its dimension (0: not known until an `align` statement has run).
        key: the tensor the file holds it under (`basis`, or a probe file's `layer{L}.basis`).
        seed: not None for a random subspace of the same place and dimension (the
            permutation null's): its basis is drawn from this seed, not read from `path`.
    """

    name: str
    path: str
    hook: str
    layer: int
    head: int | None = None
    k: int = 0
    key: str = "basis"
    seed: int | None = None

    def __str__(self) -> str:
        at = f"head {self.layer}.{self.head}.out" if self.hook == "head" else f"{self.hook} {self.layer}"
        return f"subspace {self.name} at {at}"


@dataclass(frozen=True, slots=True, order=True)
class Subspace:
    """A state's coordinates in a declared subspace, `x @ B` [B, T, k]. Patching them moves
    the state by `(new - old) @ B.T`: the orthogonal complement is left as it was, so a
    patch with another prompt's coordinates is an interchange intervention (Geiger et al.)."""

    basis: Basis

    def __str__(self) -> str:
        return f"subspace {self.basis.name}"


Site = Union[Embed, TokenEmbed, PosEmbed, Head, Mlp, MlpIn, Resid, Logits, Neuron, Latent, SaeError,
             AllNeurons, AllLatents, LatentIn, Subspace, Written]


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """A token position named by a task, with an optional offset (`S1+1`).

    `Position("all")` (the constant `ALL`) means every position.
    """

    name: str
    offset: int = 0

    @property
    def is_all(self) -> bool:
        return self.name == "all"

    @classmethod
    def parse(cls, text: str) -> "Position":
        """`"S1+1"` -> `Position("S1", 1)`, `"END-2"` -> `Position("END", -2)`, `"all"` -> `ALL`.

        The one reading of a position's text, for every stage.

        Raises:
            ValueError: `text` is not an identifier with an optional signed offset.
        """
        match = _POSITION_TEXT.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"{text!r} is not a position (a name with an optional offset, like END or S1+1)")
        name, offset = match.group(1), match.group(2)
        return cls(name, int(offset) if offset else 0)

    def __str__(self) -> str:
        if self.offset > 0:
            return f"{self.name}+{self.offset}"
        if self.offset < 0:
            return f"{self.name}{self.offset}"
        return self.name


_POSITION_TEXT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)([+-][0-9]+)?")
ALL = Position("all")


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What sites a model has: enough to check a hypothesis without loading weights.

    Attributes:
        n_layers: number of transformer blocks.
        n_heads: query heads per attention layer.
        n_kv_heads: key/value heads per layer (== n_heads unless grouped-query).
        d_model: residual stream width.
        d_head: per-head width.
        vocab_size: tokenizer vocabulary size.
        n_ctx: maximum context length.
        has_mlp: False for attention-only models.
        d_mlp: MLP hidden width (neurons per layer; 0 when not known without weights).
        parallel_residual: True when each block's MLP reads the block's input (the
            same stream as its attention: GPT-NeoX/Pythia), so a head cannot feed the
            MLP of its own layer.
        architecture: the HF `config.model_type` ("gpt2", "gpt_neox", "llama", ...), which
            names the adapter that knows the model's modules.
        name: what the user called the model (hub id, path or short name).
    """

    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    n_kv_heads: int | None = None
    vocab_size: int = 0
    n_ctx: int = 0
    has_mlp: bool = True
    parallel_residual: bool = False
    architecture: str = "unknown"
    name: str = ""
    d_mlp: int = 0

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def kv_group(self) -> int:
        """Query heads per key/value head (1 unless grouped-query attention)."""
        return self.n_heads // self.kv_heads

    def heads(self) -> list[Head]:
        """Every head, in (layer, head) order."""
        return [Head(l, h) for l in range(self.n_layers) for h in range(self.n_heads)]

    def describe(self) -> str:
        return f"{self.n_layers} layers x {self.n_heads} heads"
