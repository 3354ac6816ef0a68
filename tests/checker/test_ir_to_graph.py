"""Lowering: resolved claims become the treeified causal-scrubbing graph."""
from __future__ import annotations

import dataclasses
import json

import pytest

from circuitlang.errors import LowerError
from circuitlang.graph_render import render
from circuitlang.ir import Ablation, DependsClaim, EdgeClaim, Feature, Hypothesis
from circuitlang.ir_to_graph import SAME_INPUT, Transplant, ir_to_graph
from circuitlang.sites import ALL, Channel, Embed, Head, Logits, Position

END, S2 = Position("END"), Position("S2")
IO = Feature("task", "IO")


def hyp(*claims, ablation=Ablation()):
    return Hypothesis(model="m", task="ioi", metric="logit_diff", ablation=ablation, claims=tuple(claims))


def test_empty_hypothesis_is_the_root_alone():
    g = ir_to_graph(hyp())
    assert list(g.graph.nodes) == [g.root]
    assert g.node(g.root).role == "root"
    assert g.is_leaf(g.root)


def test_claimed_sender_without_consumer_feeds_the_root_at_its_position():
    g = ir_to_graph(hyp(DependsClaim(Head(9, 6), END, (IO,))))
    (child, t), = g.children(g.root)
    assert t == Transplant(None, END)
    node = g.node(child)
    assert node.site == Head(9, 6) and node.features == (Feature("task", "IO"),)
    assert g.is_leaf(child)


def test_edge_makes_sender_a_child_of_the_receiver_through_its_channel():
    g = ir_to_graph(
        hyp(
            DependsClaim(Head(9, 6), END, (IO,)),
            EdgeClaim(Head(7, 3), Head(9, 6, Channel.Q), END),
        )
    )
    (nm, _), = g.children(g.root)
    (s_inh, t), = g.children(nm)
    assert g.node(s_inh).site == Head(7, 3)
    assert g.node(s_inh).features == SAME_INPUT  # no claim of its own: inherits the input
    assert t == Transplant(Channel.Q, END)
    assert g.height(g.root) == 2


def test_shared_sender_is_copied_per_parent_when_treeified():
    g = ir_to_graph(
        hyp(
            EdgeClaim(Head(5, 5), Head(8, 6, Channel.K), S2),
            EdgeClaim(Head(5, 5), Head(8, 10, Channel.K), S2),
            EdgeClaim(Head(8, 6), Logits(), END),
            EdgeClaim(Head(8, 10), Logits(), END),
        )
    )
    copies = [n for n in g.graph.nodes if g.node(n).site == Head(5, 5)]
    assert len(copies) == 2
    assert {g.parent(c) for c in copies} == {
        n for n in g.graph.nodes if g.node(n).site in (Head(8, 6), Head(8, 10))
    }


def test_channel_claims_become_input_leaves_under_their_head():
    g = ir_to_graph(hyp(DependsClaim(Head(8, 6, Channel.Q), END, (Feature("position", "S2"),))))
    (head, _), = g.children(g.root)
    (leaf, t), = g.children(head)
    assert g.node(leaf).role == "input" and t.channel is Channel.Q


def test_logits_claim_is_an_input_leaf_of_the_root():
    g = ir_to_graph(hyp(DependsClaim(Logits(), END, (Feature("input", "input"),))))
    (leaf, t), = g.children(g.root)
    assert g.node(leaf).role == "input" and t == Transplant(None, END)


def test_backwards_edge_is_a_lower_error():
    with pytest.raises(LowerError, match="is not in the model: head 9.6 is computed after"):
        ir_to_graph(hyp(EdgeClaim(Head(9, 6), Head(3, 0, Channel.K), END)))


