"""Parsing: golden canonical prints, golden error messages, spans, comments."""
from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

import circuitlang
from circuitlang import ast
from circuitlang.ast_to_ir import resolve_text
from circuitlang.errors import CircuitlangError, ParseError, ResolveError
from circuitlang.sites import ModelShape
from circuitlang.tasks.signature import TaskSignature
from circuitlang.text_to_ast import grammar

FIXTURES = Path(__file__).parent / "fixtures"
PARSE_CASES = sorted((FIXTURES / "parse").glob("*.circ"))
ERROR_CASES = sorted((FIXTURES / "errors").glob("*.circ"))

GPT2_SHAPE = ModelShape(n_layers=12, n_heads=12, d_model=768, d_head=64, name="gpt2")
IOI = TaskSignature(
    name="ioi",
    positions=("IO", "S1", "S1+1", "S2", "END"),
    features=("IO", "S", "template", "order"),
    metrics=("logit_diff", "prob_diff", "loss", "kl"),
    default_metric="logit_diff",
    aliases=(("name", "IO"),),
)


def test_the_users_sentence_parses_verbatim():
    program = circuitlang.parse("head 9.6 moves name to END")
    assert program.statements == (
        ast.VerbUse(
            ast.HeadTarget(ast.HeadRef(9, 6)),
            "moves",
            (ast.Word("name"), ast.Word("to"), ast.Word("END")),
        ),
    )


@pytest.mark.parametrize("path", PARSE_CASES, ids=lambda p: p.stem)
def test_golden_canonical_print(path: Path):
    expected = path.with_suffix(".expected").read_text()
    program = circuitlang.parse(path.read_text(), path.name)
    assert circuitlang.format(program) == expected
    assert circuitlang.parse(expected) == program


@pytest.mark.parametrize("path", ERROR_CASES, ids=lambda p: p.stem)
def test_golden_error_messages(path: Path):
    expected = path.with_suffix(".err").read_text()
    with pytest.raises(CircuitlangError) as info:
        resolve_text(path.read_text(), GPT2_SHAPE, IOI, filename=path.name)
    assert info.value.render() + "\n" == expected
    wanted = ParseError if path.stem.startswith("syntax") else ResolveError
    assert isinstance(info.value, wanted)


def test_every_fixture_has_its_expected_file():
    for path in PARSE_CASES:
        assert path.with_suffix(".expected").is_file(), path
    for path in ERROR_CASES:
        assert path.with_suffix(".err").is_file(), path
    assert len(ERROR_CASES) >= 10


def test_spans_point_at_the_source():
    program = circuitlang.parse("task ioi\nhead 12.1 moves name to END\n", "f.circ")
    use = program.statements[1]
    assert (use.span.line, use.span.column, use.span.end_column) == (2, 1, 28)
    ref = use.subject.ref
    assert (ref.span.line, ref.span.column, ref.span.end_column) == (2, 6, 10)
    assert ref.span.filename == "f.circ"


def test_spans_are_not_part_of_equality():
    a = circuitlang.parse("head 9.6 moves name to END")
    b = circuitlang.parse("\n\nhead   9.6 moves   name to END  # hi\n")
    assert a == b
    assert a.statements[0].span != b.statements[0].span


def test_head_numbers_and_decimals_do_not_compete():
    program = circuitlang.parse(
        "group g = heads 8.10, 10.0\nexpect recovered >= 8.10\nreported clean = 3.10\n"
    )
    group, expect, reported = program.statements
    assert group.target.items == (ast.HeadRef(8, 10), ast.HeadRef(10, 0))
    assert expect.rhs == ast.Number(Decimal("8.1"))
    assert reported.value == Decimal("3.10")


def test_keywords_are_contextual():
    # `mean`, `given` and `head` may name features or groups where no keyword fits
    program = circuitlang.parse("ablation resample given mean\ngroup head = heads 1.1\n")
    assert program.statements[0].given == (ast.FeatureRef("mean"),)
    assert program.statements[1].name == "head"


