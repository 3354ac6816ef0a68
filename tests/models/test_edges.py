"""Edge patching against an independent oracle, on every architecture.

The oracle never uses edge patches: it walks the model layer by layer, captures the
stream each receiver reads and every sender's current output under the node patches
set so far, forms `x - sum_s mask[r, s] * (out_s - ablated_s)` by hand, and sets that
receiver's input with a node patch (`Head(l, h, Q|K|V)`, `MlpIn(l)`, `Resid(n)`). The
edge engine groups receivers with equal mask rows, feeds the attention norm the input
most units share, keeps running sums for fully ablated rows and writes into reused
buffers; every one of those shortcuts is checked here against the slow way.
"""
from __future__ import annotations

import pytest
import torch

from circuitlang.models import EdgePatch, LoadedModel, Patch
from circuitlang.topology import edge_exists
from circuitlang.sites import Channel, Head, Logits, Mlp, MlpIn, Resid

Q, K, V = Channel.Q, Channel.K, Channel.V


def oracle(lm: LoadedModel, ids, ablated: dict, mask: torch.Tensor, senders, receivers, patches=()):
    """Logits and each receiver's input, computed receiver group by receiver group with node patches."""
    n = lm.shape.n_layers
    mask = mask.expand(ids.shape[0], *mask.shape[1:])
    patches = list(patches)
    inputs = {}

    def fill(group, stream_site):
        cache = lm.run(ids, patches=patches, capture=[*senders, stream_site]).cache
        x = cache[stream_site]
        for r, site in group:
            value = x.clone()
            for s_i, s in enumerate(senders):
                if edge_exists(lm.shape, s, site):
                    m = mask[:, r, s_i] if mask.dim() == 3 else mask[:, :, r, s_i]
                    m = m.view(-1, 1, 1) if mask.dim() == 3 else m[..., None]
                    value = value - m * (cache[s] - ablated[s])
            inputs[site] = value
            patch_site = {Head: site, Mlp: MlpIn(getattr(site, "layer", 0)), Logits: Resid(n)}[type(site)]
            patches.append(Patch(patch_site, value))

    for layer in range(n):
        heads = [(r, s) for r, s in enumerate(receivers) if isinstance(s, Head) and s.layer == layer]
        if heads:
            fill(heads, Resid(layer))
        mlps = [(r, s) for r, s in enumerate(receivers) if isinstance(s, Mlp) and s.layer == layer]
        if mlps:
            fill(mlps, MlpIn(layer))
    last = [(r, s) for r, s in enumerate(receivers) if isinstance(s, Logits)]
    if last:
        fill(last, Resid(n))
    return lm.run(ids, patches=patches).logits, inputs


def _setup(lm, tokens):
    clean, corrupt = tokens
    es = lm.edge_set()
    abl = lm.run(corrupt, capture=es.senders).cache
    return clean, es, abl


