"""Capture and patching on tiny random-init models of every architecture.

Hand-written hooks below name HF module paths on purpose: they are the independent
reference the adapters are checked against.
"""
from __future__ import annotations

import pytest
import torch

from circuitlang.errors import ModelError
from circuitlang.models import EdgePatch, Patch
from circuitlang.sites import Channel, Embed, Head, Logits, Mlp, PosEmbed, Resid, TokenEmbed

Q, K, V, OUT, PATTERN = Channel.Q, Channel.K, Channel.V, Channel.OUT, Channel.PATTERN


def _attn(model, arch, layer):
    if arch == "gpt2":
        return model.transformer.h[layer].attn
    if arch.startswith("gpt_neox"):
        return model.gpt_neox.layers[layer].attention
    return model.model.layers[layer].self_attn


def _o_proj(model, arch, layer):
    attn = _attn(model, arch, layer)
    return {"gpt2": "c_proj"}.get(arch, "dense" if arch.startswith("gpt_neox") else "o_proj"), attn


def _out_proj(model, arch, layer):
    name, attn = _o_proj(model, arch, layer)
    return getattr(attn, name)


def _q_columns(lm, arch, head):
    """Columns of head `head`'s query in its projection's output, written out per architecture."""
    d_head = lm.shape.d_head
    if arch.startswith("gpt_neox"):
        start = head * 3 * d_head
    else:  # gpt2: [q | k | v] fused, q first; llama family: q_proj alone
        start = head * d_head
    return slice(start, start + d_head)


def _q_module(model, arch, layer):
    attn = _attn(model, arch, layer)
    if arch == "gpt2":
        return attn.c_attn
    if arch.startswith("gpt_neox"):
        return attn.query_key_value
    return attn.q_proj


def _plain(lm, ids, mask=None):
    # like with like: `run` asks for no key/value cache, and on some releases (GPT-2 on
    # transformers 5.x) building one takes another path whose logits differ in the last bits
    with torch.no_grad():
        return lm.hf_model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def test_plain_run_equals_hf_forward(tiny, tokens):
    arch, lm = tiny
    clean, _ = tokens
    assert torch.equal(lm.run(clean).logits, _plain(lm, clean))


def test_identity_patches_are_exact(tiny, tokens):
    arch, lm = tiny
    clean, _ = tokens
    n, h = lm.shape.n_layers, lm.shape.n_heads
    sites = [Embed(), TokenEmbed(), Logits()] + [Resid(l) for l in range(n + 1)] + [Mlp(l) for l in range(n)]
    sites += [Head(l, i, c) for l in range(n) for i in range(h) for c in (Q, K, V, OUT, PATTERN)]
    if arch == "gpt2":
        sites.append(PosEmbed())
    run = lm.run(clean, capture=sites)
    plain = _plain(lm, clean)
    assert torch.equal(run.logits, plain)
    for site in sites:  # one site at a time, then all at once
        patched = lm.run(clean, patches=[Patch(site, run.cache[site])])
        assert torch.equal(patched.logits, plain), site
    all_at_once = lm.run(clean, patches=[Patch(s, run.cache[s]) for s in sites])
    assert torch.equal(all_at_once.logits, plain)


def test_head_outputs_sum_to_attention_output(tiny, tokens):
    arch, lm = tiny
    clean, _ = tokens
    model = lm.hf_model
    seen = {}
    handles = [
        _attn(model, arch, l).register_forward_hook(lambda m, a, o, l=l: seen.__setitem__(l, o[0]))
        for l in range(lm.shape.n_layers)
    ]
    try:
        run = lm.run(clean, capture=[Head(l, h) for l in range(lm.shape.n_layers) for h in range(lm.shape.n_heads)])
    finally:
        for handle in handles:
            handle.remove()
    for layer in range(lm.shape.n_layers):
        total = sum(run.cache[Head(layer, h)] for h in range(lm.shape.n_heads))
        bias = _out_proj(model, arch, layer).bias
        total = total + (bias if bias is not None else 0)
        torch.testing.assert_close(total, seen[layer], atol=1e-5, rtol=1e-5)


def test_head_out_patch_equals_hand_hook(tiny, tokens):
    arch, lm = tiny
    clean, corrupt = tokens
    layer, head, d_head = 1, 2, lm.shape.d_head
    cols = slice(head * d_head, (head + 1) * d_head)
    out_proj = _out_proj(lm.hf_model, arch, layer)
    grabbed = {}
    handle = out_proj.register_forward_pre_hook(lambda m, a: grabbed.__setitem__("z", a[0].clone()))
    _plain(lm, corrupt)
    handle.remove()

    def swap(module, args):
        z = args[0].clone()
        z[..., cols] = grabbed["z"][..., cols]
        return (z,)

    handle = out_proj.register_forward_pre_hook(swap)
    expected = _plain(lm, clean)
    handle.remove()
    value = lm.run(corrupt, capture=[Head(layer, head)]).cache[Head(layer, head)]
    got = lm.run(clean, patches=[Patch(Head(layer, head), value)]).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_query_input_patch_equals_hand_hook(tiny, tokens):
    arch, lm = tiny
    clean, corrupt = tokens
    layer, head = 2, 1
    module = _q_module(lm.hf_model, arch, layer)
    cols = _q_columns(lm, arch, head)
    grabbed = {}
    handle = module.register_forward_hook(lambda m, a, o: grabbed.__setitem__("q", o.clone()))
    _plain(lm, corrupt)
    handle.remove()

    def swap(m, a, o):
        o = o.clone()
        o[..., cols] = grabbed["q"][..., cols]
        return o

    handle = module.register_forward_hook(swap)
    expected = _plain(lm, clean)
    handle.remove()
    value = lm.run(corrupt, capture=[Resid(layer)]).cache[Resid(layer)]
    got = lm.run(clean, patches=[Patch(Head(layer, head, Q), value)]).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_positions_and_rows(tiny, tokens):
    arch, lm = tiny
    clean, corrupt = tokens
    site = Mlp(1) if lm.shape.has_mlp else Resid(1)
    cor = lm.run(corrupt, capture=[site]).cache[site]
    cln = lm.run(clean, capture=[site]).cache[site]
    pos = torch.tensor([3, 5, 8])
    full = cln.clone()
    full[torch.arange(3), pos] = cor[torch.arange(3), pos]
    a = lm.run(clean, patches=[Patch(site, cor[torch.arange(3), pos], positions=pos)]).logits
    b = lm.run(clean, patches=[Patch(site, full)]).logits
    assert torch.equal(a, b)
    rows = torch.tensor([True, False, True])
    c = lm.run(clean, patches=[Patch(site, cor, rows=rows)]).logits
    clean_logits, corrupt_logits = _plain(lm, clean), lm.run(clean, patches=[Patch(site, cor)]).logits
    assert torch.equal(c[1], clean_logits[1])
    assert torch.equal(c[0], corrupt_logits[0]) and torch.equal(c[2], corrupt_logits[2])


