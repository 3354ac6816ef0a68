"""Batch sizes from a memory budget (`circuitlang.models.memory`): free memory measured,
a row's cost estimated, the budget respected, and the API edge using it when no batch
size is given."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import circuitlang
from circuitlang.models import load_model, memory
from circuitlang.models.memory import choose_batch_size, free_memory, row_bytes


@pytest.fixture(scope="module")
def toy_ioi():
    return load_model("toy-ioi", device="cpu")


@pytest.fixture(scope="module")
def toy_induction():
    return load_model("toy-induction", device="cpu")


def test_free_memory_on_the_cpu_is_measured(monkeypatch, tmp_path):
    free = free_memory("cpu")
    if not Path("/proc/meminfo").is_file():
        pytest.skip("no /proc/meminfo here")
    assert free is not None and free > 0
    # without psutil, MemAvailable is read (in kB)
    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    1234567 kB\n")
    monkeypatch.setattr(memory, "_MEMINFO", fake)
    monkeypatch.setitem(__import__("sys").modules, "psutil", None)
    assert free_memory("cpu") == 1234567 * 1024


def test_a_row_costs_more_with_tokens_gradients_and_senders(toy_ioi):
    shape, small = toy_ioi.shape, row_bytes(toy_ioi.shape, 8)
    assert row_bytes(shape, 16) > small
    assert row_bytes(shape, 8, grad=True) > small
    assert row_bytes(shape, 8, edges=True) > small
    assert row_bytes(shape, 8, torch.bfloat16) < small
    # the logits alone: 8 positions x the vocabulary, in fp32 and their metric copies
    assert small >= 8 * shape.vocab_size * 4


@pytest.mark.parametrize("budget_rows", [1, 3, 10])
def test_the_batch_fits_a_given_budget(toy_ioi, budget_rows):
    per_row = row_bytes(toy_ioi.shape, 12, grad=True, edges=True)
    plan = choose_batch_size(toy_ioi, 12, grad=True, edges=True, cap=64, budget=budget_rows * per_row + per_row // 2)
    assert plan.size == budget_rows and plan.size * plan.row_bytes <= plan.budget
    assert "batch" in plan.describe()


def test_the_cap_bounds_it_and_one_row_always_runs(toy_ioi):
    assert choose_batch_size(toy_ioi, 12, cap=5, budget=10**15).size == 5
    assert choose_batch_size(toy_ioi, 12, cap=64, budget=1).size == 1


def test_measured_free_memory_decides_and_a_fraction_of_it_is_used(toy_ioi, monkeypatch):
    per_row = row_bytes(toy_ioi.shape, 10)
    monkeypatch.setattr(memory, "free_memory", lambda device: 20 * per_row)
    plan = choose_batch_size(toy_ioi, 10, cap=64)
    assert plan.free == 20 * per_row and plan.size == int(20 * per_row * memory.FRACTION["cpu"]) // per_row
    monkeypatch.setattr(memory, "free_memory", lambda device: None)  # nothing to measure: the cap
    assert choose_batch_size(toy_ioi, 10, cap=7).size == 7


def test_check_and_discover_take_the_batch_size_from_memory(toy_induction, monkeypatch):
    """With no batch size given, the API edge asks the memory budget (here: room for 3
    rows) and the numbers are those of an explicit batch of that size."""
    seen = []
    real = memory.choose_batch_size

    def three_rows(model, tokens, **kw):
        per_row = memory.row_bytes(model.shape, tokens, model.dtype, grad=kw.get("grad", False),
                                   edges=kw.get("edges", False))
        plan = real(model, tokens, budget=3 * per_row, **kw)
        seen.append(plan.size)
        return plan

    monkeypatch.setattr(memory, "choose_batch_size", three_rows)
    text = "task induction\nmetric logit_diff\nhead 1.0 moves next to END\n"
    auto = circuitlang.check(text, model=toy_induction, n=8, permutations=0, breakdown=False)
    assert seen == [3]
    fixed = circuitlang.check(text, model=toy_induction, n=8, permutations=0, breakdown=False, batch_size=3)
    assert auto.scrubbed.value == pytest.approx(fixed.scrubbed.value, abs=1e-6)
    found = circuitlang.discover(model=toy_induction, task="induction", method="eap", n=6, edges=4,
                                 with_curve=False, check=False, task_params={"length": 6})
    assert seen[-1] == 3
    explicit = circuitlang.discover(model=toy_induction, task="induction", method="eap", n=6, edges=4,
                                    with_curve=False, check=False, task_params={"length": 6}, batch_size=3)
    torch.testing.assert_close(found.scores.edges, explicit.scores.edges)


@pytest.mark.parametrize("width, layers, measured_mib", [(512, 8, 98), (1024, 8, 317), (2048, 16, 3730)])
def test_the_edge_estimate_covers_measured_eap_peaks(width, layers, measured_mib):
    """Peak memory a row of EAP over every edge took on CPU (Llama shapes, 32 tokens, fp32;
    bench/results/scale.json for the 2048 x 16 one): the estimate covers it, by at most 30%."""
    from circuitlang.sites import ModelShape

    shape = ModelShape(n_layers=layers, n_heads=width // 64, d_model=width, d_head=64,
                       n_kv_heads=max(1, width // 256), vocab_size=32000, n_ctx=256, has_mlp=True,
                       parallel_residual=False, architecture="llama", name="llama-shape", d_mlp=4 * width)
    estimate = row_bytes(shape, 32, grad=True, edges=True) / 2**20
    assert measured_mib <= estimate <= 1.3 * measured_mib
