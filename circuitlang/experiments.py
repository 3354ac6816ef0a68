"""The field's standard experiments, batched: activation patching, path patching, ablation.

Takes a loaded model, a task's `PromptSet` (clean prompts with aligned corrupt
ones) and the sites to intervene on; gives per-site metric values as numpy arrays
(a layer x head grid for a `patch head * at END` sweep).

Conventions:

* **Activation patching** (`patch SITE at P`) runs the *clean* prompt and puts in
  the *corrupt* value of the site at P ("noising", as in Wang et al. 2022);
  `direction="denoise"` runs the corrupt prompt with the clean value instead (the
  convention of TransformerLens's `patching` module). The metric is always read
  against the clean prompt's answers. `normalized` is the fraction of the
  clean-vs-corrupt gap the patch moves: `(clean - patched) / (clean - corrupt)`
  when noising, `(patched - corrupt) / (clean - corrupt)` when denoising, so 1
  means the site alone carries the whole effect and 0 that it carries none.
* **Path patching** (`patch A -> B.q at P`) changes only the direct path: on the
  clean run, the receiver's input at P becomes its own input plus
  (corrupt A - clean A), with everything else left as the run computes it.
* **Ablation** (`ablate SITES with mean|zero|resample|corrupt at P`) replaces the
  sites' values on the clean prompt by their dataset mean, zero, their value on
  another random prompt of the dataset, or their value on the prompt's own
  counterfactual.

Many patches run in one forward pass: rows of the batch are (site, prompt) pairs,
each `Patch` touching only its own rows (`Patch.rows`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

from circuitlang.ast import PATCH_DIRECTIONS
from circuitlang.errors import ExecutionError
from circuitlang.execute import metric_positions, position_index, run_batched, spread_columns
from circuitlang.progress import Progress
from circuitlang.sites import (Channel, Embed, Head, Latent, LatentIn, Logits, Mlp, MlpIn, Neuron, PosEmbed,
                               Position, Resid, TokenEmbed)


_NO_LOGITS = torch.zeros(0, dtype=torch.long)  # a capture pass computes no logits

#: A sweep keeps an unpatched pass's blocks (so rows resume above them) up to this size.
KEPT_PASS_BYTES = 2**30


def rows_metric(model, task, prompts, metric: str):
    """`metric(logits, rows)` -> the task's metric of the prompts at `rows` (a slice of
    `prompts`), differentiable in the logits: what attribution over nodes takes
    (`circuitlang.models.attribution.attribute_nodes`). For `kl` the reference logits are
    a plain pass of those prompts."""
    index = list(range(len(prompts.input_ids)))

    def value(logits, rows):
        sub = prompts.subset(index[rows])
        reference = None
        if metric == "kl":
            with torch.no_grad():
                reference = run_batched(model, sub.input_ids, sub.attention_mask).logits
        return task.metric(metric, logits, sub, reference_logits=reference)
    return value


def _cat_blocks(outputs: list):
    """Concatenate what one block returned for consecutive batches (tensors or tuples)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, tuple):
        return tuple(_cat_blocks([o[i] for o in outputs]) if isinstance(first[i], torch.Tensor) else first[i]
                     for i in range(len(first)))
    return first


def _chunks_by(items: list[tuple], size: int):
    """(key, chunk) for runs of `items` sharing their first element, cut to `size`."""
    i = 0
    while i < len(items):
        key = items[i][0]
        j = i
        while j < len(items) and j - i < size and items[j][0] == key:
            j += 1
        yield key, items[i:j]
        i = j


