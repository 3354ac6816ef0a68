"""Subspace sites on a planted model: a binary feature carried exactly along a known direction
`u` of the stream and read from there by the unembedding. Interchange along `u` moves the
output fully, along a random direction orthogonal to `u` not at all; identity patches are
exact; DAS recovers `u` with IIA ~1; the basis loader's errors."""
from __future__ import annotations

import pytest
import torch

from circuitlang.das import learn_alignment, orthonormal, save_basis
from circuitlang.errors import ModelError
from circuitlang.models import LoadedModel, Patch
from circuitlang.models.subspace import PROBE_FORMAT, read_basis
from circuitlang.sites import Basis, Head, Mlp, Resid, Subspace

D, VOCAB, BOS, A0, A1 = 8, 16, 15, 8, 9


def planted():
    """(model, u, rest): a 1-layer GPT-2 whose attention and MLP write nothing; token
    4a + n (a in {0, 1}, n in 0..3) embeds as (2a - 1) * 2u + nuisance_n (unit vectors
    orthogonal to u and each other); the unembedding reads u only (A1 = +u, A0 = -u). All directions are
    orthogonal to the all-ones vector, so the final LayerNorm only rescales."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.GPT2Config(vocab_size=VOCAB, n_embd=D, n_layer=1, n_head=2, n_positions=8,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                           bos_token_id=BOS, eos_token_id=BOS)
    hf = tf.GPT2LMHeadModel(config).eval()
    ones = torch.ones(D, 1) / D ** 0.5
    q, _ = torch.linalg.qr(torch.cat([ones, torch.randn(D, D - 1)], 1))
    u, rest = q[:, 1], q[:, 2:]  # both orthogonal to the all-ones vector
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.zero_()
        wte = hf.transformer.wte.weight
        for a in (0, 1):
            for n in range(4):
                wte[4 * a + n] = (2 * a - 1) * 2.0 * u + rest[:, n]  # one norm for every state: LayerNorm scales all alike
        wte[BOS] = rest[:, 4]
        hf.lm_head.weight[A1] = 3.0 * u
        hf.lm_head.weight[A0] = -3.0 * u
    return LoadedModel.from_hf(hf, name="planted-subspace"), u, rest


def pairs(n: int, seed: int = 1):
    """Base and source prompts `BOS t`, the feature differing in every pair."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 2, (n,), generator=g)
    base = torch.stack([torch.full((n,), BOS), 4 * a + torch.randint(0, 4, (n,), generator=g)], 1)
    source = torch.stack([torch.full((n,), BOS), 4 * (1 - a) + torch.randint(0, 4, (n,), generator=g)], 1)
    return base, source, torch.where(a == 1, A0, A1)  # the source's answer


def _basis_file(tmp_path, b: torch.Tensor, name="b.safetensors", key="basis", meta=None) -> str:
    from safetensors.torch import save_file

    path = tmp_path / name
    save_file({key: b.float().contiguous()}, str(path), metadata=meta)
    return str(path)


@pytest.fixture(scope="module")
def model():
    return planted()


def _interchange(lm, path, layer, base, source):
    site = Subspace(Basis("s", path, "resid", layer, k=1))
    end = torch.full((len(base),), 1)
    coords = lm.run(source, capture=[site]).cache[site][:, 1]
    return lm.run(base, patches=[Patch(site, coords, positions=end)]).logits[:, 1]


@pytest.mark.parametrize("layer", [0, 1])
def test_interchange_along_the_planted_direction_moves_the_output_fully(model, tmp_path, layer):
    lm, u, rest = model
    base, source, target = pairs(32)
    plain = lm.run(base).logits[:, 1]
    src = lm.run(source).logits[:, 1]
    along = _interchange(lm, _basis_file(tmp_path, u[:, None]), layer, base, source)
    diff = lambda z: z[:, A1] - z[:, A0]
    assert (along.argmax(-1) == target).all()
    torch.testing.assert_close(diff(along), diff(src), rtol=1e-4, atol=1e-5)  # the source's answer, fully
    # a random direction orthogonal to u (and to the all-ones vector) moves nothing it reads
    r = rest @ torch.randn(rest.shape[1], generator=torch.Generator().manual_seed(3))
    r = r / r.norm()
    off = _interchange(lm, _basis_file(tmp_path, r[:, None], "r.safetensors"), layer, base, source)
    assert (off.argmax(-1) == plain.argmax(-1)).all()
    assert (torch.sign(diff(off)) == torch.sign(diff(plain))).all()


def test_identity_patch_is_exact_and_the_complement_is_kept(model, tmp_path):
    lm, u, rest = model
    base, source, _ = pairs(8)
    path = _basis_file(tmp_path, torch.stack([u, rest[:, 0]], 1))
    site = Subspace(Basis("s", path, "resid", 1, k=2))
    own = lm.run(base, capture=[site, Resid(1)])
    same = lm.run(base, patches=[Patch(site, own.cache[site])], capture=[Resid(1)])
    assert torch.equal(same.logits, lm.run(base).logits)
    # interchange: the state's part orthogonal to the subspace is the base's
    coords = lm.run(source, capture=[site]).cache[site]
    moved = lm.run(base, patches=[Patch(site, coords)], capture=[Resid(1)]).cache[Resid(1)]
    b = torch.stack([u, rest[:, 0]], 1)
    keep = torch.eye(D) - b @ b.T
    torch.testing.assert_close(moved @ keep, own.cache[Resid(1)] @ keep, atol=1e-5, rtol=0)
    torch.testing.assert_close(moved @ b, coords, atol=1e-5, rtol=0)


