"""Edge pruning by learned masks (Bhaskar et al. 2024, "Finding Transformer Circuits with
Edge Pruning"): a hard-concrete gate per candidate edge, trained by gradient descent on
the edge engine's exact mask gradients toward a target fraction of edges kept.

Takes a `Problem` (edge space, ablated values, metric), a `Selection` and options; gives
a `Found` whose ranking is the edges by learned log-alpha (best first) and whose circuit
is the deterministic mask or the part of that ranking the selection asks for.

**The gates.** Each edge i has one parameter `log_alpha[i]`. A step draws, per edge, the
hard-concrete sample of Louizos, Welling & Kingma 2018 ("Learning Sparse Neural Networks
through L0 Regularization", section 4, eqs. 10-12) with *their* constants, which Bhaskar
et al. keep: stretch interval `(GAMMA, ZETA) = (-0.1, 1.1)` and temperature
`BETA = 2/3`::

    u ~ U(0, 1);  s = sigmoid((log u - log(1 - u) + log_alpha) / BETA)
    z = clamp(s (ZETA - GAMMA) + GAMMA, 0, 1)        # fraction of the edge kept

so z is exactly 0 or 1 with positive probability and differentiable in log_alpha in
between. The circuit's output is the engine's with ablation mask `1 - z` (a fraction
mixes each edge's clean and ablated value linearly). One sample of z is shared by every
prompt of a step. Its expected L0 is
`P(z_i > 0) = sigmoid(log_alpha_i - BETA log(-GAMMA / ZETA))`.

**The loss** of a step over a minibatch of prompts::

    faith = mean KL(full model || circuit) at END            (metric "kl", the default)
          = mean d (m(full) - m(z))                         (a task metric; d = +1 when
                                                             higher is better)
    loss  = faith + lambda1 (kept - target_t) + lambda2 max(kept - target_t, 0)^2

with `kept` the expected fraction of edges kept (the mean expected L0). This is the
Lagrangian form Bhaskar et al. use (that of CoFi pruning, Xia et al. 2022), not a
fixed penalty `lambda (kept - target)^2`: Adam *descends* on the log-alphas while the
multipliers (from 0) *ascend*, `lambda1 += lambda_lr (kept - target_t)`,
`lambda2 += lambda_lr max(kept - target_t, 0)^2`, so the pressure keeps growing while the
gates are denser than the target, whatever the scale of the faithfulness loss (a KL of
1e-4 nats on one model, several nats on another). A fixed penalty settles wherever its
gradient balances the faithfulness gradient, a sparsity that depends on the model and
the metric, so "target sparsity" would mean something different on every problem. One
change to their form: the constraint is an inequality, `kept <= target`, so `lambda1` is
projected onto `>= 0` and the quadratic term counts only an excess. Without that, a
multiplier turns negative whenever the gates run ahead of the warm-up schedule and
reopens them (the runs oscillate). The target moves linearly from the initial expected
fraction to the requested one over the first `warmup` steps (CoFi's warm-up), so the
gates learn what matters before being squeezed. A task that needs more edges than the
target keeps the gates above it for many steps (the multiplier grows linearly); the
result then notes it.

**The result.** The deterministic mask keeps edge i when z at the median of its noise
(u = 1/2) is at least 1/2, i.e. when `log_alpha_i > 0`. A `Selection` overrides that:
`edges=k` keeps the k edges with the largest log-alpha, `threshold=t` those with
log-alpha above t, `target=f` a prefix of the log-alpha ranking reaching faithfulness
f in the task's metric (`select.grow` says which).

**Options** (flat keys of the method's `options` dict, which `discover(...,
method_options={...})` fills; defaults in `DEFAULTS`): `prune_steps` (plain `steps` is
EAP-IG's number of points throughout `discover`), `lr` (Adam on the log-alphas),
`sparsity` (target fraction of edges kept, in (0, 1]), `lambda_lr` (the multipliers'
ascent rate), `warmup` (steps over which the target moves; default half), `init` (the
initial log-alpha: 3 opens nearly every gate), `batch` (prompts per step; default the
problem's batch size), `seed` (default the problem's), `warm_start` (True or an EAP-IG
variant: start the log-alphas from EAP-IG importances, ranked), `checkpoint_every`,
`progress`, and `callback` (called as `callback(step, info)` after every step, for
tests and front ends).

**Determinism and resumption.** The noise of step t and the minibatch order of each pass
over the prompts come from generators seeded by (seed, t) and (seed, pass), so a run is
a function of its options and the step number is the whole random state. Every
`checkpoint_every` steps (and at the end) the run directory gets `prune.pt` (log-alphas,
Adam's moments and step count, the multipliers, the step), written atomically; a resumed
run loads it and continues with step `step + 1`, reaching bit for bit the result of an
uninterrupted run.

**Cost.** One forward and one backward pass of `batch` prompts per step (the backward
about twice a forward), with every edge in the engine's mixing GEMM (a mask that needs
gradients keeps every row), plus, once, the ablated values of every prompt (kept in
memory when they fit) and the full model's reference output.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from circuitlang.discover import Found, register_method
from circuitlang.discover.attribution import IG_VARIANTS, eap_ig
from circuitlang.discover.problem import Problem
from circuitlang.discover.select import grow, top_n
from circuitlang.errors import DiscoveryError
from circuitlang.models import EdgePatch

__all__ = ["BETA", "DEFAULTS", "GAMMA", "ZETA", "PruneState", "deterministic_mask", "expected_l0",
           "hard_concrete", "prune", "step_loss"]

# Louizos, Welling & Kingma 2018, section 4 (and their experiments): the stretch interval
# (gamma, zeta) and the temperature beta of the hard-concrete distribution.
GAMMA, ZETA = -0.1, 1.1
BETA = 2.0 / 3.0
_EPS = 1e-6  # keeps u away from 0 and 1 (log 0)

DEFAULTS = {
    "prune_steps": 300,
    "lr": 0.1,
    "sparsity": 0.05,
    "lambda_lr": 1.0,
    "warmup": None,  # None: half the steps
    "init": 3.0,
    "batch": None,  # None: the problem's batch size (all prompts when fewer)
    "seed": None,  # None: the problem's seed
    "warm_start": False,
    "checkpoint_every": 25,
}

#: the options a run directory's checkpoint must agree with to be resumed
_RUN_KEYS = ("steps", "lr", "sparsity", "lambda_lr", "warmup", "init", "batch", "seed", "warm_start")

#: the per-position engine mask [rows, T, R, S] of one chunk stays under this many bytes
_MASK_BUDGET = 64 * 2 ** 20
#: every prompt's ablated sender values are kept in memory when they fit in this
_ABLATED_BUDGET = 1 << 30


def hard_concrete(log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The hard-concrete sample z in [0, 1] for uniform noise `u` (same shape)."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def expected_l0(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z > 0) per edge: the expected L0 norm's terms."""
    return torch.sigmoid(log_alpha - BETA * math.log(-GAMMA / ZETA))


