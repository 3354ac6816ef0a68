"""Resolve: AST -> IR against a model shape and a task signature built by hand."""
from __future__ import annotations

from pathlib import Path

import pytest
import sympy

from circuitlang import ir
from circuitlang.ast_to_ir import resolve, resolve_text, stdlib_modules, verb_patterns
from circuitlang.errors import ResolveError
from circuitlang.sites import ALL, Channel, Embed, Head, Logits, ModelShape, Mlp, Position
from circuitlang.tasks.signature import TaskSignature
from circuitlang.text_to_ast import parse

GPT2 = ModelShape(n_layers=12, n_heads=12, d_model=768, d_head=64, name="gpt2")
ATTN_ONLY = ModelShape(n_layers=4, n_heads=8, d_model=512, d_head=64, has_mlp=False,
                       name="attn-only-4l")
IOI = TaskSignature(
    name="ioi",
    positions=("IO", "S1", "S1+1", "S2", "END"),
    features=("IO", "S", "template", "order"),
    metrics=("logit_diff", "prob_diff", "loss", "kl"),
    default_metric="logit_diff",
    aliases=(("name", "IO"),),
)
END = Position("END")


def hyp(text: str, shape: ModelShape = GPT2, task: TaskSignature = IOI) -> ir.Hypothesis:
    return resolve_text(text, shape, task, filename="t.circ")


def problems(text: str, shape: ModelShape = GPT2) -> list[str]:
    with pytest.raises(ResolveError) as info:
        hyp(text, shape)
    return [d.message for d in info.value.diagnostics]


def test_the_users_sentence_becomes_a_depends_claim():
    h = hyp("head 9.6 moves name to END")
    (claim,) = h.claims
    assert claim == ir.DependsClaim(Head(9, 6), END, (ir.Feature("task", "IO"),))
    assert claim.text == "head 9.6 moves name to END"
    assert claim.verb == "$h moves $x to $p"
    assert (claim.span.line, claim.span.column) == (1, 1)
    assert h.task == "ioi" and h.metric == "logit_diff" and h.model == "gpt2"


def test_groups_expand_to_their_heads():
    h = hyp("group nm = heads 9.9, 9.6\nnm moves IO to END\n")
    assert h.group("nm") == (Head(9, 9), Head(9, 6))
    assert [c.site for c in h.claims] == [Head(9, 9), Head(9, 6)]


def test_inhibits_expands_to_a_claim_and_edges_into_queries():
    h = hyp("group nm = heads 9.9, 9.6\nhead 8.6 inhibits S at END via q of nm\n")
    depends, *edges = h.claims
    assert depends == ir.DependsClaim(Head(8, 6), END, (ir.Feature("task", "S"),))
    assert edges == [
        ir.EdgeClaim(Head(8, 6), Head(9, 9, Channel.Q), END),
        ir.EdgeClaim(Head(8, 6), Head(9, 6, Channel.Q), END),
    ]


def test_attends_to_from_is_defined_through_another_verb():
    (claim,) = hyp("head 9.6 attends to IO from END").claims
    assert claim == ir.DependsClaim(Head(9, 6, Channel.PATTERN), END,
                                    (ir.Feature("position", "IO"),))


def test_copies_and_detects():
    copies, detects = hyp("head 2.2 copies S1 to S1+1\nhead 0.1 detects position(S1) at S2\n"
                          ).claims
    assert copies == ir.DependsClaim(Head(2, 2), Position("S1", 1), (ir.Feature("token", "S1"),))
    assert detects.features == (ir.Feature("position", "S1"),)


def test_core_claims_edges_and_channels():
    h = hyp("5.5 -> 8.6.q at END\nembed -> 0.1.v at S2\nmlp 0 at all depends on token(IO)\n"
            "head 9.6 -> logits at END\n")
    assert h.claims[0] == ir.EdgeClaim(Head(5, 5), Head(8, 6, Channel.Q), END)
    assert h.claims[1] == ir.EdgeClaim(Embed(), Head(0, 1, Channel.V), Position("S2"))
    assert h.claims[2] == ir.DependsClaim(Mlp(0), ALL, (ir.Feature("token", "IO"),))
    assert h.claims[3] == ir.EdgeClaim(Head(9, 6), Logits(), END)


