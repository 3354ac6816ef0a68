"""Loading models: a short name, a local folder or a hub id in; a `LoadedModel` out.

`load_model` uses the real `transformers` loading code (`AutoConfig`,
`AutoModelForCausalLM.from_pretrained`, `AutoTokenizer`), with eager attention (so
attention patterns exist and intervened runs reproduce the plain forward pass
exactly). Failures become `ModelError`s that say what would have worked.

Loading never runs code from a model folder or repository:

* `trust_remote_code=False` is passed to every `from_pretrained` (transformers
  otherwise asks on stdin whether to run a folder's own Python when its config has
  an `auto_map`);
* weights are read from safetensors only. Pickle weights (`pytorch_model.bin`,
  `*.pt`) can run code when read; they are refused, naming the file, unless the
  caller opts in (`allow_pickle=True`, `--allow-pickle`), and even then they go
  through torch's weights-only unpickler, whose refusal is a `ModelError`;
* a weights file that is truncated or corrupt, or lacks tensors the model needs
  (which transformers would silently fill with random values), is a `ModelError`.

A folder with weights but no tokenizer files loads with `tokenizer=None` (transformers
would build an empty tokenizer from the config's model type); tasks over token ids
need none, and `tokenizer=PATH` (`--tokenizer PATH`) supplies one.
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
from circuitlang.models.known import config_errors, refuse_remote_code, toy_dir, toy_names
from circuitlang.models.offload import main_device
from circuitlang.progress import quiet_loading
from circuitlang.sites import ModelShape, Site

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float64": torch.float64}
#: `device_map` strings transformers (accelerate) plans a placement for.
DEVICE_MAP_PLANS = ("auto", "balanced", "balanced_low_0", "sequential")


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
        # a model dispatched by accelerate (device_map) takes its inputs where its first
        # layers compute; its first parameter may be offloaded (on `meta`)
        device = main_device(hf_model) or param.device
        return cls(
            hf_model=hf_model,
            tokenizer=tokenizer,
            shape=cls_.shape_from_config(config, name),
            adapter=cls_(hf_model),
            device=device,
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
        resume: "tuple[CleanPass, int] | None" = None,
        logit_columns: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
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
            resume: `(clean, start)`: take the blocks below layer `start` from `clean`
                (a `CleanPass` of the same prompts, `clean_pass`) instead of computing
                them; for edge patches that ablate no edge into a receiver below
                `start` (ACDC in reverse topological order). The result equals the full
                pass up to floating-point rounding.
            logit_columns: vocabulary ids: compute only these columns of the logits
                (a metric that reads a few tokens' logits skips the rest of the
                unembedding); `Run.logits` is then [B, T, len(logit_columns)].
            logits_at: LongTensor [B], a token index per row: unembed only there
                (`Run.logits` [B, 1, ...]), for a metric that reads one position.

        Returns:
            `Run` with logits [B, T, V] and the captured values.

        Raises:
            ModelError: a site the model does not have, or a value of the wrong shape.
        """
        from circuitlang.models.run import run_model

        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            return run_model(self, input_ids, attention_mask, capture=capture, patches=patches, edges=edges,
                             cache=cache, resume=resume, logit_columns=logit_columns, logits_at=logits_at)

    def clean_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   senders: Iterable[Site] = ()) -> "CleanPass":
        """A plain forward pass kept for `run(..., resume=(clean, start))`: every block's
        output and the outputs of `senders` (an edge set's senders)."""
        from circuitlang.models.interventions import CleanPass
        from circuitlang.models.run import run_model

        blocks: list = []
        with torch.no_grad():
            run = run_model(self, input_ids, attention_mask, capture=senders, record_blocks=blocks)
        return CleanPass(tuple(blocks), dict(run.cache))

    def free_buffers(self) -> None:
        """Release the scratch memory edge patching keeps between runs on CPU."""
        self.buffers.clear()

    def edge_set(self) -> EdgeSet:
        """Every sender and receiver of this model (knows about parallel attention + MLP)."""
        return EdgeSet.build(self.shape)

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


