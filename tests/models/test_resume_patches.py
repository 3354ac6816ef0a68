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


def _mlp_tokens(lm, **run):
    """(logits, the number of tokens the last MLP was given) of one `lm.run(**run)`."""
    logits, seen = _tokens_seen(lm, [lm.adapter.mlp(lm.shape.n_layers - 1)], **run)
    return logits, seen[0]


def _tokens_seen(lm, modules, **run):
    """(logits, per module the token counts its input had) of one `lm.run(**run)`."""
    seen = [[] for _ in modules]
    handles = [m.register_forward_hook(lambda m, args, out, s=s: s.append(args[0].shape[1]))
               for m, s in zip(modules, seen)]
    try:
        logits = lm.run(**run).logits
    finally:
        for h in handles:
            h.remove()
    return logits, seen


@pytest.mark.parametrize("per_position", [False, True])
def test_logits_at_one_token_under_edge_patches_are_those_of_the_full_pass(tiny, tokens, per_position):
    """With the logits read at one token per row, the last MLP runs at that token alone
    (its output broadcasts over the row's other tokens, which nothing reads): edge
    patches, with masks per row or per position, give the full pass's logits there."""
    from circuitlang.models import EdgePatch

    _, lm = tiny
    clean, corrupt = tokens
    es = lm.edge_set()
    ablated = lm.run(corrupt, capture=es.senders).cache
    g = torch.Generator().manual_seed(3)
    b, t = clean.shape
    shape = (b, t, len(es.receivers), len(es.senders)) if per_position else (b, len(es.receivers), len(es.senders))
    mask = (torch.rand(*shape, generator=g) < 0.5).float() * es.valid()
    at = torch.tensor([8, 3, 5])
    rows = torch.arange(b)
    full = lm.run(clean, edges=EdgePatch.from_set(es, ablated, mask)).logits[rows, at]
    got, seen = _mlp_tokens(lm, input_ids=clean, edges=EdgePatch.from_set(es, ablated, mask), logits_at=at)
    torch.testing.assert_close(got[:, 0], full, atol=1e-5, rtol=1e-5)
    assert seen == [1]  # (every tiny architecture has MLPs)
    assert (full - lm.run(clean).logits[rows, at]).abs().max() > 1e-3  # the mask moved the logits


def test_mask_gradients_with_logits_at_one_token_are_the_full_passes(tiny, tokens):
    from circuitlang.models import EdgePatch

    _, lm = tiny
    clean, corrupt = tokens
    es = lm.edge_set()
    ablated = lm.run(corrupt, capture=es.senders).cache
    at = torch.tensor([8, 3, 5])
    rows = torch.arange(len(at))
    grads = []
    for logits_at in (None, at):
        mask = (es.valid().float() * 0.5)[None].expand(len(at), -1, -1).clone().requires_grad_(True)
        logits = lm.run(clean, edges=EdgePatch.from_set(es, ablated, mask), grad=True, logits_at=logits_at).logits
        picked = logits[:, 0] if logits_at is not None else logits[rows, at]
        picked[:, 5].sum().backward()
        grads.append(mask.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
    assert grads[0].abs().max() > 1e-4


def test_the_last_mlp_runs_whole_when_something_reads_it(tiny, tokens):
    _, lm = tiny
    clean, _ = tokens
    assert lm.shape.has_mlp  # every tiny architecture has MLPs
    at = torch.tensor([8, 3, 5])
    top = lm.shape.n_layers - 1
    for site in (Mlp(top), Resid(lm.shape.n_layers)):
        run_seen = []
        handle = lm.adapter.mlp(top).register_forward_hook(
            lambda m, args, out: run_seen.append(args[0].shape[1]))
        try:
            run = lm.run(clean, capture=[site], logits_at=at)
        finally:
            handle.remove()
        assert run_seen == [clean.shape[1]], site
        torch.testing.assert_close(run.cache[site], lm.run(clean, capture=[site]).cache[site])


@pytest.mark.parametrize("per_position", [False, True])
@pytest.mark.parametrize("resume_at", [None, "top"])
@pytest.mark.parametrize("ablation", ["corrupt", "mean"])
def test_the_last_attention_runs_at_the_logits_token_under_edge_patches(tiny, tokens, per_position, resume_at,
                                                                        ablation):
    """With the logits read at one token per row and no head of the last layer captured or
    patched, the last layer's output projection, its heads' deltas and the inputs of the
    last MLP and the logits are computed at that token alone (keys and values still at
    every token): the logits there are the full pass's, also resumed at the last layer,
    with ablated values per row or one for every row (a mean)."""
    from circuitlang.models import EdgePatch

    _, lm = tiny
    clean, corrupt = tokens
    es = lm.edge_set()
    top = lm.shape.n_layers - 1
    ablated = lm.run(corrupt, capture=es.senders).cache
    ablated = torch.stack([ablated[s] for s in es.senders], 1)  # [B, S, T, D]
    if ablation == "mean":
        ablated = ablated.mean(0, keepdim=True)
    g = torch.Generator().manual_seed(5)
    b, t = clean.shape
    shape = (b, t, len(es.receivers), len(es.senders)) if per_position else (b, len(es.receivers), len(es.senders))
    mask = (torch.rand(*shape, generator=g) < 0.5).float() * es.valid()
    resume = None
    if resume_at is not None:  # ablate edges into the last layer and the logits only
        below = torch.tensor([not isinstance(r, Logits) and r.layer < top for r in es.receivers])
        if per_position:
            mask[:, :, below] = 0
        else:
            mask[:, below] = 0
        resume = (lm.clean_pass(clean, senders=es.senders), top)
    at = torch.tensor([8, 3, 5])
    rows = torch.arange(b)
    full = lm.run(clean, edges=EdgePatch.from_set(es, ablated, mask)).logits[rows, at]
    # the edge buffers are reused between runs: leave other deltas in them first, so the
    # values at the logits' token must be this run's own
    lm.run(clean, edges=EdgePatch.from_set(es, ablated, (1 - mask * 0.5) * es.valid()))
    modules = [lm.adapter.out_proj(top), lm.adapter.mlp(top)]
    got, seen = _tokens_seen(lm, modules, input_ids=clean, edges=EdgePatch.from_set(es, ablated, mask),
                             logits_at=at, resume=resume)
    torch.testing.assert_close(got[:, 0], full, atol=1e-5, rtol=1e-5)
    assert seen == [[1], [1]]
    assert (full - lm.run(clean).logits[rows, at]).abs().max() > 1e-3  # the mask moved the logits
    # a head of the last layer captured: its attention runs whole, the numbers are the same
    lm.run(clean, edges=EdgePatch.from_set(es, ablated, (1 - mask * 0.5) * es.valid()))
    got, seen = _tokens_seen(lm, modules, input_ids=clean, edges=EdgePatch.from_set(es, ablated, mask),
                             logits_at=at, resume=resume, capture=[Head(top, 0)])
    torch.testing.assert_close(got[:, 0], full, atol=1e-5, rtol=1e-5)
    assert seen == [[t], [1]]