def _masks(es, batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Masks that exercise each path: per-row mixed, shared, ACDC-like, shared mixed rows."""
    valid = es.valid().float()
    r_n, s_n = valid.shape
    per_row = torch.randint(0, 3, (batch, r_n, s_n), generator=g).float() / 2 * valid  # 0, 0.5, 1
    shared = (torch.rand(1, r_n, s_n, generator=g) < 0.5).float() * valid
    acdc = valid.clone()[None]  # most edges ablated, a few kept: most rows all-ones
    for _ in range(6):
        r, s = int(torch.randint(r_n, (1,), generator=g)), int(torch.randint(s_n, (1,), generator=g))
        acdc[0, r, s] = 0
    same_row = torch.zeros(batch, r_n, s_n)  # one mixed row shared by a whole layer's q/k/v
    row = (torch.rand(s_n, generator=g) < 0.5).float()
    for r, site in enumerate(es.receivers):
        if isinstance(site, Head) and site.layer == 1:
            same_row[:, r] = row * valid[r]
    same_row[0, 0] = valid[0]  # and a different row in one batch element
    return {"per_row": per_row, "shared": shared, "acdc": acdc, "same_row": same_row}


@pytest.mark.parametrize("kind", ["per_row", "shared", "acdc", "same_row"])
def test_edges_equal_oracle(tiny, tokens, kind):
    arch, lm = tiny
    clean, es, abl = _setup(lm, tokens)
    mask = _masks(es, clean.shape[0], torch.Generator().manual_seed(7))[kind]
    want, _ = oracle(lm, clean, abl, mask, es.senders, es.receivers)
    got = lm.run(clean, edges=EdgePatch.from_set(es, abl, mask)).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    again = lm.run(clean, edges=EdgePatch.from_set(es, abl, mask)).logits  # reused buffers
    assert torch.equal(again, got)


def test_per_position_mask_equals_oracle(tiny, tokens):
    arch, lm = tiny
    clean, es, abl = _setup(lm, tokens)
    g = torch.Generator().manual_seed(11)
    b, t = clean.shape
    mask = (torch.rand(b, t, len(es.receivers), len(es.senders), generator=g) < 0.4).float() * es.valid()
    want, _ = oracle(lm, clean, abl, mask, es.senders, es.receivers)
    got = lm.run(clean, edges=EdgePatch.from_set(es, abl, mask)).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_subset_in_any_order_with_tensor_ablated(tiny, tokens):
    """Senders listed out of order, a few receivers, ablated values as one [B, S, T, D] tensor."""
    arch, lm = tiny
    clean, es, abl = _setup(lm, tokens)
    senders = list(reversed(es.senders))[::2]
    receivers = [r for r in es.receivers if not isinstance(r, Head) or r.head % 2 == 0][::-1]
    valid = torch.tensor([[float(edge_exists(lm.shape, s, r)) for s in senders]
                          for r in receivers])
    g = torch.Generator().manual_seed(5)
    mask = (torch.rand(clean.shape[0], len(receivers), len(senders), generator=g) < 0.6).float() * valid
    stacked = torch.stack([abl[s] for s in senders], 1)
    want, inputs = oracle(lm, clean, abl, mask, senders, receivers)
    run = lm.run(clean, edges=EdgePatch(stacked, mask, senders, receivers),
                 capture=[r for r in receivers if isinstance(r, Head)])
    torch.testing.assert_close(run.logits, want, atol=1e-4, rtol=1e-4)
    for site, value in run.cache.items():  # a captured q/k/v input is the receiver's edge input
        torch.testing.assert_close(value, inputs[site], atol=1e-5, rtol=1e-5)


def test_node_patch_on_an_edge_receiver_applies_after_edges(tiny, tokens):
    arch, lm = tiny
    clean, es, abl = _setup(lm, tokens)
    mask = es.mask(clean.shape[0])  # everything ablated: one shared input per layer
    value = torch.randn(clean.shape[0], lm.shape.d_model, generator=torch.Generator().manual_seed(2))
    pos = torch.full((clean.shape[0],), 3)
    site = Head(1, 0, Q)
    got = lm.run(clean, edges=EdgePatch.from_set(es, abl, mask), patches=[Patch(site, value, pos)]).logits
    # oracle: the receiver's input is its edge input with position 3 replaced
    _, inputs = oracle(lm, clean, abl, mask, es.senders, es.receivers)
    edge_in = inputs[site].clone()
    edge_in[:, 3] = value
    receivers = [r for r in es.receivers if r != site]
    keep = [es.receivers.index(r) for r in receivers]
    want, _ = oracle(lm, clean, abl, mask[:, keep], es.senders, receivers, patches=[Patch(site, edge_in)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_mask_gradients_match_finite_differences(build_tiny):
    """Attribution needs d(metric)/d(mask) at any mask, 0 included: no shortcut may drop it."""
    lm = LoadedModel.from_hf(build_tiny("gpt2").double(), name="tiny-gpt2-f64")
    g = torch.Generator().manual_seed(4)
    clean, corrupt = torch.randint(0, 61, (2, 2, 7), generator=g)
    es = lm.edge_set()
    abl = lm.run(corrupt, capture=es.senders).cache
    valid = es.valid().double()

    def metric(mask):
        return lm.run(clean, edges=EdgePatch.from_set(es, abl, mask), grad=True).logits[:, -1, 5].sum()

    for base in (torch.zeros_like(valid), valid):  # all kept, all ablated
        mask = base[None].expand(2, -1, -1).clone().requires_grad_(True)
        metric(mask).backward()
        assert mask.grad is not None
        for r, s in [(0, 0), (len(es.receivers) - 1, len(es.senders) - 1), (len(es.receivers) // 2, 1)]:
            if not valid[r, s]:
                continue
            e = torch.zeros_like(mask)
            e[:, r, s] = 1e-4
            with torch.no_grad():
                fd = (metric(mask.detach() + e) - metric(mask.detach() - e)) / 2e-4
            assert float(mask.grad[:, r, s].sum()) == pytest.approx(float(fd), rel=1e-4, abs=1e-7)


def test_buffers_are_reused_and_can_be_freed(tiny, tokens):
    arch, lm = tiny
    clean, es, abl = _setup(lm, tokens)
    patch = EdgePatch.from_set(es, abl, es.mask(clean.shape[0]))
    first = lm.run(clean, edges=patch).logits
    held = {k: v.data_ptr() for k, v in lm.buffers.items() if isinstance(v, torch.Tensor)}
    assert held, "edge patching on CPU keeps its scratch between runs"
    second = lm.run(clean, edges=patch).logits
    assert {k: v.data_ptr() for k, v in lm.buffers.items() if isinstance(v, torch.Tensor)} == held
    lm.free_buffers()
    assert not lm.buffers
    assert torch.equal(lm.run(clean, edges=patch).logits, first) and torch.equal(second, first)


def _receiver_layer(site, n_layers: int) -> int:
    return n_layers if isinstance(site, Logits) else site.layer


@pytest.mark.parametrize("start", [1, 2, "last", "logits"])
def test_resuming_a_clean_pass_equals_the_whole_pass(tiny, tokens, start):
    """Edges ablated only into receivers at or above a layer: the blocks below it come
    from a clean pass (every edge into them kept), and the logits equal the whole pass.
    Also for the batch repeated (several circuits of the same prompts along the batch)."""
    arch, lm = tiny
    clean, es, abl = _setup(lm, tokens)
    n = lm.shape.n_layers
    start = {"last": n - 1, "logits": n}.get(start, start)
    g = torch.Generator().manual_seed(3)
    b = clean.shape[0]
    above = torch.tensor([_receiver_layer(r, n) >= start for r in es.receivers])
    mask = (torch.rand(2 * b, len(es.receivers), len(es.senders), generator=g) < 0.5).float()
    mask = mask * es.valid() * above[None, :, None]
    ablated = {s: v.repeat(2, 1, 1) for s, v in abl.items()}
    ids = clean.repeat(2, 1)
    want = lm.run(ids, edges=EdgePatch.from_set(es, ablated, mask)).logits
    kept = lm.clean_pass(clean, senders=es.senders)
    rows = torch.arange(b).repeat(2)
    ran = []
    handles = [lm.adapter.attn(layer).register_forward_hook(lambda m, a, o, layer=layer: ran.append(layer))
               for layer in range(n)]
    try:
        got = lm.run(ids, edges=EdgePatch.from_set(es, ablated, mask), resume=(kept.rows(rows), start)).logits
    finally:
        for h in handles:
            h.remove()
    assert ran == list(range(start, n))  # the layers below `start` were not computed
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_resuming_below_an_ablated_receiver_is_refused(tiny, tokens):
    from circuitlang.errors import ModelError

    arch, lm = tiny
    clean, es, abl = _setup(lm, tokens)
    mask = torch.zeros(1, len(es.receivers), len(es.senders))
    r = next(i for i, site in enumerate(es.receivers) if isinstance(site, Head) and site.layer == 0)
    mask[0, r, 0] = 1.0
    kept = lm.clean_pass(clean, senders=es.senders)
    with pytest.raises(ModelError, match="cannot resume at layer 1"):
        lm.run(clean, edges=EdgePatch.from_set(es, abl, mask), resume=(kept, 1))
    with pytest.raises(ModelError, match="resid 0 is not computed when resuming at layer 1"):
        lm.run(clean, capture=[Resid(0)], edges=EdgePatch.from_set(es, abl, mask * 0), resume=(kept, 1))


def test_runs_resumed_one_after_another_reuse_the_clean_deltas_they_may(tiny, tokens):
    """ACDC's passes: many runs resumed from one clean pass with one ablated tensor, at
    layers going up and down, with a run of another ablated tensor and a run from the
    embedding up in between. The deltas of the senders below the resume layer that the
    reused buffer still holds are not written again, those it does not are; every run
    equals the whole pass."""
    from circuitlang.models import edge_engine

    arch, lm = tiny
    clean, es, abl = _setup(lm, tokens)
    n = lm.shape.n_layers
    stacked = torch.stack([abl[s] for s in es.senders], 1)  # [B, S, T, D], one tensor for every run
    other = stacked.flip(0).contiguous()  # another ablated tensor
    kept = lm.clean_pass(clean, senders=es.senders)
    g = torch.Generator().manual_seed(5)
    logits_row = [i for i, r in enumerate(es.receivers) if isinstance(r, Logits)][0]
    steps = [(2, stacked), (2, stacked), (1, stacked), (2, stacked), (n, stacked), (1, other), (2, stacked),
             (0, stacked), (2, stacked)]
    masks = []
    for start, _ in steps:
        above = torch.tensor([_receiver_layer(r, n) >= start for r in es.receivers])
        mask = (torch.rand(1, len(es.receivers), len(es.senders), generator=g) < 0.5).float()
        mask = mask * es.valid() * above[None, :, None]
        mask[0, logits_row] = 1.0  # every sender ablated into the logits: the same senders every run
        masks.append(mask)
    wants = [lm.run(clean, edges=EdgePatch(v, m, es.senders, es.receivers)).logits for (_, v), m in zip(steps, masks)]
    writes = []
    real = edge_engine._resume_below

    def counting(start, attn, mlp, senders, keys, *rest):
        below = sum(k[0] < start for k in keys)
        writes.append(max(0, below - rest[-1]))  # the senders written this run
        return real(start, attn, mlp, senders, keys, *rest)

    edge_engine._resume_below = counting
    try:
        for (start, values), mask, want in zip(steps, masks, wants):
            got = lm.run(clean, edges=EdgePatch(values, mask, es.senders, es.receivers),
                         resume=(kept, start) if start else None).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"resumed at {start}")
    finally:
        edge_engine._resume_below = real
    keys = sorted(edge_engine.sender_key(s) for s in es.senders)
    b = {layer: sum(k[0] < layer for k in keys) for layer in (1, 2, n)}
    assert writes == [b[2], 0, 0, b[2] - b[1], b[n] - b[2], b[1], b[2], b[2]]


@pytest.mark.parametrize("start", [1, "last"])
def test_resumed_runs_reuse_the_first_layers_columns_only_where_the_row_is_the_same(tiny, tokens, start):
    """ACDC's passes at one layer: resumed from one clean pass with one ablated tensor,
    each mask changing one receiver's row of the resume layer. Its q/k/v columns come from
    the earlier runs' (`edge_engine.ReusedColumns`) for every unchanged row, and are
    computed for the changed one; another ablated tensor reuses nothing. Every run equals
    the whole pass."""
    from circuitlang.models import edge_engine

    arch, lm = tiny
    clean, es, abl = _setup(lm, tokens)
    n = lm.shape.n_layers
    start = n - 1 if start == "last" else start
    stacked = torch.stack([abl[s] for s in es.senders], 1)
    other = stacked.flip(0).contiguous()
    kept = lm.clean_pass(clean, senders=es.senders)
    at_start = [i for i, r in enumerate(es.receivers) if isinstance(r, Head) and r.layer == start]
    g = torch.Generator().manual_seed(11)
    above = torch.tensor([_receiver_layer(r, n) >= start for r in es.receivers])
    mask = (torch.rand(1, len(es.receivers), len(es.senders), generator=g) < 0.5).float() * es.valid()
    mask = mask * above[None, :, None]
    masks, values = [], []
    for step in range(6):
        mask = mask.clone()
        r = at_start[step % len(at_start)]
        mask[0, r] = (torch.rand(len(es.senders), generator=g) < 0.5).float() * es.valid()[r]
        masks.append(mask)
        values.append(other if step == 4 else stacked)
    lm.free_buffers()
    counts = []
    real_put = edge_engine.ReusedColumns.put

    def put(self, key, value):
        counts[-1] += 1
        return real_put(self, key, value)

    edge_engine.ReusedColumns.put = put
    try:
        for mask, v in zip(masks, values):
            want = lm.run(clean, edges=EdgePatch(v, mask, es.senders, es.receivers)).logits
            counts.append(0)
            got = lm.run(clean, edges=EdgePatch(v, mask, es.senders, es.receivers), resume=(kept, start)).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    finally:
        edge_engine.ReusedColumns.put = real_put
    first = counts[0]
    assert first >= 2  # the rows of the first run, all computed
    # each later run computes at most the changed receiver's new row and the row it left
    # (units reading one row are projected, and kept, together); the run with the other
    # ablated tensor and the one after it start again
    assert all(c <= 2 for c in counts[1:4]), counts
    assert counts[4] >= 2 and counts[5] >= 2, counts


@pytest.mark.parametrize("form", ["few kept", "few ablated"])
def test_rows_that_differ_from_ablated_or_clean_in_few_senders_equal_the_oracle(tiny, tokens, form):
    """ACDC's rows: every edge into a receiver ablated but one or two (or kept but one or
    two), differently per batch row. Such a row reads only those senders' deltas, from the
    ablated stream (or the stream); the logits equal the oracle's."""
    from circuitlang.models.edge_engine import _group

    arch, lm = tiny
    clean, es, abl = _setup(lm, tokens)
    valid = es.valid().float()
    g = torch.Generator().manual_seed(9)
    b = clean.shape[0]
    flip = torch.zeros(b, *valid.shape)
    for r in range(valid.shape[0]):
        columns = valid[r].nonzero()[:, 0]
        for i in range(b):
            picked = columns[torch.randperm(len(columns), generator=g)[: 1 + i % 2]]
            flip[i, r, picked] = 1.0
    mask = (valid - flip if form == "few kept" else flip) * valid
    want, _ = oracle(lm, clean, abl, mask, es.senders, es.receivers)
    got = lm.run(clean, edges=EdgePatch.from_set(es, abl, mask)).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the logits' row (every sender in its prefix) is one of them
    logits = [i for i, r in enumerate(es.receivers) if isinstance(r, Logits)]
    found = _group(mask, logits, len(es.senders))
    (row,) = found.sparse
    assert row[1] == (form == "few kept") and 1 <= len(row[2]) <= 2 * b and found.coef is None
