"""`MlpIn(l)`: the stream an MLP reads, captured and patched without touching the residual."""
from __future__ import annotations

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForCausalLM)

from circuitlang.models import LoadedModel, Patch
from circuitlang.sites import Mlp, MlpIn

BUILDERS = {
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50,
                                               bos_token_id=0, eos_token_id=0)),
    "llama": lambda: LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32,
                                                  intermediate_size=64, vocab_size=50, num_key_value_heads=1)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=2, num_attention_heads=2,
                                                         hidden_size=32, intermediate_size=64, vocab_size=50)),
}


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_mlp_input_patch(arch):
    torch.manual_seed(0)
    model = LoadedModel.from_hf(BUILDERS[arch]())
    a, b = torch.randint(0, 50, (3, 7)), torch.randint(0, 50, (3, 7))
    sites = [MlpIn(1), Mlp(1)]
    ra, rb = model.run(a, capture=sites), model.run(b, capture=sites)
    # its own value: exactly the plain pass
    same = model.run(a, patches=[Patch(MlpIn(1), ra.cache[MlpIn(1)])])
    assert torch.equal(same.logits, ra.logits)
    # another prompt's input: the MLP computes that prompt's output, the rest stays a's
    mixed = model.run(a, capture=[Mlp(1)], patches=[Patch(MlpIn(1), rb.cache[MlpIn(1)])])
    torch.testing.assert_close(mixed.cache[Mlp(1)], rb.cache[Mlp(1)], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed.logits, ra.logits)
