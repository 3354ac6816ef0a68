"""How scrubbing computes its rows: node kernels, memoised identical rows, exact counts.

The scrubber computes each claimed node from its input streams (execute_nodes.py)
and each distinct row once; these tests hold that to the reference ways (every node
by a full patched forward pass, every row computed), and the counts it reports to
what can be counted by hand.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import pytest

from circuitlang.checker import load_hypothesis
from circuitlang.execute import Scrubber
from circuitlang.ir import Ablation, DependsClaim, EdgeClaim, Feature, Hypothesis
from circuitlang.ir_to_graph import ir_to_graph
from circuitlang.models import load_model
from circuitlang.sites import Channel, Head, Position
from circuitlang.tasks import load_task

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def induction():
    model = load_model("toy-induction")
    task = load_task("induction", tokenizer=model.tokenizer)
    return model, task


def _scrubber(model, task, n, **switches):
    scrubber = Scrubber(model, task, task.prompts(n, 0), "logit_diff", batch_size=16)
    for name, value in switches.items():
        setattr(scrubber, name, value)
    return scrubber


def _stdlib_graph(name, model):
    hypothesis, _ = load_hypothesis((ROOT / "stdlib" / name).read_text(), model=model)
    return ir_to_graph(hypothesis)


def test_the_kernels_agree_with_the_model_on_the_toys(induction):
    """The kernels are checked against the model's own forward pass before use; on the
    GPT-2 toys they agree, so the fast way is the one taken (toy-induction has no MLPs)."""
    model, task = induction
    scrubber = _scrubber(model, task, 8)
    assert scrubber.kernels.verify("head", scrubber.prompts) and scrubber.kernels.verify("logits", scrubber.prompts)
    assert not scrubber.kernels.verify("mlp", scrubber.prompts)
    ioi = load_model("toy-ioi")
    assert ioi.shape.has_mlp
    kernels = Scrubber(ioi, load_task("ioi", tokenizer=ioi.tokenizer), load_task("ioi", tokenizer=ioi.tokenizer)
                       .prompts(8, 0), "logit_diff").kernels
    assert all(kernels.verify(kind, load_task("ioi", tokenizer=ioi.tokenizer).prompts(8, 0))
               for kind in ("head", "mlp", "logits"))


def test_kernels_give_the_numbers_of_full_forward_passes(induction):
    """Heads computed only at the position their parent reads, from their own input
    streams, and logits unembedded only where the metric reads, give what a full
    patched forward pass per row gives (layers above and below, every position)."""
    model, task = induction
    graph = _stdlib_graph("toy_induction.circ", model)
    fast = _scrubber(model, task, 24)
    slow = _scrubber(model, task, 24, use_kernels=False, use_memo=False)
    a = fast.scrub(graph, seed=3).scrubbed
    b = slow.scrub(graph, seed=3).scrubbed
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert fast.work.forward_rows == 0 and fast.work.head_rows > 0
    assert slow.work.head_rows == 0 and slow.work.forward_rows > 0


def test_memoised_rows_are_the_rows_computed_again(induction):
    """Graphs scored together with the same samples share every row (the same site, the
    same sampled prompts, the same sub-tree, as the breakdown's variants share the full
    hypothesis's untouched sub-trees); computing each once gives the values of computing
    every one."""
    model, task = induction
    graph = _stdlib_graph("toy_induction.circ", model)
    memo = _scrubber(model, task, 8)
    every = _scrubber(model, task, 8, use_memo=False)
    a = [r.scrubbed for r in memo.scrub_many([graph, graph], seed=1)]
    b = [r.scrubbed for r in every.scrub_many([graph, graph], seed=1)]
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(a[0], a[1])
    assert memo.work.reused > 0 and every.work.reused == 0
    assert memo.work.head_rows + memo.work.reused == every.work.head_rows


def test_a_later_graph_reuses_the_rows_an_earlier_one_computed(induction):
    """Scoring the same graph again (as the breakdown's variants share sub-trees with
    the full hypothesis) computes no head row a second time, and gives the same numbers."""
    model, task = induction
    graph = _stdlib_graph("toy_induction.circ", model)
    scrubber = _scrubber(model, task, 16)
    first = scrubber.scrub(graph, seed=0).scrubbed
    rows = scrubber.work.head_rows
    again = scrubber.scrub(graph, seed=0).scrubbed
    np.testing.assert_array_equal(first, again)
    assert scrubber.work.head_rows == rows


def test_rows_and_token_layers_are_counted_exactly(induction):
    """One claimed head at END with one claimed edge into its key: its rows are the
    distinct (prompt, remainder, child's prompt) triples; each reads END + 1 keys; the
    root unembeds one position per prompt (logit_diff reads END)."""
    model, task = induction
    hyp = Hypothesis(model="toy-induction", task="induction", metric="logit_diff", ablation=Ablation("resample"),
                     claims=(DependsClaim(Head(1, 0), Position("END"), (Feature("token", "PREV+1"),)),
                             EdgeClaim(Head(0, 3), Head(1, 0, Channel.K), Position("PREV+1"))))
    graph = ir_to_graph(hyp)
    n = 12
    scrubber = _scrubber(model, task, n)
    result = scrubber.scrub(graph, seed=5)
    (head,) = [v for v in graph.graph.nodes if v != graph.root and not graph.is_leaf(v)]
    (leaf,) = [c for c, _ in graph.children(head)]
    triples = {(int(a), int(b), int(c)) for a, b, c in
               zip(result.rows[head], result.remainders[head], result.rows[leaf])}
    end = scrubber.prompts.positions["END"]
    work = scrubber.work
    assert work.head_rows == len(triples) and work.reused == n - len(triples)
    assert work.head_token_layers == sum(int(end[a]) + 1 for a, _, _ in triples)
    assert work.root_rows == n and work.logit_positions == n
    assert work.mlp_rows == 0 and work.forward_rows == 0 and work.rows == len(triples) + n
    assert str(len(triples)) in work.describe()


def test_a_model_the_kernels_do_not_reproduce_is_computed_by_forward_passes(induction):
    """Where the probe finds a kernel disagreeing with the model, those nodes run as
    patched forward passes, and the numbers are the same."""
    model, task = induction
    graph = _stdlib_graph("toy_induction.circ", model)
    fast = _scrubber(model, task, 12)
    slow = _scrubber(model, task, 12)
    slow.kernels._verified = {"head": False, "mlp": False, "logits": False}
    np.testing.assert_allclose(fast.scrub(graph, seed=2).scrubbed, slow.scrub(graph, seed=2).scrubbed,
                               rtol=1e-5, atol=1e-5)
    assert slow.work.forward_rows > 0 and slow.work.head_rows == 0


def test_the_probe_rejects_a_kernel_that_is_wrong(induction, monkeypatch):
    """The probe compares with the model's forward pass: a kernel off by a little is refused."""
    from circuitlang.execute_nodes import NodeKernels

    model, task = induction
    kernels = NodeKernels(model)
    real = kernels.head
    monkeypatch.setattr(kernels, "head", lambda *a, **k: real(*a, **k) * 1.01)
    prompts = task.prompts(4, 0)
    assert not kernels.verify("head", prompts)
    assert kernels.verify("logits", prompts)


def test_the_main_pass_shows_a_bar_per_tree_level(induction, capsys):
    """Scrubbing reports after each tree level, in rows (the bar's unit, so its ETA is
    in rows); with progress on, scoring draws the bar on stderr and erases it, with
    progress off nothing is written."""
    from circuitlang.checker import prepare
    from circuitlang.verdict import score

    model, task = induction
    hypothesis, _ = load_hypothesis((ROOT / "stdlib" / "toy_induction.circ").read_text(), model=model)
    graph = ir_to_graph(hypothesis)
    calls = []
    _scrubber(model, task, 8).scrub_many([graph], seed=0, on_level=lambda *a: calls.append(a))
    # toy_induction's tree: 3 inner heads at height 1, then the logits; 8 prompts each
    assert [c[:2] for c in calls] == [(24, 32), (32, 32)]
    assert calls[0][2] == "tree level 1 of 1"
    assert calls[-1][2] == "logits"
    setup = prepare(hypothesis, model=model, n=8)
    score(graph, setup, progress=True)
    err = capsys.readouterr().err
    assert "scrubbing" in err and "/40" in err  # two graphs (the empty one too): 8 x (3 + 1 + 1) rows
    score(graph, setup, progress=False)
    assert capsys.readouterr().err == ""


def test_the_sampler_draws_what_one_draw_per_row_would():
    """`Sampler.agree` draws all rows at once; its samples (and the generator's state after)
    are those of one `rng.integers(len(group))` per row in order, the way numbers were
    drawn before, so reported numbers do not move with the speed-up."""
    from circuitlang.execute_inputs import Sampler

    model = load_model("toy-ioi")
    from circuitlang.models.known import model_task_params

    task = load_task("ioi", tokenizer=model.tokenizer, **model_task_params("toy-ioi"))
    prompts = task.prompts(64, 0)
    features_list = [(), (Feature("task", "IO"),), (Feature("task", "S"), Feature("task", "template"))]
    for features in features_list:
        fast = Sampler(prompts, np.random.default_rng(7), same_length=True)
        slow = Sampler(prompts, np.random.default_rng(7), same_length=True)
        keys = slow._group_keys(features)
        groups: dict = {}
        for i, k in enumerate(keys):
            groups.setdefault(k, []).append(i)
        parents = np.random.default_rng(1).integers(0, 64, size=200)
        for _ in range(3):
            got = fast.agree(parents, features)
            want = np.array([groups[keys[p]][slow.rng.integers(len(groups[keys[p]]))] for p in parents])
            np.testing.assert_array_equal(got, want)
            assert all(keys[g] == keys[p] for g, p in zip(got, parents))
            parents = got
        assert fast.rng.integers(1 << 30) == slow.rng.integers(1 << 30)
        assert len(set(got.tolist())) > 1


def test_a_sender_claimed_at_all_and_at_a_position_enters_a_query_once_there():
    """Head 0.1 claimed at every position and at END, with an edge into head 1.0's query: at
    END the query holds the END node's value (which refines the one at `all`), not both. The
    kernels assemble that query at END alone, with each sender's contribution tracked as it is
    replaced; they give what full patched forward passes over whole streams give, under every
    ablation."""
    from circuitlang.models.known import model_task_params

    model = load_model("toy-ioi")
    task = load_task("ioi", tokenizer=model.tokenizer, **model_task_params("toy-ioi"))
    end, all_ = Position("END"), Position("all")
    claims = (DependsClaim(Head(0, 1), all_, (Feature("task", "S"),)),
              DependsClaim(Head(0, 1), end, (Feature("task", "IO"),)),
              EdgeClaim(Head(0, 1), Head(1, 0, Channel.Q), all_),
              DependsClaim(Head(1, 0), end, (Feature("task", "IO"),)))
    for mode in ("resample", "corrupt", "mean", "zero"):
        hypothesis = Hypothesis(model="toy-ioi", task="ioi", metric="logit_diff", ablation=Ablation(mode, ()),
                                claims=claims, shape=model.shape)
        graph = ir_to_graph(hypothesis)
        node = graph.children(graph.root)[0][0]
        assert sorted(str(t.position) for _, t in graph.children(node) if t.channel is Channel.Q) == ["END", "all"]
        prompts = task.prompts(24, 0)
        fast = Scrubber(model, task, prompts, "logit_diff", batch_size=16)
        slow = Scrubber(model, task, prompts, "logit_diff", batch_size=16)
        slow.use_kernels = slow.use_memo = False
        a, b = fast.scrub(graph, seed=4).scrubbed, slow.scrub(graph, seed=4).scrubbed
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        assert fast.work.forward_rows == 0 and slow.work.forward_rows > 0


ALIKE = """task ioi
ablation {ablation}
head 2.0 moves name from IO to END
head 1.1 at END depends on S
head 0.2 at S1+1 depends on token(S1)
head 0.3 at S1+1 depends on token(S1)
0.2 -> 1.1.k at S1+1
0.3 -> 1.1.k at S1+1
1.1 -> 2.0.q at END
"""


@pytest.mark.parametrize("ablation", ["resample", "corrupt", "mean", "zero"])
@pytest.mark.parametrize("memo_floats", [None, 4096])
def test_alike_nodes_assembled_together_give_the_numbers_of_node_by_node(ablation, memo_floats, monkeypatch):
    """A chunk's head nodes that are assembled alike (the permutation test's random
    circuits: one tree shape, other heads) are assembled with one set of tensor operations
    (`Scrubber._compute_many`; senders of other sites read with one gather over banked
    captures, `PlainCache.gather_many`); that gives, to the bit, what assembling each node
    alone gives, with the memo full or with room for a few rows only (the rest kept for
    one level)."""
    from circuitlang import execute, execute_inputs
    from circuitlang.variants import random_circuits

    if memo_floats is not None:
        monkeypatch.setattr(execute, "MEMO_BUDGET", memo_floats)
    model = load_model("toy-ioi")
    task = load_task("ioi", tokenizer=model.tokenizer)
    hypothesis, _ = load_hypothesis(ALIKE.format(ablation=ablation), model=model)
    graphs = [ir_to_graph(h) for h in random_circuits(hypothesis, model.shape, 12, 0).hypotheses]
    assert len(graphs) == 12
    many = Scrubber(model, task, task.prompts(24, 0), "logit_diff", batch_size=16)
    alone = Scrubber(model, task, task.prompts(24, 0), "logit_diff", batch_size=16)
    alone.use_many = False
    calls = []
    original = execute_inputs.PlainCache.gather_many
    monkeypatch.setattr(execute_inputs.PlainCache, "gather_many",
                        lambda self, sites, *a: calls.append(len(set(sites))) or original(self, sites, *a))
    a = [r.scrubbed for r in many.scrub_many(graphs, seed=2)]
    assert calls and max(calls) > 1, "no senders of different sites were gathered together"
    b = [r.scrubbed for r in alone.scrub_many(graphs, seed=2)]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert many.work.as_dict() == alone.work.as_dict()


def test_a_gather_over_many_sites_reads_each_sites_capture(induction):
    """`PlainCache.gather_many` reads part j's rows from site j's capture, also when the
    sites were captured by different passes (two banks) and one site repeats."""
    from circuitlang.execute_inputs import PlainCache

    model, task = induction
    prompts = task.prompts(6, 0)
    cache = PlainCache(model, prompts, batch_size=4)
    first, second = [Head(0, 0), Head(0, 1)], [Head(1, 2), Head(1, 3)]
    cache.ensure(first)
    cache.ensure(second)  # another pass: another bank
    sites = [Head(1, 2), Head(0, 1), Head(0, 0), Head(1, 2), Head(1, 3)]
    counts = np.array([2, 3, 1, 2, 4])
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 6, counts.sum())
    tokens = torch.as_tensor(rng.integers(0, prompts.input_ids.shape[1], counts.sum()))
    got = cache.gather_many(sites, counts, rows, tokens)
    owner = np.repeat(np.arange(len(sites)), counts)
    want = torch.stack([cache.get(sites[owner[i]])[rows[i], tokens[i]] for i in range(len(rows))])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_row_keys_hashed_together_equal_each_hashed_alone():
    """A level's nodes are hashed together (`Scrubber._hash_rows`, grouped by their number
    of columns); each node's two lanes are what hashing it alone gives, and different
    columns or static parts give different keys."""
    rng = np.random.default_rng(0)
    statics = [("node", i % 3) for i in range(7)]
    columns = [[rng.integers(0, 2**40, 9).astype(np.uint64) for _ in range(w)] for w in (1, 3, 3, 2, 5, 3, 1)]
    together = Scrubber._hash_rows(statics, columns)
    for static, cols, (a, b) in zip(statics, columns, together):
        (x, y), = Scrubber._hash_rows([static], [cols])
        np.testing.assert_array_equal(a, x)
        np.testing.assert_array_equal(b, y)
    lanes = {(int(a[r]), int(b[r])) for a, b in together for r in range(9)}
    assert len(lanes) == 7 * 9


@pytest.mark.parametrize("ablation", ["resample", "corrupt"])
def test_the_nulls_circuits_drawn_first_are_captured_by_the_main_pass(ablation):
    """`check` draws the permutation test's circuits before its own scrub and hands them
    to it (`verdict.score`'s `later`): one capture pass per cache serves both, where the
    null drawn afterwards costs a pass of its own, and every number is the same."""
    from circuitlang import variants
    from circuitlang.checker import prepare
    from circuitlang.verdict import null_circuits, score

    model = load_model("toy-ioi")
    hypothesis, _ = load_hypothesis(ALIKE.format(ablation=ablation), model=model)
    graph = ir_to_graph(hypothesis)
    runs = {}
    for first in (True, False):
        setup = prepare(hypothesis, model=model, n=24, batch_size=16)
        caches = [setup.scrubber.cache] + ([setup.scrubber.corrupt_cache] if ablation == "corrupt" else [])
        drawn = null_circuits(hypothesis, setup, 12) if first else None
        scores = score(graph, setup, later=drawn.graphs if first else ())
        before = [c.passes for c in caches]
        null = variants.permutation_null(hypothesis, setup.scrubber, scores.clean, scores.random, model.shape,
                                         12, setup.seed, 0.5, drawn=drawn)
        assert len(null.scores) == 12
        added = [c.passes - b for c, b in zip(caches, before)]
        assert added == ([0] * len(caches) if first else [1] * len(caches))
        runs[first] = (scores, null)
    (a, null_a), (b, null_b) = runs[True], runs[False]
    for x, y in ((a.clean, b.clean), (a.random, b.random), (a.scrubbed, b.scrubbed), (null_a.scores, null_b.scores)):
        np.testing.assert_array_equal(x, y)
    assert null_a.p_value == null_b.p_value
