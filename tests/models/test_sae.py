"""SAE latents: both formats read from folders built here, pickles refused, encode/decode as
each format defines them, the splice with its error term exactly the plain forward pass, and
a planted latent found by `patch feature s.* at END` while a wrong index moves nothing."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from circuitlang.errors import CircuitlangError, ModelError
from circuitlang.models import LoadedModel, Patch
from circuitlang.models.sae import load_sae, read_sae_info
from circuitlang.sites import Dictionary, Latent, Resid, SaeError

D, N = 32, 96  # the tiny models' d_model; latents


def _weights(seed: int = 0, d: int = D, n: int = N) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d, n, generator=g) / d ** 0.5, "b_enc": torch.randn(n, generator=g) * 0.1,
            "W_dec": torch.randn(n, d, generator=g) / n ** 0.5, "b_dec": torch.randn(d, generator=g) * 0.1}


def save_saelens(folder, w: dict, **cfg) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in w.items()}, str(folder / "sae_weights.safetensors"))
    d_in, d_sae = w["W_enc"].shape
    config = {"d_in": d_in, "d_sae": d_sae, "architecture": "standard", "apply_b_dec_to_input": True,
              "normalize_activations": "none", **cfg}
    (folder / "cfg.json").write_text(json.dumps(config))
    return str(folder)


def save_sparsify(folder, w: dict, k: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"encoder.weight": w["W_enc"].t().contiguous(), "encoder.bias": w["b_enc"],
               "W_dec": w["W_dec"].contiguous(), "b_dec": w["b_dec"]}
    save_file(tensors, str(folder / "sae.safetensors"))
    d_in, d_sae = w["W_enc"].shape
    (folder / "cfg.json").write_text(json.dumps({"d_in": d_in, "num_latents": d_sae, "k": k,
                                                  "expansion_factor": d_sae // d_in, "normalize_decoder": True}))
    return str(folder)


# ---- the loaders -----------------------------------------------------------------------
def test_saelens_folder_reads_and_encodes_as_saelens_does(tmp_path):
    w = _weights()
    sae = load_sae(save_saelens(tmp_path / "res1", w))
    assert (sae.format, sae.d_in, sae.d_sae, sae.activation) == ("saelens", D, N, "relu")
    x = torch.randn(5, D)
    f = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae.decode(f), f @ w["W_dec"] + w["b_dec"])


def test_saelens_jumprelu_topk_and_norm_rescale(tmp_path):
    w = _weights(1)
    x = torch.randn(4, D) * 3
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    threshold = torch.full((N,), 0.2)
    jump = load_sae(save_saelens(tmp_path / "jump", {**w, "threshold": threshold}, architecture="jumprelu"))
    torch.testing.assert_close(jump.encode(x), pre * (pre > 0.2))
    topk = load_sae(save_saelens(tmp_path / "topk", w, architecture="topk", activation_fn_kwargs={"k": 5}))
    f = topk.encode(x)
    assert int((f > 0).sum(-1).max()) <= 5
    kept = torch.relu(pre).topk(5, -1)
    torch.testing.assert_close(f.gather(-1, kept.indices), kept.values)
    rescale = load_sae(save_saelens(tmp_path / "norm", w, normalize_activations="constant_norm_rescale"))
    scale = x.norm(dim=-1, keepdim=True) / D ** 0.5
    f = torch.relu((x / scale - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    torch.testing.assert_close(rescale.encode(x), f)
    torch.testing.assert_close(rescale.decode(f, x), (f @ w["W_dec"] + w["b_dec"]) * scale)


def test_sparsify_folder_is_a_topk_sae_that_subtracts_b_dec(tmp_path):
    w = _weights(2)
    sae = load_sae(save_sparsify(tmp_path / "layers.1", w, k=4))
    assert (sae.format, sae.activation, sae.k) == ("sparsify", "topk", 4)
    x = torch.randn(3, D)
    pre = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    top = pre.topk(4, -1)
    dense = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    torch.testing.assert_close(sae.encode(x), dense)
    torch.testing.assert_close(sae.decode(dense), dense @ w["W_dec"] + w["b_dec"])


def test_pickled_weights_are_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save(_weights(), folder / "sae_weights.pt")
    (folder / "cfg.json").write_text(json.dumps({"d_in": D, "d_sae": N}))
    with pytest.raises(ModelError, match="pickled") as info:
        load_sae(folder)
    assert info.value.diagnostics[0].code == "sae.pickle"
    with pytest.raises(ModelError, match="pickled"):
        load_sae(folder / "sae_weights.pt")


def test_a_folder_of_neither_format_names_what_was_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError) as info:
        read_sae_info(tmp_path / "empty")
    assert "sae_weights.safetensors" in info.value.hint and "sae.safetensors" in info.value.hint
    root = tmp_path / "many"
    save_sparsify(root / "layers.0", _weights(), k=4)
    save_sparsify(root / "layers.1", _weights(), k=4)
    with pytest.raises(ModelError) as info:
        read_sae_info(root)
    assert "layers.0" in info.value.hint and "layers.1" in info.value.hint
    with pytest.raises(ModelError, match="does not exist"):
        read_sae_info(tmp_path / "nowhere")


def test_missing_tensor_and_gated_are_clear_errors(tmp_path):
    w = _weights()
    del w["b_dec"]
    with pytest.raises(ModelError, match="b_dec"):
        load_sae(save_saelens(tmp_path / "a", w))
    with pytest.raises(ModelError, match="gated"):
        load_sae(save_saelens(tmp_path / "b", _weights(), architecture="gated"))


# ---- the splice -------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
@pytest.mark.parametrize("hook,layer", [("resid", 1), ("attn", 0), ("mlp", 2), ("resid", 3)])
def test_splice_with_error_term_is_the_plain_forward_pass(tmp_path, build_tiny, arch, hook, layer):
    lm = LoadedModel.from_hf(build_tiny(arch), name=f"tiny-{arch}")
    path = save_saelens(tmp_path / "sae", _weights(3))
    d = Dictionary("s", path, hook, layer, N)
    ids = torch.randint(0, 61, (2, 6), generator=torch.Generator().manual_seed(0))
    plain = lm.run(ids).logits
    sites = [Latent(d, i) for i in range(N)] + [SaeError(d)]
    run = lm.run(ids, capture=sites)
    assert torch.equal(run.logits, plain)  # capturing changes nothing
    # every latent and the error term patched with their own values: exactly the plain pass
    again = lm.run(ids, patches=[Patch(s, run.cache[s]) for s in sites])
    assert torch.equal(again.logits, plain)
    # the error term is what the dictionary misses: decode(f) + error is the hook point
    sae = load_sae(path)
    f = torch.stack([run.cache[Latent(d, i)] for i in range(N)], -1)
    if hook == "resid":
        x = lm.run(ids, capture=[Resid(layer)]).cache[Resid(layer)]
        torch.testing.assert_close(sae.decode(f) + run.cache[SaeError(d)], x, rtol=1e-5, atol=1e-5)
    # dropping the error term (SAE reconstruction only) changes the output
    zero = lm.run(ids, patches=[Patch(SaeError(d), torch.zeros_like(run.cache[SaeError(d)]))]).logits
    assert not torch.allclose(zero, plain, atol=1e-4)


def test_sparsify_splice_is_exact_and_a_latent_patch_moves_along_its_decoder_row(tmp_path, build_tiny):
    lm = LoadedModel.from_hf(build_tiny("gpt2"), name="tiny-gpt2")
    d = Dictionary("s", save_sparsify(tmp_path / "layers.2", _weights(4), k=8), "resid", 2, N)
    ids = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(1))
    plain = lm.run(ids, capture=[Resid(2)])
    run = lm.run(ids, capture=[Latent(d, i) for i in range(N)] + [SaeError(d)])
    assert torch.equal(run.logits, plain.logits)
    f = torch.stack([run.cache[Latent(d, i)] for i in range(N)], -1)
    on = int(f[0, 2].argmax())
    moved = lm.run(ids, patches=[Patch(Latent(d, on), f[..., on] + 1.0)], capture=[Resid(2)])
    w_dec = load_sae(d.path).W_dec
    torch.testing.assert_close(moved.cache[Resid(2)] - plain.cache[Resid(2)],
                               w_dec[on].expand(2, 5, D), rtol=1e-5, atol=1e-5)


def test_latent_index_out_of_range_and_width_mismatch(tmp_path, build_tiny):
    lm = LoadedModel.from_hf(build_tiny("gpt2"), name="tiny-gpt2")
    ids = torch.zeros(1, 3, dtype=torch.long)
    d = Dictionary("s", save_saelens(tmp_path / "ok", _weights()), "resid", 1)
    with pytest.raises(ModelError, match=f"latents 0-{N - 1}"):
        lm.run(ids, capture=[Latent(d, N)])
    wide = Dictionary("w", save_saelens(tmp_path / "wide", _weights(d=48)), "resid", 1)
    with pytest.raises(ModelError, match="width 48"):
        lm.run(ids, capture=[SaeError(wide)])


# ---- a planted latent, through the language ------------------------------------------------
def test_patch_feature_sweep_finds_a_planted_latent(tmp_path):
    """An SAE at the final stream of toy-ioi whose latent 5 is exactly the direction the
    clean and corrupt prompts differ along (measured independently), always on; every other
    latent is always off. `patch feature s.* at END` puts latent 5 first; a wrong index moves
    nothing."""
    import circuitlang
    from circuitlang.models import load_model
    from circuitlang.models.known import model_task_params
    from circuitlang.tasks import load_task

    lm = load_model("toy-ioi")
    task = load_task("ioi", lm.tokenizer, **model_task_params("toy-ioi"))
    prompts = task.prompts(12, 0)
    n = lm.shape.n_layers
    end = prompts.positions["END"]
    rows = torch.arange(len(end))
    clean = lm.run(prompts.input_ids, prompts.attention_mask, capture=[Resid(n)]).cache[Resid(n)][rows, end]
    corrupt = lm.run(prompts.corrupt_input_ids, prompts.attention_mask,
                     capture=[Resid(n)]).cache[Resid(n)][rows, end]
    direction = (clean - corrupt).mean(0)
    direction = direction / direction.norm()
    d_model, d_sae, planted = lm.shape.d_model, 16, 5
    g = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(d_model, d_sae, generator=g) * 0.01, "b_enc": torch.full((d_sae,), -1e3),
         "W_dec": torch.randn(d_sae, d_model, generator=g) * 0.1, "b_dec": torch.zeros(d_model)}
    w["W_enc"][:, planted] = direction
    w["b_enc"][planted] = 1e3  # always on: f = x . direction + 1000
    w["W_dec"][planted] = direction
    save_saelens(tmp_path / "final", w, apply_b_dec_to_input=False)
    (tmp_path / "h.circ").write_text(
        f'sae s = "final" at resid {n}\nsamples 12\nseed 0\npatch feature s.* at END\n'
        f"patch feature s.{planted} at END\npatch feature s.3 at END\n")
    result = circuitlang.check(str(tmp_path / "h.circ"), model="toy-ioi", task="ioi")
    sweep, right, wrong = result.experiments
    normalized = sweep.to_numpy("normalized")
    assert sweep.grid == (d_sae,)
    assert int(abs(normalized).argmax()) == planted
    assert normalized[planted] > 0.05  # one direction of the final stream carries ~10% of the gap
    assert abs(normalized[[i for i in range(d_sae) if i != planted]]).max() < 1e-6
    assert abs(right.to_numpy("normalized")[0] - normalized[planted]) < 1e-6
    assert abs(wrong.to_numpy("normalized")[0]) < 1e-6


def test_sae_declaration_errors(tmp_path):
    from circuitlang.ast_to_ir import resolve_text

    save_saelens(tmp_path / "ok", _weights(d=64, n=20))
    (tmp_path / "pick").mkdir()
    torch.save({}, tmp_path / "pick" / "sae_weights.pt")
    text = ('sae a = "ok" at resid 1\nsae b = "pick" at resid 1\nsae c = "../x" at mlp 0\n'
            "feature a.20 at END depends on IO\nerror zz -> logits at END\n")
    with pytest.raises(CircuitlangError) as info:
        resolve_text(text, model="toy-ioi", task="ioi", filename=str(tmp_path / "h.circ"))
    codes = [d.code for d in info.value.diagnostics]
    assert codes == ["sae.pickle", "resolve.sae_outside", "resolve.latent_range", "resolve.sae"]
    assert "feature b" not in str(info.value)  # a refused declaration's uses are not reported again


def test_an_sae_is_declared_where_it_was_trained(tmp_path):
    from circuitlang.ast_to_ir import resolve_text

    save_saelens(tmp_path / "post1", _weights(d=64, n=20), hook_name="blocks.1.hook_resid_post")
    save_saelens(tmp_path / "z", _weights(d=64, n=20), hook_name="blocks.1.attn.hook_z")
    save_saelens(tmp_path / "mlp1", _weights(d=64, n=20), hook_name="blocks.1.hook_mlp_out")
    save_sparsify(tmp_path / "layers.0", _weights(d=64, n=20), k=4)
    save_sparsify(tmp_path / "layers.1.self_attn", _weights(d=64, n=20), k=4)
    good = ('sae a = "post1" at resid 2\nsae m = "mlp1" at mlp 1\nsae s = "layers.0" at resid 1\n'
            'sae t = "layers.1.self_attn" at attn 1\n')
    hypothesis = resolve_text(good, model="toy-ioi", task="ioi", filename=str(tmp_path / "h.circ"))
    assert [(d.hook, d.layer) for d in hypothesis.saes] == [("resid", 2), ("mlp", 1), ("resid", 1), ("attn", 1)]
    bad = 'sae a = "post1" at resid 1\nsae z = "z" at attn 1\nsae s = "layers.0" at resid 0\n'
    with pytest.raises(CircuitlangError) as info:
        resolve_text(bad, model="toy-ioi", task="ioi", filename=str(tmp_path / "h.circ"))
    messages = [(d.code, d.message, d.hint) for d in info.value.diagnostics]
    assert [m[0] for m in messages] == ["sae.hook"] * 3
    assert "blocks.1.hook_resid_post, which is resid 2, not resid 1" in messages[0][1]
    assert "hook_z" in messages[1][1]
    assert messages[2][2] == "declare it `at resid 1`"


# ---- attribution over latents ----------------------------------------------------------------
def test_latent_attribution_is_gradient_times_difference_in_two_passes(tmp_path, build_tiny):
    """Every latent and the error term scored at once; each equals a hand-computed oracle:
    the gradient of the metric with respect to the plain model's stream (no SAE) times the
    latent's corrupt-minus-clean change along its decoder row."""
    from circuitlang.models.attribution import attribute_nodes
    from circuitlang.sites import AllLatents

    lm = LoadedModel.from_hf(build_tiny("gpt2"), name="tiny-gpt2")
    d = Dictionary("s", save_saelens(tmp_path / "sae", _weights(5)), "resid", 2, N)
    g = torch.Generator().manual_seed(2)
    clean, corrupt = torch.randint(0, 61, (6, 5), generator=g), torch.randint(0, 61, (6, 5), generator=g)
    end = torch.full((6,), 4)

    def metric(logits, rows):
        return logits[:, -1, 3] - logits[:, -1, 4]

    found = attribute_nodes(lm, clean, corrupt, metric, [AllLatents(d), SaeError(d)], positions=end, batch_size=4)
    assert found.passes == 4  # two batches, two passes each
    assert len(found.sites) == N + 1 and found.sites[0] == Latent(d, 0) and found.sites[-1] == SaeError(d)
    sae = load_sae(d.path)
    plain = lm.run(clean, capture=[Resid(2)], grad=True)
    grad_x, = torch.autograd.grad(metric(plain.logits, None).sum(), [plain.cache[Resid(2)]])
    x_clean = plain.cache[Resid(2)].detach()[:, 4]
    x_corrupt = lm.run(corrupt, capture=[Resid(2)]).cache[Resid(2)][:, 4]
    df = sae.encode(x_corrupt) - sae.encode(x_clean)  # [6, N]
    oracle = df * (grad_x[:, 4] @ sae.W_dec.T)  # [6, N]
    torch.testing.assert_close(found.per_prompt[:N], oracle.T, rtol=1e-4, atol=1e-6)
    err_oracle = ((sae.error(x_corrupt) - sae.error(x_clean)) * grad_x[:, 4]).sum(-1)
    torch.testing.assert_close(found.per_prompt[N], err_oracle, rtol=1e-4, atol=1e-6)
    top = found.top(3)
    assert abs(top[0][1]) >= abs(top[1][1]) >= abs(top[2][1])


