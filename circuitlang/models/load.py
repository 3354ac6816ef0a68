"""Loading models: a short name, a local folder or a hub id in; a `LoadedModel` out.

`load_model` uses the real `transformers` loading code (`AutoConfig`,
`AutoModelForCausalLM.from_pretrained`, `AutoTokenizer`), with safetensors preferred,
`trust_remote_code` off unless asked for, and eager attention (so attention patterns
exist and intervened runs reproduce the plain forward pass exactly). Failures become
`ModelError`s that say what would have worked.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from circuitlang.errors import ModelError
from circuitlang.models import compat
from circuitlang.models.adapters import Adapter, adapter_class, supported_model_types
from circuitlang.models.interventions import EdgePatch, EdgeSet, Patch, Run
from circuitlang.models.known import toy_dir, toy_names
from circuitlang.sites import ModelShape, Site

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float64": torch.float64}


@dataclass(eq=False)
class LoadedModel:
    """A HF causal LM with its tokenizer, adapter and shape, ready to capture and patch.

    Attributes:
        hf_model: the `transformers` model (eval mode, eager attention).
        tokenizer: its tokenizer, or None when the folder has none.
        shape: the model's `ModelShape`.
        adapter: the architecture adapter (module paths live there).
        device: where the weights are.
        dtype: the weights' dtype.
        name: what the user called it.
    """

    hf_model: Any
    tokenizer: Any
    shape: ModelShape
    adapter: Adapter
    device: torch.device
    dtype: torch.dtype
    name: str
    buffers: dict = field(default_factory=dict, repr=False)  # scratch reused across runs (run.py)

    @classmethod
    def from_hf(cls, hf_model: Any, tokenizer: Any = None, name: str = "") -> "LoadedModel":
        """Wrap an already-built HF causal LM (e.g. one made from a config in a test).

        Switches it to eval mode and eager attention.

        Raises:
            ModelError: its architecture has no adapter.
        """
        config = hf_model.config
        name = name or getattr(config, "name_or_path", "") or config.model_type
        cls_ = adapter_class(config.model_type, name)
        if getattr(config, "_attn_implementation", "eager") != "eager":
            hf_model.set_attn_implementation("eager")
        hf_model.eval()
        param = next(hf_model.parameters())
        return cls(
            hf_model=hf_model,
            tokenizer=tokenizer,
            shape=cls_.shape_from_config(config, name),
            adapter=cls_(hf_model),
            device=param.device,
            dtype=param.dtype,
            name=name,
        )

    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        capture: Iterable[Site] = (),
        patches: Iterable[Patch] = (),
        edges: EdgePatch | None = None,
        grad: bool = False,
        cache: Any = None,
    ) -> Run:
        """One forward pass: capture any sites, apply node and edge patches.

        Args:
            input_ids: LongTensor [B, T] (right-padded batches with `attention_mask`).
            attention_mask: [B, T], 1 for real tokens.
            capture: sites whose values to return in `Run.cache`.
            patches: `Patch`es (node interventions), applied in order.
            edges: an `EdgePatch` (edge interventions), or None.
            grad: keep the autograd graph (for attribution patching); off by default.
            cache: a HF key/value cache of prompt prefixes (`compat.forward(...,
                keep_cache=True)` makes one); `input_ids` are then the tokens after them, `attention_mask` covers prefix and
                tokens, and patch positions index the new tokens.

        Returns:
            `Run` with logits [B, T, V] and the captured values.

        Raises:
            ModelError: a site the model does not have, or a value of the wrong shape.
        """
        from circuitlang.models.run import run_model

        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return run_model(self, input_ids, attention_mask, capture=capture, patches=patches, edges=edges,
                             cache=cache)

    def free_buffers(self) -> None:
        """Release the scratch memory edge patching keeps between runs on CPU."""
        self.buffers.clear()

    def edge_set(self) -> EdgeSet:
        """Every sender and receiver of this model (knows about parallel attention + MLP)."""
        return EdgeSet.build(self.shape, self.adapter.parallel_residual)

    def to_tokens(self, texts: str | Sequence[str], prepend_bos: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenise texts into right-padded (input_ids, attention_mask) on the model's device.

        Raises:
            ModelError: the model has no tokenizer.
        """
        if self.tokenizer is None:
            raise ModelError(f"model {self.name!r} has no tokenizer", code="model.no-tokenizer",
                             hint="pass token ids to run() instead")
        if isinstance(texts, str):
            texts = [texts]
        tok = self.tokenizer
        rows = [tok.encode(t, add_special_tokens=False) for t in texts]
        if prepend_bos:
            bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            if bos is None:
                raise ModelError(f"model {self.name!r} has no BOS token", code="model.no-bos",
                                 hint="call to_tokens(..., prepend_bos=False)")
            rows = [[bos] + r for r in rows]
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids.to(self.device), mask.to(self.device)

    def __repr__(self) -> str:
        return f"LoadedModel({self.name!r}, {self.shape.architecture}, {self.shape.describe()}, {self.dtype})"


