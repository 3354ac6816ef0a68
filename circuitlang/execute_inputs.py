"""What scrubbing reads before any node is computed: plain captures, resamples, positions.

Takes a loaded model, a task and its `PromptSet`; gives the pieces `execute.Scrubber`
builds rows from: `PlainCache` (the plain activations of every prompt, captured in
batched passes), `Sampler` (resamples agreeing with a prompt on features),
`position_index` (where a named position sits in each prompt), `metric_reads` /
`metric_columns` / `metric_positions` / `claimed_positions` (which logits the metric
reads, where the claims reach the output; `spread_columns` lays the columns read into
whole logits), and `run_batched` (a forward pass that halves its batch on
CUDA out-of-memory). `circuitlang.execute` re-exports them.
"""
from __future__ import annotations

import numpy as np
import torch

from circuitlang.errors import ExecutionError
from circuitlang.ir_to_graph import INPUT, Feature, InterventionGraph
from circuitlang.sites import Logits, Position

DEFAULT_BATCH = 64


def metric_reads(task, metric: str, prompts, vocab: int) -> torch.Tensor:
    """Which logits the task's metric reads: BoolTensor [N, T], True where changing the
    logits at that position changes the metric's value for that prompt.

    Found by asking the metric itself, on random logits: each position's logits are
    perturbed in turn (cheap: no model runs), so a task needs to declare nothing.
    """
    n, t = prompts.input_ids.shape
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, t, vocab, generator=g)
    reference = torch.randn(n, t, vocab, generator=g)
    base = task.metric(metric, logits, prompts, reference_logits=reference).double()
    reads = torch.zeros(n, t, dtype=torch.bool)
    for pos in range(t):  # one position moved at a time, in place and put back (no copy of all)
        kept = logits[:, pos].clone()
        logits[:, pos] = torch.randn(n, vocab, generator=g) * 3
        value = task.metric(metric, logits, prompts, reference_logits=reference).double()
        logits[:, pos] = kept
        reads[:, pos] = (value - base).abs() > 1e-6
    return reads & prompts.attention_mask.bool()


def metric_columns(task, metric: str, prompts, vocab: int) -> torch.Tensor | None:
    """The vocabulary ids the metric reads at END, over all `prompts` (LongTensor, sorted),
    or None when it reads half the vocabulary or more (a softmax reads all of it).

    Found as `metric_reads` finds positions, by asking the metric on random END logits:
    the columns with a gradient are the candidates, and the values must not move when
    every other column is drawn again, or set far above or below them. A pass whose
    metric reads a few columns then needs only those of the unembedding
    (`LoadedModel.run(logit_columns=...)`). A metric that refuses END-only logits
    [N, V] (a loss over the sequence) gives None.
    """
    if metric == "kl":  # reads the whole distribution, and a reference run
        return None
    from circuitlang.errors import TaskError

    n = len(prompts.input_ids)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(n, vocab, generator=g, requires_grad=True)
    with torch.enable_grad():
        try:
            value = task.metric(metric, logits, prompts).double()
        except TaskError:  # it takes no END-only logits: it reads other positions too
            return None
        if not value.requires_grad:  # a metric of argmaxes or counts: no gradient to read
            return None
        (grad,) = torch.autograd.grad(value.sum(), logits)
    columns = torch.nonzero(grad.abs().sum(0) > 0).ravel()
    if len(columns) == 0 or len(columns) > vocab // 2:
        return None
    # the others drawn again, then all far above and far below the rest (a metric that
    # takes a max or a min over tokens reads more than its gradient at one point shows)
    kept = logits.detach()[:, columns]
    for other in (torch.randn(n, vocab, generator=g) * 3, torch.full((n, vocab), 50.0),
                  torch.full((n, vocab), -50.0)):
        other[:, columns] = kept
        again = task.metric(metric, other, prompts).double()
        if not torch.allclose(again, value.detach(), rtol=0, atol=1e-6):
            return None
    return columns


def spread_columns(part: torch.Tensor, columns: torch.Tensor, vocab: int) -> torch.Tensor:
    """END logits of only `columns` ([B, len(columns)]) laid into [B, vocab], the columns
    the metric does not read at 0 (differentiable: gradients reach `part`)."""
    full = part.new_zeros(len(part), vocab)
    return full.index_copy(1, columns.to(part.device), part)


