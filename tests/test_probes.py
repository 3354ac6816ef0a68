"""Linear probes (circuitlang/probes.py): planted features, the control task, toy-ioi's IO."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import circuitlang
from circuitlang.errors import ExecutionError
from circuitlang.probes import (
    PROBE_FORMAT,
    ProbeResult,
    control_labels,
    fit_ridge,
    is_scalar,
    load_probes,
    probe_layers,
    save_probes,
)


def _planted(n=400, d=32, seed=0):
    """States in which a categorical feature (4 classes) is exactly linear in layer 1 and
    absent from layer 0 (pure noise); each input has its own type (no repeats)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    directions = torch.linalg.qr(torch.randn(d, 4, generator=g, dtype=torch.float64))[0].T  # 4 orthonormal rows
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    layer1 = 0.3 * noise + 3.0 * directions[labels]
    layer0 = torch.randn(n, d, generator=g, dtype=torch.float64)
    return [layer0, layer1], labels.tolist(), directions


def test_planted_categorical_feature_is_found_and_the_control_stays_at_chance():
    states, labels, directions = _planted()
    found = probe_layers(states, labels, types=list(range(len(labels))), heldout=0.25)
    assert found["kind"] == "categorical"
    assert found["score"][1] >= 0.99
    assert found["score"][0] < 0.45  # no feature in layer 0: near chance (0.25)
    # every input is its own type, so control labels cannot be learned beyond chance
    assert found["control"][1] < 0.4 and found["control"][0] < 0.4
    assert found["selectivity"][1] > 0.6
    # the probe reads the planted subspace: its basis (the differences between classes'
    # weights: rank 3 for 4 classes) lies inside the span of the planted directions
    basis = found["probes"][1].basis()
    assert basis.shape[0] in (3, 4)
    inside = (basis @ directions.T).norm(dim=1)  # a random 3-d subspace of 32: ~0.35
    assert bool((inside > 0.8).all()), inside


def test_control_labels_are_consistent_per_type_and_drawn_from_the_labels():
    types = ["a", "b", "a", "c", "b", "a"]
    labels = [0, 1, 1, 2, 0, 1]
    control = control_labels(types, labels, seed=3)
    assert control[0] == control[2] == control[5] and control[1] == control[4]
    assert set(control) <= set(labels)
    # with few types a probe can memorise them: the control task is learnable on seen types
    states, real, _ = _planted(n=400)
    found = probe_layers(states, real, types=[i % 8 for i in range(400)], heldout=0.25)
    assert found["control"][1] < found["score"][1]


def test_planted_scalar_feature_uses_ridge_and_scores_r2():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 16, generator=g, dtype=torch.float64)
    w = torch.randn(16, generator=g, dtype=torch.float64)
    y = (x @ w + 2.0).tolist()
    assert is_scalar(y) and not is_scalar([0, 1, 2]) and not is_scalar([True, False] * 10)
    probe = fit_ridge(x[:200], y[:200])
    assert probe.score(x[200:], y[200:]) > 0.999
    found = probe_layers([x], y, types=list(range(300)))
    assert found["kind"] == "scalar" and found["score"][0] > 0.999
    assert found["control"][0] < 0.1  # random per-input values: no R² on held-out inputs


def test_probe_on_toy_ioi_io_at_end_beats_its_control(tmp_path):
    path = tmp_path / "io.safetensors"
    program = f'task ioi\nsamples 160\nprobe resid * at END for IO save "{path}"\n'
    (result,) = circuitlang.run(program, model="toy-ioi")
    assert isinstance(result, ProbeResult) and result.grid == (3,)
    score, control = np.asarray(result.values), np.asarray(result.extra["control"])
    assert score[-1] > 0.6 and score[-1] > control[-1] + 0.4
    assert score[-1] > score[0]  # IO is moved to END by the later layers, not there at embedding
    assert "selectivity" in result.render()
    back = ProbeResult.from_json(json.loads(json.dumps(result.to_json())))
    np.testing.assert_allclose(back.values, result.values)
    # the saved file reads back with the documented keys and metadata
    meta, probes = load_probes(path)
    assert meta["format"] == PROBE_FORMAT and meta["feature"] == "IO" and meta["site"] == "resid"
    assert sorted(probes) == [0, 1, 2]
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
        basis = fh.get_tensor("layer2.basis")
    assert {"layer2.weight", "layer2.bias", "layer2.basis"} <= keys
    assert torch.allclose(basis @ basis.T, torch.eye(basis.shape[0]), atol=1e-4)
    classes = json.loads(meta["classes"])
    assert probes[2].weight.shape == (len(classes), 64)


def test_bad_probe_inputs(tmp_path):
    with pytest.raises(ExecutionError, match="too few"):
        probe_layers([torch.zeros(2, 3)], [0, 1], [0, 1])
    with pytest.raises(ExecutionError, match="not a circuitlang probe file"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        load_probes(tmp_path / "other.safetensors")
    with pytest.raises(ExecutionError, match="no fitted probes"):
        save_probes(ProbeResult("probe", "", [], np.zeros(0), np.zeros(0), np.zeros((0, 0)), 0.0, 0.0),
                    tmp_path / "x.safetensors")


def test_a_file_saves_probes_only_beside_itself(tmp_path, capsys):
    from circuitlang.cli import main

    folder = tmp_path / "study"
    folder.mkdir()
    bad = folder / "bad.circ"
    bad.write_text('model toy-ioi\ntask ioi\nsamples 40\nprobe resid * at END for IO save "../io.safetensors"\n')
    assert main(["check", str(bad)]) == 2
    assert "leaves the hypothesis file's folder" in capsys.readouterr().err
    assert not (tmp_path / "io.safetensors").exists()
    good = folder / "good.circ"
    good.write_text('model toy-ioi\ntask ioi\nsamples 40\nprobe resid * at END for IO save "probes/io.safetensors"\n')
    assert main(["check", str(good)]) == 0
    assert "selectivity" in capsys.readouterr().out
    meta, probes = load_probes(folder / "probes" / "io.safetensors")
    assert meta["model"] == "toy-ioi" and len(probes) == 3
