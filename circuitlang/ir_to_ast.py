"""Print a resolved hypothesis back as a program: IR -> AST (then `circuitlang.format`).

Takes a `Hypothesis` (resolved, or built by the solver) and gives an `ast.Program`
that resolves back to the same claims, experiments and expectations:
`resolve(parse(format(ir_to_ast(h))))` equals `h` in everything but the imports and
the source text (tests/test_ir_to_ast.py). It is the one way back from IR to text:
`circuitlang discover` writes the circuits it finds with it, and the CLI prints
resolved claims with it.

Verbs are already expanded in the IR, so the program holds core claims: one
`SITE at P depends on F` or `A -> B at P` per IR claim (`heads a, b` when claims
differ only in their head, `features a.1, a.5` in their latent of one SAE, with
`group_heads=True`). The header keeps the model,
the task and its parameters, the metric (when the file named one), the ablation,
the semantics, seed, samples, citations and reported numbers; groups are kept as
definitions. Expectations are sympy expressions and come back as expressions with
the same value (`0.85`, `0.5 * clean`, `abs(x - y)`).
"""
from __future__ import annotations

import os
from decimal import Decimal

import sympy

from circuitlang import ast, ir, sites
from circuitlang.errors import CircuitlangError

__all__ = ["claim_to_ast", "expr_to_ast", "ir_to_ast", "site_to_target", "claim_text"]


def ir_to_ast(hypothesis: ir.Hypothesis, *, group_heads: bool = False, comments: tuple[str, ...] = (),
              base: "str | os.PathLike | None" = None) -> ast.Program:
    """A program that resolves back to `hypothesis`.

    Args:
        hypothesis: the resolved hypothesis.
        group_heads: write claims that differ only in their head (or their latent of one
            SAE) as one statement (`heads 1.0, 1.2 at END depends on IO`, `features a.1, a.5
            at END depends on IO`).
        comments: full-line comments to put above the first statement (a header).
        base: the folder the program will be saved in: SAE folders and subspace files
            are written relative to it (a file reads them only inside its own folder
            tree); None: as resolved (absolute).
    """
    h = hypothesis
    out: list = []
    for text in h.citations:
        out.append(ast.Cite(text))
    if h.model is not None:
        out.append(ast.ModelDecl(str(h.model)))
    out.append(_task_decl(h))
    if h.metric and getattr(h, "metric_named", True):
        out.append(ast.MetricDecl(h.metric))
    if h.ablation != ir.Ablation():
        out.append(ast.AblationDecl(h.ablation.mode, tuple(_feature(f) for f in h.ablation.given)))
    if h.semantics != ir.DEFAULT_SEMANTICS:
        out.append(ast.SemanticsDecl(h.semantics))
    if h.seed is not None:
        out.append(ast.Setting("seed", h.seed))
    if h.samples is not None:
        out.append(ast.Setting("samples", h.samples))
    for r in h.reported:
        out.append(ast.Reported(r.name, Decimal(repr(r.value))))
    for sae in h.saes:
        out.append(ast.SaeDecl(sae.name, _path(sae.path, base), sae.hook, sae.layer))
    for basis in _bases(h):
        out.append(ast.SubspaceDecl(basis.name, _path(basis.path, base), basis.hook, basis.layer, basis.head))
    for name, heads in h.groups:
        out.append(ast.GroupDef(name, ast.HeadsTarget(tuple(_headref(x) for x in heads))))
    out += _claims(h.claims, group_heads)
    for constraint in getattr(h, "hole_constraints", ()):
        out += _constraint(constraint)
    for exp in h.experiments:
        out.append(_experiment(exp))
    for e in h.expectations:
        out.append(ast.Expect(e.kind == "each", expr_to_ast(e.lhs), e.op, expr_to_ast(e.rhs)))
    if comments and out:
        first = out[0]
        trivia = ast.Trivia(leading=tuple(f" {c}" if c and not c.startswith(" ") else c for c in comments))
        out[0] = _with_trivia(first, trivia)
    return ast.Program(tuple(out))


def claim_text(claim: ir.Claim) -> str:
    """One IR claim as the core statement it is (`head 9.6 at END depends on IO`)."""
    from circuitlang.printer import format_statement

    return format_statement(claim_to_ast(claim))


def _with_trivia(stmt, trivia):
    import dataclasses

    return dataclasses.replace(stmt, trivia=trivia)


