"""Parse: hypothesis text -> `Program` (the AST), or a `ParseError`.

The grammar lives in `grammar/circuitlang.lark` (found through
`circuitlang.resources`); it is loaded once per process and parsed with Lark's
LALR(1) parser, the contextual lexer, and an indenter for verb bodies. Syntax
errors fail fast: the first one raises a `ParseError` whose single diagnostic
points at the offending token and says, in words, what could have come there.

Comments and blank lines are not part of the grammar's trees; they are read off the
source lines and attached to statements as `Trivia`, so the printer can keep them.
"""
from __future__ import annotations

import difflib
import functools
from dataclasses import replace
from decimal import Decimal

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import LarkError, UnexpectedInput, VisitError
from lark.indenter import DedentError, Indenter

from circuitlang import ast
from circuitlang.errors import Diagnostic, ParseError, Span
from circuitlang.parse_errors import dedent_diagnostic, syntax_diagnostic
from circuitlang.printer import format_target
from circuitlang.resources import grammar_dir

__all__ = ["parse", "parse_task_param", "grammar", "KEYWORDS", "MAX_SOURCE_CHARS",
           "MAX_STATEMENTS", "MAX_EXPR_DEPTH", "MAX_CLAIMS", "check_claim_count"]

# Limits on one file (docs/language.md, "Limits"). Each is far above any published
# circuit, and each keeps a hostile or generated file from taking minutes and
# gigabytes: going over one is an error that names the limit.
MAX_SOURCE_CHARS = 2_000_000  # characters in one file
MAX_STATEMENTS = 50_000  # statements in one file, verb bodies included (~10 s to parse)
MAX_EXPR_DEPTH = 64  # nesting of an `expect` expression: `-`, `abs(`, operators
MAX_CLAIMS = 100_000  # core claims after verb and group expansion (the resolver's limit)

# The rules whose nodes nest inside an expression (for MAX_EXPR_DEPTH), and the rules
# that are statements (for MAX_STATEMENTS).
_EXPR_RULES = frozenset({"add", "sub", "mul", "div", "neg", "call"})
_STATEMENT_RULES = frozenset(
    "cite model task use metric ablation semantics reported seed samples group depends "
    "edge verb_use verb_def patch path_patch ablate expect hole_in_layer hole_in_layers "
    "hole_in_heads hole_size".split()) | {"sae_decl", "trace", "probe"} | {"subspace_decl", "align"}

# Words that are keywords somewhere in the grammar. Keywords are contextual, but a
# group, verb word or feature spelled like one of these can be unusable in places,
# so the resolver and the printer's strategies avoid them.
KEYWORDS = frozenset(
    "cite model task use metric ablation semantics given reported seed samples group head heads "
    "mlp resid embed logits at depends on nothing patch ablate with expect each verb".split()
) | frozenset("neuron neurons feature features error sae attn".split()) \
    | frozenset("trace probe".split()) | frozenset("subspace align".split())


class _CircIndenter(Indenter):
    NL_type = "_NL"
    OPEN_PAREN_types: list[str] = []  # statements are one line: parens never span lines
    CLOSE_PAREN_types: list[str] = []
    INDENT_type = "_INDENT"
    DEDENT_type = "_DEDENT"
    tab_len = 4


@functools.cache
def grammar() -> Lark:
    """The compiled circuitlang grammar (loaded and built once per process)."""
    text = (grammar_dir() / "circuitlang.lark").read_text(encoding="utf-8")
    return Lark(
        text,
        parser="lalr",
        lexer="contextual",
        postlex=_CircIndenter(),
        propagate_positions=True,
        maybe_placeholders=False,
        start=["start", "task_param"],
    )