def resolve_dtype(dtype: Any) -> torch.dtype:
    """A torch dtype from one or its name (`float32`, `bf16`, ...); None is float32.

    Raises:
        ModelError: a name that is not a dtype.
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    found = _DTYPES.get(str(dtype))
    if found is None:
        raise ModelError(f"unknown dtype {dtype!r}", code="model.bad-dtype",
                         hint=f"use one of {', '.join(sorted(_DTYPES))} or a torch.dtype")
    return found


def _check_device_map(device_map: Any, device: Any) -> Any:
    """A `device_map` transformers can dispatch: a plan name or {module name: device}.

    Raises:
        ModelError: accelerate missing, a device map beside a device, an unknown plan,
            or a value that is not a device (`cpu`, `disk`, `cuda:N`, a GPU index).
        OptionError: a CUDA device this machine does not have.
    """
    from circuitlang.options import check_device

    try:
        import accelerate  # noqa: F401  (transformers dispatches through it)
    except ImportError:
        raise ModelError("device_map needs accelerate, which is not installed",
                         code="model.no-accelerate",
                         hint="pip install 'circuitlang[offload]' (accelerate), or load without "
                         "device_map") from None
    if device is not None:
        raise ModelError(f"both device={device!r} and device_map= were given",
                         code="model.device-map",
                         hint="the device map places every layer; leave device out")
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_PLANS:
            raise ModelError(f"unknown device_map {device_map!r}", code="model.device-map",
                             hint=f"use one of {', '.join(DEVICE_MAP_PLANS)}, or a dict of module "
                             "name -> device ('cpu', 'disk', 'cuda:0', 0)")
        return device_map
    if not isinstance(device_map, dict) or not device_map:
        raise ModelError(f"device_map {device_map!r} is not a plan name or a dict",
                         code="model.device-map",
                         hint="for example {'model.embed_tokens': 'cpu', 'model.layers.0': 'disk', ...}")
    placed = {}
    for module, where in device_map.items():
        if isinstance(where, bool) or not isinstance(where, (str, int, torch.device)):
            raise ModelError(f"device_map[{module!r}] = {where!r} is not a device",
                             code="model.device-map", hint="use 'cpu', 'disk', 'cuda:N' or a GPU index")
        if where in ("cpu", "disk"):
            placed[module] = where
            continue
        text = f"cuda:{where}" if isinstance(where, int) else str(where)
        check_device(text, f"device_map[{module!r}]")
        placed[module] = where
    return placed


def _resolve_device(device: Any) -> torch.device:
    from circuitlang.options import check_device

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, torch.device):
        device = str(device)
    return torch.device(check_device(device, "device"))


#: Weight files by format, as `save_pretrained` and the hub name them.
_SAFE_WEIGHTS = ("*.safetensors", "*.safetensors.index.json")
_PICKLE_WEIGHTS = ("pytorch_model*.bin", "*.bin.index.json", "*.bin", "*.pt", "*.pth",
                   "*.ckpt", "*.pkl")
#: Files any tokenizer `AutoTokenizer` can read is saved as.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                    "tokenizer.model", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")


def _weights_format(folder: Path, name: str, allow_pickle: bool) -> None:
    """Check a local folder holds weights circuitlang will read.

    Raises:
        ModelError: no weights at all, or only pickle weights without `allow_pickle`.
    """
    safe = [p for pattern in _SAFE_WEIGHTS for p in folder.glob(pattern)]
    if safe:
        return
    pickled = sorted({p.name for pattern in _PICKLE_WEIGHTS for p in folder.glob(pattern)})
    if not pickled:
        raise ModelError(f"model folder {name!r} has no weights (no model.safetensors)",
                         code="model.no-weights",
                         hint="save the model with save_pretrained (safetensors), or check "
                         "the path")
    if not allow_pickle:
        raise ModelError(
            f"model folder {name!r} has only pickle weights ({', '.join(pickled)}); "
            "circuitlang reads safetensors, since reading a pickle file can run code",
            code="model.pickle-weights",
            hint="convert them (load once and save_pretrained, which writes "
            "model.safetensors), or pass --allow-pickle (allow_pickle=True in Python) to "
            "read them with torch's weights-only unpickler")


def _tokenizer_for(source: str, local: bool, tokenizer: Any, name: str) -> Any:
    """The model's tokenizer: the one given, one loaded from `tokenizer` (a path or hub
    id), or the model folder's own; None when the folder has none.

    Raises:
        ModelError: a `tokenizer` path or id that cannot be loaded, or loads empty.
    """
    from transformers import AutoTokenizer

    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    explicit = tokenizer is not None
    where = str(Path(str(tokenizer)).expanduser()) if explicit else source
    if not explicit and local and not any((Path(source) / f).is_file() for f in _TOKENIZER_FILES):
        return None  # a weights-only folder: callers pass token ids
    try:
        with quiet_loading():
            found = AutoTokenizer.from_pretrained(where, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        if not explicit:
            return None
        raise ModelError(f"could not load tokenizer {str(tokenizer)!r} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:160] if str(exc) else ''})",
                         code="model.bad-tokenizer",
                         hint="point --tokenizer at a folder with tokenizer.json (or "
                         "vocab.json and merges.txt)") from None
    if getattr(found, "vocab_size", 1) == 0 or len(found) <= len(set(found.all_special_ids)):
        # transformers 5 builds an empty tokenizer where older releases raised
        if not explicit:
            return None
        raise ModelError(f"tokenizer {str(tokenizer)!r} has an empty vocabulary",
                         code="model.bad-tokenizer",
                         hint="point --tokenizer at a folder with tokenizer.json (or "
                         "vocab.json and merges.txt)")
    return found


def _load_error(name: str, exc: BaseException, allow_pickle: bool) -> ModelError:
    text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    if "weights only" in str(exc).lower() or "weights_only" in str(exc):
        return ModelError(
            f"torch's weights-only unpickler refused the pickle weights of model {name!r} "
            f"({text})", code="model.pickle-refused",
            hint="the file holds more than tensors; convert it to safetensors with code "
            "you trust, or use another copy of the model")
    if "safetensors" in str(exc) and "no file named" in str(exc).lower() and not allow_pickle:
        return ModelError(
            f"model {name!r} has no safetensors weights ({text})", code="model.pickle-weights",
            hint="circuitlang reads safetensors only, unless you pass --allow-pickle "
            "(allow_pickle=True in Python)")
    return ModelError(
        f"could not load weights of model {name!r} ({type(exc).__name__}: {text})",
        code="model.load-failed",
        hint="the weights file may be truncated or corrupt (download or save it again); "
        "no network here? pass a local path with config.json and model.safetensors")


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
    """The HF config for a model name, without loading weights: (config, source, local).

    Raises:
        ModelError: not found, unreadable, or (without `trust_remote_code`) a folder
            asking to run its own code.
    """
    from transformers import AutoConfig

    source, local = _locate(name_or_path)
    if local and not trust_remote_code:
        refuse_remote_code(Path(source), str(name_or_path))
    try:
        with quiet_loading():
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except config_errors() as exc:
        first = (str(exc).splitlines() or [""])[0][:160]
        if local:
            raise ModelError(
                f"cannot read {Path(source) / 'config.json'} ({type(exc).__name__}: {first})",
                code="model.bad-config",
                hint="a model folder needs a config.json saved by save_pretrained") from None
        raise ModelError(
            f"could not find model {str(name_or_path)!r} ({type(exc).__name__}: {first})",
            code="model.not-found",
            hint=f"no network here? pass a local path; embedded models: {', '.join(toy_names())}",
        ) from exc
    return config, source, local


def load_model(
    name_or_path: str | Path,
    device: Any = None,
    dtype: Any = None,
    trust_remote_code: bool = False,
    *,
    allow_pickle: bool = False,
    tokenizer: Any = None,
    device_map: Any = None,
    offload_folder: str | Path | None = None,
) -> LoadedModel:
    """Load a causal LM by embedded short name, local folder, or hub id.

    Args:
        name_or_path: `toy-induction`, `toy-ioi` (see `circuitlang models`), a folder
            saved with `save_pretrained`, or a hub id such as `gpt2`.
        device: torch device; CUDA when present, else CPU.
        dtype: torch dtype or its name (`float32`, `bf16`, ...); float32 by default.
        trust_remote_code: allow a hub repository's own Python code (off by default;
            circuitlang's command line never turns it on).
        allow_pickle: read pickle weights (`pytorch_model.bin`) when there are no
            safetensors, through torch's weights-only unpickler (off by default:
            reading a pickle file can run code).
        tokenizer: a tokenizer, or the path (or hub id) of one, for a model folder
            without its own; by default the folder's (None if it has none).
        device_map: place the layers with accelerate instead of on one `device`: a
            plan (`"auto"`, `"balanced"`, `"sequential"`) or a dict of module name ->
            `"cpu"`, `"disk"`, `"cuda:N"` or a GPU index, as `from_pretrained` takes it
            (needs `circuitlang[offload]`). Every intervention works on such a model
            (`circuitlang.models.offload`); docs/models.md.
        offload_folder: where layers mapped to `"disk"` are written (default: a new
            temporary folder, removed when the model is freed).

    Returns:
        A `LoadedModel`.

    Raises:
        ModelError: the model cannot be found, has an unsupported architecture or an
            impossible config, has only pickle weights (without `allow_pickle`), or its
            weights are truncated, corrupt or incomplete.
        OptionError: a device this machine does not have.
    """
    import pickle

    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from circuitlang.models.adapters import shape_from_config

    torch_dtype = resolve_dtype(dtype)
    placement: dict = {}
    scratch = None
    if device_map is not None:
        placement["device_map"] = _check_device_map(device_map, device)
        if offload_folder is None:
            import tempfile

            scratch = tempfile.mkdtemp(prefix="circuitlang-offload-")
        placement["offload_folder"] = str(offload_folder or scratch)
    else:
        torch_device = _resolve_device(device)
    config, source, local = load_config(name_or_path, trust_remote_code)
    name = str(name_or_path)
    shape_from_config(config, name)  # unsupported or impossible -> ModelError, before weights
    if local:
        _weights_format(Path(source), name, allow_pickle)
    found = _tokenizer_for(source, local, tokenizer, name)  # a bad --tokenizer: before weights
    try:
        with quiet_loading():  # no "Loading weights" bar, no third-party warnings
            hf_model, info = AutoModelForCausalLM.from_pretrained(
                source,
                config=config,
                **{compat.dtype_keyword(): torch_dtype},
                attn_implementation="eager",
                trust_remote_code=trust_remote_code,
                use_safetensors=None if allow_pickle else True,
                output_loading_info=True,
                **compat.no_hub_kernels(),  # the model's own layers, which the hooks read
                **placement,
            )
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError,
            SafetensorError, KeyError) as exc:
        if scratch is not None:
            _remove_folder(scratch)
        if device_map is not None and isinstance(exc, (ValueError, KeyError)):
            text = (str(exc).splitlines() or [""])[0][:200]
            raise ModelError(f"transformers could not place model {name!r} with device_map "
                             f"({type(exc).__name__}: {text})", code="model.device-map",
                             hint="a dict must name modules of this model (hf_model.named_modules()) "
                             "and cover all of them") from None
        raise _load_error(name, exc, allow_pickle) from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ModelError(
            f"the weights of model {name!r} lack {len(missing)} tensor(s) the model needs "
            f"(e.g. {missing[0]}); transformers would fill them with random values",
            code="model.incomplete-weights",
            hint="the weights file is incomplete or belongs to another architecture; save "
            "the model again")
    if device_map is None:
        hf_model.to(torch_device)
    elif isinstance(placement["device_map"], dict):
        _check_placed(hf_model, placement["device_map"], name, scratch)
    loaded = LoadedModel.from_hf(hf_model, found, name)
    if scratch is not None:  # the offloaded weights live as long as the model
        import weakref

        weakref.finalize(loaded, _remove_folder, scratch)
    return loaded


def _check_placed(hf_model: Any, device_map: dict, name: str, scratch: str | None) -> None:
    """transformers ignores a device map's names that are not modules of the model.

    Raises:
        ModelError: one that is not (with the names that would have been valid).
    """
    modules = dict(hf_model.named_modules())
    unknown = [key for key in device_map if key not in modules]
    if not unknown:
        return
    if scratch is not None:
        _remove_folder(scratch)
    blocks = [n for n in modules if n and n.count(".") <= 2][:12]
    raise ModelError(f"device_map names {len(unknown)} module(s) model {name!r} does not have "
                     f"(e.g. {unknown[0]!r})", code="model.device-map",
                     hint="name modules as hf_model.named_modules() does: " + ", ".join(blocks))


def _remove_folder(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


__all__ = ["LoadedModel", "load_model", "load_config", "supported_model_types"]
