"""Holes: group holes (`heads ?g`) and the constraints on holes, checked against the model.

Takes the program's `?s in layers 7-8`, `?s in layer 5`, `?s in heads 9.6, 9.9` and
`?g has at most 4 heads` (`at least`, `exactly`; `?g has at most 8 features` for a latent
group hole) statements, the holes its claims and
experiments use, and the model's shape; gives one `ir.HoleConstraint` per statement
(`Hypothesis.hole_constraints`). What is checked, each with a message that says what
would have been valid:

* the hole is one some claim or experiment uses (a typo otherwise);
* layers are in the model and ranges run forward; `in heads` names heads in range,
  without a channel; an MLP hole is constrained by layers, not heads;
* a size constraint is about a group hole and counts what it holds (heads for `heads ?g`,
  features for `features res5.?g`), and allows at least one;
* together, a hole's constraints leave at least one candidate, and a group hole's
  bounds fit the candidates there are.

Which edges a candidate makes (`?s -> ?h.q at END` needs ?s below ?h) is the solver's
business (`circuitlang.discover.holes`), with the same `hole_domain`.

A hole in a `heads` list is a group hole: `heads ?g` is a set of heads of unknown
size, and a claim about it is a claim about each of its heads; a hole in a `features`
list (`features res5.?g`) is a set of that SAE's latents, the same way.
"""
from __future__ import annotations

from dataclasses import replace

from circuitlang import ast, ir, sites, verbs
from circuitlang.ast_to_ir.names import _similar
from circuitlang.printer import format_statement

__all__ = ["HoleResolver", "hole_domain", "hole_size"]


def hole_domain(shape: sites.ModelShape, kind: str,
                constraints: tuple[ir.HoleConstraint, ...] = ()) -> tuple[sites.Site, ...]:
    """Every site a hole of `kind` may be filled with under its `in` constraints, in model order.

    Args:
        shape: the model's shape.
        kind: the hole's kind ("head", "group", "mlp", "resid").
        constraints: the constraints on this hole (others are ignored by the caller).
    """
    if kind in ("head", "group"):
        every: list[sites.Site] = [sites.Head(layer, h) for layer in range(shape.n_layers)
                                   for h in range(shape.n_heads)]
    elif kind == "mlp":
        every = [sites.Mlp(layer) for layer in range(shape.n_layers)] if shape.has_mlp else []
    else:
        every = [sites.Resid(layer) for layer in range(shape.n_layers + 1)]
    for c in constraints:
        if c.allowed is not None:
            allowed = set(c.allowed)
            every = [s for s in every if s in allowed]
    return tuple(every)


def hole_size(constraints: tuple[ir.HoleConstraint, ...]) -> tuple[int, int | None]:
    """(at least, at most) heads of a group hole under its size constraints (at least 1;
    None: no upper bound)."""
    lo, hi = 1, None
    for c in constraints:
        if c.at_least is not None:
            lo = max(lo, c.at_least)
        if c.at_most is not None:
            hi = c.at_most if hi is None else min(hi, c.at_most)
    return lo, hi


def _holes(claims, experiments) -> dict[str, ir.Hole]:
    """Each hole the claims and experiments use, as first seen."""
    found: dict[str, ir.Hole] = {}
    for claim in claims:
        parts = (claim.site,) if isinstance(claim, ir.DependsClaim) else (claim.sender, claim.receiver)
        for site in parts:
            if isinstance(site, ir.Hole):
                found.setdefault(site.name, site)
    for exp in experiments:
        parts = exp.senders + exp.receivers if isinstance(exp, ir.PathPatch) else exp.sites
        for site in parts:
            if isinstance(site, ir.Hole):
                found.setdefault(site.name, site)
    return found


_KIND_WORDS = {"head": "one head (`head ?{0}`)", "group": "a group of heads (`heads ?{0}`)",
               "mlp": "an MLP (`mlp ?{0}`)", "resid": "a residual stream (`resid ?{0}`)",
               "latent": "a latent of an SAE (`feature NAME.?{0}`)",
               "latents": "a group of latents of an SAE (`features NAME.?{0}`)"}
_UNITS = {"group": "heads", "latents": "features"}  # what a group hole's size counts


