"""GPT-NeoX / Pythia (`model_type` gpt_neox): rotary, fused `query_key_value` laid out
per head as [q | k | v], and (by default) parallel attention and MLP."""
from __future__ import annotations

import torch
from torch import nn

from circuitlang.models.adapters.base import Adapter, register
from circuitlang.sites import Channel

_OFFSET = {Channel.Q: 0, Channel.K: 1, Channel.V: 2}


@register
class GPTNeoXAdapter(Adapter):
    name = "gpt_neox"
    model_types = ("gpt_neox",)
    has_pos_embed = False

    def token_embed(self) -> nn.Module:
        return self.model.gpt_neox.embed_in

    def blocks(self) -> list[nn.Module]:
        return list(self.model.gpt_neox.layers)

    def attn(self, layer: int) -> nn.Module:
        return self.model.gpt_neox.layers[layer].attention

    def attn_norm(self, layer: int) -> nn.Module:
        return self.model.gpt_neox.layers[layer].input_layernorm

    def mlp_norm(self, layer: int) -> nn.Module:
        return self.model.gpt_neox.layers[layer].post_attention_layernorm

    def mlp(self, layer: int) -> nn.Module:
        return self.model.gpt_neox.layers[layer].mlp

    def mlp_out_proj(self, layer: int) -> nn.Module:
        return self.model.gpt_neox.layers[layer].mlp.dense_4h_to_h

    def out_proj(self, layer: int) -> nn.Module:
        return self.model.gpt_neox.layers[layer].attention.dense

    def final_norm(self) -> nn.Module:
        return self.model.gpt_neox.final_layer_norm

    def unembed(self) -> nn.Module:
        # `lm_head` from transformers 5.1 on, `embed_out` before: ask the model
        return self.model.get_output_embeddings()

    @classmethod
    def config_parallel_residual(cls, config) -> bool:
        return bool(getattr(config, "use_parallel_residual", True))

    def _qkv_layout(self, layer: int, channel: Channel) -> tuple[nn.Module, torch.Tensor]:
        d_head = int(self.config.hidden_size) // self.n_heads
        head = torch.arange(self.n_heads).view(-1, 1) * 3 * d_head
        columns = head + _OFFSET[channel] * d_head + torch.arange(d_head).view(1, -1)
        return self.attn(layer).query_key_value, columns
