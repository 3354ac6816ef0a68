"""Planted circuits: the checker accepts the true hypothesis and rejects wrong ones.

The model (tests/checker/planted.py) has a previous-token head 0.0 feeding an
induction head 1.0 through its keys; 1.0's query reads the current token and its value
the token it copies, both from the embedding; 0.1 and 1.1 do nothing. Under Chan et
al.'s semantics every input of 1.0 that no claim covers is scrubbed, so the true
circuit names all three paths into it.
"""
from __future__ import annotations

import pytest

import circuitlang

TRUE = """\
task induction
metric loss
0.0 -> 1.0.k at all
embed -> 1.0.q at all
embed -> 1.0.v at all
1.0 -> logits at all
expect recovered >= 0.95
expect each loss < 1
"""
WRONG_HEAD = TRUE.replace("0.0 -> 1.0.k", "0.1 -> 1.1.k").replace("1.0", "1.1")
DROPPED_EDGE = TRUE.replace("0.0 -> 1.0.k", "embed -> 1.0.k")


def check(text, planted, task, **kw):
    kw.setdefault("permutations", 0)
    kw.setdefault("max_examples", 8)
    return circuitlang.check(text, model=planted, task=task, n=32, **kw)


def test_true_hypothesis_recovers_the_behaviour(planted, induction_task):
    result = check(TRUE, planted, induction_task, permutations=6)
    assert result.recovered.value >= 0.95
    assert result.recovered.low >= 0.9
    assert result.holds
    assert not result.counterexamples
    # The other circuits of the same size and shape: 0.0/0.1 into 1.0/1.1, three besides
    # the hypothesis itself (which is never drawn). So few that all are scored: exact p.
    nulls = sorted(result.null_scores)
    assert len(nulls) == 3 and result.null_exact and result.null_total == 3
    assert max(nulls) < result.recovered.value
    assert result.p_value == pytest.approx(1 / 4)


def test_the_null_has_hundreds_of_circuits_by_default_when_the_model_has_them():
    from circuitlang.sites import ModelShape
    from circuitlang.variants import random_circuits

    hypothesis = circuitlang.resolve(circuitlang.parse(TRUE), ModelShape(12, 12, 768, 64, name="gpt2"),
                                     "induction")
    drawn = random_circuits(hypothesis, hypothesis.shape, 200, seed=0)
    assert len(drawn.hypotheses) == 200 and not drawn.exact
    keys = {tuple(c.claims) for c in drawn.hypotheses}
    assert len(keys) == 200 and tuple(hypothesis.claims) not in keys


def test_wrong_head_recovers_little_and_comes_with_a_counterexample(planted, induction_task):
    result = check(WRONG_HEAD, planted, induction_task)
    assert result.recovered.value < 0.2
    assert not result.holds
    [failed_aggregate, failed_each] = result.expectations
    assert not failed_aggregate.holds and not failed_each.holds
    [cx] = result.counterexamples
    assert cx.shrunk and cx.value >= 1
    # shrinking goes toward the simplest prompt: the first tokens of the vocabulary
    assert cx.tokens[:3] == ["t0", "t1", "t2"]


def test_dropping_the_needed_edge_is_detected(planted, induction_task):
    result = check(DROPPED_EDGE, planted, induction_task, max_examples=4)
    assert result.recovered.value < 0.6
    assert not result.expectations[0].holds


def test_json_report_has_the_documented_fields(planted, induction_task, tmp_path):
    result = check(TRUE, planted, induction_task)
    data = result.to_json()
    for key in ("clean", "scrubbed", "random", "recovered", "ci", "expectations", "claims",
                "counterexamples", "model", "task", "seed", "versions"):
        assert key in data
    assert data["expectations"][0]["text"] == "expect recovered >= 0.95"
    assert data["expectations"][0]["holds"] is True
    assert isinstance(data["expectations"][0]["value"], float)
    assert data["versions"]["torch"]


@pytest.mark.parametrize("needed", ["0.0 -> 1.0.k at all", "embed -> 1.0.q at all", "embed -> 1.0.v at all",
                                    "1.0 -> logits at all"])
def test_removing_a_needed_edge_lowers_recovered_clearly(planted, induction_task, needed):
    """Removing an edge makes a hypothesis sparser (that path scrubbed), never coarser: each
    planted path, left out, loses most of the behaviour (Chan et al. 2022 semantics)."""
    full = check(TRUE, planted, induction_task, breakdown=False, max_examples=2).recovered.value
    without = check(TRUE.replace(needed + "\n", ""), planted, induction_task, breakdown=False,
                    max_examples=2).recovered
    assert full > 0.95
    assert without.high < 0.5, (needed, without)