def deterministic_mask(log_alpha: torch.Tensor) -> torch.Tensor:
    """Edges whose gate at the median of its noise keeps at least half: log_alpha > 0."""
    return log_alpha > 0


def _settings(problem: Problem, options: dict) -> dict:
    """The run's settings from `options` over `DEFAULTS`, checked."""
    s = {k: options.get(k, v) for k, v in DEFAULTS.items()}
    s["steps"] = s.pop("prune_steps")
    if s["seed"] is None:
        s["seed"] = problem.seed
    if s["batch"] is None:
        s["batch"] = min(problem.n, problem.batch_size)

    def is_int(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    def is_real(x):
        return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)

    if not is_int(s["steps"]) or s["steps"] < 1:
        raise DiscoveryError(f"pruning needs at least one step, got prune_steps={s['steps']!r}",
                             code="discover.prune-steps", hint="for example prune_steps=300 (the default)")
    if not is_real(s["lr"]) or s["lr"] <= 0:
        raise DiscoveryError(f"pruning's learning rate must be positive, got lr={s['lr']!r}",
                             code="discover.prune-lr", hint="for example lr=0.1 (the default)")
    if not is_real(s["sparsity"]) or not 0 < s["sparsity"] <= 1:
        raise DiscoveryError(f"target sparsity {s['sparsity']!r} is outside (0, 1]",
                             code="discover.prune-sparsity",
                             hint="sparsity is the fraction of edges kept: 0.05 keeps 5% of them, 1 all")
    if not is_real(s["lambda_lr"]) or s["lambda_lr"] < 0:
        raise DiscoveryError(f"the multipliers' rate must be >= 0, got lambda_lr={s['lambda_lr']!r}",
                             code="discover.prune-lambda", hint="for example lambda_lr=1.0 (the default)")
    if s["warmup"] is None:
        s["warmup"] = s["steps"] // 2
    if not is_int(s["warmup"]) or not 0 <= s["warmup"] <= s["steps"]:
        raise DiscoveryError(f"warmup={s['warmup']!r} is not between 0 and prune_steps={s['steps']}",
                             code="discover.prune-warmup", hint="the steps over which the target moves, "
                             "e.g. half the steps (the default)")
    if not is_real(s["init"]):
        raise DiscoveryError(f"init={s['init']!r} is not a number", code="discover.prune-init",
                             hint="the initial log-alpha, e.g. 3.0 (the default: nearly every gate open)")
    if not is_int(s["batch"]) or s["batch"] < 1:
        raise DiscoveryError(f"batch={s['batch']!r} is not a positive number of prompts",
                             code="discover.prune-batch", hint="prompts per step, e.g. 32")
    if not is_int(s["seed"]):
        raise DiscoveryError(f"seed={s['seed']!r} is not an integer", code="discover.prune-seed",
                             hint="for example seed=0")
    every = options.get("checkpoint_every", DEFAULTS["checkpoint_every"])
    if not is_int(every) or every < 1:
        raise DiscoveryError(f"checkpoint_every={every!r} is not a positive number of steps",
                             code="discover.prune-checkpoint", hint="for example checkpoint_every=25")
    s["checkpoint_every"] = every
    if not (s["warm_start"] is True or s["warm_start"] is False or s["warm_start"] in IG_VARIANTS):
        raise DiscoveryError(f"warm_start={s['warm_start']!r} is not an EAP-IG variant",
                             code="discover.prune-warm-start", hint="warm_start=True, False or one of "
                             + ", ".join(IG_VARIANTS))
    s["batch"] = min(int(s["batch"]), problem.n)
    return s


