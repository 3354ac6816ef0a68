"""Tiny random-init models of every supported architecture, built from configs (no downloads)."""
from __future__ import annotations

import pytest
import torch

ARCHS = ("gpt2", "gpt_neox", "gpt_neox_seq", "llama", "mistral", "qwen2")


def build_tiny(arch: str, seed: int = 0):
    """A 3-layer random-init HF causal LM of the given architecture (fp32, CPU)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=61, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=64)
    if arch == "gpt2":
        config = tf.GPT2Config(vocab_size=61, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = tf.GPT2LMHeadModel(config)
    elif arch in ("gpt_neox", "gpt_neox_seq"):
        config = tf.GPTNeoXConfig(intermediate_size=64, rotary_pct=0.5,
                                  use_parallel_residual=arch == "gpt_neox", attention_bias=True, **common)
        model = tf.GPTNeoXForCausalLM(config)
    elif arch == "llama":
        config = tf.LlamaConfig(intermediate_size=64, num_key_value_heads=2, **common)
        model = tf.LlamaForCausalLM(config)
    elif arch == "mistral":
        config = tf.MistralConfig(intermediate_size=64, num_key_value_heads=2, sliding_window=None, **common)
        model = tf.MistralForCausalLM(config)
    elif arch == "qwen2":
        config = tf.Qwen2Config(intermediate_size=64, num_key_value_heads=1, **common)
        model = tf.Qwen2ForCausalLM(config)
    else:  # pragma: no cover - the list above is the parametrisation
        raise ValueError(arch)
    # Random biases too, so that "per-head outputs + bias" is a real check.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.config._attn_implementation = "eager"
    return model.eval()


@pytest.fixture(scope="session", name="build_tiny")
def build_tiny_fixture():
    """The `build_tiny(arch, seed=0)` function."""
    return build_tiny


@pytest.fixture(scope="session", params=ARCHS)
def tiny(request):
    """(architecture name, LoadedModel) for each supported architecture."""
    from circuitlang.models import LoadedModel

    return request.param, LoadedModel.from_hf(build_tiny(request.param), name=f"tiny-{request.param}")


@pytest.fixture(scope="session")
def tokens():
    """Two batches of token ids (clean, corrupted), B=3, T=9."""
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 61, (3, 9), generator=g)
    corrupt = torch.randint(0, 61, (3, 9), generator=g)
    return clean, corrupt
