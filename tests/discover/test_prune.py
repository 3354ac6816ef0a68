"""Edge pruning by learned masks (circuitlang/discover/prune.py): the planted circuit
recovered, gradients equal to finite differences, determinism, kill-and-resume, bad
options."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import circuitlang
from circuitlang.discover import Selection
from circuitlang.discover import prune as P
from circuitlang.discover.problem import EdgeSpace, Problem
from circuitlang.discover.rundir import RunDir
from circuitlang.errors import DiscoveryError
from circuitlang.models import EdgePatch, LoadedModel
from circuitlang.sites import Position

import planted_circuit as pc

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def planted():
    lm = LoadedModel.from_hf(pc.model(), pc.tokenizer(), name="planted-prune")
    task = pc.FreshInduction(lm.tokenizer, length=6)
    return lm, task


@pytest.fixture(scope="module")
def small(planted):
    """A cheap problem for the determinism and resumption tests: 8 prompts."""
    lm, task = planted
    return Problem(lm, task, task.prompts(8, 0), "kl", "corrupt")


def _names(space, circuit):
    return {(str(s), str(r)) for s, r, _ in space.edges(circuit)}


# ---- (a) the planted circuit ----------------------------------------------------------
def test_the_learned_mask_is_the_planted_circuit(planted, tmp_path):
    """precision = recall = 1: the deterministic mask (log-alpha > 0), the top 5 edges,
    a threshold on log-alpha and growth to 0.9 faithfulness along the ranking are each
    exactly the planted edges (the selections resume the finished run: no retraining)."""
    lm, task = planted
    problem = Problem(lm, task, task.prompts(16, 0), "kl", "corrupt")
    opts = {"prune_steps": 150, "sparsity": 0.1}
    found = P.prune(problem, Selection(), dict(opts), RunDir(tmp_path, _spec()))
    assert _names(problem.space, found.circuit) == pc.PLANTED
    la = found.extra["log_alpha"]
    assert float(la[found.ranking[4]]) > 0 > float(la[found.ranking[5]])
    for selection in (Selection(edges=5), Selection(threshold=float(la[found.ranking[5]]) + 0.1),
                      Selection(target=0.9)):
        again = P.prune(problem, selection, dict(opts), RunDir(tmp_path, _spec(), resume=True))
        assert _names(problem.space, again.circuit) == pc.PLANTED, selection
        assert torch.equal(again.ranking, found.ranking)


def test_discover_prunes_to_the_planted_circuit_and_the_checker_agrees(planted):
    lm, task = planted
    result = circuitlang.discover(model=lm, task=task, method="prune", n=16, target=0.9, with_curve=False,
                                  method_options={"prune_steps": 150, "sparsity": 0.1})
    assert {(str(s), str(r)) for s, r, _ in result.edges} == pc.PLANTED
    assert result.faithfulness.value > 0.95
    assert result.check.holds
    assert "method prune (sparsity 0.1, 150 steps, metric kl)" in result.text


@pytest.mark.slow
def test_a_task_metric_and_a_warm_start_also_find_the_planted_circuit(planted):
    lm, task = planted
    problem = Problem(lm, task, task.prompts(16, 0), "logit_diff", "corrupt")
    found = P.prune(problem, Selection(edges=5), {"prune_steps": 150, "sparsity": 0.1, "warm_start": True}, None)
    assert _names(problem.space, found.circuit) == pc.PLANTED


def test_a_warm_start_opens_the_eap_ig_top_edges_first(small):
    state, _ = P.train(small, {"prune_steps": 1, "sparsity": 0.1, "warm_start": "activations"})
    first = torch.argsort(-state.log_alpha.detach(), stable=True)[:5]
    kept = torch.zeros(len(small.space), dtype=torch.bool)
    kept[first] = True
    assert _names(small.space, kept) == pc.PLANTED


# ---- (b) exact gradients --------------------------------------------------------------
@pytest.fixture(scope="module")
def planted64():
    lm = LoadedModel.from_hf(pc.model().double(), pc.tokenizer(), name="planted-prune-64")
    task = pc.FreshInduction(lm.tokenizer, length=6)
    return lm, task


@pytest.mark.parametrize("metric", ["kl", "logit_diff"])
def test_a_step_gradient_is_the_finite_difference_of_its_loss(planted64, metric):
    """d loss / d log_alpha from the engine's mask gradients equals central differences
    of the loss, measured without autograd on float64 engine masks (`EdgeSpace.masks`
    rounds to float32, too coarse for differences), at gates strictly between 0 and 1
    and with both multipliers on."""
    lm, task = planted64
    problem = Problem(lm, task, task.prompts(6, 0), metric, "corrupt")
    n_edges = len(problem.space)
    gen = torch.Generator().manual_seed(1)
    la = torch.randn(n_edges, generator=gen, dtype=torch.float64) * 1.5
    u = torch.rand(n_edges, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    lambdas, target = (0.7, 2.5), 0.2
    index = torch.arange(problem.n)
    loss, _, _, grad = P.step_loss(problem, la, u, index, lambdas=lambdas, target=target)

    full = problem.full() if metric != "kl" else 0.0

    space, es = problem.space, problem.space.edge_set
    ablated = problem.ablated(index)

    def metric_of(kept):  # [E] float64 -> metric per prompt, no autograd
        mask = space.as_grid(1.0 - kept[None])[:, 0] * es.valid().double()
        with torch.no_grad():
            run = lm.run(problem.prompts.input_ids, problem.prompts.attention_mask,
                         edges=EdgePatch.from_set(es, ablated, mask))
        if metric != "kl":
            return problem.metric_of(run.logits, index).numpy()
        # the task's kl reads the logits in float32 (tasks/metrics.py); here in float64
        end = task.logits_at_end(run.logits, problem.prompts).log_softmax(-1)
        ref = problem.reference(index).log_softmax(-1)
        return (ref.exp() * (ref - end)).sum(-1).numpy()

    def total(log_alpha):  # [K, E] -> [K], the loss by another road
        z = P.hard_concrete(log_alpha, u.expand_as(log_alpha))
        m = np.stack([metric_of(row) for row in z])
        faith = m.mean(1) if metric == "kl" else problem.direction * (np.mean(full) - m.mean(1))
        gap = P.expected_l0(log_alpha).mean(1).numpy() - target
        return faith + lambdas[0] * gap + lambdas[1] * np.maximum(gap, 0) ** 2

    eps = 1e-4
    step = torch.eye(n_edges, dtype=torch.float64) * eps
    numeric = (total(la + step) - total(la - step)) / (2 * eps)
    assert total(la[None])[0] == pytest.approx(loss, rel=1e-5)
    # a gate clamped at 0 or 1 has no gradient; one at the clamp's edge has a kink
    s_bar = torch.sigmoid((u.log() - (-u).log1p() + la) / P.BETA) * (P.ZETA - P.GAMMA) + P.GAMMA
    inside = ((s_bar > 1e-3) & (s_bar < 1 - 1e-3)) | (s_bar < -1e-3) | (s_bar > 1 + 1e-3)
    assert int(((s_bar > 0) & (s_bar < 1)).sum()) > n_edges // 4
    scale = float(np.abs(numeric).max())
    tol = 1e-4 if metric == "kl" else 1e-7  # the step's kl is float32
    np.testing.assert_allclose(grad.numpy()[inside.numpy()], numeric[inside.numpy()], rtol=tol,
                               atol=tol * scale)
    assert float(grad.abs().max()) > 1e-3  # the gates matter


def test_chunked_per_position_gradients_equal_one_pass(planted64, monkeypatch):
    """Per-position spaces are split into chunks of prompts to bound the mask's memory;
    the chunks' gradients add up to the gradient of one pass."""
    lm, task = planted64
    prompts = task.prompts(6, 0)
    space = EdgeSpace.build(lm.edge_set(), (Position("REPEAT"), Position("END")))
    problem = Problem(lm, task, prompts, "kl", "corrupt", space)
    gen = torch.Generator().manual_seed(2)
    la = torch.randn(len(space), generator=gen, dtype=torch.float64)
    u = torch.rand(len(space), generator=gen, dtype=torch.float64) * 0.9 + 0.05
    whole = P.step_loss(problem, la, u, torch.arange(6))
    monkeypatch.setattr(P, "_MASK_BUDGET", 1)  # one prompt per chunk
    chunked = P.step_loss(problem, la, u, torch.arange(6))
    assert chunked[0] == pytest.approx(whole[0], rel=1e-12)
    torch.testing.assert_close(chunked[3], whole[3], rtol=1e-10, atol=1e-12)


