"""Claims: depends-claims, edges and verb uses, expanded into core IR claims.

Verb uses are matched against the verb patterns in scope (`circuitlang.verbs` does
the matching and the substitution, AST to AST) and the claims they give are resolved
like any other; groups become their heads.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from circuitlang import ast, ir, sites, topology, verbs
from circuitlang.errors import Span
from circuitlang import text_to_ast
from circuitlang.text_to_ast import check_claim_count


@dataclass(frozen=True, slots=True)
class _Origin:
    """The statement a claim comes from (for verb expansions: the user's verb use)."""

    span: Span | None
    text: str
    verb: str | None = None



_MAX_VERB_DEPTH = 16


class ClaimResolver:
    """Claims and verb expansion (a part of `_Resolver`)."""

    # -- claims
    def _claims(self, stmt, origin: _Origin, depth: int) -> list[ir.Claim]:
        match stmt:
            case ast.Depends(target=target, position=position, features=features):
                found = self._sites(target)
                pos = self._position(position)
                feats = [self._feature(f) for f in features]
                if found is None or pos is None or None in feats:
                    return []
                return [ir.DependsClaim(site, pos, tuple(feats), origin.text, origin.verb,
                                        span=origin.span) for site in found]
            case ast.Edge(sender=sender, receiver=receiver, position=position):
                senders = self._sites(sender)
                receivers = self._sites(receiver)
                pos = self._position(position)
                if senders is None or receivers is None or pos is None:
                    return []
                return [ir.EdgeClaim(s, r, pos, origin.text, origin.verb, span=origin.span)
                        for s, r in self._edges(senders, receivers, stmt.span)]
            case ast.VerbUse():
                return self._verb_use(stmt, origin, depth)
        raise TypeError(f"not a claim: {stmt!r}")  # pragma: no cover

    def _edges(self, senders, receivers, span):
        """Every (sender, receiver) pair of an edge statement.

        An edge between groups means every pair that can exist: pairs that would run
        backwards (a layer-9 head into MLP 8) are left out. Only when no pair can
        exist, or a single-site edge runs backwards, is it an error.
        """
        too_many = check_claim_count(self._edge_count(senders, receivers), span)
        if too_many is not None:
            self.report(too_many.code, too_many.message, too_many.span, too_many.hint)
            return []
        candidates = []
        for s in senders:
            for r in receivers:
                rs = [r]
                if isinstance(r, sites.Head) and r.channel is sites.Channel.OUT:
                    # an edge into a head, no channel named: through q, k and v
                    rs = [r.with_channel(c) for c in (sites.Channel.Q, sites.Channel.K,
                                                      sites.Channel.V)]
                candidates.extend((s, rr) for rr in rs)
        forward = [(s, r) for s, r in candidates
                   if _is_hole(s, r) or topology.edge_exists(self.shape, s, r)]
        if len(senders) * len(receivers) > 1 and forward:
            candidates = forward
        return [(s, r) for s, r in candidates if self._edge_ok(s, r, span)]

    def _edge_count(self, senders, receivers) -> int:
        """How many claims an edge statement makes, counted (stopping just past the limit)
        before any is made: a hostile file stops before its claims exist."""
        limit = text_to_ast.MAX_CLAIMS
        count = 0
        for s in senders:
            for r in receivers:
                channels = 3 if isinstance(r, sites.Head) and r.channel is sites.Channel.OUT else 1
                receiver = r.with_channel(sites.Channel.Q) if channels == 3 else r
                if _is_hole(s, r) or topology.edge_exists(self.shape, s, receiver) or \
                        len(senders) * len(receivers) == 1:
                    count += channels
                    if count > limit:
                        return count
        return count

    def _edge_ok(self, s, r, span) -> bool:
        """Whether `s -> r` is an edge of the model (`circuitlang.topology` decides);
        reports why not."""
        if isinstance(s, ir.Hole) or isinstance(r, ir.Hole):
            return True
        if isinstance(s, sites.Resid) or isinstance(r, sites.Resid):
            self.report("resolve.edge", f"{s if isinstance(s, sites.Resid) else r} is not a node "
                        "of the computational graph: it is the sum of every sender before it", span,
                        "name the senders it holds (embed, head L.H, mlp L) or the receiver that "
                        "reads it (head L.H.q / .k / .v, mlp L, logits)")
            return False
        if not topology.is_sender(s):
            self.report("resolve.edge", f"{s} cannot send along an edge", span,
                        topology.SENDERS_HINT)
            return False
        if not topology.is_receiver(r):
            self.report("resolve.edge", f"{r} cannot receive an edge", span,
                        topology.RECEIVERS_HINT)
            return False
        problem = topology.edge_problem(self.shape, s, r)
        if problem is not None:
            self.report("resolve.edge", f"edge {s} -> {r} is not in the model: {problem}",
                        span, "a site reads only what was computed before it: senders of earlier "
                        "layers (and, for an MLP without parallel attention, the heads of its "
                        "own layer)")
            return False
        return True

    def _verb_use(self, use: ast.VerbUse, origin: _Origin, depth: int) -> list[ir.Claim]:
        items = (ast.Word(use.verb, span=use.span), *use.terms)
        matches = [v for v in self.verbs if verbs.matches(v, items)]
        if not matches:
            self._unknown_verb(use, items)
            return []
        best = max(v.literal_words for v in matches)
        verb = [v for v in matches if v.literal_words == best][-1]
        if depth >= _MAX_VERB_DEPTH:
            self.report("resolve.verb_depth", f"verb `{verb.pattern}` expands into itself",
                        origin.span, "a verb's body may use other verbs, but not itself")
            return []
        env: dict[str, object] = {verb.definition.subject: use.subject}
        for param, item in zip(verb.params, items):
            if param is not None:
                env[param] = item
        if origin.verb is None:
            origin = _Origin(origin.span, origin.text, verb.pattern)
        outer = self.origin
        self.origin = origin if verb.source != (self.filename or "<string>") else outer
        try:
            claims: list[ir.Claim] = []
            for body_stmt in verb.definition.body:
                inst = self._instantiate(body_stmt, env, verb)
                if inst is not None:
                    claims.extend(self._claims(inst, origin, depth + 1))
            return claims
        finally:
            self.origin = outer

    def _unknown_verb(self, use: ast.VerbUse, items) -> None:
        said = " ".join(verbs.term_text(t) for t in items)
        patterns = [v.pattern.split(" ", 1)[1] for v in self.verbs]
        by_first = [p for p, v in zip(patterns, self.verbs) if v.skeleton[0] == use.verb]
        pool = by_first or patterns
        close = difflib.get_close_matches(said, pool, n=1, cutoff=0.0)
        hint = f"the nearest verb is `{close[0]}`" if close else "no verbs are defined"
        if by_first and len(by_first) > 1:
            hint = "verbs starting with that word: " + "; ".join(f"`{p}`" for p in by_first)
        self.report("resolve.verb", f"unknown verb `{said}`", use.span, hint)

    # -- verb instantiation (substitute parameters into a body statement)
    def _instantiate(self, stmt, env: dict, verb: verbs.Verb):
        try:
            inst = verbs.instantiate(stmt, env)
        except verbs.BadArgument as bad:
            self.report("resolve.verb_arg", bad.message, bad.span,
                        f"verb `{verb.pattern}`: {bad.hint}")
            return None
        if inst is None:
            self.report("resolve.verb_body", "a verb body may hold only claims", stmt.span,
                        "write `SITE at P depends on F`, `A -> B at P`, or a verb use")
        return inst


    # -- holes
    def _check_holes(self, claims, experiments) -> None:
        kinds: dict[str, str] = {}
        for claim in claims:
            parts = (claim.site,) if isinstance(claim, ir.DependsClaim) else (
                claim.sender, claim.receiver)
            for site in parts:
                if isinstance(site, ir.Hole):
                    kind = (site.kind if site.sae is None else f"latent of SAE {site.sae.name}"
                            if site.kind == "latent" else f"group of latents of SAE {site.sae.name}")
                    seen = kinds.setdefault(site.name, kind)
                    if seen != kind:
                        self.report("resolve.hole", f"hole ?{site.name} is used both as a "
                                    f"{seen} and as a {kind}", claim.span,
                                    "use a different name for each unknown")



def _is_hole(*parts) -> bool:
    return any(isinstance(p, ir.Hole) for p in parts)
