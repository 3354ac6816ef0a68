"""Every task's hypothesis strategies: valid prompts, shrinking, feature agreement."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, find, given, settings

from circuitlang.errors import TaskError
from circuitlang.tasks import load_task

PARAMS = {"ioi": {}, "greater_than": {}, "docstring": {}, "gendered_pronoun": {},
          "induction": {"length": 6}}
FAST = settings(max_examples=15, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tasks(gpt2_tokenizer):
    return {name: load_task(name, gpt2_tokenizer, **params) for name, params in PARAMS.items()}


@pytest.mark.parametrize("name", list(PARAMS))
def test_strategy_generates_valid_prompts(tasks, name):
    task = tasks[name]

    @FAST
    @given(task.strategy())
    def check(spec):
        prompts = task.build([spec])
        assert prompts.dropped.count == 0, prompts.dropped.summary()
        assert prompts.specs == (spec,)

    check()


def test_ioi_shrinks_to_the_simplest_prompt(tasks):
    task = tasks["ioi"]
    simplest = find(task.strategy(), lambda s: True, settings=FAST)
    assert (simplest.template, simplest.order) == (0, "ABBA")
    assert (simplest.io, simplest.s) == (task.names[0], task.names[1])
    assert (simplest.place, simplest.obj) == (task.places[0], task.objects[0])
    later = find(task.strategy(), lambda s: s.template >= 6 and s.order == "BABA",
                 settings=FAST)
    assert (later.template, later.io, later.s) == (6, task.names[0], task.names[1])


@pytest.mark.parametrize("name", ["greater_than", "docstring", "gendered_pronoun", "induction"])
def test_other_tasks_shrink_to_their_first_choices(tasks, name):
    task = tasks[name]
    simplest = find(task.strategy(), lambda s: True, settings=FAST)
    if name == "greater_than":
        xx = task.centuries[0]
        assert (simplest.noun, simplest.xx, simplest.yy) == (task.nouns[0], xx, task.valid[xx][0])
    elif name == "docstring":
        assert simplest.args[:3] == task.words[:3] and simplest.fn == task.words[0]
    elif name == "gendered_pronoun":
        assert (simplest.gender, simplest.name) == ("male", task.names["male"][0])
    else:
        assert simplest.tokens[:2] == task.candidates[:2]


AGREE = {
    "ioi": ["IO", "S", "template", "order", "name", "token(IO)", "token(S2)", "position(S2)"],
    "greater_than": ["YY", "XX", "noun", "year", "token(YY)", "position(END)"],
    "docstring": ["A", "B", "C", "answer", "token(C_def)", "position(END)"],
    "gendered_pronoun": ["name", "gender", "token(NAME)"],
    "induction": ["next", "last", "tokens", "token(END)", "token(PREV+1)"],
}


@pytest.mark.parametrize("name", list(AGREE))
def test_resamples_agree_on_what_they_are_asked_to(tasks, name):
    task = tasks[name]
    base = task.prompts(3, seed=5)
    for i, spec in enumerate(base.specs):
        for feature in AGREE[name]:
            @FAST
            @given(task.resample_strategy(spec, (feature,)))
            def check(other):
                both = task.build([spec, other])
                assert both.dropped.count == 0
                assert both.feature(feature)[0] == both.feature(feature)[1], feature

            check()


def test_a_resample_agreeing_on_io_is_free_elsewhere(tasks):
    task = tasks["ioi"]
    spec = task.sample(1, seed=9)[0]
    strategy = task.resample_strategy(spec, ("IO",))
    other = find(strategy, lambda r: r.s != spec.s and r.template != spec.template,
                 settings=FAST)
    assert other.io == spec.io
    same_s = task.resample_strategy(spec, ("IO", "S"))
    assert find(same_s, lambda r: True, settings=FAST).s == spec.s


def test_unknown_agreement_features_say_what_is_valid(tasks):
    task = tasks["ioi"]
    spec = task.sample(1)[0]
    with pytest.raises(TaskError, match="valid features: IO, S, template"):
        task.resample_strategy(spec, ("colour",))
    with pytest.raises(TaskError, match="token\\(P\\) is defined for P in"):
        task.resample_strategy(spec, ("token(XYZ)",))
