"""Path patching three ways: `Experiments.path_patching`, the edge engine, and the oracle.

`patch A -> R at P` runs the clean prompt with R's input at P changed by (A on the
corrupt prompt - A on the clean one), everything else computed as the pass goes. The
edge engine does the same when the one edge A -> R is ablated (at P only: a per-position
mask [B, T, R, S]) with the corrupt run's sender values; the oracle (naive_scrub's
`NaiveModel.path_patched_logits`) with plain hooks on the HF modules. All three must
agree per prompt to 1e-5, on every architecture, for head, MLP and embedding senders and
head q/k/v (GQA: a key or value head shared by a group), MLP and logits receivers.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from naive_scrub import NaiveModel

from circuitlang import topology
from circuitlang.experiments import Experiments
from circuitlang.models import EdgePatch
from circuitlang.sites import ALL, Channel, Embed, Head, Logits, Mlp, Position

ARCHS = ("gpt2", "gpt_neox", "gpt_neox_seq", "llama", "mistral", "qwen2")
TOLERANCE = 1e-5


def receivers(shape):
    """One of each kind in a middle layer (so a patch anywhere before END reaches the END
    logits through the last layer): q of head 0, k and v of the last head (a key/value
    head shared by a group under GQA), the MLP, and the logits."""
    layer, top = 1, shape.n_heads - 1
    return [Head(layer, 0, Channel.Q), Head(layer, top, Channel.K), Head(layer, top, Channel.V),
            Mlp(layer), Logits()]


def senders_for(shape, receiver):
    """Senders of every kind that reach the receiver: embed, heads, MLPs (a head of the
    MLP's own layer where attention and MLP are sequential; anything for the logits)."""
    out = [Embed(), Head(0, 1), Head(0, 3), Mlp(0), Head(1, 2), Mlp(1), Head(2, 0)]
    return [s for s in out if topology.edge_exists(shape, s, receiver)]


class EdgeEngine:
    """The metric with one edge sender -> receiver ablated to the corrupt run's value."""

    def __init__(self, lm, task, prompts, metric):
        self.lm, self.task, self.prompts, self.metric = lm, task, prompts, metric
        self.es = lm.edge_set()
        mask = prompts.attention_mask
        self.ablated = lm.run(prompts.corrupt_input_ids, mask, capture=self.es.senders).cache
        self.reference = lm.run(prompts.input_ids, mask).logits

    def __call__(self, sender, receiver, position) -> np.ndarray:
        es, prompts = self.es, self.prompts
        ri, si = es.index(sender, topology.canonical(self.lm.shape, receiver))
        n, t = prompts.input_ids.shape
        if position.is_all:
            m = torch.zeros(n, len(es.receivers), len(es.senders))
            m[:, ri, si] = 1.0
        else:  # per position: [B, T, R, S], the edge ablated at P only
            m = torch.zeros(n, t, len(es.receivers), len(es.senders))
            m[torch.arange(n), prompts.positions[position.name] + position.offset, ri, si] = 1.0
        logits = self.lm.run(prompts.input_ids, prompts.attention_mask,
                             edges=EdgePatch(self.ablated, m, es.senders, es.receivers)).logits
        return self.task.metric(self.metric, logits, prompts, reference_logits=self.reference).double().numpy()


class Oracle:
    """The same with plain hooks: R's input at P plus (A corrupt - A clean), the rest as it runs."""

    def __init__(self, lm, task, prompts, metric):
        self.model = NaiveModel(lm.hf_model)
        self.task, self.prompts, self.metric = task, prompts, metric
        mask = prompts.attention_mask
        self.clean = self.model.plain(prompts.input_ids, mask)
        self.corrupt = self.model.plain(prompts.corrupt_input_ids, mask)

    def __call__(self, sender, receiver, position) -> np.ndarray:
        prompts, model = self.prompts, self.model
        delta = model.site_value(self.corrupt, sender) - model.site_value(self.clean, sender)
        where = None if position.is_all else prompts.positions[position.name] + position.offset
        logits = model.path_patched_logits(prompts.input_ids, prompts.attention_mask, receiver, where, delta)
        return self.task.metric(self.metric, logits, prompts, reference_logits=self.clean["logits"]).double().numpy()


def _cases(task_name):
    positions = ([Position("END"), Position.parse("PREV+1"), ALL] if task_name == "induction"
                 else [Position("A"), Position.parse("B-1"), ALL])
    return [pytest.param(arch, i, pos, id=f"{arch}-{'qkvml'[i]}-{pos}")
            for arch in ARCHS for i in range(5) for pos in positions]


def _check(lm, task, prompts, receiver, position, metric, end_only=False):
    senders = senders_for(lm.shape, receiver)
    assert senders
    experiments = Experiments(lm, task, prompts, metric, batch_size=64).path_patching(
        senders, receiver, position).per_prompt
    moved = 0.0
    engine_for, oracle_for = EdgeEngine(lm, task, prompts, metric), Oracle(lm, task, prompts, metric)
    clean = task.metric(metric, engine_for.reference, prompts).double().numpy()
    for k, sender in enumerate(senders):
        engine = engine_for(sender, receiver, position)
        naive = oracle_for(sender, receiver, position)
        np.testing.assert_allclose(engine, naive, rtol=0, atol=TOLERANCE,
                                   err_msg=f"edge engine vs oracle: {sender} -> {receiver} at {position}")
        np.testing.assert_allclose(experiments[k], naive, rtol=0, atol=TOLERANCE,
                                   err_msg=f"path_patching vs oracle: {sender} -> {receiver} at {position}")
        moved = max(moved, float(np.abs(naive - clean).max()))
    if not (end_only and isinstance(receiver, Logits) and position.name != "END" and not position.is_all):
        assert moved > 1e-3, "no sender moved the metric: the comparison could not see a wrong answer"


@pytest.mark.parametrize("arch,which,position", _cases("induction"))
def test_path_patching_on_induction(arch, which, position, tiny_models, induction):
    lm = tiny_models(arch)
    task, prompts = induction
    # loss reads the repeated half before END; logit_diff reads END
    _check(lm, task, prompts, receivers(lm.shape)[which], position,
           "logit_diff" if position.name == "END" else "loss")


@pytest.mark.parametrize("arch,which,position", _cases("varied"))
def test_path_patching_positions_moving_by_name(arch, which, position, tiny_models, varied):
    """Prompts of three lengths; A and B at different indices in different prompts."""
    lm = tiny_models(arch)
    task, prompts = varied
    _check(lm, task, prompts, receivers(lm.shape)[which], position, "logit_diff", end_only=True)
