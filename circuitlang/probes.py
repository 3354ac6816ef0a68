"""Linear probes: how well each layer's state at one position linearly encodes a feature.

Takes a loaded model, a task's `PromptSet`, a site kind (`resid`: the stream entering
each block; `mlp`: each block's MLP output), a position and a task feature; gives a
`ProbeResult`: per layer, the held-out score of a linear probe, the score of the same
probe on a control task, their difference (selectivity), and the probe's weights,
which `save_probes` writes as safetensors for later use as a subspace.

* **Which probe.** A feature whose values are numbers (not bools) with more than
  `SCALAR_MIN_VALUES` distinct values is *scalar*: ridge regression (closed form),
  scored by R² on the held-out prompts. Any other feature is *categorical*:
  multinomial logistic regression (L2 penalty 0.001 x the squared weights, 500
  steps of Nesterov-accelerated gradient descent on standardised inputs), scored by held-out accuracy; a held-out value never seen in
  training counts as wrong.
* **Split.** A seeded permutation of the prompts; the last `heldout` share (0.25 by
  default) scores, the rest trains.
* **Control task** (Hewitt & Liang 2019). Each *input type* gets a random label, drawn
  from the feature's own distribution, and the same probe is trained and scored on
  those labels. Hewitt & Liang's type is the word; a state at position P is computed
  from every token up to P, so here the type is that prefix of token ids: prompts that
  agree up to P share a control label, so a probe can score on the control task only
  by memorising inputs. `selectivity = score - control score`; a probe that is
  accurate but not selective tells you about the probe's capacity, not the model.
* **Saved file** (`save_probes`): safetensors, one entry per layer L:
  `layer{L}.weight` [K, d_model] (K classes; 1 for a scalar probe) and
  `layer{L}.bias` [K] in the model's own coordinates (the input is the raw state, not
  standardised), and `layer{L}.basis` [r, d_model], an orthonormal basis of the
  weight's row space (r = rank <= K) -- the subspace the probe reads. The file's
  metadata (all strings): `format` = "circuitlang-probe/1", `site`, `position`,
  `feature`, `kind` ("categorical" or "scalar"), `classes` (a JSON list of the class
  labels, in weight-row order, as text), `layers` (a JSON list), `model`.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from circuitlang.errors import ExecutionError
from circuitlang.experiments import ExperimentResult
from circuitlang.sites import Mlp, Position, Resid

#: A numeric feature with more distinct values than this is probed by ridge regression.
SCALAR_MIN_VALUES = 10
#: Probe sites (`probe resid * at END for IO`).
PROBE_SITES = ("resid", "mlp")
PROBE_FORMAT = "circuitlang-probe/1"


@dataclass(frozen=True, slots=True)
class LinearProbe:
    """One fitted probe, in the input's own coordinates: scores = x @ weight.T + bias.

    `classes` are the labels of the rows of `weight` (categorical); () for a scalar probe.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    classes: tuple = ()

    @property
    def kind(self) -> str:
        return "categorical" if self.classes else "scalar"

    def predict(self, x: torch.Tensor) -> list:
        scores = x.double() @ self.weight.T + self.bias
        if not self.classes:
            return scores[:, 0].tolist()
        return [self.classes[k] for k in scores.argmax(1).tolist()]

    def score(self, x: torch.Tensor, labels) -> float:
        """Accuracy (categorical) or R² (scalar) on `labels`."""
        pred = self.predict(x)
        if self.classes:
            return float(np.mean([p == y for p, y in zip(pred, labels)])) if len(labels) else float("nan")
        y = np.asarray(labels, dtype=float)
        total = float(((y - y.mean()) ** 2).sum())
        return 1.0 - float(((np.asarray(pred) - y) ** 2).sum()) / total if total > 0 else float("nan")

    def basis(self) -> torch.Tensor:
        """An orthonormal basis [r, d] of the row space of `weight`."""
        _, s, vh = torch.linalg.svd(self.weight.double(), full_matrices=False)
        rank = int((s > s.max() * 1e-8).sum()) if s.numel() and s.max() > 0 else 0
        return vh[:rank].contiguous()


def is_scalar(labels) -> bool:
    """Whether a feature's values call for ridge regression (see the module docstring)."""
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in labels)
    return numeric and len(set(labels)) > SCALAR_MIN_VALUES


