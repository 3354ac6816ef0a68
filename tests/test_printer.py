"""The canonical printer: round trips, idempotence, layout choices."""
from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

import circuitlang
from circuitlang import ast
from circuitlang.printer import format_expr, format_statement, format_target

REPO = Path(__file__).resolve().parent.parent
ALL_CIRC = sorted((REPO / "stdlib").glob("*.circ")) + sorted((REPO / "examples").glob("*.circ")) \
    + sorted((REPO / "tests" / "fixtures").glob("*/*.circ"))


@pytest.mark.parametrize("path", ALL_CIRC, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_format_reparses_equal_and_is_idempotent(path: Path):
    try:
        program = circuitlang.parse(path.read_text(), path.name)
    except circuitlang.ParseError:
        assert path.parent.name == "errors"  # syntax-error fixtures do not parse
        return
    once = circuitlang.format(program)
    assert circuitlang.parse(once) == program
    assert circuitlang.format(circuitlang.parse(once)) == once


@pytest.mark.parametrize("path", [p for p in ALL_CIRC if p.parent.name in ("stdlib", "examples")],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_files_are_formatted(path: Path):
    text = path.read_text()
    assert circuitlang.format(circuitlang.parse(text)) == text, (
        f"run `circuitlang fmt {path.relative_to(REPO)}`")


def test_canonical_spacing():
    text = "heads 7.3,7.9   inhibits S at END via q of g\nexpect   recovered>=0.85\n"
    assert circuitlang.format(circuitlang.parse(text)) == (
        "heads 7.3, 7.9 inhibits S at END via q of g\nexpect recovered >= 0.85\n")


def test_verb_bodies_are_indented_four_spaces():
    text = "verb $h x $y:\n  $h at END depends on $y\n"
    assert circuitlang.format(circuitlang.parse(text)) == (
        "verb $h x $y:\n    $h at END depends on $y\n")


def test_head_keyword_is_kept_as_written():
    text = "5.5 -> head 8.6.q at END\nhead 5.5 -> 8.6.q at END\n"
    assert circuitlang.format(circuitlang.parse(text)) == text
    program = circuitlang.parse(text)
    assert program.statements[0] == program.statements[1]


def test_hand_built_nodes_print():
    stmt = ast.VerbUse(ast.HeadTarget(ast.HeadRef(9, 6)), "moves",
                       (ast.Word("name"), ast.Word("to"), ast.PositionRef("S1", 1)))
    assert format_statement(stmt) == "head 9.6 moves name to S1+1"
    assert format_target(ast.HeadTarget(ast.HeadRef(None, None))) == "head *"
    assert format_target(ast.MlpTarget(None)) == "mlp *"
    assert format_target(ast.GroupTarget("g", "q")) == "g.q"
    assert format_statement(ast.ModelDecl("my model")) == 'model "my model"'
    assert format_statement(ast.Depends(ast.EmbedTarget(), ast.PositionRef("all"), ())) == (
        "embed at all depends on nothing")


def test_expressions_get_the_parentheses_their_tree_needs():
    a, b, c = ast.Name("a"), ast.Name("b"), ast.Name("c")
    assert format_expr(ast.BinOp("-", a, ast.BinOp("-", b, c))) == "a - (b - c)"
    assert format_expr(ast.BinOp("-", ast.BinOp("-", a, b), c)) == "a - b - c"
    assert format_expr(ast.BinOp("*", ast.BinOp("+", a, b), c)) == "(a + b) * c"
    assert format_expr(ast.Neg(ast.BinOp("+", a, b))) == "-(a + b)"
    assert format_expr(ast.Number(Decimal("0.850"))) == "0.850"
    assert format_expr(ast.Number(Decimal("3E+2"))) == "300"


def test_blank_lines_collapse_to_one():
    text = "model gpt2\n\n\n\ntask ioi\n"
    assert circuitlang.format(circuitlang.parse(text)) == "model gpt2\n\ntask ioi\n"


def test_printer_rejects_what_is_not_an_ast():
    with pytest.raises(TypeError, match="not a circuitlang statement"):
        format_statement("head 9.6")  # type: ignore[arg-type]