def test_das_recovers_the_planted_direction(model, tmp_path):
    lm, u, _ = model
    base, source, target = pairs(160)
    ones = torch.ones(len(base), dtype=torch.long)
    torch.set_num_threads(1)
    found = learn_alignment(lm, Basis("io", "", "resid", 1), base, source, target, ones, ones,
                            dims=1, steps=400, seed=0)
    cos = float((found.basis[:, 0] @ u).abs())
    assert cos > 0.98, cos  # 0.993 measured
    assert found.iia > 0.95 and found.n_heldout == 40
    # saved, it reads back as a fixed subspace that does the same interchange
    path = save_basis(found, tmp_path / "io.safetensors", Basis("io", "", "resid", 1))
    back = read_basis(path, d_model=D)
    torch.testing.assert_close(back.float(), found.basis)
    assert (_interchange(lm, str(path), 1, base, source).argmax(-1) == target).all()


def test_das_at_a_random_place_learns_nothing(model):
    """The feature is not in layer-0 attention's output: every interchange there is a no-op."""
    lm, _, _ = model
    base, source, target = pairs(40)
    ones = torch.ones(len(base), dtype=torch.long)
    found = learn_alignment(lm, Basis("io", "", "head", 0, head=0), base, source, target, ones, ones,
                            dims=1, steps=20)
    assert found.iia == 0.0


def test_orthonormal_parametrisation():
    b = orthonormal(torch.randn(8, 3))
    torch.testing.assert_close(b.T @ b, torch.eye(3), atol=1e-5, rtol=0)


# ---- the loader's errors -------------------------------------------------------------
def test_missing_key_names_the_key(tmp_path):
    path = _basis_file(tmp_path, torch.eye(D)[:, :1], key="weights")
    with pytest.raises(ModelError, match="no tensor 'basis'") as exc:
        read_basis(path, d_model=D)
    assert "weights" in exc.value.hint


def test_non_orthonormal_is_refused(tmp_path):
    path = _basis_file(tmp_path, 2 * torch.eye(D)[:, :2])
    with pytest.raises(ModelError, match="not orthonormal"):
        read_basis(path, d_model=D)


def test_wrong_width_is_refused(tmp_path):
    path = _basis_file(tmp_path, torch.eye(D + 2)[:, :1])
    with pytest.raises(ModelError, match="10 wide, the model's states are 8"):
        read_basis(path, d_model=D)


def test_pickles_are_refused(tmp_path):
    torch.save({"basis": torch.eye(D)[:, :1]}, tmp_path / "b.pt")
    with pytest.raises(ModelError, match="pickle"):
        read_basis(tmp_path / "b.pt")
    (tmp_path / "b.safetensors").write_bytes((tmp_path / "b.pt").read_bytes())
    with pytest.raises(ModelError, match="pickle"):
        read_basis(tmp_path / "b.safetensors")


def test_a_probe_file_basis_is_read_by_layer(tmp_path):
    rows = torch.eye(D)[:2]  # a probe file holds [k, d] rows
    path = _basis_file(tmp_path, rows, key="layer3.basis", meta={"format": PROBE_FORMAT})
    from circuitlang.models.subspace import basis_key

    assert basis_key(path, 3) == "layer3.basis"
    assert read_basis(path, "layer3.basis", d_model=D).shape == (D, 2)


def test_probe_format_is_the_probes_modules():
    from circuitlang import probes

    assert probes.PROBE_FORMAT == PROBE_FORMAT


@pytest.mark.parametrize("hook", ["head", "mlp"])
def test_head_and_mlp_subspaces_are_their_state_in_the_basis(build_tiny, tmp_path, hook):
    lm = LoadedModel.from_hf(build_tiny("gpt2"), name="tiny-gpt2")
    d = lm.shape.d_model
    b = torch.linalg.qr(torch.randn(d, 3, generator=torch.Generator().manual_seed(0)))[0]
    path = _basis_file(tmp_path, b)
    ids = torch.randint(0, 61, (2, 5), generator=torch.Generator().manual_seed(1))
    site = Subspace(Basis("h", path, hook, 1, head=2 if hook == "head" else None, k=3))
    state = Head(1, 2) if hook == "head" else Mlp(1)
    run = lm.run(ids, capture=[site, state])
    torch.testing.assert_close(run.cache[site], run.cache[state] @ b, atol=1e-5, rtol=1e-5)
    # zeroing the coordinates equals subtracting the projection from the state
    zero = lm.run(ids, patches=[Patch(site, torch.zeros_like(run.cache[site]))]).logits
    out = run.cache[state]
    ref = lm.run(ids, patches=[Patch(state, out - out @ b @ b.T)]).logits
    torch.testing.assert_close(zero, ref, atol=1e-5, rtol=1e-5)
