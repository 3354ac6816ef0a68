"""The classic experiments, run from programs on the planted induction model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import circuitlang
from circuitlang.errors import CircuitlangError
from circuitlang.experiments import Experiments
from circuitlang.models import Patch
from circuitlang.sites import Head, Position

HEADER = "task induction\nmetric logit_diff\n"


def run(text, planted, task):
    return circuitlang.run(HEADER + text, model=planted, task=task, n=16)


def test_head_sweep_is_a_layer_by_head_grid_that_finds_the_induction_head(planted, induction_task):
    [sweep] = run("patch head * at END\n", planted, induction_task)
    assert sweep.values.shape == (2, 2) and sweep.grid == (2, 2)
    assert sweep.normalized[1, 0] > 0.9  # the induction head carries the behaviour
    assert abs(sweep.normalized[0, 1]) < 1e-6 and abs(sweep.normalized[1, 1]) < 1e-6  # null heads


def test_patching_matches_a_hand_written_patch(planted, induction_task):
    """Noising head 1.0 at END = running clean with its corrupt output put in by hand."""
    prompts = induction_task.prompts(16, 0)
    exp = Experiments(planted, induction_task, prompts, "logit_diff")
    result = exp.activation_patching([Head(1, 0)], Position("END"))
    site = Head(1, 0)
    corrupt = planted.run(prompts.corrupt_input_ids, prompts.attention_mask, capture=[site]).cache[site]
    end = prompts.positions["END"]
    rows = torch.arange(len(end))
    run = planted.run(prompts.input_ids, prompts.attention_mask,
                      patches=[Patch(site, corrupt[rows, end], end)])
    by_hand = induction_task.metric("logit_diff", run.logits, prompts).numpy()
    np.testing.assert_allclose(result.per_prompt[0], by_hand, rtol=1e-5, atol=1e-5)


def test_denoising_is_the_mirror_image(planted, induction_task):
    prompts = induction_task.prompts(16, 0)
    exp = Experiments(planted, induction_task, prompts, "logit_diff")
    noise = exp.activation_patching([Head(1, 0), Head(1, 1)], Position("END"))
    denoise = exp.activation_patching([Head(1, 0), Head(1, 1)], Position("END"), direction="denoise")
    assert noise.normalized[0] > 0.9 and denoise.normalized[0] > 0.9
    assert abs(noise.normalized[1]) < 1e-6 and abs(denoise.normalized[1]) < 1e-6


def test_ablations(planted, induction_task):
    mean, zero, resample, nothing = run(
        "ablate head 1.0 with mean at END\n"
        "ablate head 1.0 with zero at END\n"
        "ablate head 1.0 with resample at END\n"
        "ablate head 1.1 with mean at END\n",
        planted, induction_task,
    )
    for r in (mean, zero, resample):
        assert r.values[0] < 0.5 * r.clean  # the behaviour is gone
    assert nothing.values[0] == pytest.approx(nothing.clean)  # a null head changes nothing


def test_path_patching_is_direct_only(planted, induction_task):
    """0.0 -> 1.0.k at all: the corrupt prompt keeps the first copy, so the keys the
    induction head uses are unchanged and the path carries none of the effect."""
    path, to_logits = run("patch 0.0 -> 1.0.k at all\npatch 1.0 -> logits at END\n", planted, induction_task)
    assert abs(path.normalized[0]) < 1e-6
    assert to_logits.normalized[0] > 0.9


def test_run_needs_experiments(planted, induction_task):
    with pytest.raises(CircuitlangError, match="no experiments"):
        run("0.0 -> 1.0.k at all\n", planted, induction_task)


def test_path_patching_sweep_leaves_senders_without_a_path_empty(planted, induction_task):
    """`head * -> 1.0.k`: layer-1 heads cannot send to a layer-1 key; their cells are
    NaN, rendered "-" and written as null, not a number computed from a backwards path."""
    (sweep,) = run("patch head * -> 1.0.k at PREV+1\n", planted, induction_task)
    n_heads = planted.shape.n_heads
    grid = sweep.normalized.reshape(-1, n_heads)
    assert np.isnan(grid[1]).all() and not np.isnan(grid[0]).any()
    assert sweep.to_json()["normalized"][1] == [None] * n_heads
    assert "      -" in sweep.render()
    with pytest.raises(CircuitlangError, match="is not in the model"):  # named: the resolver says so
        run("patch 1.1 -> 1.0.k at PREV+1\n", planted, induction_task)


@pytest.mark.parametrize("metric", ["logit_diff", "prob_diff", "loss"])
@pytest.mark.parametrize("where", ["END", "REPEAT", "all"])
def test_a_sweep_equals_whole_patched_passes(planted, induction_task, metric, where):
    """A sweep runs each row only from its site's layer up (and, at a named position,
    only from that position on), and computes only the logit columns the metric
    reads: the numbers are those of whole patched passes, one site at a time, and
    so are the unpatched baselines."""
    from circuitlang.sites import Mlp, Resid

    prompts = induction_task.prompts(4, 3)  # few: their answers are a few of the 16 tokens
    shape = planted.shape
    sites = [Head(l, h) for l in range(shape.n_layers) for h in range(shape.n_heads)]
    sites += [Resid(l) for l in range(shape.n_layers + 1)]
    if shape.has_mlp:
        sites += [Mlp(l) for l in range(shape.n_layers)]
    position = Position(where)
    short = Experiments(planted, induction_task, prompts, metric, batch_size=7)
    result = short.activation_patching(sites, position)
    assert (short._metric_columns() is not None) == (metric == "logit_diff")  # only its tokens
    corrupt = planted.run(prompts.corrupt_input_ids, prompts.attention_mask, capture=sites).cache
    rows = torch.arange(len(prompts.input_ids))
    by_hand = np.zeros_like(result.per_prompt)
    for k, site in enumerate(sites):
        if where == "all":
            patch = Patch(site, corrupt[site])
        else:
            at = prompts.positions[where]
            patch = Patch(site, corrupt[site][rows, at], at)
        logits = planted.run(prompts.input_ids, prompts.attention_mask, patches=[patch]).logits
        by_hand[k] = induction_task.metric(metric, logits, prompts).numpy()
    np.testing.assert_allclose(result.per_prompt, by_hand, rtol=1e-5, atol=1e-5)
    plain = planted.run(prompts.input_ids, prompts.attention_mask).logits
    np.testing.assert_allclose(short.baseline("clean"),
                               induction_task.metric(metric, plain, prompts).numpy(), rtol=1e-5, atol=1e-5)
    if not (metric == "loss" and where == "END"):  # the loss is of the tokens before END
        assert np.abs(result.per_prompt - short.baseline("clean")[None]).max() > 1e-3  # patches that move it


def test_metric_columns_are_the_tokens_a_metric_reads(planted, induction_task):
    from circuitlang.execute_inputs import metric_columns

    prompts = induction_task.prompts(4, 3)
    vocab = planted.shape.vocab_size
    columns = metric_columns(induction_task, "logit_diff", prompts, vocab)
    read = set(prompts.answers[:, 0].tolist()) | set(prompts.wrong_answers[:, 0].tolist())
    assert set(columns.tolist()) == read
    assert metric_columns(induction_task, "prob_diff", prompts, vocab) is None  # a softmax reads them all
    assert metric_columns(induction_task, "kl", prompts, vocab) is None


@pytest.mark.parametrize("where", ["END", "all"])
def test_a_sweep_of_the_top_layer_does_not_run_the_layers_below(planted, induction_task, where):
    prompts = induction_task.prompts(4, 3)
    top = planted.shape.n_layers - 1
    sites = [Head(top, h) for h in range(planted.shape.n_heads)]
    calls = [0] * planted.shape.n_layers
    attns = [planted.adapter.attn(i) for i in range(planted.shape.n_layers)]  # inside a block: runs if it does
    handles = [attn.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, attn in enumerate(attns)]
    try:
        Experiments(planted, induction_task, prompts, "logit_diff", batch_size=1).activation_patching(
            sites, Position(where))
    finally:
        for h in handles:
            h.remove()
    rows = len(sites) * len(prompts.input_ids)  # one pass per row at batch size 1
    assert calls[top] == calls[0] + rows  # every row ran the top block, and none the ones below


def test_a_metric_that_takes_a_max_over_tokens_reads_them_all(planted, induction_task):
    """The gradient at one point names only the largest of a max's tokens: the redraws
    (others far above the rest) catch that the others are read too."""
    from circuitlang.execute_inputs import metric_columns

    class BestOf:
        SIGNATURE = induction_task.SIGNATURE

        def metric(self, name, logits, prompts, reference_logits=None):
            return logits[:, :8].max(-1).values - logits[:, 8]

    prompts = induction_task.prompts(4, 3)
    assert metric_columns(BestOf(), "logit_diff", prompts, planted.shape.vocab_size) is None


def test_at_each_is_one_sweep_per_task_position_in_the_tasks_order():
    """`patch resid * at each`: the layer x position grid, as one sweep per position the
    task names, equal to writing each statement out; `each` takes no offset."""
    from circuitlang.errors import ResolveError

    each = circuitlang.check("samples 8\npatch resid * at each\nablate head 1.0 with mean at each\n",
                             model="toy-ioi", task="ioi", permutations=0)
    positions = ("IO", "S1", "S1+1", "S2", "END")
    assert [e.text for e in each.experiments] == ([f"patch resid * at {p}" for p in positions]
                                                  + [f"ablate head 1.0 with mean at {p}" for p in positions])
    written = "".join(f"patch resid * at {p}\n" for p in positions)
    one_by_one = circuitlang.check("samples 8\n" + written, model="toy-ioi", task="ioi", permutations=0)
    for a, b in zip(each.experiments, one_by_one.experiments):
        np.testing.assert_array_equal(a.to_numpy("values"), b.to_numpy("values"))
    grid = np.stack([e.to_numpy("values") for e in each.experiments[:5]], axis=1)  # layers x positions
    assert grid.shape == (4, 5) and np.ptp(grid) > 1.0
    with pytest.raises(ResolveError, match="`each` takes no offset"):
        circuitlang.check("patch resid * at each+1\n", model="toy-ioi", task="ioi")
