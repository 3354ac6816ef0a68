"""Attribution patching (EAP, EAP-IG) on the edge engine: exact where it must be, and the
planted circuit recovered."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import circuitlang
from circuitlang.discover.attribution import eap, eap_ig, node_scores
from circuitlang.discover.problem import EdgeSpace, Problem
from circuitlang.models import LoadedModel, Patch
from circuitlang.sites import Embed, Head, Mlp

import planted_circuit as pc


@pytest.fixture(scope="module")
def planted():
    lm = LoadedModel.from_hf(pc.model(), pc.tokenizer(), name="planted-discovery")
    task = pc.FreshInduction(lm.tokenizer, length=6)
    return lm, task


def _names(edges):
    return {(str(s), str(r)) for s, r, _ in edges}


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_the_planted_edges_are_the_top_ones_and_the_smallest_faithful_circuit(planted, method):
    lm, task = planted
    top = circuitlang.discover(model=lm, task=task, method=method, edges=len(pc.PLANTED), n=24,
                               with_curve=False, check=False)
    assert _names(top.edges) == pc.PLANTED  # precision = recall = 1
    grown = circuitlang.discover(model=lm, task=task, method=method, target=0.9, n=24, with_curve=False,
                                 check=False)
    assert _names(grown.edges) == pc.PLANTED
    assert grown.faithfulness.value > 0.95


def _linear_model():
    """Attention-only GPT-2 that is linear in every edge by construction: queries and keys
    are zero (uniform causal attention averages the values: linear), and two constant
    dimensions of the embedding dominate every layer norm's scale (the norms are then a
    fixed linear map up to ~1e-7)."""
    import transformers as tf

    torch.manual_seed(0)
    d, c = 24, 1e5
    cfg = tf.GPT2Config(vocab_size=13, n_positions=16, n_embd=d, n_layer=3, n_head=2, n_inner=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)
    m = tf.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        tr = m.transformer
        tr.wte.weight[:, : d - 2].normal_(0, 1.0)
        tr.wpe.weight[:, : d - 2].normal_(0, 0.3)
        tr.wpe.weight[:, d - 2], tr.wpe.weight[:, d - 1] = c, -c
        for block in tr.h:
            block.ln_1.weight.fill_(1.0)
            block.ln_2.weight.fill_(1.0)
            block.attn.c_attn.weight[:, 2 * d:].normal_(0, 1.0)  # values only
            block.attn.c_proj.weight[:, : d - 2].normal_(0, 3000.0)
        tr.ln_f.weight.fill_(1.0)
        m.lm_head.weight[:, : d - 2].normal_(0, 3000.0)
    return LoadedModel.from_hf(m.eval().double(), pc_tokenizer(13), name="linear")


def pc_tokenizer(v):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(v)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_eap_equals_exact_patching_of_each_edge_where_the_model_is_linear():
    lm = _linear_model()
    task = pc.FreshInduction(lm.tokenizer, length=5)
    prompts = task.prompts(8, 0)
    problem = Problem(lm, task, prompts, "logit_diff", "corrupt")
    scores = eap(problem).edges.double()
    e = len(problem.space)
    single = ~torch.eye(e, dtype=torch.bool)  # every edge ablated alone
    exact = problem.score(single).mean(1) - problem.full().mean()
    np.testing.assert_allclose(scores.numpy(), exact, atol=1e-4 * float(np.abs(exact).max()))
    assert float(np.abs(exact).max()) > 0.05  # the edges do something


def test_eap_ig_approaches_exact_integrated_gradients_and_is_complete(planted):
    """Integrated gradients along the activations' path converge as steps grow, and add up
    (completeness): the scores of every edge sum to m(every edge ablated) - m(full model)."""
    lm, task = planted
    problem = Problem(lm, task, task.prompts(8, 0), "logit_diff", "corrupt")
    fine = eap_ig(problem, "activations", 200).edges.double()
    errors = [float((eap_ig(problem, "activations", s).edges.double() - fine).abs().sum()) for s in (2, 8, 32)]
    assert errors[0] > errors[1] > errors[2]
    gap = problem.empty().mean() - problem.full().mean()
    assert float(fine.sum()) == pytest.approx(gap, rel=2e-2)


def test_node_scores_are_the_sums_of_their_edges_and_the_node_gradient(planted):
    lm, task = planted
    prompts = task.prompts(8, 0)
    problem = Problem(lm, task, prompts, "logit_diff", "corrupt")
    scores = eap(problem)
    nodes = node_scores(scores)
    by_edge = scores.by_edge()
    for node in (Embed(), Head(0, 0), Head(1, 0)):
        assert nodes[node] == pytest.approx(sum(v for (s, _, _), v in by_edge.items() if s == node), abs=1e-6)
    # the same number from a node patch: d metric / d(ablating 1.0's output)
    clean = lm.run(prompts.input_ids, capture=[Head(1, 0)]).cache[Head(1, 0)]
    corrupt = lm.run(prompts.corrupt_input_ids, capture=[Head(1, 0)]).cache[Head(1, 0)]
    beta = torch.zeros((), requires_grad=True)
    with torch.enable_grad():
        run = lm.run(prompts.input_ids, patches=[Patch(Head(1, 0), clean + beta * (corrupt - clean))], grad=True)
        (grad,) = torch.autograd.grad(task.metric("logit_diff", run.logits, prompts).mean(), beta)
    assert nodes[Head(1, 0)] == pytest.approx(float(grad), rel=1e-4)


def test_scores_are_keyed_by_typed_sites_and_per_position_spaces_work(planted):
    from circuitlang.sites import Position

    lm, task = planted
    prompts = task.prompts(8, 0)
    # every edge elsewhere is ablated, so the positions where the circuit acts are named:
    # 0.0 reads the token at PREV, 1.0's keys read 0.0 at PREV+1, its query reads END
    where = (Position("END"), Position("PREV"), Position("PREV", 1))
    space = EdgeSpace.build(lm.edge_set(), where)
    problem = Problem(lm, task, prompts, "logit_diff", "corrupt", space)
    scores = eap_ig(problem, "inputs", 5)
    by_edge = scores.by_edge()
    assert len(by_edge) == 3 * len(lm.edge_set().edges())
    assert abs(by_edge[(Embed(), Head(1, 0, channel=_q()), Position("END"))]) > 0.01
    assert abs(by_edge[(Head(0, 0), Head(1, 0, channel=_k()), Position("PREV", 1))]) > 0.01
    assert abs(by_edge[(Embed(), Head(0, 0, channel=_v()), Position("PREV"))]) > 0.01
    assert abs(by_edge[(Head(0, 0), Head(1, 0, channel=_k()), Position("END"))]) < 1e-3
    assert all(isinstance(k[0], (Embed, Head, Mlp)) for k in by_edge)


def _q():
    from circuitlang.sites import Channel

    return Channel.Q


def _k():
    from circuitlang.sites import Channel

    return Channel.K


def _v():
    from circuitlang.sites import Channel

    return Channel.V
