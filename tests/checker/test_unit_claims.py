"""Neurons, SAE latents and SAE error terms as nodes of the scrubbing graph.

A unit's value is what it writes into the stream (`sites.Written`): swapped into whatever
reads it exactly as a head's output is. Checked here against hand computations with
plain torch hooks (the per-architecture oracle for neurons is in tests/oracle), and by
exact identities: a dictionary's latents plus its error term, each on the prompt itself,
are the stream itself; every sender into a latent, each on the latent's own prompt, is
the latent on its own prompt."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import circuitlang
from circuitlang.execute import Scrubber
from circuitlang.ir import Ablation, DependsClaim, EdgeClaim, Feature, Hypothesis
from circuitlang.ir_to_graph import SAME_INPUT, ir_to_graph
from circuitlang.sites import Dictionary, Embed, Head, Latent, Logits, Mlp, Position, SaeError

END = Position("END")
N = 16


@pytest.fixture(scope="module")
def toy():
    from circuitlang.models import load_model
    from circuitlang.models.known import model_task_params
    from circuitlang.tasks import load_task

    lm = load_model("toy-ioi")
    task = load_task("ioi", lm.tokenizer, **model_task_params("toy-ioi"))
    return lm, task, task.prompts(N, 0)


def _sae(folder, d: int, d_sae: int, seed: int, bias: float = 0.0) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    save_file({"W_enc": torch.randn(d, d_sae, generator=g) / d ** 0.5, "b_enc": torch.full((d_sae,), bias),
               "W_dec": torch.randn(d_sae, d, generator=g) * 0.5, "b_dec": torch.randn(d, generator=g) * 0.1},
              str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": d, "d_sae": d_sae, "architecture": "standard",
                                                 "apply_b_dec_to_input": False}))


def _hypothesis(lm, claims, mode="resample") -> Hypothesis:
    return Hypothesis(model=lm.name, task="ioi", metric="logit_diff", ablation=Ablation(mode, ()),
                      claims=tuple(claims), shape=lm.shape)


def _scrub(lm, task, prompts, claims, mode="resample", seed=0):
    graph = ir_to_graph(_hypothesis(lm, claims, mode))
    scrubber = Scrubber(lm, task, prompts, "logit_diff")
    return graph, scrubber.scrub(graph, seed=seed), scrubber.clean()


def test_every_latent_and_the_error_on_the_prompt_itself_is_the_model(toy, tmp_path):
    """At the final stream, latents + error + b_dec are the stream: claiming each latent and
    the error on the reference prompt rebuilds the clean logits from a random remainder.
    Leave the error out and the hypothesis no longer does: what the dictionary misses is
    never silently dropped."""
    lm, task, prompts = toy
    d_sae = 12
    _sae(tmp_path / "final", lm.shape.d_model, d_sae, seed=1, bias=0.3)
    sae = Dictionary("f", str(tmp_path / "final"), "resid", lm.shape.n_layers, d_sae)
    latents = [DependsClaim(Latent(sae, i), END, SAME_INPUT) for i in range(d_sae)]
    error = DependsClaim(SaeError(sae), END, SAME_INPUT)
    _, whole, clean = _scrub(lm, task, prompts, latents + [error])
    np.testing.assert_allclose(whole.scrubbed, clean, rtol=0, atol=1e-4)
    _, without, _ = _scrub(lm, task, prompts, latents)
    assert np.abs(without.scrubbed - clean).max() > 1e-2


def test_latent_and_error_claims_equal_a_hand_computation(toy, tmp_path):
    """`feature f.i at END depends on IO` under the root: the final stream at END is the
    remainder's, with each claimed unit's write on the remainder replaced by its write on
    the node's own prompt; computed here from plain captures of the hook point with the
    SAE's arithmetic done by hand, then the final norm and unembedding of the HF model."""
    from circuitlang.models.sae import load_sae
    from circuitlang.sites import Resid

    lm, task, prompts = toy
    n_layers, d_sae = lm.shape.n_layers, 10
    _sae(tmp_path / "final", lm.shape.d_model, d_sae, seed=2, bias=0.2)
    sae_site = Dictionary("f", str(tmp_path / "final"), "resid", n_layers, d_sae)
    io = (Feature("task", "IO"),)
    claims = [DependsClaim(Latent(sae_site, 2), END, io), DependsClaim(Latent(sae_site, 7), END, ()),
              DependsClaim(SaeError(sae_site), END, io)]
    graph, result, _ = _scrub(lm, task, prompts, claims, seed=4)
    sae = load_sae(tmp_path / "final")
    stream = lm.run(prompts.input_ids, prompts.attention_mask, capture=[Resid(n_layers)]).cache[Resid(n_layers)]
    end = prompts.positions["END"]

    def at_end(rows):
        x = stream[torch.as_tensor(rows), end[torch.as_tensor(rows)]]
        f = sae.encode(x)
        return x, f, x - (f @ sae.W_dec + sae.b_dec)

    rem = result.remainders[graph.root]
    x, f_rem, err_rem = at_end(rem)
    final = x.clone()
    for v in graph.graph.nodes:
        node = graph.node(v)
        if v == graph.root:
            continue
        _, f_own, err_own = at_end(result.rows[v])
        if isinstance(node.site, SaeError):
            final += err_own - err_rem
        else:
            i = node.site.index
            final += (f_own[:, i] - f_rem[:, i])[:, None] * sae.W_dec[i]
    hf = lm.hf_model
    with torch.no_grad():
        end_logits = hf.lm_head(hf.transformer.ln_f(final))
    logits = torch.zeros(N, prompts.input_ids.shape[1], end_logits.shape[-1])
    logits[torch.arange(N), end] = end_logits
    oracle = task.metric("logit_diff", logits, prompts).numpy()
    np.testing.assert_allclose(result.scrubbed, oracle, rtol=1e-4, atol=1e-4)
    assert np.abs(oracle - Scrubber(lm, task, prompts, "logit_diff").clean()).max() > 1e-3


