"""Property tests for the language: print/parse round trips and total error handling.

* random ASTs print, and re-parse to an equal AST; printing is idempotent;
* random text, and text generated from the grammar itself, only ever raises
  `CircuitlangError` (from parse, and from resolve when it parses);
* formatting any program that parses is idempotent.
"""
from __future__ import annotations

import os
import string
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.lark import from_lark

import circuitlang
from circuitlang import ast
from circuitlang.ast_to_ir import resolve
from circuitlang.errors import CircuitlangError
from circuitlang.sites import ModelShape
from circuitlang.tasks.signature import TaskSignature
from circuitlang.text_to_ast import KEYWORDS, grammar

GPT2 = ModelShape(n_layers=12, n_heads=12, d_model=768, d_head=64, name="gpt2")
IOI = TaskSignature(
    name="ioi",
    positions=("IO", "S1", "S1+1", "S2", "END"),
    features=("IO", "S", "template", "order"),
    metrics=("logit_diff", "prob_diff", "loss", "kl"),
    default_metric="logit_diff",
    aliases=(("name", "IO"),),
)
# More examples for a long bug hunt: CIRCUITLANG_PROPERTY_EXAMPLES=2000 pytest ...
EXAMPLES = int(os.environ.get("CIRCUITLANG_PROPERTY_EXAMPLES", "60"))
FAST = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ------------------------------------------------------------------ strategies

names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True).filter(
    lambda n: n not in KEYWORDS)
small = st.integers(0, 40)
channels = st.none() | st.sampled_from(["q", "k", "v", "out", "pattern", "zz"])
comment_text = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")),
                       max_size=20).map(str.rstrip)
plain_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), max_size=30)
decimals = st.decimals(min_value=0, max_value=10**6, allow_nan=False, allow_infinity=False,
                       places=3)

head_refs = st.builds(ast.HeadRef, small, small, channels)
wild_refs = st.builds(ast.HeadRef, st.none() | small, st.none() | small, channels)
holes = st.builds(ast.Hole, names, channels)
positions = st.builds(ast.PositionRef, names, st.integers(-3, 3))
features = st.builds(ast.FeatureRef, names) | st.builds(
    ast.FeatureRef, st.sampled_from(["token", "position"]), positions)


def targets(slot_names=st.nothing(), wild=False):
    refs = wild_refs if wild else head_refs
    options = [
        st.builds(ast.HeadTarget, refs | holes),
        st.builds(lambda r: ast.HeadTarget(r, keyword=False), refs | holes),
        st.builds(ast.HeadsTarget, st.lists(head_refs | holes, min_size=1, max_size=3)
                  .map(tuple)),
        st.builds(ast.MlpTarget, small | st.builds(ast.Hole, names) | st.none()),
        st.builds(ast.ResidTarget, small),
        st.builds(ast.EmbedTarget),
        st.builds(ast.LogitsTarget),
        st.builds(ast.GroupTarget, names, channels),
        st.builds(ast.FeatureTarget, names, small | st.builds(ast.Hole, names) | st.none()),
        st.builds(ast.FeaturesTarget, st.lists(st.builds(ast.FeatureTarget, names, small | st.builds(ast.Hole, names)),
                                               min_size=1, max_size=3).map(tuple)),
        st.builds(ast.NeuronsTarget, st.lists(st.builds(ast.HeadRef, small, small), min_size=1, max_size=3)
                  .map(tuple)),
    ]
    slot_targets = st.builds(ast.SlotTarget, slot_names,
                             st.none() | st.sampled_from(["q", "v"]) | slot_names.map(
                                 lambda n: "$" + n))
    return st.one_of(*options, slot_targets)


terms = st.one_of(
    st.builds(ast.Word, names | st.just("at")),
    st.builds(ast.PositionRef, names, st.integers(1, 3) | st.integers(-3, -1)),
    st.builds(ast.FeatureRef, st.sampled_from(["token", "position"]), positions),
    head_refs,
    holes,
)

exprs = st.recursive(
    st.builds(ast.Number, decimals) | st.builds(ast.Name, names),
    lambda inner: st.one_of(
        st.builds(ast.BinOp, st.sampled_from("+-*/"), inner, inner),
        st.builds(ast.Neg, inner),
        st.builds(ast.Call, st.sampled_from(["abs", "min", "max"]),
                  st.lists(inner, min_size=1, max_size=3).map(tuple)),
    ),
    max_leaves=8,
)
trivia = st.builds(ast.Trivia, st.lists(comment_text | st.none(), max_size=2).map(tuple),
                   st.none() | comment_text, st.booleans())
model_names = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.\-/]{0,12}", fullmatch=True) | plain_text


def claims(slot_names=st.nothing()):
    slot_pos = st.builds(ast.Slot, slot_names)
    pos = positions | slot_pos
    feats = features | st.builds(ast.Slot, slot_names) | st.builds(
        ast.FeatureRef, st.sampled_from(["token", "position"]), slot_pos)
    t = targets(slot_names)
    return st.one_of(
        st.builds(ast.Depends, t, pos, st.lists(feats, max_size=3).map(tuple), trivia=trivia),
        st.builds(ast.Edge, t, t, pos, trivia=trivia),
        st.builds(ast.VerbUse, t, names,
                  st.lists(terms | st.builds(ast.Slot, slot_names), max_size=4).map(tuple),
                  trivia=trivia),
    )


