"""Lenses on one model and one task: direct logit attribution, the logit lens, attention.

Takes a `LoadedModel`, a task, its `PromptSet` and a metric name; gives numpy arrays
indexed by typed sites (`Head(9, 6)`, `Mlp(3)`, `Resid(5)`, `Embed()`), one row per
prompt, and their means. Activations come from the run engine's captures
(`LoadedModel.run(capture=...)`: each sender's own contribution to the residual stream,
the streams entering each block, each head's pattern), so every architecture with an
adapter works and no module path appears here. Nothing here draws: `circuitlang.figures`
turns the results into figures (`dla_grid`, `logit_lens`, `attention_pattern`).

* `direct_logit_attribution`: each component's *direct* effect on the metric, the part
  that reaches the logits through the residual stream without passing through a later
  component. The final residual stream is a sum of parts (embeddings, each head's
  output, each attention layer's shared output bias, each MLP's output); each part is
  put through the final norm with its scale frozen at the clean value (the norm is then
  linear), through the unembedding and into the metric. For metrics linear in the logits
  (`logit_diff`, `answer_logit`) this is exact; for the others (`prob_diff`,
  `answer_prob`, `loss`) it is the first-order term: the metric's gradient with respect
  to the (frozen-scale) final stream, dotted with the part. The parts add up exactly
  (to float rounding) to the metric's linearization at the final stream.
* `logit_lens`: the metric read off the residual stream after each block (and after the
  embeddings), through the model's real final norm and unembedding; at the metric's own
  positions, or at named positions (`S2`, `END-1`) put where the metric reads END.
  The last row is the model's own metric.
* `attention_patterns`: chosen heads' attention probabilities on token ids.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from circuitlang import topology
from circuitlang.errors import ExecutionError, ModelError
from circuitlang.sites import Channel, Embed, Head, Mlp, ModelShape, Position, Resid, Site

#: Metrics that are linear in the logits: their direct effects are exact, not first-order.
LINEAR_METRICS = ("logit_diff", "answer_logit")

#: Prompts per forward pass (DLA keeps every component's output for a batch).
DEFAULT_BATCH = 16


# ---- direct logit attribution ----------------------------------------------------------
@dataclass(frozen=True, eq=False)
class DirectEffects:
    """Each component's direct effect on a metric, per prompt (N prompts, L layers, H heads).

    Attributes:
        metric: the metric's name.
        shape: the model's shape.
        heads: [N, L, H] each head's direct effect.
        mlps: [N, L] each MLP's (NaN for an attention-only model).
        embed: [N] the embeddings' (token plus learned positions).
        attn_bias: [N, L] each attention layer's shared output bias (no head owns it; 0
            where the architecture has none).
        norm_bias: [N] the final norm's bias (0 for RMSNorm).
        linearized: [N] the metric's linearization at the final residual stream: its
            gradient there dotted with the stream. The parts above sum to it.
        metric_values: [N] the metric itself on the clean run.
        exact: True when the metric is linear in the logits; then `metric_values -
            linearized` is what no component writes (the unembedding's bias).
    """

    metric: str
    shape: ModelShape
    heads: np.ndarray
    mlps: np.ndarray
    embed: np.ndarray
    attn_bias: np.ndarray
    norm_bias: np.ndarray
    linearized: np.ndarray
    metric_values: np.ndarray
    exact: bool

    @property
    def n_prompts(self) -> int:
        return int(self.embed.shape[0])

    @property
    def head_grid(self) -> np.ndarray:
        """[L, H] mean direct effect of each head over the prompts."""
        return self.heads.mean(0)

    @property
    def mlp_column(self) -> np.ndarray:
        """[L] mean direct effect of each MLP."""
        return self.mlps.mean(0)

    def sites(self) -> list[Site]:
        """The components with a typed site, in computation order."""
        return topology.senders(self.shape)

    def __getitem__(self, site: Site) -> np.ndarray:
        """Per-prompt direct effect [N] of `Embed()`, `Head(l, h)` or `Mlp(l)`."""
        if isinstance(site, Embed):
            return self.embed
        if isinstance(site, Head) and site.channel is Channel.OUT:
            if 0 <= site.layer < self.shape.n_layers and 0 <= site.head < self.shape.n_heads:
                return self.heads[:, site.layer, site.head]
        elif isinstance(site, Mlp) and self.shape.has_mlp and 0 <= site.layer < self.shape.n_layers:
            return self.mlps[:, site.layer]
        raise ExecutionError(f"direct logit attribution has no value for {site}",
                             hint=f"ask for embed, head L.H (L < {self.shape.n_layers}, "
                             f"H < {self.shape.n_heads})" + (", mlp L" if self.shape.has_mlp else ""))

    def value(self, site: Site) -> float:
        """Mean direct effect of one component over the prompts."""
        return float(self[site].mean())

    def total(self) -> np.ndarray:
        """[N] the sum of every part's direct effect (equals `linearized`)."""
        parts = self.heads.sum((1, 2)) + self.embed + self.attn_bias.sum(1) + self.norm_bias
        if self.shape.has_mlp:
            parts = parts + self.mlps.sum(1)
        return parts

    def to_dict(self) -> dict[str, float]:
        """Mean direct effect by site name (`"head 1.2"`, `"mlp 0"`, `"embed"`)."""
        return {str(s): self.value(s) for s in self.sites()}


def direct_logit_attribution(model, task, prompts, metric: str | None = None, *,
                             batch_size: int = DEFAULT_BATCH) -> DirectEffects:
    """Direct effect of every head, MLP and the embeddings on `metric`, per prompt.

    Args:
        model: a `LoadedModel`.
        task: the task whose metric is read (`circuitlang.tasks.load_task`).
        prompts: the task's `PromptSet` (its clean prompts are run).
        metric: one of the task's metrics; its default when None. For metrics linear in
            the logits (`LINEAR_METRICS`) the effects are exact; for the others they use
            the metric's gradient with respect to the final residual stream on each
            clean prompt (a first-order attribution).
        batch_size: prompts per forward pass.

    Returns:
        `DirectEffects`, whose parts sum to its `linearized` values.

    Raises:
        ExecutionError: `kl` (zero, with zero gradient, on the clean run: nothing to
            attribute), or a metric the task does not define.
        ModelError: a final norm that is neither a LayerNorm nor an RMSNorm.
    """
    metric = _metric_name(task, metric)
    if metric == "kl":
        raise ExecutionError(
            "direct logit attribution of kl is zero: on the clean run kl is 0 and so is its gradient",
            hint="attribute logit_diff, prob_diff or loss instead")
    shape = model.shape
    adapter = model.adapter
    n_layers, n_heads = shape.n_layers, shape.n_heads
    senders = topology.senders(shape)
    final = Resid(n_layers)
    biases = [adapter.out_bias(l) for l in range(n_layers)]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in
                                          ("heads", "mlps", "embed", "attn_bias", "norm_bias", "lin", "metric")}
    for rows in _chunks(len(prompts), batch_size):
        sub = prompts.subset(rows)
        with torch.no_grad():
            run = model.run(sub.input_ids, sub.attention_mask, capture=[*senders, final])
        x = run.cache[final]
        frozen = _FrozenNorm.at(adapter.final_norm(), x)
        # G: the metric's gradient with respect to the stream after the final norm
        y = adapter.final_norm()(x).detach().requires_grad_(True)
        with torch.enable_grad():
            logits = adapter.unembed()(y)
            values = task.metric(metric, logits, sub)
            grad, = torch.autograd.grad(values.sum(), y)
        g = grad.double()
        h = frozen.pull_back(g)  # d metric / d (final stream), through the frozen-scale norm
        b = len(rows)
        heads = np.zeros((b, n_layers, n_heads))
        mlps = np.full((b, n_layers), np.nan)
        bias = np.zeros((b, n_layers))
        for site in senders:
            v = _dot(h, run.cache[site])
            if isinstance(site, Head):
                heads[:, site.layer, site.head] = v
            elif isinstance(site, Mlp):
                mlps[:, site.layer] = v
            else:
                parts["embed"].append(v)
        for l, b_o in enumerate(biases):
            if b_o is not None:
                bias[:, l] = (h.sum(1) @ b_o.detach().double()).cpu().numpy()
        parts["heads"].append(heads)
        parts["mlps"].append(mlps)
        parts["attn_bias"].append(bias)
        beta = frozen.beta
        parts["norm_bias"].append(np.zeros(b) if beta is None else (g.sum(1) @ beta).cpu().numpy())
        parts["lin"].append(_dot(g, y.detach()))
        parts["metric"].append(values.detach().double().cpu().numpy())
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    return DirectEffects(metric, shape, cat["heads"], cat["mlps"], cat["embed"], cat["attn_bias"],
                         cat["norm_bias"], cat["lin"], cat["metric"], metric in LINEAR_METRICS)


