"""A planted induction circuit: a 2-layer attention-only GPT-2 whose weights are set by hand.

Residual stream layout (d_model 40): token one-hots [0, 8), position one-hots [8, 24),
"previous token" [24, 32) written by head 0.0, "output" [32, 40) written by head 1.0 and
read by the unembedding. Head 0.0 attends from p to p-1 and copies the token there;
head 1.0 attends to positions whose previous token equals the current token (K-composition
with 0.0) and copies the token it finds. Every other head is zero.
"""
from __future__ import annotations

import pytest
import torch

from circuitlang.models import EdgePatch, LoadedModel, Patch
from circuitlang.sites import Channel, Embed, Head

N_TOK, N_POS, D, N_HEAD = 8, 16, 40, 2
TOK, POS, PREV, OUT = 0, 8, 24, 32
BOS = 0
SHARP = 6.0


@pytest.fixture(scope="module")
def planted() -> LoadedModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=N_TOK, n_positions=N_POS, n_embd=D, n_layer=2, n_head=N_HEAD, n_inner=4,
                        tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config.circuitlang_attn_only = True
    model = GPT2LMHeadModel(config)
    d_head = D // N_HEAD
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for ln in [b.ln_1 for b in model.transformer.h] + [b.ln_2 for b in model.transformer.h] + [model.transformer.ln_f]:
            ln.weight.fill_(1.0)
        tr = model.transformer
        for t in range(N_TOK):
            tr.wte.weight[t, TOK + t] = 1.0
        for p in range(N_POS):
            tr.wpe.weight[p, POS + p] = 1.0
        # head 0.0: query = own position, key = position + 1 -> attends p-1; copies the token into PREV
        w0, o0 = tr.h[0].attn.c_attn.weight, tr.h[0].attn.c_proj.weight  # Conv1D: [in, out]
        for p in range(N_POS):
            w0[POS + p, 0 * d_head + p] = SHARP
            if p + 1 < N_POS:
                w0[POS + p, D + 0 * d_head + p + 1] = SHARP
        for t in range(N_TOK):
            w0[TOK + t, 2 * D + 0 * d_head + t] = 1.0
            o0[0 * d_head + t, PREV + t] = 0.25
        # head 1.0: query = current token, key = previous token (from 0.0); copies the token into OUT
        w1, o1 = tr.h[1].attn.c_attn.weight, tr.h[1].attn.c_proj.weight
        for t in range(N_TOK):
            w1[TOK + t, t] = SHARP
            w1[PREV + t, D + t] = SHARP
            w1[TOK + t, 2 * D + t] = 1.0
            o1[t, OUT + t] = 0.25
            model.lm_head.weight[t, OUT + t] = 10.0
    return LoadedModel.from_hf(model.eval(), name="planted-induction")


def _repeated(n: int = 6, rows: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randperm(N_TOK - 1, generator=g)[:n] + 1 for _ in range(rows)]  # tokens 1..7, no repeats
    return torch.stack([torch.cat([torch.tensor([BOS]), s, s]) for s in seqs])


def test_planted_model_predicts_the_repeat(planted):
    ids = _repeated()
    n = 6
    logits = planted.run(ids).logits
    pred = logits[:, n + 1 : 2 * n].argmax(-1)  # positions in the second copy, but its last
    assert torch.equal(pred, ids[:, 2 : n + 1])


def test_captured_patterns_show_the_circuit(planted):
    ids = _repeated()
    n = 6
    run = planted.run(ids, capture=[Head(0, 0, Channel.PATTERN), Head(1, 0, Channel.PATTERN), Head(0, 0)])
    prev = run.cache[Head(0, 0, Channel.PATTERN)]
    t = torch.arange(1, ids.shape[1])
    assert prev[:, t, t - 1].min() > 0.9  # previous-token head
    ind = run.cache[Head(1, 0, Channel.PATTERN)]
    q = torch.arange(n + 1, 2 * n + 1)
    assert ind[:, q, q - n + 1].min() > 0.9  # induction: the token after the earlier copy
    # 0.0's output carries the previous token in the PREV subspace
    out = run.cache[Head(0, 0)][:, 1:, PREV : PREV + N_TOK].argmax(-1)
    assert torch.equal(out, ids[:, :-1])


def test_ablating_the_k_composition_edge_breaks_induction(planted):
    ids = _repeated()
    n = 6
    es = planted.edge_set()
    shuffled = _repeated(seed=1)
    abl = planted.run(shuffled, capture=es.senders).cache
    mask = es.mask(ids.shape[0], [(Head(0, 0), Head(1, 0, Channel.K))])
    logits = planted.run(ids, edges=EdgePatch.from_set(es, abl, mask)).logits
    acc = (logits[:, n + 1 : 2 * n].argmax(-1) == ids[:, 2 : n + 1]).float().mean()
    assert acc < 0.5
    # the query side does not use 0.0: ablating 0.0 -> 1.0.q changes nothing that matters
    mask_q = es.mask(ids.shape[0], [(Head(0, 0), Head(1, 0, Channel.Q))])
    logits_q = planted.run(ids, edges=EdgePatch.from_set(es, abl, mask_q)).logits
    assert torch.equal(logits_q[:, n + 1 : 2 * n].argmax(-1), ids[:, 2 : n + 1])
    # patching the induction head's output with its own clean value changes nothing
    clean = planted.run(ids, capture=[Head(1, 0), Embed()])
    again = planted.run(ids, patches=[Patch(Head(1, 0), clean.cache[Head(1, 0)])])
    assert torch.equal(again.logits, clean.logits)
