"""IR -> AST -> text -> IR: a resolved hypothesis prints back as a program that resolves
to the same hypothesis (circuitlang/ir_to_ast.py), for every shipped file and for random
claim sets."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

import circuitlang
from circuitlang import ir, topology
from circuitlang.ast_to_ir import resolve_text
from circuitlang.ir_to_ast import claim_text, expr_to_ast, ir_to_ast
from circuitlang.models import known_shape
from circuitlang.resources import stdlib_dir
from circuitlang.sites import ALL, Channel, Embed, Head, Mlp, ModelShape, Position

ROOT = Path(__file__).resolve().parent.parent
FILES = sorted(p for p in list(stdlib_dir().glob("*.circ")) + list((ROOT / "examples").rglob("*.circ"))
               if p.name != "prelude.circ")
GPT2 = ModelShape(12, 12, 768, 64, vocab_size=50257, n_ctx=1024, architecture="gpt2", name="gpt2")
ATTN4 = ModelShape(4, 8, 512, 64, vocab_size=48262, n_ctx=1024, has_mlp=False, architecture="gpt2",
                   name="attn-only-4l")


def _shape(text: str) -> ModelShape:
    for line in text.splitlines():
        if line.startswith("model "):
            name = line.split()[1]
            if name == "attn-only-4l":
                return ATTN4
            if name.startswith("toy-"):
                return known_shape(name)
    return GPT2


def _same(a: ir.Hypothesis, b: ir.Hypothesis) -> None:
    for field in ("model", "task", "metric", "ablation", "semantics", "seed", "samples", "citations",
                  "reported", "groups", "claims", "experiments", "expectations", "task_params",
                  "hole_constraints"):
        assert getattr(a, field) == getattr(b, field), field


def _roundtrip(h: ir.Hypothesis, shape: ModelShape, **kw) -> ir.Hypothesis:
    text = circuitlang.format(ir_to_ast(h, **kw))
    return resolve_text(text, shape, h.task, filename="printed.circ")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_shipped_file_prints_back_to_the_same_hypothesis(path: Path):
    text = path.read_text()  # (files with holes print back too)
    shape = _shape(text)
    h = resolve_text(text, shape, filename=str(path))
    _same(_roundtrip(h, shape), h)
    _same(_roundtrip(h, shape, group_heads=True), h)


def test_holes_and_their_constraints_print_back():
    text = ("task ioi\nheads ?g moves IO to END\n?s -> ?h.q at END\n?s in layers 7-8\n?h in heads 9.6, 9.9\n"
            "?g has at most 4 heads\n?g has at least 2 heads\nmlp ?m at END depends on IO\n?m in layers 0-2, 5\n")
    h = resolve_text(text, GPT2)
    back = _roundtrip(h, GPT2)
    assert back.hole_constraints == h.hole_constraints and back.claims == h.claims
    assert "heads ?g at END depends on IO" in circuitlang.format(ir_to_ast(h))


def test_sites_below_the_head_print_back_with_their_declarations(tmp_path):
    """Neurons, SAE latents (and a latent hole), error terms and a file subspace print with
    the `sae` / `subspace` lines they need, their paths relative to where the program is
    saved, and resolve to the same claims and dictionaries from there."""
    import json

    import torch
    from safetensors.torch import save_file

    shape = known_shape("toy-ioi")
    d = shape.d_model
    (tmp_path / "saes" / "a").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    save_file({"W_enc": torch.randn(d, 8, generator=g), "b_enc": torch.zeros(8), "W_dec": torch.randn(8, d, generator=g),
               "b_dec": torch.zeros(d)}, str(tmp_path / "saes" / "a" / "sae_weights.safetensors"))
    (tmp_path / "saes" / "a" / "cfg.json").write_text(json.dumps({"d_in": d, "d_sae": 8, "architecture": "standard"}))
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=g))
    save_file({"basis": q.contiguous()}, str(tmp_path / "io.safetensors"))
    text = ('task ioi\nsae a = "saes/a" at resid 2\nsubspace s = "io.safetensors" at resid 1\n'
            "feature a.3 at END depends on IO\nerror a at END depends on S\nneuron 1.5 at END depends on IO\n"
            "subspace s at END depends on IO\nhead 0.1 -> feature a.?f at END\n")
    h = resolve_text(text, shape, filename=str(tmp_path / "h.circ"))
    printed = circuitlang.format(ir_to_ast(h, base=tmp_path))
    assert 'sae a = "saes/a" at resid 2' in printed and 'subspace s = "io.safetensors" at resid 1' in printed
    back = resolve_text(printed, shape, filename=str(tmp_path / "printed.circ"))
    _same(back, h)
    assert back.saes == h.saes


def test_a_printed_program_is_formatted_and_names_core_claims():
    h = resolve_text("model toy-ioi\ntask ioi\nmetric logit_diff\nablation resample given template\n"
                     "head 1.0 moves name from IO to END\n5.5 -> 8.6 at END\nexpect recovered >= 0.85\n"
                     "expect logit_diff >= 0.5 * clean\n", GPT2)
    text = circuitlang.format(ir_to_ast(h))
    assert "head 1.0 at END depends on IO\n" in text
    assert "head 1.0.pattern at END depends on position(IO)\n" in text
    assert "head 5.5 -> head 8.6.q at END\nhead 5.5 -> head 8.6.k at END\n" in text
    assert "ablation resample given template\n" in text
    assert "expect recovered >= 0.85\n" in text and "expect logit_diff >= 0.5 * clean\n" in text
    assert circuitlang.format(circuitlang.parse(text)) == text
    assert claim_text(h.claims[0]) == "head 1.0 at END depends on IO"


@pytest.mark.parametrize("source", ["recovered >= 0.85", "logit_diff >= 0.5 * clean", "abs(clean - scrubbed) < 1",
                                    "scrubbed > -2", "recovered >= 1 / 3", "min(clean, 2) - max(random, 1) > 0",
                                    "(clean - random) / (scrubbed + 1) > 0.25", "-recovered < 0.1"])
def test_expressions_keep_their_value(source):
    h = resolve_text(f"task ioi\nexpect {source}\n", GPT2)
    (e,) = h.expectations
    (back,) = _roundtrip(h, GPT2).expectations
    assert sympy.simplify(back.lhs - e.lhs) == 0 and sympy.simplify(back.rhs - e.rhs) == 0
    assert back == e
    assert expr_to_ast(sympy.Rational(17, 20)) == circuitlang.parse("expect x >= 0.85\n").statements[0].rhs


FEATURES = [ir.Feature("task", "IO"), ir.Feature("task", "template"), ir.Feature("token", "S1+1"),
            ir.Feature("position", "S2"), ir.Feature("token", "END")]
POSITIONS = [Position("END"), Position("S2"), Position("S1", 1), ALL]


SMALL = ModelShape(4, 4, 64, 16, vocab_size=100, n_ctx=64, architecture="gpt2", name="small")
SMALL_EDGES = topology.edges(SMALL)


@st.composite
def hypotheses(draw):
    shape = SMALL
    claims = []
    for _ in range(draw(st.integers(0, 6))):
        if draw(st.booleans()):
            site = draw(st.sampled_from([Head(draw(st.integers(0, 3)), draw(st.integers(0, 3)), c)
                                         for c in (Channel.OUT, Channel.Q, Channel.V, Channel.PATTERN)]
                                        + [Mlp(draw(st.integers(0, 3))), Embed()]))
            feats = tuple(draw(st.lists(st.sampled_from(FEATURES), max_size=2, unique=True)))
            claims.append(ir.DependsClaim(site, draw(st.sampled_from(POSITIONS)), feats))
        else:
            s, r = draw(st.sampled_from(SMALL_EDGES))
            claims.append(ir.EdgeClaim(s, r, draw(st.sampled_from(POSITIONS))))
    mode = draw(st.sampled_from(ir.ABLATION_MODES))
    given = (ir.Feature("task", "template"),) if mode == "resample" and draw(st.booleans()) else ()
    return ir.Hypothesis(model="small", task="ioi", metric="logit_diff", metric_named=draw(st.booleans()),
                         ablation=ir.Ablation(mode, given), semantics=draw(st.sampled_from(ir.SEMANTICS)),
                         seed=draw(st.none() | st.integers(0, 99)), claims=tuple(dict.fromkeys(claims)),
                         shape=shape)


@settings(max_examples=60, deadline=None)
@given(h=hypotheses())
def test_random_hypotheses_print_back_to_themselves(h):
    back = _roundtrip(h, SMALL)
    assert back.claims == h.claims
    assert (back.ablation, back.semantics, back.seed) == (h.ablation, h.semantics, h.seed)
    if h.metric_named:
        assert back.metric == h.metric
    assert dataclasses.replace(back, metric_named=h.metric_named, metric=h.metric, task_params=h.task_params
                               ).claims == h.claims