@dataclass(frozen=True, eq=False)
class _FrozenNorm:
    """The final norm at one batch, with its scale frozen: `gamma * P(x) / s + beta`, where
    P subtracts the mean (LayerNorm) or does nothing (RMSNorm) and s [B, T, 1] is fixed."""

    gamma: torch.Tensor  # [D], float64
    beta: torch.Tensor | None  # [D], float64
    scale: torch.Tensor  # [B, T, 1], float64
    centred: bool

    @classmethod
    def at(cls, norm: torch.nn.Module, x: torch.Tensor) -> "_FrozenNorm":
        """Read the norm's parts, and check that they reproduce its output on `x`.

        Raises:
            ModelError: the norm is not one this formula describes.
        """
        centred = isinstance(norm, torch.nn.LayerNorm)
        eps = getattr(norm, "eps", None) if centred else getattr(norm, "variance_epsilon",
                                                                 getattr(norm, "eps", None))
        weight = getattr(norm, "weight", None)
        bias = getattr(norm, "bias", None)
        xd = x.detach().double()
        if eps is None:
            raise ModelError(f"the final norm ({type(norm).__name__}) has no epsilon circuitlang can read",
                             code="model.unknown-norm",
                             hint="direct logit attribution knows LayerNorm and RMSNorm final norms")
        if centred:
            xd = xd - xd.mean(-1, keepdim=True)
        scale = (xd.pow(2).mean(-1, keepdim=True) + float(eps)).sqrt()
        d = x.shape[-1]
        gamma = torch.ones(d, dtype=torch.float64, device=x.device) if weight is None else weight.detach().double()
        beta = None if bias is None else bias.detach().double()
        frozen = cls(gamma, beta, scale, centred)
        with torch.no_grad():
            real = norm(x).double()
        rebuilt = frozen.apply(x.detach().double()) + (0 if beta is None else beta)
        tol = max(1e-4, 8 * torch.finfo(x.dtype).eps)  # the norm ran in the model's dtype
        if not torch.allclose(rebuilt, real, rtol=tol, atol=tol * float(real.abs().max()) + 1e-6):
            raise ModelError(f"the final norm ({type(norm).__name__}) is not a LayerNorm or an RMSNorm",
                             code="model.unknown-norm",
                             hint="direct logit attribution knows LayerNorm and RMSNorm final norms")
        return frozen

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """The frozen-scale norm of one part of the stream, without the bias."""
        if self.centred:
            v = v - v.mean(-1, keepdim=True)
        return v / self.scale * self.gamma

    def pull_back(self, g: torch.Tensor) -> torch.Tensor:
        """`h` with `sum(h * v) == sum(g * apply(v))` for every v (the map's adjoint)."""
        h = g * self.gamma / self.scale
        if self.centred:  # centring is its own adjoint
            h = h - h.mean(-1, keepdim=True)
        return h