def _resolve_dtype(dtype: Any) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    found = _DTYPES.get(str(dtype))
    if found is None:
        raise ModelError(f"unknown dtype {dtype!r}", code="model.bad-dtype",
                         hint=f"use one of {', '.join(sorted(_DTYPES))} or a torch.dtype")
    return found


def _resolve_device(device: Any) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(f"unknown device {device!r}", code="model.bad-device",
                         hint="use 'cpu', 'cuda' or 'cuda:N'") from exc


def _locate(name_or_path: str | Path) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is local)."""
    text = str(name_or_path)
    if text in toy_names():
        return str(toy_dir(text)), True
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{text!r} is a folder without a config.json", code="model.not-found",
                             hint="point at a folder saved with save_pretrained (config.json + weights)")
        return str(path), True
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ModelError(f"could not find model {text!r}: no such folder", code="model.not-found",
                         hint=f"embedded models: {', '.join(toy_names())}; or a hub id such as gpt2")
    return text, False


def load_config(name_or_path: str | Path, trust_remote_code: bool = False) -> tuple[Any, str, bool]:
    """The HF config for a model name, without loading weights: (config, source, local)."""
    from transformers import AutoConfig

    source, local = _locate(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"could not find model {str(name_or_path)!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})",
            code="model.not-found",
            hint=f"no network here? pass a local path; embedded models: {', '.join(toy_names())}",
        ) from exc
    return config, source, local


def load_model(
    name_or_path: str | Path,
    device: Any = None,
    dtype: Any = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM by embedded short name, local folder, or hub id.

    Args:
        name_or_path: `toy-induction`, `toy-ioi` (see `circuitlang models`), a folder
            saved with `save_pretrained`, or a hub id such as `gpt2`.
        device: torch device; CUDA when present, else CPU.
        dtype: torch dtype or its name (`float32`, `bf16`, ...); float32 by default.
        trust_remote_code: allow a hub repository's own Python code (off by default).

    Returns:
        A `LoadedModel`.

    Raises:
        ModelError: the model cannot be found, has an unsupported architecture, or fails to load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _resolve_dtype(dtype)
    torch_device = _resolve_device(device)
    config, source, local = load_config(name_or_path, trust_remote_code)
    name = str(name_or_path)
    adapter_class(getattr(config, "model_type", "?"), name)  # unsupported -> ModelError, before weights
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            source,
            config=config,
            **{compat.dtype_keyword(): torch_dtype},
            attn_implementation="eager",
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"could not load weights of model {name!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})",
            code="model.load-failed",
            hint="no network here? pass a local path with config.json and model.safetensors",
        ) from exc
    hf_model.to(torch_device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a weights-only folder: callers pass token ids
    return LoadedModel.from_hf(hf_model, tokenizer, name)


__all__ = ["LoadedModel", "load_model", "load_config", "supported_model_types"]
