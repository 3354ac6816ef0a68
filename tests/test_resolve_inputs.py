"""Resolving what a file asks of its task and of the file system: task parameters into
the IR, JSONL tasks next to the file, and what a file may read (docs/language.md)."""
from __future__ import annotations

import json
import os

import pytest

from circuitlang.ast_to_ir import resolve_text
from circuitlang.errors import ResolveError
from circuitlang.sites import ModelShape
from circuitlang.tasks import get_signature, load_task

SHAPE = ModelShape(n_layers=2, n_heads=4, d_model=16, d_head=4, name="tiny")
RECORD = {"clean": "a b c", "corrupt": "d e f", "answers": " x", "wrong_answers": " y",
          "positions": {"B": "b"}}


def _resolve(text, filename=None, task=None):
    return resolve_text(text, SHAPE, task, filename=filename)


# ------------------------------------------------------------------ task parameters


def test_task_parameters_become_part_of_the_hypothesis():
    h = _resolve("task induction vocab=32 length=20 prepend_bos=false\n"
                 "head 1.0 copies PREV+1 to END\n")
    assert h.task == "induction"
    assert h.task_params == (("length", 20), ("prepend_bos", False), ("vocab", 32))
    again = _resolve("task induction length=20 prepend_bos=false vocab=32\n"
                     "head 1.0 copies PREV+1 to END\n")
    assert again == h  # the order they are written in is layout


def test_list_parameters_are_tuples_in_the_ir():
    h = _resolve("task ioi templates=[0, 1] names=[Mary, John, Anna, Paul]\n"
                 "head 1.0 moves IO to END\n")
    assert dict(h.task_params) == {"templates": (0, 1), "names": ("Mary", "John", "Anna", "Paul")}


def test_every_bad_parameter_is_reported_at_its_place():
    text = ("task induction colour=3 length=2.5 n=10 vocab=32 vocab=16\n"
            "head 1.0 copies PREV+1 to END\n")
    with pytest.raises(ResolveError) as info:
        _resolve(text, "h.circ")
    found = [(d.span.column, d.message) for d in info.value.diagnostics]
    assert found == [
        (16, "task induction has no parameter 'colour'"),
        (25, "task induction parameter length must be a whole number, got 2.5 (decimal)"),
        (36, "n is a run option, not a parameter of task induction"),
        (50, "task parameter vocab is given twice"),
    ]
    assert info.value.diagnostics[0].hint.startswith("parameters of induction: length (int)")


def test_a_task_that_cannot_be_built_with_its_parameters_is_a_resolve_error():
    with pytest.raises(ResolveError, match="needs at least length\\+1 = 11 distinct tokens"):
        _resolve("task induction vocab=5\nhead 1.0 copies PREV+1 to END\n")


def test_another_task_on_the_command_line_drops_the_files_parameters():
    text = "task induction length=20\nhead 1.0 at END depends on IO\n"
    assert _resolve(text, task="ioi").task_params == ()
    kept = "task induction length=20\nhead 1.0 copies PREV+1 to END\n"
    assert _resolve(kept, task="induction").task_params == (("length", 20),)


@pytest.mark.parametrize("line, fragment", [
    ("seed 99999999999", "seed must be between 0 and 4,294,967,295, got 99,999,999,999"),
    ("samples 0", "samples must be at least 1 prompt, got 0"),
    ("samples 1000000", "samples 1,000,000 is more prompts than the limit of 100,000"),
])
def test_settings_are_checked_as_run_options(line, fragment):
    with pytest.raises(ResolveError, match=fragment):
        _resolve(f"task ioi\n{line}\nhead 1.0 moves IO to END\n")


