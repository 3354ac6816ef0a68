"""The canonical printer: `Program` (AST) -> text.

`format(parse(text))` re-parses to an equal AST, and formatting is idempotent:
`format(parse(format(p))) == format(p)`. Canonical layout: one statement per line,
single spaces between tokens, `, ` between list items, verb bodies indented by four
spaces. A head keeps the form it was written in (`head 5.5` or bare `5.5`; the
two are equal ASTs); a head built without a source is printed `head 5.5`. Comments are kept (full-line comments above their
statement, end-of-line comments after two spaces), as are single blank lines
between statements. `circuitlang fmt` writes this form back to files.
"""
from __future__ import annotations

import re
from decimal import Decimal

from circuitlang import ast

__all__ = ["format", "format_target", "format_expr", "format_statement"]

_MODEL_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-/]*")
_BARE_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INDENT = "    "


def format(program: ast.Program) -> str:  # noqa: A001 - the public name is circuitlang.format
    """Print a program in canonical form.

    Args:
        program: the AST, as `circuitlang.parse` returns it (or built by hand).

    Returns:
        The canonical text, ending with a newline (empty programs give "").
    """
    lines: list[str] = []
    _block(program.statements, lines, "")
    for comment in program.trailing_comments:
        lines.append(f"#{comment}")
    return "\n".join(lines) + "\n" if lines else ""


def _block(statements, lines: list[str], indent: str) -> None:
    for i, stmt in enumerate(statements):
        trivia = getattr(stmt, "trivia", ast.NO_TRIVIA)
        leading = list(trivia.leading)
        blank = trivia.blank_before or (bool(leading) and leading[0] is None)
        while leading and leading[0] is None:
            leading.pop(0)
        if blank and i > 0:
            lines.append("")
        for j, comment in enumerate(leading):
            if comment is None:
                if leading[j - 1] is not None:  # one blank line, however many were asked
                    lines.append("")
            else:
                lines.append(f"{indent}#{comment}")
        text = indent + format_statement(stmt)
        if trivia.trailing is not None:
            text += f"  #{trivia.trailing}"
        lines.append(text)
        if isinstance(stmt, ast.VerbDef):
            _block(stmt.body, lines, indent + _INDENT)


def format_statement(stmt: ast.Statement) -> str:
    """One statement on one line (a verb definition: its header line only)."""
    match stmt:
        case ast.Cite(text=text):
            return f"cite {_quote(text)}"
        case ast.ModelDecl(name=name):
            bare = _MODEL_ID.fullmatch(name) is not None
            return f"model {name if bare else _quote(name)}"
        case ast.TaskDecl(name=name, params=params):
            bare = _MODEL_ID.fullmatch(name) is not None
            text = f"task {name if bare else _quote(name)}"
            return text + "".join(f" {p.name}={_param_value(p.value)}" for p in params)
        case ast.Use(path=path):
            return "use " + ".".join(path)
        case ast.MetricDecl(name=name):
            return f"metric {name}"
        case ast.AblationDecl(mode=mode, given=given):
            text = f"ablation {mode}"
            if given:
                text += " given " + ", ".join(_feature(f) for f in given)
            return text
        case ast.SemanticsDecl(mode=mode):
            return f"semantics {mode}"
        case ast.Reported(name=name, value=value):
            return f"reported {name} = {_decimal(value)}"
        case ast.Setting(name=name, value=value):
            return f"{name} {value}"
        case ast.GroupDef(name=name, target=target):
            return f"group {name} = {format_target(target)}"
        case ast.Depends(target=target, position=position, features=features):
            feats = ", ".join(_feature(f) for f in features) if features else "nothing"
            return f"{format_target(target)} at {_position(position)} depends on {feats}"
        case ast.Edge(sender=s, receiver=r, position=p):
            return f"{_endpoint(s)} -> {_endpoint(r)} at {_position(p)}"
        case ast.VerbUse(subject=subject, verb=verb, terms=terms):
            return " ".join([_verb_subject(subject, verb), verb, *(_term(t) for t in terms)])
        case ast.VerbDef(subject=subject, words=words):
            pattern = " ".join(_pattern_item(w) for w in words)
            return f"verb ${subject} {pattern}:"
        case ast.Patch(target=target, position=position, direction=direction):
            text = f"patch {format_target(target)} at {_position(position)}"
            return text if direction is None else f"{text} {direction}"
        case ast.PathPatch(sender=s, receiver=r, position=p):
            return f"patch {_endpoint(s)} -> {_endpoint(r)} at {_position(p)}"
        case ast.Ablate(target=target, mode=mode, position=position):
            text = f"ablate {format_target(target)}"
            if mode is not None:
                text += f" with {mode}"
            if position is not None:
                text += f" at {_position(position)}"
            return text
        case ast.Trace(site=site, position=position, options=options):
            return f"trace {site} * at {_position(position)}" + _options(options)
        case ast.Probe(site=site, position=position, feature=feature, options=options):
            return f"probe {site} * at {_position(position)} for {feature}" + _options(options)
        case ast.Expect(each=each, lhs=lhs, op=op, rhs=rhs):
            quant = "each " if each else ""
            return f"expect {quant}{format_expr(lhs)} {op} {format_expr(rhs)}"
        case ast.HoleIn(hole=hole, layers=layers, heads=heads):
            if heads:
                return f"?{hole.name} in heads " + ", ".join(_headref(h) for h in heads)
            if len(layers) == 1 and layers[0][0] == layers[0][1]:
                return f"?{hole.name} in layer {layers[0][0]}"
            ranges = (str(a) if a == b else f"{a}-{b}" for a, b in layers)
            return f"?{hole.name} in layers " + ", ".join(ranges)
        case ast.HoleSize(hole=hole, bound=bound, count=count, unit=unit):
            word = "feature" if unit == "features" else "head"
            return f"?{hole.name} has {bound} {count} {word if count == 1 else word + 's'}"
        case ast.SaeDecl(name=name, path=path, hook=hook, layer=layer):
            return f"sae {name} = {_quote(path)} at {hook} {layer}"
        case ast.SubspaceDecl(name=name, path=path, hook=hook, layer=layer, head=head):
            return f"subspace {name} = {_quote(path)} at {_subspace_place(hook, layer, head)}"
        case ast.Align(name=name, hook=hook, layer=layer, head=head, position=position, feature=feature,
                       options=options):
            return (f"align {name} at {_subspace_place(hook, layer, head)} at {_position(position)} "
                    f"with {feature}" + _options(options))
    raise TypeError(f"not a circuitlang statement: {stmt!r}")


