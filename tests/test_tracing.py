"""Causal tracing (circuitlang/tracing.py) on the embedded toy-facts model.

What tracing finds is compared with what toy-facts's circuitlang.json records, measured
by plain PyTorch hooks that swap an MLP's output between subjects (train_facts.py).
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

import circuitlang
from circuitlang.models import load_model
from circuitlang.models.known import toy_dir
from circuitlang.sites import ALL, Position
from circuitlang.tasks import load_task
from circuitlang.tracing import TraceResult, causal_trace, window_layers

N_PROMPTS = 36


@pytest.fixture(scope="module")
def facts():
    lm = load_model("toy-facts", device="cpu")
    task = load_task("facts", tokenizer=lm.tokenizer).for_model(lm.shape)
    prompts = task.prompts()
    return lm, task, prompts.subset(list(range(0, len(prompts), len(prompts) // N_PROMPTS))[:N_PROMPTS])


@pytest.fixture(scope="module")
def recorded():
    return json.loads((toy_dir("toy-facts") / "circuitlang.json").read_text())


@pytest.fixture(scope="module")
def mlp_trace(facts):
    lm, task, prompts = facts
    return causal_trace(lm, task, prompts, "mlp", ALL)


def test_toy_facts_ships_as_recorded(recorded):
    digest = hashlib.sha256((toy_dir("toy-facts") / "model.safetensors").read_bytes()).hexdigest()
    assert digest == recorded["sha256"]
    assert (toy_dir("toy-facts") / "model.safetensors").stat().st_size < 1_200_000
    measured = recorded["measured"]
    assert measured["accuracy"] >= 0.99
    assert measured["subject_storage_layers"] == [0]
    # the swap measurement, rerun on the shipped weights, gives the recorded numbers
    from circuitlang.models.toys.train_facts import measure_facts
    from circuitlang.tasks.facts import synthetic_facts

    lm = load_model("toy-facts", device="cpu")
    again = measure_facts(lm.hf_model, lm.tokenizer, synthetic_facts())
    for key, value in measured.items():
        assert again[key] == pytest.approx(value, abs=1e-3), key


def test_tracing_puts_the_subject_effect_where_the_swap_measurement_does(mlp_trace, recorded):
    measured = recorded["measured"]
    subj_last = mlp_trace.column("SUBJ_LAST")
    # the layer whose MLP, restored at the subject's last token, brings back the most is
    # one where swapping that MLP's output between subjects moves the answer
    assert int(np.argmax(subj_last)) in measured["subject_storage_layers"]
    assert subj_last.max() > 0.03
    # the subject's last token matters more than its first, as the swap measurement says
    assert measured["mlp_swap_subj_last"][0] > measured["mlp_swap_subj_first"][0]
    assert subj_last.max() > mlp_trace.column("SUBJ_FIRST").max()
    # the layers the swap finds inert are inert under tracing too
    for layer, swap in enumerate(measured["mlp_swap_subj_last"]):
        if swap < 0.01:
            assert abs(subj_last[layer]) < 0.01, layer
    assert np.isnan(mlp_trace.column("FURTHER")).all()  # the toy's relations are two tokens
    assert mlp_trace.clean > 0.95 and mlp_trace.corrupt < 0.5 * mlp_trace.clean


def test_default_noise_is_three_embedding_stds(facts, mlp_trace):
    lm, _, prompts = facts
    wte = lm.hf_model.transformer.wte.weight.detach().double()
    first, last = prompts.positions["SUBJ_FIRST"], prompts.positions["SUBJ_LAST"]
    ids = [int(prompts.input_ids[i, t]) for i in range(len(prompts))
           for t in range(int(first[i]), int(last[i]) + 1)]
    sigma = float(wte[ids].std())
    assert mlp_trace.extra["embedding_std"] == pytest.approx(sigma, rel=1e-6)
    assert mlp_trace.extra["noise"] == 3.0
    assert mlp_trace.extra["noise_std"] == pytest.approx(3 * sigma, rel=1e-6)


def test_one_cell_equals_hand_written_hooks(facts, mlp_trace):
    """Noise wte's output at the subject, restore one MLP output at one token, read p(object)."""
    lm, _, prompts = facts
    model = lm.hf_model
    i, layer = 0, 0
    t = int(prompts.positions["SUBJ_LAST"][i])
    n, width = prompts.input_ids.shape
    std = mlp_trace.extra["noise_std"]
    # the documented draw: one seeded [N, T, d] Gaussian, kept on the subject's tokens
    eps = torch.randn(n, width, lm.shape.d_model, generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64) * std
    length = int(prompts.attention_mask[i].sum())
    ids = prompts.input_ids[i:i + 1, :length]
    span = slice(int(prompts.positions["SUBJ_FIRST"][i]), t + 1)
    obj = int(prompts.answers[i, 0])
    clean_mlp = {}
    h1 = model.transformer.h[layer].mlp.register_forward_hook(lambda m, a, o: clean_mlp.setdefault("v", o.detach()))
    with torch.no_grad():
        model(ids)
    h1.remove()

    def noised(module, args, output):
        output = output.clone()
        output[0, span] += eps[i, span].to(output.dtype)
        return output

    def restore(module, args, output):
        output = output.clone()
        output[0, t] = clean_mlp["v"][0, t]
        return output

    hooks = [model.transformer.wte.register_forward_hook(noised)]
    with torch.no_grad():
        p_corrupt = model(ids).logits[0, -1].softmax(-1)[obj].item()
    hooks.append(model.transformer.h[layer].mlp.register_forward_hook(restore))
    with torch.no_grad():
        p_restored = model(ids).logits[0, -1].softmax(-1)[obj].item()
    for h in hooks:
        h.remove()
    cells = mlp_trace.per_prompt.reshape(*mlp_trace.grid, -1)
    cell = cells[layer, mlp_trace.columns.index("SUBJ_LAST"), i]
    assert cell == pytest.approx(p_restored - p_corrupt, abs=1e-5)
    assert mlp_trace.extra["corrupt_per_prompt"][i] == pytest.approx(p_corrupt, abs=1e-5)
    # tracing does not run states before the subject (they are clean in the corrupted run
    # too) and gives them 0: restoring one by hand indeed changes nothing
    clean_mlp.clear()
    h1 = model.transformer.h[layer].mlp.register_forward_hook(lambda m, a, o: clean_mlp.setdefault("v", o.detach()))
    with torch.no_grad():
        model(ids)
    h1.remove()
    t = 0  # <bos>, before the subject
    hooks = [model.transformer.wte.register_forward_hook(noised),
             model.transformer.h[layer].mlp.register_forward_hook(restore)]
    with torch.no_grad():
        p_before = model(ids).logits[0, -1].softmax(-1)[obj].item()
    for h in hooks:
        h.remove()
    assert p_before == pytest.approx(p_corrupt, abs=1e-6)
    assert cells[layer, mlp_trace.columns.index("BEFORE"), i] == 0.0