class HoleResolver:
    """Group holes and hole constraints (a part of `_Resolver`)."""

    def _sites(self, target: ast.Target, *, wildcards: bool = False):
        """As `NameResolver._sites`, with a hole in a `heads` list a group hole."""
        found = super()._sites(target, wildcards=wildcards)
        if found is not None and isinstance(target, ast.HeadsTarget):
            found = [ir.Hole(s.name, "group", s.channel) if isinstance(s, ir.Hole) else s
                     for s in found]
        return found

    def _hole_constraints(self, program: ast.Program, claims, experiments
                          ) -> tuple[ir.HoleConstraint, ...]:
        """Every hole constraint of the program, checked (problems are reported)."""
        holes = _holes(claims, experiments)
        kinds = {name: hole.kind for name, hole in holes.items()}
        self._hole_saes = {name: hole.sae for name, hole in holes.items() if hole.sae is not None}
        out: list[ir.HoleConstraint] = []
        last_span: dict[str, object] = {}
        for stmt in program.statements:
            if not isinstance(stmt, (ast.HoleIn, ast.HoleSize)):
                continue
            name = stmt.hole.name
            if name not in kinds:
                self._unknown_hole(stmt, kinds)
                continue
            found = (self._hole_in(stmt, kinds[name]) if isinstance(stmt, ast.HoleIn)
                     else self._hole_size(stmt, kinds[name]))
            if found is not None:
                out.append(found)
                last_span[name] = stmt.span
        for name, kind in kinds.items():
            mine = tuple(c for c in out if c.hole == name)
            if mine:
                self._check_domain(name, kind, mine, last_span[name])
        return tuple(out)

    def _unknown_hole(self, stmt, kinds: dict[str, str]) -> None:
        name = stmt.hole.name
        close = _similar(name, kinds)
        if close:
            hint = f"did you mean ?{close}?"
        elif kinds:
            hint = "holes here: " + ", ".join(f"?{k}" for k in kinds)
        else:
            hint = "a constraint is about a hole that a claim uses, such as `head ?h moves IO to END`"
        self.report("resolve.hole_unknown", f"constraint on ?{name}, which no claim uses",
                    stmt.hole.span or stmt.span, hint)

    def _hole_in(self, stmt: ast.HoleIn, kind: str) -> ir.HoleConstraint | None:
        name, text = stmt.hole.name, format_statement(stmt)
        if kind in ir.LATENT_HOLES:
            self.report("resolve.hole_constraint", f"?{name} is {_KIND_WORDS[kind].format(name)}: its "
                        "SAE says where it is, so it takes no `in` constraint", stmt.span,
                        "drop this line; the solver ranks every latent of the SAE")
            return None
        if stmt.heads:
            if kind not in ("head", "group"):
                self.report("resolve.hole_constraint", f"?{name} is {_KIND_WORDS[kind].format(name)}, "
                            "not a head", stmt.span, f"say which layers it may be in, such as `?{name} "
                            f"in layer 0` or `?{name} in layers 0-{self.shape.n_layers - 1}`")
                return None
            channels = [h for h in stmt.heads if h.channel is not None]
            for ref in channels:
                self.report("resolve.hole_constraint", "a hole constraint names heads, not their "
                            "inputs", ref.span or stmt.span,
                            f"write {verbs.ref_text(ast.HeadRef(ref.layer, ref.head))}; the claims say "
                            "which channel")
            found = self._head_items([replace(h, channel=None) for h in stmt.heads], True)
            if found is None or channels:
                return None
            allowed = tuple(sorted(set(found), key=lambda h: (h.layer, h.head)))
            return ir.HoleConstraint(name, allowed, text=text, span=stmt.span)
        top = self.shape.n_layers - 1 if kind != "resid" else self.shape.n_layers
        layers: set[int] = set()
        ok = True
        for first, last in stmt.layers:
            if first > last:
                self.report("resolve.hole_constraint", f"layers {first}-{last} run backwards",
                            stmt.span, f"write `?{name} in layers {last}-{first}`")
                ok = False
            elif last > top:
                what = "layers" if first != last else "layer"
                shown = f"{first}-{last}" if first != last else str(last)
                hint = f"layers are 0-{top}"
                if first < top:
                    hint = f"did you mean `?{name} in layers {first}-{top}`?"
                self.report("resolve.layer_range", f"{what} {shown} out of range (model has layers "
                            f"0-{top})", stmt.span, hint)
                ok = False
            else:
                layers.update(range(first, last + 1))
        if not ok:
            return None
        if kind in ("head", "group"):
            allowed = tuple(sites.Head(layer, h) for layer in sorted(layers)
                            for h in range(self.shape.n_heads))
        elif kind == "mlp":
            allowed = tuple(sites.Mlp(layer) for layer in sorted(layers))
        else:
            allowed = tuple(sites.Resid(layer) for layer in sorted(layers))
        return ir.HoleConstraint(name, allowed, text=text, span=stmt.span)

    def _hole_size(self, stmt: ast.HoleSize, kind: str) -> ir.HoleConstraint | None:
        name, count, text = stmt.hole.name, stmt.count, format_statement(stmt)
        if kind not in ir.GROUP_HOLES:
            self.report("resolve.hole_constraint", f"?{name} is {_KIND_WORDS[kind].format(name)}: "
                        f"only a group hole has a number of {stmt.unit}", stmt.span,
                        f"write `{self._group_form(name, stmt.unit)}` in its claims for a group of unknown "
                        "size, or drop this line")
            return None
        unit = _UNITS[kind]
        one = unit[:-1]
        if stmt.unit != unit:
            self.report("resolve.hole_size", f"?{name} is {_KIND_WORDS[kind].format(name)}, so its "
                        f"size counts {unit}, not {stmt.unit}", stmt.span,
                        f"write `?{name} has {stmt.bound} {count} {one if count == 1 else unit}`")
            return None
        if stmt.bound in ("at most", "exactly") and count < 1:
            self.report("resolve.hole_size", f"a group hole holds at least one {one}; `{text}` "
                        "allows none", stmt.span, f"write `?{name} has {stmt.bound} 1 {one}` or "
                        "more, or drop the claims about it")
            return None
        at_least = count if stmt.bound in ("at least", "exactly") else None
        at_most = count if stmt.bound in ("at most", "exactly") else None
        return ir.HoleConstraint(name, None, at_least, at_most, unit, text=text, span=stmt.span)

    def _check_domain(self, name: str, kind: str, constraints, span) -> None:
        if kind == "latents":  # only sizes: its SAE's latents are its candidates
            self._check_latent_group(name, constraints, span)
            return
        domain = hole_domain(self.shape, kind, constraints)
        texts = "; ".join(f"`{c.text}`" for c in constraints)
        if not domain:
            self.report("resolve.hole_empty", f"no {'head' if kind in ('head', 'group') else 'layer'} "
                        f"satisfies every constraint on ?{name}", span,
                        f"its constraints ({texts}) leave nothing to choose from; widen one")
            return
        if kind != "group":
            return
        lo, hi = hole_size(constraints)
        if hi is not None and lo > hi:
            self.report("resolve.hole_size", f"?{name} must hold at least {lo} and at most {hi} "
                        "heads", span, f"its constraints: {texts}")
        elif lo > len(domain):
            where = "in the model" if len(domain) == self.shape.n_layers * self.shape.n_heads \
                else "that satisfy its constraints"
            self.report("resolve.hole_size", f"?{name} must hold at least {lo} heads, but there "
                        f"are only {len(domain)} {where}", span,
                        f"ask for at most {len(domain)}, or widen where it may be")

    def _group_form(self, name: str, unit: str) -> str:
        """How a group hole called `name` holding `unit` is written (with its SAE, when known)."""
        if unit == "heads":
            return f"heads ?{name}"
        sae = self._hole_saes.get(name)
        return f"features {sae.name if sae is not None else 'NAME'}.?{name}"

    def _check_latent_group(self, name: str, constraints, span) -> None:
        sae = self._hole_saes.get(name)
        lo, hi = hole_size(constraints)
        texts = "; ".join(f"`{c.text}`" for c in constraints)
        if hi is not None and lo > hi:
            self.report("resolve.hole_size", f"?{name} must hold at least {lo} and at most {hi} "
                        "features", span, f"its constraints: {texts}")
        elif sae is not None and lo > sae.d_sae:
            self.report("resolve.hole_size", f"?{name} must hold at least {lo} features, but SAE "
                        f"{sae.name} has only {sae.d_sae} latents", span, f"ask for at most {sae.d_sae}")
