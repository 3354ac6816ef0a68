"""Run options are checked before anything runs, the same way for the CLI and Python."""
from __future__ import annotations

import os

import pytest
import torch

from circuitlang import options
from circuitlang.errors import CircuitlangError
from circuitlang.options import OptionError


def test_option_errors_are_circuitlang_errors_with_a_hint():
    with pytest.raises(CircuitlangError) as info:
        options.check_n(0)
    assert isinstance(info.value, OptionError) and info.value.hint


@pytest.mark.parametrize("value, fragment", [
    (0, "-n must be at least 1 prompt, got 0"),
    (-5, "-n must be at least 1 prompt, got -5"),
    (1_000_000_000, "-n 1,000,000,000 is more prompts than the limit of 100,000"),
    (2.5, "-n must be a whole number, got 2.5"),
    (True, "-n must be a whole number, got True"),
    ("7", "-n must be a whole number, got '7'"),
])
def test_bad_prompt_counts(value, fragment):
    with pytest.raises(OptionError, match=fragment):
        options.check_n(value)


def test_the_prompt_limit_names_how_to_raise_it(monkeypatch):
    with pytest.raises(OptionError) as info:
        options.check_n(200_000)
    assert info.value.hint == "use fewer prompts, or raise the limit: CIRCUITLANG_MAX_PROMPTS=200000"
    monkeypatch.setenv("CIRCUITLANG_MAX_PROMPTS", "200000")
    assert options.check_n(200_000) == 200_000
    monkeypatch.setenv("CIRCUITLANG_MAX_PROMPTS", "lots")
    with pytest.raises(OptionError, match="CIRCUITLANG_MAX_PROMPTS='lots' is not a positive"):
        options.check_n(10)


def test_prompt_count_treats_only_none_as_not_given():
    assert options.prompt_count(None, None, 64) == 64
    assert options.prompt_count(None, 200, 64) == 200
    assert options.prompt_count(8, 200, 64) == 8
    with pytest.raises(OptionError, match="at least 1"):
        options.prompt_count(0, 200, 64)  # used to mean "the default" silently


@pytest.mark.parametrize("check, value, fragment", [
    (options.check_seed, -1, "--seed must be between 0 and 4,294,967,295, got -1"),
    (options.check_seed, 2**32, "--seed must be between 0 and 4,294,967,295"),
    (options.check_batch_size, 0, "--batch-size must be at least 1, got 0"),
    (options.check_permutations, -1, "--permutations must be between 0 and 10,000, got -1"),
    (options.check_max_examples, 0, "--max-examples must be between 1 and 100,000, got 0"),
])
def test_bad_numbers(check, value, fragment):
    with pytest.raises(OptionError, match=fragment):
        check(value)


def test_good_numbers_come_back():
    assert options.check_seed(0) == 0 and options.check_seed(2**32 - 1) == 2**32 - 1
    assert options.check_permutations(0) == 0
    assert options.check_batch_size(1) == 1 and options.check_max_examples(1) == 1


def test_devices_this_machine_lacks_are_an_option_error(monkeypatch):
    assert options.check_device(None) is None and options.check_device("cpu") == "cpu"
    with pytest.raises(OptionError, match="unknown device 'gpu7'"):
        options.check_device("gpu7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(OptionError, match="--device cuda: this torch") as info:
        options.check_device("cuda")
    assert "--device cpu" in info.value.hint
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert options.check_device("cuda:0") == "cuda:0"
    with pytest.raises(OptionError, match="this machine has 1 CUDA device "):
        options.check_device("cuda:3")


def test_output_paths_are_checked_before_the_run(tmp_path):
    assert options.check_output_path(tmp_path / "out.json") == tmp_path / "out.json"
    assert not list(tmp_path.iterdir())  # the probe leaves nothing behind
    with pytest.raises(OptionError, match="is a folder"):
        options.check_output_path(tmp_path)
    with pytest.raises(OptionError, match="does not exist"):
        options.check_output_path(tmp_path / "missing" / "out.json")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OptionError, match="is not a folder"):
        options.check_output_path(blocker / "out.json")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs a read-only /proc")
def test_an_unwritable_folder_is_found_by_trying():
    # /proc refuses new files even to root, whose permission bits say yes
    with pytest.raises(OptionError, match="cannot write there"):
        options.check_output_path("/proc/self/out.json")
