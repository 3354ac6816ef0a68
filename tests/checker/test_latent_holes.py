"""Latent holes (`feature a.?f`): the solver ranks every latent of a dictionary by node
attribution, verifies the best by causal scrubbing and writes the latent back into the
program; on a planted model the one latent the copy flows through is found, and bad
uses of a latent hole are clear errors."""
from __future__ import annotations

import json

import pytest
import torch

import circuitlang
from circuitlang.cli import main
from circuitlang.errors import CircuitlangError
from circuitlang.sites import Latent

from planted import D, P, V

ALIVE, TOKEN = V + 5, 3  # the one live latent: it reads and writes token 3's direction


def _one_live_latent(folder) -> None:
    """An SAE at attention block 1's output of the planted model with 2V latents: latent
    ALIVE reads and writes token TOKEN's direction, along which head 1.0 writes its copy
    of that token; every other latent reads a position direction, which attention block 1
    never writes, so it is always off. What the dictionary misses is its error term."""
    from safetensors.torch import save_file

    n = 2 * V
    w_enc, w_dec = torch.zeros(D, n), torch.zeros(n, D)
    for i in range(n):
        row = TOKEN if i == ALIVE else V + i % P
        w_enc[row, i] = w_dec[i, row] = 1.0
    folder.mkdir()
    save_file({"W_enc": w_enc, "b_enc": torch.zeros(n), "W_dec": w_dec, "b_dec": torch.zeros(D)},
              str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": n, "architecture": "standard"}))


HEAD = "0.0 -> 1.0.k at all\nembed -> 1.0.q at all\nembed -> 1.0.v at all\n"
PROGRAM = ('task induction\nmetric loss\nsae a = "tok" at attn 1\n' + HEAD
           + "1.0 -> feature a.?f at all\nfeature a.?f -> logits at all\n")


def test_a_latent_hole_is_filled_with_the_one_latent_the_copy_flows_through(planted, induction_task, tmp_path):
    _one_live_latent(tmp_path / "tok")
    (tmp_path / "h.circ").write_text(PROGRAM)
    result = circuitlang.discover(str(tmp_path / "h.circ"), model=planted, task=induction_task)
    fill = result.holes["f"]
    assert fill.kind == "latent"
    assert fill.chosen.sites == (Latent(fill.chosen.sites[0].sae, ALIVE),)
    assert f"feature a.{ALIVE} at all" in result.text and "?" not in result.text.split("sae a")[1]
    assert result.method == "latent-attribution"
    # the dead latents score and recover nothing; the live one recovers its token's share
    assert fill.chosen.score > 0
    assert all(c.score == 0.0 and c.recovered == pytest.approx(0.0, abs=1e-9) for c in fill.runners_up)
    assert fill.ranking[0][0] == fill.chosen.sites[0]
    assert result.check.recovered.value > 0.05
    # the written program checks to the same number
    (tmp_path / "found.circ").write_text(result.text)
    again = circuitlang.check(str(tmp_path / "found.circ"), model=planted, task=induction_task, breakdown=False)
    assert again.recovered.value == pytest.approx(result.check.recovered.value, abs=1e-9)


@pytest.mark.parametrize("ablation", ["corrupt", "resample", "mean", "zero"])
def test_latent_holes_are_ranked_under_the_files_ablation(planted, induction_task, tmp_path, ablation):
    """The ranking moves each latent to its value under the file's ablation, as scrubbing
    does: the live latent is found under each, and its score is that ablation's estimate
    (zero: the latent's whole value; the others: part of it)."""
    from circuitlang.checker import load_hypothesis, prepare
    from circuitlang.discover.hole_search import latent_scores
    from circuitlang.sites import ALL
    from circuitlang.text_to_ast import parse

    _one_live_latent(tmp_path / "tok")
    text = PROGRAM.replace("metric loss\n", f"metric loss\nablation {ablation}\n")
    (tmp_path / "h.circ").write_text(text)
    result = circuitlang.discover(str(tmp_path / "h.circ"), model=planted, task=induction_task)
    assert result.holes["f"].chosen.sites[0].index == ALIVE
    assert f"ablation {ablation}" in result.text
    hypothesis, _ = load_hypothesis(parse(text, str(tmp_path / "h.circ")), model=planted, task=induction_task,
                                   filename=str(tmp_path / "h.circ"))
    setup = prepare(hypothesis, model=planted, task=induction_task)
    scores = {a: latent_scores(setup.model, setup.task, setup.prompts, "loss", hypothesis, a, setup.seed)[0]
              for a in ("corrupt", "resample", "mean", "zero")}
    (sae, position), = scores[ablation]
    assert position == ALL
    mine = scores[ablation][(sae, position)]
    assert mine[ALIVE] != 0 and (mine[[i for i in range(len(mine)) if i != ALIVE]] == 0).all()
    others = [a for a in scores if a != ablation]
    assert all(abs(scores[a][(sae, position)][ALIVE] - mine[ALIVE]) > 1e-6 for a in others)


def test_two_latent_holes_get_two_latents(planted, induction_task, tmp_path):
    _one_live_latent(tmp_path / "tok")
    (tmp_path / "h.circ").write_text(PROGRAM + "1.0 -> feature a.?g at all\nfeature a.?g -> logits at all\n")
    result = circuitlang.discover(str(tmp_path / "h.circ"), model=planted, task=induction_task)
    f, g = result.holes["f"].chosen.sites[0], result.holes["g"].chosen.sites[0]
    assert f != g and ALIVE in (f.index, g.index)


@pytest.mark.parametrize("extra, message", [
    ("?f in layer 1\n", "takes no `in` constraint"),
    ("head ?f moves next to END\n", "used both as a latent of SAE a and as a head"),
    ('sae b = "tok" at attn 1\nfeature b.?f -> logits at all\n', "latent of SAE a and as a latent of SAE b"),
    ("feature a.?f -> 0.0.q at all\n", "no latent of SAE a makes its edge claims edges of the model"),
])
def test_bad_uses_of_a_latent_hole_are_clear_errors(planted, induction_task, tmp_path, extra, message):
    _one_live_latent(tmp_path / "tok")
    (tmp_path / "h.circ").write_text(PROGRAM + extra)
    with pytest.raises(CircuitlangError, match=message.replace("?", r"\?").replace("`", ".")):
        circuitlang.discover(str(tmp_path / "h.circ"), model=planted, task=induction_task)


def test_check_on_a_latent_hole_says_to_run_discover(planted, induction_task, tmp_path):
    _one_live_latent(tmp_path / "tok")
    (tmp_path / "h.circ").write_text(PROGRAM)
    with pytest.raises(CircuitlangError, match=r"holes \(feature a\.\?f\).*") as info:
        circuitlang.check(str(tmp_path / "h.circ"), model=planted, task=induction_task)
    assert "circuitlang discover" in str(info.value.hint)


def test_a_latent_hole_on_the_command_line(tmp_path, capsys):
    """`circuitlang discover FILE` on the embedded toy-ioi model with a random dictionary
    at `resid 2`: the filled program parses, names one latent, and checks."""
    from safetensors.torch import save_file

    from circuitlang.models import load_model

    d = load_model("toy-ioi").shape.d_model
    g = torch.Generator().manual_seed(0)
    (tmp_path / "sae").mkdir()
    save_file({"W_enc": torch.randn(d, 48, generator=g) / d ** 0.5, "b_enc": torch.zeros(48),
               "W_dec": torch.randn(48, d, generator=g) * 0.2, "b_dec": torch.zeros(d)},
              str(tmp_path / "sae" / "sae_weights.safetensors"))
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({"d_in": d, "d_sae": 48, "architecture": "standard"}))
    (tmp_path / "h.circ").write_text('model toy-ioi\ntask ioi\nsamples 16\nsae a = "sae" at resid 2\n'
                                     "feature a.?f at END depends on IO\n")
    out = tmp_path / "found.circ"
    assert main(["discover", str(tmp_path / "h.circ"), "-o", str(out), "--permutations", "0"]) in (0, 1)
    text = out.read_text()
    assert "?f" not in text.split("sae a")[1]
    assert "ranked by attribution patching over latents (resample ablation) at END" in capsys.readouterr().err
    from circuitlang.checker import load_hypothesis
    from circuitlang.text_to_ast import parse

    hypothesis, _ = load_hypothesis(parse(text, str(out)), filename=str(out))
    (claim,) = hypothesis.claims
    assert isinstance(claim.site, Latent) and claim.site.sae.name == "a"
    assert circuitlang.check(str(out), breakdown=False).recovered is not None
