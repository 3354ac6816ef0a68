"""Node patches on a pass that continues a cached prefix and resumes at a layer, and
logits computed for a few vocabulary columns only: what a head sweep's rows run.

A (site, prompt) row of `patch head L.H at P` needs only the tokens from P on (the
prefix is cached) and only the layers from L up (the blocks below are the clean ones).
Both shortcuts must give the full pass's numbers, on every architecture."""
from __future__ import annotations

import pytest
import torch

from circuitlang.errors import ModelError
from circuitlang.models import Patch, compat
from circuitlang.models.interventions import CleanPass
from circuitlang.models.run import run_model
from circuitlang.sites import Channel, Head, Logits, Mlp, Resid


def _suffix_pass(lm, ids, p):
    """(prefix cache, CleanPass of the tokens from p on) for `ids`."""
    with torch.no_grad():
        _, prefix = compat.forward(lm.hf_model, ids[:, :p], keep_cache=True)
        import copy

        blocks: list = []
        run_model(lm, ids[:, p:], cache=copy.deepcopy(prefix), record_blocks=blocks)
    return prefix, CleanPass(tuple(blocks), {})


def _sites(lm):
    shape = lm.shape
    top = shape.n_layers - 1
    sites = [Head(top, 0), Head(1, 1), Head(top, shape.n_heads - 1, Channel.V), Resid(top), Resid(shape.n_layers)]
    if shape.has_mlp:
        sites.append(Mlp(top))
    return sites


@pytest.mark.parametrize("p", [4, 8])
def test_a_patch_on_a_resumed_suffix_equals_the_full_pass(tiny, tokens, p):
    import copy

    _, lm = tiny
    clean, corrupt = tokens
    prefix, suffix = _suffix_pass(lm, clean, p)
    for site in _sites(lm):
        value = lm.run(corrupt, capture=[site]).cache[site][:, p]
        at = torch.full((len(clean),), p)
        want = lm.run(clean, patches=[Patch(site, value, at)]).logits[:, p:]
        start = min(site.layer, lm.shape.n_layers)
        got = lm.run(clean[:, p:], patches=[Patch(site, value, torch.zeros(len(clean), dtype=torch.long))],
                     cache=copy.deepcopy(prefix), resume=(suffix, start)).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{site} at {p}")
        # and the patch moved something, so the comparison is not of two clean passes
        assert (want - lm.run(clean).logits[:, p:]).abs().max() > 1e-4, site


def test_resuming_above_a_patched_site_is_refused(tiny, tokens):
    _, lm = tiny
    clean, _ = tokens
    prefix, suffix = _suffix_pass(lm, clean, 4)
    value = torch.zeros(len(clean), lm.shape.d_model)
    with pytest.raises(ModelError, match="not computed when resuming at layer 1"):
        lm.run(clean[:, 4:], patches=[Patch(Resid(0), value, torch.zeros(len(clean), dtype=torch.long))],
               cache=prefix, resume=(suffix, 1))


def test_logit_columns_are_those_columns_of_the_full_logits(tiny, tokens):
    _, lm = tiny
    clean, _ = tokens
    columns = torch.tensor([5, 0, 17, 3])
    full = lm.run(clean).logits
    part = lm.run(clean, logit_columns=columns).logits
    assert part.shape == (*full.shape[:2], 4)
    torch.testing.assert_close(part, full[..., columns], atol=1e-5, rtol=1e-5)
    assert lm.run(clean, logit_columns=torch.zeros(0, dtype=torch.long)).logits.shape[-1] == 0
    with pytest.raises(ModelError, match="cannot be patched or captured whole"):
        lm.run(clean, capture=[Logits()], logit_columns=columns)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch's dynamo import warns of torch.jit
def test_a_compiled_block_is_refused_not_silently_unhooked(build_tiny, tokens):
    """Compiled code skips hooks added since it was traced, so a patch would be dropped
    without a word (bench/bench_compile.py): circuitlang refuses the model instead."""
    from circuitlang.models import LoadedModel

    lm = LoadedModel.from_hf(build_tiny("gpt2"), name="compiled")
    clean, _ = tokens
    lm.adapter.blocks()[0].compile()  # sets the compiled call; nothing compiles until called
    with pytest.raises(ModelError, match="is compiled"):
        lm.run(clean, capture=[Resid(1)])


def test_logits_at_one_token_per_row_are_those_of_the_full_logits(tiny, tokens):
    _, lm = tiny
    clean, _ = tokens
    at = torch.tensor([8, 3, 5])
    full = lm.run(clean).logits
    rows = torch.arange(len(at))
    torch.testing.assert_close(lm.run(clean, logits_at=at).logits[:, 0], full[rows, at], atol=1e-5, rtol=1e-5)
    columns = torch.tensor([2, 7])
    torch.testing.assert_close(lm.run(clean, logits_at=at, logit_columns=columns).logits[:, 0],
                               full[rows, at][:, columns], atol=1e-5, rtol=1e-5)