def test_an_edge_into_a_head_without_a_channel_reaches_q_k_and_v():
    h = hyp("5.5 -> 8.6 at END")
    assert [c.receiver.channel for c in h.claims] == [Channel.Q, Channel.K, Channel.V]


def test_group_edges_keep_only_the_pairs_that_can_exist():
    h = hyp("group g = heads 7.1, 9.1\ng -> mlp 8 at END\n")
    assert [(c.sender, c.receiver) for c in h.claims] == [(Head(7, 1), Mlp(8))]


def test_depends_on_nothing():
    (claim,) = hyp("head 3.0 at S2 depends on nothing").claims
    assert claim.features == ()


def test_holes_stay_as_placeholders():
    h = hyp("head ?h moves IO to END\n?s -> ?h.q at END\nmlp ?m at END depends on IO\n")
    assert h.holes() == (ir.Hole("h", "head"), ir.Hole("s", "head"), ir.Hole("m", "mlp"))
    assert h.claims[1] == ir.EdgeClaim(ir.Hole("s", "head"), ir.Hole("h", "head", Channel.Q), END)


def test_a_hole_name_means_one_kind_of_thing():
    assert problems("head ?x at END depends on IO\nmlp ?x at END depends on IO\n") == [
        "hole ?x is used both as a head and as a mlp"]


def test_sweeps_expand_to_site_lists_with_a_grid():
    h = hyp("patch head * at END\npatch head 9.* at END\npatch mlp * at all\n"
            "patch head *.3 at END\npatch heads 9.6, 9.9 at END\n")
    full, layer9, mlps, head3, pair = h.experiments
    assert full.sweep and full.grid == (12, 12) and full.axes == ("layer", "head")
    assert len(full.sites) == 144 and full.sites[13] == Head(1, 1)
    assert layer9.grid == (12,) and layer9.sites[6] == Head(9, 6)
    assert mlps.grid == (12,) and mlps.sites[-1] == Mlp(11) and mlps.position == ALL
    assert head3.axes == ("layer",) and head3.sites[4] == Head(4, 3)
    assert not pair.sweep and pair.grid == () and pair.sites == (Head(9, 6), Head(9, 9))


def test_path_patching_and_ablation():
    h = hyp("ablation mean\npatch 5.5 -> 8.6.q at END\nablate heads 9.6, 9.9 at END\n"
            "ablate mlp 3 with zero\n")
    path, abl, zero = h.experiments
    assert path == ir.PathPatch((Head(5, 5),), (Head(8, 6, Channel.Q),), END)
    assert abl.mode == "mean" and abl.sites == (Head(9, 6), Head(9, 9))
    assert zero == ir.Ablate((Mlp(3),), "zero", ALL)


def test_path_patching_sweep_over_senders():
    (exp,) = hyp("patch head * -> 9.9.q at END").experiments
    assert exp.sweep and exp.grid == (12, 12) and len(exp.senders) == 144


def test_expectations_become_exact_sympy():
    h = hyp("expect recovered >= 0.85\nexpect logit_diff >= 0.8 * clean\n"
            "expect each logit_diff > 0\nexpect abs(scrubbed - clean) <= max(0.5, random)\n")
    agg, ratio, each, fancy = h.expectations
    recovered, clean = sympy.Symbol("recovered"), sympy.Symbol("clean")
    assert (agg.kind, agg.lhs, agg.op, agg.rhs) == ("aggregate", recovered, ">=",
                                                    sympy.Rational(17, 20))
    assert ratio.rhs == sympy.Rational(4, 5) * clean
    assert each.kind == "each" and each.symbols() == ("logit_diff",)
    assert fancy.symbols() == ("clean", "random", "scrubbed")


