"""Subspaces as sites: reading a fixed orthonormal basis, and the hooks that capture and patch
a state's coordinates in it.

Takes a `sites.Basis` (a safetensors file and where in the model it lies) and the run
engine's plan (`circuitlang.models.run`); gives the basis as a tensor, checked, and the
(module, hook, kind) triples that read and write `Subspace` sites.

* **File format.** safetensors only (a pickle is refused before it is opened). The basis is
  the tensor `basis`, [d_model, k], orthonormal columns (`B.T @ B = I`), as `align`
  (circuitlang.das) saves it; or a probe file's `layer{L}.basis` (format
  `circuitlang-probe/1`), which holds [k, d_model] orthonormal rows and is transposed.
* **The site.** `Subspace(basis)` is the state's coordinates `c = x @ B`, [B, T, k], where
  `x` is the stream entering block L (`resid L`), head L.H's output `z_h @ W_O[h]`
  (`head L.H.out`, no bias) or MLP L's output (`mlp L`). A patch that gives new
  coordinates `c'` moves the state by `(c' - c) @ B.T`, so the part of `x` orthogonal to
  the subspace is untouched, and an identity patch adds exact zeros.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from circuitlang.errors import ModelError
from circuitlang.models.patches import _first, _replace_first, check_place
from circuitlang.sites import SUBSPACE_HOOKS, Basis, Subspace, Written

if TYPE_CHECKING:  # pragma: no cover
    from circuitlang.models.load import LoadedModel

#: How far `B.T @ B` may be from the identity (fp32 files; a probe's basis is a QR in fp64).
ORTHONORMAL_TOL = 1e-4
SUBSPACE_FORMAT = "circuitlang-subspace/1"
PROBE_FORMAT = "circuitlang-probe/1"  # circuitlang.probes, kept in step by a test

_cache: dict[tuple, torch.Tensor] = {}


def is_subspace_site(site: Any) -> bool:
    """A subspace's coordinates, or what lies of its state in it (`Written(subspace)`)."""
    return isinstance(site, Subspace) or (isinstance(site, Written) and isinstance(site.unit, Subspace))


def basis_key(path: str | Path, layer: int) -> str:
    """The key the basis is under in `path`: `layer{L}.basis` in a probe file, else `basis`."""
    meta = _metadata(Path(path))
    return f"layer{layer}.basis" if meta.get("format") == PROBE_FORMAT else "basis"


def read_basis(path: str | Path, key: str = "basis", *, d_model: int | None = None) -> torch.Tensor:
    """The [d_model, k] orthonormal basis stored under `key` in a safetensors file (fp64).

    Raises:
        ModelError: not a safetensors file (a pickle is refused), no tensor `key`, not a
            matrix, not orthonormal, or (given `d_model`) the wrong width.
    """
    path = Path(path)
    meta = _metadata(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        keys = list(fh.keys())
        if key not in keys:
            raise ModelError(f"{path.name} has no tensor {key!r}", code="model.subspace-file",
                             hint=f"the basis is read from the key {key!r}; the file holds "
                             + (", ".join(sorted(keys)[:8]) or "no tensors"))
        b = fh.get_tensor(key).to(torch.float64)
    if b.dim() != 2:
        raise ModelError(f"{path.name}: {key!r} has shape {tuple(b.shape)}, not a matrix",
                         code="model.subspace-file", hint="save the basis as [d_model, k]")
    if meta.get("format") == PROBE_FORMAT:
        b = b.T  # a probe file's basis holds rows
    if d_model is not None and b.shape[0] != d_model:
        raise ModelError(f"{path.name}: the basis {key!r} is {b.shape[0]} wide, the model's states are "
                         f"{d_model}", code="model.subspace-width",
                         hint=f"save it as [{d_model}, k] (columns are the directions), for this model")
    if b.shape[1] == 0 or b.shape[1] > b.shape[0]:
        raise ModelError(f"{path.name}: the basis {key!r} has shape {tuple(b.shape)}",
                         code="model.subspace-file", hint="a basis is [d_model, k] with 1 <= k <= d_model")
    gap = (b.T @ b - torch.eye(b.shape[1], dtype=b.dtype)).abs().max().item()
    if not gap <= ORTHONORMAL_TOL:
        raise ModelError(f"{path.name}: the basis {key!r} is not orthonormal (|B^T B - I| reaches {gap:.3g})",
                         code="model.subspace-orthonormal",
                         hint="orthonormalise its columns first, e.g. torch.linalg.qr(B).Q")
    return b


def _metadata(path: Path) -> dict:
    if path.suffix in (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"):
        raise ModelError(f"{path.name} looks like a pickle; subspaces are read from safetensors only",
                         code="model.subspace-pickle",
                         hint="save the basis with safetensors.torch.save_file({'basis': B}, 'b.safetensors')")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise ModelError(f"cannot read subspace file {str(path)!r}: {exc.strerror or exc}",
                         code="model.subspace-file", hint="give a .safetensors file holding `basis`") from None
    if head[:1] == b"\x80" or head[:2] == b"PK":  # a pickle protocol byte, or torch.save's zip
        raise ModelError(f"{path.name} is a pickle; subspaces are read from safetensors only",
                         code="model.subspace-pickle",
                         hint="save the basis with safetensors.torch.save_file({'basis': B}, 'b.safetensors')")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path.name} is not a safetensors file: {exc}", code="model.subspace-file",
                         hint="save the basis with safetensors.torch.save_file({'basis': B}, 'b.safetensors')") from None