def fit_logistic(x: torch.Tensor, labels, *, l2: float = 1e-3, steps: int = 500) -> LinearProbe:
    """Multinomial logistic regression on `x` [n, d] (accelerated gradient descent on
    standardised inputs)."""
    classes = tuple(sorted(set(labels), key=repr))
    index = {c: k for k, c in enumerate(classes)}
    y = torch.tensor([index[v] for v in labels])
    x = x.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    z = (x - mean) / std
    n, d, k = x.shape[0], x.shape[1], len(classes)
    zb = torch.cat([z, torch.ones(n, 1, dtype=torch.float64)], 1)  # the last column: the bias
    onehot = torch.nn.functional.one_hot(y, k).double()
    # accelerated gradient descent with the analytic gradient; step 1/L for the loss's
    # smoothness bound L = ||Z||^2 / (2n) + 2 l2 (the softmax Hessian is at most I/2)
    lipschitz = float(torch.linalg.matrix_norm(zb, ord=2)) ** 2 / (2 * n) + 2 * l2
    penalty = torch.ones(d + 1, dtype=torch.float64)
    penalty[-1] = 0.0  # no penalty on the bias
    theta = torch.zeros(k, d + 1, dtype=torch.float64)
    ahead, t = theta.clone(), 1.0
    for _ in range(steps if k > 1 else 0):
        probs = (zb @ ahead.T).softmax(1)
        grad = (probs - onehot).T @ zb / n + 2 * l2 * ahead * penalty
        new = ahead - grad / lipschitz
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        ahead = new + (t - 1) / t_next * (new - theta)
        theta, t = new, t_next
    w, b = theta[:, :d], theta[:, d]
    w, b = w / std, b - (w * (mean / std)).sum(1)
    return LinearProbe(w, b, classes)


def fit_ridge(x: torch.Tensor, labels, *, l2: float = 1e-3) -> LinearProbe:
    """Ridge regression on `x` [n, d], closed form (inputs centred and scaled; no
    penalty on the intercept)."""
    x = x.double()
    y = torch.tensor([float(v) for v in labels], dtype=torch.float64)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    z = (x - mean) / std
    gram = z.T @ z + l2 * len(z) * torch.eye(z.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, z.T @ (y - y.mean()))
    weight = (w / std)[None]
    bias = (y.mean() - (w * mean / std).sum())[None]
    return LinearProbe(weight, bias)


def control_labels(types: list, labels, seed: int = 0) -> list:
    """Hewitt & Liang's control task: one random label per input type, drawn from
    `labels`' own distribution (the same type always gets the same label)."""
    rng = random.Random(seed)
    pool = list(labels)
    chosen: dict = {}
    for t in types:
        if t not in chosen:
            chosen[t] = pool[rng.randrange(len(pool))]
    return [chosen[t] for t in types]


def split(n: int, heldout: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, held-out) prompt indices: a seeded permutation, the last `heldout` share held out."""
    if not 0 < heldout < 1:
        raise ExecutionError(f"heldout {heldout} must be between 0 and 1", code="probe.heldout",
                             hint="for example heldout 0.25")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = max(1, round(n * heldout))
    if n - k < 2:
        raise ExecutionError(f"{n} prompts are too few to train and score a probe", code="probe.too-few",
                             hint="use more prompts (samples 200)")
    return order[: n - k], order[n - k:]


def probe_layers(states: list[torch.Tensor], labels, types: list, *, heldout: float = 0.25,
                 seed: int = 0) -> dict:
    """Fit a probe per layer's states [n, d] and its control; returns the numbers.

    Returns:
        A dict: `probes` (a `LinearProbe` per layer), `score`, `control`, `selectivity`,
        `train_score` (lists per layer), `kind`, `chance` (held-out accuracy of always
        guessing the most common training label; for a scalar probe 0, the R² of the
        mean), `correct` [layers, n_heldout] (1/0, or the squared error), `train`,
        `heldout` (indices).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the matrices are tiny: more threads only wait on each other
    try:
        return _probe_layers(states, list(labels), types, heldout, seed)
    finally:
        torch.set_num_threads(threads)


def _probe_layers(states, labels, types, heldout, seed) -> dict:
    n = len(labels)
    train, test = split(n, heldout, seed)
    scalar = is_scalar(labels)
    fit = fit_ridge if scalar else fit_logistic
    control = control_labels(types, labels, seed)
    out = {"probes": [], "score": [], "control": [], "selectivity": [], "train_score": [], "correct": [],
           "kind": "scalar" if scalar else "categorical", "train": train, "heldout": test}
    y_train, y_test = [labels[i] for i in train], [labels[i] for i in test]
    c_train, c_test = [control[i] for i in train], [control[i] for i in test]
    for x in states:
        x = x.double()
        probe = fit(x[train], y_train)
        c_probe = fit(x[train], c_train)
        score, c_score = probe.score(x[test], y_test), c_probe.score(x[test], c_test)
        out["probes"].append(probe)
        out["score"].append(score)
        out["control"].append(c_score)
        out["selectivity"].append(score - c_score)
        out["train_score"].append(probe.score(x[train], y_train))
        pred = probe.predict(x[test])
        if scalar:
            out["correct"].append([(p - float(y)) ** 2 for p, y in zip(pred, y_test)])
        else:
            out["correct"].append([float(p == y) for p, y in zip(pred, y_test)])
    if scalar:
        out["chance"] = 0.0
    else:
        common = max(set(y_train), key=y_train.count)
        out["chance"] = float(np.mean([y == common for y in y_test]))
    return out