def _dot(h: torch.Tensor, v: torch.Tensor) -> np.ndarray:
    """Per-row sum over tokens and width of h * v: [B]."""
    return torch.einsum("btd,btd->b", h, v.detach().double()).cpu().numpy()


# ---- the logit lens ---------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LogitLens:
    """The metric read off each layer's residual stream (N prompts, L layers).

    Rows are the streams `Resid(0)` (the embeddings) to `Resid(L)` (after the last
    block: the model's own output); columns are the positions read.

    Attributes:
        metric: the metric's name.
        shape: the model's shape.
        positions: the positions read, each put where the metric reads END; empty when
            read at the metric's own positions.
        per_prompt: [N, L + 1, P] (P = 1 when `positions` is empty).
        clean: [N] the model's own metric on the clean prompts.
    """

    metric: str
    shape: ModelShape
    positions: tuple[Position, ...]
    per_prompt: np.ndarray
    clean: np.ndarray

    @property
    def values(self) -> np.ndarray:
        """[L + 1, P] mean over the prompts."""
        return self.per_prompt.mean(0)

    def layer_names(self) -> list[str]:
        """Row labels: `embed`, then `L0` ... (the stream after block 0, ...)."""
        return ["embed"] + [f"L{l}" for l in range(self.shape.n_layers)]

    def position_names(self) -> list[str]:
        """Column labels (the metric's name when read at its own positions)."""
        return [str(p) for p in self.positions] or [self.metric]

    def sites(self) -> list[Resid]:
        return [Resid(l) for l in range(self.shape.n_layers + 1)]

    def __getitem__(self, site: Resid) -> np.ndarray:
        """Per-prompt values [N, P] read off the stream `Resid(l)`."""
        if isinstance(site, Resid) and 0 <= site.layer <= self.shape.n_layers:
            return self.per_prompt[:, site.layer]
        raise ExecutionError(f"the logit lens has no value for {site}",
                             hint=f"ask for resid 0-{self.shape.n_layers} (0 = the embeddings)")


