"""Every story in examples/ runs, and prints what its README says it prints.

Each examples/*/README.md holds its commands in ```console blocks: a line `$ COMMAND` is
run (in bash, from a scratch folder where `examples` and `stdlib` point into the repo),
and the lines after it, up to the next command, are what it must print: each, with runs
of spaces collapsed, must appear in the command's output (stdout and stderr), in that
order. A command ending in `# exit N` must exit N; any other must exit 0. ```sh blocks
(commands that need the hub or a peer tool) are not run.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
STORIES = sorted(p.parent.name for p in EXAMPLES.glob("*/README.md"))
TL_PYTHON = ROOT / ".peers" / "tl" / "bin" / "python"


@dataclass
class Command:
    line: str
    exit_code: int = 0
    expected: list[str] = field(default_factory=list)


def _squash(text: str) -> str:
    return " ".join(text.split())


def console_commands(readme: str) -> list[Command]:
    """The `$ ` commands of a README's console blocks, each with the lines it must print."""
    commands: list[Command] = []
    for block in re.findall(r"^```console\n(.*?)^```", readme, re.M | re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                text, _, status = line[2:].partition("  # exit ")
                commands.append(Command(text.strip(), int(status) if status else 0))
            elif line.strip():
                commands[-1].expected.append(_squash(line))
    return commands


def missing_lines(expected: list[str], output: str) -> list[str]:
    """The expected lines not found in `output`, in order (each after the previous one)."""
    lines = [_squash(line) for line in output.splitlines()]
    at, missing = 0, []
    for want in expected:
        hit = next((i for i in range(at, len(lines)) if want in lines[i]), None)
        if hit is None:
            missing.append(want)
        else:
            at = hit + 1
    return missing


def _run(command: Command, cwd: Path) -> subprocess.CompletedProcess:
    # the console commands as a user types them, with this interpreter standing in
    shell = re.sub(r"^circuitlang ", f"{sys.executable} -m circuitlang ", command.line)
    shell = re.sub(r"^python ", f"{sys.executable} ", shell)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run(["bash", "-c", shell], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def test_the_runner_matches_in_order_and_reads_exit_codes():
    readme = "text\n```console\n$ a  # exit 1\nx   y\n\n$ b\n```\n```sh\n$ never\n```\n"
    commands = console_commands(readme)
    assert [(c.line, c.exit_code, c.expected) for c in commands] == [("a", 1, ["x y"]), ("b", 0, [])]
    assert missing_lines(["x y", "z"], "x    y\nz\n") == []
    assert missing_lines(["z", "x y"], "x y\nz\n") == ["x y"]  # order matters


def test_every_story_has_a_readme_with_commands():
    assert {"induction", "ioi", "greater_than", "docstring", "holes", "python",
            "transformerlens", "notebook"} <= set(STORIES)
    for story in STORIES:
        if story == "notebook":  # executed by tests/test_notebook.py
            continue
        assert console_commands((EXAMPLES / story / "README.md").read_text()), story


@pytest.mark.slow
@pytest.mark.parametrize("story", [s for s in STORIES if s != "notebook"])
def test_story_prints_what_its_readme_says(story, tmp_path):
    for name in ("examples", "stdlib"):
        (tmp_path / name).symlink_to(ROOT / name)
    for command in console_commands((EXAMPLES / story / "README.md").read_text()):
        done = _run(command, tmp_path)
        output = done.stdout + done.stderr
        assert done.returncode == command.exit_code, f"$ {command.line}\n{output[-3000:]}"
        missing = missing_lines(command.expected, output)
        assert not missing, f"$ {command.line}: not printed (in order): {missing}\n{output[-3000:]}"


@pytest.mark.optional
def test_transformerlens_side_prints_the_same_grid(tmp_path):
    if not TL_PYTHON.exists():
        pytest.skip(f"TransformerLens venv not found at {TL_PYTHON.parent.parent} (bench/peers/setup.sh tl)")
    (tmp_path / "examples").symlink_to(EXAMPLES)
    ours = _run(Command("python examples/transformerlens/with_circuitlang.py prompts.json"), tmp_path)
    assert ours.returncode == 0, ours.stderr[-3000:]
    theirs = subprocess.run([str(TL_PYTHON), str(EXAMPLES / "transformerlens" / "with_transformerlens.py"),
                             "prompts.json"], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert theirs.returncode == 0, theirs.stderr[-3000:]

    def grid(text):
        return [[float(v) for v in line.split()[1:]] for line in text.splitlines()
                if re.match(r"\s+L\d+ ", line)]

    a, b = grid(ours.stdout), grid(theirs.stdout)
    assert a and len(a) == len(b)
    assert max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)) <= 1e-3  # printed to 3 places