def parse(text: str, filename: str | None = None) -> ast.Program:
    """Parse hypothesis text into an AST.

    Args:
        text: the program, e.g. ``"head 9.6 moves name to END"``.
        filename: shown in error messages (``ioi.circ:3:6: error: ...``).

    Returns:
        The `Program`, with source spans and comments attached.

    Raises:
        ParseError: on the first syntax error, rendered with the source line, a caret
            and what was expected there.
    """
    if not isinstance(text, str):
        raise ParseError(
            f"expected the program as text (str), got {type(text).__name__}",
            code="parse.input",
        )
    if len(text) > MAX_SOURCE_CHARS:
        raise ParseError(
            f"the file is {len(text):,} characters long; the limit is {MAX_SOURCE_CHARS:,}",
            code="parse.too_large", span=Span(1, 1, 1, 2, filename),
            hint="split it into files joined with `use`, or state the claims with groups")
    source = text if text.endswith("\n") else text + "\n"
    try:
        tree = grammar().parse(source, start="start")
        _check_size(tree, filename)
        program = _ToAst(filename).transform(tree)
    except VisitError as exc:  # a bad literal found while building nodes
        if isinstance(exc.orig_exc, ParseError):
            raise exc.orig_exc.with_source(text) from None
        raise ParseError(
            f"cannot read this program: {exc.orig_exc}", code="parse.internal"
        ).with_source(text) from None
    except ParseError as exc:  # a limit
        raise exc.with_source(text) from None
    except DedentError:
        raise ParseError(
            dedent_diagnostic(source, filename)
        ).with_source(text) from None
    except UnexpectedInput as exc:
        raise ParseError(syntax_diagnostic(exc, source, filename)).with_source(text) from None
    except LarkError as exc:  # any other Lark failure is still a syntax problem
        raise ParseError(f"cannot parse: {exc}", code="parse.syntax").with_source(text) from None
    first = program.statements[0].span if program.statements else None
    if first is not None and first.column > 1:  # the indenter sees only later lines
        raise ParseError(Diagnostic(
            "parse.indent", "unexpected indentation",
            Span(first.line, first.column, first.line, first.column + 1, filename),
            "only the body of a `verb` definition is indented; start other statements "
            "at the beginning of the line")).with_source(text)
    return _attach_trivia(program, source)


def parse_task_param(text: str, where: str = "--task-param") -> ast.TaskParam:
    """Read one `NAME=VALUE` task parameter, written as in a file's `task` line.

    The command line's `--task-param length=20` and the file's `task induction
    length=20` share this syntax (and so this grammar rule).

    Args:
        text: `length=20`, `tokens=[a, b]`, `template_set=ABBA`, `path="x.jsonl"`.
        where: what to call the text in messages.

    Raises:
        ParseError: the text is not `NAME=VALUE`.
    """
    try:
        tree = grammar().parse(text.strip(), start="task_param")
        return _ToAst(where).transform(tree)
    except VisitError as exc:
        if isinstance(exc.orig_exc, ParseError):
            raise exc.orig_exc.with_source(text) from None
        raise ParseError(f"cannot read {where} {text!r}", code="parse.task_param") from None
    except LarkError:
        raise ParseError(
            f"cannot read {where} {text!r}: expected NAME=VALUE", code="parse.task_param",
            hint="for example length=20, template_set=ABBA, tokens=[a, b], "
            'path="pairs.jsonl", prepend_bos=false') from None


def check_claim_count(count: int, span: Span | None) -> Diagnostic | None:
    """The resolver's check of MAX_CLAIMS: None while `count` claims are within it.

    Call it with the claims a program has reached after each statement, and with what
    one statement is about to make (an edge between two groups makes |S| x |R| x 3)
    before making them, so a hostile file stops before its claims exist.

    Args:
        count: how many core claims the program has, or one statement asks for.
        span: the statement that goes over the limit.

    Returns:
        The diagnostic to report (and stop expanding), or None.
    """
    if count <= MAX_CLAIMS:
        return None
    return Diagnostic(
        "resolve.too_many_claims",
        f"this expands into {count:,} core claims, more than the limit of {MAX_CLAIMS:,}",
        span, "claim fewer sites at once: an edge between two large groups means every "
        "pair of their heads (and q, k, v of each receiver)")


