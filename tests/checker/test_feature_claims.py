"""Neurons and SAE latents in the checker's statements: path patching from a neuron or a
latent (each equal to a hand-written oracle), node attribution with its top-k checked
exactly, and a site the scrubber has no node for refused with a clear message."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import circuitlang
from circuitlang.errors import LowerError
from circuitlang.sites import AllLatents, Dictionary, Latent, Position, SaeError


@pytest.fixture(scope="module")
def toy():
    from circuitlang.models import load_model
    from circuitlang.models.known import model_task_params
    from circuitlang.tasks import load_task

    lm = load_model("toy-ioi")
    task = load_task("ioi", lm.tokenizer, **model_task_params("toy-ioi"))
    return lm, task, task.prompts(8, 0)


def _saelens(folder, w):
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(w, str(folder / "sae_weights.safetensors"))
    d_in, d_sae = w["W_enc"].shape
    (folder / "cfg.json").write_text(json.dumps({"d_in": d_in, "d_sae": d_sae, "architecture": "standard",
                                                 "apply_b_dec_to_input": False}))


def _random_sae(folder, d: int, d_sae: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    _saelens(folder, {"W_enc": torch.randn(d, d_sae, generator=g) / d ** 0.5, "b_enc": torch.zeros(d_sae),
                      "W_dec": torch.randn(d_sae, d, generator=g) * 0.2, "b_dec": torch.zeros(d)})


def test_path_patching_from_a_neuron_equals_a_hook_oracle(toy, tmp_path):
    """`patch neurons 1.3, 1.90 -> logits at END`: only the neuron's direct write reaches the
    logits; the oracle adds (corrupt - clean activation) * W_out[n] to the final stream at
    END with plain torch hooks on the HF modules."""
    lm, task, prompts = toy
    (tmp_path / "h.circ").write_text("samples 8\nseed 0\npatch neurons 1.3, 1.90 -> logits at END\n")
    result = circuitlang.check(str(tmp_path / "h.circ"), model="toy-ioi", task="ioi")
    (found,) = result.experiments
    hf = lm.hf_model
    end = prompts.positions["END"]
    rows = torch.arange(len(end))
    for k, unit in enumerate((3, 90)):
        acts = {}

        def keep(module, args, which):
            acts[which] = args[0][rows, end, unit].detach()

        proj = hf.transformer.h[1].mlp.c_proj
        for which, ids in (("clean", prompts.input_ids), ("corrupt", prompts.corrupt_input_ids)):
            handle = proj.register_forward_pre_hook(lambda m, a, which=which: keep(m, a, which))
            with torch.no_grad():
                hf(input_ids=ids, attention_mask=prompts.attention_mask)
            handle.remove()
        write = (acts["corrupt"] - acts["clean"])[:, None] * proj.weight[unit].detach()

        def add(module, args):
            x = args[0].clone()
            x[rows, end] += write
            return (x,)

        handle = hf.transformer.ln_f.register_forward_pre_hook(add)
        with torch.no_grad():
            logits = hf(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask).logits
        handle.remove()
        oracle = task.metric("logit_diff", logits, prompts).numpy()
        np.testing.assert_allclose(found.per_prompt[k], oracle, rtol=1e-4, atol=1e-4)
    assert [str(s) for s in found.sites] == ["neuron 1.3 -> logits", "neuron 1.90 -> logits"]


def test_path_patching_a_final_stream_latent_equals_patching_it(toy, tmp_path):
    """From an SAE at the final stream the only path is to the logits: path patching a latent
    (or the error term) to the logits measures what patching it does."""
    lm, _, _ = toy
    d, n = lm.shape.d_model, lm.shape.n_layers
    g = torch.Generator().manual_seed(0)
    _saelens(tmp_path / "final", {"W_enc": torch.randn(d, 24, generator=g) / d ** 0.5, "b_enc": torch.zeros(24),
                                  "W_dec": torch.randn(24, d, generator=g) * 0.3, "b_dec": torch.zeros(d)})
    (tmp_path / "h.circ").write_text(
        f'sae s = "final" at resid {n}\nsamples 8\nseed 0\n'
        "patch feature s.* -> logits at END\npatch feature s.* at END\n"
        "patch error s -> logits at END\npatch error s at END\n")
    result = circuitlang.check(str(tmp_path / "h.circ"), model="toy-ioi", task="ioi")
    path, node, err_path, err_node = result.experiments
    assert path.grid == (24,) and node.grid == (24,)
    moved = np.abs(node.to_numpy("values") - node.clean) > 1e-6
    assert moved.sum() >= 3  # some latents are on and matter
    np.testing.assert_allclose(path.to_numpy("values"), node.to_numpy("values"), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(err_path.to_numpy("values"), err_node.to_numpy("values"), rtol=1e-4, atol=1e-4)


def test_attribution_over_latents_with_top_k_checked_exactly(toy, tmp_path):
    from circuitlang.experiments import Experiments

    lm, task, prompts = toy
    _random_sae(tmp_path / "res2", lm.shape.d_model, 32, seed=1)
    sae = Dictionary("s", str(tmp_path / "res2"), "resid", 2, 32)
    runner = Experiments(lm, task, prompts, "logit_diff")
    found = runner.attribution([AllLatents(sae), SaeError(sae)], Position("END"), top_k=3)
    assert found.kind == "attribution" and found.extra["passes"] == 2
    assert found.sites[:2] == [Latent(sae, 0), Latent(sae, 1)] and found.sites[-1] == SaeError(sae)
    top = found.extra["top_k"]
    assert len(top) == 3
    for entry in top.values():  # measured by exact patching; the estimate has its sign
        assert np.isfinite(entry["measured"])
        assert np.sign(entry["estimated"]) == np.sign(entry["measured"]) or abs(entry["measured"]) < 1e-3


def test_patch_attribution_in_the_language_is_the_runners_attribution(toy, tmp_path):
    """`patch feature s.* at END attribution` and `patch neuron 1.* at END attribution`: the
    estimates of `Experiments.attribution`, the strongest ten patched exactly and shown;
    heads are refused (attribution estimates units)."""
    from circuitlang.errors import ResolveError
    from circuitlang.experiments import Experiments
    from circuitlang.sites import AllNeurons

    lm, task, prompts = toy
    _random_sae(tmp_path / "res2", lm.shape.d_model, 32, seed=1)
    (tmp_path / "h.circ").write_text('sae s = "res2" at resid 2\nsamples 8\nseed 0\n'
                                     "patch feature s.* at END attribution\npatch neuron 1.* at END attribution\n")
    latents, neurons = circuitlang.check(str(tmp_path / "h.circ"), model="toy-ioi", task="ioi").experiments
    runner = Experiments(lm, task, prompts, "logit_diff")
    sae = Dictionary("s", str(tmp_path / "res2"), "resid", 2, 32)
    for found, sites in ((latents, [AllLatents(sae)]), (neurons, [AllNeurons(1)])):
        direct = runner.attribution(sites, Position("END"))
        assert found.kind == "attribution" and len(found.sites) == len(direct.sites)
        np.testing.assert_allclose(found.to_numpy("values"), direct.to_numpy("values"), rtol=1e-5, atol=1e-5)
        assert len(found.extra["top_k"]) == 10
        assert "the 10 strongest estimates, patched exactly" in found.render()
    with pytest.raises(ResolveError, match="head 1.0 cannot be patched by attribution"):
        circuitlang.check("patch head 1.* at END attribution\n", model="toy-ioi", task="ioi")


def test_a_site_the_scrubber_has_no_node_for_is_refused_clearly():
    """Neurons, latents and errors are nodes now (tests/checker/test_unit_claims.py); a
    residual stream is the sum of its senders, not one of them."""
    with pytest.raises(LowerError, match="resid 1 cannot take part in a causal scrubbing graph") as info:
        circuitlang.check("resid 1 at END depends on IO\n", model="toy-ioi", task="ioi")
    assert "neurons" in info.value.hint


def test_a_long_unit_sweep_renders_its_strongest_sites():
    from circuitlang.experiments import ExperimentResult
    from circuitlang.sites import Neuron

    sites = [Neuron(1, i) for i in range(300)]
    normalized = np.zeros(300)
    normalized[[7, 123, 250]] = [0.2, -0.9, 0.5]
    result = ExperimentResult("patch", "patch neuron 1.* at END", sites, 1 - normalized, normalized,
                              np.zeros((300, 2)), 1.0, 0.0, "logit_diff", (300,))
    lines = result.render().splitlines()
    assert len(lines) == 1 + 20 + 1
    assert [ln.split()[1] for ln in lines[1:4]] == ["1.123", "1.250", "1.7"]
    assert "20 strongest of 300 sites" in lines[-1]
    assert "neuron 1.123" in result._repr_html_()
    back = ExperimentResult.from_json(result.to_json())
    assert back.sites[123] == Neuron(1, 123) and back.render() == result.render()


def test_mean_ablating_neurons_and_zeroing_an_error_term_equal_hook_oracles(toy, tmp_path):
    """`ablate neurons 1.3, 1.90 with mean at END` sets both units at END to their mean there
    over the prompts; `ablate error s with zero` runs the model on the SAE's reconstruction
    (x replaced by decode(encode(x)) at every position). Oracles: plain torch hooks."""
    from circuitlang.models.sae import load_sae

    lm, task, prompts = toy
    d, hf = lm.shape.d_model, lm.hf_model
    g = torch.Generator().manual_seed(2)
    _saelens(tmp_path / "res2", {"W_enc": torch.randn(d, 24, generator=g) / d ** 0.5, "b_enc": torch.zeros(24),
                                 "W_dec": torch.randn(24, d, generator=g) * 0.3, "b_dec": torch.zeros(d)})
    (tmp_path / "h.circ").write_text('sae s = "res2" at resid 2\nsamples 8\nseed 0\n'
                                     "ablate neurons 1.3, 1.90 with mean at END\nablate error s with zero\n")
    neurons, error = circuitlang.check(str(tmp_path / "h.circ"), model="toy-ioi", task="ioi").experiments
    end, rows = prompts.positions["END"], torch.arange(8)
    units = [3, 90]
    proj = hf.transformer.h[1].mlp.c_proj
    seen = {}
    handle = proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[0][rows, end][:, units]))
    with torch.no_grad():
        hf(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask)
    handle.remove()
    mean = seen["h"].mean(0)

    def set_mean(module, args):
        h = args[0].clone()
        for j, unit in enumerate(units):
            h[rows, end, unit] = mean[j]
        return (h,)

    def metric_with(module, hook):
        handle = module.register_forward_pre_hook(hook)
        with torch.no_grad():
            logits = hf(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask).logits
        handle.remove()
        return task.metric("logit_diff", logits, prompts).numpy()

    np.testing.assert_allclose(neurons.per_prompt[0], metric_with(proj, set_mean), rtol=1e-4, atol=1e-4)
    sae = load_sae(tmp_path / "res2")

    def reconstruct(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        x_hat = sae.decode(sae.encode(x))
        return ((x_hat, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x_hat})

    handle = hf.transformer.h[2].register_forward_pre_hook(reconstruct, with_kwargs=True)
    with torch.no_grad():
        logits = hf(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask).logits
    handle.remove()
    oracle = task.metric("logit_diff", logits, prompts).numpy()
    np.testing.assert_allclose(error.per_prompt[0], oracle, rtol=1e-4, atol=1e-4)
    assert abs(float(np.ravel(error.values)[0]) - error.clean) > 1e-3  # the error term matters here


def test_path_patching_into_a_latent_equals_an_oracle(toy, tmp_path):
    """`patch head 1.* -> feature s.3 at END`: each head's corrupt-minus-clean output reaches
    latent 3's encoder only; the stream moves by (re-encoded latent - latent) x its decoder
    row. The oracle does the SAE arithmetic by hand and adds the move with a torch hook."""
    from circuitlang.models.sae import load_sae
    from circuitlang.sites import Head, Resid

    lm, task, prompts = toy
    d, hf = lm.shape.d_model, lm.hf_model
    g = torch.Generator().manual_seed(3)
    _saelens(tmp_path / "res2", {"W_enc": torch.randn(d, 8, generator=g) / d ** 0.5, "b_enc": torch.full((8,), 0.5),
                                 "W_dec": torch.randn(8, d, generator=g), "b_dec": torch.zeros(d)})
    (tmp_path / "h.circ").write_text('sae s = "res2" at resid 2\nsamples 8\nseed 0\n'
                                     "patch head 1.* -> feature s.3 at END\n")
    (found,) = circuitlang.check(str(tmp_path / "h.circ"), model="toy-ioi", task="ioi").experiments
    assert found.grid == (lm.shape.n_heads,)
    sae = load_sae(tmp_path / "res2")
    end, rows = prompts.positions["END"], torch.arange(8)
    heads = [Head(1, h) for h in range(lm.shape.n_heads)]
    clean = lm.run(prompts.input_ids, prompts.attention_mask, capture=heads + [Resid(2)]).cache
    corrupt = lm.run(prompts.corrupt_input_ids, prompts.attention_mask, capture=heads).cache
    x = clean[Resid(2)][rows, end]
    for h, head in enumerate(heads):
        x_new = x + (corrupt[head] - clean[head])[rows, end]
        move = (sae.encode(x_new)[:, 3] - sae.encode(x)[:, 3])[:, None] * sae.W_dec[3]

        def add(module, args, kwargs, move=move):
            s = (args[0] if args else kwargs["hidden_states"]).clone()
            s[rows, end] += move
            return ((s, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": s})

        handle = hf.transformer.h[2].register_forward_pre_hook(add, with_kwargs=True)
        with torch.no_grad():
            logits = hf(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask).logits
        handle.remove()
        oracle = task.metric("logit_diff", logits, prompts).numpy()
        np.testing.assert_allclose(found.per_prompt[h], oracle, rtol=1e-4, atol=1e-4)
    assert np.abs(found.to_numpy("values") - found.clean).max() > 1e-4  # some head moves it


def test_which_senders_reach_a_latent():
    from circuitlang import topology
    from circuitlang.sites import Embed, Head, Mlp, Neuron

    at = {hook: Latent(Dictionary("s", "/x", hook, 2, 10), 0) for hook in ("resid", "attn", "mlp")}
    assert topology.edge_exists(None, Mlp(1), at["resid"]) and topology.edge_exists(None, Embed(), at["resid"])
    assert not topology.edge_exists(None, Head(2, 0), at["resid"])
    assert not topology.edge_exists(None, Latent(at["resid"].sae, 1), at["resid"])  # its own dictionary
    assert topology.edge_exists(None, Head(2, 1), at["attn"]) and not topology.edge_exists(None, Head(1, 1), at["attn"])
    assert topology.edge_exists(None, Neuron(2, 5), at["mlp"]) and not topology.edge_exists(None, Mlp(1), at["mlp"])