def test_window_grid_shape_and_a_window_covering_the_model(facts):
    lm, task, prompts = facts
    few = prompts.subset(list(range(8)))
    assert window_layers(2, 10, 4) == [0, 1, 2, 3]
    assert window_layers(0, 3, 4) == [0, 1] and window_layers(3, 3, 4) == [2, 3]
    assert window_layers(5, 10, 48) == list(range(10))  # ROME: layers L-5 .. L+4
    wide = causal_trace(lm, task, few, "mlp", ALL, window=10)
    assert wide.grid == (4, 7) and wide.extra["window"] == 10
    values = np.asarray(wide.values)
    finite = np.isfinite(values[0])
    # a window wider than the model restores every MLP in every row: all rows equal
    assert np.allclose(values[:, finite], values[0, finite][None], atol=1e-9)
    one = causal_trace(lm, task, few, "attn", Position("SUBJ_LAST"), window=2)
    assert one.grid == (4, 1) and one.columns == ["SUBJ_LAST"]


def test_bad_arguments_say_what_is_valid(facts):
    from circuitlang.errors import ExecutionError

    lm, task, prompts = facts
    for kwargs, words in (({"kind": "head"}, "trace resid, mlp or attn"),
                          ({"kind": "resid", "window": 3}, "for mlp and attn only"),
                          ({"kind": "mlp", "noise": 0.0}, "3 x the embeddings")):
        with pytest.raises(ExecutionError) as err:
            causal_trace(lm, task, prompts, position=ALL, **kwargs)
        assert words in err.value.hint


def test_trace_and_probe_survive_ir_to_ast():
    from circuitlang.ast_to_ir import resolve_text
    from circuitlang.ir_to_ast import ir_to_ast
    from circuitlang.models import known_shape
    from circuitlang.tasks import get_signature

    text = ("task facts\ntrace mlp * at all window 10\ntrace resid * at SUBJ_LAST noise 2.0\n"
            "probe resid * at END for object heldout 0.3 save \"p.safetensors\"\n")
    h = resolve_text(text, known_shape("toy-facts"), get_signature("facts"))
    assert [type(e).__name__ for e in h.experiments] == ["Trace", "Trace", "Probe"]
    assert h.experiments[0].window == 10 and h.experiments[1].noise == 2.0
    printed = circuitlang.format(ir_to_ast(h))
    for line in text.splitlines()[1:]:
        assert line in printed


