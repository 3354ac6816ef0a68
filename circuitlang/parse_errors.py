"""Syntax errors: a Lark `UnexpectedInput` (or an indentation error) on a circuitlang
source -> one `Diagnostic` that says where, what came, and what would have been valid
there, in the language's words (`text_to_ast.parse` raises it as a `ParseError`)."""
from __future__ import annotations

from lark import Token
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput

from circuitlang.errors import Diagnostic, Span

__all__ = ["dedent_diagnostic", "syntax_diagnostic"]


# What each terminal is, in words, for "expected ..." hints.
_TERMINAL_WORDS = {
    "NAME": "a name",
    "HEADREF": "a head such as 9.6",
    "HOLE": "a hole such as ?h",
    "SLOT": "a verb parameter such as $x",
    "OFFSET": "an offset such as +1",
    "INT": "a whole number",
    "NUMBER": "a number",
    "STRING": 'a quoted string such as "..."',
    "MODEL_ID": "a model name such as gpt2",
    "CMP": "a comparison (>=, <=, >, <, ==, !=)",
    "_NL": "the end of the line",
    "_INDENT": "an indented verb body",
    "_DEDENT": "the end of the verb body",
    "$END": "the end of the file",
}

# After these tokens a NAME has a more specific meaning.
_NAME_AFTER = {
    "_AT": "a position such as END",
    "ON": "a feature such as token(IO)",
    "METRIC": "a metric such as logit_diff",
    "ABLATION": "an ablation mode (resample, mean or zero)",
    "_WITH": "an ablation mode (resample, mean or zero)",
    "_GIVEN": "a feature such as template",
    "GROUP": "a group name",
    "USE": "a file to import such as stdlib.ioi",
}


def _expected_order(name: str) -> tuple[int, str]:
    # names and values first, punctuation next, line structure last
    if name in ("_NL", "_INDENT", "_DEDENT", "$END"):
        return (2, name)
    if name in _TERMINAL_WORDS:
        return (0, name)
    return (1, name)


def _describe_expected(expected: set[str], previous: str | None) -> str:
    from circuitlang.text_to_ast import grammar  # the grammar names what may come next

    g = grammar()
    if previous == "HAS" and expected <= {"_AT", "EXACTLY"}:
        return "expected at most, at least or exactly and a number of heads or features, such as " \
            "`?g has at most 4 heads` or `?g has at most 8 features`"
    words: list[str] = []
    if "NUMBER" in expected:
        expected = expected - {"INT"}  # "a number" covers whole numbers too
    if len(expected) > 1:
        expected = expected - {"SLOT"}  # verb parameters: only worth naming when alone
    for name in sorted(expected, key=_expected_order):
        if name == "NAME" and previous in _NAME_AFTER:
            words.insert(0, _NAME_AFTER[previous])
            continue
        if name in _TERMINAL_WORDS:
            words.append(_TERMINAL_WORDS[name])
            continue
        try:
            term = g.get_terminal(name)
        except KeyError:
            term = None
        if term is not None and term.pattern.type == "str":
            words.append(f"'{term.pattern.value}'")
        else:
            words.append(name.lower())
    words = list(dict.fromkeys(words))
    if len(words) > 8:
        words = words[:8] + ["..."]
    if len(words) == 1:
        return f"expected {words[0]}"
    return "expected " + ", ".join(words[:-1]) + " or " + words[-1]


def _previous_token_type(exc: UnexpectedInput) -> str | None:
    """The type of the token shifted just before the error, if the parser kept it."""
    state = getattr(exc, "state", None)
    stack = getattr(state, "value_stack", None)
    if stack and isinstance(stack[-1], Token):
        return stack[-1].type
    return None


def _line_text(source: str, line: int) -> str:
    lines = source.split("\n")
    return lines[line - 1] if 1 <= line <= len(lines) else ""