def _check_size(tree, filename: str | None) -> None:
    """Enforce MAX_STATEMENTS and MAX_EXPR_DEPTH before building the AST.

    Walks the tree with an explicit stack: the point is to refuse trees too deep for
    the recursive passes after it (the transformer, the printer, equality, sympy).
    """
    from lark import Tree

    def at(node) -> Span:
        meta = node.meta
        return Span(meta.line, meta.column, meta.line, meta.column + 1, filename)

    statements = 0
    for node in tree.children:
        if not isinstance(node, Tree):
            continue
        statements += 1 + (sum(isinstance(c, Tree) and c.data in _STATEMENT_RULES
                               for c in node.children) if node.data == "verb_def" else 0)
        if statements > MAX_STATEMENTS:
            raise ParseError(
                f"the file has more than {MAX_STATEMENTS:,} statements (the limit)",
                code="parse.too_many", span=at(node),
                hint="split it into files joined with `use`, or state the claims with groups")
    stack = [(tree, 0)]  # (node, how many expression nodes enclose it)
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, Tree):
            continue
        if node.data in _EXPR_RULES:
            depth += 1
            if depth > MAX_EXPR_DEPTH:
                raise ParseError(
                    f"this expression nests deeper than {MAX_EXPR_DEPTH} levels (the limit)",
                    code="parse.too_deep", span=at(node),
                    hint="write it more simply, or split it over several `expect` lines")
        stack.extend((child, depth) for child in node.children)


# ------------------------------------------------------------ tree -> AST


def _tok_span(tok: Token, filename: str | None) -> Span:
    return Span(tok.line, tok.column, tok.end_line, tok.end_column, filename)


def _unquote(tok: Token, filename: str | None) -> str:
    body, out, i = tok[1:-1], [], 0
    escapes = {"\\": "\\", '"': '"', "n": "\n", "t": "\t"}
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            nxt = body[i + 1]  # the STRING terminal guarantees a character follows
            if nxt not in escapes:
                col = tok.column + 1 + i
                raise ParseError(
                    f"unknown escape \\{nxt} in a string",
                    code="parse.escape",
                    span=Span(tok.line, col, tok.line, col + 2, filename),
                    hint='strings may contain \\" \\\\ \\n \\t',
                )
            out.append(escapes[nxt])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


_MAX_DIGITS = 18  # whole numbers: layers, heads, offsets, seeds, sample counts
_MAX_EXPONENT = 300  # decimals: anything a metric can be compared with


def _too_large(tok: Token, filename: str | None, what: str) -> ParseError:
    return ParseError(f"{what} {str(tok)[:20]}{'...' if len(tok) > 20 else ''} is out of range",
                      code="parse.number", span=_tok_span(tok, filename),
                      hint="write a number of ordinary size")


def _decimal(tok: Token, filename: str | None) -> Decimal:
    value = Decimal(str(tok))  # the NUMBER and INT terminals only match valid numbers
    exponent = value.as_tuple().exponent
    if abs(exponent) > _MAX_EXPONENT or (value and abs(value.adjusted()) > _MAX_EXPONENT):
        raise _too_large(tok, filename, "number")
    return value


def _int(tok: Token, filename: str | None) -> int:
    if len(str(tok).lstrip("+-")) > _MAX_DIGITS:
        raise _too_large(tok, filename, "number")
    return int(str(tok))


def _parse_headref(tok: Token, filename: str | None) -> ast.HeadRef:
    parts = str(tok).split(".")
    if any(len(p) > _MAX_DIGITS for p in parts[:2]):
        raise _too_large(tok, filename, "head")
    layer = None if parts[0] == "*" else int(parts[0])
    head = None if parts[1] == "*" else int(parts[1])
    channel = parts[2] if len(parts) > 2 else None
    return ast.HeadRef(layer, head, channel, span=_tok_span(tok, filename))


