"""A check's JSON holds the whole result: `CheckResult.from_json(r.to_json())` renders the
same report, on real check runs of the embedded toy models (claims breakdown, permutation
p-values, counterexamples, experiments, remainder lists, notes)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import circuitlang
from circuitlang.experiments import ExperimentResult, site_from_text
from circuitlang.report import CheckResult
from circuitlang.sites import Channel, Embed, Head, Logits, Mlp, MlpIn, Resid

ROOT = Path(__file__).resolve().parents[1]

# the toy IOI circuit, a per-prompt expectation it fails on some prompts (a counterexample),
# and one experiment of each kind: a head sweep, sites patched together, a path patching
# sweep (rows with no path are NaN) and an ablation
IOI = (ROOT / "stdlib" / "toy_ioi.circ").read_text() + """
expect each logit_diff > 13
patch head * at END
patch heads 1.0, 1.1 at END
patch head * -> 1.0.q at END
ablate heads 1.0, 1.1 with mean at END
"""


@pytest.fixture(scope="module")
def runs():
    ioi = circuitlang.check(IOI, n=16, permutations=5, max_examples=3,
                            task_params={"prepend_bos": False})
    induction = circuitlang.check(ROOT / "examples" / "induction" / "induction.circ", n=12,
                                  permutations=5, max_examples=3)
    return {"ioi": ioi, "induction": induction}


def _round_trip(result: CheckResult) -> CheckResult:
    text = json.dumps(result.to_json(), allow_nan=False)  # strict JSON: no NaN, no Infinity
    return CheckResult.from_json(json.loads(text))


@pytest.mark.parametrize("name", ["ioi", "induction"])
def test_round_trip_renders_the_same_report(runs, name):
    result = runs[name]
    again = _round_trip(result)
    assert again.render() == result.render()
    assert again.holds == result.holds
    assert again.to_json() | {"versions": None} == result.to_json() | {"versions": None}


def test_the_runs_exercise_every_part_of_the_report(runs):
    ioi, induction = runs["ioi"], runs["induction"]
    assert ioi.counterexamples and not ioi.holds
    assert induction.claims and len(induction.claims) == 8
    assert ioi.p_value == ioi.p_value and induction.p_value == induction.p_value  # measured
    assert ioi.remainder and induction.remainder
    assert induction.notes and ioi.reported == {"clean": 14.87}
    assert [e.kind for e in ioi.experiments] == ["patch", "patch", "path_patch", "ablate"]
    assert np.isnan(ioi.experiments[2].values).any()  # layer-1 senders have no path into 1.0.q


def test_per_prompt_values_survive(runs):
    result = runs["ioi"]
    again = _round_trip(result)
    for name in ("clean", "scrubbed", "random"):
        np.testing.assert_array_equal(getattr(again.per_prompt, name), getattr(result.per_prompt, name))
    assert again.per_prompt.texts == result.per_prompt.texts and len(result.per_prompt.texts) == 16
    assert float(np.mean(result.per_prompt.scrubbed)) == pytest.approx(result.scrubbed.value)


def test_experiments_keep_per_prompt_values_and_typed_sites(runs):
    for exp in runs["ioi"].experiments:
        again = ExperimentResult.from_json(json.loads(json.dumps(exp.to_json(), allow_nan=False)))
        assert again.render() == exp.render()
        np.testing.assert_array_equal(again.per_prompt, exp.per_prompt)  # NaN rows equal too
        np.testing.assert_array_equal(again.values, exp.values)
        np.testing.assert_array_equal(again.normalized, exp.normalized)
        assert again.per_prompt.shape == (len(exp.sites), 16)
        assert [str(s) for s in again.sites] == [str(s) for s in exp.sites]
        assert (again.clean, again.corrupt, again.grid, again.direction) == (exp.clean, exp.corrupt, exp.grid,
                                                                             exp.direction)
    sweep = ExperimentResult.from_json(runs["ioi"].experiments[0].to_json())
    assert sweep.sites[5] == Head(1, 1) and sweep.values.shape == (3, 4)


def test_site_text_reads_back_as_the_typed_site():
    for site in (Head(1, 2), Head(0, 3, Channel.Q), Mlp(2), MlpIn(1), Resid(3), Embed(), Logits()):
        assert site_from_text(str(site)) == site
    assert site_from_text("head 0.1 -> head 1.0.q") == "head 0.1 -> head 1.0.q"


def test_an_older_report_without_new_fields_still_reads():
    result = CheckResult.from_json({
        "model": "m", "task": "t", "metric": "logit_diff", "seed": 0, "n": 4,
        "clean": 2.0, "scrubbed": 1.0, "random": None, "recovered": 0.5,
        "ci": {"low": 0.25, "high": 0.75, "level": 0.9},
        "intervals": {k: {"low": 0.0, "high": 3.0} for k in ("clean", "scrubbed", "random")},
    })
    assert result.recovered.level == 0.9 and np.isnan(result.random.value)
    assert result.per_prompt is None and result.experiments == []
    assert "recovered       50.0%   90% CI [25.0%, 75.0%]" in result.render()
