"""Loading a model folder never runs its code, and a bad folder is a clear `ModelError`:
truncated, corrupt or incomplete weights, impossible configs, pickle weights, a config
asking to run the folder's Python, a folder without a tokenizer, a device this machine
lacks."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from circuitlang.errors import CircuitlangError, ModelError
from circuitlang.models import known_shape, load_model
from circuitlang.models.known import model_task_params, toy_dir


@pytest.fixture(scope="module")
def saved(tmp_path_factory, build_tiny):
    """A tiny GPT-2 saved with save_pretrained (config.json + model.safetensors)."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    build_tiny("gpt2").save_pretrained(folder)
    return folder


def _copy(saved, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(saved, target)
    return target


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


# ------------------------------------------------------------------ weights


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_truncated_or_corrupt_safetensors_file_is_a_model_error(saved, tmp_path, damage):
    folder = _copy(saved, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a tensor" * 50,
                         "empty": b""}[damage])
    with pytest.raises(ModelError) as info:
        load_model(str(folder), device="cpu")
    assert info.value.diagnostics[0].code == "model.load-failed"
    assert "truncated or corrupt" in info.value.hint


def test_weights_missing_tensors_are_refused_not_filled_with_random_values(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(saved, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    kept = dict(list(tensors.items())[:3])
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="lack .* tensor\\(s\\) the model needs") as info:
        load_model(str(folder), device="cpu")
    assert info.value.diagnostics[0].code == "model.incomplete-weights"


def test_pickle_weights_are_refused_unless_allowed(saved, tmp_path, build_tiny):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(saved / "config.json", folder / "config.json")
    model = build_tiny("gpt2")
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelError) as info:
        load_model(str(folder), device="cpu")
    err = info.value
    assert err.diagnostics[0].code == "model.pickle-weights"
    assert "pytorch_model.bin" in err.message and "--allow-pickle" in err.hint
    lm = load_model(str(folder), device="cpu", allow_pickle=True)
    ids = torch.randint(0, 61, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(lm.run(ids).logits, model(ids).logits)


class _Payload:
    """Unpickling this would run code (writes a file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_even_when_pickle_is_allowed(saved, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(saved / "config.json", folder / "config.json")
    marker = tmp_path / "ran"
    torch.save({"transformer.wte.weight": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError) as info:
        load_model(str(folder), device="cpu", allow_pickle=True)
    assert info.value.diagnostics[0].code == "model.pickle-refused"
    assert not marker.exists()


def test_a_folder_without_weights_says_so(saved, tmp_path):
    folder = tmp_path / "bare"
    folder.mkdir()
    shutil.copy(saved / "config.json", folder / "config.json")
    with pytest.raises(ModelError, match="has no weights"):
        load_model(str(folder), device="cpu")


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize("changes, fragment", [
    ({"n_head": 0}, "config.json has n_head=0; it must be at least 1"),
    ({"n_layer": 0}, "config.json has n_layer=0; it must be at least 1"),
    ({"n_embd": 30}, "config.json has n_embd=30; it must be a multiple of the number of heads"),
    ({"vocab_size": -3}, "config.json has vocab_size=-3"),
    ({"n_head": "four"}, "config.json.*n_head"),
])
def test_an_impossible_config_is_a_model_error_naming_the_field(saved, tmp_path, changes,
                                                               fragment):
    folder = _copy(saved, tmp_path)
    _edit_config(folder, **changes)
    for load in (known_shape, lambda name: load_model(name, device="cpu")):
        with pytest.raises(ModelError, match=fragment):
            load(str(folder))


def test_a_config_that_is_not_json_is_a_model_error(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot read .*config.json"):
        known_shape(str(folder))


def _remote_code_folder(saved, tmp_path, model_type):
    folder = _copy(saved, tmp_path, f"remote-{model_type}")
    marker = tmp_path / f"ran-{model_type}"
    _edit_config(folder, model_type=model_type,
                 auto_map={"AutoConfig": "evil.EvilConfig",
                           "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        f"class EvilConfig(GPT2Config):\n    model_type = {model_type!r}\n"
        "class EvilModel(GPT2LMHeadModel):\n    config_class = EvilConfig\n")
    return folder, marker


def test_a_config_asking_to_run_the_folders_code_never_prompts_or_runs_it(saved, tmp_path):
    folder, marker = _remote_code_folder(saved, tmp_path, "evilgpt")
    # a fresh interpreter answering "y" to any question: transformers asked on stdout
    # during the shape lookup, and "y" ran evil.py
    code = ("from circuitlang.models import known_shape, load_model\n"
            "from circuitlang.errors import ModelError\n"
            "for call in (known_shape, load_model):\n"
            f"    try:\n        call({str(folder)!r})\n"
            "    except ModelError as e:\n        print('MODELERROR', e.diagnostics[0].code)\n")
    out = subprocess.run([sys.executable, "-c", code], input="y\ny\ny\n", capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.stdout.count("MODELERROR model.remote-code") == 2, out.stderr[-2000:]
    assert "[y/N]" not in out.stdout
    assert not marker.exists()


def test_a_supported_architecture_with_an_auto_map_loads_the_built_in_code(saved, tmp_path):
    folder, marker = _remote_code_folder(saved, tmp_path, "gpt2")
    assert known_shape(str(folder)).architecture == "gpt2"
    load_model(str(folder), device="cpu")
    assert not marker.exists()


# ------------------------------------------------------------------ tokenizers


def test_a_folder_without_a_tokenizer_loads_with_none(saved):
    # transformers 5 builds an empty tokenizer for such a folder instead of raising
    assert load_model(str(saved), device="cpu").tokenizer is None


def test_a_tokenizer_can_be_given_for_a_folder_without_one(saved, tmp_path):
    toks = tmp_path / "tok"
    toks.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(toy_dir("toy-ioi") / name, toks / name)
    lm = load_model(str(saved), device="cpu", tokenizer=str(toks))
    assert lm.tokenizer is not None and len(lm.tokenizer) > 100
    with pytest.raises(ModelError, match="could not load tokenizer") as info:
        load_model(str(saved), device="cpu", tokenizer=str(tmp_path / "nope"))
    assert info.value.diagnostics[0].code == "model.bad-tokenizer"
    empty = tmp_path / "empty-tok"
    shutil.copytree(saved, empty)  # a model folder: AutoTokenizer builds an empty one
    with pytest.raises(ModelError, match="empty vocabulary"):
        load_model(str(saved), device="cpu", tokenizer=str(empty))


# ------------------------------------------------------------------ devices, names


def test_a_device_this_machine_lacks_is_a_clear_error(saved, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(CircuitlangError, match="device cuda: this torch"):
        load_model(str(saved), device="cuda")


def test_architecture_is_the_models_own_type(build_tiny, tmp_path):
    from circuitlang.models import LoadedModel

    assert known_shape("Qwen/Qwen2-0.5B").architecture == "qwen2"
    assert known_shape("mistralai/Mistral-7B-v0.1").architecture == "mistral"
    assert LoadedModel.from_hf(build_tiny("qwen2")).shape.architecture == "qwen2"
    build_tiny("qwen2").save_pretrained(tmp_path / "q")
    assert known_shape(str(tmp_path / "q")).architecture == "qwen2"


def test_embedded_toys_say_which_task_parameters_they_need():
    meta = json.loads((toy_dir("toy-ioi") / "circuitlang.json").read_text())
    assert model_task_params("toy-ioi") == {"prepend_bos": meta["prepend_bos"]}
    assert model_task_params("gpt2") == {}
