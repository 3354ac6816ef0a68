"""Every stdlib circuit parses, resolves against its model's shape built from a config,
and runs end to end through the checker on a model of that shape."""
from __future__ import annotations

import re

import pytest

from circuitlang.resources import stdlib_dir

CIRCUITS = sorted(p.name for p in stdlib_dir().glob("*.circ") if p.name != "prelude.circ")
#: How each file's model line is built from a config (layers, heads) for the tests.
SHAPES = {"gpt2": (12, 12), "attn-only-4l": (4, 8)}
#: Circuits for the embedded toy models run on the toys themselves, once trained.
TOYS = ("toy-induction", "toy-ioi")


def _source(name):
    return (stdlib_dir() / name).read_text()


def _header(name, key):
    match = re.search(rf"^{key} (\S+)", _source(name), re.M)
    return match.group(1) if match else None


def test_the_stdlib_has_the_published_circuits():
    assert {"ioi.circ", "greater_than.circ", "greater_than_acdc.circ", "docstring.circ",
            "induction.circ", "gendered_pronoun.circ"} <= set(CIRCUITS)


@pytest.mark.parametrize("name", CIRCUITS)
def test_circuit_parses_cites_and_flags_uncertainty(name):
    import circuitlang

    source = _source(name)
    circuitlang.parse(source, filename=name)
    assert re.search(r'^cite ".+\d{4}', source, re.M), "every circuit cites its paper"
    assert _header(name, "model") in set(SHAPES) | set(TOYS) and _header(name, "task")
    assert re.search(r"(?i)uncertain", source), "uncertain components are marked"


def test_ioi_circuit_has_all_seven_classes_and_the_paper_numbers():
    import circuitlang

    program_text = _source("ioi.circ")
    for heads in ("9.9, 9.6, 10.0", "9.0, 9.7, 10.1, 10.2, 10.6, 10.10, 11.2, 11.9",
                  "10.7, 11.10", "7.3, 7.9, 8.6, 8.10", "5.5, 5.8, 5.9, 6.9",
                  "0.1, 0.10, 3.0", "2.2, 4.11"):
        assert f"heads {heads}\n" in program_text
    assert "reported clean = 3.56" in program_text
    assert "reported faithfulness = 0.87" in program_text
    circuitlang.parse(program_text)


def _shape(model_line):
    import transformers as tf

    from circuitlang.models.adapters import shape_from_config

    layers, heads = SHAPES[model_line]
    if model_line == "gpt2":
        config = tf.GPT2Config()  # GPT-2 small's published configuration
    else:
        config = tf.GPT2Config(n_layer=layers, n_head=heads, n_embd=512, vocab_size=48262)
    return shape_from_config(config, model_line)


def _toy_or_skip(model_line):
    from circuitlang.models import toy_names

    assert model_line in toy_names(), f"{model_line} is not an embedded model"


@pytest.mark.parametrize("name", CIRCUITS)
def test_circuit_resolves_against_a_shape_built_from_a_config(name):
    from circuitlang.ast_to_ir import resolve_text
    from circuitlang.models import known_shape

    model_line = _header(name, "model")
    if model_line in TOYS:
        _toy_or_skip(model_line)
        shape = known_shape(model_line)
    else:
        shape = _shape(model_line)
    hypothesis = resolve_text(_source(name), shape=shape, filename=name)
    assert hypothesis.claims


@pytest.fixture(scope="session")
def narrow_models(gpt2_tokenizer):
    """Random-init GPT-2 models with the stdlib's layer x head shapes, narrow residual."""
    import torch
    import transformers as tf

    from circuitlang.models import LoadedModel

    torch.manual_seed(0)
    out = {}
    for line, (layers, heads) in SHAPES.items():
        config = tf.GPT2Config(n_layer=layers, n_head=heads, n_embd=4 * heads,
                               n_positions=128, vocab_size=len(gpt2_tokenizer))
        out[line] = LoadedModel.from_hf(tf.GPT2LMHeadModel(config).eval(),
                                        tokenizer=gpt2_tokenizer, name=line)
    return out


def _check(name, models):
    import circuitlang

    model = models[_header(name, "model")] if models is not None else None
    result = circuitlang.check(str(stdlib_dir() / name), model=model, n=4, permutations=0,
                               breakdown=False, max_examples=3, progress=False)
    assert result.n == 4
    assert result.task == _header(name, "task")
    assert len(result.expectations) == _source(name).count("\nexpect ")
    return result


def test_gendered_pronoun_circuit_runs_end_to_end(narrow_models):
    result = _check("gendered_pronoun.circ", narrow_models)
    assert result.clean.value == result.clean.value  # a number, not NaN


@pytest.mark.parametrize("name", [c for c in CIRCUITS if c.startswith("toy_")])
def test_toy_circuit_runs_end_to_end_on_its_toy(name):
    _toy_or_skip(_header(name, "model"))
    _check(name, None)


@pytest.mark.slow
@pytest.mark.parametrize("name", [c for c in CIRCUITS
                                  if c != "gendered_pronoun.circ" and not c.startswith("toy_")])
def test_circuit_runs_end_to_end(narrow_models, name):
    _check(name, narrow_models)