@pytest.mark.parametrize("baseline", ["mean", "zero"])
def test_latent_attribution_moves_latents_to_their_mean_or_to_zero(tmp_path, build_tiny, baseline):
    """Under `mean` each latent moves to its mean over the clean prompts at its position,
    under `zero` to zero: the same oracle as above with that difference, and no donor
    prompts (`zero`: one pass per batch)."""
    from circuitlang.models.attribution import attribute_nodes
    from circuitlang.sites import AllLatents

    lm = LoadedModel.from_hf(build_tiny("gpt2"), name="tiny-gpt2")
    d = Dictionary("s", save_saelens(tmp_path / "sae", _weights(5)), "resid", 2, N)
    clean = torch.randint(0, 61, (6, 5), generator=torch.Generator().manual_seed(3))
    end = torch.full((6,), 4)

    def metric(logits, rows):
        return logits[:, -1, 3] - logits[:, -1, 4]

    found = attribute_nodes(lm, clean, None, metric, [AllLatents(d)], positions=end, batch_size=4,
                            baseline=baseline)
    assert found.passes == (4 if baseline == "mean" else 2)
    sae = load_sae(d.path)
    plain = lm.run(clean, capture=[Resid(2)], grad=True)
    grad_x, = torch.autograd.grad(metric(plain.logits, None).sum(), [plain.cache[Resid(2)]])
    f = sae.encode(plain.cache[Resid(2)].detach()[:, 4])  # [6, N]
    target = f.mean(0, keepdim=True) if baseline == "mean" else torch.zeros_like(f)
    oracle = (target - f) * (grad_x[:, 4] @ sae.W_dec.T)
    assert oracle.abs().max() > 1e-3  # the check can fail
    torch.testing.assert_close(found.per_prompt, oracle.T, rtol=1e-4, atol=1e-6)


