"""`patch SITE at P denoise`: the syntax reaches the experiments' `direction="denoise"` and
gives its numbers; `noise` is the default written out; the direction survives printing,
resolving and the IR's way back to a program; the numbers point as docs/language.md says."""
from __future__ import annotations

import numpy as np
import pytest

import circuitlang
from circuitlang import ast, ir
from circuitlang.ast_to_ir import resolve_text
from circuitlang.checker import load_hypothesis, prepare
from circuitlang.errors import ParseError
from circuitlang.experiments import Experiments
from circuitlang.ir_to_ast import ir_to_ast
from circuitlang.sites import Head, ModelShape, Position
from circuitlang.tasks.signature import TaskSignature

TOY = "model toy-ioi\ntask ioi prepend_bos=false\n"
SHAPE = ModelShape(n_layers=3, n_heads=4, d_model=8, d_head=2, name="toy")
IOI = TaskSignature(name="ioi", positions=("IO", "S1", "S1+1", "S2", "END"), features=("IO", "S"),
                    metrics=("logit_diff",), default_metric="logit_diff")


def test_the_direction_word_parses_prints_and_resolves():
    program = circuitlang.parse("task ioi\npatch head * at END denoise\npatch head 1.* at S1+1 noise\n"
                                "patch heads 1.0, 1.1 at END\n")
    patches = program.statements[1:]
    assert [p.direction for p in patches] == ["denoise", "noise", None]
    assert circuitlang.format(program).splitlines()[1:] == [
        "patch head * at END denoise", "patch head 1.* at S1+1 noise", "patch heads 1.0, 1.1 at END"]
    assert circuitlang.parse(circuitlang.format(program)) == program
    hypothesis = resolve_text(circuitlang.format(program), SHAPE, IOI)
    assert [e.direction for e in hypothesis.experiments] == ["denoise", "noise", "noise"]
    assert hypothesis.experiments[0].text == "patch head * at END denoise"
    back = [s for s in ir_to_ast(hypothesis).statements if isinstance(s, ast.Patch)]
    assert [p.direction for p in back] == ["denoise", None, None]


def test_a_wrong_direction_word_is_a_parse_error_at_the_word():
    with pytest.raises(ParseError) as info:
        circuitlang.parse("task ioi\npatch head * at END denoised\n", "f.circ")
    text = info.value.render()
    assert text.startswith("f.circ:2:21: error: unknown patching direction 'denoised'")
    assert "did you mean denoise?" in text
    with pytest.raises(ParseError):  # path patching has no direction word
        circuitlang.parse("task ioi\npatch 0.1 -> 1.0.q at END denoise\n")


@pytest.fixture(scope="module")
def toy():
    text = TOY + "patch head * at END denoise\npatch head * at END noise\npatch head * at END\n"
    hypothesis, _ = load_hypothesis(text)
    setup = prepare(hypothesis, n=12)
    return hypothesis, setup


def test_the_syntax_gives_the_python_directions_numbers(toy):
    hypothesis, setup = toy
    from circuitlang.checker import run_experiments

    denoised, noised, default = run_experiments(hypothesis, setup)
    runner = Experiments(setup.model, setup.task, setup.prompts, setup.metric)
    heads = [Head(l, h) for l in range(3) for h in range(4)]
    for direction, got in (("denoise", denoised), ("noise", noised)):
        want = runner.activation_patching(heads, Position("END"), direction=direction, grid=(3, 4))
        assert got.direction == direction
        np.testing.assert_array_equal(got.per_prompt, want.per_prompt)
        np.testing.assert_array_equal(got.normalized, want.normalized)
    np.testing.assert_array_equal(default.per_prompt, noised.per_prompt)
    assert not np.allclose(denoised.values, noised.values)  # the two directions measure different things
    assert "denoise" in repr(denoised) and got.clean == denoised.clean


def test_denoising_points_from_no_effect_to_the_whole_effect():
    """Denoising: 1 when the patch restores the clean metric (the final residual stream at
    END), 0 when it changes nothing (the embedding of a token the corruption keeps)."""
    whole, nothing = circuitlang.run(TOY + "patch resid 3 at END denoise\npatch embed at S1+1 denoise\n", n=12)
    assert whole.direction == nothing.direction == "denoise"
    assert whole.values[0] == pytest.approx(whole.clean, abs=1e-4)
    assert whole.normalized[0] == pytest.approx(1.0, abs=1e-6)
    assert nothing.values[0] == pytest.approx(nothing.corrupt, abs=1e-4)
    assert nothing.normalized[0] == pytest.approx(0.0, abs=1e-6)


def test_the_ir_patch_defaults_to_noising():
    patch = ir.Patch((Head(0, 0),), Position("END"))
    assert patch.direction == "noise"
