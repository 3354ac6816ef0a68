"""Fixtures for the oracle tests: tiny models of every architecture with weights large
enough that interventions move the metric far beyond the comparison's tolerance, and two
token-id tasks (induction, and a custom JSONL task whose positions and lengths vary)."""
from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

ARCHS = ("gpt2", "gpt_neox", "gpt_neox_seq", "llama", "mistral", "qwen2")
N_PROMPTS = 24


def _build_tiny():
    """tests/models/conftest.py's `build_tiny` (loaded by path: every test folder has a conftest)."""
    path = Path(__file__).resolve().parents[1] / "models" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_models_conftest_for_oracle", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_tiny


def strong_weights(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter drawn again (std 0.2, norms near one): HF's default init (std 0.02)
    leaves a 32-wide model's logits almost flat, so scrubbing would hardly move them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            if name.endswith("weight") and p.dim() == 1:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.2 * noise)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_models():
    """arch -> LoadedModel (float64, CPU, eager attention), built on first use.

    float64 because in float32 a stream with few claimed parts can have a tiny norm (zero
    ablation of a model without biases leaves one head's output), and the final RMSNorm
    turns rounding of 1e-7 into metric differences of a few 1e-5: the comparison is to
    1e-5 and must not depend on summation order."""
    from circuitlang.models import LoadedModel

    build = _build_tiny()
    made: dict = {}

    def get(arch: str):
        if arch not in made:
            model = strong_weights(build(arch, seed=0)).to(torch.float64)
            made[arch] = LoadedModel.from_hf(model, name=f"tiny-{arch}")
        return made[arch]

    return get


@pytest.fixture(scope="session")
def induction():
    """(task, prompts): induction over token ids 0..5, copies of 3 tokens (6 tokens a prompt)."""
    from circuitlang.tasks import load_task

    task = load_task("induction", tokenizer=None, length=3, vocab=6)
    return task, task.prompts(N_PROMPTS, 0)


def write_varied_task(path: Path, n: int = N_PROMPTS, seed: int = 0) -> Path:
    """A token-id JSONL task whose prompts have 5, 6 or 7 tokens and whose named positions
    A and B sit at different indices in different prompts of the same length."""
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        size = 5 + i % 3
        clean = [rng.randrange(61) for _ in range(size)]
        corrupt = [rng.randrange(61) for _ in range(size)]
        record = {"clean": clean, "corrupt": corrupt, "answers": [rng.randrange(61)],
                  "wrong_answers": [rng.randrange(61)],
                  "positions": {"A": rng.randrange(1, size - 2), "B": rng.randrange(1, size - 1)},
                  "features": {"grp": rng.randrange(3)}}
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def varied(tmp_path_factory):
    """(task, prompts) of `write_varied_task`: padding, and positions that move by name."""
    from circuitlang.tasks import load_task

    path = write_varied_task(tmp_path_factory.mktemp("oracle") / "varied.jsonl")
    task = load_task(str(path), tokenizer=None)
    return task, task.prompts(N_PROMPTS, 0)