def syntax_diagnostic(exc: UnexpectedInput, source: str, filename: str | None) -> Diagnostic:
    previous = _previous_token_type(exc)
    if isinstance(exc, UnexpectedCharacters):
        line, col = exc.line, exc.column
        ch = source[exc.pos_in_stream] if exc.pos_in_stream < len(source) else ""
        hint = _describe_expected(set(exc.allowed), previous) if exc.allowed else None
        return Diagnostic(
            "parse.character",
            f"unexpected character {ch!r}",
            Span(line, col, line, col + 1, filename),
            hint,
        )
    if isinstance(exc, UnexpectedEOF):
        line = max(1, source.count("\n"))
        col = len(_line_text(source, line)) + 1
        return Diagnostic(
            "parse.eof",
            "unexpected end of file",
            Span(line, col, line, col + 1, filename),
            _describe_expected(set(exc.expected), None),
        )
    tok = getattr(exc, "token", None)
    if not isinstance(tok, Token) or tok.type == "$END":
        line = max(1, source.count("\n"))
        col = len(_line_text(source, line)) + 1
        return Diagnostic(
            "parse.eof", "unexpected end of file", Span(line, col, line, col + 1, filename),
            _describe_expected(set(getattr(exc, "expected", ())), previous),
        )
    if tok.type == "_NL":
        line, col = tok.line, tok.column
        what = "end of line"
        if str(tok).lstrip().startswith("#"):
            what = "comment"
        span = Span(line, col, line, col + 1, filename)
        message = f"unexpected {what}"
    elif tok.type in ("_INDENT", "_DEDENT"):
        # the indenter places these at the newline; point at the next line's text
        line = tok.end_line if tok.end_line else tok.line
        text = _line_text(source, line)
        col = len(text) - len(text.lstrip()) + 1
        span = Span(line, col, line, col + 1, filename)
        message = "unexpected indentation" if tok.type == "_INDENT" else "unexpected unindent"
        if tok.type == "_INDENT":
            return Diagnostic("parse.indent", message, span,
                              "only the body of a `verb` definition is indented; start "
                              "other statements at the beginning of the line")
    else:
        span = Span(tok.line, tok.column, tok.end_line or tok.line,
                    tok.end_column or tok.column + 1, filename)
        message = f"unexpected {str(tok)!r}"
        before = [ln for ln in source.split("\n")[: tok.line - 1] if ln.strip()]
        code_before = before[-1].split("#")[0].strip() if before else ""
        if code_before.startswith("verb") and code_before.endswith(":") and tok.column == 1:
            return Diagnostic("parse.indent", "expected the indented body of the verb above",
                              span, "indent each claim of a verb's body, e.g. by 4 spaces")
    return Diagnostic("parse.syntax", message, span, _describe_expected(_state_expected(exc), previous))


def _state_expected(exc: UnexpectedInput) -> set[str]:
    """What the parser could have taken where it stopped.

    When a word fits none of the terminals a state expects, Lark's contextual lexer
    reports that state's terminals plus those it always accepts (the end of a line),
    even where a statement cannot end; the parse table says what really fits.
    """
    expected = set(getattr(exc, "expected", ()) or ())
    state = getattr(exc, "state", None)
    try:
        fits = set(state.parse_conf.parse_table.states[state.position])
    except (AttributeError, KeyError, TypeError):
        return expected
    return (expected & fits) or expected


def dedent_diagnostic(source: str, filename: str | None) -> Diagnostic:
    # Find the first line whose indentation matches no enclosing level.
    levels = [0]
    for lineno, line in enumerate(source.split("\n"), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line.expandtabs(4)) - len(line.expandtabs(4).lstrip())
        if indent > levels[-1]:
            levels.append(indent)
            continue
        open_levels = list(levels)
        while indent < levels[-1]:
            levels.pop()
        if indent != levels[-1]:
            choices = " or ".join(str(n) for n in reversed(open_levels))
            return Diagnostic(
                "parse.indent",
                "unindent does not match any outer indentation level",
                Span(lineno, 1, lineno, indent + 1, filename),
                f"indent this line by {choices} spaces, to continue or end the block above",
            )
    return Diagnostic("parse.indent", "inconsistent indentation", None, None)
