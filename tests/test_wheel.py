"""The built wheel ships the grammar and the stdlib.

Builds a wheel with `python -m build --wheel`, installs it into a fresh virtual
environment outside the repository (no dependencies downloaded: the venv sees the
system's packages, and the wheel itself is installed with --no-deps), and parses
and resolves a stdlib file from there, with the repository out of reach.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytest.importorskip("build", reason="the `build` package (test extra) is not installed")
# Building, making a venv and installing take well over a minute on two cores.
pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory) -> Path:
    """A venv outside the repo with the freshly built wheel installed; its python."""
    work = tmp_path_factory.mktemp("wheel")
    # build from a copy, so the build writes nothing into the working tree
    source = work / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", ".hypothesis", ".pytest_cache", "__pycache__",
        ".venv*", "tests", "bench"))
    if not (source / "README.md").exists():  # pyproject names it; its text is not tested here
        (source / "README.md").write_text("circuitlang\n")
    dist = work / "dist"
    # No build isolation (nothing is downloaded); setuptools>=70.1 builds wheels without
    # the separate `wheel` package, so the declared requirement is not checked.
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
          "--skip-dependency-check", "--outdir", str(dist), str(source)], cwd=work, timeout=300)
    (wheel,) = dist.glob("circuitlang-*.whl")
    env = work / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env)
    python = env / "bin" / "python"
    # When the tests themselves run in a venv, its packages (torch, lark, ...) are not the
    # system's: let the new venv see them too, after its own (a plain path line, so the
    # editable install's finder there is not run and circuitlang comes from the wheel).
    here = [p for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])]
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "_circuitlang_test_parent.pth").write_text("\n".join(dict.fromkeys(here)) + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
          str(wheel)], cwd=work)
    return python


def test_wheel_contains_grammar_and_stdlib(installed_wheel: Path):
    script = textwrap.dedent("""
        import circuitlang, pathlib
        from circuitlang.resources import grammar_dir, stdlib_dir
        print(circuitlang.__file__)
        print(grammar_dir())
        print(sorted(p.name for p in stdlib_dir().glob("*.circ")))
    """)
    out = _run([str(installed_wheel), "-c", script], cwd=installed_wheel.parent.parent).stdout
    module, grammar, stdlib = out.strip().split("\n")
    venv_root = str(installed_wheel.parent.parent)
    assert module.startswith(venv_root), "imported circuitlang from outside the venv"
    assert grammar.startswith(venv_root) and grammar.endswith("_grammar"), grammar
    assert "'prelude.circ'" in stdlib


def test_installed_package_parses_and_resolves_a_stdlib_file(installed_wheel: Path):
    script = textwrap.dedent("""
        import circuitlang
        from circuitlang.ast_to_ir import resolve
        from circuitlang.resources import stdlib_dir
        from circuitlang.sites import ModelShape
        from circuitlang.tasks.signature import TaskSignature

        text = (stdlib_dir() / "prelude.circ").read_text()
        program = circuitlang.parse(text, "prelude.circ")
        assert circuitlang.parse(circuitlang.format(program)) == program
        shape = ModelShape(n_layers=12, n_heads=12, d_model=768, d_head=64, name="gpt2")
        task = TaskSignature("ioi", ("IO", "S1", "S2", "END"), ("IO", "S"), ("logit_diff",),
                             "logit_diff", (("name", "IO"),))
        user = circuitlang.parse("use stdlib.prelude\\nhead 9.6 moves name to END\\n")
        hypothesis = resolve(user, shape, task)
        print(len(program.statements), hypothesis.claims[0].verb)
    """)
    out = _run([str(installed_wheel), "-c", script], cwd=installed_wheel.parent.parent).stdout
    count, verb = out.split(maxsplit=1)
    assert int(count) >= 5
    assert verb.strip() == "$h moves $x to $p"