def _generator(seed: int, stream: int, t: int) -> torch.Generator:
    """A generator for step (or pass) `t` of stream `stream`: runs are functions of the seed."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, stream, t]).generate_state(1)[0]))


class PruneState:
    """What a run carries from step to step: log-alphas, Adam, the multipliers, the step."""

    def __init__(self, log_alpha: torch.Tensor, lr: float):
        self.log_alpha = log_alpha.detach().clone().requires_grad_(True)
        self.adam = torch.optim.Adam([self.log_alpha], lr=lr)
        self.lambdas = torch.zeros(2, dtype=torch.float64)
        self.step = 0
        # the target's warm-up starts from the initial expected fraction kept
        self.start = float(expected_l0(self.log_alpha.detach()).mean())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"log_alpha": self.log_alpha.detach(), "lambdas": self.lambdas,
               "step": torch.tensor(self.step, dtype=torch.long),
               "start": torch.tensor(self.start, dtype=torch.float64)}
        state = self.adam.state.get(self.log_alpha)
        if state:
            out["adam_step"] = torch.as_tensor(state["step"]).reshape(())
            out["exp_avg"], out["exp_avg_sq"] = state["exp_avg"], state["exp_avg_sq"]
        return out

    def load(self, saved: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            self.log_alpha.copy_(saved["log_alpha"])
        self.lambdas = saved["lambdas"].clone()
        self.step = int(saved["step"])
        self.start = float(saved["start"])
        if "exp_avg" in saved:
            group = self.adam.state_dict()["param_groups"]
            self.adam.load_state_dict({"state": {0: {"step": saved["adam_step"].clone(),
                                                     "exp_avg": saved["exp_avg"].clone(),
                                                     "exp_avg_sq": saved["exp_avg_sq"].clone()}},
                                       "param_groups": group})


class _Batches:
    """The per-step data: ablated values (kept when they fit), full-model metric values."""

    def __init__(self, problem: Problem):
        self.problem = problem
        es = problem.space.edge_set
        ids = problem.prompts.input_ids
        per_prompt = len(es.senders) * ids.shape[1] * problem.model.shape.d_model * 4
        self.cached = None
        if problem.ablation in ("mean", "zero"):
            self.cached = problem.ablated(torch.arange(min(problem.n, 1)))
        elif per_prompt * problem.n <= _ABLATED_BUDGET:
            parts = [problem.ablated(torch.arange(a, min(problem.n, a + problem.batch_size)))
                     for a in range(0, problem.n, problem.batch_size)]
            self.cached = torch.cat(parts)
        self.full = None
        if problem.metric != "kl":  # d (m(full) - m(z)): m(full) per prompt, once
            self.full = torch.as_tensor(problem.full())
        else:
            problem.reference(torch.arange(problem.n))  # computed once, then cached

    def ablated(self, index: torch.Tensor) -> torch.Tensor:
        if self.cached is None:
            return self.problem.ablated(index)
        if self.cached.shape[0] == 1 and self.problem.ablation in ("mean", "zero"):
            return self.cached
        return self.cached[index.to(self.cached.device)]


def step_loss(problem: Problem, log_alpha: torch.Tensor, u: torch.Tensor, index: torch.Tensor,
              data: _Batches | None = None, *, lambdas=(0.0, 0.0), target: float = 1.0):
    """One step's loss and its gradient with respect to `log_alpha`, for noise `u` [E] and
    the prompts at `index`.

    Returns:
        (loss, faithfulness loss, expected fraction kept, d loss / d log_alpha), the first
        three as floats.
    """
    data = data or _Batches(problem)
    space, es = problem.space, problem.space.edge_set
    n_t = problem.prompts.input_ids.shape[1]
    rows = len(index)
    if space.per_position:
        per_row = n_t * len(es.receivers) * len(es.senders) * 4
        chunk = max(1, min(rows, _MASK_BUDGET // per_row))
    else:
        chunk = rows
    grad = torch.zeros_like(log_alpha)
    faith_total = 0.0
    with torch.enable_grad():
        for a in range(0, rows, chunk):
            sub = index[a:a + chunk]
            la = log_alpha.detach().requires_grad_(True)
            z = hard_concrete(la, u.to(la.dtype))
            kept = z[None].expand(len(sub), -1) if space.per_position else z[None]
            masks = space.masks(kept, problem.prompts, sub)
            ablated = data.ablated(sub)
            logits = problem.forward(sub, edges=EdgePatch.from_set(es, ablated, masks), grad=True)
            m = problem.metric_of(logits, sub).to(la.dtype)
            if problem.metric == "kl":
                faith = m.sum() / rows
            else:
                full = data.full[sub].to(m.dtype).to(m.device)
                faith = (problem.direction * (full - m)).sum() / rows
            (g,) = torch.autograd.grad(faith, la)
            grad += g.to(grad.dtype)
            faith_total += float(faith.detach())
        la = log_alpha.detach().requires_grad_(True)
        kept_fraction = expected_l0(la).mean()
        gap = kept_fraction - target
        penalty = float(lambdas[0]) * gap + float(lambdas[1]) * gap.clamp(min=0) ** 2
        (g,) = torch.autograd.grad(penalty, la)
        grad += g
    return faith_total + float(penalty.detach()), faith_total, float(kept_fraction.detach()), grad


def _initial(problem: Problem, s: dict, options: dict, notes: list[str]) -> torch.Tensor:
    n_edges = len(problem.space)
    init = float(s["init"])
    if not s["warm_start"]:
        return torch.full((n_edges,), init)
    variant = s["warm_start"] if isinstance(s["warm_start"], str) else options.get("ig", "inputs")
    if variant == "inputs" and problem.ablation != "corrupt":
        variant = "activations"
        notes.append("warm start: EAP-IG over activations (over inputs needs corrupt ablation)")
    importance = eap_ig(problem, variant, 5).importance()
    # rank-linear start centred on the target size: the k = target * E most important
    # edges open (log-alpha from +init down to ~0), the rest closing (~0 down to -init)
    k = max(1, round(s["sparsity"] * n_edges))
    rank = torch.empty(n_edges)
    rank[torch.argsort(-importance, stable=True)] = torch.arange(n_edges, dtype=torch.float32)
    return init * ((k - 0.5 - rank) / k).clamp(-1.0, 1.0)


def _ascend(lambdas: torch.Tensor, gap: float, rate: float) -> torch.Tensor:
    """The multipliers' ascent step on `gap` = kept - target, projected onto lambda >= 0:
    the constraint is kept <= target, so no multiplier ever rewards keeping more edges."""
    over = max(gap, 0.0)
    return torch.stack([(lambdas[0] + rate * gap).clamp(min=0), lambdas[1] + rate * over * over])


def _target(s: dict, start: float, step: int) -> float:
    """The target fraction kept at `step` (1-based): from `start` to `sparsity` over warmup."""
    if s["warmup"] == 0 or step >= s["warmup"]:
        return float(s["sparsity"])
    return start + (float(s["sparsity"]) - start) * step / s["warmup"]


def _index(s: dict, n: int, step: int) -> torch.Tensor:
    """The prompts of `step` (1-based): consecutive slices of a seeded permutation per pass."""
    per_pass = -(-n // s["batch"])
    p, j = divmod(step - 1, per_pass)
    if s["batch"] >= n:
        return torch.arange(n)
    order = torch.randperm(n, generator=_generator(s["seed"], 1, p))
    return order[j * s["batch"]:(j + 1) * s["batch"]]


def train(problem: Problem, options: dict | None = None, rundir=None, notes: list[str] | None = None
          ) -> tuple[PruneState, dict]:
    """Train the gates (see the module docstring); the final state and the settings used.

    Raises:
        DiscoveryError: bad options, or a run directory whose checkpoint has other options.
    """
    from circuitlang.progress import Progress

    options = dict(options or {})
    notes = [] if notes is None else notes
    s = _settings(problem, options)
    run_spec = {k: s[k] for k in _RUN_KEYS}
    state = None
    if rundir is not None:
        saved_spec = rundir.read_json("prune")
        saved = rundir.read_tensors("prune")
        if saved_spec is not None and saved is not None:
            if saved_spec != run_spec:
                changed = sorted(k for k in run_spec if saved_spec.get(k) != run_spec[k])
                raise DiscoveryError(f"the run directory's pruning checkpoint was made with other options "
                                     f"({', '.join(changed)})", code="discover.rundir-mismatch",
                                     hint="resume with the same options, or choose another run directory")
            state = PruneState(saved["log_alpha"], s["lr"])
            state.load(saved)
            if state.step:
                notes.append(f"pruning resumed at step {state.step} of {s['steps']}")
        else:
            rundir.write_json("prune", run_spec)
    if state is None:
        state = PruneState(_initial(problem, s, options, notes), s["lr"])
        if rundir is not None:
            rundir.write_tensors("prune", state.tensors())
    callback = options.get("callback")
    bar = Progress(s["steps"], "pruning", enabled=bool(options.get("progress")))
    data = _Batches(problem) if state.step < s["steps"] else None
    try:
        while state.step < s["steps"]:
            t = state.step + 1
            index = _index(s, problem.n, t)
            u = torch.rand(len(problem.space), generator=_generator(s["seed"], 0, t))
            u = u * (1 - 2 * _EPS) + _EPS
            target = _target(s, state.start, t)
            loss, faith, kept, grad = step_loss(problem, state.log_alpha, u, index, data,
                                                lambdas=state.lambdas.tolist(), target=target)
            state.adam.zero_grad(set_to_none=True)
            state.log_alpha.grad = grad.to(state.log_alpha.dtype)
            state.adam.step()
            state.lambdas = _ascend(state.lambdas, kept - target, s["lambda_lr"])
            state.step = t
            if rundir is not None and (t % s["checkpoint_every"] == 0 or t == s["steps"]):
                rundir.write_tensors("prune", state.tensors())
            bar.set(t, f"kept {kept:.3f}/{target:.3f} loss {faith:.3g}")
            if callback is not None:
                callback(t, {"loss": loss, "faithfulness_loss": faith, "kept": kept, "target": target,
                             "log_alpha": state.log_alpha.detach(), "lambdas": state.lambdas})
    finally:
        bar.close()
    return state, s


@register_method("prune")
def prune(problem: Problem, selection, options: dict, rundir=None) -> Found:
    """Learned-mask edge pruning; see the module docstring. Returns the circuit and the
    ranking of edges by log-alpha (best first); `extra["log_alpha"]` holds the gates."""
    notes: list[str] = []
    state, s = train(problem, options, rundir, notes)
    log_alpha = state.log_alpha.detach().float()
    ranking = torch.argsort(-log_alpha, stable=True)
    if selection is not None and selection.edges is not None:
        circuit = top_n(log_alpha, selection.edges)
    elif selection is not None and selection.threshold is not None:
        circuit = log_alpha > selection.threshold
    elif selection is not None and selection.target is not None:
        circuit, _ = grow(problem, ranking, selection.target, full=options.get("full"), empty=options.get("empty"),
                          metric=options.get("task_metric"))
    else:
        circuit = deterministic_mask(log_alpha)
    kept = float(expected_l0(log_alpha).mean())
    notes.append(f"pruning: {s['steps']} steps, expected fraction of edges kept {kept:.3f} "
                 f"(target {s['sparsity']}), {int(deterministic_mask(log_alpha).sum())} gates open")
    if kept > 1.1 * s["sparsity"] + 1.0 / len(problem.space):
        notes.append("the gates stayed above the target sparsity: the task seems to need more edges "
                     "(raise sparsity), or the run more steps or a larger lambda_lr")
    options["method_name"] = f"prune (sparsity {s['sparsity']:g}, {s['steps']} steps, metric {problem.metric})"
    return Found(circuit, ranking=ranking, notes=notes,
                 extra={"log_alpha": log_alpha, "lambdas": state.lambdas.clone()})
