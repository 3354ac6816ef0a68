"""Models placed with `device_map` (accelerate's dispatch, CPU and disk offload) give the
numbers the same model gives on one device: plain logits, node patches, a head sweep, edge
patches (resumed from a clean pass too), EAP scores and a check.

A GPT-2 and a Llama model are built from configs, saved, and loaded back twice with the
real loading code: once whole, once with some layers on "cpu" and some offloaded to
"disk" (their weights on the `meta` device, read from an offload folder while a layer
runs). circuitlang's hooks read some weights themselves (a head's q/k/v slice, W_O);
`circuitlang.models.offload` reads an offloaded layer's from accelerate's map.
"""
from __future__ import annotations

import pytest
import torch

import circuitlang
from circuitlang.errors import ModelError
from circuitlang.models import EdgePatch, Patch, load_model
from circuitlang.models.offload import is_offloaded
from circuitlang.sites import Channel, Head, Mlp

pytest.importorskip("accelerate", reason="device_map needs accelerate (pip install 'circuitlang[offload]')")

MAPS = {
    "gpt2": {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "disk",
             "transformer.h.1": "cpu", "transformer.h.2": "disk", "transformer.ln_f": "cpu", "lm_head": "cpu"},
    "llama": {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "disk",
              "model.layers.1": "cpu", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"},
}
#: GPU 0 for layer 1 and the ends; layer 0 offloaded to CPU memory, layer 2 to disk.
GPU_MAPS = {
    "gpt2": {"transformer.wte": 0, "transformer.wpe": 0, "transformer.h.0": "cpu", "transformer.h.1": 0,
             "transformer.h.2": "disk", "transformer.ln_f": 0, "lm_head": 0},
    "llama": {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": "cpu", "model.layers.1": 0,
              "model.layers.2": "disk", "model.norm": 0, "lm_head": 0},
}
TASK = {"length": 4, "vocab": 50}


@pytest.fixture(scope="module", params=sorted(MAPS))
def pair(request, tmp_path_factory, build_tiny):
    """(whole model, the same model with layers 0 and 2 on disk, layer 1 on cpu)."""
    folder = tmp_path_factory.mktemp(f"offload-{request.param}")
    build_tiny(request.param).save_pretrained(folder)
    whole = load_model(folder, device="cpu")
    split = load_model(folder, device_map=MAPS[request.param], offload_folder=folder / "offload")
    return whole, split


def test_layers_are_really_offloaded(pair):
    _, split = pair
    assert split.hf_model.hf_device_map["transformer.h.0" if split.shape.architecture == "gpt2"
                                         else "model.layers.0"] == "disk"
    offloaded = [name for name, module in split.hf_model.named_modules() if is_offloaded(module)]
    assert offloaded, "no module has its weights offloaded"
    assert split.device == torch.device("cpu")


def test_plain_logits_and_node_patches_match(pair, tokens):
    whole, split = pair
    clean, corrupt = tokens
    torch.testing.assert_close(split.run(clean).logits, whole.run(clean).logits, rtol=0, atol=0)
    sites = [Head(0, 1), Head(2, 3, Channel.Q), Head(2, 1, Channel.K), Mlp(1), Head(0, 2, Channel.PATTERN)]
    donor = whole.run(corrupt, capture=sites).cache
    donor_split = split.run(corrupt, capture=sites).cache
    for site in sites:
        torch.testing.assert_close(donor_split[site], donor[site], rtol=0, atol=0)
    patches = [Patch(s, donor[s]) for s in sites]
    torch.testing.assert_close(split.run(clean, patches=patches).logits,
                               whole.run(clean, patches=patches).logits, rtol=0, atol=1e-6)


def test_edge_patches_and_resume_match(pair, tokens):
    whole, split = pair
    clean, corrupt = tokens
    es = whole.edge_set()
    ablated = whole.run(corrupt, capture=es.senders).cache
    g = torch.Generator().manual_seed(3)
    mask = (torch.rand(clean.shape[0], len(es.receivers), len(es.senders), generator=g) < 0.4).float()
    patch = EdgePatch.from_set(es, ablated, mask * es.valid())
    want = whole.run(clean, edges=patch).logits
    torch.testing.assert_close(split.run(clean, edges=patch).logits, want, rtol=0, atol=1e-5)
    # resuming replaces the blocks' forward for one run: accelerate's must come back after
    receivers_above = torch.tensor([not hasattr(r, "layer") or r.layer >= 2 for r in es.receivers])
    late = EdgePatch.from_set(es, ablated, mask * es.valid() * receivers_above[None, :, None])
    resumed = split.run(clean, edges=late, resume=(split.clean_pass(clean, senders=es.senders), 2)).logits
    torch.testing.assert_close(resumed, whole.run(clean, edges=late).logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(split.run(clean).logits, whole.run(clean).logits, rtol=0, atol=0)


def test_sweep_and_eap_match(pair):
    whole, split = pair
    sweeps = [circuitlang.run("patch head * at END", model=m, task="induction", n=4, task_params=TASK)[0]
              for m in (whole, split)]
    torch.testing.assert_close(torch.as_tensor(sweeps[1].values), torch.as_tensor(sweeps[0].values),
                               rtol=0, atol=1e-6)
    found = [circuitlang.discover(model=m, task="induction", method="eap", n=4, edges=5, with_curve=False,
                                  check=False, task_params=TASK) for m in (whole, split)]
    torch.testing.assert_close(found[1].scores.edges, found[0].scores.edges, rtol=1e-5, atol=1e-6)
    assert found[1].text == found[0].text


def test_check_matches(pair):
    whole, split = pair
    text = "task induction\nmetric logit_diff\nhead 1.0 moves next to END\n"
    results = [circuitlang.check(text, model=m, n=6, permutations=0, breakdown=False, task_params=TASK)
               for m in (whole, split)]
    assert results[1].scrubbed.value == pytest.approx(results[0].scrubbed.value, abs=1e-5)
    assert results[1].clean.value == pytest.approx(results[0].clean.value, abs=1e-6)


def test_bad_device_maps_are_model_errors(tmp_path, build_tiny):
    build_tiny("gpt2").save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="unknown device_map"):
        load_model(tmp_path, device_map="everywhere")
    with pytest.raises(ModelError, match="both device"):
        load_model(tmp_path, device="cpu", device_map="auto")
    with pytest.raises(ModelError, match="is not a device"):
        load_model(tmp_path, device_map={"transformer": 1.5})
    with pytest.raises(ModelError, match="does not have"):
        load_model(tmp_path, device_map={"transformer.nothing": "cpu"})


def test_edges_over_several_compute_devices_are_refused(pair, tokens, monkeypatch):
    """Only reachable with two GPUs: the engine's delta buffer is read by every layer."""
    from circuitlang.models import run as run_module

    _, split = pair
    clean, corrupt = tokens
    es = split.edge_set()
    ablated = split.run(corrupt, capture=es.senders).cache
    monkeypatch.setattr(run_module, "execution_devices",
                        lambda model: {torch.device("cuda", 0), torch.device("cuda", 1)})
    split.free_buffers()
    with pytest.raises(ModelError, match="one compute device"):
        split.run(clean, edges=EdgePatch.from_set(es, ablated, es.mask(clean.shape[0])))
    split.free_buffers()


@pytest.mark.gpu
@pytest.mark.parametrize("arch", sorted(MAPS))
def test_gpu_with_cpu_and_disk_offload_matches_the_cpu_model(arch, tmp_path, build_tiny, tokens):
    """Layer 1 on the GPU, the others offloaded to CPU memory and disk: every layer computes
    on the GPU (accelerate moves the weights in), and the numbers are the CPU model's."""
    build_tiny(arch).save_pretrained(tmp_path)
    whole = load_model(tmp_path, device="cpu")
    split = load_model(tmp_path, device_map=GPU_MAPS[arch], offload_folder=tmp_path / "offload")
    assert split.device.type == "cuda"
    clean, corrupt = tokens
    torch.testing.assert_close(split.run(clean).logits.cpu(), whole.run(clean).logits, rtol=1e-4, atol=1e-4)
    es = whole.edge_set()
    mask = es.mask(clean.shape[0]) * 0.5
    want = whole.run(clean, edges=EdgePatch.from_set(es, whole.run(corrupt, capture=es.senders).cache, mask))
    got = split.run(clean, edges=EdgePatch.from_set(es, split.run(corrupt, capture=es.senders).cache, mask))
    torch.testing.assert_close(got.logits.cpu(), want.logits, rtol=1e-4, atol=1e-4)