def test_every_sender_into_a_latent_on_its_own_prompt_is_the_latent(toy, tmp_path):
    """A latent with children reads its hook point rebuilt from the remainder: with an edge
    from every sender before it, each on the latent's own prompt, the rebuilt stream is
    the latent's own (the attention biases are the same on every prompt), so the latent
    equals the latent as a leaf. The latent runs as patched forward passes."""
    _sae(tmp_path / "res2", toy[0].shape.d_model, 8, seed=3, bias=0.5)
    sae = Dictionary("s", str(tmp_path / "res2"), "resid", 2, 8)
    _assert_rebuilt_from_every_sender(toy, Latent(sae, 3), ("resample", "mean"), seed=5)


def _assert_rebuilt_from_every_sender(toy, receiver, modes, seed: int, at: Position = END) -> None:
    """`receiver` (reading the stream entering block 2) with an edge from every sender
    before it at `at`, each on its own prompt, scrubs as `receiver` alone; without MLP 1's
    edge it does not (not the embedding's: every prompt has the same token at END)."""
    lm, task, prompts = toy
    senders = [Embed()] + [Head(layer, h) for layer in range(2) for h in range(lm.shape.n_heads)]
    senders += [Mlp(0), Mlp(1)]
    leaf = [DependsClaim(receiver, END, (Feature("task", "IO"),))]
    edges = leaf + [EdgeClaim(s, receiver, at) for s in senders] + [EdgeClaim(receiver, Logits(), END)]
    for mode in modes:
        _, alone, _ = _scrub(lm, task, prompts, leaf, mode, seed=seed)
        graph, rebuilt, _ = _scrub(lm, task, prompts, edges, mode, seed=seed)
        assert graph.height(graph.root) == 2
        np.testing.assert_allclose(rebuilt.scrubbed, alone.scrubbed, rtol=0, atol=1e-4)
        without = [e for e in edges if getattr(e, "sender", None) != Mlp(1)]
        _, short, _ = _scrub(lm, task, prompts, without, mode, seed=seed)
        assert np.abs(short.scrubbed - alone.scrubbed).max() > 1e-3


def test_unit_claims_run_from_the_language(toy, tmp_path):
    """Neurons, latents and errors in claims and edges, written in a file and checked."""
    _sae(tmp_path / "res2", toy[0].shape.d_model, 8, seed=3, bias=0.5)
    (tmp_path / "h.circ").write_text(
        'sae s = "res2" at resid 2\nsamples 16\nseed 0\n'
        "neurons 1.3, 1.90 at END depends on IO\n"
        "head 1.0 -> feature s.3 at END\nfeature s.3 at END depends on IO\nerror s at END depends on IO\n"
        "neuron 0.5 -> head 1.0.q at END\n")
    result = circuitlang.check(str(tmp_path / "h.circ"), model="toy-ioi", task="ioi")
    assert [c.text for c in result.claims] == [
        "neurons 1.3, 1.90 at END depends on IO", "head 1.0 -> feature s.3 at END",
        "feature s.3 at END depends on IO", "error s at END depends on IO", "neuron 0.5 -> head 1.0.q at END"]
    assert dict(result.remainder) == {
        "logits": ["stream: all but neuron 1.3 at END, neuron 1.90 at END, feature s.3 at END, error s at END"],
        "feature s.3 at END": ["input: all but head 1.0 at END"],
        "head 1.0 at END": ["q: all but neuron 0.5 at END", "k: all of it", "v: all of it"]}
    assert 0.0 < result.recovered.value < 1.0


