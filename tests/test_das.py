"""Subspaces through the language, on toy-ioi: `align` learns and saves a basis that later
statements patch and ablate; a full-rank subspace patches as the whole stream does; a fixed
basis file's problems are resolve errors; claims on a subspace are refused at lowering.
(DAS recovering a planted direction is tests/models/test_subspace.py.)"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import circuitlang
from circuitlang.errors import LowerError, ResolveError

D = 64  # toy-ioi's width


def _basis(path, b: torch.Tensor, key: str = "basis") -> None:
    from safetensors.torch import save_file

    save_file({key: b.float().contiguous()}, str(path))


def test_align_saves_a_basis_that_later_statements_use(tmp_path):
    from safetensors import safe_open

    from circuitlang.das import AlignResult
    from circuitlang.experiments import experiment_from_json

    circ = tmp_path / "io.circ"
    circ.write_text("model toy-ioi\ntask ioi\nsamples 80\n"
                    "align io at resid 2 at END with IO dims 4 steps 20 pairs 60\n"
                    "patch subspace io at END\nablate subspace io with mean at END\n")
    align, patch, ablate = circuitlang.run(circ)
    assert isinstance(align, AlignResult)
    assert align.extra["train_pairs"] + align.extra["heldout_pairs"] == 60
    assert 0.0 <= float(align.values[0]) <= 1.0 and "IIA" in align.render()
    with safe_open(str(tmp_path / "io.safetensors"), framework="pt") as fh:
        meta, b = fh.metadata(), fh.get_tensor("basis")
    assert meta["format"] == "circuitlang-subspace/1" and meta["feature"] == "IO" and b.shape == (D, 4)
    torch.testing.assert_close(b.T @ b, torch.eye(4), atol=1e-5, rtol=0)
    assert np.isfinite(patch.normalized).all() and np.isfinite(ablate.normalized).all()
    assert str(patch.sites[0]) == "subspace io"
    back = experiment_from_json(json.loads(json.dumps(align.to_json())))
    assert isinstance(back, AlignResult) and back.extra["saved"] == str(tmp_path / "io.safetensors")


def test_a_full_rank_subspace_patches_as_the_whole_stream(tmp_path):
    q = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0)))[0]
    _basis(tmp_path / "all.safetensors", q)
    circ = tmp_path / "all.circ"
    circ.write_text('model toy-ioi\ntask ioi\nsamples 24\nsubspace all = "all.safetensors" at resid 1\n'
                    "patch subspace all at END\npatch resid 1 at END\n")
    sub, whole = circuitlang.run(circ)
    np.testing.assert_allclose(sub.per_prompt, whole.per_prompt, atol=1e-3)


def test_subspace_claims_and_edges_are_checked(tmp_path):
    """A subspace is a scrubbing node (tests/checker/test_unit_claims.py has the numbers):
    claims on it and edges from it are checked; a subspace of a head's output receives
    what its head reads, so only from senders of earlier layers."""
    _basis(tmp_path / "s.safetensors", torch.linalg.qr(torch.randn(D, 8, generator=torch.Generator().manual_seed(0)))[0])
    circ = tmp_path / "claim.circ"
    circ.write_text('model toy-ioi\ntask ioi\nsamples 16\nsubspace s = "s.safetensors" at resid 2\n'
                    "subspace s at END depends on IO\nsubspace s -> head 2.1.q at END\n"
                    "head 2.1 at END depends on IO\n")
    result = circuitlang.check(circ)
    assert dict(result.remainder)["head 2.1 at END"][0] == "q: all but subspace s at END"
    assert dict(result.remainder)["logits"] == ["stream: all but head 2.1 at END"]  # it feeds 2.1 only
    assert abs(result.claims[1].cost) > 1e-3  # what it gives 2.1.q matters
    circ.write_text('model toy-ioi\ntask ioi\nsamples 16\nsubspace s = "s.safetensors" at head 2.0\n'
                    "head 1.0 -> subspace s at END\nsubspace s at END depends on IO\n")
    result = circuitlang.check(circ)
    assert dict(result.remainder)["subspace s at END"] == [
        "q: all but head 1.0 at END", "k: all but head 1.0 at END", "v: all but head 1.0 at END"]
    circ.write_text('model toy-ioi\ntask ioi\nsubspace s = "s.safetensors" at head 2.0\n'
                    "head 2.1 -> subspace s at END\n")
    with pytest.raises(ResolveError, match="a head reads only senders of earlier layers "
                       r"\(subspace s is part of head 2.0's output\)"):
        circuitlang.check(circ)


@pytest.mark.parametrize(("write", "message"), [
    (lambda p: _basis(p, torch.eye(D)[:, :1], key="weights"), "has no tensor 'basis'"),
    (lambda p: _basis(p, 2 * torch.eye(D)[:, :1]), "not orthonormal"),
    (lambda p: _basis(p, torch.eye(D + 1)[:, :1]), "65 wide, the model's states are 64"),
    (lambda p: p.write_bytes(b"\x80\x04K\x01."), "is a pickle"),
])
def test_fixed_basis_problems_are_resolve_errors(tmp_path, write, message):
    write(tmp_path / "b.safetensors")
    circ = tmp_path / "bad.circ"
    circ.write_text('model toy-ioi\ntask ioi\nsubspace b = "b.safetensors" at resid 1\npatch subspace b at END\n')
    with pytest.raises(ResolveError, match=message) as info:
        circuitlang.check(circ)
    assert "bad.circ:3:1" in info.value.render()


def test_a_probe_file_is_a_subspace(tmp_path):
    """`probe ... save` then `subspace ... = that file at resid L` reads `layer{L}.basis`."""
    circ = tmp_path / "p.circ"
    circ.write_text('model toy-ioi\ntask ioi\nsamples 60\nprobe resid * at END for IO save "io.safetensors"\n')
    circuitlang.run(circ)
    circ.write_text('model toy-ioi\ntask ioi\nsamples 16\nsubspace io = "io.safetensors" at resid 2\n'
                    "patch subspace io at END\n")
    (patch,) = circuitlang.run(circ)
    assert np.isfinite(patch.normalized).all()


def test_the_permutation_null_draws_random_subspaces_for_a_basis_align_learns():
    """A claim on a subspace the same file's `align` learns is compared with random
    subspaces of the same place and dimension (the `dims` the resolver already knows),
    as a claim on a basis read from a file is: the null never reuses the learned basis."""
    from circuitlang.ast_to_ir import resolve_text
    from circuitlang.models import known_shape
    from circuitlang.sites import Subspace
    from circuitlang.variants import random_circuits

    shape = known_shape("toy-ioi")
    h = resolve_text("task ioi\nalign io at resid 2 at END with IO dims 2\nsubspace io at END depends on IO\n",
                     shape, filename="/nowhere/h.circ")
    drawn = random_circuits(h, shape, 5, seed=0)
    assert len(drawn.hypotheses) == 5
    seeds = set()
    for circuit in drawn.hypotheses:
        (site,) = [c.site for c in circuit.claims]
        assert isinstance(site, Subspace) and site.basis.k == 2 and site.basis.layer == 2
        seeds.add(site.basis.seed)
    assert None not in seeds and len(seeds) == 5
