"""ACDC: the batched search makes the sequential algorithm's decisions, finds the planted
circuit, needs passes for the edges it keeps (not the edges it tries), resumes after an
interruption, and refuses bad requests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import circuitlang
from circuitlang.discover.acdc import _Faith, acdc, default_order
from circuitlang.discover.problem import EdgeSpace, Problem
from circuitlang.discover.rundir import RunDir
from circuitlang.errors import DiscoveryError
from circuitlang.models import EdgePatch, EdgeReference, LoadedModel
from circuitlang.sites import ALL, Head, Logits, Position
from circuitlang.tasks import load_task

import planted_circuit as pc

TAU_PLANTED = 0.1


@pytest.fixture(scope="module")
def planted():
    lm = LoadedModel.from_hf(pc.model(), pc.tokenizer(), name="planted-acdc")
    task = pc.FreshInduction(lm.tokenizer, length=6)
    return lm, task


def _names(edges):
    return {(str(s), str(r)) for s, r, _ in edges}


# ---- the sequential reference ---------------------------------------------------------
def sequential_acdc(problem: Problem, tau: float, order) -> tuple[list[bool], list[float]]:
    """ACDC as auto-circuit writes it: one edge at a time, one scoring pass per edge.
    Returns (kept per tried edge, the step f - p at each trial)."""
    n_edges = len(problem.space)
    base = None if problem.metric == "kl" else problem.score(torch.ones(1, n_edges, dtype=torch.bool))[0]
    removed = torch.zeros(n_edges, dtype=torch.bool)
    p = 0.0
    if problem.space.per_position:  # every other position is always ablated: start from there
        values = problem.score(torch.ones(1, n_edges, dtype=torch.bool))[0]
        p = float(values.mean()) if base is None else float((problem.direction * (base - values)).mean())
    kept, steps = [], []
    for e in order:
        trial = ~removed
        trial[e] = False
        values = problem.score(trial[None])[0]
        if base is None:
            f = float(values.mean())
        else:
            f = float((problem.direction * (base - values)).mean())
        steps.append(f - p)
        if f - p < tau:
            removed[e] = True
            p = f
            kept.append(False)
        else:
            kept.append(True)
    return kept, steps


def _random_model(arch: str, seed: int, layers: int, heads: int) -> LoadedModel:
    import transformers as tf

    torch.manual_seed(seed)
    d = 8 * heads
    if arch == "gpt2":
        config = tf.GPT2Config(vocab_size=16, n_embd=d, n_layer=layers, n_head=heads, n_positions=32,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3)
        model = tf.GPT2LMHeadModel(config)
    elif arch == "gpt_neox":  # parallel attention and MLP
        config = tf.GPTNeoXConfig(vocab_size=16, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                                  intermediate_size=2 * d, max_position_embeddings=32, rotary_pct=0.5,
                                  use_parallel_residual=True, initializer_range=0.3)
        model = tf.GPTNeoXForCausalLM(config)
    else:  # grouped-query attention: k/v receivers feed two query heads each
        config = tf.LlamaConfig(vocab_size=16, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                                num_key_value_heads=heads // 2, intermediate_size=2 * d,
                                max_position_embeddings=32, initializer_range=0.3)
        model = tf.LlamaForCausalLM(config)
    model.config._attn_implementation = "eager"
    return LoadedModel.from_hf(model.eval(), name=f"random-{arch}-{seed}")


@st.composite
def acdc_cases(draw):
    arch = draw(st.sampled_from(["gpt2", "gpt_neox", "llama"]))
    seed = draw(st.integers(0, 2**16))
    metric = draw(st.sampled_from(["kl", "logit_diff"]))
    per_position = draw(st.booleans())
    quantile = draw(st.floats(0.1, 0.9))
    shuffled = draw(st.booleans())
    circuits_per_pass = draw(st.sampled_from([1, 3, 64]))
    return arch, seed, metric, per_position, quantile, shuffled, circuits_per_pass


def _check_against_the_sequential_algorithm(case) -> None:
    arch, seed, metric, per_position, quantile, shuffled, circuits_per_pass = case
    lm = _random_model(arch, seed, layers=2, heads=2)
    task = load_task("induction", tokenizer=None, length=4, vocab=16)
    prompts = task.prompts(4, seed)
    positions = (Position("END"), Position("PREV")) if per_position else (ALL,)
    space = EdgeSpace.build(lm.edge_set(), positions)
    problem = Problem(lm, task, prompts, metric, "corrupt", space, batch_size=4)
    # tau at a quantile of the single-edge effects, so that the decisions are mixed
    n_edges = len(space)
    wide = Problem(lm, task, prompts, metric, "corrupt", space, batch_size=4 * (n_edges + 1))
    single = wide.score(torch.cat([torch.ones(1, n_edges, dtype=torch.bool), ~torch.eye(n_edges, dtype=torch.bool)]))
    effects = single[1:].mean(1) if metric == "kl" else (problem.direction * (single[:1] - single[1:])).mean(1)
    tau = float(np.quantile(np.abs(effects), quantile))
    assume(tau > 1e-5)
    order = default_order(space)
    if shuffled:
        order = order[torch.randperm(n_edges, generator=torch.Generator().manual_seed(seed))]
    kept_ref, steps_ref = sequential_acdc(problem, tau, order.tolist())
    # the documented caveat: a step within float rounding of tau may go either way
    assume(min(abs(s - tau) for s in steps_ref) > 1e-6 * (1 + tau))
    circuit, decisions = acdc(problem, tau, order=order, rows=4 * circuits_per_pass)
    assert decisions.kept.tolist() == kept_ref
    assert torch.equal(decisions.order, order)
    scored = decisions.scored
    np.testing.assert_allclose(decisions.step[scored].numpy(), np.asarray(steps_ref)[scored.numpy()],
                               atol=1e-6 * (1 + tau))
    assert int(circuit.sum()) == sum(kept_ref)
    assume(0 < sum(kept_ref) < n_edges)  # (counted by hypothesis: most cases are mixed)


_CASES = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.data_too_large])


@settings(max_examples=4, **_CASES)
@given(case=acdc_cases())
def test_batched_decisions_equal_the_sequential_algorithm(case):
    _check_against_the_sequential_algorithm(case)


@pytest.mark.slow
@settings(max_examples=40, **_CASES)
@given(case=acdc_cases())
def test_batched_decisions_equal_the_sequential_algorithm_on_many_cases(case):
    _check_against_the_sequential_algorithm(case)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("metric", ["kl", "logit_diff"])
def test_an_accepted_circuit_is_the_reference_its_own_pass_gives(arch, metric):
    """`_Faith.accept` makes circuit j of the last call the reference of later passes: its
    mask and each sender's delta as a pass of that circuit alone gives them (below the
    resume layer too; the last layer's at the logits' token), taken out of a pass of two
    circuits that was itself referred to an earlier accepted one."""
    lm = _random_model(arch, 3, layers=3, heads=2)
    task = load_task("induction", tokenizer=None, length=4, vocab=16)
    prompts = task.prompts(4, 0)
    space = EdgeSpace.build(lm.edge_set(), (ALL,))
    problem = Problem(lm, task, prompts, metric, "corrupt", space, batch_size=4)
    faith = _Faith(problem, rows=8)  # two circuits per pass
    es, n = space.edge_set, problem.n
    top = lm.shape.n_layers - 1
    layer = torch.tensor([lm.shape.n_layers if isinstance(r, Logits) else r.layer for r in es.receivers])
    late = (layer[space.pairs[:, 0]] >= top).nonzero()[:, 0]  # edges into the last layer and the logits
    g = torch.Generator().manual_seed(1)
    rows = torch.arange(n)
    ablated = problem.ablated(rows)
    for rnd in range(2):
        kept = torch.ones(4, len(space), dtype=torch.bool)
        kept[:, late] = torch.rand(4, len(late), generator=g) < 0.5  # the passes resume at the last layer
        faith(kept)
        before = faith.reference
        faith.accept(3)  # the second circuit of the last pass
        ref = faith.reference
        assert ref is not before
        mask = space.masks(kept[3:], prompts)
        torch.testing.assert_close(ref.mask, mask[0])
        # (a reference with no deltas: every node computed, every sender's delta kept)
        _, run = problem.forward_run(rows, edges=EdgePatch.from_set(es, ablated, mask, EdgeReference(mask[0], {})))
        assert set(ref.deltas) == set(run.deltas) == set(es.senders)
        for s, d in run.deltas.items():
            got = ref.deltas[s]
            if getattr(s, "layer", -1) == top and run.deltas_at is not None:
                d, got = d[rows, run.deltas_at], got[rows, ref.at]
            torch.testing.assert_close(got, d, atol=1e-5, rtol=1e-5, msg=f"round {rnd}: {s}")


# ---- the planted circuit ------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["kl", "logit_diff"])
def test_acdc_recovers_the_planted_circuit(planted, metric):
    """tau = 0.1: every planted edge's removal costs at least 2.3 nats of KL (4.5 of logit
    difference) and every other edge's less than 1e-6 (the constant dimensions keep the
    norms from coupling the subspaces), so any tau between those finds exactly the
    planted edges; 0.1 is a usual ACDC scale, 20x below the smallest planted step."""
    lm, task = planted
    found = circuitlang.discover(model=lm, task=task, method="acdc", threshold=TAU_PLANTED, metric=metric,
                                 n=24, with_curve=False, check=False)
    assert _names(found.edges) == pc.PLANTED  # precision = recall = 1
    assert found.faithfulness.value > 0.95
    assert found.method == "acdc"


def test_acdc_on_named_positions_finds_the_planted_edges_where_they_act(planted):
    lm, task = planted
    prompts = task.prompts(12, 0)
    where = (Position("END"), Position("PREV"), Position("PREV", 1))
    space = EdgeSpace.build(lm.edge_set(), where)
    problem = Problem(lm, task, prompts, "kl", "corrupt", space, batch_size=12 * 16)
    circuit, _ = acdc(problem, TAU_PLANTED)
    edges = {(str(s), str(r), str(p)) for s, r, p in space.edges(circuit)}
    assert ("head 0.0", "head 1.0.k", "PREV+1") in edges
    assert ("embed", "head 1.0.q", "END") in edges
    assert ("head 1.0", "logits", "END") in edges
    assert {(s, r) for s, r, _ in edges} == pc.PLANTED


# ---- passes grow with the edges kept ------------------------------------------------------
@pytest.mark.parametrize("skip_dead", [True, False])
def test_passes_grow_with_the_edges_kept_not_the_edges_tried(planted, skip_dead):
    lm, task = planted
    prompts = task.prompts(8, 0)
    problem = Problem(lm, task, prompts, "kl", "corrupt", batch_size=8 * 64)
    circuit, decisions = acdc(problem, TAU_PLANTED, skip_dead=skip_dead, rows=8 * 64)  # a pass holds 64 circuits
    tried, kept = len(decisions.order), int(decisions.kept.sum())
    assert kept == len(pc.PLANTED) and tried == len(problem.space) == 46
    # one pass per kept edge, one that ends the order, and the reference, ablated and
    # clean runs (passes above layer 0 resume the clean run)
    assert decisions.passes <= kept + 1 + 3
    assert problem.passes == decisions.passes
    # one circuit per pass (on a CPU, the default): the same decisions, a pass per edge scored
    narrow = Problem(lm, task, prompts, "kl", "corrupt", batch_size=8 * 64)
    _, one_by_one = acdc(narrow, TAU_PLANTED, skip_dead=skip_dead)
    assert torch.equal(one_by_one.kept, decisions.kept)
    assert one_by_one.passes == int(one_by_one.scored.sum()) + 3
    if skip_dead:  # heads 0.1 and 1.1 and both MLPs reach no output: their inputs need no pass
        assert int((~decisions.scored).sum()) > 0


# ---- interruption and resumption ------------------------------------------------------------
class _Interrupt(Exception):
    pass


def test_resume_after_an_interruption_finishes_with_the_same_result_without_redoing_work(planted, tmp_path):
    lm, task = planted
    prompts = task.prompts(8, 0)

    def problem():
        return Problem(lm, task, prompts, "logit_diff", "corrupt", batch_size=8)

    spec = {"method": "acdc", "threshold": TAU_PLANTED}
    whole, whole_d = acdc(problem(), TAU_PLANTED)
    seen = []

    def stop_after_three(info):
        seen.append(info)
        if info.receivers_done == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        acdc(problem(), TAU_PLANTED, rundir=RunDir(tmp_path / "run", spec), progress=stop_after_three)
    decided = seen[-1].edges_done
    assert decided > 0
    again = problem()
    circuit, d = acdc(again, TAU_PLANTED, rundir=RunDir(tmp_path / "run", spec, resume=True))
    assert torch.equal(circuit, whole)
    assert torch.equal(d.kept, whole_d.kept)
    assert d.resumed == decided
    assert d.passes < whole_d.passes
    # nothing decided before the interruption was scored again: only the rest was (plus
    # the reference, ablated and clean runs)
    assert d.passes <= int(whole_d.scored[decided:].sum()) + 3
    # a finished run resumes to the same result with no pass at all
    _, final = acdc(problem(), TAU_PLANTED, rundir=RunDir(tmp_path / "run", spec, resume=True))
    assert final.passes == 0 and torch.equal(final.kept, whole_d.kept)


def test_a_checkpoint_with_another_tau_is_refused(planted, tmp_path):
    lm, task = planted
    problem = Problem(lm, task, task.prompts(4, 0), "kl", "corrupt", batch_size=64)
    acdc(problem, 0.5, rundir=RunDir(tmp_path, {"m": "acdc"}))
    with pytest.raises(DiscoveryError, match="another threshold"):
        acdc(problem, 0.25, rundir=RunDir(tmp_path, {"m": "acdc"}, resume=True))
    other = Problem(lm, task, task.prompts(4, 0), "logit_diff", "corrupt", batch_size=64)
    with pytest.raises(DiscoveryError, match="metric"):
        acdc(other, 0.5, rundir=RunDir(tmp_path, {"m": "acdc"}, resume=True))


_KILLED_RUN = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    import torch
    import planted_circuit as pc
    from circuitlang.discover.acdc import acdc
    from circuitlang.discover.problem import Problem
    from circuitlang.discover.rundir import RunDir
    from circuitlang.models import LoadedModel

    lm = LoadedModel.from_hf(pc.model(), pc.tokenizer(), name="planted-acdc")
    task = pc.FreshInduction(lm.tokenizer, length=6)
    problem = Problem(lm, task, task.prompts(8, 0), "kl", "corrupt", batch_size=8)

    def report(info):
        print(info.receivers_done, info.edges_done, flush=True)
        time.sleep(0.2)  # room for the kill to land mid-run

    circuit, d = acdc(problem, {tau!r}, rundir=RunDir({run!r}, {{"m": "acdc"}}, resume=True), progress=report)
    print("done", circuit.nonzero()[:, 0].tolist(), d.resumed, flush=True)
""")


