"""Fuzzing the front half: only ever a `CircuitlangError`, never a crash.

Two sources of input, each with a fixed example budget (deterministic in CI; set
`CIRCUITLANG_FUZZ_EXAMPLES=5000 CIRCUITLANG_FUZZ_RANDOM=1` for a long random hunt):

* text generated from the grammar itself (`hypothesis.extra.lark.from_lark`), with
  every terminal drawn from plausible values and followed by a space, so most of it
  parses and reaches the resolver;
* mutations of every shipped file (stdlib/, examples/, tests/fixtures/): characters,
  tokens and bytes deleted, inserted, duplicated and swapped.

Each text goes through parse -> format -> parse (which must give the same program,
and formatting twice nothing new) -> resolve against a GPT-2-small shape and the
task the file names (no model is loaded). Anything but a `CircuitlangError` (a
RecursionError, KeyError, TypeError, a Lark exception, ...) fails the test.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.lark import from_lark

import circuitlang
from circuitlang.ast_to_ir import resolve
from circuitlang.errors import CircuitlangError
from circuitlang.sites import ModelShape
from circuitlang.tasks import get_signature, list_tasks
from circuitlang.text_to_ast import grammar

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted([*ROOT.glob("stdlib/*.circ"), *ROOT.glob("examples/**/*.circ"),
                  *ROOT.glob("tests/fixtures/**/*.circ")])
GPT2 = ModelShape(n_layers=12, n_heads=12, d_model=768, d_head=64, n_kv_heads=12,
                  vocab_size=50257, n_ctx=1024, architecture="gpt2", name="gpt2")
SIGNATURES = {name: get_signature(name) for name in list_tasks() if name != "custom"}

# Grammar-generated text costs ~0.1 s an example (drawing it, mostly); a mutation ~5 ms.
EXAMPLES = int(os.environ.get("CIRCUITLANG_FUZZ_EXAMPLES", "30"))


def _budget(examples: int):
    return settings(max_examples=examples, deadline=None, database=None,
                    derandomize=not os.environ.get("CIRCUITLANG_FUZZ_RANDOM"),
                    suppress_health_check=list(HealthCheck))


def front_half(text: str, filename: str | None = None) -> None:
    """parse -> format -> parse -> resolve; only a CircuitlangError may come out."""
    try:
        program = circuitlang.parse(text, filename)
    except CircuitlangError:
        return
    printed = circuitlang.format(program)
    reparsed = circuitlang.parse(printed, filename)
    assert reparsed == program, (text, printed)
    assert circuitlang.format(reparsed) == printed
    task = next((s.name for s in program.statements if type(s).__name__ == "TaskDecl"), "ioi")
    try:
        resolve(program, GPT2, SIGNATURES.get(task, SIGNATURES["ioi"]), filename=filename)
    except CircuitlangError:
        pass


# ------------------------------------------------------------------ from the grammar

_NAMES = ["IO", "S", "S1", "S2", "END", "all", "name", "template", "token", "position",
          "moves", "to", "via", "of", "q", "k", "v", "out", "pattern", "inhibits",
          "copies", "attends", "from", "detects", "recovered", "clean", "scrubbed", "random",
          "logit_diff", "loss", "abs", "min", "max", "resample", "mean", "zero", "given",
          "movers", "paths", "channels", "stdlib", "prelude", "ioi", "length", "true", "x"]


def _spaced(strategy):
    return strategy.map(lambda s: s + " ")


def _terminal_strategies() -> dict:
    plausible = {
        "NAME": st.sampled_from(_NAMES) | st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}",
                                                         fullmatch=True),
        "HEADREF": st.sampled_from(["9.6", "1.0", "0.1", "12.1", "9.*", "*.3", "*.*",
                                    "8.6.q", "5.5.k", "1.1.zz"]),
        "HOLE": st.sampled_from(["?h", "?s", "?m", "?h.q", "?g"]),
        "SLOT": st.sampled_from(["$h", "$x", "$p", "$g", "$c"]),
        "OFFSET": st.sampled_from(["+1", "-1", "+0", "+12"]),
        "INT": st.sampled_from(["0", "1", "3", "20", "99999999999999999999"]),
        "NUMBER": st.sampled_from(["0.85", "1.5", "1e3", "2.5e-400"]),
        "MODEL_ID": st.sampled_from(["gpt2", "ioi", "induction", "pairs.jsonl",
                                     "../x.jsonl", "toy-ioi"]),
        "STRING": st.sampled_from(['"a paper"', '""', '"x\\ny"', '"\\q"']),
        "CMP": st.sampled_from([">=", "<=", "==", "!=", ">", "<"]),
    }
    out = {"_NL": st.sampled_from(["\n", "  # note\n", "\n\n"]),
           "_INDENT": st.just("\n    "), "_DEDENT": st.just("\n"),
           "WS_INLINE": st.just(" ")}
    for term in grammar().terminals:
        if term.name in out:
            continue
        if term.name in plausible:
            out[term.name] = _spaced(plausible[term.name])
        elif term.pattern.type == "str":
            out[term.name] = st.just(term.pattern.value + " ")
    return out


@_budget(EXAMPLES)
@given(st.data())
def test_grammar_generated_programs_only_raise_circuitlang_errors(data):
    text = data.draw(from_lark(grammar(), start="start", explicit=_terminal_strategies()))
    front_half(text)


# ------------------------------------------------------------------ mutations

_INSERTS = ["\n", " ", "\t", "\f", "\r", "#", '"', "\\", ".", "-", "+", "(", ")", "*", "$",
            "?", ":", "=", "[", "]", ",", "0", "9", "\u0669", "é", "\x00", "\u2028", "+0",
            "head ", "at ", "-> ", "verb $h x:\n", "    ", "abs(", "expect ", "task ",
            "\n    \f\n", "verb $h zaps $x:\n    \f\n", " x=1", " x=[a, 1]"]
#: What `nest` wraps an expectation's left side in, up to hundreds of times.
_NESTINGS = [("-", ""), ("abs(", ")"), ("(", ")"), ("", " + 1"), ("min(1, ", ")")]
_TOKEN = re.compile(r"\s+|\w+|[^\w\s]")


@st.composite
def _mutated(draw):
    path = draw(st.sampled_from(SHIPPED))
    text = path.read_text(encoding="utf-8")
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "duplicate", "swap", "token_delete",
                                     "token_duplicate", "token_swap", "bytes", "nest"]))
        if not text:
            text = draw(st.sampled_from(_INSERTS))
            continue
        i = draw(st.integers(0, len(text) - 1))
        j = draw(st.integers(i, min(len(text), i + 40)))
        if kind == "nest":  # an expectation nested deeper than anything should recurse
            lines = text.split("\n")
            expects = [n for n, line in enumerate(lines) if line.startswith("expect ")]
            if expects:
                n = draw(st.sampled_from(expects))
                before, after = draw(st.sampled_from(_NESTINGS))
                depth = draw(st.sampled_from([2, 40, 64, 65, 300, 700]))
                head, _, rest = lines[n].partition("expect ")
                each = "each " if rest.startswith("each ") else ""
                rest = rest.removeprefix("each ")
                lhs, space, tail = rest.partition(" ")
                lines[n] = f"{head}expect {each}{before * depth}{lhs}{after * depth}{space}{tail}"
                text = "\n".join(lines)
        elif kind == "delete":
            text = text[:i] + text[j:]
        elif kind == "insert":
            text = text[:i] + draw(st.sampled_from(_INSERTS)) + text[i:]
        elif kind == "duplicate":
            text = text[:j] + text[i:j] + text[j:]
        elif kind == "swap":
            k = draw(st.integers(0, len(text) - 1))
            chars = list(text)
            chars[i], chars[k] = chars[k], chars[i]
            text = "".join(chars)
        elif kind == "bytes":  # damage the encoding, then read it as a tolerant reader would
            raw = bytearray(text.encode("utf-8", errors="surrogateescape"))
            raw[min(i, len(raw) - 1)] = draw(st.integers(0, 255))
            text = raw.decode("utf-8", errors=draw(st.sampled_from(["replace",
                                                                     "surrogateescape"])))
        else:
            tokens = _TOKEN.findall(text)
            a = draw(st.integers(0, len(tokens) - 1))
            b = draw(st.integers(0, len(tokens) - 1))
            if kind == "token_delete":
                del tokens[a]
            elif kind == "token_duplicate":
                tokens.insert(b, tokens[a])
            else:
                tokens[a], tokens[b] = tokens[b], tokens[a]
            text = "".join(tokens)
    return path, text


@_budget(10 * EXAMPLES)
@given(_mutated())
def test_mutated_shipped_files_only_raise_circuitlang_errors(case):
    path, text = case
    front_half(text, str(path))


def test_every_shipped_file_goes_through_the_front_half_unmutated():
    assert len(SHIPPED) >= 30
    for path in SHIPPED:
        front_half(path.read_text(encoding="utf-8"), str(path))