@dataclass
class ExperimentResult:
    """The numbers of one experiment statement.

    Attributes:
        kind: "patch", "path_patch", "ablate" or "attribution" (estimated by attribution patching).
        text: the statement, as written.
        sites: what each entry of `values` intervened on, flattened in the grid's
            order: typed sites (`Head(1, 2)`) for one-site patches, text for a path
            (`"head 0.1 -> head 1.0.q"`) or for sites patched together.
        values: mean patched metric per site, shaped like the sweep's grid.
        normalized: the share of the clean-vs-corrupt gap the patch moves, per site:
            noising `(clean - patched) / (clean - corrupt)`, denoising
            `(patched - corrupt) / (clean - corrupt)`. Either way 1 means the site
            alone carries the whole effect (noising it turns the clean run's metric
            into the corrupt run's; denoising it restores the clean metric) and 0 that
            it carries none (the patched metric stays where the run started). For an
            ablation it is the share of the gap the ablation removes. NaN where there
            is no path, or no gap.
        per_prompt: [n_sites, n_prompts] patched metric (`values` is its mean over prompts).
        clean, corrupt: mean metric of the unpatched clean and corrupt runs.
        direction: "noise" (the clean run, patched with corrupt values) or "denoise"
            (the corrupt run, patched with clean values); ablations and path patching
            noise.
    """

    kind: str
    text: str
    sites: list
    values: np.ndarray
    normalized: np.ndarray
    per_prompt: np.ndarray
    clean: float
    corrupt: float
    metric: str = ""
    grid: tuple | None = None
    extra: dict = field(default_factory=dict)
    direction: str = "noise"

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "text": self.text,
            "metric": self.metric,
            "direction": self.direction,
            "sites": [str(s) for s in self.sites],
            "values": _floats(self.values),  # NaN (no such path, or no gap) -> null
            "normalized": _floats(self.normalized),
            "per_prompt": _floats(self.per_prompt),
            "clean": _finite(self.clean),
            "corrupt": _finite(self.corrupt),
            "grid": list(self.grid) if self.grid else None,
            "extra": {k: v for k, v in self.extra.items() if isinstance(v, (dict, list, str, int, float, bool))},
        }

    def __repr__(self) -> str:
        shape = "x".join(str(k) for k in self.grid) if self.grid else str(len(self.sites))
        normalized = np.asarray(self.normalized, dtype=float).ravel()
        strongest = ""
        if np.isfinite(normalized).any():
            k = int(np.nanargmax(np.abs(normalized)))
            strongest = f", strongest {self.sites[k]} ({normalized[k]:.3g})"
        direction = f", {self.direction}" if self.kind == "patch" else ""
        sites = "site" if shape == "1" else "sites"
        return (f"ExperimentResult({self.kind} {self.text!r}: {shape} {sites} x {self.per_prompt.shape[-1]} "
                f"prompts{direction}, {self.metric} clean {self.clean:.4g}, corrupt {self.corrupt:.4g}"
                f"{strongest})")

    @classmethod
    def from_json(cls, d: dict) -> "ExperimentResult":
        """The result `to_json` wrote; sites written as a typed site's text read back as
        that site (`"head 1.2"` -> `Head(1, 2)`), others (paths, groups) as text."""
        grid = tuple(d["grid"]) if d.get("grid") else None
        per_prompt = _array(d.get("per_prompt"))
        n_sites = len(d["sites"])
        if per_prompt.size == 0:  # a report from before per-prompt values were kept
            per_prompt = np.empty((n_sites, 0))
        return cls(d["kind"], d["text"], [site_from_text(s) for s in d["sites"]], _array(d["values"]),
                   _array(d["normalized"]), per_prompt.reshape(n_sites, -1), _unfinite(d["clean"]),
                   _unfinite(d["corrupt"]), d.get("metric", ""), grid, dict(d.get("extra") or {}),
                   d.get("direction", "noise"))

    def to_numpy(self, what: str = "values") -> np.ndarray:
        """The numbers as a float64 array (a copy; NaN where there is no path).

        Args:
            what: "values" (mean patched metric) or "normalized", shaped like the sweep's
                grid (`[layers, heads]` for `patch head * at P`, else `[n_sites]`);
                "per_prompt": the patched metric on every prompt, `[*grid, n_prompts]`
                (`[n_sites, n_prompts]` without a grid). Entries follow `sites`.

        Raises:
            ExecutionError: `what` is none of these.
        """
        if what in ("values", "normalized"):
            arr = np.asarray(getattr(self, what), dtype=np.float64)
            return arr.reshape(self.grid).copy() if self.grid else arr.reshape(len(self.sites)).copy()
        if what == "per_prompt":
            arr = np.asarray(self.per_prompt, dtype=np.float64)
            return arr.reshape(*(self.grid or (len(self.sites),)), arr.shape[-1]).copy()
        raise ExecutionError(f"an experiment has no array {what!r}", code="display.array",
                             hint="use what='values', 'normalized' or 'per_prompt'")

    def to_pandas(self, per_prompt: bool = False):
        """A pandas DataFrame indexed by the sites (`Head(1, 2)`, not list positions).

        Args:
            per_prompt: False: columns value and normalized, plus layer and head when
                every site is a head (so `df.pivot(index="layer", columns="head",
                values="normalized")` is the sweep's grid). True: one column per prompt
                (named by its number), the patched metric.

        Raises:
            CircuitlangError: pandas is not installed.
        """
        from circuitlang.report import require_pandas

        pd = require_pandas()
        index = pd.Index(list(self.sites), name="site", dtype=object)
        if per_prompt:
            arr = np.asarray(self.per_prompt, dtype=np.float64)
            return pd.DataFrame(arr, index=index, columns=pd.RangeIndex(arr.shape[1], name="prompt"))
        frame = pd.DataFrame({"value": self.to_numpy("values").ravel(),
                              "normalized": self.to_numpy("normalized").ravel()}, index=index)
        if self.sites and all(isinstance(s, Head) for s in self.sites):
            frame.insert(0, "head", [s.head for s in self.sites])
            frame.insert(0, "layer", [s.layer for s in self.sites])
        return frame

    def _repr_html_(self) -> str:
        """The experiment in a notebook: its numbers as a table (a layer x head grid for a
        head sweep) and, when matplotlib and `circuitlang.figures` are there, its heatmap."""
        from circuitlang.report import _e, figure_html, html_table

        title = (f"<p><b>{_e(self.text)}</b> ({_e(self.metric)}, {_e(self.direction)}; clean "
                 f"{self.clean:.4g}, corrupt {self.corrupt:.4g})</p>")
        if self._long():
            shown = self.strongest(_SHOWN)
            table = html_table([(s, f"{v:.4g}", f"{nv:.3f}") for s, v, nv in shown],
                               ("site", "patched metric", "normalized"))
            table += (f"<p><small>the {len(shown)} strongest of {len(self.sites)} sites; every one is in "
                      "to_numpy() and to_pandas()</small></p>")
        elif self.grid and len(self.grid) == 2:
            rows, cols = self.grid
            grid = np.asarray(self.normalized, dtype=float).reshape(rows, cols)
            table = html_table([[f"L{r}"] + ["-" if np.isnan(v) else f"{v:.2f}" for v in grid[r]]
                                for r in range(rows)], [""] + [str(c) for c in range(cols)])
            table += "<p><small>normalized: share of the clean-vs-corrupt gap each site carries; 1 = all of it</small></p>"

            def draw():
                from circuitlang.figures import sweep_heatmap

                return sweep_heatmap(self, normalized=True)

            table += figure_html(draw)
        else:
            table = html_table([(s, "-" if np.isnan(v) else f"{v:.4g}", "-" if np.isnan(nv) else f"{nv:.3f}")
                                for s, v, nv in zip(self.sites, np.ravel(self.values), np.ravel(self.normalized))],
                               ("site", "patched metric", "normalized"))
        return f"<div class='circuitlang-experiment'>{title}{table}</div>"

    def _long(self) -> bool:
        """Too many sites to list or draw (a neuron or latent sweep): show the strongest."""
        wide_grid = bool(self.grid) and len(self.grid) == 2 and self.grid[1] > _GRID_COLUMNS
        flat = not (self.grid and len(self.grid) == 2)
        return wide_grid or (flat and len(self.sites) > _LIST_LIMIT)

    def strongest(self, k: int = 20) -> list[tuple]:
        """The `k` sites with the largest |normalized| (NaN last): (site, value, normalized)."""
        normalized = np.asarray(self.normalized, dtype=float).ravel()
        values = np.asarray(self.values, dtype=float).ravel()
        order = np.argsort(-np.nan_to_num(np.abs(normalized), nan=-1.0), kind="stable")[:k]
        return [(self.sites[i], float(values[i]), float(normalized[i])) for i in order]

    def render(self) -> str:
        lines = [f"{self.text}   ({self.metric}; clean {self.clean:.4g}, corrupt {self.corrupt:.4g})"]
        if self._long():
            shown = self.strongest(_SHOWN)
            for s, v, nv in shown:
                lines.append(f"  {str(s):<28} {v:>9.4g}   normalized {nv:>7.3f}")
            lines.append(f"  ({len(shown)} strongest of {len(self.sites)} sites; every one is in the JSON "
                         "report and to_numpy())")
        elif self.grid and len(self.grid) == 2:
            rows, cols = self.grid
            lines.append("        " + "".join(f"{c:>7}" for c in range(cols)))
            for r in range(rows):
                cells = "".join("      -" if np.isnan(v) else f"{v:>7.2f}"
                                for v in self.normalized.reshape(rows, cols)[r])
                lines.append(f"  L{r:<4} {cells}")
            lines.append("  (normalized: share of the clean-vs-corrupt gap this site carries; 1 = all of it)")
        else:
            for s, v, nv in zip(self.sites, self.values.ravel(), self.normalized.ravel()):
                if np.isnan(v):
                    lines.append(f"  {str(s):<28} {'-':>9}   (no path)")
                else:
                    lines.append(f"  {str(s):<28} {v:>9.4g}   normalized {nv:>7.3f}")
        checked = self.extra.get("top_k") if self.kind == "attribution" else None
        if checked:
            lines.append(f"  the {len(checked)} strongest estimates, patched exactly (normalized):")
            for site, pair in checked.items():
                lines.append(f"  {site:<28} estimated {pair['estimated']:>7.3f}   measured {pair['measured']:>7.3f}")
        return "\n".join(lines)


