"""Fixtures for checker tests: the hand-planted induction model and its task."""
from __future__ import annotations

import pytest

from circuitlang.models import LoadedModel
from circuitlang.tasks import load_task

from planted import planted_model, planted_tokenizer


@pytest.fixture(scope="session")
def planted():
    tok = planted_tokenizer()
    return LoadedModel.from_hf(planted_model(), tok, name="planted-induction")


@pytest.fixture(scope="session")
def induction_task(planted):
    return load_task("induction", tokenizer=planted.tokenizer, length=8)
