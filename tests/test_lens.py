"""Direct logit attribution, the logit lens and attention patterns (circuitlang.lens).

The sum rule of direct logit attribution and the lens's last row are checked on every
architecture (tiny random models built from configs, with random biases so the shared
biases' terms are real), and the toy IOI model's numbers against a hand computation.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from circuitlang import lens
from circuitlang.errors import CircuitlangError, ExecutionError, ModelError
from circuitlang.models import LoadedModel, load_model
from circuitlang.sites import Embed, Head, Mlp, Position, Resid
from circuitlang.tasks import load_task


def _build_tiny():
    spec = importlib.util.spec_from_file_location(
        "_models_conftest_lens", Path(__file__).resolve().parent / "models" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ARCHS, module.build_tiny


ARCHS, build_tiny = _build_tiny()


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    lm = LoadedModel.from_hf(build_tiny(request.param), name=f"tiny-{request.param}")
    task = load_task("induction", tokenizer=None, length=5, vocab=lm.shape.vocab_size)
    return request.param, lm, task, task.prompts(4, 0)


@pytest.fixture(scope="module")
def ioi():
    lm = load_model("toy-ioi", device="cpu")
    task = load_task("ioi", tokenizer=lm.tokenizer)
    return lm, task, task.prompts(6, 0)


# ---- direct logit attribution ----------------------------------------------------------------
@pytest.mark.parametrize("metric", ["logit_diff", "loss"])
def test_direct_effects_sum_to_the_linearized_metric_on_every_architecture(tiny, metric):
    """embed + heads + attention biases + MLPs + the final norm's bias = gradient . stream.

    `loss` on the induction task reads every repeated position, so this is also the
    multi-position, first-order case."""
    _, lm, task, prompts = tiny
    d = lens.direct_logit_attribution(lm, task, prompts, metric, batch_size=3)  # two batches
    n, layers, heads = len(prompts), lm.shape.n_layers, lm.shape.n_heads
    assert d.heads.shape == (n, layers, heads) and d.mlps.shape == (n, layers) and d.embed.shape == (n,)
    scale = np.abs(d.heads).sum((1, 2)) + np.abs(d.mlps).sum(1) + np.abs(d.embed)
    np.testing.assert_allclose(d.total(), d.linearized, atol=1e-6 * scale.max())
    assert d.exact == (metric == "logit_diff")
    if metric == "logit_diff":  # linear in the logits, no unembedding bias: the metric itself
        np.testing.assert_allclose(d.linearized, d.metric_values, rtol=1e-5, atol=1e-6)
    if lm.adapter.out_bias(0) is not None:  # the shared biases carry a real share
        assert np.abs(d.attn_bias).max() > 1e-4
        assert np.abs(d.total() - d.attn_bias.sum(1) - d.linearized).max() > 1e-4
    else:
        assert not d.attn_bias.any()
    if isinstance(lm.adapter.final_norm(), torch.nn.LayerNorm):
        assert np.abs(d.norm_bias).max() > 0
    else:  # RMSNorm has no bias
        assert not d.norm_bias.any()


def test_direct_effect_of_a_head_by_hand(ioi):
    """Head 1.1 at END through ln_f with its scale frozen and W_U, read as a logit difference."""
    lm, task, prompts = ioi
    d = lens.direct_logit_attribution(lm, task, prompts, "logit_diff")
    site, final = Head(1, 1), Resid(lm.shape.n_layers)
    cache = lm.run(prompts.input_ids, prompts.attention_mask, capture=[site, final]).cache
    end = prompts.positions["END"]
    rows = torch.arange(len(end))
    x, out = cache[final][rows, end].double(), cache[site][rows, end].double()
    ln = lm.adapter.final_norm()
    sigma = (x.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
    normed = (out - out.mean(-1, keepdim=True)) / sigma * ln.weight.detach().double()
    w_u = lm.adapter.unembed().weight.detach().double()  # [V, D]
    io, s = prompts.answers[:, 0], prompts.wrong_answers[:, 0]
    by_hand = ((w_u[io] - w_u[s]) * normed).sum(-1).numpy()
    np.testing.assert_allclose(d[site], by_hand, rtol=1e-6, atol=1e-8)
    assert d.value(site) == pytest.approx(d.head_grid[1, 1])
    assert d.value(site) > 1.0  # a name mover: it writes the answer directly
    assert d[Mlp(2)].shape == (len(prompts),) and d[Embed()].shape == (len(prompts),)
    assert set(d.to_dict()) == {str(s) for s in d.sites()}


def test_direct_attribution_refuses_what_it_cannot_attribute(ioi):
    lm, task, prompts = ioi
    with pytest.raises(ExecutionError, match="kl is zero"):
        lens.direct_logit_attribution(lm, task, prompts, "kl")
    with pytest.raises(ExecutionError, match="no metric 'accuracy'") as info:
        lens.direct_logit_attribution(lm, task, prompts, "accuracy")
    assert "logit_diff" in info.value.hint
    d = lens.direct_logit_attribution(lm, task, prompts.subset([0]))
    with pytest.raises(ExecutionError, match="no value for head 3.0"):
        d[Head(3, 0)]


def test_an_unknown_final_norm_is_refused():
    class Doubling(torch.nn.Module):
        variance_epsilon = 1e-6
        weight = torch.nn.Parameter(torch.ones(4))

        def forward(self, x):
            return 2 * x

    with pytest.raises(ModelError, match="not a LayerNorm or an RMSNorm"):
        lens._FrozenNorm.at(Doubling(), torch.randn(1, 3, 4))


# ---- the logit lens -----------------------------------------------------------------------------
def test_the_lens_last_row_is_the_models_metric_on_every_architecture(tiny):
    _, lm, task, prompts = tiny
    lensed = lens.logit_lens(lm, task, prompts, "logit_diff", batch_size=3)
    assert lensed.per_prompt.shape == (len(prompts), lm.shape.n_layers + 1, 1)
    np.testing.assert_allclose(lensed[Resid(lm.shape.n_layers)][:, 0], lensed.clean, rtol=1e-6, atol=1e-6)
    assert not np.allclose(lensed.values[0], lensed.values[-1])  # the embeddings say something else
    with pytest.raises(ExecutionError, match="reads more than the END token"):
        lens.logit_lens(lm, task, prompts, "loss", positions=["END"])


def test_the_lens_at_named_positions(ioi):
    lm, task, prompts = ioi
    plain = lens.logit_lens(lm, task, prompts, "logit_diff")
    named = lens.logit_lens(lm, task, prompts, "logit_diff", positions=["S2", Position("END"), "END-1"])
    assert named.position_names() == ["S2", "END", "END-1"]
    assert named.layer_names() == ["embed", "L0", "L1", "L2"]
    np.testing.assert_allclose(named.per_prompt[:, :, 1], plain.per_prompt[:, :, 0], rtol=1e-6)
    np.testing.assert_allclose(named.per_prompt[:, -1, 1], named.clean, rtol=1e-6)
    assert not np.allclose(named.values[:, 0], named.values[:, 1])
    # kl compares each layer's reading with the model's output: zero at the last layer
    kl = lens.logit_lens(lm, task, prompts, "kl")
    assert np.abs(kl.per_prompt[:, -1]).max() < 1e-5 and kl.values[0, 0] > 0.1
    with pytest.raises(ExecutionError, match="no position 'XYZ'"):
        lens.logit_lens(lm, task, prompts, positions=["XYZ"])
    with pytest.raises(CircuitlangError, match="not a position"):
        lens.logit_lens(lm, task, prompts, positions=["S2 +"])
    with pytest.raises(ExecutionError, match="no value for resid 9"):
        plain[Resid(9)]


# ---- attention patterns ---------------------------------------------------------------------------
def test_patterns_are_causal_distributions_equal_to_transformers_own(tiny):
    _, lm, _, prompts = tiny
    ids, mask = prompts.input_ids[:2], prompts.attention_mask[:2].clone()
    mask[1, -2:] = 0  # a right-padded row: its padding is never attended to
    heads = [Head(0, 1), "2.3", Head(1, lm.shape.n_heads - 1)]
    got = lens.attention_patterns(lm, ids, heads, mask)
    assert list(got) == [Head(0, 1), Head(2, 3), Head(1, lm.shape.n_heads - 1)]
    with torch.no_grad():
        hf = lm.hf_model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    t = ids.shape[1]
    for head, pattern in got.items():
        assert pattern.shape == (2, t, t)
        np.testing.assert_allclose(pattern.sum(-1)[0], 1.0, atol=1e-6)
        np.testing.assert_allclose(pattern.sum(-1)[1, : t - 2], 1.0, atol=1e-6)
        assert np.abs(np.triu(pattern, 1)).max() == 0  # no query sees a later key
        assert np.abs(pattern[1, : t - 2, t - 2:]).max() == 0
        np.testing.assert_allclose(pattern, hf[head.layer][:, head.head].double().numpy(), atol=1e-6)


def test_heads_are_named_or_refused():
    from circuitlang.sites import ModelShape

    shape = ModelShape(n_layers=12, n_heads=12, d_model=768, d_head=64)
    assert lens.parse_head("9.6", shape) == Head(9, 6)
    assert lens.parse_head("head 10.7", shape) == Head(10, 7)
    assert lens.parse_head((0, 1), shape) == Head(0, 1)
    with pytest.raises(ExecutionError, match="layer 12 out of range") as info:
        lens.parse_head("12.1", shape)
    assert info.value.hint == "model has layers 0-11"
    with pytest.raises(ExecutionError, match="is not a head"):
        lens.parse_head("nine.six", shape)
    with pytest.raises(ExecutionError, match="head 12 out of range"):
        lens.parse_head(Head(3, 12), shape)