def test_comments_and_blank_lines_are_kept_as_trivia():
    text = "# header\n\nmodel gpt2  # the model\n\n# about the task\ntask ioi\n# end\n"
    program = circuitlang.parse(text)
    model, task = program.statements
    assert model.trivia.leading == (" header", None)
    assert model.trivia.trailing == " the model"
    assert task.trivia == ast.Trivia((" about the task",), None, True)
    assert program.trailing_comments == (" end",)
    assert circuitlang.format(program) == text


def test_hash_inside_a_string_is_not_a_comment():
    program = circuitlang.parse('cite "issue #4"  # real comment\n')
    assert program.statements[0].text == "issue #4"
    assert program.statements[0].trivia.trailing == " real comment"


def test_string_escapes():
    program = circuitlang.parse(r'cite "a \"quoted\" \\ word"')
    assert program.statements[0].text == 'a "quoted" \\ word'
    with pytest.raises(ParseError, match=r"unknown escape \\q"):
        circuitlang.parse(r'cite "bad \q"')


def test_model_names_bare_and_quoted():
    bare = circuitlang.parse("model EleutherAI/pythia-70m\n").statements[0]
    quoted = circuitlang.parse('model "./my models/tiny"\n').statements[0]
    assert bare.name == "EleutherAI/pythia-70m"
    assert quoted.name == "./my models/tiny"
    assert circuitlang.format(circuitlang.parse('model "gpt2"')) == "model gpt2\n"


def test_verb_definition_shape():
    program = circuitlang.parse("verb $h moves $x to $p:\n    $h at $p depends on $x\n")
    (verb,) = program.statements
    assert verb.subject == "h"
    assert verb.words == (ast.Word("moves"), ast.Slot("x"), ast.Word("to"), ast.Slot("p"))
    assert verb.body == (
        ast.Depends(ast.SlotTarget("h"), ast.Slot("p"), (ast.Slot("x"),)),
    )


def test_wildcards_and_holes_parse():
    program = circuitlang.parse("patch head * at END\npatch head 9.* at END\n"
                                "head ?h.q at END depends on S\nmlp ?m at all depends on IO\n")
    star, layer9, hole, mlp = program.statements
    assert star.target.ref == ast.HeadRef(None, None)
    assert layer9.target.ref == ast.HeadRef(9, None)
    assert hole.target.ref == ast.Hole("h", "q")
    assert mlp.target.layer == ast.Hole("m")


def test_syntax_errors_fail_fast_with_one_diagnostic():
    with pytest.raises(ParseError) as info:
        circuitlang.parse("head 9.6 at\nhead 9.7 at\n", "x.circ")
    assert len(info.value.diagnostics) == 1
    assert info.value.render().startswith("x.circ:1:12: error: unexpected end of line")


def test_indented_first_statement_is_an_error_like_any_other():
    with pytest.raises(ParseError, match="unexpected indentation"):
        circuitlang.parse("  model gpt2\n")


def test_numbers_out_of_range_are_parse_errors():
    for text in ("expect recovered >= 1e999999", "seed 1234567890123456789012",
                 "head 99999999999999999999.1 moves IO to END", "expect clean > 0E-999"):
        with pytest.raises(ParseError, match="out of range"):
            circuitlang.parse(text)


def test_parse_rejects_non_text():
    with pytest.raises(ParseError, match="expected the program as text"):
        circuitlang.parse(b"head 9.6 moves name to END")  # type: ignore[arg-type]


def test_grammar_is_loaded_once():
    assert grammar() is grammar()
    assert grammar().options.parser == "lalr"
    assert grammar().options.lexer == "contextual"


def test_empty_and_comment_only_programs():
    assert circuitlang.parse("").statements == ()
    only = circuitlang.parse("# nothing here\n")
    assert only.statements == () and only.trailing_comments == (" nothing here",)
    assert circuitlang.format(only) == "# nothing here\n"