def _basis(path, b: torch.Tensor, hook: str, layer: int, head=None):
    from safetensors.torch import save_file

    from circuitlang.sites import Basis

    save_file({"basis": b.contiguous()}, str(path))
    return Basis(path.stem, str(path), hook, layer, head, b.shape[1])


def test_a_subspace_of_a_whole_head_output_is_the_head(toy, tmp_path):
    """A subspace node's value is its state's part in the subspace (`c B^T`): with a basis
    of the whole space, `subspace h at END depends on IO` on head 1.0's output is exactly
    `head 1.0 at END depends on IO` (the same tree, the same samples); with half of it,
    it is not."""
    from circuitlang.sites import Subspace

    lm, task, prompts = toy
    d = lm.shape.d_model
    q = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))[0]
    io = (Feature("task", "IO"),)
    _, head, _ = _scrub(lm, task, prompts, [DependsClaim(Head(1, 0), END, io)], seed=2)
    whole = Subspace(_basis(tmp_path / "whole.safetensors", q, "head", 1, 0))
    _, sub, _ = _scrub(lm, task, prompts, [DependsClaim(whole, END, io)], seed=2)
    np.testing.assert_allclose(sub.scrubbed, head.scrubbed, rtol=0, atol=1e-4)
    half = Subspace(_basis(tmp_path / "half.safetensors", q[:, : d // 2], "head", 1, 0))
    _, part, _ = _scrub(lm, task, prompts, [DependsClaim(half, END, io)], seed=2)
    assert np.abs(part.scrubbed - head.scrubbed).max() > 1e-3


def test_a_final_stream_subspace_claim_equals_a_hand_computation(toy, tmp_path):
    """`subspace s at END depends on IO` at the final stream: the remainder's stream with its
    part in the subspace replaced by the node's prompt's, `x_r + (x_own - x_r) B B^T`."""
    from circuitlang.sites import Resid, Subspace

    lm, task, prompts = toy
    n_layers, d = lm.shape.n_layers, lm.shape.d_model
    b = torch.linalg.qr(torch.randn(d, 3, generator=torch.Generator().manual_seed(1)))[0]
    site = Subspace(_basis(tmp_path / "s.safetensors", b, "resid", n_layers))
    graph, result, clean = _scrub(lm, task, prompts, [DependsClaim(site, END, (Feature("task", "IO"),))], seed=6)
    stream = lm.run(prompts.input_ids, prompts.attention_mask, capture=[Resid(n_layers)]).cache[Resid(n_layers)]
    end = prompts.positions["END"]
    (node,) = [v for v in graph.graph.nodes if v != graph.root]

    def at_end(rows):
        rows = torch.as_tensor(rows)
        return stream[rows, end[rows]]

    x_r = at_end(result.remainders[graph.root])
    final = x_r + (at_end(result.rows[node]) - x_r) @ b @ b.T
    hf = lm.hf_model
    logits = torch.zeros(N, prompts.input_ids.shape[1], lm.shape.vocab_size)
    with torch.no_grad():
        logits[torch.arange(N), end] = hf.lm_head(hf.transformer.ln_f(final))
    oracle = task.metric("logit_diff", logits, prompts).numpy()
    np.testing.assert_allclose(result.scrubbed, oracle, rtol=1e-4, atol=1e-4)
    assert np.abs(oracle - clean).max() > 1e-3


def test_random_circuits_draw_neurons_and_latents_from_their_pools(toy, tmp_path):
    """The null maps each neuron to a distinct neuron of its MLP and each latent to a
    distinct latent of its dictionary (on top of the head maps), never the hypothesis
    itself; with one neuron of a 128-wide MLP there are exactly 127 other circuits."""
    from circuitlang import topology
    from circuitlang.sites import Neuron
    from circuitlang.variants import random_circuits

    lm = toy[0]
    one = _hypothesis(lm, [DependsClaim(Neuron(1, 3), END, (Feature("task", "IO"),))])
    every = random_circuits(one, lm.shape, 200, seed=0)
    assert every.exact and every.total == lm.shape.d_mlp - 1 == len(every.hypotheses)
    assert sorted(h.claims[0].site.index for h in every.hypotheses) == [i for i in range(128) if i != 3]

    sae = Dictionary("s", str(tmp_path / "unused"), "resid", 2, 8)
    claims = [DependsClaim(Neuron(1, 3), END, ()), DependsClaim(Neuron(1, 90), END, ()),
              EdgeClaim(Head(1, 0), Latent(sae, 3), END), EdgeClaim(Latent(sae, 3), Logits(), END)]
    mixed = _hypothesis(lm, claims)
    drawn = random_circuits(mixed, lm.shape, 50, seed=1)
    assert len(drawn.hypotheses) == 50 and not drawn.exact
    keys = set()
    for h in drawn.hypotheses:
        n1, n2, into, out = h.claims
        assert n1.site.layer == n2.site.layer == 1 and n1.site.index != n2.site.index
        assert into.receiver == out.sender and into.receiver.sae == sae  # one latent, both edges
        assert topology.edge_exists(lm.shape, into.sender, into.receiver)  # a head below block 2
        keys.add(tuple(h.claims))
    assert len(keys) == 50 and tuple(mixed.claims) not in keys


def test_the_check_of_a_neuron_claim_has_a_null(toy):
    result = circuitlang.check("samples 16\nseed 0\nneuron 1.3 at END depends on IO\n", model="toy-ioi",
                               task="ioi", permutations=40)
    assert len(result.null_scores) == 40 and result.p_value is not None


def test_every_sender_into_a_stream_subspace_on_its_own_prompt_is_the_subspace(toy, tmp_path):
    """A subspace of the stream entering block 2 receives edges: its value is the rebuilt
    stream's part in it. With an edge from every sender before it, each on the subspace's
    own prompt, that is its own part, so it equals the subspace as a leaf; leave MLP 1 out
    and it does not."""
    from circuitlang.sites import Subspace

    d = toy[0].shape.d_model
    b = torch.linalg.qr(torch.randn(d, 6, generator=torch.Generator().manual_seed(2)))[0]
    site = Subspace(_basis(tmp_path / "s.safetensors", b, "resid", 2))
    _assert_rebuilt_from_every_sender(toy, site, ("resample", "zero"), seed=7)


def test_every_sender_into_a_neuron_on_its_own_prompt_is_the_neuron(toy):
    """A neuron receives what its MLP reads: MLP 1's input rebuilt from the remainder with the
    claimed senders swapped in, run through MLP 1 by a patched forward pass, the neuron's
    write read from it. With an edge from every sender into MLP 1 (the embedding, layer 0,
    and layer 1's heads), each on the neuron's own prompt, it is the neuron as a leaf;
    without MLP 0 it is not."""
    from circuitlang.sites import Neuron

    _assert_rebuilt_from_mlp1_readers(toy, Neuron(1, 90), seed=3, apart=1e-4)


def _assert_rebuilt_from_mlp1_readers(toy, receiver, seed: int, apart: float) -> None:
    """`receiver` (reading MLP 1's input) with an edge from every sender into MLP 1 (the
    embedding, layer 0, and layer 1's heads), each on its own prompt, scrubs as `receiver`
    alone; without MLP 0's edge it does not (by more than `apart`)."""
    lm, task, prompts = toy
    heads = [Head(layer, h) for layer in range(2) for h in range(lm.shape.n_heads)]
    senders = [Embed(), Mlp(0)] + heads
    leaf = [DependsClaim(receiver, END, (Feature("task", "IO"),))]
    edges = leaf + [EdgeClaim(s, receiver, END) for s in senders] + [EdgeClaim(receiver, Logits(), END)]
    for mode in ("resample", "mean"):
        _, alone, _ = _scrub(lm, task, prompts, leaf, mode, seed=seed)
        graph, rebuilt, _ = _scrub(lm, task, prompts, edges, mode, seed=seed)
        assert graph.height(graph.root) == 2
        np.testing.assert_allclose(rebuilt.scrubbed, alone.scrubbed, rtol=0, atol=1e-4)
        without = [e for e in edges if getattr(e, "sender", None) != Mlp(0)]
        _, short, _ = _scrub(lm, task, prompts, without, mode, seed=seed)
        assert np.abs(short.scrubbed - alone.scrubbed).max() > apart


def test_a_whole_head_output_subspace_receives_what_its_head_reads(toy, tmp_path):
    """A subspace of head 1.0's output receives edges into what head 1.0 reads: `head 0.h ->
    subspace s` enters its q (at the edge's position), k and v, as `-> head 1.0` does. With
    a basis of the whole output space the tree is the head's, sample for sample, so it scrubs
    exactly as the head with the same edges; with half of it, it does not."""
    from circuitlang.sites import Channel, Subspace

    lm, task, prompts = toy
    d = lm.shape.d_model
    q = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(4)))[0]
    io = (Feature("task", "IO"),)
    senders = [Head(0, h) for h in range(lm.shape.n_heads)] + [Mlp(0)]

    def claims(receiver, channels):
        edges = [EdgeClaim(s, r, END) for s in senders for r in channels]
        return [DependsClaim(receiver, END, io)] + edges

    head = Head(1, 0)
    into_head = claims(head, [head.with_channel(c) for c in (Channel.Q, Channel.K, Channel.V)])
    for mode in ("resample", "corrupt", "mean"):
        graph, want, _ = _scrub(lm, task, prompts, into_head, mode, seed=5)
        assert graph.height(graph.root) == 2
        whole = Subspace(_basis(tmp_path / "whole.safetensors", q, "head", 1, 0))
        sub_graph, got, _ = _scrub(lm, task, prompts, claims(whole, [whole]), mode, seed=5)
        def ways_in(g):  # the channels and positions the claimed node's children enter by
            return sorted((t.channel.value, str(t.position)) for _, t in g.children(g.children(g.root)[0][0]))

        assert ways_in(sub_graph) == ways_in(graph) and len(ways_in(graph)) == 3 * len(senders)
        np.testing.assert_allclose(got.scrubbed, want.scrubbed, rtol=0, atol=1e-4)
        half = Subspace(_basis(tmp_path / "half.safetensors", q[:, : d // 2], "head", 1, 0))
        _, part, _ = _scrub(lm, task, prompts, claims(half, [half]), mode, seed=5)
        assert np.abs(part.scrubbed - want.scrubbed).max() > 1e-3


def test_every_sender_into_an_output_subspace_on_its_own_prompt_is_the_subspace(toy, tmp_path):
    """A subspace of MLP 1's output (or of head 2.0's) receives what MLP 1 (head 2.0) reads:
    with an edge from every sender before it, each on the subspace's own prompt, it is the
    subspace as a leaf; without MLP 1's edge (for the head) or MLP 0's it is not. The head's
    edges are at every position: its keys and values read every token."""
    from circuitlang.sites import Subspace

    lm, task, prompts = toy
    d = lm.shape.d_model
    b = torch.linalg.qr(torch.randn(d, 5, generator=torch.Generator().manual_seed(6)))[0]
    at_head = Subspace(_basis(tmp_path / "h.safetensors", b, "head", 2, 0))
    _assert_rebuilt_from_every_sender(toy, at_head, ("resample", "zero"), seed=8, at=Position("all"))
    at_mlp = Subspace(_basis(tmp_path / "m.safetensors", b, "mlp", 1))
    _assert_rebuilt_from_mlp1_readers(toy, at_mlp, seed=9, apart=1e-3)


def test_output_subspaces_receive_edges_by_forward_passes_where_kernels_are_not_used(toy, tmp_path):
    """Computed by patched forward passes instead of the kernels, a subspace of a head's and of
    an MLP's output receiving edges scrubs to the same numbers."""
    from circuitlang.sites import Subspace

    lm, task, prompts = toy
    d = lm.shape.d_model
    b = torch.linalg.qr(torch.randn(d, 4, generator=torch.Generator().manual_seed(7)))[0]
    io = (Feature("task", "IO"),)
    for name, basis in (("h", _basis(tmp_path / "h.safetensors", b, "head", 1, 2)),
                        ("m", _basis(tmp_path / "m.safetensors", b, "mlp", 1))):
        site = Subspace(basis)
        claims = [DependsClaim(site, END, io), EdgeClaim(Head(0, 1), site, END), EdgeClaim(Mlp(0), site, END),
                  DependsClaim(Head(0, 1), END, io)]
        graph = ir_to_graph(_hypothesis(lm, claims))
        values = []
        for kernels in (True, False):
            scrubber = Scrubber(lm, task, prompts, "logit_diff")
            scrubber.use_kernels = kernels
            values.append(scrubber.scrub(graph, seed=11).scrubbed)
            assert (scrubber.work.forward_rows == 0) == kernels, name
        np.testing.assert_allclose(values[0], values[1], rtol=0, atol=1e-4)