def logit_lens(model, task, prompts, metric: str | None = None, *,
               positions: Iterable[Position | str] | None = None,
               batch_size: int = DEFAULT_BATCH) -> LogitLens:
    """The metric read off the residual stream after the embeddings and after each block.

    Each stream goes through the model's own final norm and unembedding (the norm's
    scale is recomputed per stream, as the model would). With `positions`, the stream at
    each named position is read as if it were the metric's END token; this needs a
    metric that reads END only (every built-in task's does).

    Args:
        model: a `LoadedModel`.
        task: the task whose metric is read.
        prompts: the task's `PromptSet`.
        metric: one of the task's metrics (`kl` compares with the model's own output);
            the task's default when None.
        positions: named positions (`"S2"`, `Position("END", -1)`), or None for the
            metric's own positions.
        batch_size: prompts per forward pass.

    Returns:
        `LogitLens`; its last row equals the model's own metric.

    Raises:
        ExecutionError: an unknown metric or position, or positions with a metric that
            does not read END alone.
    """
    from circuitlang.execute import metric_positions, position_index

    metric = _metric_name(task, metric)
    wanted = tuple(_position(p, prompts) for p in (positions or ()))
    if wanted and metric_positions(task, metric, prompts, model.shape.vocab_size) != "END":
        raise ExecutionError(f"the metric {metric} reads more than the END token, so a stream "
                             "cannot be read at one named position",
                             hint="call logit_lens without positions")
    adapter = model.adapter
    n_layers = model.shape.n_layers
    streams = [Resid(l) for l in range(n_layers + 1)]
    out, clean = [], []
    for rows in _chunks(len(prompts), batch_size):
        sub = prompts.subset(rows)
        b = len(rows)
        with torch.no_grad():
            run = model.run(sub.input_ids, sub.attention_mask, capture=streams)
            reference = run.logits
            clean.append(_metric(task, metric, reference, sub, reference))
            at = [position_index(sub, p).to(reference.device) for p in wanted]
            ref_end = task.logits_at_end(reference, sub) if wanted else reference
            block = np.zeros((b, n_layers + 1, max(1, len(wanted))))
            for l, site in enumerate(streams):
                x = run.cache[site]
                if not wanted:
                    block[:, l, 0] = _metric(task, metric, adapter.unembed()(adapter.final_norm()(x)), sub,
                                             reference)
                for j, idx in enumerate(at):
                    picked = x[torch.arange(b, device=x.device), idx]
                    logits = adapter.unembed()(adapter.final_norm()(picked))
                    block[:, l, j] = _metric(task, metric, logits, sub, ref_end)
        out.append(block)
    return LogitLens(metric, model.shape, wanted, np.concatenate(out), np.concatenate(clean))


