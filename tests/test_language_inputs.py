"""The language on inputs that used to misbehave: task parameters, odd digits, zero
offsets, empty verb bodies, a `depends on` without a position, and the limits on a
file's size and an expression's depth (docs/language.md, "Limits")."""
from __future__ import annotations

from decimal import Decimal

import pytest

import circuitlang
from circuitlang import ast, text_to_ast
from circuitlang.ast_to_ir import resolve, resolve_text
from circuitlang.errors import ParseError
from circuitlang.sites import ModelShape
from circuitlang.tasks import get_signature
from circuitlang.text_to_ast import parse_task_param

GPT2 = ModelShape(n_layers=12, n_heads=12, d_model=768, d_head=64, name="gpt2")


def _roundtrip(text: str) -> str:
    program = circuitlang.parse(text)
    out = circuitlang.format(program)
    assert circuitlang.parse(out) == program
    assert circuitlang.format(circuitlang.parse(out)) == out
    return out


# ------------------------------------------------------------------ task parameters


def test_task_line_takes_parameters_and_prints_them_canonically():
    text = ('task   induction length = 20  vocab=32 tokens=[ a,"b c" ] prepend_bos=false '
            'x=-1.50 y="true" z=ABBA empty=[]\n')
    program = circuitlang.parse(text)
    (decl,) = program.statements
    assert decl == ast.TaskDecl("induction", (
        ast.TaskParam("length", 20), ast.TaskParam("vocab", 32),
        ast.TaskParam("tokens", ("a", "b c")), ast.TaskParam("prepend_bos", False),
        ast.TaskParam("x", Decimal("-1.50")), ast.TaskParam("y", "true"),
        ast.TaskParam("z", "ABBA"), ast.TaskParam("empty", ())))
    assert _roundtrip(text) == ('task induction length=20 vocab=32 tokens=[a, "b c"] '
                                'prepend_bos=false x=-1.50 y="true" z=ABBA empty=[]\n')


def test_parameter_literals_of_different_kinds_are_different():
    # Python's True == 1 == Decimal(1) must not make `x=true` and `x=1` one program
    a, b, c = (circuitlang.parse(f"task t x={v}") for v in ("true", "1", "1.0"))
    assert a != b and b != c and a != c
    assert circuitlang.parse('task t x=ABBA') == circuitlang.parse('task t x="ABBA"')


def test_a_task_may_be_named_by_a_quoted_path():
    program = circuitlang.parse('task "data/pairs.jsonl"\n')
    assert program.statements[0].name == "data/pairs.jsonl"
    assert _roundtrip('task "data/pairs.jsonl"') == "task data/pairs.jsonl\n"
    assert _roundtrip('task "my data/pairs.jsonl"') == 'task "my data/pairs.jsonl"\n'


def test_command_line_task_params_share_the_files_syntax():
    assert parse_task_param("length=20") == ast.TaskParam("length", 20)
    assert parse_task_param(" tokens=[a, b] ") == ast.TaskParam("tokens", ("a", "b"))
    assert parse_task_param('path="x y.jsonl"') == ast.TaskParam("path", "x y.jsonl")
    for bad in ("length", "length=", "=3", "a=1 b=2", "a=[1"):
        with pytest.raises(ParseError, match="expected NAME=VALUE"):
            parse_task_param(bad)


# ------------------------------------------------------------------ digits, offsets


@pytest.mark.parametrize("text", ["head ٩.٦ moves IO to END",  # Arabic-Indic digits
                                  "head ９.６ moves IO to END",  # full-width digits
                                  "task ioi\nseed ٣\n",
                                  "task ioi\nexpect recovered >= ٠.٥\n"])
def test_digits_outside_ascii_are_not_numbers(text):
    with pytest.raises(ParseError, match="unexpected character"):
        circuitlang.parse(text)


def test_an_offset_of_zero_is_the_bare_word():
    with_zero = "task ioi\nhead 1.0 moves IO+0 to END\nhead 1.1 moves IO-0 to END\n"
    plain = "task ioi\nhead 1.0 moves IO to END\nhead 1.1 moves IO to END\n"
    assert circuitlang.parse(with_zero) == circuitlang.parse(plain)
    assert _roundtrip(with_zero) == plain
    sig = get_signature("ioi")
    assert resolve_text(with_zero, GPT2, sig).claims == resolve_text(plain, GPT2, sig).claims


# ------------------------------------------------------------------ verbs, depends


@pytest.mark.parametrize("text", ["verb $h zaps $x:\n    \f\n",
                                  "verb $h zaps $x:\n  \f  \nhead 1.0 at END depends on IO\n"])
