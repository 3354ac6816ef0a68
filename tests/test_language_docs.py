"""Every example in docs/language.md is tested.

* ```circ blocks parse, print canonically, and resolve against a GPT-2-small shape
  and the task the block names;
* each ```circ-error block fails with exactly the message in the ```text block after it;
* each ```lark block quotes rules that are really in grammar/circuitlang.lark.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import circuitlang
from circuitlang.ast_to_ir import resolve_text
from circuitlang.errors import CircuitlangError
from circuitlang.sites import ModelShape
from circuitlang.resources import grammar_dir

DOC = Path(__file__).resolve().parent.parent / "docs" / "language.md"
BLOCK = re.compile(r"^```([\w-]+)\n(.*?)^```$", re.M | re.S)
BLOCKS = [(m.group(1), m.group(2), DOC.read_text()[: m.start()].count("\n") + 1)
          for m in BLOCK.finditer(DOC.read_text())]
GPT2 = ModelShape(n_layers=12, n_heads=12, d_model=768, d_head=64, name="gpt2")


def _blocks(kind: str):
    return [(text, line) for k, text, line in BLOCKS if k == kind]


def _signature(text: str):
    from circuitlang import tasks

    match = re.search(r"^task (\S+)", text, re.M)
    return tasks.get_signature(match.group(1) if match else "ioi")


def test_the_reference_has_examples_of_every_kind():
    kinds = [k for k, _, _ in BLOCKS]
    assert kinds.count("circ") >= 10
    assert kinds.count("circ-error") >= 3
    assert kinds.count("lark") >= 8


@pytest.mark.parametrize("text,line", _blocks("circ"), ids=lambda v: str(v) if
                         isinstance(v, int) else None)
def test_circ_examples_parse_and_resolve(text: str, line: int):
    program = circuitlang.parse(text, f"language.md:{line}")
    assert circuitlang.parse(circuitlang.format(program)) == program
    hypothesis = resolve_text(text, GPT2, _signature(text), filename="example.circ")
    assert hypothesis.claims or hypothesis.experiments or hypothesis.expectations


def _error_pairs():
    pairs = []
    for i, (kind, text, line) in enumerate(BLOCKS):
        if kind == "circ-error":
            follower = BLOCKS[i + 1]
            assert follower[0] == "text", f"error example at line {line} has no ```text block"
            pairs.append((text, follower[1], line))
    return pairs


@pytest.mark.parametrize("text,expected,line", _error_pairs(),
                         ids=lambda v: str(v) if isinstance(v, int) else None)
def test_error_examples_render_exactly(text: str, expected: str, line: int):
    with pytest.raises(CircuitlangError) as info:
        resolve_text(text, GPT2, _signature(text), filename="example.circ")
    assert info.value.render() + "\n" == expected


@pytest.mark.parametrize("text,line", _blocks("lark"), ids=lambda v: str(v) if
                         isinstance(v, int) else None)
def test_grammar_excerpts_are_in_the_grammar(text: str, line: int):
    grammar = " ".join((grammar_dir() / "circuitlang.lark").read_text().split())
    for rule in text.strip().split("\n"):
        assert " ".join(rule.split()) in grammar, f"docs/language.md:{line}: {rule!r}"


def test_the_readme_tour_parses_and_resolves_against_gpt2_small():
    """The README's tour of the language is one program: it parses and resolves (holes and
    all) against GPT-2 small's shape, so no statement in it is out of date."""
    import re
    from pathlib import Path

    from circuitlang.ast_to_ir import resolve_text

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    tour = re.search(r"## A tour of the language\n\n```\n(.*?)```", readme, re.S).group(1)
    hypothesis = resolve_text(tour, filename="README.md")
    assert hypothesis.model == "gpt2" and hypothesis.claims and hypothesis.experiments and hypothesis.holes()
