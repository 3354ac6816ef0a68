"""The shipped toy models load offline by short name, behave as trained, and the training
script reproduces them."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from circuitlang.models import list_models, load_model, toy_names
from circuitlang.models.known import toy_dir
from circuitlang.models.toys import train as toy_train

TOYS = ("toy-induction", "toy-ioi")


@pytest.fixture(scope="module", params=TOYS)
def toy(request):
    if request.param not in toy_names():
        pytest.fail(f"embedded model {request.param} is missing; run python -m circuitlang.models.toys.train")
    return request.param, load_model(request.param, device="cpu")


def test_toys_are_listed_with_shapes():
    listed = {t.name: t for t in list_models()}
    assert set(TOYS) <= set(listed)
    assert listed["toy-induction"].shape.has_mlp is False
    assert listed["toy-induction"].shape.n_layers == 2
    assert listed["toy-ioi"].shape.has_mlp is True


def test_shipped_weights_match_recorded_checksum():
    for name in TOYS:
        meta = json.loads((toy_dir(name) / "circuitlang.json").read_text())
        digest = hashlib.sha256((toy_dir(name) / "model.safetensors").read_bytes()).hexdigest()
        assert digest == meta["sha256"], name


def test_toy_loads_offline_with_tokenizer(toy):
    name, lm = toy
    assert lm.tokenizer is not None
    ids, mask = lm.to_tokens(["w01 w02 w03"] if name == "toy-induction" else ["When Mary and John went"])
    assert ids.shape[1] == mask.sum() and int(ids.max()) < lm.shape.vocab_size
    assert lm.tokenizer.unk_token_id not in ids[0].tolist()


def test_toy_behaves_as_recorded(toy):
    name, lm = toy
    torch.manual_seed(0)
    _, _, _, measure = toy_train.RECIPES[name].build()
    measured = measure(lm.hf_model)
    recorded = json.loads((toy_dir(name) / "circuitlang.json").read_text())["measured"]
    if name == "toy-induction":
        assert measured["loss_second_copy"] < 0.5 * measured["loss_first_copy"]
        assert measured["previous_token_head"] == recorded["previous_token_head"]
        assert measured["induction_head"] == recorded["induction_head"]
        assert measured["sharp_previous_token_heads"] == recorded["sharp_previous_token_heads"]
        assert measured["sharp_induction_heads"] == recorded["sharp_induction_heads"]
    else:
        assert measured["heldout_logit_diff_mean"] > 2.0
    for key, value in recorded.items():
        if isinstance(value, float):
            assert measured[key] == pytest.approx(value, abs=1e-3), key


def _induction_scores(lm, length=10, n=64):
    """Per-head previous-token scores of layer 0 and induction scores of layer 1, read from
    the loaded model's attention patterns on `<bos>` + `length` distinct random words,
    repeated (the `induction` task's prompts)."""
    import random

    from circuitlang.sites import Channel, Head

    words = sorted(w for w in lm.tokenizer.get_vocab() if w.startswith("w"))
    rng = random.Random(0)
    texts = []
    for _ in range(n):
        segment = rng.sample(words, length)
        texts.append(" ".join(segment + segment))
    ids, mask = lm.to_tokens(texts, prepend_bos=True)
    assert ids.shape == (n, 1 + 2 * length) and bool(mask.all())
    heads = range(lm.shape.n_heads)
    run = lm.run(ids, mask, capture=[Head(layer, h, Channel.PATTERN) for layer in (0, 1) for h in heads])
    t = torch.arange(2, ids.shape[1])
    prev = [run.cache[Head(0, h, Channel.PATTERN)][:, t, t - 1].mean().item() for h in heads]
    q = torch.arange(1 + length, 1 + 2 * length)  # the second copy; its token's first copy is at q - length
    ind = [run.cache[Head(1, h, Channel.PATTERN)][:, q, q - length + 1].mean().item() for h in heads]
    return prev, ind


def test_toy_induction_has_sharp_previous_token_and_induction_heads():
    """The textbook circuit (Olsson et al. 2022): a layer-0 head that attends to the previous
    token, layer-1 heads that attend to the token after the earlier copy of the current one;
    the same heads circuitlang.json records and the shipped .circ files name."""
    import re

    from circuitlang.resources import stdlib_dir

    lm = load_model("toy-induction", device="cpu")
    prev, ind = _induction_scores(lm)
    assert max(prev) > 0.5 and max(ind) > 0.5, (prev, ind)
    sharp_prev = [[0, h] for h, v in enumerate(prev) if v > 0.5]
    sharp_ind = [[1, h] for h, v in enumerate(ind) if v > 0.5]
    recorded = json.loads((toy_dir("toy-induction") / "circuitlang.json").read_text())["measured"]
    assert sharp_prev == recorded["sharp_previous_token_heads"]
    assert sharp_ind == recorded["sharp_induction_heads"]
    # uniform attention over the context would give ~0.1 here; the other heads stay low
    assert sorted(prev)[-2] < 0.2
    root = Path(__file__).resolve().parents[2]
    for path in (root / "examples" / "induction" / "induction.circ", stdlib_dir() / "toy_induction.circ"):
        text = path.read_text()
        for group, sharp in (("previous_token", sharp_prev), ("induction", sharp_ind)):
            named = re.search(rf"^group {group} = heads (.+)$", text, re.M).group(1)
            assert named == ", ".join(f"{layer}.{h}" for layer, h in sharp), (path.name, group)


def test_training_is_deterministic():
    for name in TOYS:
        a, _, _ = toy_train.train(name, steps=3, log=lambda s: None)
        b, _, _ = toy_train.train(name, steps=3, log=lambda s: None)
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


@pytest.mark.slow
@pytest.mark.parametrize("name", TOYS)
def test_training_script_reproduces_shipped_model(name, tmp_path):
    """Retraining gives the shipped model. On the versions and CPU kernels it was trained
    with (`trained_with`, `reproduces_bit_for_bit`), bit for bit; on others the last-bit rounding of a release compounds
    over thousands of steps, so the weights differ and the behaviour must repeat: the
    same sharp heads, and the recorded measurements within tolerances."""
    model, tok, meta = toy_train.train(name, log=lambda s: None)
    saved = toy_train.save(model, tok, meta, tmp_path / name)
    shipped = json.loads((toy_dir(name) / "circuitlang.json").read_text())
    if toy_train.reproduces_bit_for_bit(shipped.get("trained_with", {})):
        assert saved["sha256"] == shipped["sha256"]
    got, want = saved["measured"], shipped["measured"]
    if name == "toy-induction":
        for key in ("previous_token_head", "induction_head", "sharp_previous_token_heads",
                    "sharp_induction_heads"):
            assert got[key] == want[key], key
        assert got["loss_second_copy"] < 0.5 * got["loss_first_copy"]
        assert got["loss_second_copy"] == pytest.approx(want["loss_second_copy"], abs=0.15)
        for key in ("previous_token_scores_layer0", "induction_scores_layer1"):
            sharp = [i for i, v in enumerate(want[key]) if v > toy_train.SHARP]
            for i in sharp:  # the heads the hypothesis files name stay sharp, and near their scores
                assert got[key][i] == pytest.approx(want[key][i], abs=0.25), (key, i)
    else:
        assert got["heldout_logit_diff_mean"] == pytest.approx(want["heldout_logit_diff_mean"], rel=0.15)
        assert got["heldout_top1_is_io"] >= 0.98
        assert got["heldout_logit_diff_positive_fraction"] >= 0.98