def metric_positions(task, metric: str, prompts=None, vocab: int | None = None) -> str:
    """Where the task's metric reads the logits: "END" (only there) or "all".

    A task may say so with a `metric_positions(metric)` method; otherwise, given the
    prompts, `metric_reads` finds out; without them a task that defines an `END`
    position is read there, and any other at every position.
    """
    explicit = getattr(task, "metric_positions", None)
    if callable(explicit):
        return explicit(metric)
    if prompts is not None and vocab:
        reads = metric_reads(task, metric, prompts, vocab)
        end = prompts.positions.get("END")
        if end is not None:
            only_end = torch.zeros_like(reads)
            only_end[torch.arange(len(end)), end] = True
            return "END" if torch.equal(reads, only_end) else "all"
        return "all"
    return "END" if "END" in task.SIGNATURE.positions else "all"


def claimed_positions(graph: InterventionGraph, prompts) -> torch.Tensor | None:
    """BoolTensor [N, T]: the positions where the root reads a claimed child (on each
    reference prompt); None when a child is read at every position."""
    n, t = prompts.input_ids.shape
    out = torch.zeros(n, t, dtype=torch.bool)
    for _, transplant in graph.children(graph.root):
        if transplant.position.is_all:
            return None
        out[torch.arange(n), position_index(prompts, transplant.position)] = True
    return out


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


