"""Every task works with a word-level tokenizer (no leading-space convention)."""
from __future__ import annotations

import pytest

from circuitlang.errors import TaskError
from circuitlang.tasks import load_task


@pytest.mark.parametrize("name", ["ioi", "greater_than", "docstring", "gendered_pronoun",
                                  "induction"])
@pytest.mark.parametrize("bos", [True, False])
def test_task_builds_with_a_word_level_tokenizer(word_tokenizer_for, name, bos):
    tok = word_tokenizer_for(name, bos=bos)
    task = load_task(name, tok, n=25, seed=2)
    prompts = task.prompts()
    assert prompts.dropped.count == 0, prompts.dropped.summary()
    assert (prompts.corrupt_attention_mask == prompts.attention_mask).all()
    unk = tok.unk_token_id
    for i, spec in enumerate(prompts.specs):
        ids = prompts.input_ids[i][prompts.attention_mask[i].bool()].tolist()
        assert unk not in ids
        assert (ids[0] == tok.bos_token_id) == bos
        for pos, (start, end) in spec.word_spans().items():
            token = tok.convert_ids_to_tokens(ids[int(prompts.positions[pos][i])])
            assert token == spec.text[start:end], (pos, spec.text)
        assert int(prompts.positions["END"][i]) == len(ids) - 1
        assert (prompts.answers[i] >= 0).any() and unk not in prompts.answers[i].tolist()


def test_names_outside_a_word_vocabulary_are_dropped(word_tokenizer_factory):
    from circuitlang.tasks.ioi import NAMES

    base = load_task("ioi").vocabulary()
    tok = word_tokenizer_factory([w for w in base if w not in ("Mary", "John")])
    task = load_task("ioi", tok)
    assert set(task.dropped_names) == {"Mary", "John"}
    assert len(task.names) == len(NAMES) - 2


def test_greater_than_needs_years_split_in_two(word_tokenizer_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # A tokenizer that keeps "1732" whole cannot express the task.
    words = load_task("greater_than").vocabulary() + [str(y) for y in range(1100, 1800)]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["[UNK]"] + words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    with pytest.raises(TaskError, match="no year XXYY tokenizes as the two tokens"):
        load_task("greater_than", tok)