def _task_decl(h: ir.Hypothesis) -> ast.TaskDecl:
    params = dict(getattr(h, "task_params", ()) or ())
    name = h.task
    if name == "custom" and "path" in params:
        name = str(params.pop("path"))
    return ast.TaskDecl(name, tuple(ast.TaskParam(k, _param_value(v)) for k, v in sorted(params.items())))


def _param_value(value):
    if isinstance(value, bool) or isinstance(value, (int, str, Decimal)):
        return value
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, (list, tuple)):
        return tuple(_param_value(v) for v in value)
    return str(value)


# ----------------------------------------------------------------- claims


def _claims(claims, group_heads: bool) -> list:
    statements = [claim_to_ast(c) for c in claims]
    if not group_heads:
        return statements
    out: list = []
    keys: list = []
    for claim, stmt in zip(claims, statements):
        key = _group_key(claim)
        if key is not None and keys and keys[-1] == key:
            previous = out[-1]
            out[-1] = _merge(previous, claim)
            continue
        out.append(stmt)
        keys.append(key)
    return out


def _group_key(claim):
    """Claims with the same key differ only in the head (or the latent of one SAE) they name,
    and may be merged."""
    if isinstance(claim, ir.DependsClaim) and isinstance(claim.site, sites.Head):
        return ("depends", claim.site.channel, claim.position, claim.features)
    if isinstance(claim, ir.DependsClaim) and isinstance(claim.site, sites.Latent):
        return ("latents", claim.site.sae, claim.position, claim.features)
    return None


def _merge(stmt: ast.Depends, claim: ir.DependsClaim) -> ast.Depends:
    import dataclasses

    if isinstance(claim.site, sites.Latent):
        items = stmt.target.items if isinstance(stmt.target, ast.FeaturesTarget) else (stmt.target,)
        return dataclasses.replace(stmt, target=ast.FeaturesTarget(items + (site_to_target(claim.site),)))
    items = stmt.target.items if isinstance(stmt.target, ast.HeadsTarget) else (stmt.target.ref,)
    return dataclasses.replace(stmt, target=ast.HeadsTarget(items + (_headref(claim.site),)))


def claim_to_ast(claim: ir.Claim):
    """One IR claim as an AST statement (a core claim)."""
    if isinstance(claim, ir.DependsClaim):
        return ast.Depends(site_to_target(claim.site), _position(claim.position),
                           tuple(_feature(f) for f in claim.features))
    if isinstance(claim, ir.EdgeClaim):
        return ast.Edge(site_to_target(claim.sender), site_to_target(claim.receiver), _position(claim.position))
    raise CircuitlangError(f"not a claim: {claim!r}", code="print.not-a-claim")


def _headref(head: sites.Head) -> ast.HeadRef:
    channel = None if head.channel is sites.Channel.OUT else head.channel.value
    return ast.HeadRef(head.layer, head.head, channel)


def site_to_target(site) -> ast.Target:
    """A typed site (or hole) as the target that names it."""
    match site:
        case ir.Hole(name=name, kind="head", channel=channel):
            ch = None if channel is sites.Channel.OUT else channel.value
            return ast.HeadTarget(ast.Hole(name, ch))
        case ir.Hole(name=name, kind="group", channel=channel):
            ch = None if channel is sites.Channel.OUT else channel.value
            return ast.HeadsTarget((ast.Hole(name, ch),))
        case ir.Hole(name=name, kind="mlp"):
            return ast.MlpTarget(ast.Hole(name))
        case ir.Hole(name=name, kind="resid"):
            return ast.ResidTarget(ast.Hole(name))
        case ir.Hole(name=name, kind="latent", sae=sae):
            return ast.FeatureTarget(sae.name, ast.Hole(name))
        case ir.Hole(name=name, kind="latents", sae=sae):
            return ast.FeaturesTarget((ast.FeatureTarget(sae.name, ast.Hole(name)),))
        case sites.Head():
            return ast.HeadTarget(_headref(site))
        case sites.Mlp(layer=layer):
            return ast.MlpTarget(layer)
        case sites.Resid(layer=layer):
            return ast.ResidTarget(layer)
        case sites.Embed():
            return ast.EmbedTarget()
        case sites.Logits():
            return ast.LogitsTarget()
        case sites.Subspace(basis=basis):
            return ast.SubspaceTarget(basis.name)
        case sites.Neuron(layer=layer, index=index):
            return ast.NeuronTarget(ast.HeadRef(layer, index))
        case sites.Latent(sae=sae, index=index):
            return ast.FeatureTarget(sae.name, index)
        case sites.SaeError(sae=sae):
            return ast.ErrorTarget(sae.name)
    raise CircuitlangError(f"{site} has no name in the language", code="print.unnamed-site",
                           hint="sites are heads, MLPs, resid, embed, logits, neurons, SAE latents and "
                           "errors, and subspaces")


