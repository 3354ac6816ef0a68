"""The checker and the edge engine agree on what an edge set means.

An edge-only hypothesis with `ablation corrupt`, in which every sender other than the
embedding has a kept input (no edge dangles from the input side), scrubs to the same
per-prompt metric as the edge engine patching every edge outside it with the
counterfactual's values (ACDC's and auto-circuit's reading). The solver finds edge
sets with the engine and writes them back as programs for the checker, so this is the
contract between them (circuitlang/ir_to_edges.py).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circuitlang import topology
from circuitlang.execute import Scrubber
from circuitlang.ir import Ablation, EdgeClaim, Hypothesis
from circuitlang.ir_to_edges import ir_to_edges
from circuitlang.ir_to_graph import ir_to_graph
from circuitlang.models import EdgePatch, LoadedModel, load_model
from circuitlang.sites import ALL, Channel, Embed, Head, Logits, Mlp, Position
from circuitlang.tasks import load_task

END = Position("END")


def _tiny(arch: str) -> LoadedModel:
    spec = importlib.util.spec_from_file_location(
        "_models_conftest", Path(__file__).resolve().parents[1] / "models" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return LoadedModel.from_hf(module.build_tiny(arch), name=f"tiny-{arch}")


@pytest.fixture(scope="module", params=["toy-induction", "toy-ioi", "llama", "gpt_neox"])
def setup(request):
    name = request.param
    if name.startswith("toy-"):
        lm = load_model(name, device="cpu")
        if name == "toy-ioi":
            task = load_task("ioi", tokenizer=lm.tokenizer, prepend_bos=False)
        else:
            task = load_task("induction", tokenizer=lm.tokenizer, length=6)
    else:
        lm = _tiny(name)
        task = load_task("induction", tokenizer=None, length=5, vocab=lm.shape.vocab_size)
    prompts = task.prompts(12, 0)
    return lm, task, prompts


def alive(edges, shape):
    """Drop edges from senders with no kept input (the embedding always has its input)."""
    edges = set(edges)
    while True:
        fed = {(r.layer, r.head) if isinstance(r, Head) else r for _, r, _ in edges}
        keep = {e for e in edges
                if isinstance(e[0], Embed)
                or (isinstance(e[0], Head) and (e[0].layer, e[0].head) in fed)
                or (isinstance(e[0], Mlp) and e[0] in fed)}
        if keep == edges:
            return sorted(edges, key=str)
        edges = keep


def with_groups(edges, shape):
    """Under grouped-query attention a key/value edge feeds every query head of the group:
    name it for each (the engine names the group by its first head)."""
    out = []
    for s, r, p in edges:
        if isinstance(r, Head) and r.channel in (Channel.K, Channel.V):
            first = r.head - r.head % shape.kv_group
            out += [(s, Head(r.layer, first + i, r.channel), p) for i in range(shape.kv_group)]
        else:
            out.append((s, r, p))
    return out


def engine_metric(lm, task, prompts, circuit) -> np.ndarray:
    es = circuit.edge_set
    corrupt = lm.run(prompts.corrupt_input_ids, prompts.attention_mask, capture=es.senders).cache
    mask = circuit.mask(prompts)
    logits = lm.run(prompts.input_ids, prompts.attention_mask,
                    edges=EdgePatch.from_set(es, corrupt, mask)).logits
    return task.metric("logit_diff", logits, prompts).double().numpy()


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_scrubbing_an_edge_set_with_corrupt_ablation_equals_edge_patching(setup, data):
    lm, task, prompts = setup
    shape = lm.shape
    every = topology.edges(shape)
    picks = data.draw(st.lists(st.sampled_from(every), min_size=1, max_size=12, unique=True))
    where = data.draw(st.lists(st.sampled_from([ALL, END]), min_size=len(picks), max_size=len(picks)))
    edges = alive([(s, r, p) for (s, r), p in zip(picks, where)], shape)
    edges = with_groups(edges, shape)
    claims = tuple(EdgeClaim(s, r, p) for s, r, p in dict.fromkeys(edges))
    hypothesis = Hypothesis(model=lm.name, task=task.name, metric="logit_diff", ablation=Ablation("corrupt"),
                            claims=claims, shape=shape)
    scrubbed = Scrubber(lm, task, prompts, "logit_diff").scrub(ir_to_graph(hypothesis), seed=0).scrubbed
    patched = engine_metric(lm, task, prompts, ir_to_edges(hypothesis))
    np.testing.assert_allclose(scrubbed, patched, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("order", ["named-first", "all-first"])
def test_an_unclaimed_sender_read_at_END_and_at_all_enters_everywhere_for_the_edge_at_all(setup, order):
    """Found by the test above: `embed -> 0.0.q at END` made an edge-only embed node at
    END, and a later `embed -> 2.2.v at all` read that node at END only, so the edge
    at all was ablated everywhere else."""
    lm, task, prompts = setup
    last = lm.shape.n_layers - 1
    first = [EdgeClaim(Embed(), Head(0, 0, Channel.Q), END), EdgeClaim(Embed(), Head(0, 1, Channel.Q), ALL)]
    rest = [EdgeClaim(Embed(), Head(last, 0, Channel.V), ALL), EdgeClaim(Head(last, 0), Logits(), ALL)]
    edges = with_groups([(c.sender, c.receiver, c.position) for c in
                         (first + rest if order == "named-first" else rest + first)], lm.shape)
    hypothesis = Hypothesis(model=lm.name, task=task.name, metric="logit_diff", ablation=Ablation("corrupt"),
                            claims=tuple(EdgeClaim(s, r, p) for s, r, p in dict.fromkeys(edges)),
                            shape=lm.shape)
    scrubbed = Scrubber(lm, task, prompts, "logit_diff").scrub(ir_to_graph(hypothesis), seed=0).scrubbed
    patched = engine_metric(lm, task, prompts, ir_to_edges(hypothesis))
    np.testing.assert_allclose(scrubbed, patched, atol=2e-4, rtol=1e-4)


def test_nothing_kept_is_the_counterfactual_and_everything_kept_is_the_clean_model(setup):
    lm, task, prompts = setup
    clean = task.metric("logit_diff", lm.run(prompts.input_ids, prompts.attention_mask).logits, prompts)
    corrupt_run = lm.run(prompts.corrupt_input_ids, prompts.attention_mask).logits
    empty = Hypothesis(model=lm.name, task=task.name, metric="logit_diff", ablation=Ablation("corrupt"),
                       shape=lm.shape)
    scrubber = Scrubber(lm, task, prompts, "logit_diff")
    np.testing.assert_allclose(scrubber.scrub(ir_to_graph(empty), seed=0).scrubbed,
                               task.metric("logit_diff", corrupt_run, prompts).double().numpy(), atol=1e-4)
    all_edges = with_groups([(s, r, ALL) for s, r in topology.edges(lm.shape)], lm.shape)
    everything = Hypothesis(model=lm.name, task=task.name, metric="logit_diff", ablation=Ablation("corrupt"),
                            claims=tuple(EdgeClaim(s, r, p) for s, r, p in all_edges), shape=lm.shape)
    circuit = ir_to_edges(everything)
    assert len(circuit) == len(topology.edges(lm.shape))
    # (scrubbing the whole graph treeifies every path of the model: the random circuits
    # above are the scrubber's side of this)
    np.testing.assert_allclose(engine_metric(lm, task, prompts, circuit), clean.double().numpy(), atol=1e-4)


def test_an_edge_kept_at_one_position_is_ablated_at_every_other():
    lm = load_model("toy-induction", device="cpu")
    task = load_task("induction", tokenizer=lm.tokenizer, length=6)
    prompts = task.prompts(4, 0)
    h = Hypothesis(model=lm.name, task="induction", metric="logit_diff",
                   claims=(EdgeClaim(Head(0, 3), Head(1, 0, Channel.K), Position("PREV", 1)),
                           EdgeClaim(Head(1, 0), Logits(), END)), shape=lm.shape)
    circuit = ir_to_edges(h)
    mask = circuit.mask(prompts)
    es = circuit.edge_set
    r, s = es.index(Head(0, 3), Head(1, 0, Channel.K))
    at = prompts.positions["PREV+1"]
    for b in range(4):
        assert mask[b, at[b], r, s] == 0
        assert mask[b, :, r, s].sum() == mask.shape[1] - 1
    r, s = es.index(Head(0, 0), Head(1, 1, Channel.Q))
    assert torch.equal(mask[:, :, r, s], torch.ones(4, mask.shape[1]))
    assert {(str(a), str(b), str(p)) for a, b, p in circuit.edges()} == {
        ("head 0.3", "head 1.0.k", "PREV+1"), ("head 1.0", "logits", "END")}
