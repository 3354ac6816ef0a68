"""Edge patches with a reference pass (`EdgeReference`): the nodes whose inputs are as in
the reference are taken from it, not computed, and the pass is the same as without it.

Every tiny architecture (the `tiny` fixture: GPT-2, GPT-NeoX parallel and sequential,
Llama with grouped-query attention), from the embedding up or resumed at a layer, with
the logits at every token or at one per row, corrupt or mean ablation."""
from __future__ import annotations

import pytest
import torch

from circuitlang.errors import ModelError
from circuitlang.models import EdgePatch, EdgeReference
from circuitlang.sites import Channel, Head, Logits, Mlp


def _ablated(lm, corrupt, senders, ablation):
    cache = lm.run(corrupt, capture=senders).cache
    values = torch.stack([cache[s] for s in senders], 1)  # [B, S, T, D]
    return values.mean(0, keepdim=True) if ablation == "mean" else values


def _receiver_layers(lm, es):
    return torch.tensor([lm.shape.n_layers if isinstance(r, Logits) else r.layer for r in es.receivers])


@pytest.mark.parametrize("start", [0, 1])
@pytest.mark.parametrize("read_at", [False, True])
@pytest.mark.parametrize("ablation", ["corrupt", "mean"])
def test_a_pass_with_a_reference_equals_the_pass_without(tiny, tokens, start, read_at, ablation):
    _, lm = tiny
    clean, corrupt = tokens
    es = lm.edge_set()
    b, t = clean.shape
    k = 2  # circuits along the batch: the reference's rows repeat
    g = torch.Generator().manual_seed(3)
    valid = es.valid().float()
    movable = (_receiver_layers(lm, es) >= start).float()[:, None] * valid  # resumed: nothing below changes
    ref_mask = (torch.rand(valid.shape, generator=g) < 0.5).float() * movable
    ablated = _ablated(lm, corrupt, es.senders, ablation)
    at = torch.tensor([8, 3, 5]) if read_at else None
    resume = (lm.clean_pass(clean, senders=es.senders), start) if start else None
    # the reference pass itself (a patch with a reference keeps every sender's delta)
    first = lm.run(clean, edges=EdgePatch.from_set(es, ablated, ref_mask.expand(b, -1, -1),
                                                  EdgeReference(ref_mask, {})), logits_at=at, resume=resume)
    assert set(first.deltas) == set(es.senders)
    reference = EdgeReference(ref_mask, {s: d.clone() for s, d in first.deltas.items()}, first.deltas_at)
    # k circuits: the reference with one receiver's mask row changed in each (a late one,
    # then an early one), so some nodes are computed and others taken from the reference
    layers = _receiver_layers(lm, es)
    late = int((layers == lm.shape.n_layers - 1).nonzero()[0])
    early = int((layers == start).nonzero()[-1])
    masks = ref_mask.repeat(k, 1, 1)
    for c, r in enumerate([late, early]):
        masks[c, r] = (1 - ref_mask[r]) * valid[r]
    masks = masks.repeat_interleave(b, 0)  # [k * B, R, S]
    ids = clean.repeat(k, 1)
    abl = ablated if ablated.shape[0] == 1 else ablated.repeat(k, 1, 1, 1)
    at_k = None if at is None else at.repeat(k)
    resume_k = None if resume is None else (resume[0].rows(torch.arange(b).repeat(k)), start)
    want = lm.run(ids, edges=EdgePatch.from_set(es, abl, masks), logits_at=at_k, resume=resume_k)
    want_logits, want_deltas = want.logits.clone(), {s: d.clone() for s, d in want.deltas.items()}
    got = lm.run(ids, edges=EdgePatch.from_set(es, abl, masks, reference), logits_at=at_k, resume=resume_k)
    torch.testing.assert_close(got.logits, want_logits, atol=1e-5, rtol=1e-5)
    taken = [s for s in es.senders if got.deltas[s] is reference.deltas[s]]
    assert taken, "no node was taken from the reference"
    assert len(taken) < len(es.senders)
    top = lm.shape.n_layers - 1
    rows = torch.arange(k * b)
    for s, d in got.deltas.items():  # every sender's delta as without the reference (at the read token)
        if s not in want_deltas:
            continue
        d = d.repeat(k, 1, 1) if d.shape[0] == b else d
        if at is not None and getattr(s, "layer", -1) == top:
            d, w = d[rows, at_k], want_deltas[s][rows, at_k]
        else:
            w = want_deltas[s]
        torch.testing.assert_close(d, w, atol=1e-5, rtol=1e-5)
    assert (got.logits - lm.run(ids, logits_at=at_k).logits).abs().max() > 1e-3  # the masks moved the logits


def test_a_reference_that_differs_everywhere_computes_every_node(tiny, tokens):
    """The reference says nothing about a circuit whose every edge differs: every head and
    MLP is computed, and the pass is the plain edge-patched one."""
    _, lm = tiny
    clean, corrupt = tokens
    es = lm.edge_set()
    valid = es.valid().float()
    ablated = _ablated(lm, corrupt, es.senders, "corrupt")
    first = lm.run(clean, edges=EdgePatch.from_set(es, ablated, torch.zeros_like(valid)[None],
                                                  EdgeReference(torch.zeros_like(valid), {})))
    reference = EdgeReference(torch.zeros_like(valid), {s: d.clone() for s, d in first.deltas.items()})
    got = lm.run(clean, edges=EdgePatch.from_set(es, ablated, valid[None], reference))
    assert not [s for s in es.senders if got.deltas[s] is reference.deltas[s]]
    torch.testing.assert_close(got.logits, lm.run(corrupt).logits, atol=1e-5, rtol=1e-5)