def test_header_settings():
    h = hyp('cite "Paper A"\ncite "Paper B"\nmetric prob_diff\nablation resample given '
            "template, name\nseed 3\nsamples 50\nreported clean = 3.56\n")
    assert h.citations == ("Paper A", "Paper B")
    assert h.metric == "prob_diff"
    assert h.ablation == ir.Ablation("resample", (ir.Feature("task", "template"),
                                                  ir.Feature("task", "IO")))
    assert (h.seed, h.samples) == (3, 50)
    assert h.reported == (ir.Reported("clean", 3.56),)


def test_every_problem_is_reported_at_once_in_source_order():
    found = problems(
        "metric accuracy\nablation meen\nhead 12.1 moves name to END\nhead 9.6.x at END "
        "depends on IO\nhead 9.6 at ENDD depends on colour\nunknown_group moves IO to END\n"
        "head 9.6 flies to END\nexpect recoverd > 0\n"
    )
    assert found == [
        "unknown metric 'accuracy'",
        "unknown ablation 'meen'",
        "head 12.1 out of range (model has layers 0-11)",
        "unknown channel 'x'",
        "unknown position 'ENDD'",
        "unknown feature 'colour'",
        "unknown group 'unknown_group'",
        "unknown verb `flies to END`",
        "unknown metric 'recoverd'",
    ]


def test_model_specific_checks():
    assert problems("mlp 0 at END depends on IO", ATTN_ONLY) == [
        "model attn-only-4l has no MLPs (attention only)"]
    assert problems("head 3.8 moves IO to END", ATTN_ONLY) == [
        "head 3.8 out of range (model has heads 0-7 in each layer)"]
    assert problems("mlp 12 at END depends on IO") == [
        "mlp 12 out of range (model has layers 0-11)"]


def test_feature_hints_say_what_is_valid():
    with pytest.raises(ResolveError) as info:
        hyp("head 9.6 at END depends on END")
    assert info.value.hint == "END is a position; did you mean token(END) or position(END)?"
    with pytest.raises(ResolveError) as info:
        hyp("head 9.6 at END depends on tmplate")
    assert info.value.hint.startswith("did you mean template?")


def test_declared_twice_and_bad_groups():
    assert problems("metric loss\nmetric kl\n") == ["`metric` is set twice (first on line 1)"]
    assert problems("group g = heads 1.1\ngroup g = heads 1.2\n") == [
        "group g is defined twice"]
    assert problems("group g = mlp 3\n") == ["group g may hold only heads, not mlp 3"]
    assert problems("group head = heads 1.1\n") == [
        "'head' is a keyword and cannot name a group"]


def test_wildcards_only_where_they_sweep():
    assert problems("head * moves IO to END") == ["wildcard head *.* in a claim"]
    assert problems("mlp * at END depends on IO") == ["wildcard `mlp *` in a claim"]
    assert hyp("group layer9 = head 9.*").group("layer9")[11] == Head(9, 11)


def test_edges_must_run_forward():
    assert problems("9.6 -> 5.5.q at END") == [
        "edge head 9.6 -> head 5.5.q is not in the model: head 9.6 is computed after head 5.5.q "
        "reads the residual stream: a head reads only senders of earlier layers"]
    assert problems("resid 3 -> 5.5.q at END") == [
        "resid 3 is not a node of the computational graph: it is the sum of every sender before it"]
    assert problems("logits -> mlp 3 at END") == ["logits cannot send along an edge"]
    assert problems("5.5 -> 8.6.pattern at END") == ["head 8.6.pattern cannot receive an edge"]
    assert hyp("head 3.3 -> mlp 3 at END").claims  # a block's MLP reads its own heads


