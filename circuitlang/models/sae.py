"""Sparse autoencoders: reading a dictionary from a local folder, encoding and decoding.

Takes a folder a file declares (`sae res5 = "saes/res5" at resid 5`); gives an `Sae`
(its weights as tensors, its nonlinearity, its input normalisation) that the run
engine (`circuitlang.models.run`) splices in at the dictionary's hook point.

Two formats are read, safetensors only (a pickled checkpoint can run code when
loaded, so `.pt`, `.pth`, `.bin`, `.ckpt`, `.pkl` files are refused with a message
saying so):

* **SAELens**: `cfg.json` + `sae_weights.safetensors` holding `W_enc` [d_in, d_sae],
  `b_enc` [d_sae], `W_dec` [d_sae, d_in], `b_dec` [d_in] (and `threshold` [d_sae] for
  JumpReLU). `cfg.json` gives `architecture` (`standard`, `jumprelu`, `topk`) or the
  older `activation_fn_str` (`relu`, `topk` with `activation_fn_kwargs.k`),
  `apply_b_dec_to_input`, and `normalize_activations` (`none`,
  `constant_norm_rescale`: the input scaled to norm sqrt(d_in) and the output scaled
  back; `layer_norm`: the input standardised per position and the output
  un-standardised).
* **sparsify** (EleutherAI): one folder per hookpoint holding `cfg.json` (`k`,
  `num_latents` or `expansion_factor`, `d_in`) + `sae.safetensors` holding
  `encoder.weight` [d_sae, d_in], `encoder.bias`, `W_dec` [d_sae, d_in], `b_dec`. A TopK
  SAE that subtracts `b_dec` from its input (sparsify's encode does, for an
  autoencoder); transcoders (`transcode: true`) are refused: they do not reconstruct
  their input, so they have no error term.

Semantics, one for both formats: `encode(x)` gives every latent's activation (dense,
[..., d_sae], zeros where a latent is off), `decode(f, x)` the reconstruction (`x` is
needed only to undo an input normalisation). What the dictionary misses is
`error = x - decode(encode(x), x)`, a site of its own (`SaeError`).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from circuitlang.errors import ModelError

__all__ = ["Sae", "SaeInfo", "check_trained_at", "load_sae", "read_sae_info", "trained_at", "PICKLE_SUFFIXES"]

SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
#: Files that hold pickled weights: never loaded.
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
ACTIVATIONS = ("relu", "jumprelu", "topk")
NORMALISATIONS = ("none", "constant_norm_rescale", "layer_norm")
_EXPECTED = (f"a folder with cfg.json and {SAELENS_WEIGHTS} (SAELens) or cfg.json and "
             f"{SPARSIFY_WEIGHTS} (sparsify, one folder per hookpoint)")


def _error(message: str, hint: str, code: str = "sae.format") -> ModelError:
    return ModelError(message, code=code, hint=hint)


@dataclass(frozen=True, slots=True)
class SaeInfo:
    """What a dictionary's folder says without loading its weights.

    Attributes:
        path: the folder.
        format: "saelens" or "sparsify".
        d_in: the width it reads (must be the model's d_model).
        d_sae: its number of latents.
        config: cfg.json as read.
    """

    path: Path
    format: str
    d_in: int
    d_sae: int
    config: dict


def read_sae_info(path: str | Path) -> SaeInfo:
    """Which format a folder holds, and its widths (cfg.json only; no weights read).

    Raises:
        ModelError: the folder does not exist, holds pickled weights only, holds
            neither format, or its cfg.json lacks the widths.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise _error(f"SAE folder {str(folder)!r} does not exist", f"expected {_EXPECTED}",
                     code="sae.missing")
    if folder.is_file():
        if folder.suffix in PICKLE_SUFFIXES:
            raise _pickled(folder)
        raise _error(f"{str(folder)!r} is a file; an SAE is a folder", f"expected {_EXPECTED}")
    cfg_file = folder / "cfg.json"
    if (folder / SAELENS_WEIGHTS).is_file():
        fmt = "saelens"
    elif (folder / SPARSIFY_WEIGHTS).is_file():
        fmt = "sparsify"
    else:
        pickled = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise _pickled(pickled[0])
        inner = sorted(p.name for p in folder.iterdir()
                       if p.is_dir() and ((p / SPARSIFY_WEIGHTS).is_file() or (p / SAELENS_WEIGHTS).is_file()))
        hint = f"expected {_EXPECTED}"
        if inner:
            hint = ("this folder holds one SAE per hookpoint; name one of them: "
                    + ", ".join(f"{folder / name}" for name in inner[:6]))
        raise _error(f"{str(folder)!r} holds no SAE weights in a format circuitlang reads", hint)
    if not cfg_file.is_file():
        raise _error(f"SAE folder {str(folder)!r} has weights but no cfg.json", f"expected {_EXPECTED}")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _error(f"cannot read {cfg_file}: {exc}", "cfg.json must be a JSON object") from None
    if not isinstance(config, dict):
        raise _error(f"{cfg_file} is not a JSON object", "cfg.json must be a JSON object")
    d_in = config.get("d_in")
    if fmt == "saelens":
        d_sae = config.get("d_sae")
    else:
        d_sae = config.get("num_latents") or 0
        if not d_sae and isinstance(d_in, int) and isinstance(config.get("expansion_factor"), int):
            d_sae = d_in * config["expansion_factor"]
    for name, value in (("d_in", d_in), ("d_sae" if fmt == "saelens" else "num_latents", d_sae)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _error(f"{cfg_file} has {name}={value!r}", f"cfg.json needs {name}, a positive whole number")
    return SaeInfo(folder, fmt, int(d_in), int(d_sae), config)


_SAELENS_HOOK = re.compile(r"blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out|"
                           r"attn\.hook_z|hook_resid_mid)")
_SPARSIFY_HOOK = re.compile(r"(?:model\.|gpt_neox\.|transformer\.)?(?:layers|h)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?")


def trained_at(info: SaeInfo) -> tuple[str, int] | None:
    """Where the SAE was trained, as (hook, layer) in circuitlang's terms, when its files say
    (SAELens's `hook_name`, sparsify's hookpoint folder name); None when they do not.

    `blocks.5.hook_resid_post` and sparsify's `layers.5` (block 5's output) are the stream
    entering block 6: `("resid", 6)`.

    Raises:
        ModelError: it was trained where circuitlang does not splice an SAE (`hook_z`,
            the concatenated head values before W_O; `hook_resid_mid`).
    """
    if info.format == "saelens":
        match = _SAELENS_HOOK.fullmatch(str(info.config.get("hook_name") or ""))
        if match is None:
            return None
        layer, name = int(match.group(1)), match.group(2)
        if name in ("attn.hook_z", "hook_resid_mid"):
            raise _error(f"{info.path} was trained on {info.config['hook_name']}, where circuitlang does not "
                         "splice an SAE", "circuitlang splices SAEs at the residual stream (hook_resid_pre / "
                         "hook_resid_post), an attention block's output (hook_attn_out) or an MLP's output "
                         "(hook_mlp_out)", code="sae.hook")
        return {"hook_resid_pre": ("resid", layer), "hook_resid_post": ("resid", layer + 1),
                "hook_attn_out": ("attn", layer), "hook_mlp_out": ("mlp", layer)}[name]
    match = _SPARSIFY_HOOK.fullmatch(info.path.name)
    if match is None:
        return None
    layer, part = int(match.group(1)), match.group(2)
    if part is None:
        return ("resid", layer + 1)
    return ("mlp", layer) if part == "mlp" else ("attn", layer)


def check_trained_at(info: SaeInfo, hook: str, layer: int) -> None:
    """Refuse a declaration that splices an SAE somewhere else than where it was trained.

    Raises:
        ModelError: `trained_at(info)` is known and is not (hook, layer).
    """
    found = trained_at(info)
    if found is not None and found != (hook, layer):
        where = f"{info.config.get('hook_name')}" if info.format == "saelens" else f"hookpoint {info.path.name}"
        raise _error(f"{info.path} was trained at {where}, which is {found[0]} {found[1]}, not {hook} {layer}",
                     f"declare it `at {found[0]} {found[1]}`", code="sae.hook")


def _pickled(file: Path) -> ModelError:
    return _error(f"{str(file)!r} holds pickled weights, which circuitlang does not load "
                  "(unpickling can run code)",
                  "save the SAE as safetensors: SAELens's sae_weights.safetensors or sparsify's "
                  "sae.safetensors, with its cfg.json", code="sae.pickle")


@dataclass(frozen=True, eq=False)
class Sae:
    """A sparse autoencoder's weights and how it encodes (see the module docstring).

    Attributes:
        W_enc: [d_in, d_sae]. b_enc: [d_sae]. W_dec: [d_sae, d_in]. b_dec: [d_in].
        activation: "relu", "jumprelu" (with `threshold`) or "topk" (with `k`).
        k: latents kept per position (topk).
        threshold: [d_sae] (jumprelu).
        apply_b_dec_to_input: subtract `b_dec` from the input before encoding.
        normalize: one of `NORMALISATIONS`.
        format, path: where it came from.
    """

    W_enc: torch.Tensor
    b_enc: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    activation: str = "relu"
    k: int = 0
    threshold: torch.Tensor | None = None
    apply_b_dec_to_input: bool = False
    normalize: str = "none"
    format: str = ""
    path: str = ""

    def __post_init__(self) -> None:
        d_in, d_sae = self.W_enc.shape
        want = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
        for name, shape in want.items():
            if tuple(getattr(self, name).shape) != shape:
                raise _error(f"SAE {self.path or ''}: {name} has shape {tuple(getattr(self, name).shape)}",
                             f"expected {shape} (W_enc is {tuple(self.W_enc.shape)})", code="sae.shape")
        if self.activation not in ACTIVATIONS:
            raise _error(f"SAE activation {self.activation!r} is not supported",
                         "supported: " + ", ".join(ACTIVATIONS), code="sae.activation")
        if self.activation == "topk" and not 0 < self.k <= d_sae:
            raise _error(f"a TopK SAE needs 0 < k <= d_sae ({d_sae}), got k={self.k}",
                         "set k in cfg.json", code="sae.activation")
        if self.activation == "jumprelu" and (self.threshold is None or tuple(self.threshold.shape) != (d_sae,)):
            raise _error("a JumpReLU SAE needs a threshold of shape [d_sae]",
                         "save `threshold` beside W_enc in the safetensors file", code="sae.shape")
        if self.normalize not in NORMALISATIONS:
            raise _error(f"SAE input normalisation {self.normalize!r} is not supported",
                         "supported: " + ", ".join(NORMALISATIONS)
                         + " (fold a constant scaling factor into the weights)", code="sae.normalize")

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def to(self, device, dtype: torch.dtype | None = None) -> "Sae":
        """The same SAE with its tensors on `device` (and of `dtype`)."""
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype or t.dtype)
        return Sae(move(self.W_enc), move(self.b_enc), move(self.W_dec), move(self.b_dec), self.activation,
                   self.k, move(self.threshold), self.apply_b_dec_to_input, self.normalize, self.format,
                   self.path)

    # ---- the computation ---------------------------------------------------------
    def _norm(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float, torch.Tensor | float]:
        """(normalised input, scale, shift): the output is un-normalised as `y * scale + shift`."""
        if self.normalize == "constant_norm_rescale":
            norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            scale = norm / math.sqrt(x.shape[-1])
            return x / scale, scale, 0.0
        if self.normalize == "layer_norm":
            mu = x.mean(-1, keepdim=True)
            std = (x - mu).std(-1, keepdim=True) + 1e-5
            return (x - mu) / std, std, mu
        return x, 1.0, 0.0

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Every latent's activation, [..., d_sae] (zeros where off)."""
        x_in, _, _ = self._norm(x)
        if self.apply_b_dec_to_input:
            x_in = x_in - self.b_dec
        pre = x_in @ self.W_enc + self.b_enc
        if self.activation == "jumprelu":
            return pre * (pre > self.threshold)
        acts = torch.relu(pre)
        if self.activation == "topk":
            top = acts.topk(self.k, dim=-1)
            acts = torch.zeros_like(acts).scatter(-1, top.indices, top.values)
        return acts

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The reconstruction from latent activations `f`; `x` (the input) undoes a normalisation."""
        y = f @ self.W_dec + self.b_dec
        if self.normalize == "none":
            return y
        if x is None:
            raise _error("this SAE normalises its input: decode needs the input x",
                         "call decode(f, x)", code="sae.normalize")
        _, scale, shift = self._norm(x)
        return y * scale + shift

    def decode_delta(self, df: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """How the reconstruction moves when the latents move by `df` (exactly 0 for df = 0)."""
        y = df @ self.W_dec
        if self.normalize == "none":
            return y
        _, scale, _ = self._norm(x)
        return y * scale

    def write(self, index: int, value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """What latent `index` at activation `value` [...] adds to the reconstruction of
        `x` [..., d_in]: its decoder row, scaled as the input was normalised."""
        y = value[..., None] * self.W_dec[index]
        if self.normalize == "none":
            return y
        _, scale, _ = self._norm(x)
        return y * scale

    def error(self, x: torch.Tensor) -> torch.Tensor:
        """What the dictionary misses at `x`: `x - decode(encode(x), x)`."""
        return x - self.decode(self.encode(x), x)


def load_sae(path: str | Path) -> Sae:
    """Read an SAE from a local folder, SAELens or sparsify format (module docstring).

    Raises:
        ModelError: not a folder of either format, pickled weights, missing or
            misshapen tensors, an activation or normalisation circuitlang does not run.
    """
    info = read_sae_info(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights_file = info.path / (SAELENS_WEIGHTS if info.format == "saelens" else SPARSIFY_WEIGHTS)
    try:
        tensors = load_file(str(weights_file), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise _error(f"cannot read {weights_file}: {exc}", "it must be a safetensors file") from None
    cfg = info.config

    def need(*names: str) -> list[torch.Tensor]:
        missing = [n for n in names if n not in tensors]
        if missing:
            raise _error(f"{weights_file} has no {', '.join(missing)}",
                         f"a {info.format} SAE holds " + ", ".join(names)
                         + f"; this file holds {', '.join(sorted(tensors)) or 'nothing'}", code="sae.shape")
        return [tensors[n].float() for n in names]

    if info.format == "saelens":
        arch = str(cfg.get("architecture") or "standard")
        fn = str(cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu")
        kwargs = cfg.get("activation_fn_kwargs") or {}
        if arch == "gated":
            raise _error("gated SAEs are not supported", "supported SAELens architectures: standard, "
                         "jumprelu, topk", code="sae.activation")
        activation = {"jumprelu": "jumprelu", "topk": "topk"}.get(arch, "topk" if fn == "topk" else fn)
        W_enc, b_enc, W_dec, b_dec = need("W_enc", "b_enc", "W_dec", "b_dec")
        threshold = need("threshold")[0] if activation == "jumprelu" else None
        k = int(kwargs.get("k", cfg.get("k", 0)) or 0)
        return Sae(W_enc, b_enc, W_dec, b_dec, activation, k, threshold,
                   bool(cfg.get("apply_b_dec_to_input", False)),
                   str(cfg.get("normalize_activations") or "none"), "saelens", str(info.path))
    if cfg.get("transcode"):
        raise _error(f"{info.path} is a transcoder (transcode: true), not an autoencoder",
                     "a transcoder does not reconstruct its input, so it has no error term; "
                     "declare an SAE trained to reconstruct the hookpoint", code="sae.activation")
    activation = str(cfg.get("activation", "topk"))
    if activation != "topk":
        raise _error(f"sparsify activation {activation!r} is not supported", "supported: topk",
                     code="sae.activation")
    enc_w, enc_b, W_dec, b_dec = need("encoder.weight", "encoder.bias", "W_dec", "b_dec")
    return Sae(enc_w.t().contiguous(), enc_b, W_dec, b_dec, "topk", int(cfg.get("k", 0) or 0), None,
               True, "none", "sparsify", str(info.path))


# A process-wide cache: one SAE read once per (folder, its weights' mtime, device, dtype);
# and each folder's weights file, so a run checking thousands of latent sites stats one
# file instead of parsing cfg.json for each.
_LOADED: dict[tuple, Sae] = {}
_WEIGHTS: dict[str, Path] = {}


def sae_for(path: str, device, dtype: torch.dtype) -> Sae:
    """The SAE in folder `path`, on `device` in `dtype`, read once per process (re-read when
    its weights file changes)."""
    weights = _WEIGHTS.get(str(path))
    if weights is None or not weights.is_file():
        info = read_sae_info(path)
        weights = info.path / (SAELENS_WEIGHTS if info.format == "saelens" else SPARSIFY_WEIGHTS)
        _WEIGHTS[str(path)] = weights
    key = (str(weights.parent.resolve()), weights.stat().st_mtime_ns, str(device), dtype)
    found = _LOADED.get(key)
    if found is None:
        for old in [k for k in _LOADED if k[0] == key[0] and k[1] != key[1]]:
            del _LOADED[old]
        found = load_sae(path).to(device, dtype)
        _LOADED[key] = found
    return found