def test_edges_zero_mask_is_clean_full_mask_is_corrupt(tiny, tokens):
    arch, lm = tiny
    clean, corrupt = tokens
    es = lm.edge_set()
    abl = lm.run(corrupt, capture=es.senders).cache
    zero = lm.run(clean, edges=EdgePatch.from_set(es, abl, es.mask(3) * 0))
    assert torch.equal(zero.logits, _plain(lm, clean))
    full = lm.run(clean, edges=EdgePatch.from_set(es, abl, es.mask(3)))
    torch.testing.assert_close(full.logits, _plain(lm, corrupt), atol=1e-4, rtol=1e-4)
    # per-position masks too
    full4 = lm.run(clean, edges=EdgePatch.from_set(es, abl, es.mask(3)[:, None].expand(3, 9, -1, -1)))
    torch.testing.assert_close(full4.logits, full.logits, atol=1e-5, rtol=1e-5)


def test_edges_into_one_receiver_equal_node_patch(tiny, tokens):
    arch, lm = tiny
    clean, corrupt = tokens
    es = lm.edge_set()
    abl = lm.run(corrupt, capture=es.senders + (Resid(2),)).cache
    receiver = Head(2, 0, K)
    mask = es.mask(3, [(s, receiver) for s in es.senders if s in es.senders[: 1 + 2 * (lm.shape.n_heads + lm.shape.has_mlp)]])
    got = lm.run(clean, edges=EdgePatch.from_set(es, abl, mask)).logits
    want = lm.run(clean, patches=[Patch(receiver, abl[Resid(2)])]).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_per_row_edge_choices_equal_separate_runs(tiny, tokens):
    arch, lm = tiny
    clean, corrupt = tokens
    es = lm.edge_set()
    abl = lm.run(corrupt, capture=es.senders).cache
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(3, len(es.receivers), len(es.senders), generator=g) < 0.3).float() * es.valid()
    batched = lm.run(clean, edges=EdgePatch.from_set(es, abl, mask)).logits
    for b in range(3):
        one = {s: v[b : b + 1] for s, v in abl.items()}
        single = lm.run(clean[b : b + 1], edges=EdgePatch.from_set(es, one, mask[b : b + 1])).logits
        torch.testing.assert_close(batched[b : b + 1], single, atol=1e-5, rtol=1e-5)


def test_padded_batch_matches_unpadded(tiny):
    arch, lm = tiny
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, 61, (7,), generator=g), torch.randint(0, 61, (4,), generator=g)
    ids = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros(2, 7, dtype=torch.long)
    ids[0], mask[0] = a, 1
    ids[1, :4], mask[1, :4] = b, 1
    run = lm.run(ids, mask, capture=[Head(1, 0, PATTERN)])
    single = lm.run(b[None], capture=[Head(1, 0, PATTERN)])
    torch.testing.assert_close(run.logits[1, :4], single.logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(run.cache[Head(1, 0, PATTERN)][1, :4, :4], single.cache[Head(1, 0, PATTERN)][0],
                               atol=1e-5, rtol=1e-5)


def test_bad_sites_and_values_raise_model_error(tiny, tokens):
    arch, lm = tiny
    clean, _ = tokens
    with pytest.raises(ModelError, match="out of range"):
        lm.run(clean, capture=[Head(7, 0)])
    with pytest.raises(ModelError, match="out of range"):
        lm.run(clean, capture=[Head(0, 9)])
    with pytest.raises(ModelError, match="expected"):
        lm.run(clean, patches=[Patch(Resid(1), torch.zeros(3, 9, 5))])
    es = lm.edge_set()
    abl = lm.run(clean, capture=es.senders).cache
    bad = torch.zeros(3, len(es.receivers), len(es.senders))
    ri, si = es.receivers.index(Head(0, 0, Q)), es.senders.index(Head(1, 0))
    bad[:, ri, si] = 1
    with pytest.raises(ModelError, match="not an edge"):
        lm.run(clean, edges=EdgePatch.from_set(es, abl, bad))
    if lm.shape.kv_heads < lm.shape.n_heads:
        with pytest.raises(ModelError, match="grouped-query"):
            lm.run(clean, edges=EdgePatch(abl, torch.zeros(3, 2, 1), [Embed()], [Head(1, 0, K), Head(1, 1, K)]))
    if not lm.adapter.has_pos_embed:
        with pytest.raises(ModelError, match="positional"):
            lm.run(clean, capture=[PosEmbed()])