def test_user_verbs_override_and_extend_the_prelude():
    h = hyp("verb $h moves $x to $p:\n    $h at $p depends on token($x)\n"
            "verb $h relays $x via $g:\n    $h moves $x to END\n    $h -> $g.v at END\n"
            "group g = heads 10.1\nhead 9.6 moves IO to END\nhead 8.8 relays S via g\n")
    moves, relay_depends, relay_edge = h.claims
    assert moves.features == (ir.Feature("token", "IO"),)
    assert relay_depends == ir.DependsClaim(Head(8, 8), END, (ir.Feature("token", "S"),))
    assert relay_edge == ir.EdgeClaim(Head(8, 8), Head(10, 1, Channel.V), END)
    assert relay_edge.verb == "$h relays $x via $g"


def test_the_more_specific_verb_wins():
    h = hyp("verb $h moves name to $p:\n    $h at $p depends on token(IO)\n"
            "head 9.6 moves name to END\nhead 9.9 moves S to END\n")
    assert h.claims[0].features == (ir.Feature("token", "IO"),)
    assert h.claims[1].features == (ir.Feature("task", "S"),)


def test_verb_definition_problems():
    assert problems("verb $h loops:\n    $h loops\nhead 1.1 loops\n") == [
        "verb `$h loops` expands into itself"]
    assert problems("verb $h uses $x:\n    $h at END depends on $y\n") == [
        "unknown verb parameter $y"]
    assert problems("verb $h x:\n    $h at END depends on IO\n"
                    "verb $h x:\n    $h at END depends on S\n") == [
        "verb `$h x` is defined twice"]


def test_verb_arguments_of_the_wrong_kind_point_at_the_use():
    with pytest.raises(ResolveError) as info:
        hyp("head 9.6 moves name to S1+1\nhead 9.6 moves IO to token(END)\n")
    (diag,) = info.value.diagnostics
    assert diag.message == "token(END) is not a position"
    assert (diag.span.line, diag.span.column) == (2, 22)


def test_unknown_verb_hint_names_the_nearest_pattern():
    with pytest.raises(ResolveError) as info:
        hyp("head 9.6 moves name END")
    assert info.value.hint == "verbs starting with that word: `moves $x to $p`; `moves $x from $q to $p`"
    assert "$h moves $x to $p" in verb_patterns()
    with pytest.raises(ResolveError) as info:
        hyp("head 9.6 copies name END")
    assert info.value.hint == "the nearest verb is `copies $x to $p`"


def test_imports(tmp_path: Path):
    assert "stdlib.prelude" in stdlib_modules()
    lib = tmp_path / "mylib.circ"
    lib.write_text("group movers = heads 9.9, 9.6\nverb $h shouts $x:\n"
                   "    $h at END depends on $x\nhead 1.1 moves IO to END\n")
    main = tmp_path / "main.circ"
    main.write_text("use mylib\nmovers shouts IO\n")
    h = resolve(parse(main.read_text(), str(main)), GPT2, IOI)
    assert h.imports == ("mylib",)
    assert h.group("movers") == (Head(9, 9), Head(9, 6))
    # definitions come in; the imported file's own claims do not
    assert [c.site for c in h.claims] == [Head(9, 9), Head(9, 6)]


def test_import_problems(tmp_path: Path):
    with pytest.raises(ResolveError) as info:
        hyp("use stdlib.nope")
    assert info.value.message == "unknown import 'stdlib.nope'"
    assert "stdlib.prelude" in info.value.hint
    (tmp_path / "a.circ").write_text("use b\n")
    (tmp_path / "b.circ").write_text("use a\n")
    with pytest.raises(ResolveError, match="import cycle"):
        resolve(parse("use a\n", str(tmp_path / "main.circ")), GPT2, IOI)
    (tmp_path / "bad.circ").write_text("group g = heads 99.1\n")
    with pytest.raises(ResolveError) as info:
        resolve(parse("use bad\n", str(tmp_path / "main.circ")), GPT2, IOI)
    assert info.value.message.startswith("cannot import bad: head 99.1 out of range")