def test_a_reference_of_the_wrong_shape_is_refused(tiny, tokens):
    _, lm = tiny
    clean, corrupt = tokens
    es = lm.edge_set()
    ablated = _ablated(lm, corrupt, es.senders, "corrupt")
    mask = es.valid().float()[None]
    with pytest.raises(ModelError) as err:
        lm.run(clean, edges=EdgePatch.from_set(es, ablated, mask, EdgeReference(torch.zeros(2, 2), {})))
    assert err.value.diagnostics[0].code == "model.bad-reference"
    bad = {s: torch.zeros(2, clean.shape[1], lm.shape.d_model) for s in es.senders}
    with pytest.raises(ModelError) as err:
        lm.run(clean, edges=EdgePatch.from_set(es, ablated, mask, EdgeReference(mask[0] * 0, bad)))
    assert err.value.diagnostics[0].code == "model.bad-reference"
    assert "divisor" in err.value.diagnostics[0].hint


@pytest.mark.parametrize("start", [0, 1])
@pytest.mark.parametrize("read_at", [False, True])
def test_one_changed_query_takes_every_node_it_cannot_reach(tiny, tokens, start, read_at):
    """One circuit whose last-layer head 0 reads other edges into its query than the
    reference's: every node below that layer is taken (MLPs too), and in that layer every
    head outside head 0's key/value group (a layer of reused and computed heads under
    grouped-query attention); the pass is the one without the reference."""
    _, lm = tiny
    clean, corrupt = tokens
    es = lm.edge_set()
    b = clean.shape[0]
    top, g = lm.shape.n_layers - 1, lm.adapter.kv_group()
    valid = es.valid().float()
    movable = (_receiver_layers(lm, es) >= start).float()[:, None] * valid
    ref_mask = (torch.rand(valid.shape, generator=torch.Generator().manual_seed(5)) < 0.5).float() * movable
    ablated = _ablated(lm, corrupt, es.senders, "corrupt")
    at = torch.tensor([8, 3, 5]) if read_at else None
    resume = (lm.clean_pass(clean, senders=es.senders), start) if start else None
    first = lm.run(clean, edges=EdgePatch.from_set(es, ablated, ref_mask[None], EdgeReference(ref_mask, {})),
                   logits_at=at, resume=resume)
    reference = EdgeReference(ref_mask, {s: d.clone() for s, d in first.deltas.items()}, first.deltas_at)
    mask = ref_mask.clone()
    r = es.receivers.index(Head(top, 0, Channel.Q))
    mask[r] = (1 - ref_mask[r]) * valid[r]
    want = lm.run(clean, edges=EdgePatch.from_set(es, ablated, mask[None]), logits_at=at, resume=resume)
    want_logits = want.logits.clone()
    got = lm.run(clean, edges=EdgePatch.from_set(es, ablated, mask[None], reference), logits_at=at, resume=resume)
    torch.testing.assert_close(got.logits, want_logits, atol=1e-5, rtol=1e-5)
    taken = {s for s in es.senders if got.deltas[s] is reference.deltas[s]}
    below = {s for s in es.senders if isinstance(s, (Head, Mlp)) and s.layer < top}
    assert below <= taken
    assert any(isinstance(s, Mlp) for s in taken)
    top_heads = {Head(top, h) for h in range(lm.shape.n_heads)}
    assert taken & top_heads == {Head(top, h) for h in range(g, lm.shape.n_heads)}


def test_a_layer_without_receivers_some_of_whose_heads_are_taken(tiny, tokens):
    """A patch whose receivers leave out a layer's heads, with a reference holding the
    deltas of only half of them: the heads whose whole key/value group has one are taken,
    the others computed from the stream (with one group for the layer, none is taken)."""
    _, lm = tiny
    clean, corrupt = tokens
    es = lm.edge_set()
    receivers = [r for r in es.receivers if not (isinstance(r, Head) and r.layer == 1)]
    rows = [es.receivers.index(r) for r in receivers]
    valid = es.valid().float()[rows]
    ablated = _ablated(lm, corrupt, es.senders, "corrupt")
    mask = (torch.rand(valid.shape, generator=torch.Generator().manual_seed(2)) < 0.5).float() * valid
    first = lm.run(clean, edges=EdgePatch(ablated, mask[None], es.senders, receivers, EdgeReference(mask, {})))
    g, n_heads = lm.adapter.kv_group(), lm.shape.n_heads
    kept = {Head(1, h) for h in range(n_heads // 2)}
    whole_groups = {Head(1, h) for h in range(n_heads)
                    if all(Head(1, u) in kept for u in range(h - h % g, h - h % g + g))}
    reference = EdgeReference(mask, {s: d.clone() for s, d in first.deltas.items()
                                     if not (isinstance(s, Head) and s.layer == 1) or s in kept})
    changed = mask.clone()
    r = receivers.index(Logits())
    changed[r] = (1 - mask[r]) * valid[r]
    want = lm.run(clean, edges=EdgePatch(ablated, changed[None], es.senders, receivers)).logits.clone()
    got = lm.run(clean, edges=EdgePatch(ablated, changed[None], es.senders, receivers, reference))
    torch.testing.assert_close(got.logits, want, atol=1e-5, rtol=1e-5)
    taken = {s for s in es.senders if got.deltas[s] is reference.deltas.get(s)}
    assert taken & {Head(1, h) for h in range(n_heads)} == whole_groups
    assert whole_groups or g == n_heads  # (every architecture but one group per layer takes some)
