"""circuitlang's discovery agrees with auto-circuit 1.0.1's on the same model and prompts.

Builds (once per session) the GPT-2-shaped random-init model folder of the patching
agreement tests (`bench/peers/make_model.py`) with prompts whose metric position is the
last token, runs `bench/peers/ac_discovery.py` in the auto-circuit venv (`.peers/ac`),
and compares with circuitlang on the same folder (`load_model`) and the same prompts (a
token-id JSONL task, so END is the last token as auto-circuit's `slice_output="last_seq"`):

* EAP: `Scores.edges` (d mean logit difference / d ablation mask) equals minus
  auto-circuit's `mask_gradient_prune_scores(mask_val=0, grad_function="logit",
  answer_function="avg_diff")` (which differentiates minus the metric), to 1e-4;
* its integrated gradients (`integrated_grad_samples=N`: the gradients at ablation
  fractions 0, 1/N, ..., 1, summed) equal circuitlang's mask gradients at the same points;
* ACDC: given auto-circuit's edge order, circuitlang's ACDC keeps the same edge set at
  each tau, and measures the same KL at every step.

Marked `optional`: skipped, with the command that makes it, when the venv is missing.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from circuitlang.discover.acdc import acdc  # noqa: E402
from circuitlang.discover.attribution import eap  # noqa: E402
from circuitlang.discover.problem import Problem  # noqa: E402
from circuitlang.models import load_model  # noqa: E402

pytestmark = pytest.mark.optional

REPO = Path(__file__).resolve().parents[2]
PEERS_SRC = REPO / "bench" / "peers"
AC_PYTHON = REPO / ".peers" / "ac" / "bin" / "python"
TOL = 1e-4
# taus with no ACDC step within 1e-5 of them on this model (0.003 had one, 4e-6 away,
# once the logits were unembedded at END only: float rounding, not a disagreement)
TAUS = (0.004, 0.01, 0.03)
IG_SAMPLES = 3
PEER_TIMEOUT_S = 900


def make_model_module():
    """bench/peers/make_model.py (a script directory, not a package)."""
    spec = importlib.util.spec_from_file_location("peers_make_model", PEERS_SRC / "make_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def folder(tmp_path_factory) -> Path:
    make_model = make_model_module()
    out = tmp_path_factory.mktemp("discovery_model")
    make_model.build_model(out, layers=2, heads=4, d_model=64, vocab=128, n_ctx=32, seed=0)
    make_model.make_prompts(out / "prompts.json", batch=8, tokens=10, vocab=128, changed=3, seed=1)
    return out


@pytest.fixture(scope="session")
def ac(folder, tmp_path_factory) -> dict:
    if not AC_PYTHON.exists():
        pytest.skip(f"auto-circuit venv not found at {AC_PYTHON.parent.parent}; create it with "
                    "`bench/peers/setup.sh ac`")
    out = tmp_path_factory.mktemp("ac_discovery") / "ac.json"
    flags = ["--eap", "--eap-ig", str(IG_SAMPLES)] + [a for tau in TAUS for a in ("--acdc", str(tau))]
    try:
        done = subprocess.run([str(AC_PYTHON), str(PEERS_SRC / "ac_discovery.py"), str(folder),
                               str(folder / "prompts.json"), str(out), *flags],
                              capture_output=True, text=True, cwd=REPO, timeout=PEER_TIMEOUT_S,
                              # auto-circuit orders a layer's edges by a set's iteration: fix the
                              # hash seed so the order (and any step near tau) is the same each run
                              env={**os.environ, "PYTHONHASHSEED": "0"})
    except subprocess.TimeoutExpired:
        pytest.fail(f"ac_discovery.py ran past {PEER_TIMEOUT_S} s")
    if done.returncode != 0:
        pytest.fail(f"ac_discovery.py failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="session")
def setup(folder):
    lm = load_model(str(folder))
    task = make_model_module().token_task(folder / "prompts.json", lm.tokenizer)
    return lm, task, task.prompts()  # every record, in file order


def _indices(problem: Problem, ac: dict) -> list[int]:
    """circuitlang's edge index of each of auto-circuit's edges (their list's order)."""
    by_name = {(str(s), str(r)): i for i, (s, r, _) in enumerate(problem.space.edges())}
    assert len(by_name) == ac["n_edges"] == len(problem.space)
    return [by_name[(e["sender"], e["receiver"])] for e in ac["edges"]]


def _close(ours, theirs, what: str) -> None:
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    gap = float(np.abs(ours - theirs).max())
    assert gap <= TOL, f"{what}: max gap {gap:.2e} (circuitlang {ours[:6]}..., auto-circuit {theirs[:6]}...)"


def test_eap_equals_auto_circuit_mask_gradients(ac, setup):
    lm, task, prompts = setup
    problem = Problem(lm, task, prompts, "logit_diff", "corrupt", batch_size=len(prompts.input_ids))
    ours = eap(problem).edges.double().numpy()[_indices(problem, ac)]
    theirs = -np.asarray(ac["eap"]["scores"])  # auto-circuit differentiates minus the metric
    _close(ours, theirs, "EAP scores")
    assert np.abs(theirs).max() > 1e-2  # the scores are not all (near) zero


def test_integrated_mask_gradients_equal_auto_circuit(ac, setup):
    lm, task, prompts = setup
    problem = Problem(lm, task, prompts, "logit_diff", "corrupt", batch_size=len(prompts.input_ids))
    n = ac["eap_ig"]["samples"]
    total = sum(problem.gradients(1.0 - k / n) for k in range(n + 1))  # ablated fraction k/n
    _close(total.numpy()[_indices(problem, ac)], -np.asarray(ac["eap_ig"]["scores"]), "integrated gradients")


@pytest.mark.parametrize("tau", TAUS)
def test_acdc_keeps_auto_circuits_edges(ac, setup, tau):
    lm, task, prompts = setup
    run = next(r for r in ac["acdc"] if r["tau"] == tau)
    problem = Problem(lm, task, prompts, "kl", "corrupt", batch_size=4 * len(prompts.input_ids))
    index = _indices(problem, ac)
    order = [index[i] for i in run["order"]]
    circuit, decisions = acdc(problem, tau, order=order)
    # the same KL at every step where both scored (circuitlang needs no pass where the
    # dead-node rule decides), then the same decisions
    scored = decisions.scored.numpy()
    _close(decisions.faith.numpy()[scored], np.asarray(run["faith"])[scored], f"ACDC faith at tau={tau}")
    gap = np.abs(_steps(run["faith"], tau) - tau).min()
    # the faiths agree to ~2e-7: a step farther than 1e-5 from tau is decided the same way
    assert gap > 1e-5, f"a step is {gap:.1e} from tau={tau}, within rounding: choose another tau"
    ours = set(circuit.nonzero()[:, 0].tolist())
    theirs = {index[i] for i in run["kept"]}
    assert ours == theirs
    assert 0 < len(theirs) < len(index)


def _steps(faiths: list[float], tau: float) -> np.ndarray:
    """auto-circuit's step at each trial, from its faith list: f minus the last accepted f."""
    prev, steps = 0.0, []
    for f in faiths:
        steps.append(f - prev)
        if f - prev < tau:
            prev = f
    return np.asarray(steps)