# A sweep longer than this (or a grid wider than that) is rendered as its strongest sites.
_LIST_LIMIT = 40
_GRID_COLUMNS = 64
_SHOWN = 20


def _floats(values: np.ndarray):
    """Nested lists of floats, NaN as None (JSON null)."""
    arr = np.asarray(values, dtype=float)
    return np.where(np.isfinite(arr), arr, None).tolist()


def _array(values) -> np.ndarray:
    """What `_floats` wrote, back as a float64 array (null as NaN)."""
    if values is None:
        return np.empty(0)
    return np.array(values, dtype=object).astype(np.float64) if values else np.empty(0)


def _finite(x):
    x = float(x)
    return x if np.isfinite(x) else None


def _unfinite(x) -> float:
    return float("nan") if x is None else float(x)


_SITE_TEXT = re.compile(r"head (\d+)\.(\d+)(?:\.(q|k|v|pattern))?|mlp (\d+)(\.in)?|resid (\d+)"
                        r"|embed|embed\.token|embed\.position|logits")
_NEURON_TEXT = re.compile(r"neuron (\d+)\.(\d+)")


def site_from_text(text: str):
    """The typed site whose `str` is `text` (`"head 1.2.q"` -> `Head(1, 2, Channel.Q)`);
    any other text (a path, sites patched together) is returned unchanged."""
    neuron = _NEURON_TEXT.fullmatch(text)
    if neuron is not None:  # (a latent's text names its SAE, not its folder: it stays text)
        return Neuron(int(neuron.group(1)), int(neuron.group(2)))
    match = _SITE_TEXT.fullmatch(text)
    if match is None:
        return text
    layer, head, channel, mlp, mlp_in, resid = match.groups()
    if layer is not None:
        return Head(int(layer), int(head), Channel.parse(channel) if channel else Channel.OUT)
    if mlp is not None:
        return MlpIn(int(mlp)) if mlp_in else Mlp(int(mlp))
    if resid is not None:
        return Resid(int(resid))
    return {"embed": Embed(), "embed.token": TokenEmbed(), "embed.position": PosEmbed(), "logits": Logits()}[text]


