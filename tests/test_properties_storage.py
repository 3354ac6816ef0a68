"""The property search keeps `hypothesis`'s files out of the user's working directory."""
from __future__ import annotations

import types

from hypothesis.configuration import storage_directory

from circuitlang import properties


def test_the_search_storage_is_the_users_cache_not_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("HYPOTHESIS_STORAGE_DIRECTORY", raising=False)
    monkeypatch.setenv("CIRCUITLANG_CACHE_DIR", str(tmp_path / "cache"))
    before = storage_directory("constants").path
    with properties._search_storage():
        assert storage_directory("constants").path == tmp_path / "cache" / "hypothesis" / "constants"
    assert storage_directory("constants").path == before
    monkeypatch.delenv("CIRCUITLANG_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert properties.search_storage_dir() == tmp_path / "xdg" / "circuitlang" / "hypothesis"


def test_a_storage_directory_the_user_chose_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("HYPOTHESIS_STORAGE_DIRECTORY", str(tmp_path / "mine"))
    monkeypatch.setenv("CIRCUITLANG_CACHE_DIR", str(tmp_path / "cache"))
    with properties._search_storage():
        assert not str(storage_directory("x").path).startswith(str(tmp_path / "cache"))


def test_the_counterexample_search_runs_inside_it(tmp_path, monkeypatch):
    import hypothesis
    from hypothesis.errors import NoSuchExample

    monkeypatch.delenv("HYPOTHESIS_STORAGE_DIRECTORY", raising=False)
    monkeypatch.setenv("CIRCUITLANG_CACHE_DIR", str(tmp_path / "cache"))
    seen = []

    def fake_find(*args, **kwargs):
        seen.append(storage_directory("constants").path)
        raise NoSuchExample("x")

    monkeypatch.setattr(hypothesis, "find", fake_find)
    task = types.SimpleNamespace(strategy=lambda: None)
    scrubber = types.SimpleNamespace(task=task, prompts=types.SimpleNamespace(specs=()))
    expectation = types.SimpleNamespace(text="expect each logit_diff > 0")
    assert properties._search_counterexample(expectation, scrubber, None, 0, 3) is None
    assert seen == [tmp_path / "cache" / "hypothesis" / "constants"]
    assert storage_directory("constants").path != seen[0]  # and only inside it
