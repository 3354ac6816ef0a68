"""Latent groups: `features a.1, a.5` names several latents of one SAE as one subject, and
`features a.?g` is a latent group hole (a set of latents of unknown size, `?g has at most
N features`). On a planted model whose copy flows through three live latents the solver
fills the group with exactly those three when the expectation needs all of them, and the
smallest such group wins; bad uses are clear errors."""
from __future__ import annotations

import json

import pytest
import torch

import circuitlang
from circuitlang.checker import load_hypothesis
from circuitlang.errors import CircuitlangError
from circuitlang.ir_to_ast import ir_to_ast
from circuitlang.sites import Latent

from planted import D, P, V

LIVE = {V + 1: 3, V + 6: 5, V + 12: 7}  # latent -> the token direction it reads and writes


def _three_live_latents(folder, n: int = 2 * V) -> None:
    """An SAE at attention block 1's output of the planted model with n latents: the
    latents in LIVE read and write one token's direction each, along which head 1.0 writes
    its copy of that token; every other latent reads a position direction, which attention
    block 1 never writes, so it is always off."""
    from safetensors.torch import save_file

    w_enc, w_dec = torch.zeros(D, n), torch.zeros(n, D)
    for i in range(n):
        row = LIVE.get(i, V + i % P)
        w_enc[row, i] = w_dec[i, row] = 1.0
    folder.mkdir()
    save_file({"W_enc": w_enc, "b_enc": torch.zeros(n), "W_dec": w_dec, "b_dec": torch.zeros(D)},
              str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": n, "architecture": "standard"}))


BASE = ('task induction\nmetric loss\nsae a = "tok" at attn 1\n'
        "0.0 -> 1.0.k at all\nembed -> 1.0.q at all\nembed -> 1.0.v at all\n")


def _through(items: str) -> str:
    return BASE + f"1.0 -> features {items} at all\nfeatures {items} -> logits at all\n"


def _recovered(tmp_path, planted, induction_task, text: str) -> float:
    (tmp_path / "k.circ").write_text(text)
    return circuitlang.check(str(tmp_path / "k.circ"), model=planted, task=induction_task, breakdown=False,
                             permutations=0).recovered.value


def test_a_list_of_latents_is_one_claim_per_latent(planted, induction_task, tmp_path):
    _three_live_latents(tmp_path / "tok")
    listed, _ = load_hypothesis(_through("a.17, a.22"), model=planted, task=induction_task,
                                filename=str(tmp_path / "h.circ"))
    each, _ = load_hypothesis(BASE + "1.0 -> feature a.17 at all\n1.0 -> feature a.22 at all\n"
                              "feature a.17 -> logits at all\nfeature a.22 -> logits at all\n",
                              model=planted, task=induction_task, filename=str(tmp_path / "h.circ"))
    assert set(listed.claims) == set(each.claims) and len(listed.claims) == len(each.claims) == 7
    assert {c.receiver for c in listed.claims if isinstance(getattr(c, "receiver", None), Latent)} == \
        {Latent(listed.saes[0], 17), Latent(listed.saes[0], 22)}
    # written back merged, and re-read the same
    depends, _ = load_hypothesis(BASE + "features a.17, a.22 at all depends on nothing\n", model=planted,
                                 task=induction_task, filename=str(tmp_path / "h.circ"))
    printed = circuitlang.format(ir_to_ast(depends, group_heads=True, base=tmp_path))
    assert "features a.17, a.22 at all depends on nothing\n" in printed
    again, _ = load_hypothesis(printed, model=planted, task=induction_task, filename=str(tmp_path / "p.circ"))
    assert again.claims == depends.claims


def test_a_latent_group_hole_is_filled_with_the_latents_the_expectation_needs(planted, induction_task, tmp_path):
    _three_live_latents(tmp_path / "tok")
    live = sorted(LIVE)
    # each live latent carries its token's share of the copy: the three together recover the
    # most; any dead latent adds nothing
    shares = [_recovered(tmp_path, planted, induction_task, _through(", ".join(f"a.{i}" for i in live[:k])))
              for k in (1, 2, 3)]
    assert shares[0] < shares[1] < shares[2]
    need = (shares[1] + shares[2]) / 2  # only all three meet it
    (tmp_path / "h.circ").write_text(_through("a.?g") + f"?g has at most 5 features\nexpect recovered >= {need:.4f}\n")
    result = circuitlang.discover(str(tmp_path / "h.circ"), model=planted, task=induction_task)
    fill = result.holes["g"]
    assert fill.kind == "latents"
    assert sorted(s.index for s in fill.chosen.sites) == live
    assert {s.index for s, _ in fill.ranking[:3]} == set(live) and all(v > 0 for _, v in fill.ranking[:3])
    assert all(v == 0.0 for _, v in fill.ranking[3:])
    # the growth was verified size by size: only from 3 latents on does the expectation hold
    assert [meets for _, _, meets in fill.growth] == [False, False, True, True, True]
    items = ", ".join(f"a.{i}" for i in live)
    assert f"1.0 -> features {items} at all\n" in result.text and f"features {items} -> logits at all" in result.text
    assert "# ?g has at most 5 features  (filled with" in result.text
    assert result.check.recovered.value == pytest.approx(shares[2], abs=1e-9)
    (tmp_path / "found.circ").write_text(result.text)
    again = circuitlang.check(str(tmp_path / "found.circ"), model=planted, task=induction_task, breakdown=False)
    assert again.recovered.value == pytest.approx(shares[2], abs=1e-9) and again.holds


def test_with_no_expectation_the_smallest_group_wins(planted, induction_task, tmp_path):
    _three_live_latents(tmp_path / "tok")
    (tmp_path / "h.circ").write_text(_through("a.?g") + "?g has at least 2 features\n?g has at most 4 features\n")
    fill = circuitlang.discover(str(tmp_path / "h.circ"), model=planted, task=induction_task).holes["g"]
    assert len(fill.chosen.sites) == 2 and {s.index for s in fill.chosen.sites} <= set(LIVE)
    assert [size for size, _, _ in fill.growth] == [2, 3, 4]


@pytest.mark.parametrize("extra, message", [
    ("?g has at most 2 heads\n", "so its size counts features, not heads"),
    ("?g in layer 1\n", "takes no `in` constraint"),
    ("feature a.?g -> logits at all\n", "used both as a group of latents of SAE a and as a latent of SAE a"),
    ("?g has at least 3 features\n?g has at most 2 features\n", "at least 3 and at most 2 features"),
    ("?g has at least 40 features\n", "SAE a has only 32 latents"),
    ("?g has at most 0 features\n", "a group hole holds at least one feature"),
    ("feature a.?f -> logits at all\n?f has at most 2 features\n",
     r"only a group hole has a number of features[\s\S]*write `features a.?f`"),
])
def test_bad_uses_of_a_latent_group_hole_are_clear_errors(planted, induction_task, tmp_path, extra, message):
    _three_live_latents(tmp_path / "tok")
    (tmp_path / "h.circ").write_text(_through("a.?g") + extra)
    with pytest.raises(CircuitlangError, match=message.replace("?", r"\?").replace("`", ".")):
        circuitlang.discover(str(tmp_path / "h.circ"), model=planted, task=induction_task)


def test_a_head_group_counts_heads(planted, induction_task, tmp_path):
    (tmp_path / "h.circ").write_text("task induction\nheads ?g at all depends on nothing\n?g has at most 2 features\n")
    with pytest.raises(CircuitlangError, match=r"\?g is a group of heads .*counts heads, not features"):
        circuitlang.discover(str(tmp_path / "h.circ"), model=planted, task=induction_task)


def test_a_latent_out_of_range_in_a_list(planted, induction_task, tmp_path):
    _three_live_latents(tmp_path / "tok")
    (tmp_path / "h.circ").write_text(BASE + "features a.3, a.32 at all depends on nothing\n")
    with pytest.raises(CircuitlangError, match=r"feature a\.32 out of range \(SAE a has latents 0-31\)"):
        circuitlang.check(str(tmp_path / "h.circ"), model=planted, task=induction_task)


def test_latent_lists_and_sizes_print_and_parse_back():
    text = ('task ioi\nsae a = "x" at resid 1\nfeatures a.1, a.7 at END depends on IO\n'
            "features a.?g, a.3 -> logits at END\n?g has at most 3 features\n?g has exactly 1 feature\n"
            "heads ?h at END depends on IO\n?h has at least 1 head\n")
    program = circuitlang.parse(text)
    assert circuitlang.format(program) == text
    sizes = [s for s in program.statements if type(s).__name__ == "HoleSize"]
    assert [s.unit for s in sizes] == ["features", "features", "heads"]


def test_a_latent_group_may_hold_more_than_the_shortlist(planted, induction_task, tmp_path):
    """A dictionary's latents are cut to the best 32 before the search, but a group that
    must hold more keeps as many as it may hold."""
    _three_live_latents(tmp_path / "tok", n=4 * V)
    (tmp_path / "h.circ").write_text(_through("a.?g") + "?g has exactly 34 features\n")
    fill = circuitlang.discover(str(tmp_path / "h.circ"), model=planted, task=induction_task,
                                check=False).holes["g"]
    assert len(fill.chosen.sites) == 34 and set(LIVE) <= {s.index for s in fill.chosen.sites}


def test_every_bad_latent_of_a_list_is_reported(planted, induction_task, tmp_path):
    _three_live_latents(tmp_path / "tok")
    (tmp_path / "h.circ").write_text(BASE + "features a.40, a.3, a.99 at all depends on nothing\n")
    with pytest.raises(CircuitlangError) as info:
        circuitlang.check(str(tmp_path / "h.circ"), model=planted, task=induction_task)
    text = str(info.value)
    assert "feature a.40 out of range" in text and "feature a.99 out of range" in text


def test_a_latent_group_hole_prints_back_from_the_ir(planted, induction_task, tmp_path):
    _three_live_latents(tmp_path / "tok")
    text = _through("a.?g") + "?g has at least 2 features\n?g has at most 5 features\n"
    hypothesis, _ = load_hypothesis(text, model=planted, task=induction_task, filename=str(tmp_path / "h.circ"))
    printed = circuitlang.format(ir_to_ast(hypothesis, base=tmp_path))
    assert "1.0 -> features a.?g at all\n" in printed
    assert "?g has at least 2 features\n?g has at most 5 features\n" in printed
    again, _ = load_hypothesis(printed, model=planted, task=induction_task, filename=str(tmp_path / "p.circ"))
    assert again.claims == hypothesis.claims and again.hole_constraints == hypothesis.hole_constraints
    assert [c.unit for c in again.hole_constraints] == ["features", "features"]