def _path(path: str, base) -> str:
    """`path` relative to `base` when it lies inside it (else as it is), with `/`."""
    if base is None:
        return path
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(base))
    if rel.startswith(".."):
        return path
    return rel.replace(os.sep, "/")


def _bases(h: ir.Hypothesis) -> list[sites.Basis]:
    """The fixed subspaces the claims and experiments name, in order of appearance (a
    basis `align` learns, or a random one, has no file to declare)."""
    found: dict[str, sites.Basis] = {}
    parts = [s for c in h.claims for s in ir._claim_sites(c)] + [s for e in h.experiments for s in ir._experiment_sites(e)]
    for site in parts:
        if isinstance(site, sites.Subspace):
            found.setdefault(site.basis.name, site.basis)
    for basis in found.values():
        if basis.seed is not None or basis.key != "basis" or not basis.path:
            raise CircuitlangError(f"subspace {basis.name} has no file to declare it from",
                                   code="print.unnamed-site",
                                   hint="save a learned basis with `align` and declare it with `subspace NAME = "
                                   "\"FILE\" at ...`")
    return list(found.values())


def _position(position: sites.Position) -> ast.PositionRef:
    return ast.PositionRef(position.name, position.offset)


def _feature(feature: ir.Feature) -> ast.FeatureRef:
    if feature.kind == "task":
        return ast.FeatureRef(feature.name)
    if feature.kind in ("token", "position"):
        return ast.FeatureRef(feature.kind, _position(sites.Position.parse(feature.name)))
    raise CircuitlangError(f"feature {feature} has no name in the language", code="print.unnamed-feature")


def _constraint(c: ir.HoleConstraint) -> list:
    """A hole constraint as the statements that say it (`?s in layers 7-8`, `?g has at most 4 heads`)."""
    hole = ast.Hole(c.hole)
    out: list = []
    if c.allowed is not None:
        if all(isinstance(x, sites.Head) for x in c.allowed):
            out.append(ast.HoleIn(hole, heads=tuple(ast.HeadRef(x.layer, x.head) for x in c.allowed)))
        else:
            layers = sorted({x.layer for x in c.allowed})
            ranges: list[tuple[int, int]] = []
            for layer in layers:
                if ranges and ranges[-1][1] == layer - 1:
                    ranges[-1] = (ranges[-1][0], layer)
                else:
                    ranges.append((layer, layer))
            out.append(ast.HoleIn(hole, layers=tuple(ranges)))
    if c.at_least is not None and c.at_least == c.at_most:
        out.append(ast.HoleSize(hole, "exactly", c.at_least, c.unit or "heads"))
    else:
        if c.at_least is not None:
            out.append(ast.HoleSize(hole, "at least", c.at_least, c.unit or "heads"))
        if c.at_most is not None:
            out.append(ast.HoleSize(hole, "at most", c.at_most, c.unit or "heads"))
    return out


# ------------------------------------------------------------- experiments


def _experiment(exp) -> object:
    if isinstance(exp, ir.Patch):
        return ast.Patch(_sites_target(exp.sites, exp.sweep, exp.axes), _position(exp.position),
                         None if exp.direction == "noise" else exp.direction)
    if isinstance(exp, ir.PathPatch):
        receivers = exp.receivers
        receiver = site_to_target(receivers[0]) if len(receivers) == 1 else _sites_target(receivers, False, ())
        return ast.PathPatch(_sites_target(exp.senders, exp.sweep, exp.axes), receiver, _position(exp.position))
    if isinstance(exp, ir.Ablate):
        position = None if exp.position.is_all else _position(exp.position)
        return ast.Ablate(_sites_target(exp.sites, False, ()), exp.mode, position)
    if isinstance(exp, ir.Trace):
        options = tuple((k, v) for k, v in (("noise", exp.noise), ("window", exp.window))
                        if v != ast.TRACE_OPTIONS[k])
        return ast.Trace(exp.site, _position(exp.position), options)
    if isinstance(exp, ir.Probe):
        options = (() if exp.heldout == 0.25 else (("heldout", exp.heldout),)) \
            + (() if exp.save is None else (("save", exp.save),))
        return ast.Probe(exp.site, _position(exp.position), exp.feature, options)
    if isinstance(exp, ir.Align):
        b = exp.basis
        given = (("dims", b.k), ("steps", exp.steps), ("pairs", exp.pairs), ("heldout", exp.heldout))
        defaults = {"dims": 1, "steps": 300, "pairs": 200, "heldout": 0.25}  # circuitlang.das.ALIGN_DEFAULTS
        options = tuple((k, v) for k, v in given if k == "dims" or v != defaults[k])
        return ast.Align(b.name, b.hook, b.layer, b.head, _position(exp.position), exp.feature, options)
    raise CircuitlangError(f"not an experiment: {exp!r}", code="print.not-an-experiment")