def test_hard_concrete_constants_and_the_deterministic_mask():
    la = torch.tensor([-8.0, -1e-3, 1e-3, 8.0])
    half = torch.full_like(la, 0.5)
    z = P.hard_concrete(la, half)  # the median gate
    assert z.tolist()[0] == 0.0 and z.tolist()[3] == 1.0
    assert (z >= 0.5).tolist() == P.deterministic_mask(la).tolist() == [False, False, True, True]
    # P(z > 0) = P(s_bar > 0) by sampling
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0)) * (1 - 2e-6) + 1e-6
    for value in (-2.0, 0.0, 1.5):
        sampled = float((P.hard_concrete(torch.full_like(u, value), u) > 0).double().mean())
        assert sampled == pytest.approx(float(P.expected_l0(torch.tensor(value))), abs=5e-3)


# ---- (c) determinism ------------------------------------------------------------------
OPTS = {"prune_steps": 30, "sparsity": 0.1, "checkpoint_every": 5, "batch": 4}


def test_a_run_is_a_function_of_its_seed(small):
    a, _ = P.train(small, dict(OPTS))
    b, _ = P.train(small, dict(OPTS))
    c, _ = P.train(small, {**OPTS, "seed": 1})
    assert torch.equal(a.log_alpha, b.log_alpha)
    assert torch.equal(a.lambdas, b.lambdas)
    assert not torch.equal(a.log_alpha, c.log_alpha)


# ---- (d) kill and resume --------------------------------------------------------------
class _Stop(Exception):
    pass


