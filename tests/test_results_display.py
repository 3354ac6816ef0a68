"""Results in a notebook: short reprs, per-prompt arrays, arrays and tables indexed by typed
sites, `_repr_html_` (escaped, a figure when it can be drawn, never failing), and the
direction of `ExperimentResult.normalized` pinned on the toy IOI model."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import circuitlang
from circuitlang.discover import DiscoveryResult
from circuitlang.discover.attribution import Scores
from circuitlang.discover.holes import Candidate, HoleFill, HoleResult, Verified
from circuitlang.discover.problem import EdgeSpace
from circuitlang.errors import CircuitlangError, DiscoveryError
from circuitlang.models.interventions import EdgeSet
from circuitlang.report import ClaimResult, Counterexample, ExpectationResult
from circuitlang.sites import ALL, Embed, Head, Logits, ModelShape
from circuitlang.stats import Interval

ROOT = Path(__file__).resolve().parents[1]
TOY = "model toy-ioi\ntask ioi prepend_bos=false\n"
PROGRAM = (ROOT / "stdlib" / "toy_ioi.circ").read_text() + "\nexpect each logit_diff > 13\npatch head * at END\n"


@pytest.fixture(scope="module")
def result():
    return circuitlang.check(PROGRAM, n=12, permutations=3, max_examples=3, task_params={"prepend_bos": False})


@pytest.fixture(scope="module")
def discovery():
    shape = ModelShape(n_layers=2, n_heads=2, d_model=8, d_head=4)
    space = EdgeSpace.build(EdgeSet.build(shape))
    scores = Scores(torch.linspace(-1.0, 1.0, len(space)), "eap", space)
    circuit = torch.zeros(len(space), dtype=torch.bool)
    circuit[-3:] = True
    return DiscoveryResult(
        text="model m\n", hypothesis=None, edges=space.edges(circuit), circuit=circuit, space=space,
        scores=scores, curve=None, faithfulness=Interval(0.8, 0.7, 0.9), check=None, method="eap",
        model="m", task="ioi", n=8, seed=0, notes=["a note with <tags> & ampersands"])


# ----------------------------------------------------------------------------- repr


def test_reprs_are_short_and_say_the_verdict(result):
    text = repr(result)
    assert len(text) < 300 and "\n" not in text
    r = result.recovered
    assert f"recovered {100 * r.value:.1f}% [{100 * r.low:.1f}%, {100 * r.high:.1f}%]" in text
    assert f"p={result.p_value:.3g}" in text
    assert "1 of 2 expectations hold" in text and "1 counterexamples" in text and "1 experiments" in text
    for part in result.expectations + result.counterexamples + result.experiments + [result.per_prompt]:
        assert len(repr(part)) < 240 and "\n" not in repr(part)
    assert repr(result.expectations[0]).startswith("ExpectationResult(ok 'expect recovered >= 0.8': ")
    assert "FAIL 'expect each logit_diff > 13': holds on" in repr(result.expectations[1])
    sweep = repr(result.experiments[0])
    assert "3x4 sites x 12 prompts, noise" in sweep and "strongest head" in sweep


def test_claim_and_counterexample_reprs():
    claim = ClaimResult("head 1.0 moves name to END", 12, 0.25, 0.5)
    assert repr(claim) == ("ClaimResult(line 12 'head 1.0 moves name to END': recovered without it 25.0%, "
                           "cost +50.0%)")
    long = Counterexample("x" * 200, ["x"] * 200, 1.5, "expect each logit_diff > 0", True)
    assert len(repr(long)) < 160 and "shrunk" in repr(long)


def test_discovery_and_hole_reprs(discovery):
    assert repr(discovery) == ("DiscoveryResult(eap on m, ioi, n=8: 3 edges of "
                               f"{len(discovery.space)}, faithfulness 0.800 [0.700, 0.900])")
    fill = HoleFill("h", "head", Candidate((Head(1, 0),), 2.5), [Candidate((Head(1, 1),), 1.0, 0.4)])
    holes = HoleResult("model m\n", None, None, {"h": fill},
                       [Verified((("h", (Head(1, 0),)),), 2.5, 0.9, 1, ())], None, "eap-ig-inputs", "corrupt",
                       (ALL,), "m", "ioi", 8, 0, "logit_diff")
    assert repr(holes) == "HoleResult(?h = 1.0; recovered 90.0%; 1 verified)"
    page = holes._repr_html_()
    assert "?h" in page and "1.1 (40.0%)" in page and "<pre>model m\n</pre>" in page


# ----------------------------------------------------------------------------- per-prompt values


def test_check_keeps_per_prompt_values(result):
    pp = result.per_prompt
    assert pp.clean.shape == pp.scrubbed.shape == pp.random.shape == (12,)
    for name in ("clean", "scrubbed", "random"):  # the report's numbers are their means
        assert getattr(result, name).value == pytest.approx(float(np.mean(getattr(pp, name))), rel=1e-12)
    failing = int((pp.scrubbed <= 13).sum())
    assert result.expectations[1].failures >= failing > 0  # the per-prompt expectation reads these


def test_to_numpy_and_to_pandas_of_a_check(result):
    arr = result.to_numpy()
    assert arr.shape == (12, 3)
    np.testing.assert_array_equal(arr[:, 1], result.per_prompt.scrubbed)
    frame = result.to_pandas()
    assert list(frame.columns) == ["clean", "scrubbed", "random", "text"] and frame.index.name == "prompt"
    assert frame["text"].iloc[3] == result.per_prompt.texts[3]
    exp = result.to_pandas("expectations")
    assert exp.loc["expect each logit_diff > 13", "holds"] == False  # noqa: E712 - numpy bool
    with pytest.raises(CircuitlangError, match="no table 'heads'"):
        result.to_pandas("heads")


def test_experiment_arrays_and_tables_are_indexed_by_sites(result):
    sweep = result.experiments[0]
    assert sweep.to_numpy().shape == (3, 4) and sweep.to_numpy("per_prompt").shape == (3, 4, 12)
    np.testing.assert_allclose(sweep.to_numpy("per_prompt").mean(-1), sweep.to_numpy())
    frame = sweep.to_pandas()
    assert frame.index.name == "site" and frame.index[6] == Head(1, 2)
    assert frame.loc[Head(1, 2), "normalized"] == sweep.normalized[1, 2]
    grid = frame.pivot(index="layer", columns="head", values="normalized")
    np.testing.assert_array_equal(grid.to_numpy(), sweep.normalized)
    per_prompt = sweep.to_pandas(per_prompt=True)
    assert per_prompt.shape == (12, 12) and per_prompt.loc[Head(0, 3), 5] == sweep.per_prompt[3, 5]


def test_discovery_tables_are_indexed_by_edges(discovery):
    frame = discovery.to_pandas()
    assert frame.index.names == ["sender", "receiver", "position"]
    assert frame.index[0][0] == Embed() and frame.index[-1][1] == Logits()
    assert int(frame["kept"].sum()) == 3 and bool(frame["kept"].iloc[-1])
    np.testing.assert_allclose(frame["score"].to_numpy(), discovery.to_numpy())
    no_scores = DiscoveryResult(**{**discovery.__dict__, "scores": None, "method": "acdc"})
    with pytest.raises(DiscoveryError, match="acdc gives no per-edge scores"):
        no_scores.to_numpy()
    assert no_scores.to_pandas()["score"].isna().all()


def test_tables_without_pandas_say_how_to_install_it(result, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(CircuitlangError, match="pip install pandas"):
        result.to_pandas()
    with pytest.raises(CircuitlangError, match="pip install pandas"):
        result.experiments[0].to_pandas()


# ----------------------------------------------------------------------------- html


def test_html_shows_the_verdict_numbers_claims_and_counterexamples(result):
    page = result._repr_html_()
    assert "<b>an expectation FAILS</b>" in page
    r = result.recovered
    assert f"95% CI [{100 * r.low:.1f}%, {100 * r.high:.1f}%]" in page
    assert "smallest counterexamples" in page and result.counterexamples[0].text.split()[0] in page
    assert "<td>L1</td>" in page  # the sweep's grid


def test_html_escapes_every_text(discovery):
    expectation = ExpectationResult("expect each <b>x</b> > 0", "each", False, 0.5, failures=1)
    bad = Counterexample("<script>alert(1)</script>", ["<s>"], 0.0, expectation.text, False)
    check = circuitlang.report.CheckResult.from_json({
        "model": "m&m", "task": "t", "metric": "x", "seed": 0, "n": 2, "clean": 1.0, "scrubbed": 1.0,
        "random": 0.0, "recovered": 1.0, "ci": {"low": 1.0, "high": 1.0, "level": 0.95},
        "intervals": {k: {"low": 0.0, "high": 1.0} for k in ("clean", "scrubbed", "random")},
        "notes": ["<i>note</i>"]})
    check.expectations, check.counterexamples = [expectation], [bad]
    page = check._repr_html_()
    for raw in ("<script>", "<b>x</b>", "<i>note</i>", "<s>", "m&m"):
        assert raw not in page
    assert "&lt;script&gt;" in page and "m&amp;m" in page
    assert "&lt;tags&gt; &amp; ampersands" in discovery._repr_html_()


def test_html_inlines_a_figure_and_falls_back_to_the_table(result, monkeypatch):
    pytest.importorskip("matplotlib", reason="the inline figure needs matplotlib (the [figures] extra)")
    import circuitlang.figures as figures
    from circuitlang.figures._mpl import new_figure

    sweep = result.experiments[0]
    if hasattr(figures, "sweep_heatmap"):  # the real heatmap, with its caption's numbers
        page = sweep._repr_html_()
        assert page.count("<svg") == 1 and "<td>L2</td>" in page
    seen = []

    def heatmap(experiment, **options):
        seen.append(experiment)
        fig = new_figure(2, 2)
        fig.add_subplot().imshow(experiment.to_numpy("normalized"))
        return fig

    monkeypatch.setattr(figures, "sweep_heatmap", heatmap, raising=False)
    page = sweep._repr_html_()
    assert seen == [sweep] and "<svg" in page and "<?xml" not in page

    def broken(experiment, **options):
        raise RuntimeError("cannot draw")

    monkeypatch.setattr(figures, "sweep_heatmap", broken, raising=False)
    page = sweep._repr_html_()
    assert "<svg" not in page and "<td>L0</td>" in page
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setattr(figures, "sweep_heatmap", heatmap, raising=False)
    assert "<svg" not in sweep._repr_html_() and "<td>L0</td>" in sweep._repr_html_()


# ----------------------------------------------------------------------------- normalized


def test_normalized_points_from_no_effect_to_the_whole_effect():
    """Noising: 1 when the patched metric equals the corrupt run's (the final residual stream
    at END carries everything the metric reads), 0 when the patch changes nothing (the
    embedding at S1+1, a token the corruption leaves alone)."""
    whole, nothing = circuitlang.run(TOY + "patch resid 3 at END\npatch embed at S1+1\n", n=12)
    assert whole.clean > whole.corrupt + 5  # there is a gap to move
    assert whole.normalized[0] == pytest.approx(1.0, abs=1e-6)
    assert whole.values[0] == pytest.approx(whole.corrupt, abs=1e-4)
    assert nothing.normalized[0] == pytest.approx(0.0, abs=1e-6)
    assert nothing.values[0] == pytest.approx(nothing.clean, abs=1e-4)
