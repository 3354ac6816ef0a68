"""Shapes of models known without loading weights, and the embedded toy models.

Takes a short name, local path or well-known hub id; gives a `ModelShape` (so the
checker's front half works offline), and lists the embedded toy models shipped in
`circuitlang/models/toys/<name>/`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from circuitlang.errors import ModelError
from circuitlang.sites import ModelShape

TOYS_DIR = Path(__file__).resolve().parent / "toys"


def _shape(arch: str, n_layers: int, n_heads: int, d_model: int, vocab: int, n_ctx: int,
           n_kv: int | None = None, d_head: int | None = None, has_mlp: bool = True,
           d_mlp: int | None = None) -> dict:
    # every GPT-NeoX / Pythia release uses parallel attention and MLP (use_parallel_residual);
    # GPT-2 and Pythia MLPs are 4 x d_model wide, Llama-family widths are given
    return dict(n_layers=n_layers, n_heads=n_heads, d_model=d_model, d_head=d_head or d_model // n_heads,
                n_kv_heads=n_kv or n_heads, vocab_size=vocab, n_ctx=n_ctx, has_mlp=has_mlp, architecture=arch,
                parallel_residual=arch == "gpt_neox", d_mlp=(d_mlp or 4 * d_model) if has_mlp else 0)


#: Well-known hub models (from their published config.json files).
KNOWN_SHAPES: dict[str, dict] = {
    "gpt2": _shape("gpt2", 12, 12, 768, 50257, 1024),
    "openai-community/gpt2": _shape("gpt2", 12, 12, 768, 50257, 1024),
    "gpt2-medium": _shape("gpt2", 24, 16, 1024, 50257, 1024),
    "gpt2-large": _shape("gpt2", 36, 20, 1280, 50257, 1024),
    "gpt2-xl": _shape("gpt2", 48, 25, 1600, 50257, 1024),
    "distilgpt2": _shape("gpt2", 6, 12, 768, 50257, 1024),
    "EleutherAI/pythia-14m": _shape("gpt_neox", 6, 4, 128, 50304, 2048),
    "EleutherAI/pythia-70m": _shape("gpt_neox", 6, 8, 512, 50304, 2048),
    "EleutherAI/pythia-160m": _shape("gpt_neox", 12, 12, 768, 50304, 2048),
    "EleutherAI/pythia-410m": _shape("gpt_neox", 24, 16, 1024, 50304, 2048),
    "EleutherAI/pythia-1b": _shape("gpt_neox", 16, 8, 2048, 50304, 2048),
    "EleutherAI/pythia-1.4b": _shape("gpt_neox", 24, 16, 2048, 50304, 2048),
    "EleutherAI/pythia-2.8b": _shape("gpt_neox", 32, 32, 2560, 50304, 2048),
    "EleutherAI/pythia-6.9b": _shape("gpt_neox", 32, 32, 4096, 50432, 2048),
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": _shape("llama", 22, 32, 2048, 32000, 2048, n_kv=4, d_mlp=5632),
    "meta-llama/Llama-3.2-1B": _shape("llama", 16, 32, 2048, 128256, 131072, n_kv=8, d_mlp=8192),
    "meta-llama/Llama-2-7b-hf": _shape("llama", 32, 32, 4096, 32000, 4096, d_mlp=11008),
    "mistralai/Mistral-7B-v0.1": _shape("mistral", 32, 32, 4096, 32000, 32768, n_kv=8, d_mlp=14336),
    "Qwen/Qwen2-0.5B": _shape("qwen2", 24, 14, 896, 151936, 131072, n_kv=2, d_mlp=4864),
    "Qwen/Qwen2.5-0.5B": _shape("qwen2", 24, 14, 896, 151936, 32768, n_kv=2, d_mlp=4864),
    # TransformerLens' attention-only models (Nanda), for hypotheses written against them.
    "attn-only-1l": _shape("gpt2", 1, 8, 512, 48262, 1024, has_mlp=False),
    "attn-only-2l": _shape("gpt2", 2, 8, 512, 48262, 1024, has_mlp=False),
    "attn-only-3l": _shape("gpt2", 3, 8, 512, 48262, 1024, has_mlp=False),
    "attn-only-4l": _shape("gpt2", 4, 8, 512, 48262, 1024, has_mlp=False),
}
for _size in ("70m", "160m", "410m", "1b", "1.4b", "2.8b"):
    KNOWN_SHAPES[f"EleutherAI/pythia-{_size}-deduped"] = KNOWN_SHAPES[f"EleutherAI/pythia-{_size}"]


@dataclass(frozen=True, slots=True)
class ToyInfo:
    """An embedded model: its short name, folder, shape and what it was trained for."""

    name: str
    path: Path
    shape: ModelShape
    description: str
    metadata: dict

    def __hash__(self) -> int:
        return hash(self.name)


def toy_names() -> tuple[str, ...]:
    """Short names of the embedded models present in this install."""
    if not TOYS_DIR.is_dir():
        return ()
    return tuple(sorted(p.name for p in TOYS_DIR.iterdir() if (p / "config.json").is_file()))


def toy_dir(name: str) -> Path:
    """The folder of an embedded model."""
    return TOYS_DIR / name


def refuse_remote_code(folder: Path, name: str) -> None:
    """Refuse a folder whose config asks for its own Python code for an architecture
    transformers does not have built in (with a built-in one, `auto_map` is ignored).

    Raises:
        ModelError: that folder.
    """
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # AutoConfig reports it
    if not isinstance(config, dict) or "auto_map" not in config:
        return
    from circuitlang.models.adapters import supported_model_types

    model_type = config.get("model_type")
    if model_type in supported_model_types():
        return
    raise ModelError(
        f"model folder {name!r} asks to run its own Python code (`auto_map` in config.json) "
        f"for architecture {model_type!r}; circuitlang never runs code from a model folder",
        code="model.remote-code",
        hint="supported architectures (HF config.model_type): "
        + ", ".join(supported_model_types()))


def config_errors() -> tuple[type[BaseException], ...]:
    """What `AutoConfig.from_pretrained` raises for a config it cannot read: a missing or
    malformed file, an unknown model type, a field of the wrong type."""
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, TypeError)
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # pragma: no cover - older huggingface_hub
        return errors
    return errors + (StrictDataclassError,)


def _shape_from_config_file(path: Path, name: str) -> ModelShape:
    from circuitlang.models.adapters import shape_from_config
    from transformers import AutoConfig

    refuse_remote_code(path, name)
    try:
        # explicit: left unset, transformers asks on stdin whether to run the folder's code
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except config_errors() as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelError(f"cannot read {path / 'config.json'}: {first}",
                         code="model.bad-config",
                         hint="a model folder needs a config.json saved by save_pretrained") \
            from None
    return shape_from_config(config, name)


def list_models() -> list[ToyInfo]:
    """The embedded toy models, with shapes and descriptions (what `circuitlang models` shows)."""
    out = []
    for name in toy_names():
        folder = toy_dir(name)
        meta_path = folder / "circuitlang.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        out.append(ToyInfo(name, folder, _shape_from_config_file(folder, name),
                           meta.get("description", ""), meta))
    return out


def model_task_params(name: str) -> dict:
    """Task parameters a model's own metadata asks for: an embedded toy trained without a
    BOS token says `"prepend_bos": false` in its circuitlang.json (others: none)."""
    if str(name) not in toy_names():
        return {}
    meta = toy_dir(str(name)) / "circuitlang.json"
    if not meta.is_file():
        return {}
    data = json.loads(meta.read_text(encoding="utf-8"))
    return {"prepend_bos": data["prepend_bos"]} if "prepend_bos" in data else {}


def known_shape(name: str) -> ModelShape:
    """A model's `ModelShape` without loading weights.

    Args:
        name: an embedded short name, a local folder with config.json, or a well-known hub id.

    Raises:
        ModelError: the name is none of those.
    """
    text = str(name)
    if text in toy_names():
        return _shape_from_config_file(toy_dir(text), text)
    path = Path(text).expanduser()
    if (path / "config.json").is_file():
        return _shape_from_config_file(path, text)
    found = KNOWN_SHAPES.get(text)
    if found is not None:
        return ModelShape(name=text, **found)
    some = ", ".join(list(toy_names()) + ["gpt2", "gpt2-medium", "EleutherAI/pythia-70m", "Qwen/Qwen2-0.5B"])
    raise ModelError(
        f"unknown model {text!r}",
        code="model.unknown",
        hint=f"known without downloading: {some}, ... (or a local folder with config.json)",
    )
