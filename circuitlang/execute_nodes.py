"""One scrubbing node's output from its input streams, without a forward pass.

Takes a loaded model and, for a batch of rows, the input streams of one claimed node
(a head's q, k and v streams, an MLP's input stream, the root's final residual
stream) as `execute.Scrubber` assembles them; gives the node's output at the
positions its parent reads (a head's output `z_h @ W_O[h]` without the shared bias,
an MLP's output, the logits).

Why this is exact: in a scrubbing row only the node's own inputs are patched, so its
output is a function of those streams alone; the layers below it and above it add
nothing. A head's output at position p reads its query at p and its keys and values
at positions <= p (causal attention), so a head read at a named position computes
one query per row, and an MLP or the unembedding only the positions read.

Which models: the kernels use the model's own modules for the norms, the MLP and the
unembedding, and the adapter's per-head weights for attention (scaled dot product,
causal and padding masks, eager softmax). Before a kernel is used for a model it is
compared on a few prompts with the model's own forward pass (`NodeKernels.verify`);
where it disagrees (rotary position embeddings, a final logit soft-cap), the scrubber
computes those nodes with patched forward passes instead, as before.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from circuitlang.models.adapters.base import linear_bias
from circuitlang.sites import Channel, Head, Mlp, Resid

__all__ = ["NodeKernels", "Work"]

_PROBE_PROMPTS = 4


@dataclass
class Work:
    """What scrubbing computed, counted exactly (the report prints it).

    Attributes:
        head_rows, mlp_rows, subspace_rows, root_rows: node rows computed by the kernels
            (one node on one prompt), after memoisation.
        forward_rows: rows computed by a patched forward pass (nodes the kernels do not
            cover on this model).
        reused: rows not computed because an identical row (same site, same sampled
            prompts, same sub-tree) was computed already.
        head_token_layers: keys read by head rows (one head of one layer per token).
        mlp_token_layers: positions computed by MLP rows (one MLP per position).
        logit_positions: positions unembedded for the metric.
        forward_token_layers: tokens x blocks run by patched forward passes.
    """

    head_rows: int = 0
    mlp_rows: int = 0
    subspace_rows: int = 0
    root_rows: int = 0
    forward_rows: int = 0
    reused: int = 0
    head_token_layers: int = 0
    mlp_token_layers: int = 0
    logit_positions: int = 0
    forward_token_layers: int = 0
    levels: list = field(default_factory=list)

    @property
    def rows(self) -> int:
        return self.head_rows + self.mlp_rows + self.subspace_rows + self.root_rows + self.forward_rows

    def describe(self) -> str:
        """One line: rows computed and reused, and the token-layers behind them."""
        subspaces = f"{self.subspace_rows:,} subspace, " if self.subspace_rows else ""
        parts = [(f"{self.rows:,} node rows ({self.head_rows:,} head, {self.mlp_rows:,} MLP, {subspaces}"
                 f"{self.root_rows:,} logits, {self.forward_rows:,} by forward passes), "
                  f"{self.reused:,} identical rows reused"),
                 (f"{self.head_token_layers:,} head-token-layers, {self.mlp_token_layers:,} MLP-token-layers, "
                  f"{self.logit_positions:,} unembedded positions")]
        if self.forward_token_layers:
            parts.append(f"{self.forward_token_layers:,} full token-layers in forward passes")
        return "; ".join(parts)

    def as_dict(self) -> dict:
        return {"rows": self.rows, "head_rows": self.head_rows, "mlp_rows": self.mlp_rows,
                "subspace_rows": self.subspace_rows,
                "root_rows": self.root_rows, "forward_rows": self.forward_rows, "reused": self.reused,
                "head_token_layers": self.head_token_layers, "mlp_token_layers": self.mlp_token_layers,
                "logit_positions": self.logit_positions, "forward_token_layers": self.forward_token_layers}


class NodeKernels:
    """Head, MLP and unembedding outputs computed from given input streams.

    Args:
        model: a `LoadedModel`.
    """

    def __init__(self, model):
        self.model = model
        self.adapter = model.adapter
        self.device = model.device
        self._verified: dict[str, bool] = {}
        self._unembed: tuple | None = None  # (columns, the unembedding of only those)

    # -- the kernels -------------------------------------------------------------------

    def head(self, site: Head, q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor,
             mask: torch.Tensor, query: torch.Tensor | None) -> torch.Tensor:
        """Head `site`'s output from its q/k/v input streams [B, T, D].

        Args:
            q_in: [B, T, D], or [B, D] already at `query`.
            mask: the rows' attention masks [B, T] (1 for real tokens).
            query: the one query position per row [B], or None for every position.

        Returns:
            [B, D] at `query`, or [B, T, D].
        """
        dev = self.device
        q_in, k_in, v_in, mask = (x.to(dev) for x in (q_in, k_in, v_in, mask))
        if query is not None:
            query = query.to(dev)
            width = int(query.max()) + 1  # causal: no key after the last query is read
            k_in, v_in = k_in[:, :width], v_in[:, :width]
            if q_in.dim() == 3:
                q_in = q_in[torch.arange(q_in.shape[0], device=dev), query]
        q = self.project(site, Channel.Q, q_in if query is None else q_in.unsqueeze(1))
        return self.attend(site, q, self.project(site, Channel.K, k_in), self.project(site, Channel.V, v_in),
                           mask, query)

    def project(self, site: Head, channel: Channel, stream: torch.Tensor) -> torch.Tensor:
        """Head `site`'s query, key or value from an input stream ([..., D] -> [..., d_head];
        a key or value is its key/value group's)."""
        unit = site.head if channel is Channel.Q else site.head // self.adapter.kv_group()
        norm = self.adapter.attn_norm(site.layer)
        return self._project(site.layer, channel, unit, norm(stream.to(self.device)))

    def attend(self, site: Head, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
               query: torch.Tensor | None) -> torch.Tensor:
        """Head `site`'s output from its queries [B, 1 or T, d_head] (one per row at
        `query` [B], or every position), keys and values [B, T_k, d_head] (`T_k` may stop
        after the last query) and the rows' attention masks [B, T]."""
        dev = self.device
        mask = mask.to(dev)[:, :k.shape[1]]
        scores = torch.matmul(q, k.transpose(-1, -2)) * self._scaling(site.layer, q.shape[-1])
        keys = torch.arange(k.shape[1], device=dev)
        q_pos = query.to(dev).unsqueeze(1) if query is not None else torch.arange(q.shape[1], device=dev).unsqueeze(0)
        allowed = (keys.view(1, 1, -1) <= q_pos.unsqueeze(-1)) & mask.bool().unsqueeze(1)
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(torch.matmul(weights, v), self.adapter.out_weight(site.layer)[site.head])
        return out[:, 0] if query is not None else out

    def _project(self, layer: int, channel: Channel, unit: int, normed: torch.Tensor) -> torch.Tensor:
        proj = self.adapter.projection(layer, channel)
        out = torch.matmul(normed, proj.weight[unit])
        bias = linear_bias(proj.module)
        return out if bias is None else out + bias[proj.columns[unit]]

    def _scaling(self, layer: int, d_head: int) -> float:
        attn = self.adapter.attn(layer)
        scaling = getattr(attn, "scaling", None)
        return float(scaling) if scaling is not None else d_head ** -0.5

    def mlp(self, site: Mlp, x: torch.Tensor) -> torch.Tensor:
        """MLP `site`'s output from its input stream at the positions given ([B, D] or [B, T, D])."""
        x = x.to(self.device)
        return self.adapter.mlp(site.layer)(self.adapter.mlp_norm(site.layer)(x))

    def subspace(self, site, x: torch.Tensor) -> torch.Tensor:
        """A stream's part in a subspace, `x B B^T` (its value as a node)."""
        from circuitlang.models.subspace import basis_for

        b = basis_for(self.model, site.basis).to("cpu", x.dtype)
        return (x @ b) @ b.T

    def logits(self, x: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from final residual streams at the positions given ([P, D] -> [P, V]),
        or only vocabulary `columns` of them ([P, len(columns)])."""
        x = self.adapter.final_norm()(x.to(self.device))
        if columns is None:
            return self.adapter.unembed()(x)
        key = tuple(columns.tolist())
        if self._unembed is None or self._unembed[0] != key:
            from circuitlang.models.run import unembed_columns

            self._unembed = (key, unembed_columns(self.model, columns))
        return self._unembed[1](x)

    # -- when they may be used -------------------------------------------------------------

    def verify(self, kind: str, prompts) -> bool:
        """Whether kernel `kind` ("head", "mlp" or "logits") reproduces the model's own
        forward pass on this model (checked once for all three, with one forward pass on
        the first few prompts)."""
        if not self._verified:
            self._verified = self._probe(prompts)
        return self._verified[kind]

    def _probe(self, prompts) -> dict[str, bool]:
        from circuitlang.sites import MlpIn

        shape = self.model.shape
        ids = prompts.input_ids[:_PROBE_PROMPTS]
        mask = prompts.attention_mask[:_PROBE_PROMPTS]
        layers = sorted({0, shape.n_layers - 1})
        heads = [Head(layer, shape.n_heads - 1) for layer in layers]
        sites = [s for hd in heads for s in (hd.with_channel(Channel.Q), hd.with_channel(Channel.K),
                                             hd.with_channel(Channel.V), hd.with_channel(Channel.OUT))]
        if shape.has_mlp:
            sites += [s for layer in layers for s in (MlpIn(layer), Mlp(layer))]
        sites.append(Resid(shape.n_layers))
        with torch.no_grad():
            run = self.model.run(ids, mask, capture=sites)
            c = run.cache
            pairs = {
                "head": [(self.head(hd, c[hd.with_channel(Channel.Q)], c[hd.with_channel(Channel.K)],
                                    c[hd.with_channel(Channel.V)], mask, None), c[hd.with_channel(Channel.OUT)])
                         for hd in heads],
                "mlp": [(self.mlp(Mlp(layer), c[MlpIn(layer)]), c[Mlp(layer)]) for layer in layers]
                if shape.has_mlp else None,
                "logits": [(self.logits(c[Resid(shape.n_layers)]), run.logits)],
            }
        return {kind: pair is not None and self._agree(pair, mask) for kind, pair in pairs.items()}

    def _agree(self, pairs: list, mask: torch.Tensor) -> bool:
        real = mask.bool().to(self.device)
        relative = 1e-4 if self.model.dtype == torch.float32 else 2e-2
        for mine, theirs in pairs:
            mine, theirs = mine[real].float(), theirs.to(self.device)[real].float()
            tol = relative * max(1.0, float(theirs.abs().max()))
            if mine.shape != theirs.shape or float((mine - theirs).abs().max()) > tol:
                return False
        return True