def test_edges_follow_the_one_topology_authority():
    """On a model with parallel attention and MLP (GPT-NeoX), a head does not feed its own
    layer's MLP: the lowering asks `circuitlang.topology`, as the resolver and engine do."""
    from circuitlang.sites import Mlp, ModelShape

    neox = ModelShape(n_layers=2, n_heads=2, d_model=8, d_head=4, parallel_residual=True)
    claims = (EdgeClaim(Head(0, 0), Mlp(0), END), EdgeClaim(Mlp(0), Logits(), END))
    with pytest.raises(LowerError, match="parallel attention and MLP"):
        ir_to_graph(dataclasses.replace(hyp(*claims), shape=neox))
    sequential = dataclasses.replace(neox, parallel_residual=False)
    assert ir_to_graph(dataclasses.replace(hyp(*claims), shape=sequential)).height(0) == 2


def test_a_site_that_only_receives_edges_is_dangling_and_dropped_with_a_warning():
    """An edge-only circuit says where each path goes: without `1.0 -> logits`, the path
    through 1.0 reaches no output, so its edges cannot matter (removing the edge to the
    logits removes the path, it does not keep it)."""
    g = ir_to_graph(hyp(EdgeClaim(Head(0, 0), Head(1, 0, Channel.K), ALL)))
    assert list(g.graph.nodes) == [g.root]
    [warning] = g.warnings
    assert warning.severity == "warning" and "head 1.0 receives edges but sends along none" in warning.message
    kept = ir_to_graph(hyp(EdgeClaim(Head(0, 0), Head(1, 0, Channel.K), ALL), EdgeClaim(Head(1, 0), Logits(), ALL)))
    assert kept.height(kept.root) == 2 and not kept.warnings


def test_a_pattern_claim_is_one_leaf_giving_query_and_keys_from_one_sample():
    g = ir_to_graph(hyp(DependsClaim(Head(9, 6), END, (IO,)),
                        DependsClaim(Head(9, 6, Channel.PATTERN), END, (Feature("position", "IO"),))))
    (head, _), = g.children(g.root)
    (leaf, t), = g.children(head)
    assert g.node(leaf).site == Head(9, 6, Channel.PATTERN) and t == Transplant(Channel.PATTERN, END)


def test_nodes_with_children_say_what_they_read_from_the_remainder():
    g = ir_to_graph(hyp(DependsClaim(Head(9, 6), END, (IO,)), EdgeClaim(Head(7, 3), Head(9, 6, Channel.Q), END)))
    (nm, _), = g.children(g.root)
    assert g.remainder_inputs(nm) == ["q: all but head 7.3 at END", "k: all of it", "v: all of it"]
    assert g.remainder_inputs(g.root) == ["stream: all but head 9.6 at END"]
    (s_inh, _), = g.children(nm)
    assert g.remainder_inputs(s_inh) == []  # a leaf reads its own sample whole
    channels = ir_to_graph(dataclasses.replace(
        hyp(DependsClaim(Head(9, 6), END, (IO,)), EdgeClaim(Head(7, 3), Head(9, 6, Channel.Q), END)),
        semantics="channels"))
    (nm, _), = channels.children(channels.root)
    assert channels.semantics == "channels"
    assert channels.remainder_inputs(nm) == ["q: all but head 7.3 at END"]


def test_ablation_is_carried():
    g = ir_to_graph(hyp(ablation=Ablation("mean")))
    assert g.ablation == "mean"


def test_all_position_edges_are_flagged():
    g = ir_to_graph(hyp(EdgeClaim(Embed(), Head(1, 0, Channel.V), ALL), EdgeClaim(Head(1, 0), Logits(), ALL)))
    assert g.uses_all_positions()


@pytest.mark.parametrize("fmt", ["dot", "json", "svg"])
def test_renders(fmt):
    g = ir_to_graph(hyp(DependsClaim(Head(9, 6), END, (IO,)), EdgeClaim(Head(7, 3), Head(9, 6, Channel.Q), END)))
    text = render(g, fmt)
    if fmt == "json":
        data = json.loads(text)
        assert {n["site"] for n in data["nodes"]} == {"logits", "head 9.6", "head 7.3"}
        assert any(e["channel"] == "q" for e in data["edges"])
    elif fmt == "dot":
        assert text.startswith("digraph") and "head 9.6" in text and "q@END" in text
    else:
        assert text.startswith("<svg") and "head 7.3" in text and text.rstrip().endswith("</svg>")
