"""Optional agreement with SAELens: on the same weights, circuitlang's SAE reader gives
SAELens's encode and decode, for each architecture and input normalisation both read.

SAELens runs in its own venv (`.peers/sl`, made by `bench/peers/setup.sh sl`) as a
subprocess (`bench/peers/sl_sae.py`); with no venv the test is skipped with the command
that makes it. Marked `optional`."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file

from circuitlang.models.sae import load_sae

pytestmark = pytest.mark.optional

REPO = Path(__file__).resolve().parents[2]
SL_PYTHON = REPO / ".peers" / "sl" / "bin" / "python"
D, N = 24, 64

# case -> (cfg.json entries, extra weights, the SAELens class that must load it)
CASES = {
    "standard": ({"architecture": "standard", "apply_b_dec_to_input": True}, {}, "StandardSAE"),
    "standard-no-b-dec-in": ({"architecture": "standard", "apply_b_dec_to_input": False}, {}, "StandardSAE"),
    "jumprelu": ({"architecture": "jumprelu", "apply_b_dec_to_input": False}, {"threshold": 0.4}, "JumpReLUSAE"),
    "topk": ({"architecture": "topk", "apply_b_dec_to_input": True, "k": 7}, {}, "TopKSAE"),
    "layer-norm": ({"architecture": "standard", "apply_b_dec_to_input": True, "normalize_activations": "layer_norm"},
                   {}, "StandardSAE"),
    "constant-norm": ({"architecture": "standard", "apply_b_dec_to_input": False,
                       "normalize_activations": "constant_norm_rescale"}, {}, "StandardSAE"),
}


def _write(folder: Path, cfg: dict, extra: dict, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    weights = {"W_enc": torch.randn(D, N, generator=g) / D ** 0.5, "b_enc": torch.randn(N, generator=g) * 0.2,
               "W_dec": torch.randn(N, D, generator=g) / N ** 0.5, "b_dec": torch.randn(D, generator=g) * 0.1}
    if "threshold" in extra:
        weights["threshold"] = torch.full((N,), extra["threshold"])
    folder.mkdir()
    save_file(weights, str(folder / "sae_weights.safetensors"))
    full = {"d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu", "model_name": "test",
            "hook_name": "blocks.1.hook_resid_pre", "normalize_activations": "none", **cfg}
    (folder / "cfg.json").write_text(json.dumps(full))


@pytest.mark.parametrize("case", sorted(CASES))
def test_encode_and_decode_equal_saelens(case, tmp_path):
    if not SL_PYTHON.exists():
        pytest.skip(f"SAELens venv not found at {SL_PYTHON.parent.parent}; create it with `bench/peers/setup.sh sl`")
    cfg, extra, expected = CASES[case]
    folder = tmp_path / "sae"
    _write(folder, cfg, extra, seed=len(case))
    x = torch.randn(3, 5, D, generator=torch.Generator().manual_seed(1)) * 2.0
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    out = tmp_path / "out.safetensors"
    done = subprocess.run([str(SL_PYTHON), str(REPO / "bench" / "peers" / "sl_sae.py"), str(folder),
                           str(tmp_path / "x.safetensors"), str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = load_file(str(out))
    with safe_open(str(out), "pt") as f:
        kind = f.metadata()["class"]
    assert kind == expected
    if case == "topk":  # exactly k latents on per position, on both sides
        assert bool(((theirs["features"] != 0).sum(-1) == 7).all())
    sae = load_sae(folder)
    features = sae.encode(x)
    assert int((theirs["features"] != 0).sum()) > 0, f"{kind}: every latent is off, the comparison says nothing"
    torch.testing.assert_close(features, theirs["features"], atol=1e-5, rtol=1e-5, msg=f"encode ({kind})")
    torch.testing.assert_close(sae.decode(features, x), theirs["reconstruction"], atol=1e-5, rtol=1e-5,
                               msg=f"decode ({kind})")
