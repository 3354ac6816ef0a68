"""Loading: local folders through the real `from_pretrained` path, shapes without weights,
and the errors a user sees for names that cannot work."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from circuitlang.errors import ModelError
from circuitlang.models import known_shape, load_model, supported_model_types
from circuitlang.sites import Head


@pytest.fixture(scope="module")
def saved_gpt2(tmp_path_factory, build_tiny):
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    model = build_tiny("gpt2")
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model


def test_load_local_folder_matches_the_saved_model(saved_gpt2):
    folder, model = saved_gpt2
    lm = load_model(str(folder), device="cpu")
    assert lm.shape.n_layers == 3 and lm.shape.architecture == "gpt2"
    assert lm.dtype == torch.float32 and lm.device.type == "cpu"
    assert (folder / "model.safetensors").is_file()
    ids = torch.randint(0, 61, (2, 6))
    with torch.no_grad():
        want = model(ids).logits
    torch.testing.assert_close(lm.run(ids).logits, want)
    assert known_shape(str(folder)).n_heads == 4


def test_hub_kernels_are_turned_off(saved_gpt2, monkeypatch):
    """transformers 5.25 replaces layers with Hub kernels by default (fetched at load time,
    possibly fusing the modules the hooks read): the loader asks for the model's own code
    wherever the release has kernels, and the model it gives uses none."""
    import transformers

    folder, _ = saved_gpt2
    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    lm = load_model(str(folder), device="cpu")
    if hasattr(transformers.PreTrainedModel, "set_use_kernels"):
        assert seen.get("use_kernels") is False
        assert lm.hf_model.use_kernels is False
    else:
        assert "use_kernels" not in seen  # a release without Hub kernels would refuse the keyword


def test_load_with_dtype(saved_gpt2):
    folder, _ = saved_gpt2
    lm = load_model(str(folder), device="cpu", dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    run = lm.run(torch.randint(0, 61, (1, 5)), capture=[Head(0, 1)])
    assert run.cache[Head(0, 1)].dtype == torch.bfloat16
    with pytest.raises(ModelError, match="dtype"):
        load_model(str(folder), dtype="float13")


def test_missing_path_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="no such folder"):
        load_model(str(tmp_path / "nope" / "model"))
    with pytest.raises(ModelError, match="config.json"):
        load_model(str(tmp_path))


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    from transformers import BertConfig

    BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(ModelError) as info:
        load_model(str(tmp_path))
    text = str(info.value)
    assert "'bert'" in text
    for name in ("gpt2", "gpt_neox", "llama", "mistral", "qwen2"):
        assert name in text
    assert set(supported_model_types()) >= {"gpt2", "gpt_neox", "llama", "mistral", "qwen2"}


def test_unknown_hub_id_offline_says_pass_a_local_path():
    # A fresh interpreter with the hub offline: the real from_pretrained path, failing fast.
    code = (
        "from circuitlang.models import load_model\n"
        "from circuitlang.errors import ModelError\n"
        "try:\n    load_model('no-such-org/no-such-model')\n"
        "except ModelError as e:\n    print('MODELERROR', e)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "MODELERROR" in out.stdout, out.stderr[-2000:]
    assert "could not find model 'no-such-org/no-such-model'" in out.stdout
    assert "no network here? pass a local path" in out.stdout
    assert "Traceback" not in out.stderr


def test_known_shapes_without_weights():
    gpt2 = known_shape("gpt2")
    assert (gpt2.n_layers, gpt2.n_heads, gpt2.d_model, gpt2.vocab_size) == (12, 12, 768, 50257)
    qwen = known_shape("Qwen/Qwen2-0.5B")
    assert qwen.kv_heads == 2 and qwen.n_heads == 14
    assert known_shape("EleutherAI/pythia-70m").architecture == "gpt_neox"
    with pytest.raises(ModelError) as info:
        known_shape("gpt3")
    assert "gpt2" in str(info.value)


def test_cli_models_lists_and_describes(capsys):
    from circuitlang.cli import main

    assert main(["models", "gpt2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["n_layers"] == 12
    assert main(["models"]) == 0
    assert main(["models", "not-a-model"]) == 2
    assert "unknown model" in capsys.readouterr().err
