"""Shared pytest configuration: markers that skip with a reason instead of failing."""
from __future__ import annotations

import os

import pytest

# No hub here: make a hub lookup fail at once instead of retrying for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Property tests draw the same examples on every run by default (CI stays a function
# of the commit), and write no example database into the tree.
# CIRCUITLANG_HYPOTHESIS_PROFILE=explore draws new examples each run, to hunt for bugs.
from hypothesis import settings  # noqa: E402

settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("CIRCUITLANG_HYPOTHESIS_PROFILE", "repeatable"))


def pytest_configure(config):
    # The test models are tiny: on a 2-core machine torch's intra-op threads cost more
    # than they save (and contend with anything else running), so tests run on one.
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a core dependency
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present on this machine")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