@v_args(meta=True)
class _ToAst(Transformer):
    """Builds AST nodes from Lark's tree, bottom up."""

    def __init__(self, filename: str | None):
        super().__init__()
        self.filename = filename

    def _span(self, meta) -> Span | None:
        if getattr(meta, "empty", True):
            return None
        return Span(meta.line, meta.column, meta.end_line, meta.end_column, self.filename)

    # -- program
    def start(self, meta, children):
        return ast.Program(tuple(children), filename=self.filename)

    # -- header statements
    def cite(self, meta, c):
        return ast.Cite(_unquote(c[0], self.filename), span=self._span(meta))

    def model(self, meta, c):
        tok = c[0]
        name = _unquote(tok, self.filename) if tok.type == "STRING" else str(tok)
        return ast.ModelDecl(name, span=self._span(meta))

    def task(self, meta, c):
        tok, *params = c
        name = _unquote(tok, self.filename) if tok.type == "STRING" else str(tok)
        return ast.TaskDecl(name, tuple(params), span=self._span(meta))

    def task_param(self, meta, c):
        return ast.TaskParam(str(c[0]), c[1], span=self._span(meta))

    def param_list(self, meta, c):
        return tuple(c)

    def param_scalar(self, meta, c):
        tok = c[-1]
        sign = -1 if len(c) == 2 else 1  # MINUS INT, MINUS NUMBER
        if tok.type == "INT":
            return sign * _int(tok, self.filename)
        if tok.type == "NUMBER":
            return sign * _decimal(tok, self.filename)
        if tok.type == "STRING":
            return _unquote(tok, self.filename)
        return {"true": True, "false": False}.get(str(tok), str(tok))

    def use(self, meta, c):
        return ast.Use(tuple(str(t) for t in c), span=self._span(meta))

    def metric(self, meta, c):
        return ast.MetricDecl(str(c[0]), span=self._span(meta))

    def ablation(self, meta, c):
        return ast.AblationDecl(str(c[0]), tuple(c[1:]), span=self._span(meta))

    def semantics(self, meta, c):
        return ast.SemanticsDecl(str(c[0]), span=self._span(meta))

    def reported(self, meta, c):
        return ast.Reported(str(c[0]), c[1], span=self._span(meta))

    def signed_number(self, meta, c):
        if len(c) == 2:
            return -_decimal(c[1], self.filename)
        return _decimal(c[0], self.filename)

    def seed(self, meta, c):
        return ast.Setting("seed", _int(c[0], self.filename), span=self._span(meta))

    def samples(self, meta, c):
        return ast.Setting("samples", _int(c[0], self.filename), span=self._span(meta))

    def group(self, meta, c):
        return ast.GroupDef(str(c[0]), c[1], span=self._span(meta))

    # -- targets
    def _head_item(self, item):
        if isinstance(item, Token):
            return _parse_headref(item, self.filename)
        return item  # a Hole

    def head_target(self, meta, c):
        item = c[0]
        if isinstance(item, Token) and item.type == "STAR":
            ref = ast.HeadRef(None, None, None, span=_tok_span(item, self.filename))
        else:
            ref = self._head_item(item)
        return ast.HeadTarget(ref, span=self._span(meta))

    def bare_head_target(self, meta, c):
        return ast.HeadTarget(_parse_headref(c[0], self.filename), span=self._span(meta),
                              keyword=False)

    def bare_hole_target(self, meta, c):
        return ast.HeadTarget(c[0], span=self._span(meta), keyword=False)

    def heads_target(self, meta, c):
        return ast.HeadsTarget(tuple(self._head_item(i) for i in c), span=self._span(meta))

    def hole(self, meta, c):
        channel = str(c[1]) if len(c) > 1 else None
        return ast.Hole(str(c[0])[1:], channel, span=self._span(meta))

    def _layer(self, tok: Token):
        if tok.type == "STAR":
            return None
        if tok.type == "HOLE":
            return ast.Hole(str(tok)[1:], span=_tok_span(tok, self.filename))
        return _int(tok, self.filename)

    def mlp_target(self, meta, c):
        return ast.MlpTarget(self._layer(c[0]), span=self._span(meta))

    def resid_target(self, meta, c):
        return ast.ResidTarget(self._layer(c[0]), span=self._span(meta))

    def embed_target(self, meta, c):
        return ast.EmbedTarget(span=self._span(meta))

    def logits_target(self, meta, c):
        return ast.LogitsTarget(span=self._span(meta))

    def _neuron_ref(self, tok: Token) -> ast.HeadRef:
        ref = _parse_headref(tok, self.filename)
        if ref.channel is not None:
            raise ParseError(f"a neuron has no channel: {tok}", code="parse.neuron",
                             span=_tok_span(tok, self.filename),
                             hint="write `neuron LAYER.INDEX`, such as `neuron 5.12`")
        return ref

    def neuron_target(self, meta, c):
        return ast.NeuronTarget(self._neuron_ref(c[0]), span=self._span(meta))

    def neurons_target(self, meta, c):
        return ast.NeuronsTarget(tuple(self._neuron_ref(t) for t in c), span=self._span(meta))

    def feature_target(self, meta, c):
        name, index = c
        if index.type == "HOLE":
            value = ast.Hole(str(index)[1:], span=_tok_span(index, self.filename))
        else:
            value = None if index.type == "STAR" else _int(index, self.filename)
        return ast.FeatureTarget(str(name), value, span=self._span(meta))

    def feature_item(self, meta, c):
        return self.feature_target(meta, c)

    def features_target(self, meta, c):
        return ast.FeaturesTarget(tuple(c), span=self._span(meta))

    def error_target(self, meta, c):
        return ast.ErrorTarget(str(c[0]), span=self._span(meta))

    def subspace_target(self, meta, c):
        return ast.SubspaceTarget(str(c[0]), span=self._span(meta))

    def subspace_place(self, meta, c):
        """(hook, layer, head) of `resid 6`, `mlp 5`, `head 8.6.out` (or `head 8.6`)."""
        hook, where = str(c[0]), c[1]
        if hook != "head":
            return hook, _int(where, self.filename), None
        ref = _parse_headref(where, self.filename)
        if ref.layer is None or ref.head is None or ref.channel not in (None, "out"):
            raise ParseError(f"a subspace lies in one head's output, not {where}", code="parse.subspace_head",
                             span=_tok_span(where, self.filename),
                             hint="write `head LAYER.HEAD.out`, such as `head 8.6.out`")
        return hook, ref.layer, ref.head

    def subspace_decl(self, meta, c):
        name, path, (hook, layer, head) = c
        return ast.SubspaceDecl(str(name), _unquote(path, self.filename), hook, layer, head,
                                span=self._span(meta))

    def align(self, meta, c):
        name, (hook, layer, head), position, feature, *options = c
        return ast.Align(str(name), hook, layer, head, position, str(feature),
                         self._options(options, ast.ALIGN_OPTIONS, "align"), span=self._span(meta))

    def align_option(self, meta, c):
        return c[0], c[1]

    def _align_value(self, tok: Token, value) -> object:
        name = str(tok)
        if name == "heldout":
            if 0 < value < 1:
                return float(value)
            wants = "a share of the pairs between 0 and 1 (heldout 0.25)"
        else:
            if value == value.to_integral_value() and value >= 1:
                return int(value)
            wants = {"dims": "a whole number of dimensions >= 1 (dims 1)",
                     "steps": "a whole number of training steps >= 1 (steps 300)",
                     "pairs": "a whole number of pairs >= 1 (pairs 200)"}[name]
        raise ParseError(f"align option {name} must be {wants}", code="parse.align_option",
                         span=_tok_span(tok, self.filename), hint=f"write {wants.split('(')[-1][:-1]}")

    def sae_decl(self, meta, c):
        name, path, hook, layer = c
        return ast.SaeDecl(str(name), _unquote(path, self.filename), hook,
                           _int(layer, self.filename), span=self._span(meta))

    def sae_hook(self, meta, c):
        return str(c[0])

    def group_target(self, meta, c):
        channel = str(c[1]) if len(c) > 1 else None
        return ast.GroupTarget(str(c[0]), channel, span=self._span(meta))

    def slot_target(self, meta, c):
        channel = str(c[1]) if len(c) > 1 else None
        return ast.SlotTarget(str(c[0])[1:], channel, span=self._span(meta))

    # -- positions and features
    def position(self, meta, c):
        tok = c[0]
        if tok.type == "SLOT":
            return ast.Slot(str(tok)[1:], span=self._span(meta))
        offset = _int(c[1], self.filename) if len(c) > 1 else 0
        return ast.PositionRef(str(tok), offset, span=self._span(meta))

    def plain_feature(self, meta, c):
        return ast.FeatureRef(str(c[0]), span=self._span(meta))

    def call_feature(self, meta, c):
        return ast.FeatureRef(str(c[0]), c[1], span=self._span(meta))

    def slot_feature(self, meta, c):
        return ast.Slot(str(c[0])[1:], span=self._span(meta))

    # -- claims
    def depends(self, meta, c):
        target, position, *features = c
        if len(features) == 1 and isinstance(features[0], Token):  # `nothing`
            features = []
        return ast.Depends(target, position, tuple(features), span=self._span(meta))

    def edge(self, meta, c):
        sender, _arrow, receiver, position = c
        return ast.Edge(sender, receiver, position, span=self._span(meta))

    def verb_use(self, meta, c):
        subject, verb, *terms = c
        if str(verb) == "depends" and terms and terms[0] == ast.Word("on"):
            # `name_movers.q depends on IO`: a core claim missing its position
            raise ParseError(
                "a `depends on` claim needs a position", code="parse.depends_position",
                span=_tok_span(verb, self.filename),
                hint=f"write `{format_target(subject)} at END depends on ...` (or another "
                "position the task defines)")
        return ast.VerbUse(subject, str(verb), tuple(terms), span=self._span(meta))

    def word(self, meta, c):
        return ast.Word(str(c[0]), span=self._span(meta))

    def at_word(self, meta, c):
        return ast.Word("at", span=self._span(meta))

    def offset_term(self, meta, c):
        offset = _int(c[1], self.filename)
        if offset == 0:  # `IO+0` is `IO`: the same word, whatever a verb makes of it
            return ast.Word(str(c[0]), span=self._span(meta))
        return ast.PositionRef(str(c[0]), offset, span=self._span(meta))

    def call_term(self, meta, c):
        return ast.FeatureRef(str(c[0]), c[1], span=self._span(meta))

    def head_term(self, meta, c):
        return _parse_headref(c[0], self.filename)

    def hole_term(self, meta, c):
        return c[0]

    def slot_term(self, meta, c):
        return ast.Slot(str(c[0])[1:], span=self._span(meta))

    # -- verb definitions
    def verb_def(self, meta, c):
        subject, verb, *rest = c
        if str(verb) == "depends":
            raise ParseError(
                "a verb cannot start with `depends`", code="parse.verb_word",
                span=_tok_span(verb, self.filename),
                hint="`SITE at P depends on F` is a core claim; give the verb another word")
        words = [ast.Word(str(verb), span=_tok_span(verb, self.filename))]
        body = []
        for item in rest:
            if isinstance(item, (ast.Word, ast.Slot)):
                words.append(item)
            else:
                body.append(item)
        span = self._span(meta)
        if not body:  # only blank (or form-feed) lines were indented under it
            raise ParseError(
                "a verb definition needs at least one claim in its body",
                code="parse.verb_body", span=_tok_span(verb, self.filename),
                hint="indent the claims it stands for under the `verb ...:` line, e.g. "
                f"`    ${subject[1:]} at END depends on ...`")
        if span is not None and body and body[-1].span is not None:
            # the grammar's span runs on to the dedent; the definition ends with its body
            end = body[-1].span
            span = Span(span.line, span.column, end.end_line, end.end_column, self.filename)
        return ast.VerbDef(str(subject)[1:], tuple(words), tuple(body), span=span)

    def pattern_word(self, meta, c):
        return ast.Word(str(c[0]), span=self._span(meta))

    def pattern_at(self, meta, c):
        return ast.Word("at", span=self._span(meta))

    def pattern_slot(self, meta, c):
        return ast.Slot(str(c[0])[1:], span=self._span(meta))

    # -- experiments
    def patch(self, meta, c):
        target, position, *word = c
        direction = None
        if word:
            direction = str(word[0])
            if direction not in ast.PATCH_DIRECTIONS:
                close = difflib.get_close_matches(direction, ast.PATCH_DIRECTIONS, n=1)
                raise ParseError(
                    f"unknown patching direction {direction!r}", code="parse.patch_direction",
                    span=_tok_span(word[0], self.filename),
                    hint=(f"did you mean {close[0]}? " if close else "")
                    + "end the line with `denoise` (run the corrupt prompt, patch in clean values), "
                    "`noise` (the default: run the clean prompt, patch in corrupt values) or "
                    "`attribution` (noising estimated by attribution patching, for neurons and SAE latents)")
        return ast.Patch(target, position, direction, span=self._span(meta))

    def path_patch(self, meta, c):
        sender, _arrow, receiver, position = c
        return ast.PathPatch(sender, receiver, position, span=self._span(meta))

    def ablate(self, meta, c):
        target, mode, position = c[0], None, None
        for item in c[1:]:
            if isinstance(item, Token):
                mode = str(item)
            else:
                position = item
        return ast.Ablate(target, mode, position, span=self._span(meta))

    def _experiment_site(self, tok: Token, valid: tuple[str, ...], verb: str) -> str:
        word = str(tok)
        if word not in valid:
            close = difflib.get_close_matches(word, valid, n=1)
            raise ParseError(f"cannot {verb} {word!r}", code=f"parse.{verb}_site",
                             span=_tok_span(tok, self.filename),
                             hint=(f"did you mean {close[0]}? " if close else "")
                             + f"{verb} reads " + ", ".join(valid[:-1]) + f" or {valid[-1]}, e.g. `"
                             + ("trace mlp * at all" if verb == "trace" else "probe resid * at END for IO") + "`")
        return word

    def _options(self, items, valid: tuple[str, ...], verb: str) -> tuple[tuple[str, object], ...]:
        seen: dict[str, object] = {}
        for tok, value in items:
            name = str(tok)
            if name not in valid:
                close = difflib.get_close_matches(name, valid, n=1)
                raise ParseError(f"unknown {verb} option {name!r}", code=f"parse.{verb}_option",
                                 span=_tok_span(tok, self.filename),
                                 hint=(f"did you mean {close[0]}? " if close else "")
                                 + f"{verb} takes " + ", ".join(valid))
            if name in seen:
                raise ParseError(f"{verb} option {name!r} is given twice", code=f"parse.{verb}_option",
                                 span=_tok_span(tok, self.filename), hint="give each option once")
            seen[name] = self._option_value(verb, tok, value)
        return tuple(seen.items())

    def _option_value(self, verb: str, tok: Token, value) -> object:
        if verb == "align":
            return self._align_value(tok, value)
        name = str(tok)
        wants = {"window": "a whole number of layers >= 1 (window 10)",
                 "noise": "a number above 0, in units of the embeddings' std (noise 3.0)",
                 "heldout": "a share of the prompts between 0 and 1 (heldout 0.25)",
                 "save": 'a file name in quotes (save "io_probe.safetensors")'}[name]
        ok = False
        if name == "save":
            ok = isinstance(value, str) and value != ""
        elif isinstance(value, Decimal):
            if name == "window":
                ok = value == value.to_integral_value() and value >= 1
                value = int(value) if ok else value
            elif name == "noise":
                ok, value = value > 0, float(value)
            else:
                ok, value = 0 < value < 1, float(value)
        if not ok:
            raise ParseError(f"{verb} option {name} must be {wants}", code=f"parse.{verb}_option",
                             span=_tok_span(tok, self.filename), hint=f"write {wants.split('(')[-1][:-1]}")
        return value

    def trace(self, meta, c):
        site, _star, position, *options = c
        return ast.Trace(self._experiment_site(site, ast.TRACE_SITES, "trace"), position,
                         self._options(options, tuple(ast.TRACE_OPTIONS), "trace"), span=self._span(meta))

    def trace_option(self, meta, c):
        return c[0], c[1]

    def probe(self, meta, c):
        site, _star, position, feature, *options = c
        return ast.Probe(self._experiment_site(site, ast.PROBE_SITES, "probe"), position, str(feature),
                         self._options(options, ast.PROBE_OPTIONS, "probe"), span=self._span(meta))

    def probe_option(self, meta, c):
        tok, value = c
        if isinstance(value, Token):  # a STRING
            value = _unquote(value, self.filename)
        return tok, value

    # -- hole constraints
    def _constraint_hole(self, tok: Token) -> ast.Hole:
        return ast.Hole(str(tok)[1:], span=_tok_span(tok, self.filename))

    def hole_in_layer(self, meta, c):
        layer = _int(c[1], self.filename)
        return ast.HoleIn(self._constraint_hole(c[0]), ((layer, layer),), span=self._span(meta))

    def hole_in_layers(self, meta, c):
        return ast.HoleIn(self._constraint_hole(c[0]), tuple(c[1:]), span=self._span(meta))

    def layer_range(self, meta, c):
        first = _int(c[0], self.filename)
        return (first, _int(c[-1], self.filename) if len(c) > 1 else first)

    def hole_in_heads(self, meta, c):
        heads = tuple(_parse_headref(t, self.filename) for t in c[1:])
        return ast.HoleIn(self._constraint_hole(c[0]), heads=heads, span=self._span(meta))

    def hole_size(self, meta, c):
        hole, bound, count, unit = c
        words = {"MOST": "at most", "LEAST": "at least", "EXACTLY": "exactly"}
        return ast.HoleSize(self._constraint_hole(hole), words[bound.type],
                            _int(count, self.filename), unit, span=self._span(meta))

    def size_unit(self, meta, c):
        return "features" if str(c[0]).startswith("feature") else "heads"

    # -- expectations
    def expect(self, meta, c):
        each = isinstance(c[0], Token) and c[0].type == "EACH"
        lhs, op, rhs = c[1:] if each else c
        return ast.Expect(each, lhs, str(op), rhs, span=self._span(meta))

    def number(self, meta, c):
        return ast.Number(_decimal(c[0], self.filename), span=self._span(meta))

    def name(self, meta, c):
        return ast.Name(str(c[0]), span=self._span(meta))

    def call(self, meta, c):
        return ast.Call(str(c[0]), tuple(c[1:]), span=self._span(meta))

    def _binop(self, op, meta, c):
        left, right = c[0], c[-1]
        return ast.BinOp(op, left, right, span=self._span(meta))

    def add(self, meta, c):
        return self._binop("+", meta, c)

    def sub(self, meta, c):
        return self._binop("-", meta, c)

    def mul(self, meta, c):
        return self._binop("*", meta, c)

    def div(self, meta, c):
        return self._binop("/", meta, c)

    def neg(self, meta, c):
        return ast.Neg(c[-1], span=self._span(meta))