def _sites_target(found, sweep: bool, axes: tuple) -> ast.Target:
    """Sites as one target: a wildcard for a sweep, `heads a, b` for several heads."""
    first = found[0]
    if sweep and isinstance(first, sites.Head):
        channel = None if first.channel is sites.Channel.OUT else first.channel.value
        layer = None if "layer" in axes else first.layer
        head = None if "head" in axes else first.head
        return ast.HeadTarget(ast.HeadRef(layer, head, channel))
    if sweep and isinstance(first, (sites.Mlp, sites.Resid)):
        return (ast.MlpTarget if isinstance(first, sites.Mlp) else ast.ResidTarget)(None)
    if len(found) == 1:
        return site_to_target(first)
    if all(isinstance(s, sites.Head) for s in found):
        return ast.HeadsTarget(tuple(_headref(s) for s in found))
    raise CircuitlangError("these sites cannot be written as one target: "
                           + ", ".join(str(s) for s in found), code="print.mixed-sites")


# ------------------------------------------------------------- expressions


def expr_to_ast(expr: sympy.Expr) -> ast.Expr:
    """A sympy expression (as the resolver builds them) as an AST expression."""
    if expr.is_Number:
        return _number(sympy.Rational(expr))
    if expr.is_Symbol:
        return ast.Name(expr.name)
    if isinstance(expr, sympy.Abs):
        return ast.Call("abs", (expr_to_ast(expr.args[0]),))
    if isinstance(expr, (sympy.Min, sympy.Max)):
        name = "min" if isinstance(expr, sympy.Min) else "max"
        return ast.Call(name, tuple(expr_to_ast(a) for a in expr.args))
    if expr.is_Add:
        terms = list(expr.as_ordered_terms())
        out = expr_to_ast(terms[0])
        for term in terms[1:]:
            coeff, rest = term.as_coeff_Mul()
            if coeff < 0:
                out = ast.BinOp("-", out, expr_to_ast(-term))
            else:
                out = ast.BinOp("+", out, expr_to_ast(term))
        return out
    if expr.is_Mul:
        coeff, rest = expr.as_coeff_Mul()
        if coeff == -1:
            return ast.Neg(expr_to_ast(rest))
        if coeff != 1:  # `0.5 * clean` as written, not `clean / 2`
            return ast.BinOp("*", _number(sympy.Rational(coeff)), expr_to_ast(rest))
        numerator, denominator = sympy.fraction(expr)
        if denominator != 1:
            return ast.BinOp("/", expr_to_ast(numerator), expr_to_ast(denominator))
        factors = list(expr.as_ordered_factors())
        out = expr_to_ast(factors[0])
        for factor in factors[1:]:
            out = ast.BinOp("*", out, expr_to_ast(factor))
        return out
    if expr.is_Pow and expr.exp == -1:
        return ast.BinOp("/", ast.Number(Decimal(1)), expr_to_ast(expr.base))
    raise CircuitlangError(f"cannot write {expr} as a circuitlang expression", code="print.expression")


def _number(value: sympy.Rational) -> ast.Expr:
    if value < 0:
        return ast.Neg(_number(-value))
    p, q = int(value.p), int(value.q)
    if q == 1:
        return ast.Number(Decimal(p))
    # a terminating decimal prints as one (17/20 is 0.85); any other stays a division
    d = q
    for prime in (2, 5):
        while d % prime == 0:
            d //= prime
    if d == 1:
        return ast.Number(Decimal(p) / Decimal(q))
    return ast.BinOp("/", ast.Number(Decimal(p)), ast.Number(Decimal(q)))