def test_resume_after_kill_minus_nine(planted, tmp_path):
    run = tmp_path / "run"
    script = tmp_path / "run_acdc.py"
    script.write_text(_KILLED_RUN.format(tests=str(Path(__file__).parent), tau=TAU_PLANTED, run=str(run)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stdout:
        if int(line.split()[0]) >= 4:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (run / "acdc.pt").is_file()
    again = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, check=True)
    last = again.stdout.strip().splitlines()[-1].split(" ", 1)[1]
    lm, task = planted
    whole, _ = acdc(Problem(lm, task, task.prompts(8, 0), "kl", "corrupt", batch_size=8), TAU_PLANTED)
    assert last.rsplit(" ", 1)[0] == str(whole.nonzero()[:, 0].tolist())
    assert int(last.rsplit(" ", 1)[1]) > 0  # it resumed from the killed run's checkpoint


# ---- bad requests -------------------------------------------------------------------------
def test_bad_requests_are_discovery_errors(planted):
    lm, task = planted
    problem = Problem(lm, task, task.prompts(4, 0), "kl", "corrupt")
    for tau in (-0.1, float("nan"), float("inf"), "big"):
        with pytest.raises(DiscoveryError) as info:
            acdc(problem, tau)
        assert info.value.diagnostics[0].code == "discover.threshold"
    with pytest.raises(DiscoveryError, match="negative"):
        circuitlang.discover(model=lm, task=task, method="acdc", threshold=-1.0, n=4, check=False)
    with pytest.raises(DiscoveryError, match="needs a threshold"):
        circuitlang.discover(model=lm, task=task, method="acdc", n=4, check=False)
    with pytest.raises(DiscoveryError, match="each of the 46"):
        acdc(problem, 0.1, order=[0, 1, 2])
    with pytest.raises(DiscoveryError, match="each of the 46"):
        acdc(problem, 0.1, order=[0] * 46)


def test_order_by_sites_and_the_default_order_is_reverse_topological(planted):
    lm, task = planted
    problem = Problem(lm, task, task.prompts(4, 0), "kl", "corrupt", batch_size=64)
    order = default_order(problem.space)
    edges = [problem.space.edge(int(i)) for i in order]
    assert isinstance(edges[0][1], Logits)
    assert [str(s) for s, _, _ in edges[:3]] == ["mlp 1", "head 1.1", "head 1.0"]  # latest sender first
    ranks = [(-_receiver_rank(r)) for _, r, _ in edges]
    assert ranks == sorted(ranks)
    by_sites = [(s, r) for s, r, _ in edges]
    _, a = acdc(problem, TAU_PLANTED, order=by_sites)
    _, b = acdc(problem, TAU_PLANTED)
    assert torch.equal(a.kept, b.kept) and torch.equal(a.order, order)


def _receiver_rank(site) -> float:
    if isinstance(site, Logits):
        return float("inf")
    if isinstance(site, Head):  # a layer's heads read one stream; its MLP reads after them
        return 2 * site.layer
    return 2 * site.layer + 1
