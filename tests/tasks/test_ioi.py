"""IOI with the real GPT-2 tokenizer: templates, positions, names, the ABC counterfactual."""
from __future__ import annotations

import pytest

from circuitlang.errors import TaskError
from circuitlang.tasks import get_signature, load_task
from circuitlang.tasks.ioi import (ABBA_TEMPLATES, BABA_TEMPLATES, NAMES, OBJECTS,
                                   PLACES, IOISpec)


def test_paper_templates_and_signature():
    assert len(BABA_TEMPLATES) == len(ABBA_TEMPLATES) == 15
    for abba, baba in zip(ABBA_TEMPLATES, BABA_TEMPLATES):
        # ABBA names IO first, BABA names S first; both end "... [B] ... [A]".
        assert abba.index("[A]") < abba.index("[B]")
        assert baba.index("[B]") < baba.index("[A]")
        assert abba.endswith("[A]") and baba.endswith("[A]")
        assert abba.count("[B]") == baba.count("[B]") == 2
    sig = get_signature("ioi")
    assert sig.positions == ("IO", "S1", "S1+1", "S2", "END")
    assert {"IO", "S", "template", "order"} <= set(sig.features)
    assert sig.canonical_feature("name") == "IO"
    assert sig.default_metric == "logit_diff"
    assert set(sig.metrics) == {"logit_diff", "prob_diff", "loss", "kl"}


def test_spec_text_and_features():
    spec = IOISpec(template=0, order="ABBA", io="Mary", s="John", place="store", obj="drink")
    assert spec.text == "Then, Mary and John went to the store. John gave a drink to"
    baba = IOISpec(template=0, order="BABA", io="Mary", s="John", place="store", obj="drink")
    assert baba.text == "Then, John and Mary went to the store. John gave a drink to"
    assert spec.feature("IO") == "Mary" and spec.feature("S") == "John"
    assert spec.feature("order") == "ABBA" and spec.feature("template") == 0
    with pytest.raises(TaskError, match="valid features"):
        spec.feature("colour")


@pytest.mark.parametrize("order", ["ABBA", "BABA"])
def test_positions_point_at_the_right_tokens_for_every_template(gpt2_tokenizer, order):
    task = load_task("ioi", gpt2_tokenizer)
    specs = [IOISpec(template=t, order=order, io="Mary", s="John", place=PLACES[t % 8],
                     obj=OBJECTS[t % 8]) for t in range(15)]
    prompts = task.build(specs)
    assert prompts.dropped.count == 0
    tok = gpt2_tokenizer
    for i, spec in enumerate(prompts.specs):
        ids = prompts.input_ids[i].tolist()

        def at(name):
            return tok.decode([ids[int(prompts.positions[name][i])]])

        assert at("IO") == " Mary"
        assert at("S1") == " John"
        assert at("S2") == " John"
        assert int(prompts.positions["S1"][i]) < int(prompts.positions["S2"][i])
        if order == "ABBA":
            assert int(prompts.positions["IO"][i]) < int(prompts.positions["S1"][i])
        else:
            assert int(prompts.positions["S1"][i]) < int(prompts.positions["IO"][i])
        assert int(prompts.positions["S1+1"][i]) == int(prompts.positions["S1"][i]) + 1
        # END is the last real token and the prompt ends there ("... to").
        end = int(prompts.positions["END"][i])
        assert end == int(prompts.attention_mask[i].sum()) - 1
        assert at("END") == " to"
        assert ids[0] == tok.bos_token_id  # BOS prepended, as TransformerLens does
        assert tok.decode(ids[1:end + 1]) == spec.text
        assert prompts.answers[i].tolist() == [tok.encode(" Mary")[0]]
        assert prompts.wrong_answers[i].tolist() == [tok.encode(" John")[0]]


def test_all_paper_names_are_single_tokens_for_gpt2(gpt2_tokenizer):
    task = load_task("ioi", gpt2_tokenizer)
    assert task.dropped_names == ()
    assert task.names == NAMES


def test_single_token_filtering_reports_dropped_names(gpt2_tokenizer):
    names = ["Mary", "John", "Xylophonia", "Anna", "Paul", "Bartholomew", "Kate"]
    task = load_task("ioi", gpt2_tokenizer, names=names)
    for name in task.dropped_names:
        assert len(gpt2_tokenizer.encode(" " + name)) > 1
    assert "Xylophonia" in task.dropped_names
    assert set(task.names) == {"Mary", "John", "Anna", "Paul", "Kate"}
    prompts = task.prompts(20)
    for spec in prompts.specs + prompts.corrupt_specs:
        assert spec.io in task.names and spec.s in task.names


def test_a_multi_token_name_is_dropped_with_a_reason_never_misaligned(gpt2_tokenizer):
    task = load_task("ioi", gpt2_tokenizer)
    good = IOISpec(template=0, order="ABBA", io="Mary", s="John")
    bad = IOISpec(template=0, order="ABBA", io="Xylophonia", s="John")
    prompts = task.build([good, bad])
    assert len(prompts) == 1 and prompts.specs == (good,)
    assert prompts.dropped.count == 1
    text, reason = prompts.dropped.reasons[0]
    assert text == bad.text and "IO 'Xylophonia' is" in reason and "not one" in reason
    with pytest.raises(TaskError, match="all 1 prompt"):
        task.build([bad])


def test_abc_counterfactual_aligns(gpt2_tokenizer):
    task = load_task("ioi", gpt2_tokenizer, n=40, seed=3)
    prompts = task.prompts()
    assert prompts.corrupt_input_ids.shape == prompts.input_ids.shape
    assert (prompts.corrupt_attention_mask == prompts.attention_mask).all()
    for clean, corrupt in zip(prompts.specs, prompts.corrupt_specs):
        names = {corrupt.io, corrupt.s, corrupt.s2}
        assert len(names) == 3  # A, B, C all distinct
        assert not names & {clean.io, clean.s}
        assert (corrupt.template, corrupt.order, corrupt.place, corrupt.obj) == (
            clean.template, clean.order, clean.place, clean.obj)
    # Outside the three name slots, clean and corrupt tokens agree.
    diff = (prompts.corrupt_input_ids != prompts.input_ids)
    for i in range(len(prompts)):
        slots = {int(prompts.positions[p][i]) for p in ("IO", "S1", "S2")}
        assert set(diff[i].nonzero().flatten().tolist()) <= slots


def test_sampling_is_deterministic_and_respects_parameters():
    task = load_task("ioi", n=30, seed=1, template_set="BABA", templates=[2, 5])
    specs = task.sample()
    assert specs == task.sample()
    assert specs != task.sample(seed=2)
    assert {s.order for s in specs} == {"BABA"}
    assert {s.template for s in specs} <= {2, 5}
    assert all(s.io != s.s for s in specs)


@pytest.mark.parametrize("params, fragment", [
    ({"template_set": "AABB"}, "template_set must be one of"),
    ({"templates": [15]}, "templates must be indices 0-14"),
    ({"corruption": "flip"}, "valid values of corruption: abc"),
    ({"colour": 1}, "valid parameters:"),
    ({"n": 0}, "n must be a positive integer"),
    ({"names": ["Mary", "John"]}, "at least 4 single-token names"),
])
def test_bad_parameters_say_what_is_valid(params, fragment):
    with pytest.raises(TaskError, match=fragment):
        load_task("ioi", **params)


def test_without_a_tokenizer_specs_and_texts_work_but_not_ids():
    task = load_task("ioi")
    specs = task.sample(5)
    assert all(s.text.endswith(" to") for s in specs)
    with pytest.raises(TaskError, match="without a tokenizer"):
        task.build(specs)