@st.composite
def verb_defs(draw):
    params = draw(st.lists(names, min_size=1, max_size=4, unique=True))
    subject, rest = params[0], params[1:]
    words = [ast.Word(draw(names))]
    for p in rest:
        words.append(ast.Slot(p))
        if draw(st.booleans()):
            words.append(ast.Word(draw(names | st.just("at"))))
    body = draw(st.lists(claims(st.sampled_from(params)), min_size=1, max_size=3))
    return ast.VerbDef(subject, tuple(words), tuple(body), trivia=draw(trivia))


statements = st.one_of(
    st.builds(ast.Cite, plain_text, trivia=trivia),
    st.builds(ast.ModelDecl, model_names, trivia=trivia),
    st.builds(ast.TaskDecl, model_names.filter(lambda n: n[:1].isalnum() or n[:1] == "_")
              .filter(lambda n: all(c.isalnum() or c in "_.-/" for c in n) and n.isascii())),
    st.builds(ast.Use, st.lists(names, min_size=1, max_size=3).map(tuple)),
    st.builds(ast.MetricDecl, names),
    st.builds(ast.AblationDecl, names, st.lists(features, max_size=2).map(tuple)),
    st.builds(ast.SemanticsDecl, names),
    st.builds(ast.Reported, names, st.decimals(min_value=-10**12, max_value=10**12,
                                               allow_nan=False, allow_infinity=False,
                                               places=4)),
    st.builds(ast.Setting, st.sampled_from(["seed", "samples"]), st.integers(0, 10**6)),
    st.builds(ast.GroupDef, names, targets(wild=True)),
    claims(),
    verb_defs(),
    st.builds(ast.Patch, targets(wild=True), positions),
    st.builds(ast.PathPatch, targets(wild=True), targets(), positions),
    st.builds(ast.Ablate, targets(wild=True), st.none() | names, st.none() | positions),
    st.builds(ast.Expect, st.booleans(), exprs, st.sampled_from([">=", "<=", ">", "<", "==",
                                                                 "!="]), exprs, trivia=trivia),
    # hole constraints: `?s in layers 7-8`, `?s in layer 5`, `?s in heads 9.6, 9.*`,
    # `?g has at most 4 heads`
    st.builds(ast.HoleIn, st.builds(ast.Hole, names),
              st.lists(st.tuples(small, small), min_size=1, max_size=3).map(tuple), trivia=trivia),
    st.builds(ast.HoleIn, st.builds(ast.Hole, names), st.just(()),
              st.lists(wild_refs, min_size=1, max_size=3).map(tuple), trivia=trivia),
    st.builds(ast.HoleSize, st.builds(ast.Hole, names), st.sampled_from(ast.SIZE_BOUNDS), small,
              st.sampled_from(["heads", "features"]), trivia=trivia),
)
programs = st.builds(ast.Program, st.lists(statements, max_size=8).map(tuple),
                     st.lists(comment_text, max_size=2).map(tuple))


# ------------------------------------------------------------------ properties


@FAST
@given(programs)
def test_random_asts_print_and_reparse_equal(program):
    text = circuitlang.format(program)
    reparsed = circuitlang.parse(text)
    assert reparsed == program
    assert circuitlang.format(reparsed) == text


@FAST
@given(programs)
def test_resolving_random_programs_raises_only_circuitlang_errors(program):
    try:
        resolve(program, GPT2, IOI)
    except CircuitlangError:
        pass


@FAST
@given(st.text(max_size=80))
def test_random_text_raises_only_circuitlang_errors(text):
    try:
        program = circuitlang.parse(text)
    except CircuitlangError:
        return
    assert circuitlang.parse(circuitlang.format(program)) == program


line_pieces = st.sampled_from(
    ["head", "heads", "9.6", "8.10", " ", " ", "at", "END", "S1+1", "->", "moves", "name",
     "to", "?h", "$x", "verb", ":", "\n", "\n    ", "expect", ">=", "0.85", "(", ")", "*",
     "#", '"', "depends", "on", "token(IO)", ",", "group", "=", "patch", "mlp", "\t",
     "in", "layers", "layer", "7-8", "has", "most", "least", "exactly", "4"])


@FAST
@given(st.lists(line_pieces, max_size=25).map("".join))
def test_token_soup_raises_only_circuitlang_errors(text):
    try:
        program = circuitlang.parse(text)
    except CircuitlangError:
        return
    try:
        resolve(program, GPT2, IOI)
    except CircuitlangError:
        pass


def _grammar_text():
    explicit = {
        "_INDENT": st.just("\n    "),
        "_DEDENT": st.just("\n"),
        "_NL": st.sampled_from(["\n", "  # note\n", "\n\n"]),
        "WS_INLINE": st.just(" "),
    }
    return from_lark(grammar(), explicit=explicit)


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.filter_too_much])
@given(st.data())
def test_grammar_generated_text_raises_only_circuitlang_errors(data):
    # from_lark joins terminals without the ignored whitespace between them, so the
    # text is often not a program; it must still fail only with a CircuitlangError.
    text = data.draw(_grammar_text())
    try:
        program = circuitlang.parse(text)
    except CircuitlangError:
        return
    assert circuitlang.parse(circuitlang.format(program)) == program
    try:
        resolve(program, GPT2, IOI)
    except CircuitlangError:
        pass


@FAST
@given(programs)
def test_formatting_is_idempotent(program):
    once = circuitlang.format(program)
    twice = circuitlang.format(circuitlang.parse(once))
    assert twice == once


def test_identifier_alphabet_is_ascii():
    # the grammar's names are ASCII; the strategies above must stay inside it
    assert set(string.ascii_letters) <= set(string.printable)
    assert Decimal("0.850") == Decimal("0.85")
