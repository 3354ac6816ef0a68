"""Llama family (`model_type` llama, mistral, qwen2): rotary, RMSNorm, separate
`q_proj`/`k_proj`/`v_proj` with grouped-query attention (`num_key_value_heads`)."""
from __future__ import annotations

import torch
from torch import nn

from circuitlang.models.adapters.base import Adapter, register
from circuitlang.sites import Channel

_PROJ = {Channel.Q: "q_proj", Channel.K: "k_proj", Channel.V: "v_proj"}


@register
class LlamaAdapter(Adapter):
    name = "llama"
    model_types = ("llama", "mistral", "qwen2")
    has_pos_embed = False

    def token_embed(self) -> nn.Module:
        return self.model.model.embed_tokens

    def blocks(self) -> list[nn.Module]:
        return list(self.model.model.layers)

    def attn(self, layer: int) -> nn.Module:
        return self.model.model.layers[layer].self_attn

    def attn_norm(self, layer: int) -> nn.Module:
        return self.model.model.layers[layer].input_layernorm

    def mlp_norm(self, layer: int) -> nn.Module:
        return self.model.model.layers[layer].post_attention_layernorm

    def mlp(self, layer: int) -> nn.Module:
        return self.model.model.layers[layer].mlp

    def mlp_out_proj(self, layer: int) -> nn.Module:
        return self.model.model.layers[layer].mlp.down_proj

    def out_proj(self, layer: int) -> nn.Module:
        return self.model.model.layers[layer].self_attn.o_proj

    def final_norm(self) -> nn.Module:
        return self.model.model.norm

    def unembed(self) -> nn.Module:
        return self.model.lm_head

    def _qkv_layout(self, layer: int, channel: Channel) -> tuple[nn.Module, torch.Tensor]:
        module = getattr(self.attn(layer), _PROJ[channel])
        n = self.heads_for_channel(channel)
        return module, torch.arange(module.out_features).view(n, -1)
