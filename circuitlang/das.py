"""Distributed alignment search (Geiger et al. 2023): learn the subspace a feature lives in.

Takes a loaded model, where to look (`sites.Basis`'s place: `resid L`, `head L.H.out`,
`mlp L`), base and source prompts with the position to intervene at, and the answer each
pair should produce; gives an `Alignment`: a [d_model, k] orthonormal basis, its
interchange-intervention accuracy (IIA) on held-out pairs, and the file it was saved to.

* **Parametrisation.** The basis is the Q of a QR decomposition of a free [d, k] matrix
  (signs fixed by R's diagonal), so it is orthonormal at every step; Adam on that matrix.
* **Interchange intervention.** On the base run, the state `x_b` at the position becomes
  `x_b + (x_s - x_b) @ B @ B.T`: its coordinates in the subspace are the source's, the
  orthogonal complement stays the base's. The engine's own `Resid` / `Head` / `Mlp`
  patch carries it (`circuitlang.models.run`), so gradients reach `B` and nothing else.
* **Objective and score.** Cross-entropy of the intervened logits at the read position
  against the source's answer (the answer the source's value of the feature implies);
  IIA is the share of held-out pairs whose intervened top token is that answer.
* **From a task** (`align_from_task`): base = the clean prompt, source = its
  counterfactual, only pairs whose counterfactual changes the feature; the target is the
  counterfactual's own first answer (IOI's ABC counterfactual with a new IO: its IO).
* **Saved file** (`save_basis`): safetensors, `basis` [d_model, k] fp32, metadata
  `format` = "circuitlang-subspace/1", `hook`, `layer`, `head`, `position`, `feature`,
  `iia`, written atomically. `subspace NAME = "file"` reads it back.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from circuitlang.errors import ExecutionError
from circuitlang.experiments import ExperimentResult
from circuitlang.models.subspace import SUBSPACE_FORMAT
from circuitlang.sites import Basis, Channel, Head, Mlp, Resid

#: Defaults of `align ... with F dims K [steps N] [pairs N] [heldout F]`.
ALIGN_DEFAULTS = {"dims": 1, "steps": 300, "pairs": 200, "heldout": 0.25, "lr": 0.05}


@dataclass(frozen=True)
class Alignment:
    """What DAS learned.

    Attributes:
        basis: [d_model, k] orthonormal columns (fp32, CPU).
        iia: interchange-intervention accuracy on the held-out pairs.
        train_iia: the same on the training pairs.
        n_train, n_heldout: pairs used for each.
        loss: the final training loss.
    """

    basis: torch.Tensor
    iia: float
    train_iia: float
    n_train: int
    n_heldout: int
    loss: float


def state_site(place: Basis):
    """The engine site whose value is the state a subspace at `place` lies in."""
    if place.hook == "resid":
        return Resid(place.layer)
    if place.hook == "mlp":
        return Mlp(place.layer)
    return Head(place.layer, place.head, Channel.OUT)


def orthonormal(free: torch.Tensor) -> torch.Tensor:
    """The Q of `free`'s QR, with columns signed so R's diagonal is positive."""
    q, r = torch.linalg.qr(free)
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))


def _states(lm, site, ids, mask, pos) -> torch.Tensor:
    with torch.no_grad():
        run = lm.run(ids, mask, capture=[site])
    return run.cache[site][torch.arange(len(ids)), pos].detach()


def _intervened_logits(lm, site, basis, base_ids, base_mask, pos, read, xb, xs) -> torch.Tensor:
    from circuitlang.models import Patch

    value = xb + ((xs - xb) @ basis) @ basis.T
    run = lm.run(base_ids, base_mask, patches=[Patch(site, value, positions=pos)], grad=torch.is_grad_enabled())
    return run.logits[torch.arange(len(base_ids)), read]


def learn_alignment(lm, place: Basis, base_ids, source_ids, targets, pos, read, *,
                    base_mask=None, source_pos=None, source_mask=None, dims: int = 1,
                    steps: int = 300, lr: float = 0.05, heldout: float = 0.25, seed: int = 0) -> Alignment:
    """Learn a `dims`-dimensional subspace at `place` by interchange interventions.

    Args:
        lm: a `LoadedModel`.
        place: where (its `path`, `name` and `k` are not used).
        base_ids, source_ids: [N, T] token ids of each pair's base and source prompt.
        targets: [N] the token each intervened base run should predict.
        pos: [N] the token index intervened at (in both prompts unless `source_pos`).
        read: [N] the token index whose logits are read on the base run.
        dims: k, the subspace's dimension; steps, lr: Adam's; heldout: the share of
            pairs scored, not trained on; seed: the split and the initial basis.

    Raises:
        ExecutionError: fewer than 2 pairs, or `dims` not in 1..d_model.
    """
    n = len(base_ids)
    d = lm.shape.d_model
    if n < 2:
        raise ExecutionError(f"DAS needs at least 2 pairs, got {n}", code="das.pairs",
                             hint="use a task with more prompts (`samples N`)")
    if not 1 <= dims <= d:
        raise ExecutionError(f"dims {dims} is not between 1 and the model's width {d}", code="das.dims",
                             hint=f"ask for dims 1..{d}")
    site = state_site(place)
    pos = torch.as_tensor(pos).long()
    read = torch.as_tensor(read).long()
    targets = torch.as_tensor(targets).long().to(lm.device)
    xb = _states(lm, site, base_ids, base_mask, pos)
    xs = _states(lm, site, source_ids, source_mask,
                 pos if source_pos is None else torch.as_tensor(source_pos).long())
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    n_test = min(n - 1, max(1, round(n * heldout)))
    test, train = order[:n_test], order[n_test:]
    free = torch.randn(d, dims, generator=gen, dtype=torch.float32).to(lm.device, lm.dtype)
    free.requires_grad_(True)
    opt = torch.optim.Adam([free], lr=lr)
    loss_value = float("nan")
    params = [p for p in lm.hf_model.parameters() if p.requires_grad]
    for p in params:  # gradients reach the basis only
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                b = orthonormal(free)
                logits = _intervened_logits(lm, site, b, base_ids[train], _rows(base_mask, train),
                                            pos[train], read[train], xb[train], xs[train])
                loss = torch.nn.functional.cross_entropy(logits.float(), targets[train])
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss_value = float(loss.detach())
    finally:
        for p in params:
            p.requires_grad_(True)
    with torch.no_grad():
        b = orthonormal(free).detach()

        def accuracy(rows) -> float:
            logits = _intervened_logits(lm, site, b, base_ids[rows], _rows(base_mask, rows), pos[rows],
                                        read[rows], xb[rows], xs[rows])
            return float((logits.argmax(-1) == targets[rows]).float().mean())

        iia, train_iia = accuracy(test), accuracy(train)
    return Alignment(b.float().cpu(), iia, train_iia, len(train), len(test), loss_value)


def _rows(mask, rows):
    return None if mask is None else mask[rows]


def align_from_task(lm, task, prompts, place: Basis, position, feature: str, **options) -> Alignment:
    """DAS on a task's counterfactual pairs (see the module docstring).

    Raises:
        ExecutionError: no counterfactual changes `feature`, or the counterfactuals
            cannot be built as prompts of their own (their answers are the targets).
    """
    from circuitlang.execute import position_index

    changed = [i for i, (s, c) in enumerate(zip(prompts.specs, prompts.corrupt_specs))
               if s.feature(feature) != c.feature(feature)]
    if not changed:
        raise ExecutionError(f"no counterfactual of task {task.name} changes {feature}", code="das.feature",
                             hint="align on a feature the task's counterfactuals resample")
    limit = int(options.pop("pairs", ALIGN_DEFAULTS["pairs"]))
    changed = changed[:limit]
    sub = prompts.subset(changed)
    sources = task.build(list(sub.corrupt_specs))
    if len(sources) != len(sub):
        raise ExecutionError(f"{len(sub) - len(sources)} counterfactual prompt(s) of task {task.name} "
                             "cannot be built on their own", code="das.sources",
                             hint="use a task whose counterfactuals are prompts of the task")
    pos = position_index(sub, position)
    src_pos = position_index(sources, position)
    read = sub.attention_mask.sum(1) - 1  # the metric's token: the last real one
    targets = sources.answers[:, 0]
    return learn_alignment(lm, place, sub.input_ids, sources.input_ids, targets, pos, read,
                           base_mask=sub.attention_mask, source_pos=src_pos,
                           source_mask=sources.attention_mask, **options)


def save_basis(alignment: Alignment, path: str | os.PathLike, place: Basis, *, position: str = "",
               feature: str = "") -> Path:
    """Write the basis as safetensors (the format in the module docstring), atomically."""
    from safetensors.torch import save_file

    meta = {"format": SUBSPACE_FORMAT, "hook": place.hook, "layer": str(place.layer),
            "head": "" if place.head is None else str(place.head), "position": position,
            "feature": feature, "iia": f"{alignment.iia:.6f}"}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file({"basis": alignment.basis.contiguous()}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class AlignResult(ExperimentResult):
    """An `align` statement's result: `values` and `normalized` hold the held-out IIA;
    `extra` the train IIA, pair counts, final loss and the file the basis was saved to."""

    def render(self) -> str:
        e = self.extra
        return (f"{self.text}\n  IIA {float(self.values.ravel()[0]):.3f} on {e.get('heldout_pairs')} held-out pairs "
                f"(train {e.get('train_iia', float('nan')):.3f} on {e.get('train_pairs')}); "
                f"basis [{e.get('d_model')}, {e.get('dims')}] saved to {e.get('saved')}")

    def __repr__(self) -> str:
        return f"AlignResult({self.text!r}: IIA {float(self.values.ravel()[0]):.3g})"


def run_align(exp, setup, hypothesis=None, *, progress: bool | None = False) -> AlignResult:
    """A resolved `align` statement (`ir.Align`) on a checker `Setup`: learn, score, save the
    basis where the resolver said (`exp.basis.path`, beside the hypothesis file)."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few hundred small steps: one thread is as fast, and shares the machine
    try:
        found = align_from_task(setup.model, setup.task, setup.prompts, exp.basis, exp.position, exp.feature,
                                dims=exp.basis.k, steps=exp.steps, pairs=exp.pairs, heldout=exp.heldout,
                                seed=setup.seed)
    finally:
        torch.set_num_threads(torch_threads)
    saved = save_basis(found, exp.basis.path, exp.basis, position=str(exp.position), feature=exp.feature)
    extra = {"train_iia": found.train_iia, "train_pairs": found.n_train, "heldout_pairs": found.n_heldout,
             "loss": found.loss, "dims": exp.basis.k, "d_model": int(found.basis.shape[0]), "saved": str(saved),
             "feature": exp.feature, "position": str(exp.position)}
    iia = np.array([found.iia])
    return AlignResult("align", exp.text, [f"subspace {exp.basis.name}"], iia, iia.copy(), np.empty((1, 0)),
                       float("nan"), float("nan"), "iia", None, extra)