# ------------------------------------------------------------ comments, layout


def _scan_comments(source: str) -> dict[int, tuple[str, bool]]:
    """Line number -> (comment text after '#', whether code precedes it on the line)."""
    found: dict[int, tuple[str, bool]] = {}
    for lineno, line in enumerate(source.split("\n"), start=1):
        in_string, escaped = False, False
        for col, ch in enumerate(line):
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch == "#":
                text = line[col + 1 :].rstrip()
                found[lineno] = (text, bool(line[:col].strip()))
                break
    return found


def _attach_trivia(program: ast.Program, source: str) -> ast.Program:
    comments = _scan_comments(source)
    lines = source.split("\n")

    def is_blank(lineno: int) -> bool:
        return 1 <= lineno <= len(lines) and not lines[lineno - 1].strip()

    def attach(stmt, prev_line: int):
        """Trivia for one statement; prev_line is the last line the previous one used."""
        first = stmt.span.line
        leading: list[str | None] = []
        blank_before = False
        for ln in range(prev_line + 1, first):
            if ln in comments and not comments[ln][1]:
                leading.append(comments[ln][0])
            elif is_blank(ln):
                if not leading:
                    blank_before = True
                elif leading[-1] is not None:
                    leading.append(None)
        trailing = None
        if first in comments and comments[first][1]:
            trailing = comments[first][0]
        trivia = ast.Trivia(tuple(leading), trailing, blank_before)
        if isinstance(stmt, ast.VerbDef):
            body, last = [], first
            for inner in stmt.body:
                body.append(attach(inner, last))
                last = inner.span.end_line
            stmt = replace(stmt, body=tuple(body))
        return replace(stmt, trivia=trivia)

    statements, last = [], 0
    for stmt in program.statements:
        statements.append(attach(stmt, last))
        last = stmt.span.end_line
        if isinstance(stmt, ast.VerbDef) and stmt.body:
            last = max(last, stmt.body[-1].span.end_line)
    trailing = tuple(
        comments[ln][0] for ln in sorted(comments) if ln > last and not comments[ln][1]
    )
    return replace(program, statements=tuple(statements), trailing_comments=trailing)