def test_per_claim_costs_are_large_for_planted_edges_and_zero_for_distractors(planted, induction_task):
    text = TRUE + "0.1 -> 1.0.k at all\nembed -> 1.1.q at all\n1.1 -> logits at all\n"
    result = check(text, planted, induction_task, max_examples=2)
    cost = {c.text: c.cost for c in result.claims}
    for planted_edge in ("0.0 -> 1.0.k at all", "embed -> 1.0.q at all", "embed -> 1.0.v at all",
                         "1.0 -> logits at all"):
        assert cost[planted_edge] > 0.5, (planted_edge, cost)
    for distractor in ("0.1 -> 1.0.k at all", "embed -> 1.1.q at all", "1.1 -> logits at all"):
        assert abs(cost[distractor]) < 0.02, (distractor, cost)
    # a second, unrelated edge into the same key does not change what the true one costs
    # (beyond resampling noise: more nodes draw their prompts in another order)
    alone = {c.text: c.cost for c in check(TRUE, planted, induction_task, max_examples=2).claims}
    assert cost["0.0 -> 1.0.k at all"] == pytest.approx(alone["0.0 -> 1.0.k at all"], abs=0.1)


def test_the_report_lists_what_each_claimed_node_left_to_the_remainder(planted, induction_task):
    result = check("task induction\nmetric loss\n0.0 -> 1.0.k at all\n1.0 -> logits at all\n",
                   planted, induction_task, breakdown=False, max_examples=2)
    assert result.recovered.value < 0.5  # the query and value paths were left out
    left = dict(result.remainder)
    assert left["head 1.0 at all"] == ["q: all of it", "k: all but head 0.0 at all", "v: all of it"]
    assert "head 1.0 at all: q: all of it" in result.render()
    channels = check("task induction\nmetric loss\nsemantics channels\n0.0 -> 1.0.k at all\n1.0 -> logits at all\n",
                     planted, induction_task, breakdown=False, max_examples=2)
    assert channels.recovered.value > 0.95  # the explicit option reads q and v on 1.0's own prompt
    assert dict(channels.remainder)["head 1.0 at all"] == ["k: all but head 0.0 at all"]


def test_the_ioi_circuit_has_random_circuits_that_keep_layer_order():
    """stdlib/ioi.circ names 28 heads joined by edges in layer order: a uniform draw of 28
    heads almost never keeps them, so the null once came back empty ("no other circuit").
    The head-by-head draws give K distinct circuits whose every edge exists."""
    from circuitlang import topology
    from circuitlang.ast_to_ir import resolve_text
    from circuitlang.ir import EdgeClaim
    from circuitlang.resources import stdlib_dir
    from circuitlang.sites import Channel, Head, ModelShape
    from circuitlang.variants import random_circuits

    shape = ModelShape(12, 12, 768, 64, vocab_size=50257, n_ctx=1024, architecture="gpt2", name="gpt2")
    hypothesis = resolve_text((stdlib_dir() / "ioi.circ").read_text(), shape, filename="ioi.circ")
    drawn = random_circuits(hypothesis, shape, 30, seed=0)
    assert len(drawn.hypotheses) == 30 and drawn.head_by_head and not drawn.exact
    assert len({tuple(c.claims) for c in drawn.hypotheses} | {tuple(hypothesis.claims)}) == 31
    for circuit in drawn.hypotheses:
        for claim in circuit.claims:
            if isinstance(claim, EdgeClaim):
                receiver = claim.receiver
                if isinstance(receiver, Head) and not receiver.channel.is_input:
                    receiver = receiver.with_channel(Channel.Q)
                assert topology.edge_exists(shape, claim.sender, receiver), claim


