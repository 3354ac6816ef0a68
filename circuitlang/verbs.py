"""Verbs: definitions in scope, matching a use against them, and instantiating a body.

Takes `ast.VerbDef`s (from the prelude, imported files and the file itself) and
`ast.VerbUse`s; gives AST claims with every `$parameter` replaced by the argument the
use supplied. Everything here is AST to AST: the resolver (`ast_to_ir`) then resolves
the instantiated claims like any other, so a verb can mean nothing a user could not
have written by hand. An argument of the wrong kind (a position where a site must go)
raises `BadArgument`, which the resolver reports as a diagnostic at the use.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from circuitlang import ast
from circuitlang.errors import Span
from circuitlang.printer import format_target

__all__ = ["BadArgument", "Verb", "instantiate", "matches", "pattern_text", "slots_in",
           "term_text", "ref_text", "verb_of"]

CHANNEL_WORDS = ("q", "k", "v", "out", "pattern")


def pattern_text(verb: ast.VerbDef) -> str:
    """The pattern as written: `$h moves $x to $p`."""
    words = " ".join(f"${w.name}" if isinstance(w, ast.Slot) else w.text for w in verb.words)
    return f"${verb.subject} {words}"


@dataclass(frozen=True, slots=True)
class Verb:
    """A verb definition in scope."""

    skeleton: tuple[str | None, ...]  # words; None where a parameter goes
    params: tuple[str | None, ...]  # parameter names, None where a word goes
    definition: ast.VerbDef
    pattern: str  # `$h moves $x to $p`
    source: str  # the file it was defined in

    @property
    def literal_words(self) -> int:
        return sum(w is not None for w in self.skeleton)


def verb_of(defn: ast.VerbDef, source: str) -> Verb:
    """The `Verb` a definition from file `source` puts in scope."""
    skeleton = tuple(None if isinstance(w, ast.Slot) else w.text for w in defn.words)
    params = tuple(w.name if isinstance(w, ast.Slot) else None for w in defn.words)
    return Verb(skeleton, params, defn, pattern_text(defn), source)


class BadArgument(Exception):
    """A verb argument of the wrong kind (reported as a diagnostic, never raised out)."""

    def __init__(self, message: str, span: Span | None, hint: str):
        super().__init__(message)
        self.message, self.span, self.hint = message, span, hint


def instantiate(stmt, env: dict):
    """A body statement with its parameters replaced by `env`'s arguments.

    Returns None when the statement is not a claim (only claims may be in a body).

    Raises:
        BadArgument: an argument of the wrong kind for where its parameter is used.
    """
    match stmt:
        case ast.Depends(target=t, position=p, features=fs):
            return replace(stmt, target=_sub_target(t, env), position=_sub_position(p, env),
                           features=tuple(_sub_feature(f, env) for f in fs))
        case ast.Edge(sender=s, receiver=r, position=p):
            return replace(stmt, sender=_sub_target(s, env), receiver=_sub_target(r, env),
                           position=_sub_position(p, env))
        case ast.VerbUse(subject=s, terms=terms):
            return replace(stmt, subject=_sub_target(s, env),
                           terms=tuple(_sub_term(t, env) for t in terms))
    return None


def _sub_target(target: ast.Target, env: dict) -> ast.Target:
    if not isinstance(target, ast.SlotTarget):
        return target
    value = env.get(target.name)
    channel = target.channel
    if channel is not None and channel.startswith("$"):
        bound = env.get(channel[1:])
        if not isinstance(bound, ast.Word):
            raise BadArgument(f"{term_text(bound)} is not a channel",
                               getattr(bound, "span", None), "channels are "
                               + ", ".join(CHANNEL_WORDS))
        channel = bound.text
    match value:
        case ast.Word(text=text, span=span):
            base: ast.Target = ast.GroupTarget(text, None, span=span)
        case ast.HeadRef() | ast.Hole():
            base = ast.HeadTarget(value, span=value.span)
        case ast.PositionRef() | ast.FeatureRef() | ast.Slot():
            raise BadArgument(f"{term_text(value)} is not a site", value.span,
                               "here it must name a head or a group")
        case None:  # pragma: no cover - caught when the verb was defined
            raise BadArgument(f"unbound parameter ${target.name}", target.span, "")
        case _:
            base = value
    return with_channel(base, channel) if channel is not None else base

def _sub_position(pos: ast.Position, env: dict) -> ast.Position:
    if not isinstance(pos, ast.Slot):
        return pos
    value = env.get(pos.name)
    if isinstance(value, ast.Word):
        return ast.PositionRef(value.text, 0, span=value.span)
    if isinstance(value, ast.PositionRef):
        return value
    raise BadArgument(f"{term_text(value)} is not a position",
                       getattr(value, "span", None), "here it must be a position such "
                       "as END or S1+1")

def _sub_feature(feature: ast.Feature, env: dict) -> ast.Feature:
    if isinstance(feature, ast.Slot):
        value = env.get(feature.name)
        if isinstance(value, ast.Word):
            return ast.FeatureRef(value.text, span=value.span)
        if isinstance(value, ast.FeatureRef):
            return value
        raise BadArgument(f"{term_text(value)} is not a feature",
                           getattr(value, "span", None), "here it must be a feature such "
                           "as IO or token(IO)")
    if isinstance(feature.arg, ast.Slot):
        return replace(feature, arg=_sub_position(feature.arg, env))
    return feature

def _sub_term(term: ast.Term, env: dict) -> ast.Term:
    if not isinstance(term, ast.Slot):
        return term
    value = env.get(term.name)
    if isinstance(value, (ast.Word, ast.PositionRef, ast.FeatureRef, ast.HeadRef,
                          ast.Hole)):
        return value
    if isinstance(value, ast.HeadTarget):
        return value.ref
    if isinstance(value, ast.GroupTarget) and value.channel is None:
        return ast.Word(value.name, span=value.span)
    raise BadArgument(f"the subject {term_text(value)} cannot be passed on as an "
                       "argument", getattr(value, "span", None),
                       "pass a single head or a group")


def ref_text(ref: ast.HeadRef) -> str:
    """A head reference as written: `9.6`, `8.6.q`, `9.*`."""
    layer = "*" if ref.layer is None else str(ref.layer)
    head = "*" if ref.head is None else str(ref.head)
    return f"{layer}.{head}" + (f".{ref.channel}" if ref.channel else "")


def term_text(term) -> str:
    """A verb term, argument or subject as the user wrote it (for messages)."""
    match term:
        case ast.Word(text=text):
            return text
        case ast.PositionRef(name=name, offset=offset):
            return f"{name}{offset:+d}" if offset else name
        case ast.FeatureRef(name=name, arg=arg):
            return name if arg is None else f"{name}({term_text(arg)})"
        case ast.HeadRef():
            return ref_text(term)
        case ast.Hole(name=name):
            return f"?{name}"
        case ast.Slot(name=name):
            return f"${name}"
        case None:
            return "nothing"
    return format_target(term)


def matches(verb: Verb, items) -> bool:
    """Whether a use's words and arguments (verb word first) fit the verb's pattern."""
    if len(verb.skeleton) != len(items):
        return False
    for word, item in zip(verb.skeleton, items):
        if word is not None and not (isinstance(item, ast.Word) and item.text == word):
            return False
    return True


def with_channel(target: ast.Target, channel: str) -> ast.Target:
    """The target at another channel (`$g.q`); only heads and groups have channels."""
    match target:
        case ast.HeadTarget(ref=ref):
            return replace(target, ref=replace(ref, channel=channel))
        case ast.HeadsTarget(items=items):
            return replace(target, items=tuple(replace(i, channel=channel) for i in items))
        case ast.GroupTarget():
            return replace(target, channel=channel)
    raise BadArgument(f"{term_text(target)} has no channel {channel}", target.span,
                       "channels belong to heads and groups of heads")


def slots_in(body) -> list[tuple[str, Span | None]]:
    """Every verb parameter a body mentions, with where."""
    found: list[tuple[str, Span | None]] = []

    def target(t):
        if isinstance(t, ast.SlotTarget):
            found.append((t.name, t.span))
            if t.channel and t.channel.startswith("$"):
                found.append((t.channel[1:], t.span))

    def position(p):
        if isinstance(p, ast.Slot):
            found.append((p.name, p.span))

    for stmt in body:
        match stmt:
            case ast.Depends(target=t, position=p, features=fs):
                target(t)
                position(p)
                for f in fs:
                    if isinstance(f, ast.Slot):
                        found.append((f.name, f.span))
                    elif isinstance(f.arg, ast.Slot):
                        position(f.arg)
            case ast.Edge(sender=s, receiver=r, position=p):
                target(s)
                target(r)
                position(p)
            case ast.VerbUse(subject=s, terms=terms):
                target(s)
                for t in terms:
                    if isinstance(t, ast.Slot):
                        found.append((t.name, t.span))
                    elif isinstance(t, ast.FeatureRef) and isinstance(t.arg, ast.Slot):
                        position(t.arg)
    return found


