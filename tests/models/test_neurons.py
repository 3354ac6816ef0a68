"""Neuron sites: capture and patch equal a hand-written hook oracle on GPT-2 and Llama-shaped
models; identity patches are exact; a planted neuron is the one patching ranks first."""
from __future__ import annotations

import pytest
import torch

from circuitlang.errors import ModelError
from circuitlang.models import LoadedModel, Patch
from circuitlang.sites import Neuron


def _hidden_oracle(arch: str, hf, layer: int):
    """A plain forward hook on the HF MLP that computes its hidden units by hand."""
    got = {}
    mlp = hf.transformer.h[layer].mlp if arch == "gpt2" else hf.model.layers[layer].mlp

    def hook(module, args, output):
        x = args[0]
        if arch == "gpt2":
            got["h"] = module.act(x @ module.c_fc.weight + module.c_fc.bias)
        else:  # gated: act(gate) * up
            got["h"] = module.act_fn(x @ module.gate_proj.weight.T) * (x @ module.up_proj.weight.T)
    return mlp, hook, got


def _w_out(arch: str, hf, layer: int) -> torch.Tensor:
    if arch == "gpt2":
        return hf.transformer.h[layer].mlp.c_proj.weight  # Conv1D: [d_mlp, D]
    return hf.model.layers[layer].mlp.down_proj.weight.T


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_neuron_capture_and_patch_equal_a_hook_oracle(arch, build_tiny):
    hf = build_tiny(arch)
    lm = LoadedModel.from_hf(hf, name=f"tiny-{arch}")
    torch.manual_seed(1)
    ids = torch.randint(0, 61, (3, 6))
    layer, unit = 1, 5
    mlp, hook, got = _hidden_oracle(arch, hf, layer)
    handle = mlp.register_forward_hook(hook)
    try:
        run = lm.run(ids, capture=[Neuron(layer, unit), Neuron(layer, 0)])
    finally:
        handle.remove()
    torch.testing.assert_close(run.cache[Neuron(layer, unit)], got["h"][..., unit], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(run.cache[Neuron(layer, 0)], got["h"][..., 0], rtol=1e-5, atol=1e-6)

    # patch the unit to 2.5 at position 3 of each row; the oracle adds (2.5 - act) * W_out[unit]
    new = torch.full((3,), 2.5)
    where = torch.tensor([3, 3, 3])
    patched = lm.run(ids, patches=[Patch(Neuron(layer, unit), new, positions=where)]).logits
    w_out = _w_out(arch, hf, layer)[unit].detach()

    def add_delta(module, args, output):
        act = got["h"][..., unit]
        delta = torch.zeros_like(output)
        delta[:, 3] = (2.5 - act[:, 3])[:, None] * w_out
        return output + delta

    handles = [mlp.register_forward_hook(hook), mlp.register_forward_hook(add_delta)]
    try:
        with torch.no_grad():
            oracle = hf(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(patched, oracle, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(patched, lm.run(ids).logits)  # the patch did something


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_identity_neuron_patch_is_exact(arch, build_tiny):
    lm = LoadedModel.from_hf(build_tiny(arch), name=f"tiny-{arch}")
    ids = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(0))
    sites = [Neuron(0, 1), Neuron(2, 7), Neuron(2, 8)]
    run = lm.run(ids, capture=sites)
    again = lm.run(ids, patches=[Patch(s, run.cache[s]) for s in sites])
    assert torch.equal(again.logits, run.logits)


def test_neuron_out_of_range_is_refused(build_tiny):
    lm = LoadedModel.from_hf(build_tiny("llama"), name="tiny-llama")
    with pytest.raises(ModelError, match=r"neurons 0-63"):
        lm.run(torch.zeros(1, 3, dtype=torch.long), capture=[Neuron(1, 64)])


def test_patching_ranks_a_planted_neuron_first(build_tiny):
    """MLP 1 unit 17 is planted: it fires on every input and writes along token 7's unembedding;
    zero-ablating each unit of MLP 1 in turn, unit 17 moves logit 7 the most."""
    hf = build_tiny("gpt2")
    planted, token = 17, 7
    mlp = hf.transformer.h[1].mlp
    with torch.no_grad():
        mlp.c_fc.weight[:, planted] = 0.0
        mlp.c_fc.bias[planted] = 3.0  # a constant feature: gelu(3) ~ 3 everywhere
        mlp.c_proj.weight[planted] = 2.0 * hf.lm_head.weight[token] / hf.lm_head.weight[token].norm()
    lm = LoadedModel.from_hf(hf, name="planted")
    ids = torch.randint(0, 61, (4, 5), generator=torch.Generator().manual_seed(3))
    base = lm.run(ids).logits[:, -1, token]
    effects = []
    for unit in range(lm.shape.d_mlp):
        zero = torch.zeros(4)
        out = lm.run(ids, patches=[Patch(Neuron(1, unit), zero, positions=torch.full((4,), 4))])
        effects.append(float((base - out.logits[:, -1, token]).mean()))
    ranked = sorted(range(len(effects)), key=lambda u: -effects[u])
    assert ranked[0] == planted
    assert effects[planted] > 5 * abs(effects[ranked[1]])


def test_neuron_attribution_matches_a_hook_oracle_and_ranks_the_planted_unit(build_tiny):
    """Attribution over every unit of MLP 1 in two passes: equal to a plain torch hook that
    keeps the gradient of the metric at the MLP's hidden units, times their corrupt-minus-
    clean change; the unit planted to write along token 7's unembedding scores first."""
    from circuitlang.models.attribution import attribute_nodes
    from circuitlang.sites import AllNeurons

    hf = build_tiny("gpt2")
    planted, token = 17, 7
    mlp = hf.transformer.h[1].mlp
    with torch.no_grad():
        mlp.c_fc.weight[:, planted] *= 20.0  # a unit whose activation varies a lot with the input
        mlp.c_proj.weight[planted] = 3.0 * hf.lm_head.weight[token] / hf.lm_head.weight[token].norm()
    lm = LoadedModel.from_hf(hf, name="planted")
    g = torch.Generator().manual_seed(4)
    clean, corrupt = torch.randint(0, 61, (5, 6), generator=g), torch.randint(0, 61, (5, 6), generator=g)

    def metric(logits, rows):
        return logits[:, -1, token]

    found = attribute_nodes(lm, clean, corrupt, metric, [AllNeurons(1)])
    assert found.passes == 2 and len(found.sites) == lm.shape.d_mlp

    kept = {}

    def keep(module, args):
        kept["h"] = args[0]
        args[0].retain_grad()

    handle = mlp.c_proj.register_forward_pre_hook(keep)
    try:
        hf(input_ids=corrupt)
        h_corrupt = kept["h"].detach()
        metric(hf(input_ids=clean).logits, None).sum().backward()
    finally:
        handle.remove()
        hf.zero_grad()
    oracle = ((h_corrupt - kept["h"].detach()) * kept["h"].grad).sum(1)  # summed over positions
    torch.testing.assert_close(found.per_prompt, oracle.T, rtol=1e-4, atol=1e-5)
    assert found.top(1)[0][0] == Neuron(1, planted)