def basis_for(lm: "LoadedModel", basis: Basis) -> torch.Tensor:
    """The basis of a declared subspace on the model's device and dtype (cached per file
    version), checked against the model."""
    check_basis(lm, basis)
    if basis.seed is not None:
        return random_basis(lm.shape.d_model, basis.k, basis.seed).to(lm.device, lm.dtype)
    path = Path(basis.path)
    stamp = path.stat().st_mtime_ns if path.exists() else 0
    key = (str(path), basis.key, stamp, str(lm.device), lm.dtype)
    if key not in _cache:
        _cache[key] = read_basis(path, basis.key, d_model=lm.shape.d_model).to(lm.device, lm.dtype)
    return _cache[key]


def random_basis(d_model: int, k: int, seed: int) -> torch.Tensor:
    """A uniformly random k-dimensional subspace of R^d_model, as an orthonormal [d_model, k]
    basis (QR of a Gaussian matrix, signs fixed), the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d_model, k, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(torch.float32)


def check_basis(lm: "LoadedModel", basis: Basis) -> None:
    """Raise ModelError unless the subspace's place exists in this model."""
    shape = lm.shape
    check_place(shape, basis, basis.hook, basis.layer, SUBSPACE_HOOKS, noun="place", reads="a subspace lies at",
                elsewhere="declare the subspace at resid L or head L.H.out")
    if basis.hook == "head" and not (basis.head is not None and 0 <= basis.head < shape.n_heads):
        raise ModelError(f"{basis}: head {basis.head} out of range", code="model.bad-site",
                         hint=f"model has heads 0-{shape.n_heads - 1} per layer")


def _moved(x: torch.Tensor, b: torch.Tensor, site: Subspace, plan) -> torch.Tensor | None:
    """The change of the state `x` [B, T, D] the site's patches make (None: none), and the
    captured coordinates (and, for `Written(site)`, the state's part in the subspace)."""
    c = x @ b
    new = plan.through(site, c)
    written = Written(site)
    if written in plan.capture:
        plan.cache[written] = new @ b.T
    return None if new is c else (new - c) @ b.T


def subspace_hooks(lm: "LoadedModel", plan) -> tuple[list, list]:
    """(hooks to register before the engine's own, hooks after), as (module, hook,
    'pre'|'fwd') triples, for the `Subspace` sites `plan` captures or patches."""
    adapter, n = lm.adapter, lm.shape.n_layers
    touched = sorted({s.unit if isinstance(s, Written) else s
                      for s in set(plan.capture) | set(plan.patches) if is_subspace_site(s)}, key=str)
    first: list = []
    last: list = []
    for site in touched:
        basis = site.basis
        b = basis_for(lm, basis)
        if basis.hook == "resid":
            # before the engine's block hook, so a Resid(l) capture sees the moved stream
            module = adapter.blocks()[basis.layer] if basis.layer < n else adapter.final_norm()
            name = "hidden_states" if basis.layer < n else "input"
            first.append((module, _stream_hook(site, b, plan, name), "pre"))
        elif basis.hook == "mlp":
            last.append((adapter.mlp(basis.layer), _output_hook(site, b, plan, None), "fwd"))
        else:
            z: dict = {}
            last.append((adapter.out_proj(basis.layer), _stash_z(z), "pre"))
            w_o = adapter.out_weight(basis.layer)[basis.head]  # [dh, D]
            last.append((adapter.attn(basis.layer), _output_hook(site, b, plan, (z, w_o, lm.shape.n_heads)), "fwd"))
    return first, last


def _stream_hook(site: Subspace, b: torch.Tensor, plan, name: str):
    def hook(module, args, kwargs):
        x = _first(args, kwargs, name)
        delta = _moved(x, b, site, plan)
        return None if delta is None else _replace_first(args, kwargs, name, x + delta)
    return hook


def _stash_z(z: dict):
    def hook(module, args, kwargs):
        z["z"] = _first(args, kwargs, "input")
    return hook


def _output_hook(site: Subspace, b: torch.Tensor, plan, head):
    def hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        if head is None:
            x = out
        else:  # one head's own output, z_h @ W_O[h]
            z, w_o, n_heads = head
            zz = z.pop("z")
            x = zz.reshape(*zz.shape[:2], n_heads, -1)[:, :, site.basis.head] @ w_o
        delta = _moved(x, b, site, plan)
        if delta is None:
            return None
        new = out + delta
        return (new, *output[1:]) if isinstance(output, tuple) else new
    return hook