def test_toy_facts_training_is_deterministic():
    from circuitlang.models.toys import train as toy_train

    a, _, _ = toy_train.train("toy-facts", steps=3, log=lambda s: None)
    b, _, _ = toy_train.train("toy-facts", steps=3, log=lambda s: None)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_training_script_reproduces_toy_facts(tmp_path, recorded):
    """Retraining gives the shipped toy-facts: bit for bit on the versions and CPU kernels it
    was trained with (`train.reproduces_bit_for_bit`; on AVX2 and AVX512 the sums round
    differently), else the same behaviour (all facts recalled, the subject stored in MLP 0)."""
    from circuitlang.models.toys import train as toy_train

    model, tok, meta = toy_train.train("toy-facts", log=lambda s: None)
    saved = toy_train.save(model, tok, meta, tmp_path / "toy-facts")
    if toy_train.reproduces_bit_for_bit(recorded.get("trained_with", {})):
        assert saved["sha256"] == recorded["sha256"]
    got = saved["measured"]
    assert got["accuracy"] >= 0.99
    assert got["subject_storage_layers"] == recorded["measured"]["subject_storage_layers"]


def test_trace_statement_end_to_end_json_and_figure(tmp_path):
    results = circuitlang.run("task facts\nsamples 12\ntrace mlp * at SUBJ_LAST\ntrace resid * at all\n",
                              model="toy-facts")
    mlp, resid = results
    assert isinstance(mlp, TraceResult) and mlp.grid == (4, 1) and resid.grid == (4, 7)
    text = resid.render()
    assert "SUBJ_LAST" in text and "indirect effect" in text
    back = TraceResult.from_json(json.loads(json.dumps(resid.to_json())))
    assert back.grid == resid.grid and back.columns == resid.columns
    np.testing.assert_allclose(back.values, resid.values, equal_nan=True)
    pytest.importorskip("matplotlib", reason="the heatmap half needs matplotlib (the [figures] extra)")
    from circuitlang.figures import sweep_heatmap

    fig = sweep_heatmap(resid.as_sweeps())
    assert fig is not None
    sweep_heatmap(resid)  # the two-axis grid draws as it is too


def _statements():
    from hypothesis import strategies as st

    from circuitlang import ast

    position = st.builds(ast.PositionRef, st.sampled_from(["all", "END", "SUBJ_LAST", "S1"]),
                         st.integers(-3, 3))
    noise = st.floats(min_value=1e-6, max_value=1e6, allow_nan=False, allow_infinity=False)
    trace_options = st.lists(st.sampled_from(["noise", "window"]), unique=True).flatmap(
        lambda names: st.tuples(*[noise.map(lambda v: ("noise", v)) if n == "noise"
                                  else st.integers(1, 40).map(lambda v: ("window", v)) for n in names]))
    probe_options = st.lists(st.sampled_from(["heldout", "save"]), unique=True).flatmap(
        lambda names: st.tuples(*[st.floats(0.01, 0.99).map(lambda v: ("heldout", v)) if n == "heldout"
                                  else st.text("ab/\"\\. _", min_size=1, max_size=8).map(lambda v: ("save", v))
                                  for n in names]))
    trace = st.builds(ast.Trace, st.sampled_from(ast.TRACE_SITES), position, trace_options)
    probe = st.builds(ast.Probe, st.sampled_from(ast.PROBE_SITES), position,
                      st.sampled_from(["IO", "S", "subject"]), probe_options)
    return st.one_of(trace, probe)


def test_trace_and_probe_print_then_parse_round_trip():
    from hypothesis import given, settings

    from circuitlang import ast

    @settings(max_examples=150, deadline=None)
    @given(_statements())
    def check(stmt):
        program = ast.Program((stmt,))
        assert circuitlang.parse(circuitlang.format(program)) == program

    check()


def test_a_saved_check_with_trace_and_probe_renders_as_it_ran():
    """`circuitlang show` re-renders a run from its JSON: trace and probe results come back
    as themselves (their own layout), not as plain patching results."""
    from circuitlang.report import CheckResult

    result = circuitlang.check("task facts\nsamples 16\ntrace mlp * at SUBJ_LAST\nprobe resid * at END for object\n",
                               model="toy-facts", progress=False)
    back = CheckResult.from_json(json.loads(json.dumps(result.to_json())))
    assert [type(e).__name__ for e in back.experiments] == ["TraceResult", "ProbeResult"]
    assert back.render() == result.render()