@dataclass
class ProbeResult(ExperimentResult):
    """A probe per layer: `ExperimentResult` with kind "probe".

    `values` [n_layers]: held-out accuracy (or R²); `normalized`: selectivity (score -
    control score); `per_prompt` [n_layers, n_heldout]: 1/0 per held-out prompt (or the
    squared error); `clean`: the chance accuracy, `corrupt`: NaN. `extra` holds
    `control`, `train_score`, `kind`, `feature`, `n_train`, `n_heldout`, `saved`.
    `probes` (not in JSON) holds the fitted `LinearProbe`s.
    """

    probes: list | None = None

    def render(self) -> str:
        what = "R²" if self.extra.get("kind") == "scalar" else "accuracy"
        head = (f"{self.text}   ({self.extra.get('kind')} probe; {self.extra.get('n_train')} train / "
                f"{self.extra.get('n_heldout')} held-out prompts; chance {self.clean:.3f})")
        lines = [head,
                 f"  {'layer':<8}{'held-out ' + what:>18}{'control':>10}{'selectivity':>13}"]
        for site, v, c, s in zip(self.sites, np.ravel(self.values), self.extra.get("control", []),
                                 np.ravel(self.normalized)):
            lines.append(f"  {site!s:<8}{v:>18.3f}{c:>10.3f}{s:>13.3f}")
        if self.extra.get("saved"):
            lines.append(f"  probe directions saved to {self.extra['saved']}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from circuitlang.report import _e, html_table

        rows = [(str(s), f"{v:.3f}", f"{c:.3f}", f"{sel:.3f}") for s, v, c, sel in
                zip(self.sites, np.ravel(self.values), self.extra.get("control", []), np.ravel(self.normalized))]
        return (f"<div class='circuitlang-experiment'><p><b>{_e(self.text)}</b> ({_e(str(self.extra.get('kind')))}"
                f" probe, chance {self.clean:.3f})</p>"
                + html_table(rows, ("layer", "held-out " + self.metric, "control", "selectivity")) + "</div>")

    @classmethod
    def from_json(cls, d: dict) -> ProbeResult:
        base = ExperimentResult.from_json(d)
        return cls(**{f: getattr(base, f) for f in ExperimentResult.__dataclass_fields__})


def prefix_types(prompts, where: torch.Tensor) -> list[tuple[int, ...]]:
    """Each prompt's token ids up to and including its probed position (the control's input type)."""
    return [tuple(prompts.input_ids[i, : int(where[i]) + 1].tolist()) for i in range(len(where))]


def linear_probe(model, prompts, kind: str, position: Position, feature: str, *, heldout: float = 0.25,
                 seed: int = 0, batch_size: int = 64, text: str = "") -> ProbeResult:
    """Probe every layer's `kind` state at `position` for `feature`; see the module docstring.

    Raises:
        ExecutionError: an unknown site kind or feature, `all` as the position, too few
            prompts, or a feature with one value only.
    """
    from circuitlang.execute import position_index

    if kind not in PROBE_SITES:
        raise ExecutionError(f"cannot probe {kind!r}", code="probe.site", hint="probe resid or mlp")
    if position.is_all:
        raise ExecutionError("a probe reads one position, not all", code="probe.position",
                             hint="e.g. probe resid * at END for IO")
    if feature not in prompts.features:
        raise ExecutionError(f"the prompts have no feature {feature!r}", code="probe.feature",
                             hint="features: " + ", ".join(sorted(prompts.features)))
    labels = list(prompts.features[feature])
    if len(set(labels)) < 2:
        raise ExecutionError(f"feature {feature} has one value on these prompts ({labels[0]!r}): nothing to probe",
                             code="probe.constant", hint="probe a feature that varies across prompts")
    n_layers = model.shape.n_layers
    sites = [Resid(l) if kind == "resid" else Mlp(l) for l in range(n_layers)]
    where = position_index(prompts, position)
    parts: dict = {s: [] for s in sites}
    for start in range(0, len(labels), batch_size):
        sl = slice(start, start + batch_size)
        run = model.run(prompts.input_ids[sl], prompts.attention_mask[sl], capture=sites)
        for s in sites:
            value = run.cache[s]
            rows = torch.arange(value.shape[0], device=value.device)
            parts[s].append(value[rows, where[sl].to(value.device)].detach().float().cpu())
    states = [torch.cat(parts[s]) for s in sites]
    found = probe_layers(states, labels, prefix_types(prompts, where), heldout=heldout, seed=seed)
    scalar = found["kind"] == "scalar"
    extra = {"kind": found["kind"], "feature": feature, "position": str(position), "site": kind,
             "control": found["control"], "train_score": found["train_score"], "n_train": len(found["train"]),
             "n_heldout": len(found["heldout"]), "chance": found["chance"]}
    return ProbeResult("probe", text or f"probe {kind} * at {position} for {feature}", sites,
                       np.asarray(found["score"]), np.asarray(found["selectivity"]),
                       np.asarray(found["correct"], dtype=float), found["chance"], float("nan"),
                       "r2" if scalar else "accuracy", (n_layers,), extra, direction="noise",
                       probes=found["probes"])


def save_probes(result: ProbeResult, path: str | os.PathLike, model_name: str = "") -> Path:
    """Write `result`'s probes as safetensors (the format in the module docstring), atomically.

    Raises:
        ExecutionError: the result holds no fitted probes (one read back from JSON).
    """
    from safetensors.torch import save_file

    if not result.probes:
        raise ExecutionError("this probe result holds no fitted probes to save", code="probe.no-weights",
                             hint="save the result linear_probe returned, not one read from JSON")
    tensors = {}
    layers = []
    for site, probe in zip(result.sites, result.probes):
        layers.append(site.layer)
        tensors[f"layer{site.layer}.weight"] = probe.weight.float().contiguous()
        tensors[f"layer{site.layer}.bias"] = probe.bias.float().contiguous()
        tensors[f"layer{site.layer}.basis"] = probe.basis().float().contiguous()
    first = result.probes[0]
    meta = {"format": PROBE_FORMAT, "site": str(result.extra.get("site", "")),
            "position": str(result.extra.get("position", "")), "feature": str(result.extra.get("feature", "")),
            "kind": first.kind, "classes": json.dumps([str(c) for c in first.classes]),
            "layers": json.dumps(layers), "model": model_name}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_probes(path: str | os.PathLike) -> tuple[dict, dict[int, LinearProbe]]:
    """A file `save_probes` wrote: (metadata, layer -> `LinearProbe`).

    Raises:
        ExecutionError: not a safetensors file of this format.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - a safe_open handle, not a dict
    except (OSError, ValueError, RuntimeError) as exc:
        raise ExecutionError(f"cannot read probe file {str(path)!r}: {exc}", code="probe.file",
                             hint="give a .safetensors file written by a `probe ... save` statement") from None
    if meta.get("format") != PROBE_FORMAT:
        raise ExecutionError(f"{str(path)!r} is not a circuitlang probe file (format {meta.get('format')!r})",
                             code="probe.file", hint=f"expected metadata format = {PROBE_FORMAT}")
    classes = tuple(json.loads(meta.get("classes", "[]")))
    probes = {l: LinearProbe(tensors[f"layer{l}.weight"].double(), tensors[f"layer{l}.bias"].double(), classes)
              for l in json.loads(meta["layers"])}
    return meta, probes


def run_probe(exp, setup, hypothesis=None, *, progress: bool | None = False) -> ProbeResult:
    """A resolved `probe` statement (`ir.Probe`) on a checker `Setup`; a `save "file"` path
    is relative to the hypothesis file's folder (and must stay inside it), or to the
    working directory for a program given as text.

    Raises:
        ExecutionError: as `linear_probe`, or a save path leaving the file's folder.
    """
    target = None
    if exp.save:
        from_file = hypothesis is not None and hypothesis.filename
        base = Path(hypothesis.filename).parent if from_file else Path.cwd()
        target = base / exp.save
        if from_file and base.resolve() not in target.resolve().parents:
            # a hypothesis file writes only beside itself, as it reads only beside itself
            raise ExecutionError(f"probe save path {exp.save!r} leaves the hypothesis file's folder",
                                 code="probe.save-path",
                                 hint="give a path inside that folder, e.g. save \"probes/io.safetensors\"")
    result = linear_probe(setup.model, setup.prompts, exp.site, exp.position, exp.feature, heldout=exp.heldout,
                          seed=setup.seed, batch_size=setup.batch_size, text=exp.text)
    if target is not None:
        result.extra["saved"] = str(save_probes(result, target, getattr(setup.model, "name", "") or ""))
    return result