def _metric(task, metric: str, logits, sub, reference) -> np.ndarray:
    return task.metric(metric, logits, sub, reference_logits=reference).detach().double().cpu().numpy()


def _position(p: Position | str, prompts) -> Position:
    from circuitlang.execute import position_index

    if isinstance(p, str):
        try:
            p = Position.parse(p)
        except ValueError as exc:
            raise ExecutionError(str(exc), hint="positions the task defines: "
                                 + ", ".join(sorted(prompts.positions))) from None
    if not isinstance(p, Position) or p.is_all:
        raise ExecutionError(f"{p!r} is not one named position",
                             hint="positions the task defines: " + ", ".join(sorted(prompts.positions)))
    position_index(prompts, p)  # an unknown name, or one outside some prompt, fails here
    return p


# ---- attention patterns -------------------------------------------------------------------
_HEAD_TEXT = re.compile(r"\s*(?:head\s+)?(\d+)\.(\d+)\s*")


def parse_head(head: Head | str | tuple[int, int], shape: ModelShape) -> Head:
    """`Head(9, 6)`, `"9.6"`, `"head 9.6"` or `(9, 6)` as a `Head` this model has.

    Raises:
        ExecutionError: not a head, or one out of the model's range.
    """
    found = None
    if isinstance(head, Head):
        found = Head(head.layer, head.head)
    elif isinstance(head, str):
        match = _HEAD_TEXT.fullmatch(head)
        if match:
            found = Head(int(match.group(1)), int(match.group(2)))
    elif isinstance(head, tuple) and len(head) == 2 and all(isinstance(i, int) for i in head):
        found = Head(*head)
    if found is None:
        raise ExecutionError(f"{head!r} is not a head", hint='write a head as Head(9, 6) or "9.6"')
    if not 0 <= found.layer < shape.n_layers:
        raise ExecutionError(f"{found}: layer {found.layer} out of range",
                             hint=f"model has layers 0-{shape.n_layers - 1}")
    if not 0 <= found.head < shape.n_heads:
        raise ExecutionError(f"{found}: head {found.head} out of range",
                             hint=f"model has heads 0-{shape.n_heads - 1} per layer")
    return found


def attention_patterns(model, input_ids, heads: Sequence[Head | str], attention_mask=None
                       ) -> dict[Head, np.ndarray]:
    """Each chosen head's attention probabilities: {Head: [B, T_query, T_key]}.

    Args:
        model: a `LoadedModel` (eager attention, as `load_model` gives).
        input_ids: token ids [T] or [B, T].
        heads: `Head`s or `"L.H"` strings.
        attention_mask: [B, T] for right-padded batches.

    Raises:
        ExecutionError: a head the model does not have, or no heads.
    """
    chosen = list(dict.fromkeys(parse_head(h, model.shape) for h in heads))
    if not chosen:
        raise ExecutionError("no heads to show", hint='name at least one head, e.g. "1.2"')
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    sites = [h.with_channel(Channel.PATTERN) for h in chosen]
    with torch.no_grad():
        run = model.run(ids, attention_mask, capture=sites)
    return {h: run.cache[s].detach().double().cpu().numpy() for h, s in zip(chosen, sites)}


# ---- shared --------------------------------------------------------------------------------
def _metric_name(task, metric: str | None) -> str:
    sig = task.SIGNATURE
    name = sig.default_metric if metric is None else metric
    if name not in sig.metrics:
        raise ExecutionError(f"task {sig.name} has no metric {name!r}",
                             hint=f"valid metrics: {', '.join(sig.metrics)}")
    return name


def _chunks(n: int, size: int) -> list[list[int]]:
    if n == 0:
        raise ExecutionError("no prompts to read", hint="pass a prompt set with at least one prompt")
    return [list(range(s, min(n, s + size))) for s in range(0, n, size)]


__all__ = ["DirectEffects", "LINEAR_METRICS", "LogitLens", "attention_patterns",
           "direct_logit_attribution", "logit_lens", "parse_head"]