# ------------------------------------------------------------------ JSONL tasks


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A hypothesis folder with a JSONL task in it, and a working directory elsewhere."""
    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "pairs.jsonl").write_text(json.dumps(RECORD) + "\n")
    (tmp_path / "outside.jsonl").write_text(json.dumps(RECORD) + "\n")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return folder


@pytest.mark.parametrize("line", ["task data/pairs.jsonl", 'task "data/pairs.jsonl"',
                                  'task custom path="data/pairs.jsonl"',
                                  'task custom path="data/pairs.jsonl" prepend_bos=false'])
def test_a_jsonl_task_is_read_next_to_the_file_and_can_be_built(project, line):
    h = _resolve(f"{line}\nhead 1.0 at B depends on prompt\n", str(project / "h.circ"))
    params = dict(h.task_params)
    assert h.task == "custom"
    assert params["path"] == str((project / "data" / "pairs.jsonl").resolve())
    # what the checker does with it: this failed with "the custom task needs path=..."
    task = load_task(h.task, **params)
    assert task.SIGNATURE.positions == ("B", "END")


@pytest.mark.parametrize("line", ["task data/../../outside.jsonl", 'task "../outside.jsonl"',
                                  'task custom path="../outside.jsonl"'])
def test_a_task_file_outside_the_files_folder_is_refused(project, line):
    with pytest.raises(ResolveError) as info:
        _resolve(f"{line}\nhead 1.0 at B depends on prompt\n", str(project / "h.circ"))
    err = info.value
    assert err.message.startswith("cannot read task file: ")
    assert "lies outside the folder this file may read" in err.message
    assert "--task PATH" in err.hint and err.span.line == 1


def test_a_symlink_to_a_task_file_elsewhere_is_refused(project):
    (project / "link.jsonl").symlink_to(project.parent / "outside.jsonl")
    with pytest.raises(ResolveError, match="it resolves to .*outside.jsonl"):
        _resolve("task link.jsonl\nhead 1.0 at B depends on prompt\n", str(project / "h.circ"))


def test_a_task_file_must_be_jsonl(project):
    (project / "secret.txt").write_text("x")
    with pytest.raises(ResolveError, match="must be a .jsonl or .json file"):
        _resolve('task custom path="secret.txt"\nhead 1.0 at END depends on prompt\n',
                 str(project / "h.circ"))


def test_a_path_on_the_command_line_is_the_users_to_choose(project):
    outside = str(project.parent / "outside.jsonl")
    h = _resolve("task ioi\nhead 1.0 at B depends on prompt\n", str(project / "h.circ"),
                 task=outside)
    assert dict(h.task_params)["path"] == outside


def test_text_without_a_file_reads_relative_to_the_working_directory(project):
    os.chdir(project)
    h = _resolve("task data/pairs.jsonl\nhead 1.0 at B depends on prompt\n")
    assert dict(h.task_params)["path"] == str((project / "data" / "pairs.jsonl").resolve())
    with pytest.raises(ResolveError, match="lies outside"):
        _resolve('task "../outside.jsonl"\nhead 1.0 at B depends on prompt\n')


# ------------------------------------------------------------------ use


def test_use_follows_no_symlink_out_of_the_files_folder(project):
    (project.parent / "evil.circ").write_text("group g = heads 1.0\n")
    (project / "evil.circ").symlink_to(project.parent / "evil.circ")
    (project / "fine.circ").write_text("group g = heads 1.1\n")
    (project / "alias.circ").symlink_to(project / "fine.circ")
    task = get_signature("ioi")
    h = resolve_text("use alias\ng at END depends on IO\n", SHAPE, task,
                     filename=str(project / "h.circ"))
    assert [c.site.head for c in h.claims] == [1]
    with pytest.raises(ResolveError) as info:
        resolve_text("use evil\ng at END depends on IO\n", SHAPE, task,
                     filename=str(project / "h.circ"))
    assert info.value.diagnostics[0].code == "resolve.import_outside"
    assert "cannot import evil: evil.circ lies outside" in info.value.message


def test_an_imported_file_that_is_not_utf8_is_a_resolve_error(project):
    (project / "latin.circ").write_bytes("# caf\xe9\ngroup g = heads 1.0\n".encode("latin-1"))
    with pytest.raises(ResolveError, match="is not UTF-8 text"):
        resolve_text("use latin\ng at END depends on IO\n", SHAPE, get_signature("ioi"),
                     filename=str(project / "h.circ"))