def experiment_from_json(d: dict) -> ExperimentResult:
    """An experiment's result read back from its JSON as the class that wrote it: a trace
    or a probe renders its own layout (`circuitlang show` re-renders a saved run)."""
    if d.get("kind") == "trace":
        from circuitlang.tracing import TraceResult

        return TraceResult.from_json(d)
    if d.get("kind") == "probe":
        from circuitlang.probes import ProbeResult

        return ProbeResult.from_json(d)
    if d.get("kind") == "align":
        from circuitlang.das import AlignResult

        return AlignResult.from_json(d)
    return ExperimentResult.from_json(d)


class Experiments:
    """Runs experiments on one model, task and prompt set, sharing the clean/corrupt runs.

    `progress`: a bar per sweep over its (site, prompt) rows (`circuitlang.progress`;
    None: when stderr is a terminal)."""

    def __init__(self, model, task, prompts, metric: str, *, batch_size: int = 64, progress: bool | None = False):
        self.model = model
        self.task = task
        self.prompts = prompts
        self.metric = metric
        self.batch_size = batch_size
        self.progress = progress
        self.passes = 0
        self._cache: dict = {}
        self._clean_logits = None

    # -- plain runs --------------------------------------------------------------

    def _ids(self, which: str) -> torch.Tensor:
        return self.prompts.input_ids if which == "clean" else self.prompts.corrupt_input_ids

    def capture(self, which: str, sites) -> dict:
        """Plain values of `sites` on the clean or corrupt prompts (cached).

        When the metric reads only the END logits, the same pass gives `baseline(which)`
        too (it computes just the logit columns the metric reads)."""
        missing = [s for s in dict.fromkeys(sites) if (which, s) not in self._cache]
        if missing:
            self._plain_pass(which, missing)
        return {s: self._cache[(which, s)] for s in sites}

    def baseline(self, which: str) -> np.ndarray:
        """Per-prompt metric of the unpatched clean or corrupt run."""
        if ("metric", which) not in self._cache:
            self._plain_pass(which, [])
        return self._cache[("metric", which)]

    def _plain_pass(self, which: str, sites: list) -> None:
        """One batched plain pass: capture `sites`, and the metric where it is cheap or asked."""
        ids = self._ids(which)
        want_metric = ("metric", which) not in self._cache and (not sites or self._metric_at_end())
        columns = self._metric_columns() if self._metric_at_end() else None
        parts = {s: [] for s in sites}
        vals = []
        for start in range(0, len(ids), self.batch_size):
            sl = slice(start, start + self.batch_size)
            rows = range(sl.start, min(sl.stop, len(ids)))
            if not want_metric:
                run = run_batched(self.model, ids[sl], self.prompts.attention_mask[sl], capture=sites,
                                  logit_columns=_NO_LOGITS)
            elif self._metric_at_end():  # the END logits, and of them only the columns read
                run = run_batched(self.model, ids[sl], self.prompts.attention_mask[sl], capture=sites,
                                  logit_columns=columns)
                vals.append(self._metric(self._full_logits(self._end_logits(run.logits, rows), columns), rows))
            else:
                run = run_batched(self.model, ids[sl], self.prompts.attention_mask[sl], capture=sites)
                vals.append(self._metric(run.logits, rows))
            for site in sites:
                parts[site].append(run.cache[site].detach())
        self.passes += 1
        for site in sites:
            self._cache[(which, site)] = torch.cat(parts[site])
        if want_metric:
            self._cache[("metric", which)] = np.concatenate(vals)

    def _metric(self, logits, rows) -> np.ndarray:
        sub = self.prompts.subset(list(rows))
        reference = None
        if self.metric == "kl":
            reference = run_batched(self.model, sub.input_ids, sub.attention_mask).logits
        vals = self.task.metric(self.metric, logits, sub, reference_logits=reference)
        return vals.detach().to("cpu", torch.float64).numpy()

    # -- the batched engine --------------------------------------------------------

    def _sweep(self, base: str, patch_for) -> np.ndarray:
        """Run one patched pass per (site, prompt) row; `patch_for(k, prompt_rows)` gives
        the patches for site k at those prompts. Returns [n_sites, n_prompts].

        Where `patch_for.sites(k)` names the sites, a row runs only the layers from its
        lowest site's up: the blocks below are those of one unpatched pass of the
        prompts, kept (`LoadedModel.run(..., resume=)`), which gives `baseline(base)`
        too. A metric that reads a few tokens' logits at END gets only those columns.
        """
        from circuitlang.models import Patch

        n = len(self.prompts.input_ids)
        n_sites = patch_for.n_sites
        out = np.zeros((n_sites, n))
        ids, mask = self._ids(base), self.prompts.attention_mask
        columns = self._metric_columns()
        starts = [self._resume_layer(patch_for, k) for k in range(n_sites)]
        clean = self._kept_pass(base) if any(starts) else None
        pairs = sorted((starts[k] if clean is not None else 0, k, i) for k in range(n_sites) for i in range(n))
        bar = Progress(len(pairs), "patching", enabled=self.progress)
        for start_layer, chunk in _chunks_by(pairs, self.batch_size):
            ks = np.array([k for _, k, _ in chunk])
            prompt_rows = torch.tensor([i for _, _, i in chunk])
            patches = []
            for k in np.unique(ks):
                rows = torch.as_tensor(ks == k)
                for p in patch_for(int(k), prompt_rows):
                    patches.append(Patch(p.site, p.value, p.positions, rows))
            resume = (clean.rows(prompt_rows), start_layer) if start_layer else None
            run = run_batched(self.model, ids[prompt_rows], mask[prompt_rows], patches=patches,
                              logit_columns=columns, resume=resume)
            logits = run.logits
            if columns is not None:
                logits = self._full_logits(self._end_logits(logits, prompt_rows.tolist()), columns)
            out[ks, prompt_rows.numpy()] = self._metric(logits, prompt_rows.tolist())
            bar.step_by(len(chunk), "(site, prompt) rows")
        bar.close()
        self.passes += 1
        return out

    def _kept_pass(self, which: str):
        """An unpatched pass of every prompt, its blocks kept for resumed rows (a
        `CleanPass`), or None if they would take more than `KEPT_PASS_BYTES`; the pass's
        metric is `baseline(which)`."""
        from circuitlang.models.interventions import CleanPass
        from circuitlang.models.run import run_model

        shape, (n, t) = self.model.shape, self._ids(which).shape
        if shape.n_layers * n * t * shape.d_model * self.model.dtype.itemsize > KEPT_PASS_BYTES:
            return None
        ids, mask = self._ids(which), self.prompts.attention_mask
        columns = self._metric_columns()
        parts, vals = [], []
        with torch.no_grad():
            for begin in range(0, n, self.batch_size):
                rows = range(begin, min(n, begin + self.batch_size))
                blocks: list = []
                run = run_model(self.model, ids[begin:rows.stop], mask[begin:rows.stop], record_blocks=blocks,
                                logit_columns=columns)
                parts.append(blocks)
                logits = run.logits if columns is None else self._full_logits(self._end_logits(run.logits, rows),
                                                                              columns)
                vals.append(self._metric(logits, rows))
        self.passes += 1
        self._cache.setdefault(("metric", which), np.concatenate(vals))
        return CleanPass(tuple(_cat_blocks([p[layer] for p in parts]) for layer in range(shape.n_layers)), {})

    def _sweep_suffix(self, base: str, patch_for, position: Position) -> np.ndarray:
        """`_sweep` for patches at one named position P, recomputing only what can change.

        A patch at P cannot change anything before P (attention is causal), nor any
        layer below the one it acts in. So the prompts are grouped by where P falls;
        each group's prefix runs once with the model's key/value cache, and once more
        over the tokens from P on to keep every block's clean output there; every
        (site, prompt) row then runs only the tokens from P on, and only the layers
        from its site's up (the blocks below are the clean ones, `LoadedModel.run(...,
        resume=)`). For END (the last token) that is one token per row. When the
        metric reads a few tokens' logits at END, only those columns of the
        unembedding are computed (`metric_columns`). The numbers equal `_sweep`'s up
        to float rounding.
        """
        n = len(self.prompts.input_ids)
        n_sites = patch_for.n_sites
        out = np.zeros((n_sites, n))
        ids, mask = self._ids(base), self.prompts.attention_mask
        where = position_index(self.prompts, position)
        read_at_end = self._metric_at_end()
        columns = self._metric_columns() if read_at_end else None
        starts = [self._resume_layer(patch_for, k) for k in range(n_sites)]
        base_vals = np.zeros(n)
        bar = Progress(n_sites * n, "patching", enabled=self.progress)
        for p in sorted(set(where.tolist())):
            members = torch.nonzero(where == p).ravel()
            prefix_cache, prefix_logits = self._prefix(ids[members, :p], mask[members, :p],
                                                       logits=not read_at_end)
            suffix = None
            if any(starts) or read_at_end:
                suffix, suffix_logits = self._clean_suffix(ids[members, p:], mask[members], prefix_cache, columns)
                if read_at_end:  # the unpatched run's metric, for free
                    base_vals[members.numpy()] = self._metric(
                        self._full_logits(self._end_logits(suffix_logits, members.tolist(), offset=p), columns),
                        members.tolist())
            pairs = sorted(((starts[k], k, j) for k in range(n_sites) for j in range(len(members))))
            for start_layer, chunk in _chunks_by(pairs, self.batch_size):
                ks = np.array([k for _, k, _ in chunk])
                local = torch.tensor([j for _, _, j in chunk])
                prompt_rows = members[local]
                patches = []
                zero = torch.zeros(len(chunk), dtype=torch.long)
                for k in np.unique(ks):
                    rows = torch.as_tensor(ks == k)
                    for patch in patch_for(int(k), prompt_rows, at=zero):
                        patches.append(type(patch)(patch.site, patch.value, patch.positions, rows))
                cache = self._cache_rows(prefix_cache, local)
                resume = (suffix.rows(local), start_layer) if start_layer else None
                run = self.model.run(ids[prompt_rows, p:], mask[prompt_rows], patches=patches,
                                     cache=cache, resume=resume, logit_columns=columns)
                if read_at_end:  # the metric reads END only: hand it those logits [B, V]
                    logits = self._full_logits(self._end_logits(run.logits, prompt_rows, offset=p), columns)
                elif prefix_logits is None:
                    logits = run.logits
                else:
                    logits = torch.cat([prefix_logits[local], run.logits], 1)
                out[ks, prompt_rows.numpy()] = self._metric(logits, prompt_rows.tolist())
                bar.step_by(len(chunk), "(site, prompt) rows")
        bar.close()
        self.passes += 1
        if read_at_end:
            self._cache.setdefault(("metric", base), base_vals)
        return out

    def _end_logits(self, logits: torch.Tensor, rows, offset: int = 0) -> torch.Tensor:
        """logits [B, T, V] -> [B, V] at each row's END (`offset`: tokens not in `logits`)."""
        end = torch.as_tensor(self.prompts.positions["END"])[torch.as_tensor(list(rows))] - offset
        return logits[torch.arange(len(end)), end.to(logits.device)]

    def _full_logits(self, logits: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
        """END logits of only `columns` -> [B, V], the columns the metric does not read at 0."""
        if columns is None:
            return logits
        return spread_columns(logits, columns, self.model.shape.vocab_size)

    @staticmethod
    def _resume_layer(patch_for, k: int) -> int:
        """The lowest block site k's patches act in (0 when unknown: computed whole)."""
        from circuitlang.models.run import _block_of

        sites_of = getattr(patch_for, "sites", None)
        if sites_of is None:
            return 0
        layers = [_block_of(site) for site in sites_of(k)]
        return 0 if not layers or None in layers else min(layers)

    def _clean_suffix(self, ids: torch.Tensor, mask: torch.Tensor, prefix_cache, columns):
        """The unpatched pass over the tokens after a cached prefix: every block's output
        there (a `CleanPass`) and its logits (of `columns` only, when given)."""
        from circuitlang.models.interventions import CleanPass
        from circuitlang.models.run import run_model

        blocks: list = []
        with torch.no_grad():
            run = run_model(self.model, ids, mask, cache=self._cache_rows(prefix_cache, None),
                            record_blocks=blocks, logit_columns=columns)
        return CleanPass(tuple(blocks), {}), run.logits

    def _cache_rows(self, prefix_cache, local: torch.Tensor | None):
        """A copy of the prefix cache (for batch rows `local`), which a pass may extend."""
        import copy

        if prefix_cache is None:
            return None
        cache = copy.deepcopy(prefix_cache)
        if local is not None:
            cache.reorder_cache(local.to(self.model.device))
        return cache

    def _metric_columns(self) -> torch.Tensor | None:
        """The vocabulary ids the metric reads at END (None: it reads other positions too,
        or too many columns to be worth it)."""
        if not self._metric_at_end():
            return None
        if "columns" not in self._cache:
            from circuitlang.execute_inputs import metric_columns

            self._cache["columns"] = metric_columns(self.task, self.metric, self.prompts,
                                                    self.model.shape.vocab_size)
        return self._cache["columns"]

    def _metric_at_end(self) -> bool:
        """Whether the metric reads only the END logits (then a sweep hands it just those)."""
        if "at_end" not in self._cache:
            where = metric_positions(self.task, self.metric, self.prompts, self.model.shape.vocab_size)
            self._cache["at_end"] = where == "END" and self.metric != "kl"
        return self._cache["at_end"]

    def _prefix(self, ids: torch.Tensor, mask: torch.Tensor, *, logits: bool = True):
        """Run prompt prefixes once: (key/value cache, logits or None), or (None, None) if
        empty. Without `logits` the unembedding is not computed."""
        if ids.shape[1] == 0:
            return None, None
        from contextlib import nullcontext

        from circuitlang.models import compat
        from circuitlang.models.run import only_logit_columns

        unembed = nullcontext() if logits else only_logit_columns(self.model, _NO_LOGITS)
        with torch.no_grad(), unembed:
            out, cache = compat.forward(self.model.hf_model, ids.to(self.model.device),
                                        mask.to(self.model.device), keep_cache=True)
        return cache, (out if logits else None)

    def _positions(self, position: Position, rows: torch.Tensor):
        if position.is_all:
            return None
        return position_index(self.prompts, position)[rows]

    # -- experiments ------------------------------------------------------------------

    def activation_patching(self, sites, position: Position, *, direction: str = "noise", text: str = "",
                            grid=None, together: bool = False) -> ExperimentResult:
        """Patch each site, one at a time (or all `together`), at `position`.

        See the module docstring for the direction and `normalized`.
        """
        from circuitlang.models import Patch

        if direction not in PATCH_DIRECTIONS:
            raise ExecutionError(f"unknown patching direction {direction!r}", hint="use denoise or noise")
        base, source = ("corrupt", "clean") if direction == "denoise" else ("clean", "corrupt")
        values = self.capture(source, sites)

        def one(site, prompt_rows, at=None):
            v = values[site][prompt_rows]
            pos = self._positions(position, prompt_rows)
            if pos is not None:
                v = v[torch.arange(len(prompt_rows)), pos]
            return Patch(site, v, pos if at is None else at)

        def patch_for(k, prompt_rows, at=None):
            chosen = sites if together else [sites[k]]
            return [one(site, prompt_rows, at) for site in chosen]

        patch_for.n_sites = 1 if together else len(sites)
        patch_for.sites = lambda k: sites if together else [sites[k]]
        if position.is_all:
            per_prompt = self._sweep(base, patch_for)
        else:
            per_prompt = self._sweep_suffix(base, patch_for, position)
        names = [", ".join(str(s) for s in sites)] if together else sites
        return self._result("patch", text, names, per_prompt, grid, direction=direction)

    def path_patching(self, senders, receiver, position: Position, *, text: str = "", grid=None) -> ExperimentResult:
        """Patch each sender's direct path into `receiver` (a head's q/k/v input, an MLP, or the logits)."""
        from circuitlang.models import Patch

        if isinstance(receiver, Logits):
            target = Resid(self.model.shape.n_layers)
        elif isinstance(receiver, Head) and receiver.channel.is_input:
            target = receiver
        elif isinstance(receiver, Mlp):
            target = MlpIn(receiver.layer)  # the stream the MLP reads (only the MLP sees the patch)
        elif isinstance(receiver, Latent):
            target = LatentIn(receiver.sae, receiver.index)  # what the latent reads (only it sees the patch)
        elif isinstance(receiver, Head):
            raise ExecutionError(
                f"path patching needs a receiver's input: {receiver}.q, .k or .v, or logits",
                hint=f"e.g. patch ... -> {receiver.layer}.{receiver.head}.q at END",
            )
        else:
            raise ExecutionError(f"{receiver} cannot receive a path",
                                 hint="use a head's q/k/v input, an MLP, or logits")
        outs = [s.with_channel(Channel.OUT) if isinstance(s, Head) else s for s in senders]
        # a sender computed at or after the receiver reads the stream has no path to it:
        # its row stays empty (NaN, shown as "-") instead of a number that means nothing
        from circuitlang import topology

        shape = self.model.shape
        keep = [k for k, s in enumerate(outs)
                if not topology.is_sender(s) or topology.edge_exists(shape, s, receiver)]
        if not keep:
            raise ExecutionError(f"no sender in this sweep has a path to {receiver}",
                                 hint="senders must be computed before the receiver reads the residual stream")
        clean = self.capture("clean", [outs[k] for k in keep] + [target])
        corrupt = self.capture("corrupt", [outs[k] for k in keep])

        def patch_for(j, prompt_rows):
            s = outs[keep[j]]
            delta = self._stream_delta(s, corrupt[s][prompt_rows] - clean[s][prompt_rows])
            v = clean[target][prompt_rows] + delta
            pos = self._positions(position, prompt_rows)
            if pos is not None:
                v = v[torch.arange(len(prompt_rows)), pos]
            return [Patch(target, v, pos)]

        patch_for.n_sites = len(keep)
        patch_for.sites = lambda j: [target]
        per_prompt = np.full((len(outs), len(self.prompts.input_ids)), np.nan)
        per_prompt[keep] = self._sweep("clean", patch_for)
        return self._result("path_patch", text, [f"{s} -> {receiver}" for s in senders], per_prompt, grid)

    def _stream_delta(self, sender, delta: torch.Tensor) -> torch.Tensor:
        """A sender's change as the change it writes into the residual stream [B, T, D]:
        a neuron's times its row of W_out, a latent's times its decoder row."""
        if isinstance(sender, Neuron):
            row = self.model.adapter.neuron_out_weight(sender.layer)[sender.index]
            return delta[..., None] * row.to(delta.device, delta.dtype)
        if isinstance(sender, Latent):
            from circuitlang.models.units import check_dictionary

            sae = check_dictionary(self.model, sender.sae)
            if sae.normalize != "none":
                raise ExecutionError(f"path patching from {sender}: its SAE normalises its input, so a "
                                     "latent's write depends on the stream it reads",
                                     hint="patch the latent itself (`patch feature ... at P`)")
            return delta[..., None] * sae.W_dec[sender.index].to(delta.device, delta.dtype)
        return delta

    def ablation(self, sites, mode: str, position: Position, *, seed: int = 0, text: str = "") -> ExperimentResult:
        """Ablate all `sites` together on the clean prompts (one entry in `values`).

        `normalized` is the share of the clean-vs-corrupt gap the ablation removes.
        """
        from circuitlang.models import Patch

        values = self.capture("clean", sites)
        n = len(self.prompts.input_ids)
        rng = np.random.default_rng(seed)
        lengths = self.prompts.attention_mask.sum(1)
        if mode == "resample":
            donors = np.empty(n, dtype=int)
            for i in range(n):
                if position.is_all:
                    same = torch.nonzero(lengths == lengths[i]).ravel().numpy()
                else:
                    same = np.arange(n)
                donors[i] = same[rng.integers(len(same))]
        elif mode == "corrupt":
            corrupt = self.capture("corrupt", sites)
        elif mode not in ("mean", "zero"):
            raise ExecutionError(f"unknown ablation {mode!r}", hint="use resample, corrupt, mean or zero")

        def replacement(site, prompt_rows):
            full = values[site]
            pos = self._positions(position, prompt_rows)
            ar = torch.arange(len(prompt_rows))
            if mode == "corrupt":
                v = corrupt[site][prompt_rows]
            elif mode == "zero":
                v = torch.zeros_like(full[prompt_rows])
            elif mode == "mean":
                if pos is None:
                    m = self.prompts.attention_mask.to(full.dtype)
                    while m.dim() < full.dim():
                        m = m.unsqueeze(-1)
                    mean = (full * m).sum(0) / m.sum(0).clamp(min=1)
                    v = mean.unsqueeze(0).expand_as(full[prompt_rows]).clone()
                else:
                    all_pos = position_index(self.prompts, position)
                    at = full[torch.arange(n), all_pos].mean(0)
                    return at.unsqueeze(0).expand(len(prompt_rows), *at.shape).clone(), pos
            else:
                donor = torch.as_tensor(donors)[prompt_rows]
                if pos is None:
                    return full[donor], None
                dpos = position_index(self.prompts, position)[donor]
                return full[donor, dpos], pos
            if pos is not None:
                v = v[ar, pos]
            return v, pos

        def patch_for(k, prompt_rows):
            patches = []
            for site in sites:
                v, pos = replacement(site, prompt_rows)
                patches.append(Patch(site, v, pos))
            return patches

        patch_for.n_sites = 1
        patch_for.sites = lambda k: sites
        per_prompt = self._sweep("clean", patch_for)
        return self._result("ablate", text, [", ".join(str(s) for s in sites)], per_prompt, None)

    def attribution(self, sites, position: Position, *, text: str = "", grid=None,
                    top_k: int = 0) -> ExperimentResult:
        """Attribution patching over neurons, SAE latents and SAE error terms (noising).

        Estimates, for every node at once, what `patch NODE at P` measures: the clean
        run's metric plus `(corrupt - clean value) . d metric / d value`, in two passes
        per batch (`circuitlang.models.attribution`). `sites` may hold `AllLatents` /
        `AllNeurons` (every unit of one dictionary or MLP), single `Latent` / `Neuron`
        sites, and `SaeError`s. With `top_k`, the k strongest nodes are also patched
        exactly; `extra["top_k"]` maps each to its estimated and measured `normalized`.
        """
        from circuitlang.models.attribution import attribute_nodes

        metric = rows_metric(self.model, self.task, self.prompts, self.metric)
        at = None if position.is_all else position_index(self.prompts, position)
        found = attribute_nodes(self.model, self.prompts.input_ids, self.prompts.corrupt_input_ids, metric,
                                sites, attention_mask=self.prompts.attention_mask, positions=at,
                                batch_size=self.batch_size)
        self.passes += 1
        per_prompt = self.baseline("clean")[None, :] + found.per_prompt.to(torch.float64).numpy()
        result = self._result("attribution", text, list(found.sites), per_prompt, grid)
        result.extra["passes"] = found.passes
        if top_k > 0:
            best = [site for site, _ in found.top(top_k)]
            exact = self.activation_patching(best, position)
            where = {site: k for k, site in enumerate(found.sites)}
            result.extra["top_k"] = {
                str(site): {"estimated": float(np.ravel(result.normalized)[where[site]]),
                            "measured": float(np.ravel(exact.normalized)[k])}
                for k, site in enumerate(best)}
        return result

    def _result(self, kind, text, sites, per_prompt, grid, direction: str = "noise") -> ExperimentResult:
        clean = float(self.baseline("clean").mean())
        corrupt = float(self.baseline("corrupt").mean())
        values = per_prompt.mean(axis=1)
        gap = clean - corrupt
        moved = (clean - values) if direction == "noise" else (values - corrupt)
        normalized = moved / gap if gap != 0 else np.full_like(values, np.nan)
        if grid:
            values, normalized = values.reshape(grid), normalized.reshape(grid)
        return ExperimentResult(kind, text, list(sites), values, normalized, per_prompt, clean, corrupt,
                                self.metric, tuple(grid) if grid else None, direction=direction)
