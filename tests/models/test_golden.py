"""A new `transformers` (or torch) release must not silently change a user's numbers.

The embedded toy models and one small model of every architecture (weights set from a
seeded generator by parameter name, so they do not depend on a release's initialisers)
are run on fixed prompts; their logits must equal the numbers recorded in
tests/fixtures/golden/logits.json to 1e-5 (float32 kernels may reorder a sum between
releases, which moves the last bits, never the fifth decimal). CI installs the newest
`transformers` a new user gets, so a release that changes the arithmetic fails here.

After a deliberate change (a new supported release that legitimately moves the numbers,
a retrained toy model), re-record with::

    python tests/models/test_golden.py --update
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden" / "logits.json"
ARCHS = ("gpt2", "gpt_neox", "gpt_neox_seq", "llama", "mistral", "qwen2")
TOYS = ("toy-induction", "toy-ioi")
TOLERANCE = 1e-5


#: Parameter names that differ between supported releases, mapped to one spelling
#: (GPT-NeoX's unembedding is `embed_out` before transformers 5.1, `lm_head` after).
_RENAMED = {"embed_out.": "lm_head."}


def _canonical(name: str) -> str:
    for old, new in _RENAMED.items():
        name = name.replace(old, new)
    return name


def _seeded(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter from a generator, in (canonical) name order, so the
    weights do not depend on a release's initialisers or its module order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda item: _canonical(item[0])):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("weight") and p.dim() == 1:  # norms: near one
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.2 * noise)
    return model.eval()


def _build_tiny():
    """tests/models/conftest.py's `build_tiny` (loaded by path: every test folder has a conftest)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_models_conftest", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tiny


def _prompts(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, vocab, (3, 12), generator=g)


def _toy_prompts(name: str, lm) -> tuple[torch.Tensor, torch.Tensor]:
    if name == "toy-induction":
        words = [f"w{i:02d}" for i in (3, 17, 42, 8, 25, 3, 17, 42, 8)]
        texts = [" ".join(words), " ".join(reversed(words))]
    else:
        texts = ["When Mary and John went to the store, John gave a drink to",
                 "Then, Alice and Bob had a long argument. Afterwards Bob said to"]
    return lm.to_tokens(texts, prepend_bos=name == "toy-induction")


def measure() -> dict[str, list]:
    """Logits at the last four positions of the fixed prompts, per model (nested lists)."""
    from circuitlang.models import LoadedModel, load_model

    build_tiny = _build_tiny()

    out: dict[str, list] = {}
    with torch.no_grad():
        for name in TOYS:
            lm = load_model(name, device="cpu")
            ids, mask = _toy_prompts(name, lm)
            out[name] = lm.run(ids, mask).logits[:, -4:].tolist()
        for arch in ARCHS:
            lm = LoadedModel.from_hf(_seeded(build_tiny(arch)), name=f"golden-{arch}")
            out[arch] = lm.run(_prompts(lm.shape.vocab_size)).logits[:, -4:].tolist()
    return out


@pytest.fixture(scope="module")
def golden() -> dict:
    if not GOLDEN.is_file():
        pytest.fail(f"{GOLDEN} is missing; record it with python tests/models/test_golden.py --update")
    return json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def measured() -> dict:
    return measure()


@pytest.mark.parametrize("name", TOYS + ARCHS)
def test_logits_equal_the_recorded_numbers(name, golden, measured):
    want = torch.tensor(golden["logits"][name])
    got = torch.tensor(measured[name])
    assert got.shape == want.shape
    worst = float((got - want).abs().max())
    assert worst <= TOLERANCE, (
        f"{name}: logits moved by {worst:.3g} from the numbers recorded with "
        f"{golden['versions']} (now {_versions()}); if the release is right, re-record them"
    )


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


if __name__ == "__main__":  # pragma: no cover - a maintainer's command
    if "--update" not in sys.argv:
        sys.exit("usage: python tests/models/test_golden.py --update")
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps({"versions": _versions(), "logits": measure()}) + "\n")
    print(f"wrote {GOLDEN}")
