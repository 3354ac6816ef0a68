"""The shipped toy models load offline by short name, behave as trained, and the training
script reproduces them."""
from __future__ import annotations

import hashlib
import json

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
        assert measured["loss_after_first_period"] < 0.5 * measured["loss_first_period"]
        assert measured["previous_token_head"] == recorded["previous_token_head"]
        assert measured["induction_head"] == recorded["induction_head"]
    else:
        assert measured["heldout_logit_diff_mean"] > 2.0
    for key, value in recorded.items():
        if isinstance(value, float):
            assert measured[key] == pytest.approx(value, abs=1e-3), key


def test_training_is_deterministic():
    for name in TOYS:
        a, _, _ = toy_train.train(name, steps=3, log=lambda s: None)
        b, _, _ = toy_train.train(name, steps=3, log=lambda s: None)
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


@pytest.mark.slow
@pytest.mark.parametrize("name", TOYS)
def test_training_script_reproduces_shipped_weights(name, tmp_path):
    from safetensors.torch import load_file

    model, tok, meta = toy_train.train(name, log=lambda s: None)
    toy_train.save(model, tok, meta, tmp_path / name)
    fresh = load_file(str(tmp_path / name / "model.safetensors"))
    shipped = load_file(str(toy_dir(name) / "model.safetensors"))
    assert fresh.keys() == shipped.keys()
    for key in fresh:
        torch.testing.assert_close(fresh[key], shipped[key], atol=1e-5, rtol=1e-5)