# ------------------------------------------------------------------ pieces


def _subspace_place(hook: str, layer: int, head: int | None) -> str:
    return f"head {layer}.{head}.out" if hook == "head" else f"{hook} {layer}"


def _quote(text: str) -> str:
    escaped = (
        text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    )
    return f'"{escaped}"'


def _decimal(value: Decimal) -> str:
    # as written: `3.10` stays `3.10` (the digits a paper reports are information)
    sign = "-" if value.is_signed() and value != 0 else ""
    text = str(abs(value))
    if "E" in text:  # 3e2 is printed 300, 1e-3 is printed 0.001
        text = f"{abs(value):f}"
    return sign + text


def _param_value(value: ast.ParamValue) -> str:
    """A task parameter's value: `20`, `0.5`, `true`, `ABBA`, `"two words"`, `[0, 1]`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Decimal):
        return _decimal(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_param_value(v) for v in value) + "]"
    if _BARE_WORD.fullmatch(value) and value not in ("true", "false"):
        return value
    return _quote(value)


def _channel(channel: str | None) -> str:
    return "" if channel is None else f".{channel}"


def _headref(ref: ast.HeadRef) -> str:
    layer = "*" if ref.layer is None else str(ref.layer)
    head = "*" if ref.head is None else str(ref.head)
    return f"{layer}.{head}{_channel(ref.channel)}"


def _hole(hole: ast.Hole) -> str:
    return f"?{hole.name}{_channel(hole.channel)}"


def _head_item(item: ast.HeadRef | ast.Hole) -> str:
    return _hole(item) if isinstance(item, ast.Hole) else _headref(item)


def _layer(layer: int | ast.Hole | None) -> str:
    if layer is None:
        return "*"
    if isinstance(layer, ast.Hole):
        return f"?{layer.name}"
    return str(layer)


def format_target(target: ast.Target) -> str:
    """A site, group, hole or slot as written in a claim (`head 9.6`, `name_movers.q`)."""
    match target:
        case ast.HeadTarget(ref=ref, keyword=False):
            return _head_item(ref)
        case ast.HeadTarget(ref=ast.HeadRef(layer=None, head=None, channel=None)):
            return "head *"
        case ast.HeadTarget(ref=ref):
            return f"head {_head_item(ref)}"
        case ast.HeadsTarget(items=items):
            return "heads " + ", ".join(_head_item(i) for i in items)
        case ast.MlpTarget(layer=layer):
            return f"mlp {_layer(layer)}"
        case ast.ResidTarget(layer=layer):
            return f"resid {_layer(layer)}"
        case ast.EmbedTarget():
            return "embed"
        case ast.LogitsTarget():
            return "logits"
        case ast.GroupTarget(name=name, channel=channel):
            return f"{name}{_channel(channel)}"
        case ast.SlotTarget(name=name, channel=channel):
            return f"${name}{_channel(channel)}"
        case ast.NeuronTarget(ref=ref):
            return f"neuron {_headref(ref)}"
        case ast.NeuronsTarget(items=items):
            return "neurons " + ", ".join(_headref(i) for i in items)
        case ast.FeatureTarget(sae=sae, index=index):
            shown = "*" if index is None else _hole(index) if isinstance(index, ast.Hole) else index
            return f"feature {sae}.{shown}"
        case ast.FeaturesTarget(items=items):
            return "features " + ", ".join(format_target(i).removeprefix("feature ") for i in items)
        case ast.ErrorTarget(sae=sae):
            return f"error {sae}"
        case ast.SubspaceTarget(name=name):
            return f"subspace {name}"
    raise TypeError(f"not a circuitlang target: {target!r}")


def _verb_subject(subject: ast.Target, verb: str) -> str:
    """A verb use's subject. Right after a hole that starts a line, `in` and `has` are the
    keywords of hole constraints (`?s in layers 7-8`), so a verb with that first word is
    printed with its hole as `head ?h` (the same AST)."""
    if (isinstance(subject, ast.HeadTarget) and isinstance(subject.ref, ast.Hole)
            and not subject.keyword and verb in ("in", "has")):
        return f"head {_hole(subject.ref)}"
    return format_target(subject)


def _endpoint(target: ast.Target) -> str:
    """Edge endpoints: written as the user wrote them (`5.5` or `head 5.5`)."""
    return format_target(target)


def _position(position: ast.Position) -> str:
    if isinstance(position, ast.Slot):
        return f"${position.name}"
    if position.offset:
        return f"{position.name}{position.offset:+d}"
    return position.name


def _feature(feature: ast.Feature) -> str:
    if isinstance(feature, ast.Slot):
        return f"${feature.name}"
    if feature.arg is None:
        return feature.name
    return f"{feature.name}({_position(feature.arg)})"


def _term(term: ast.Term) -> str:
    match term:
        case ast.Word(text=text):
            return text
        case ast.PositionRef():
            return _position(term)
        case ast.FeatureRef():
            return _feature(term)
        case ast.HeadRef():
            return _headref(term)
        case ast.Hole():
            return _hole(term)
        case ast.Slot(name=name):
            return f"${name}"
    raise TypeError(f"not a verb term: {term!r}")


def _pattern_item(item: ast.Word | ast.Slot) -> str:
    return f"${item.name}" if isinstance(item, ast.Slot) else item.text


# ------------------------------------------------------------- expressions

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _expr_prec(expr: ast.Expr) -> int:
    if isinstance(expr, ast.BinOp):
        return _PREC[expr.op]
    if isinstance(expr, ast.Neg):
        return 3
    return 4


def format_expr(expr: ast.Expr) -> str:
    """An expression with the fewest parentheses that keep its tree."""
    match expr:
        case ast.Number(value=value):
            return _decimal(value)
        case ast.Name(name=name):
            return name
        case ast.Call(func=func, args=args):
            return f"{func}({', '.join(format_expr(a) for a in args)})"
        case ast.Neg(operand=operand):
            inner = format_expr(operand)
            return f"-{inner}" if _expr_prec(operand) >= 3 else f"-({inner})"
        case ast.BinOp(op=op, left=left, right=right):
            prec = _PREC[op]
            ltext, rtext = format_expr(left), format_expr(right)
            if _expr_prec(left) < prec:
                ltext = f"({ltext})"
            if _expr_prec(right) <= prec:
                rtext = f"({rtext})"
            return f"{ltext} {op} {rtext}"
    raise TypeError(f"not an expression: {expr!r}")


def _options(options) -> str:
    """` noise 3.0 window 10`, ` save "x.safetensors"`: an experiment's options as written."""
    parts = []
    for name, value in options:
        parts.append(f" {name} {_quote(value) if isinstance(value, str) else repr(value)}")
    return "".join(parts)
