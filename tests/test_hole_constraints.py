"""Holes in the language: group holes (`heads ?g`), constraints (`?s in layers 7-8`,
`?g has at most 4 heads`) parsed, printed, resolved into `Hypothesis.hole_constraints`,
and checked with messages that say what would be valid."""
from __future__ import annotations

import pytest

import circuitlang
from circuitlang import ast, ir
from circuitlang.ast_to_ir import resolve_text
from circuitlang.checker import refuse_holes
from circuitlang.errors import ParseError, ResolveError
from circuitlang.sites import Channel, Head, Mlp, ModelShape

GPT2 = ModelShape(n_layers=12, n_heads=12, d_model=768, d_head=64, name="gpt2")
ATTN = ModelShape(n_layers=2, n_heads=4, d_model=64, d_head=16, has_mlp=False, name="attn")


def hyp(text: str, shape: ModelShape = GPT2) -> ir.Hypothesis:
    return resolve_text("task ioi\n" + text, shape, "ioi")


def errors(text: str, shape: ModelShape = GPT2) -> list[str]:
    with pytest.raises(ResolveError) as info:
        hyp(text, shape)
    return [d.message for d in info.value.diagnostics]


@pytest.mark.parametrize("text,node", [
    ("?s in layers 7-8", ast.HoleIn(ast.Hole("s"), ((7, 8),))),
    ("?s in layers 7 - 8", ast.HoleIn(ast.Hole("s"), ((7, 8),))),
    ("?s in layer 5", ast.HoleIn(ast.Hole("s"), ((5, 5),))),
    ("?s in layers 3-5, 8", ast.HoleIn(ast.Hole("s"), ((3, 5), (8, 8)))),
    ("?s in heads 9.6, 9.*", ast.HoleIn(ast.Hole("s"), (), (ast.HeadRef(9, 6), ast.HeadRef(9, None)))),
    ("?g has at most 4 heads", ast.HoleSize(ast.Hole("g"), "at most", 4)),
    ("?g has at least 1 head", ast.HoleSize(ast.Hole("g"), "at least", 1)),
    ("?g has exactly 2 heads", ast.HoleSize(ast.Hole("g"), "exactly", 2)),
])
def test_constraints_parse_and_print_canonically(text, node):
    program = circuitlang.parse(text)
    assert program.statements == (node,)
    printed = circuitlang.format(program)
    assert circuitlang.parse(printed) == program
    assert circuitlang.format(circuitlang.parse(printed)) == printed


def test_a_hole_after_heads_is_a_group_hole():
    h = hyp("heads ?g moves IO to END\n?s -> heads ?g.q at END\nhead ?s at END depends on S\n")
    assert h.holes() == (ir.Hole("g", "group"), ir.Hole("s", "head"))
    assert h.claims[1] == ir.EdgeClaim(ir.Hole("s", "head"), ir.Hole("g", "group", Channel.Q),
                                       h.claims[1].position)
    assert str(h.holes()[0]) == "heads ?g"
    assert errors("heads ?x moves IO to END\nhead ?x at END depends on S\n") == [
        "hole ?x is used both as a group and as a head"]
    with pytest.raises(ResolveError, match=r"holes \(heads \?g\)"):
        refuse_holes(hyp("heads ?g moves IO to END\n"))


def test_the_ir_carries_the_constraints():
    h = hyp("head ?s at END depends on S\n?s in layers 7-8\n?s in heads 7.3, 8.*, 7.3\n"
            "heads ?g moves IO to END\n?g has exactly 2 heads\nmlp ?m at END depends on IO\n?m in layer 3\n")
    layer78, listed, size, mlp = h.hole_constraints
    assert layer78.hole == "s" and layer78.allowed == tuple(Head(l, i) for l in (7, 8) for i in range(12))
    assert listed.allowed == (Head(7, 3),) + tuple(Head(8, i) for i in range(12))
    assert (size.hole, size.allowed, size.at_least, size.at_most) == ("g", None, 2, 2)
    assert mlp.allowed == (Mlp(3),)
    assert layer78.text == "?s in layers 7-8" and layer78.span.line == 3
    data = h.to_json()["hole_constraints"]
    assert data[2] == {"hole": "g", "allowed": None, "at_least": 2, "at_most": 2, "unit": "heads",
                       "text": "?g has exactly 2 heads", "span": data[2]["span"]}
    # equality ignores where a constraint was written
    assert hyp("head ?s at END depends on S\n\n?s in layers 7-8\n").hole_constraints == \
        hyp("head ?s at END depends on S\n?s in layers 7-8\n").hole_constraints


@pytest.mark.parametrize("text,message", [
    ("head ?h moves IO to END\n?x in layers 7-8\n", "constraint on ?x, which no claim uses"),
    ("head ?h moves IO to END\n?h in layers 8-7\n", "layers 8-7 run backwards"),
    ("head ?h moves IO to END\n?h in layer 12\n", "layer 12 out of range (model has layers 0-11)"),
    ("head ?h moves IO to END\n?h in heads 9.12\n", "head 9.12 out of range (model has heads 0-11 in each layer)"),
    ("head ?h moves IO to END\n?h in heads 9.6.q\n", "a hole constraint names heads, not their inputs"),
    ("mlp ?m at END depends on IO\n?m in heads 1.1\n", "?m is an MLP (`mlp ?m`), not a head"),
    ("head ?h moves IO to END\n?h has at most 2 heads\n",
     "?h is one head (`head ?h`): only a group hole has a number of heads"),
    ("heads ?g moves IO to END\n?g has at most 0 heads\n",
     "a group hole holds at least one head; `?g has at most 0 heads` allows none"),
    ("heads ?g moves IO to END\n?g has at least 3 heads\n?g has at most 2 heads\n",
     "?g must hold at least 3 and at most 2 heads"),
    ("heads ?g moves IO to END\n?g in layer 9\n?g has at least 13 heads\n",
     "?g must hold at least 13 heads, but there are only 12 that satisfy its constraints"),
    ("head ?h moves IO to END\n?h in layer 7\n?h in layer 8\n", "no head satisfies every constraint on ?h"),
])
def test_bad_constraints_say_what_would_be_valid(text, message):
    assert message in errors(text)


def test_every_problem_is_reported_at_once():
    found = errors("head ?h moves IO to END\n?x in layer 1\n?h in layer 40\n?h has at most 2 heads\n")
    assert len(found) == 3


def test_an_mlp_hole_needs_a_model_with_mlps():
    assert "model attn has no MLPs (attention only)" in errors("mlp ?m at END depends on IO\n", ATTN)


def test_in_and_has_are_keywords_only_after_a_hole_that_starts_a_line():
    # a verb whose first word is `has`, used with a hole subject, prints as `head ?h has ...`
    program = ast.Program((ast.VerbUse(ast.HeadTarget(ast.Hole("h"), keyword=False), "has",
                                       (ast.Word("IO"),)),))
    text = circuitlang.format(program)
    assert text == "head ?h has IO\n" and circuitlang.parse(text) == program
    assert circuitlang.parse("group in = heads 1.1\nin moves IO to END\n").statements[1].verb == "moves"
    with pytest.raises(ParseError, match="at most, at least or exactly"):
        circuitlang.parse("?g has 4 heads\n")