class PlainCache:
    """Plain (un-intervened) activations of every prompt, captured on demand.

    `ensure(sites)` runs one batched pass over the prompts for the sites not yet
    held; `get(site)` returns a CPU tensor [M, T, D]. Means for mean ablation are
    taken over real (unpadded) tokens, per absolute position. With
    `which="corrupt"` the prompts are the task's counterfactuals (`corrupt_input_ids`).
    """

    def __init__(self, model, prompts, *, batch_size: int = DEFAULT_BATCH, which: str = "clean"):
        self.model = model
        self.prompts = prompts
        self.batch_size = batch_size
        self.values: dict = {}
        self._slots: dict = {}  # (a capture's tensor ids) -> (bank, slot)
        self._bank_of: dict = {}  # site -> (bank [S, M, T, ...], its slot)
        self.passes = 0
        self.input_ids = prompts.input_ids if which == "clean" else prompts.corrupt_input_ids

    def ensure(self, sites) -> None:
        """Capture the sites not yet held, in one batched pass over the prompts.

        Sites whose captured values are one tensor in every batch of the pass (the q, k
        and v inputs of a layer's heads are all the stream entering the block, in a
        plain run) are held once and shared, so a layer's heads cost one stream."""
        missing = [s for s in dict.fromkeys(sites) if s not in self.values]
        if not missing:
            return
        ids: dict = {s: [] for s in missing}  # site -> which distinct tensor it was, per batch
        parts: list[list[torch.Tensor]] = []     # the distinct tensors of each batch, on the CPU
        # a capture pass computes no logits (the vocabulary's unembedding is most of a
        # small model's pass) unless the logits are what it captures
        no_logits = None if Logits() in missing else torch.empty(0, dtype=torch.long)
        for sl in _chunks(len(self.prompts.input_ids), self.batch_size):
            run = run_batched(
                self.model,
                self.input_ids[sl],
                self.prompts.attention_mask[sl],
                capture=missing,
                logit_columns=no_logits,
            )
            distinct: dict = {}  # id of a captured tensor -> its index in this batch
            batch: list[torch.Tensor] = []
            for s in missing:
                value = run.cache[s]
                if id(value) not in distinct:
                    distinct[id(value)] = len(batch)
                    batch.append(value.detach().to("cpu"))
                ids[s].append(distinct[id(value)])
            parts.append(batch)
        self.passes += 1
        # the same tensor in every batch -> one concatenation; the concatenations of one
        # shape and dtype are the slots of one bank tensor, so that a gather can read
        # many sites at once (`gather_many`)
        keys = list(dict.fromkeys(tuple(ids[s]) for s in missing))
        shapes: dict = {}
        for key in keys:
            first = [batch[i] for batch, i in zip(parts, key)]
            shape = (sum(x.shape[0] for x in first), *first[0].shape[1:])
            shapes.setdefault((shape, first[0].dtype), []).append(key)
        joined: dict = {}
        for (shape, dtype), group in shapes.items():
            bank = torch.empty(len(group), *shape, dtype=dtype)
            for slot, key in enumerate(group):
                torch.cat([batch[i] for batch, i in zip(parts, key)], out=bank[slot])
                joined[key] = bank[slot]
                self._slots[key] = (bank, slot)
        for s in missing:
            key = tuple(ids[s])
            self.values[s] = joined[key]
            self._bank_of[s] = self._slots[key]

    def get(self, site) -> torch.Tensor:
        self.ensure([site])
        return self.values[site]

    def gather_many(self, sites: list, counts: np.ndarray, rows: np.ndarray, tokens: torch.Tensor) -> torch.Tensor:
        """`get(sites[j])[rows[i], tokens[i]]` for the rows i of part j (part j is the
        next `counts[j]` rows), [len(rows), D]: one gather per bank of captured sites.
        Every site must have been captured (`ensure`)."""
        banks: dict = {}
        for j, site in enumerate(sites):
            bank, slot = self._bank_of[site]
            banks.setdefault(id(bank), (bank, []))[1].append((j, slot))
        starts = np.concatenate([[0], np.cumsum(counts)])
        rows = np.asarray(rows, dtype=np.int64)
        tokens = tokens.to(torch.long).numpy()
        if len(banks) == 1:
            (bank, parts), = banks.values()
            slot_of = np.empty(len(sites), dtype=np.int64)
            for j, slot in parts:
                slot_of[j] = slot
            m, t = bank.shape[1], bank.shape[2]
            flat = (np.repeat(slot_of, counts) * m + rows) * t + tokens
            return bank.reshape(-1, bank.shape[-1]).index_select(0, torch.as_tensor(flat))
        out = None
        for bank, parts in banks.values():
            m, t = bank.shape[1], bank.shape[2]
            where = np.concatenate([np.arange(starts[j], starts[j + 1]) for j, _ in parts])
            slots = np.concatenate([np.full(counts[j], slot, dtype=np.int64) for j, slot in parts])
            got = bank.reshape(-1, bank.shape[-1]).index_select(
                0, torch.as_tensor((slots * m + rows[where]) * t + tokens[where]))
            if out is None:
                out = torch.empty(len(rows), got.shape[-1], dtype=got.dtype)
            out[torch.as_tensor(where)] = got
        return out

    def mean(self, site) -> torch.Tensor:
        """Mean over prompts at each absolute position (padding excluded): [T, D]."""
        key = ("mean", site)
        if key not in self.values:
            v = self.get(site)
            mask = self.prompts.attention_mask.to(v.dtype).unsqueeze(-1)
            self.values[key] = (v * mask).sum(0) / mask.sum(0).clamp(min=1)
        return self.values[key]


