"""Circuits scored as a chain (`Problem.score(chained=True)`, the faithfulness curve's):
each pass is given the previous circuit's as its `EdgeReference`, and the numbers are
those of every circuit scored alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from circuitlang.discover.faithfulness import curve
from circuitlang.discover.problem import EdgeSpace, Problem
from circuitlang.models import EdgeReference, LoadedModel
from circuitlang.sites import ALL, Head, Mlp
from circuitlang.tasks import load_task


def _model(arch: str) -> LoadedModel:
    import transformers as tf

    torch.manual_seed(7)
    if arch == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=16, n_embd=16, n_layer=3, n_head=2, n_positions=32,
                                                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                 initializer_range=0.3))
    else:  # grouped-query attention
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=16, hidden_size=16, num_hidden_layers=3,
                                                   num_attention_heads=2, num_key_value_heads=1,
                                                   intermediate_size=32, max_position_embeddings=32,
                                                   initializer_range=0.3))
    model.config._attn_implementation = "eager"
    return LoadedModel.from_hf(model.eval(), name=f"chain-{arch}")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("ablation", ["corrupt", "resample", "mean"])
def test_chained_circuits_score_as_each_alone(arch, ablation, monkeypatch):
    lm = _model(arch)
    task = load_task("induction", tokenizer=None, length=4, vocab=16)
    prompts = task.prompts(6, 0)
    space = EdgeSpace.build(lm.edge_set(), (ALL,))
    problem = Problem(lm, task, prompts, "kl", ablation, space, batch_size=6)  # one circuit per pass
    ranking = torch.randperm(len(space), generator=torch.Generator().manual_seed(1))
    kept = torch.zeros(6, len(space), dtype=torch.bool)
    for i, k in enumerate([0, 2, 5, 20, len(space) // 2, len(space)]):  # each grows from the one before
        kept[i, ranking[:k]] = True
    alone = problem.score(kept, chained=False)
    taken = []  # per pass: the nodes it took from the previous circuit's (their very tensors)
    real = EdgeReference.from_run

    def recording(run, mask, rows=slice(None), *, previous=None, known=None):
        taken.append(sum(d is previous.deltas.get(s) for s, d in run.deltas.items()))
        return real(run, mask, rows, previous=previous, known=known)

    monkeypatch.setattr(EdgeReference, "from_run", staticmethod(recording))
    chained = problem.score(kept, chained=True)
    np.testing.assert_allclose(chained, alone, atol=1e-5, rtol=1e-5)
    assert len(taken) == len(kept) and max(taken) > 0  # some nodes were taken from the previous circuit
    if ablation != "mean":  # the ablated values are a pass of other prompts: the empty circuit is known
        assert taken[0] == sum(isinstance(s, (Head, Mlp)) for s in lm.edge_set().senders)
    assert np.abs(alone[0] - alone[-1]).max() > 1e-3  # the circuits differ in what they score
    # the curve scores its circuits as a chain: the same points as scored alone
    c = curve(problem, ranking, metric="kl", fractions=(0.01, 0.1, 0.5, 1.0), n_boot=10)
    total = len(space)
    counts = [max(1, min(total, int(round(f * total)))) for f in (0.01, 0.1, 0.5, 1.0)]
    circuits = torch.zeros(len(counts), total, dtype=torch.bool)
    for i, k in enumerate(counts):
        circuits[i, ranking[:k]] = True
    values = problem.score(circuits, metric="kl", chained=False).mean(1)
    np.testing.assert_allclose(c.faithfulness, (values - c.empty) / (c.full - c.empty), atol=1e-4)
