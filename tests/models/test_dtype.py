"""Half-precision weights give fp32's numbers within stated tolerances, with fp32 metrics.

The embedded toy-ioi model is loaded in float32, bfloat16 and float16 (`dtype=`); a
check (clean, scrubbed, random, % recovered), a head sweep at END and EAP scores over
every edge are compared with float32's. The tolerances (docs/models.md states the same):

* metric values (clean, scrubbed, random, each swept head): within `METRIC_TOL[dtype]`
  times the clean-vs-random gap of the float32 check;
* % recovered, and the sweep's normalised effects: within `METRIC_TOL[dtype]` absolute;
* EAP scores: within `EAP_TOL[dtype]` times the largest |score|, and the top-10 edges
  mostly the same.

Measured on this model (n = 32): bf16 differs by about 1e-3 of the gap and 1.4% of the
largest EAP score, fp16 by about 2e-4 and 0.2%; the tolerances leave 5-10x room. Metrics,
scores and means are fp32 (or fp64) whatever the weights are.

The same tests run on CUDA (marked `gpu`; skipped where there is no CUDA device).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import circuitlang
from circuitlang.cli import main
from circuitlang.models import load_model

METRIC_TOL = {"bfloat16": 1e-2, "float16": 2e-3}
EAP_TOL = {"bfloat16": 5e-2, "float16": 1e-2}
N = 32


def _numbers(model) -> dict:
    check = circuitlang.check("stdlib/toy_ioi.circ", model=model, n=N, permutations=0, breakdown=False,
                              max_examples=3)
    sweep = circuitlang.run("patch head * at END", model=model, task="ioi", n=N)[0]
    found = circuitlang.discover(model=model, task="ioi", method="eap", n=16, edges=10, with_curve=False,
                                 check=False)
    return {"check": check, "sweep": sweep, "eap": found.scores.edges}


@pytest.fixture(scope="module")
def reference():
    return {}


def _reference(cache: dict, device: str) -> dict:
    if device not in cache:
        cache[device] = _numbers(load_model("toy-ioi", device=device))
    return cache[device]


DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", sorted(METRIC_TOL))
def test_half_precision_matches_float32_within_tolerance(reference, device, dtype):
    want = _reference(reference, device)
    model = load_model("toy-ioi", device=device, dtype=dtype)
    assert model.dtype == getattr(torch, dtype) and model.run(torch.tensor([[1, 2, 3]])).logits.dtype == model.dtype
    got = _numbers(model)
    tol = METRIC_TOL[dtype]
    base = want["check"]
    gap = abs(base.clean.value - base.random.value)
    for part in ("clean", "scrubbed", "random"):
        assert abs(getattr(got["check"], part).value - getattr(base, part).value) <= tol * gap, part
    assert abs(got["check"].recovered.value - base.recovered.value) <= tol
    assert np.abs(got["sweep"].values - want["sweep"].values).max() <= tol * gap
    assert np.abs(got["sweep"].normalized - want["sweep"].normalized).max() <= tol
    scores = got["eap"]
    assert scores.dtype in (torch.float32, torch.float64)  # accumulated in fp32 or wider
    largest = want["eap"].abs().max()
    assert (scores.cpu() - want["eap"].cpu()).abs().max() <= EAP_TOL[dtype] * largest
    top = set(scores.abs().argsort(descending=True)[:10].tolist())
    assert len(top & set(want["eap"].abs().argsort(descending=True)[:10].tolist())) >= 8


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_metrics_are_fp32_on_half_precision_logits(dtype):
    from circuitlang.tasks import load_task

    model = load_model("toy-ioi", dtype=dtype)
    task = load_task("ioi", tokenizer=model.tokenizer)
    prompts = task.prompts(4, 0)
    logits = model.run(prompts.input_ids, prompts.attention_mask).logits
    assert logits.dtype == getattr(torch, dtype)
    for metric in ("logit_diff", "prob_diff", "loss"):
        values = task.metric(metric, logits, prompts)
        assert values.dtype == torch.float32, metric
        exact = task.metric(metric, logits.double(), prompts)
        torch.testing.assert_close(values.double(), exact.double(), rtol=0, atol=1e-4)


def test_dtype_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "bf16.json"
    code = main(["check", "stdlib/toy_ioi.circ", "--dtype", "bfloat16", "-n", "16", "--permutations", "0",
                 "--no-breakdown", "--max-examples", "3", "-q", "--json", str(out)])
    assert code in (0, 1), capsys.readouterr().err
    assert out.is_file()
    with pytest.raises(SystemExit) as info:  # argparse's own exit for a choice it does not offer
        main(["check", "stdlib/toy_ioi.circ", "--dtype", "int8"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("argv", [["--device", "cuda"], ["--device", "cuda:3"], ["--device", "tpu"],
                                  ["--device-map", "auto", "--device", "cpu"], ["--offload-folder", "x"]])
def test_devices_this_machine_lacks_are_exit_2(argv, capsys):
    for command in (["check", "stdlib/toy_ioi.circ"], ["discover", "--task", "ioi", "--model", "toy-ioi"],
                    ["draw", "stdlib/toy_ioi.circ", "--check", "-o", "x.svg"]):
        code = main(command + argv)
        err = capsys.readouterr().err
        assert code == 2 and "error" in err and "Traceback" not in err, (command, argv, err)


def test_python_refuses_a_dtype_a_loaded_model_does_not_have():
    model = load_model("toy-ioi")
    with pytest.raises(circuitlang.CircuitlangError, match="already loaded"):
        circuitlang.check("stdlib/toy_ioi.circ", model=model, dtype="bfloat16", n=4, permutations=0)
    with pytest.raises(circuitlang.CircuitlangError, match="unknown dtype"):
        circuitlang.check("stdlib/toy_ioi.circ", model="toy-ioi", dtype="int4", n=4, permutations=0)


def test_the_command_line_and_the_loader_offer_the_same_device_map_plans():
    from circuitlang.cli.lang import DEVICE_MAP_PLANS
    from circuitlang.models import load

    assert DEVICE_MAP_PLANS == load.DEVICE_MAP_PLANS
