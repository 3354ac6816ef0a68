"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

Takes a loaded model, a factual-recall task's `PromptSet` (`circuitlang.tasks.facts`:
each prompt's subject span `SUBJ` = SUBJ_FIRST..SUBJ_LAST) and what to restore;
gives a `TraceResult`: a layer x position grid of *indirect effects*.

The three runs, per prompt:

* **clean**: the plain forward pass; p_clean = probability of the correct object at END.
* **corrupted**: the subject's token embeddings get Gaussian noise, N(0, (k·σ)²) per
  coordinate, where σ is the standard deviation of the token-embedding coordinates at
  the subject tokens of the whole prompt set and k is `noise` (3 by default, ROME's
  setting). One noise draw per prompt (seeded), the same in every restored run of it.
* **restored**: the corrupted run with one clean state put back: `resid L` (the
  residual stream entering block L), `mlp L` (block L's MLP output) or `attn L`
  (block L's attention output: every head's contribution) at one token. With
  `window k` (MLP and attention only) the k layers around L are restored together,
  L - k//2 .. L + (k-1)//2 clipped to the model, as ROME does.

The *indirect effect* of a state is p_restored - p_corrupted: how much of the object's
probability that one clean state brings back. `TraceResult.values` holds it averaged
over prompts; `normalized` divides it by p_clean - p_corrupted (1 = the state alone
restores the clean prediction).

Positions: `at all` traces every token of every prompt and averages them per column
of ROME's figure: `BEFORE` (tokens before the subject), `SUBJ_FIRST`, `SUBJ_MIDDLE`
(subject tokens between its first and last), `SUBJ_LAST`, `SUBJ_LAST+1` (the first
token after the subject), `FURTHER` (later tokens but the last) and `END`. A token
that is several of these counts as the first that applies in the order END,
SUBJ_LAST, SUBJ_FIRST, SUBJ_MIDDLE, SUBJ_LAST+1, FURTHER, BEFORE. A column no prompt has (a
two-token subject has no middle) is NaN. `at P` traces the one position P.

All (state, prompt, token) rows run batched, many per forward pass.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from circuitlang.errors import ExecutionError, TaskError
from circuitlang.experiments import ExperimentResult
from circuitlang.ir import TRACE_COLUMNS as COLUMNS
from circuitlang.progress import Progress
from circuitlang.sites import ALL, Embed, Head, Mlp, Position, Resid, TokenEmbed

#: What `trace` restores.
TRACE_SITES = ("resid", "mlp", "attn")
#: ROME's noise level: 3 x the standard deviation of the subject's embeddings.
DEFAULT_NOISE = 3.0
#: The metric tracing reads: the probability of the correct object.
TRACE_METRIC = "answer_prob"


@dataclass
class TraceResult(ExperimentResult):
    """A causal-tracing grid: `ExperimentResult` with kind "trace".

    `values` [n_layers, n_columns] is the mean indirect effect (p_restored - p_corrupted);
    `normalized` that divided by p_clean - p_corrupted; `per_prompt` [n_layers *
    n_columns, n_prompts] each prompt's indirect effect (NaN where the prompt has no
    such column); `clean` and `corrupt` the mean probability of the object in the
    clean and corrupted runs. `extra` holds `site` (resid/mlp/attn), `columns`,
    `window`, `noise` (k) and `noise_std` (k·σ, the std of the noise added).
    """

    @property
    def columns(self) -> list[str]:
        return list(self.extra.get("columns", []))

    def column(self, name: str) -> np.ndarray:
        """The indirect effect per layer at one column (`"SUBJ_LAST"`).

        Raises:
            ExecutionError: no such column.
        """
        if name not in self.columns:
            raise ExecutionError(f"this trace has no column {name!r}", code="display.column",
                                 hint="its columns: " + ", ".join(self.columns))
        return np.asarray(self.values).reshape(self.grid)[:, self.columns.index(name)].copy()

    def as_sweeps(self) -> list[ExperimentResult]:
        """One one-axis result per column (`trace mlp * at SUBJ_LAST`), so
        `figures.sweep_heatmap(result.as_sweeps())` draws the layer x position grid."""
        n_layers, n_cols = self.grid
        values = np.asarray(self.values).reshape(n_layers, n_cols)
        normalized = np.asarray(self.normalized).reshape(n_layers, n_cols)
        per = np.asarray(self.per_prompt).reshape(n_layers, n_cols, -1)
        kind = self.extra.get("site", "mlp")
        out = []
        for j, col in enumerate(self.columns):
            layer_sites = [_site_label(kind, l) for l in range(n_layers)]
            out.append(ExperimentResult("trace", f"trace {kind} * at {col}", layer_sites, values[:, j].copy(),
                                        normalized[:, j].copy(), per[:, j].copy(), self.clean, self.corrupt,
                                        self.metric, (n_layers,), direction="denoise"))
        return out

    def render(self) -> str:
        n_layers, _ = self.grid
        values = np.asarray(self.values).reshape(self.grid)
        window = self.extra.get("window", 1)
        lines = [f"{self.text}   (p(object): clean {self.clean:.4g}, corrupted {self.corrupt:.4g}; noise "
                 f"std {self.extra.get('noise_std', float('nan')):.3g}"
                 + (f", window {window}" if window > 1 else "") + ")"]
        width = max(8, max(len(c) for c in self.columns) + 1)
        lines.append("        " + "".join(f"{c:>{width}}" for c in self.columns))
        for layer in range(n_layers):
            cells = "".join(f"{'-':>{width}}" if np.isnan(v) else f"{v:>{width}.3f}" for v in values[layer])
            lines.append(f"  L{layer:<4} {cells}")
        lines.append("  (indirect effect: p(object) restored - corrupted, averaged over prompts)")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from circuitlang.report import _e, figure_html, html_table

        values = np.asarray(self.values).reshape(self.grid)
        title = (f"<p><b>{_e(self.text)}</b> (p(object): clean {self.clean:.4g}, corrupted "
                 f"{self.corrupt:.4g})</p>")
        table = html_table([[f"L{r}"] + ["-" if np.isnan(v) else f"{v:.3f}" for v in values[r]]
                            for r in range(values.shape[0])], [""] + self.columns)
        table += "<p><small>indirect effect: p(object) restored - corrupted</small></p>"

        def draw():
            from circuitlang.figures import sweep_heatmap

            return sweep_heatmap(self.as_sweeps())

        return f"<div class='circuitlang-experiment'>{title}{table}{figure_html(draw)}</div>"

    @classmethod
    def from_json(cls, d: dict) -> TraceResult:
        base = ExperimentResult.from_json(d)
        return cls(**{f: getattr(base, f) for f in base.__dataclass_fields__})


def _site_label(kind: str, layer: int):
    if kind == "mlp":
        return Mlp(layer)
    if kind == "resid":
        return Resid(layer)
    return f"attn {layer}"


def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """The layers a window of `window` centred on `layer` restores (ROME's convention)."""
    return list(range(max(0, layer - window // 2), min(n_layers, layer + (window + 1) // 2)))


def embedding_std(model, prompts, span: torch.Tensor) -> float:
    """σ: the standard deviation of every token-embedding coordinate at the subject tokens."""
    run = model.run(prompts.input_ids, prompts.attention_mask, capture=[TokenEmbed()])
    values = run.cache[TokenEmbed()][span.to(run.cache[TokenEmbed()].device)]
    return float(values.double().std())


def _columns_of(prompts, span: torch.Tensor) -> list[list[list[int]]]:
    """Per prompt, the token indices of each of `COLUMNS`."""
    out = []
    lengths = prompts.attention_mask.sum(1).tolist()
    for i, length in enumerate(lengths):
        first = int(prompts.positions["SUBJ_FIRST"][i])
        last = int(prompts.positions["SUBJ_LAST"][i])
        cols: list[list[int]] = [[] for _ in COLUMNS]
        for t in range(length):
            if t == length - 1:
                name = "END"
            elif t == last:
                name = "SUBJ_LAST"
            elif t == first:
                name = "SUBJ_FIRST"
            elif first < t < last:
                name = "SUBJ_MIDDLE"
            elif t == last + 1:
                name = "SUBJ_LAST+1"
            elif t > last:
                name = "FURTHER"
            else:
                name = "BEFORE"
            cols[COLUMNS.index(name)].append(t)
        out.append(cols)
    return out


def causal_trace(model, task, prompts, kind: str = "mlp", position: Position = ALL, *, noise: float = DEFAULT_NOISE,
                 window: int = 1, seed: int = 0, batch_size: int = 64, text: str = "",
                 progress: bool | None = False) -> TraceResult:
    """Causal tracing of `kind` states; see the module docstring.

    Args:
        model: a `LoadedModel`.
        task: the task (its `answer_prob` metric is read).
        prompts: a `PromptSet` with SUBJ_FIRST and SUBJ_LAST positions.
        kind: "resid", "mlp" or "attn".
        position: `ALL` (every token, in ROME's columns) or one named position.
        noise: the noise's std in units of σ (ROME: 3).
        window: layers restored together around each layer (MLP and attention).
        seed: seed of the noise.

    Raises:
        ExecutionError: an unknown kind, a window on the residual stream or below 1, a
            noise level not above 0, an attention-only model traced at its MLPs, or
            prompts without a subject span.
    """
    from circuitlang.models import Patch
    from circuitlang.tasks.facts import subject_span

    if kind not in TRACE_SITES:
        raise ExecutionError(f"cannot trace {kind!r}", code="trace.site",
                             hint="trace resid, mlp or attn: e.g. trace mlp * at all")
    if not window >= 1 or (window > 1 and kind == "resid"):
        raise ExecutionError(f"window {window} does not apply to tracing {kind}", code="trace.window",
                             hint="window k >= 1, for mlp and attn only (the residual stream holds "
                             "everything below it already)")
    if not noise > 0:
        raise ExecutionError(f"noise {noise} must be above 0", code="trace.noise",
                             hint="noise 3.0 is ROME's setting (3 x the embeddings' std)")
    shape = model.shape
    if kind == "mlp" and not shape.has_mlp:
        raise ExecutionError(f"{shape.name or 'this model'} has no MLPs to trace", code="trace.site",
                             hint="trace resid or attn")
    try:
        span = subject_span(prompts)
    except TaskError as exc:  # said as the experiment's error
        raise ExecutionError(exc.message, code="trace.no-subject",
                             hint="causal tracing needs a factual-recall task with a subject span: "
                             "task facts") from None
    n, width = prompts.input_ids.shape
    sigma = embedding_std(model, prompts, span)
    std = noise * sigma
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(n, width, shape.d_model, generator=gen, dtype=torch.float64) * std
    eps = (eps * span[..., None]).to(model.dtype)

    layers = shape.n_layers

    def states(layer: int) -> list:
        if kind == "resid":
            return [Resid(layer)]
        chosen = window_layers(layer, window, layers)
        if kind == "mlp":
            return [Mlp(l) for l in chosen]
        return [Head(l, h) for l in chosen for h in range(shape.n_heads)]

    every = sorted({s for l in range(layers) for s in states(l)}, key=str)
    clean_run = _capture(model, prompts, [Embed(), *every], batch_size)
    embed = clean_run[Embed()]
    noised = embed + eps.to(embed.device)

    if position.is_all:
        cols = _columns_of(prompts, span)
        columns = list(COLUMNS)
        tokens = [sorted(t for col in c for t in col) for c in cols]
    else:
        from circuitlang.execute import position_index

        where = position_index(prompts, position).tolist()
        columns = [str(position)]
        tokens = [[t] for t in where]
        cols = [[[t]] for t in where]

    def prob(rows, patches):
        ids = prompts.input_ids[rows]
        run = model.run(ids, prompts.attention_mask[rows], patches=patches)
        vals = task.metric(TRACE_METRIC, run.logits, prompts.subset(rows))
        return vals.detach().to("cpu", torch.float64).numpy()

    clean_p = np.concatenate([prob(list(range(s, min(s + batch_size, n))), [])
                              for s in range(0, n, batch_size)])
    corrupt_p = np.concatenate([prob(list(range(s, min(s + batch_size, n))),
                                     [Patch(Embed(), noised[s:s + batch_size])])
                                for s in range(0, n, batch_size)])
    # a state before the subject is the same in the clean and the corrupted run (attention
    # is causal), so restoring it changes nothing: its effect is 0 without running it
    first = prompts.positions["SUBJ_FIRST"].tolist()
    restored = np.repeat(corrupt_p[None, :, None], width, axis=2).repeat(layers, axis=0)
    rows = [(layer, i, t) for layer in range(layers) for i in range(n) for t in tokens[i] if t >= first[i]]
    bar = Progress(len(rows), "tracing", enabled=progress)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ls = torch.tensor([r[0] for r in chunk])
        prompt_rows = [r[1] for r in chunk]
        at = torch.tensor([r[2] for r in chunk])
        pr = torch.tensor(prompt_rows)
        patches = [Patch(Embed(), noised[pr])]
        for layer in ls.unique().tolist():
            mine = ls == layer
            for site in states(layer):
                state = clean_run[site]
                value = state[pr.to(state.device), at.to(state.device)]
                patches.append(Patch(site, value, at, mine))
        restored[ls.numpy(), pr.numpy(), at.numpy()] = prob(prompt_rows, patches)
        bar.step_by(len(chunk), "(state, prompt, token) rows")
    bar.close()

    effect = restored - corrupt_p[None, :, None]
    per_prompt = np.full((layers, len(columns), n), np.nan)
    for i in range(n):
        for j, col in enumerate(cols[i]):
            if col:
                per_prompt[:, j, i] = effect[:, i, col].mean(axis=1)
    with warnings.catch_warnings():  # a column no prompt has is NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        values = np.nanmean(per_prompt, axis=2)
    clean, corrupt = float(clean_p.mean()), float(corrupt_p.mean())
    gap = clean - corrupt
    normalized = values / gap if gap != 0 else np.full_like(values, np.nan)
    sites = [f"{kind} {l} at {c}" for l in range(layers) for c in columns]
    extra = {"site": kind, "columns": columns, "window": window, "noise": noise, "noise_std": std,
             "embedding_std": sigma, "clean_per_prompt": clean_p.tolist(),
             "corrupt_per_prompt": corrupt_p.tolist()}
    return TraceResult("trace", text or f"trace {kind} * at {position}", sites, values, normalized,
                       per_prompt.reshape(layers * len(columns), n), clean, corrupt, TRACE_METRIC,
                       (layers, len(columns)), extra, direction="denoise")


def _capture(model, prompts, sites, batch_size: int) -> dict:
    parts: dict = {s: [] for s in sites}
    for start in range(0, len(prompts.input_ids), batch_size):
        sl = slice(start, start + batch_size)
        run = model.run(prompts.input_ids[sl], prompts.attention_mask[sl], capture=sites)
        for s in sites:
            parts[s].append(run.cache[s].detach())
    return {s: torch.cat(v) for s, v in parts.items()}


def run_trace(exp, setup, hypothesis=None, *, progress: bool | None = False) -> TraceResult:
    """A resolved `trace` statement (`ir.Trace`) on a checker `Setup`'s model and prompts."""
    return causal_trace(setup.model, setup.task, setup.prompts, exp.site, exp.position, noise=exp.noise,
                        window=exp.window, seed=setup.seed, batch_size=setup.batch_size, text=exp.text,
                        progress=progress)