def test_attribution_baselines_are_checked(build_tiny):
    from circuitlang.models.attribution import attribute_nodes
    from circuitlang.sites import AllNeurons

    lm = LoadedModel.from_hf(build_tiny("gpt2"), name="tiny-gpt2")
    ids = torch.zeros(1, 3, dtype=torch.long)
    metric = lambda logits, rows: logits[:, -1, 0]  # noqa: E731
    with pytest.raises(ModelError, match="unknown attribution baseline 'median'") as info:
        attribute_nodes(lm, ids, None, metric, [AllNeurons(0)], baseline="median")
    assert "paired, mean, zero" in info.value.hint
    with pytest.raises(ModelError, match="'paired' needs donor ids"):
        attribute_nodes(lm, ids, None, metric, [AllNeurons(0)])
    with pytest.raises(ModelError, match="'zero' takes no donor ids"):
        attribute_nodes(lm, ids, ids, metric, [AllNeurons(0)], baseline="zero")


def test_attribution_refuses_heads(build_tiny):
    from circuitlang.models.attribution import attribute_nodes
    from circuitlang.sites import Head

    lm = LoadedModel.from_hf(build_tiny("gpt2"), name="tiny-gpt2")
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ModelError, match="EAP"):
        attribute_nodes(lm, ids, ids, lambda logits, rows: logits[:, -1, 0], [Head(0, 0)])


def test_single_and_whole_latent_patches_compose(tmp_path, build_tiny):
    """A patch of one latent and a patch of every latent in one run: the whole-dictionary
    value is read after the single latent's patch, so it is what that patch made."""
    from circuitlang.sites import AllLatents

    lm = LoadedModel.from_hf(build_tiny("gpt2"), name="tiny-gpt2")
    d = Dictionary("s", save_saelens(tmp_path / "sae", _weights(6)), "resid", 1, N)
    ids = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(5))
    base = lm.run(ids, capture=[AllLatents(d)]).cache[AllLatents(d)]
    both = lm.run(ids, capture=[AllLatents(d)], patches=[Patch(Latent(d, 3), base[..., 3] + 2.0)])
    want = base.clone()
    want[..., 3] += 2.0
    torch.testing.assert_close(both.cache[AllLatents(d)], want)
    # and the run equals patching the whole dictionary with that value
    whole = lm.run(ids, patches=[Patch(AllLatents(d), want)])
    torch.testing.assert_close(whole.logits, both.logits, rtol=1e-5, atol=1e-6)