def test_to_json_is_plain_data():
    import json

    h = hyp("group g = heads 9.6\nhead ?h moves IO to END\ng moves IO to END\n"
            "patch head 9.* at END\nexpect recovered >= 0.85\n")
    data = json.loads(json.dumps(h.to_json()))
    assert data["groups"] == {"g": [{"kind": "head", "layer": 9, "head": 6,
                                     "channel": "out", "text": "head 9.6"}]}
    assert data["claims"][1]["site"]["text"] == "head 9.6"
    assert data["claims"][1]["features"] == [{"kind": "task", "name": "IO", "text": "IO"}]
    assert data["experiments"][0]["grid"] == [12]
    assert data["expectations"][0]["rhs"] == "17/20"
    assert data["holes"][0]["name"] == "h"


def test_overrides_beat_the_file():
    h = resolve(parse("model gpt2\ntask ioi\nhead 9.6 moves name to END\n"), GPT2, IOI,
                model="my-gpt2")
    assert h.model == "my-gpt2"


def test_missing_model_and_task_are_both_reported():
    with pytest.raises(ResolveError) as info:
        resolve(parse("head 9.6 moves name to END"))
    assert [d.message for d in info.value.diagnostics] == [
        "no model: the file has no `model` line", "no task: the file has no `task` line"]


# ---------------------------------------------------------------------------------
# Every file in stdlib/ and examples/ parses, prints canonically and resolves.
# Globbed, so files added later are covered without touching this test.

REPO = Path(__file__).resolve().parent.parent
CIRC_FILES = sorted((REPO / "stdlib").glob("*.circ")) + sorted((REPO / "examples").rglob("*.circ"))
# Files written for a model that is not GPT-2-shaped, and that shape.
OTHER_SHAPES = {"docstring.circ": ATTN_ONLY}


def _gpt2_small_shape() -> ModelShape:
    from transformers import GPT2Config

    config = GPT2Config()  # GPT-2 small's configuration; no weights
    return ModelShape(n_layers=config.n_layer, n_heads=config.n_head, d_model=config.n_embd,
                      d_head=config.n_embd // config.n_head, vocab_size=config.vocab_size,
                      n_ctx=config.n_positions, architecture="gpt2", name="gpt2")


def _signature(program) -> TaskSignature:
    from circuitlang import tasks

    names = [s.name for s in program.statements if type(s).__name__ == "TaskDecl"]
    return tasks.get_signature(names[0]) if names else IOI


def test_there_are_files_to_check():
    names = {p.name for p in CIRC_FILES}
    assert {"prelude.circ", "name_movers.circ", "induction.circ"} <= names


@pytest.mark.parametrize("path", CIRC_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_stdlib_and_example_files_parse_and_resolve(path: Path):
    from circuitlang.printer import format

    text = path.read_text()
    program = parse(text, str(path))
    assert parse(format(program)) == program
    shape = OTHER_SHAPES.get(path.name) or _gpt2_small_shape()
    hypothesis = resolve(program, shape, _signature(program), source=text)
    if path.name != "prelude.circ":
        assert hypothesis.claims or hypothesis.experiments, f"{path.name} claims nothing"


def test_the_examples_hold_the_users_sentence_verbatim():
    text = (REPO / "examples" / "ioi" / "name_movers.circ").read_text()
    assert "head 9.6 moves name to END\n" in text


@pytest.mark.parametrize("path", [p for p in CIRC_FILES if p.name != "prelude.circ"],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_files_resolve_against_the_model_they_name(path: Path):
    """Every circuit and example names its model; the prelude (verbs only) names none."""
    program = parse(path.read_text(), str(path))
    names = [s.name for s in program.statements if type(s).__name__ == "ModelDecl"]
    assert names, f"{path.name} names no model"
    hypothesis = resolve(program, source=path.read_text())
    assert hypothesis.model == names[0]