def _spec():
    return {"method": "prune", "test": True}


def test_an_interrupted_run_resumes_where_its_checkpoint_left_it(small, tmp_path):
    whole, _ = P.train(small, dict(OPTS))
    ran = []

    def stop_at_12(step, info):
        ran.append(step)
        if step == 12:
            raise _Stop

    with pytest.raises(_Stop):
        P.train(small, {**OPTS, "callback": stop_at_12}, RunDir(tmp_path, _spec()))
    assert ran == list(range(1, 13))
    ran.clear()
    notes = []
    resumed, _ = P.train(small, {**OPTS, "callback": lambda step, info: ran.append(step)},
                         RunDir(tmp_path, _spec(), resume=True), notes)
    assert ran == list(range(11, 31))  # from the checkpoint at 10: steps 1-10 are not redone
    assert notes == ["pruning resumed at step 10 of 30"]
    assert torch.equal(resumed.log_alpha, whole.log_alpha)
    assert torch.equal(resumed.lambdas, whole.lambdas)

    ran.clear()  # a finished run resumes to its result without a step
    found = P.prune(small, Selection(), {**OPTS, "callback": lambda step, info: ran.append(step)},
                    RunDir(tmp_path, _spec(), resume=True))
    assert ran == []
    assert torch.equal(found.extra["log_alpha"], whole.log_alpha.detach())
    assert torch.equal(found.circuit, P.deterministic_mask(whole.log_alpha.detach()))


def test_resuming_with_other_options_is_refused(small, tmp_path):
    P.train(small, {**OPTS, "prune_steps": 5}, RunDir(tmp_path, _spec()))
    with pytest.raises(DiscoveryError) as err:
        P.train(small, {**OPTS, "prune_steps": 5, "lr": 0.5}, RunDir(tmp_path, _spec(), resume=True))
    assert err.value.diagnostics[0].code == "discover.rundir-mismatch"
    assert "lr" in str(err.value)


_KILLED = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {here!r})
    import planted_circuit as pc
    from circuitlang.discover import prune as P
    from circuitlang.discover.problem import Problem
    from circuitlang.discover.rundir import RunDir
    from circuitlang.models import EdgePatch, LoadedModel

    lm = LoadedModel.from_hf(pc.model(), pc.tokenizer(), name="planted-prune")
    task = pc.FreshInduction(lm.tokenizer, length=6)
    problem = Problem(lm, task, task.prompts(8, 0), "kl", "corrupt")

    def kill(step, info):
        if step == 17:
            os.kill(os.getpid(), signal.SIGKILL)

    P.train(problem, {{**{opts!r}, "callback": kill}}, RunDir({path!r}, {spec!r}))
""")


@pytest.mark.slow
def test_kill_9_then_resume_gives_the_uninterrupted_result(small, tmp_path):
    script = _KILLED.format(here=str(HERE), opts=OPTS, path=str(tmp_path), spec=_spec())
    proc = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not list(tmp_path.glob("*.tmp"))  # no half-written checkpoint
    ran = []
    resumed, _ = P.train(small, {**OPTS, "callback": lambda step, info: ran.append(step)},
                         RunDir(tmp_path, _spec(), resume=True))
    assert ran[0] == 16  # the checkpoint at 15 survived the kill
    whole, _ = P.train(small, dict(OPTS))
    assert torch.equal(resumed.log_alpha, whole.log_alpha)


# ---- (e) bad options ------------------------------------------------------------------
@pytest.mark.parametrize("option, value, code", [
    ("sparsity", 0, "discover.prune-sparsity"),
    ("sparsity", 1.5, "discover.prune-sparsity"),
    ("sparsity", -0.1, "discover.prune-sparsity"),
    ("prune_steps", 0, "discover.prune-steps"),
    ("prune_steps", 2.5, "discover.prune-steps"),
    ("lr", 0, "discover.prune-lr"),
    ("lr", -1e-3, "discover.prune-lr"),
    ("lr", float("nan"), "discover.prune-lr"),
    ("lambda_lr", -1, "discover.prune-lambda"),
    ("warmup", 1000, "discover.prune-warmup"),
    ("batch", 0, "discover.prune-batch"),
    ("checkpoint_every", 0, "discover.prune-checkpoint"),
    ("warm_start", "eap", "discover.prune-warm-start"),
])
def test_bad_options_are_discovery_errors_with_hints(small, option, value, code):
    passes = small.passes
    with pytest.raises(DiscoveryError) as err:
        P.prune(small, Selection(), {option: value}, None)
    diag = err.value.diagnostics[0]
    assert diag.code == code
    assert diag.hint
    assert option in diag.message or option in diag.hint
    assert small.passes == passes  # refused before any work


def test_discover_refuses_a_bad_sparsity_with_its_hint(planted):
    lm, task = planted
    with pytest.raises(DiscoveryError, match="outside \\(0, 1\\]") as err:
        circuitlang.discover(model=lm, task=task, method="prune", n=4, check=False,
                             method_options={"sparsity": 2.0})
    assert "fraction of edges kept" in err.value.diagnostics[0].hint
