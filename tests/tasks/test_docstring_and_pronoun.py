"""Docstring and gendered-pronoun prompts with the real GPT-2 tokenizer."""
from __future__ import annotations

import pytest

from circuitlang.errors import TaskError
from circuitlang.tasks import load_task
from circuitlang.tasks.docstring import DocstringSpec
from circuitlang.tasks.gendered_pronoun import PronounSpec


def test_docstring_prompt_matches_the_paper_example():
    spec = DocstringSpec(fn="port", args=("load", "size", "files", "last"),
                         desc=("oil", "column", "piece"),
                         param_desc=(("crime", "population"), ("unit", "dark")))
    assert spec.text == (
        'def port(self, load, size, files, last):\n    """oil column piece\n\n'
        "    :param load: crime population\n    :param size: unit dark\n    :param")
    assert spec.answer_texts() == (" files",)
    assert spec.wrong_answer_texts() == (" load", " size", " last")


@pytest.mark.parametrize("corruption", ["random_random", "random_def", "random_doc"])
def test_docstring_positions_and_corruptions(gpt2_tokenizer, corruption):
    tok = gpt2_tokenizer
    task = load_task("docstring", tok, n=20, corruption=corruption)
    prompts = task.prompts()
    assert prompts.dropped.count == 0
    for i, (spec, corrupt) in enumerate(zip(prompts.specs, prompts.corrupt_specs)):
        ids = prompts.input_ids[i].tolist()
        at = {p: tok.decode([ids[int(v[i])]]) for p, v in prompts.positions.items()}
        assert at["A_def"] == at["A_doc"] == " " + spec.args[0]
        assert at["B_def"] == at["B_doc"] == " " + spec.args[1]
        assert at["C_def"] == " " + spec.args[2]
        assert at["END"] == "param"
        assert tok.decode(prompts.answers[i].tolist()) == " " + spec.args[2]
        doc = corrupt.doc_args or corrupt.args[:2]
        if corruption == "random_def":
            assert doc == spec.args[:2] and not set(corrupt.args) & set(spec.args)
        elif corruption == "random_doc":
            assert corrupt.args == spec.args and not set(doc) & set(spec.args)
        else:
            assert not set(corrupt.args) & set(spec.args) and not set(doc) & set(spec.args)
        assert len(prompts.corrupt_input_ids[i]) == len(prompts.input_ids[i])
    with pytest.raises(TaskError, match="valid values of corruption: random_random"):
        load_task("docstring", corruption="shuffle")


def test_docstring_filters_multi_token_words(gpt2_tokenizer):
    words = ["load", "size", "files", "last", "port", "oil", "column", "piece", "crime",
             "population", "unit", "dark", "zxqvbnmeter"]
    task = load_task("docstring", gpt2_tokenizer, words=words, n_extra=0)
    assert task.dropped_words == ("zxqvbnmeter",)


def test_gendered_pronoun_positions_answers_and_swap(gpt2_tokenizer):
    tok = gpt2_tokenizer
    task = load_task("gendered_pronoun", tok, n=30)
    prompts = task.prompts()
    assert prompts.dropped.count == 0
    for i, (spec, corrupt) in enumerate(zip(prompts.specs, prompts.corrupt_specs)):
        ids = prompts.input_ids[i].tolist()
        at = {p: tok.decode([ids[int(v[i])]]) for p, v in prompts.positions.items()}
        assert at == {"NAME": " " + spec.name, "IS": " is", "END": "'t"}
        right = " he" if spec.gender == "male" else " she"
        wrong = " she" if spec.gender == "male" else " he"
        assert tok.decode(prompts.answers[i].tolist()) == right
        assert tok.decode(prompts.wrong_answers[i].tolist()) == wrong
        assert corrupt.gender != spec.gender
    assert prompts.features["gender"] == [s.gender for s in prompts.specs]


def test_gendered_pronoun_rejects_a_name_of_both_genders():
    with pytest.raises(TaskError, match="both male and female"):
        load_task("gendered_pronoun", male_names=["Alex", "John"], female_names=["Alex", "Mary"])
    assert PronounSpec("Mary", "female").text == "So Mary is a really great friend, isn't"
