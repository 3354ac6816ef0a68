"""The adapter contract: where an architecture keeps each part of a transformer.

An adapter takes a loaded Hugging Face causal LM and gives the run engine
(`circuitlang.models.run`) the modules to hook and the per-head weight slices it
needs. Adapters are the only place module paths appear; every other part of
circuitlang speaks in typed sites (`circuitlang.sites`).

Adding an architecture is one small file: subclass `Adapter`, fill in the module
accessors and the q/k/v column layout, and decorate the class with `@register`.
"""
from __future__ import annotations

from dataclasses import dataclass
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from circuitlang.errors import ModelError
from circuitlang.models.offload import is_offloaded, resident
from circuitlang.sites import Channel, ModelShape

#: HF `config.model_type` -> adapter class.
_REGISTRY: dict[str, type["Adapter"]] = {}


def register(cls: type["Adapter"]) -> type["Adapter"]:
    """Class decorator: make `cls` the adapter for each of its `model_types`."""
    for model_type in cls.model_types:
        _REGISTRY[model_type] = cls
    return cls


def supported_model_types() -> tuple[str, ...]:
    """The HF `config.model_type` values circuitlang has an adapter for."""
    _import_builtin_adapters()
    return tuple(sorted(_REGISTRY))


def adapter_class(model_type: str, name: str = "") -> type["Adapter"]:
    """The adapter class for a HF `model_type`.

    Raises:
        ModelError: no adapter handles this architecture.
    """
    _import_builtin_adapters()
    cls = _REGISTRY.get(model_type)
    if cls is None:
        supported = ", ".join(sorted(_REGISTRY))
        what = f"model {name!r}" if name else "this model"
        raise ModelError(
            f"{what} has architecture {model_type!r}, which circuitlang does not support",
            code="model.unsupported-architecture",
            hint=f"supported architectures (HF config.model_type): {supported}",
        )
    return cls


def _import_builtin_adapters() -> None:
    # Imported on first use (not at import time) so the registry fills lazily.
    from circuitlang.models.adapters import gpt2, gpt_neox, llama  # noqa: F401


def shape_from_config(config: Any, name: str = "") -> ModelShape:
    """A `ModelShape` from a HF config, without building the model.

    Raises:
        ModelError: an unsupported architecture, or a config no model can have (no
            layers, no heads, a width the heads do not divide, ...), naming the field.
    """
    cls = adapter_class(getattr(config, "model_type", "?"), name)
    check_config(config, name)
    return cls.shape_from_config(config, name)