def run_batched(model, input_ids, attention_mask, *, capture=(), patches=(), logit_columns=None, resume=None):
    """`model.run` that halves the batch and retries when CUDA runs out of memory
    (`logit_columns`, `resume`: as in `LoadedModel.run`; an empty `logit_columns`
    computes no logits)."""
    try:
        return model.run(input_ids, attention_mask, capture=capture, patches=patches,
                         logit_columns=logit_columns, resume=resume)
    except torch.cuda.OutOfMemoryError:
        n = input_ids.shape[0]
        if n <= 1:
            raise ExecutionError(
                "out of GPU memory even with a batch of one prompt",
                hint="use a smaller model, shorter prompts, or --device cpu",
            )
        torch.cuda.empty_cache()
        from circuitlang.models import (  # local: models imports torch-heavy code
            Patch,
            Run,
        )

        def part(sl):
            cut = [Patch(p.site, p.value[sl], None if p.positions is None else p.positions[sl],
                         None if p.rows is None else p.rows[sl]) for p in patches]
            part_resume = None if resume is None else (resume[0].rows(torch.arange(n)[sl]), resume[1])
            return run_batched(model, input_ids[sl], attention_mask[sl], capture=capture, patches=cut,
                               logit_columns=logit_columns, resume=part_resume)

        a, b = part(slice(0, n // 2)), part(slice(n // 2, n))
        return Run(torch.cat([a.logits, b.logits]), {k: torch.cat([a.cache[k], b.cache[k]]) for k in a.cache})


# --------------------------------------------------------------------------- sampling


class Sampler:
    """Draws resamples that agree with given prompts on given features.

    Args:
        prompts: the task's `PromptSet` (the resampling pool).
        rng: a numpy Generator (the run's seed).
        same_length: also agree on the prompt's token length.
        groups: where to keep the prompts' groups by features (a dict shared by the
            samplers of one prompt set and one `same_length`, which draw the same with
            it as without: the groups are what the prompts give, and only `rng` draws).
    """

    def __init__(self, prompts, rng: np.random.Generator, *, same_length: bool, groups: dict | None = None):
        self.prompts = prompts
        self.rng = rng
        self.same_length = same_length
        self.lengths = prompts.attention_mask.sum(1).numpy()
        self._groups: dict = {} if groups is None else groups

    def feature_values(self, feature: Feature) -> list:
        p = self.prompts
        if feature.kind == "task":
            try:
                return list(p.features[feature.name])
            except KeyError:
                raise ExecutionError(
                    f"the task has no feature {feature.name!r}",
                    hint="it defines: " + ", ".join(sorted(p.features)),
                ) from None
        if feature.kind in ("token", "position"):
            if feature.name in p.features and feature.name not in p.positions:
                # token(IO) where IO is a feature (a name): agree on that feature
                return list(p.features[feature.name])
            idx = position_index(p, Position.parse(feature.name))
            if feature.kind == "position":
                return idx.tolist()
            return p.input_ids[torch.arange(len(idx)), idx].tolist()
        raise ExecutionError(f"cannot resample on feature {feature}")

    def _group_keys(self, features: tuple) -> np.ndarray:
        cols = [self.feature_values(f) for f in features if f.kind != INPUT]
        if self.same_length:
            cols.append(self.lengths.tolist())
        n = len(self.prompts.input_ids)
        keys = [tuple(col[i] for col in cols) for i in range(n)]
        return keys

    def agree(self, parent_rows: np.ndarray, features: tuple) -> np.ndarray:
        """For each parent prompt, a pool prompt agreeing with it on `features`."""
        if any(f.kind == INPUT for f in features):
            return parent_rows.copy()
        key = tuple(features)
        if key not in self._groups:
            keys = self._group_keys(features)
            groups: dict = {}
            for i, k in enumerate(keys):
                groups.setdefault(k, []).append(i)
            members = list(groups.values())  # each prompt's group, flat: group g is flat[start[g]:][:size[g]]
            of = np.empty(len(keys), dtype=np.int64)
            for g, m in enumerate(members):
                of[m] = g
            size = np.array([len(m) for m in members], dtype=np.int64)
            start = np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.int64)
            self._groups[key] = (of, size, start, np.concatenate(members).astype(np.int64))
        of, size, start, flat = self._groups[key]
        group = of[np.asarray(parent_rows, dtype=np.int64)]
        # one draw per parent, in order: numpy draws an array of bounds as it draws each
        # bound in turn (tests/checker/test_execute_plan.py pins it), so the samples are
        # those of one `integers(len(group))` call per row
        pick = self.rng.integers(size[group]) if len(group) else np.zeros(0, dtype=np.int64)
        return flat[start[group] + pick].astype(parent_rows.dtype, copy=False)


def position_index(prompts, position: Position) -> torch.Tensor:
    """Token index of a named position in every prompt: LongTensor [M]."""
    try:
        base = prompts.positions[position.name]
    except KeyError:
        raise ExecutionError(
            f"the task defines no position {position.name!r}",
            hint="it defines: " + ", ".join(sorted(prompts.positions)),
        ) from None
    idx = base + position.offset
    lengths = prompts.attention_mask.sum(1)
    if bool(((idx < 0) | (idx >= lengths)).any()):
        raise ExecutionError(f"position {position} falls outside some prompts")
    return idx