def test_a_verb_needs_a_body(text):
    # a form feed is blank to the indenter: the verb parsed with no body, and `fmt`
    # then wrote a file that did not parse
    with pytest.raises(ParseError, match="needs at least one claim in its body") as info:
        circuitlang.parse(text)
    assert info.value.span.line == 1


def test_depends_on_without_a_position_says_so():
    with pytest.raises(ParseError) as info:
        circuitlang.parse("task ioi\ngroup name_movers = heads 9.9, 9.6\n"
                          "name_movers.q depends on IO\n")
    err = info.value
    assert err.message == "a `depends on` claim needs a position"
    assert "unknown verb" not in str(err)
    assert "name_movers.q at END depends on" in err.hint
    assert (err.span.line, err.span.column) == (3, 15)


def test_a_verb_cannot_be_called_depends():
    with pytest.raises(ParseError, match="cannot start with `depends`"):
        circuitlang.parse("verb $h depends on $x:\n    $h at END depends on $x\n")


# ------------------------------------------------------------------ limits


@pytest.mark.parametrize("make", [
    lambda n: "-" * n + "recovered",
    lambda n: " + ".join(["recovered"] * (n + 1)),
    lambda n: "abs(" * n + "recovered" + ")" * n,
    lambda n: "max(recovered, " * n + "0" + ")" * n,
], ids=["neg", "plus", "abs", "max"])
def test_expressions_deeper_than_the_limit_are_a_parse_error(make):
    limit = text_to_ast.MAX_EXPR_DEPTH
    text = f"task ioi\nexpect {make(500)} >= 0\n"
    with pytest.raises(ParseError, match=f"nests deeper than {limit} levels") as info:
        circuitlang.parse(text)
    assert info.value.span.line == 2 and "^" in str(info.value)
    # at the limit everything after parsing still works: format, resolve, equality
    ok = f"task ioi\nexpect {make(limit)} >= 0\n"
    program = circuitlang.parse(ok)
    assert circuitlang.parse(circuitlang.format(program)) == program
    hypothesis = resolve(program, GPT2, get_signature("ioi"))
    assert hypothesis.expectations


def test_deep_parentheses_alone_do_not_nest():
    program = circuitlang.parse("task ioi\nexpect " + "(" * 500 + "recovered" + ")" * 500
                                + " >= 0\n")
    assert circuitlang.format(program) == "task ioi\nexpect recovered >= 0\n"


def test_too_many_statements_is_a_parse_error_naming_the_limit(monkeypatch):
    monkeypatch.setattr(text_to_ast, "MAX_STATEMENTS", 10)
    body = "verb $h zaps $x:\n" + "    $h at END depends on $x\n" * 5
    circuitlang.parse("task ioi\n" + body + "head 1.0 zaps IO\n" * 3)  # 10 statements
    with pytest.raises(ParseError, match="more than 10 statements") as info:
        circuitlang.parse("task ioi\n" + body + "head 1.0 zaps IO\n" * 4)
    assert info.value.span.line == 11  # the first statement over the limit


def test_too_long_a_file_is_a_parse_error_naming_the_limit(monkeypatch):
    monkeypatch.setattr(text_to_ast, "MAX_SOURCE_CHARS", 100)
    with pytest.raises(ParseError, match="the limit is 100"):
        circuitlang.parse("task ioi\n" + "# padding\n" * 20)


def test_the_limits_are_the_documented_ones():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "language.md").read_text()
    for name in ("MAX_SOURCE_CHARS", "MAX_STATEMENTS", "MAX_EXPR_DEPTH", "MAX_CLAIMS"):
        assert f"{getattr(text_to_ast, name):,}" in doc, name


def test_the_claim_limit_check_names_the_limit():
    from circuitlang.errors import Span

    limit = text_to_ast.MAX_CLAIMS
    assert text_to_ast.check_claim_count(limit, None) is None
    span = Span(3, 1, 3, 10, "h.circ")
    found = text_to_ast.check_claim_count(limit + 1, span)
    assert found.code == "resolve.too_many_claims" and found.span == span
    assert f"more than the limit of {limit:,}" in found.message


def test_a_program_expanding_past_the_claim_limit_is_a_resolve_error(monkeypatch):
    from circuitlang.errors import ResolveError

    monkeypatch.setattr(text_to_ast, "MAX_CLAIMS", 500)
    heads = ", ".join(f"{layer}.{head}" for layer in range(2) for head in range(12))
    text = f"task ioi\ngroup g = heads {heads}\ng -> g at END\n"  # 12 x 12 x 3 = 432 claims
    assert len(resolve_text(text, GPT2, get_signature("ioi")).claims) == 432
    with pytest.raises(ResolveError, match="more than the limit of 500") as info:
        resolve_text(text + "g -> g at END\n", GPT2, get_signature("ioi"))  # 864 in all
    assert info.value.span.line == 4