def _token_sae(folder, alive: range, dead: range) -> None:
    """An SAE at attention block 1's output of the planted model: latent t (t in `alive`)
    reads and writes token t's direction, which head 1.0 writes its copy along; latents in
    `dead` read position directions, which attention block 1 never writes (always off)."""
    import json

    import torch
    from safetensors.torch import save_file

    from planted import D, V

    n = len(alive) + len(dead)
    w_enc, w_dec = torch.zeros(D, n), torch.zeros(n, D)
    for i, t in enumerate(alive):
        w_enc[t, i] = w_dec[i, t] = 1.0
    for i, p in enumerate(dead, start=len(alive)):
        w_enc[V + p, i] = w_dec[i, V + p] = 1.0
    folder.mkdir()
    save_file({"W_enc": w_enc, "b_enc": torch.zeros(n), "W_dec": w_dec, "b_dec": torch.zeros(D)},
              str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": n, "architecture": "standard"}))


def test_the_planted_circuit_at_latent_granularity(planted, induction_task, tmp_path):
    """Head 1.0's copy, read through a dictionary whose latent t is token t's direction: the
    circuit written over latents (1.0 -> every token latent -> logits) is the planted one
    and holds; the same number of latents at the wrong indices (dead ones) recovers
    nothing."""
    from planted import V

    _token_sae(tmp_path / "tok", range(V), range(V))
    head = "0.0 -> 1.0.k at all\nembed -> 1.0.q at all\nembed -> 1.0.v at all\n"

    def program(indices):
        lines = "".join(f"1.0 -> feature a.{i} at all\nfeature a.{i} -> logits at all\n" for i in indices)
        return f'task induction\nmetric loss\nsae a = "tok" at attn 1\n{head}{lines}'

    def run(text):
        (tmp_path / "h.circ").write_text(text)
        return check(str(tmp_path / "h.circ"), planted, induction_task, breakdown=False)

    true = run(program(range(V)))
    assert true.recovered.value > 0.95
    wrong = run(program(range(V, 2 * V)))
    assert wrong.recovered.value < 0.05


def test_the_planted_circuit_at_neuron_granularity(induction_task):
    """The neuron variant (planted.planted_neuron_model): head 1.0's copy of token t reaches
    the logits only through neuron t of MLP 1. Claiming MLP 1's neurons on the prompt's own
    sequence recovers the behaviour; the same claim on MLP 0's (dead) neurons recovers
    nothing; half of MLP 1's neurons recover part of it."""
    from circuitlang.models import LoadedModel

    from planted import V, planted_neuron_model, planted_tokenizer

    model = LoadedModel.from_hf(planted_neuron_model(), planted_tokenizer(), name="planted-neurons")
    task = induction_task

    def recovered(layer, indices):
        units = ", ".join(f"{layer}.{i}" for i in indices)
        text = f"task induction\nmetric loss\nneurons {units} at all depends on tokens\n"
        return check(text, model, task, breakdown=False).recovered.value

    assert recovered(1, range(V)) > 0.95
    assert recovered(0, range(V)) < 0.05
    assert 0.1 < recovered(1, range(V // 2)) < 0.9


def test_the_planted_circuit_through_a_subspace(planted, induction_task, tmp_path):
    """Head 1.0 writes its copy along the token directions only: that subspace of its output,
    claimed on the prompt's own sequence, recovers the behaviour; as many directions it
    never writes (positions) recover nothing."""
    import torch
    from safetensors.torch import save_file

    from planted import D, V

    eye = torch.eye(D)
    save_file({"basis": eye[:, :V].contiguous()}, str(tmp_path / "tokens.safetensors"))
    save_file({"basis": eye[:, V:2 * V].contiguous()}, str(tmp_path / "positions.safetensors"))

    def recovered(name):
        (tmp_path / "h.circ").write_text(f'task induction\nmetric loss\nsubspace s = "{name}.safetensors" at '
                                         "head 1.0.out\nsubspace s at all depends on tokens\n")
        return check(str(tmp_path / "h.circ"), planted, induction_task, breakdown=False).recovered.value

    assert recovered("tokens") > 0.95
    assert recovered("positions") < 0.05


def test_random_subspaces_are_the_null_of_a_subspace_claim(planted, induction_task, tmp_path):
    """The permutation null of a subspace claim is random subspaces of the same place and
    dimension: the token subspace of head 1.0's output beats every one of 20 (p = 1/21),
    while a random circuit's share of the copy stays well below it."""
    import torch
    from safetensors.torch import save_file

    from planted import D, V

    save_file({"basis": torch.eye(D)[:, :V].contiguous()}, str(tmp_path / "tokens.safetensors"))
    (tmp_path / "h.circ").write_text('task induction\nmetric loss\nsubspace s = "tokens.safetensors" at '
                                     "head 1.0.out\nsubspace s at all depends on tokens\n")
    result = check(str(tmp_path / "h.circ"), planted, induction_task, breakdown=False, permutations=20)
    assert len(result.null_scores) == 20 and not result.null_exact
    assert result.p_value == pytest.approx(1 / 21)
    assert max(result.null_scores) < result.recovered.value - 0.2
