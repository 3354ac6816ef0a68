"""GPT-2 (`model_type` gpt2): learned positions, fused `c_attn` (q | k | v), HF `Conv1D`."""
from __future__ import annotations

import torch
from torch import nn

from circuitlang.models.adapters.base import Adapter, register
from circuitlang.sites import Channel

_OFFSET = {Channel.Q: 0, Channel.K: 1, Channel.V: 2}


@register
class GPT2Adapter(Adapter):
    name = "gpt2"
    model_types = ("gpt2",)

    def token_embed(self) -> nn.Module:
        return self.model.transformer.wte

    def pos_embed(self) -> nn.Module | None:
        return self.model.transformer.wpe

    def blocks(self) -> list[nn.Module]:
        return list(self.model.transformer.h)

    def attn(self, layer: int) -> nn.Module:
        return self.model.transformer.h[layer].attn

    def attn_norm(self, layer: int) -> nn.Module:
        return self.model.transformer.h[layer].ln_1

    def mlp_norm(self, layer: int) -> nn.Module:
        return self.model.transformer.h[layer].ln_2

    def mlp(self, layer: int) -> nn.Module:
        return self.model.transformer.h[layer].mlp

    def mlp_out_proj(self, layer: int) -> nn.Module:
        return self.model.transformer.h[layer].mlp.c_proj

    def out_proj(self, layer: int) -> nn.Module:
        return self.model.transformer.h[layer].attn.c_proj

    def final_norm(self) -> nn.Module:
        return self.model.transformer.ln_f

    def unembed(self) -> nn.Module:
        return self.model.lm_head

    def _qkv_layout(self, layer: int, channel: Channel) -> tuple[nn.Module, torch.Tensor]:
        d_model = int(self.config.hidden_size)
        columns = torch.arange(d_model).view(self.n_heads, -1) + _OFFSET[channel] * d_model
        return self.attn(layer).c_attn, columns