def check_config(config: Any, name: str = "") -> None:
    """Refuse a config whose sizes no transformer can have, before anything divides by them.

    Reads the standard field names (transformers maps GPT-2's `n_head`, `n_layer`,
    `n_embd` onto them); a field a config does not have is not checked.

    Raises:
        ModelError: the first impossible field, by the name config.json gives it.
    """
    aliases = dict(getattr(config, "attribute_map", {}))  # standard name -> the config's own
    what = f"model {name!r}" if name else "this model"

    def bad(field: str, value: Any, why: str) -> ModelError:
        written = aliases.get(field, field)
        return ModelError(f"{what}: config.json has {written}={value!r}; {why}",
                          code="model.bad-config",
                          hint="fix config.json (or save the model again with save_pretrained)")

    sizes: dict[str, int] = {}
    for field, minimum in (("num_hidden_layers", 1), ("num_attention_heads", 1),
                           ("hidden_size", 1), ("vocab_size", 1), ("num_key_value_heads", 1),
                           ("head_dim", 1), ("max_position_embeddings", 0)):
        value = getattr(config, field, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad(field, value, "it must be a whole number")
        if value < minimum:
            raise bad(field, value, f"it must be at least {minimum}")
        sizes[field] = value
    heads = sizes.get("num_attention_heads")
    if heads and "head_dim" not in sizes and "hidden_size" in sizes \
            and sizes["hidden_size"] % heads:
        raise bad("hidden_size", sizes["hidden_size"],
                  f"it must be a multiple of the number of heads ({heads})")
    kv = sizes.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise bad("num_key_value_heads", kv,
                  f"the number of heads ({heads}) must be a multiple of it")


@dataclass(frozen=True, slots=True)
class Projection:
    """Where one channel (q, k or v) of every head of a layer is computed.

    Attributes:
        module: the linear layer whose output holds the channel (maybe fused with others).
        columns: LongTensor [n_heads_c, d_head]: output columns of head i's channel.
        weight: [n_heads_c, d_model, d_head]: maps the normalised input to head i's channel.
    """

    module: nn.Module
    columns: torch.Tensor
    weight: torch.Tensor


def linear_weight_in_out(module: nn.Module) -> torch.Tensor:
    """The weight of a linear layer as [in, out] (HF `Conv1D` already is; `nn.Linear` is not)."""
    weight = resident(module, "weight")  # an offloaded layer's, read from accelerate's map
    if isinstance(module, nn.Linear):
        return weight.t()
    return weight  # transformers.pytorch_utils.Conv1D stores [in, out]


def linear_bias(module: nn.Module) -> torch.Tensor | None:
    return resident(module, "bias")


def head_outputs(zh: torch.Tensor, w_o: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, T, D]: each head's own output `z_h @ W_O[h]` from zh [B, T, H, dh] and
    w_o [H, dh, D]; a view of `out` [H, B, T, D] when given (one GEMM per head)."""
    b, t, n, dh = zh.shape
    zc = zh.permute(2, 0, 1, 3).reshape(n, b * t, dh)
    if out is None:
        out = torch.bmm(zc, w_o).view(n, b, t, -1)
    else:
        torch.bmm(zc, w_o, out=out.view(n, b * t, -1))
    return out.transpose(0, 1)


class Adapter(ABC):
    """Module accessors and weight layouts for one architecture.

    Subclasses set `name`, `model_types`, and implement the accessors below. The
    base class derives per-head weights from them and caches them per layer.
    """

    name: ClassVar[str] = "base"
    model_types: ClassVar[tuple[str, ...]] = ()
    #: True when a rotary model has no learned positional embedding.
    has_pos_embed: ClassVar[bool] = True

    def __init__(self, hf_model: nn.Module):
        self.model = hf_model
        self.config = hf_model.config
        self._projections: dict[tuple[int, Channel], Projection] = {}
        self._out_weights: dict[int, torch.Tensor] = {}

    # ---- shape -----------------------------------------------------------------
    @classmethod
    def shape_from_config(cls, config: Any, name: str = "") -> ModelShape:
        n_heads = int(config.num_attention_heads)
        d_model = int(config.hidden_size)
        d_head = getattr(config, "head_dim", None) or d_model // n_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        return ModelShape(
            n_layers=int(config.num_hidden_layers),
            n_heads=n_heads,
            d_model=d_model,
            d_head=int(d_head),
            n_kv_heads=int(n_kv),
            vocab_size=int(config.vocab_size),
            n_ctx=int(getattr(config, "max_position_embeddings", 0) or 0),
            has_mlp=not bool(getattr(config, "circuitlang_attn_only", False)),
            parallel_residual=cls.config_parallel_residual(config),
            architecture=str(getattr(config, "model_type", cls.name)),
            name=name,
            d_mlp=cls.config_d_mlp(config),
        )

    @classmethod
    def config_d_mlp(cls, config: Any) -> int:
        """The MLP hidden width a config gives (`intermediate_size`; GPT-2's `n_inner`,
        4 x d_model when unset)."""
        width = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
        return int(width or 4 * int(config.hidden_size))

    # ---- module accessors (one architecture's module paths) ----------------------
    @abstractmethod
    def token_embed(self) -> nn.Module:
        ...

    def pos_embed(self) -> nn.Module | None:
        return None

    @abstractmethod
    def blocks(self) -> list[nn.Module]:
        ...

    @abstractmethod
    def attn(self, layer: int) -> nn.Module:
        """The attention module; its forward returns (output, pattern)."""
        ...

    @abstractmethod
    def attn_norm(self, layer: int) -> nn.Module:
        """The norm whose output the attention reads."""
        ...

    @abstractmethod
    def mlp_norm(self, layer: int) -> nn.Module:
        """The norm whose output the MLP reads (its input is the MLP's input stream)."""
        ...

    @abstractmethod
    def mlp(self, layer: int) -> nn.Module:
        ...

    def mlp_out_proj(self, layer: int) -> nn.Module:
        """The MLP's output projection; its input is the hidden units [B, T, d_mlp]
        (`Neuron` sites: after the activation, and after the gate in gated MLPs)."""
        raise ModelError(f"the {self.name} adapter does not name its MLP's output projection",
                         code="model.no-neurons",
                         hint="neuron sites need Adapter.mlp_out_proj for this architecture")

    def neuron_out_weight(self, layer: int) -> torch.Tensor:
        """W_out of MLP `layer` as [d_mlp, d_model]: row N is what neuron N writes per unit."""
        return linear_weight_in_out(self.mlp_out_proj(layer)).detach()

    @abstractmethod
    def out_proj(self, layer: int) -> nn.Module:
        """The attention output projection; its input is z [B, T, n_heads * d_head]."""
        ...

    @abstractmethod
    def final_norm(self) -> nn.Module:
        ...

    @abstractmethod
    def unembed(self) -> nn.Module:
        ...

    @classmethod
    def config_parallel_residual(cls, config: Any) -> bool:
        """True when this config's MLPs read the block's input, not the stream after attention."""
        return False

    @property
    def parallel_residual(self) -> bool:
        """True when the MLP reads the block's input, not the stream after attention."""
        return self.config_parallel_residual(self.config)

    @abstractmethod
    def _qkv_layout(self, layer: int, channel: Channel) -> tuple[nn.Module, torch.Tensor]:
        """(module, columns [n_heads_c, d_head]) for one channel of one layer."""
        ...

    # ---- derived ---------------------------------------------------------------
    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.n_heads)

    def heads_for_channel(self, channel: Channel) -> int:
        """How many distinct heads compute `channel` (k and v are shared under GQA)."""
        return self.n_heads if channel is Channel.Q else self.n_kv_heads

    def kv_group(self) -> int:
        return self.n_heads // self.n_kv_heads

    def projection(self, layer: int, channel: Channel) -> Projection:
        key = (layer, channel)
        proj = self._projections.get(key)
        if proj is None:
            module, columns = self._qkv_layout(layer, channel)
            w = linear_weight_in_out(module)  # [D, out]
            weight = w[:, columns].permute(1, 0, 2).detach()  # [H_c, D, d_head]
            proj = Projection(module, columns.to(w.device), weight.contiguous())
            if not is_offloaded(module):  # an offloaded layer's weights are read when used
                self._projections[key] = proj
        return proj

    def out_weight(self, layer: int) -> torch.Tensor:
        """W_O of a layer as [n_heads, d_head, d_model]."""
        w = self._out_weights.get(layer)
        if w is None:
            w_io = linear_weight_in_out(self.out_proj(layer)).detach()
            w = w_io.reshape(self.n_heads, -1, w_io.shape[-1]).contiguous()
            if not is_offloaded(self.out_proj(layer)):
                self._out_weights[layer] = w
        return w

    def out_bias(self, layer: int) -> torch.Tensor | None:
        """The attention output bias shared by all heads (not part of any head's output)."""
        return linear_bias(self.out_proj(layer))
