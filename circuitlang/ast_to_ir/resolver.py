"""The resolver: one pass over a program, collecting every problem, giving a `Hypothesis`."""
from __future__ import annotations

import dataclasses

from circuitlang import ast, ir, sites, topology, verbs
from circuitlang.ast_to_ir.claims import ClaimResolver, _Origin
from circuitlang.ast_to_ir.expressions import ExpressionResolver
from circuitlang.ast_to_ir.header import HeaderResolver
from circuitlang.ast_to_ir.holes import HoleResolver
from circuitlang.ast_to_ir.imports import ImportResolver
from circuitlang.ast_to_ir.names import NameResolver, _base_position, _similar
from circuitlang.ast_to_ir.subspaces import SubspaceResolver
from circuitlang.ast_to_ir.units import UnitResolver
from circuitlang.errors import Diagnostic, ResolveError, Span, diagnostic_order
from circuitlang.printer import format_statement
from circuitlang.tasks.signature import TaskSignature
from circuitlang.text_to_ast import KEYWORDS, check_claim_count

#: `patch ... at each`: one experiment per position the task names.
EACH = "each"


class _Resolver(HoleResolver, HeaderResolver, ImportResolver, NameResolver, ClaimResolver,
                ExpressionResolver, UnitResolver, SubspaceResolver):
    """One resolution: collects diagnostics, builds the Hypothesis."""

    def __init__(self, shape: sites.ModelShape, task: TaskSignature, filename: str | None,
                 importing: tuple[str, ...] = ()):
        self.shape = shape
        self.task = task
        self.filename = filename
        self.importing = importing
        self.diagnostics: list[Diagnostic] = []
        self.verbs: list[verbs.Verb] = []
        self.groups: dict[str, tuple[sites.Head, ...]] = {}
        self.imports: list[str] = []
        self.origin: _Origin | None = None
        self.local_groups: set[str] = set()
        self.saes: dict[str, sites.Dictionary] = {}
        positions = [_base_position(p) for p in task.positions]
        self.position_names = {name for name, _ in positions}
        self.metric_names = ir.BUILTIN_METRICS + tuple(
            m for m in task.metrics if m not in ir.BUILTIN_METRICS
        )

    # -- diagnostics
    def report(self, code: str, message: str, span: Span | None, hint: str | None = None):
        if self.origin is not None and (span is None or span.filename != self.filename):
            span = self.origin.span  # inside another file's verb: point at the use
        diag = Diagnostic(code, message, span, hint)
        if diag not in self.diagnostics:
            self.diagnostics.append(diag)

    # -- the whole program
    def run(self, program: ast.Program) -> ir.Hypothesis:
        self._imports(program)
        self._local_verbs(program)
        header = self._header(program)
        for stmt in program.statements:
            if isinstance(stmt, ast.SaeDecl):
                self._sae_decl(stmt)
            elif isinstance(stmt, ast.SubspaceDecl):
                self._subspace_decl(stmt)  # ast_to_ir.subspaces
            elif isinstance(stmt, ast.Align):
                self._align_ahead(stmt)
        for stmt in program.statements:
            if isinstance(stmt, ast.GroupDef):
                self._group(stmt)
        claims: list[ir.Claim] = []
        experiments: list[ir.Experiment] = []
        expectations: list[ir.Expectation] = []
        for stmt in program.statements:
            text = format_statement(stmt)
            if isinstance(stmt, (ast.Depends, ast.Edge, ast.VerbUse)):
                claims.extend(self._claims(stmt, _Origin(stmt.span, text), 0))
                too_many = check_claim_count(len(claims), stmt.span)
                if too_many is not None:  # a hostile file stops before its claims exist
                    self.report(too_many.code, too_many.message, too_many.span, too_many.hint)
                    break
            elif isinstance(stmt, (ast.Patch, ast.PathPatch, ast.Ablate)):
                for one, one_text in self._each_position(stmt, text):
                    exp = self._experiment(one, one_text, header["ablation"].mode)
                    if exp is not None:
                        experiments.append(exp)
            elif isinstance(stmt, (ast.Trace, ast.Probe)):
                exp = self._trace_or_probe(stmt, text)
                if exp is not None:
                    experiments.append(exp)
            elif isinstance(stmt, ast.Align):  # declares its subspace for the statements after it
                exp = self._align(stmt, text)
                if exp is not None:
                    experiments.append(exp)
            elif isinstance(stmt, ast.Expect):
                exp = self._expectation(stmt, text)
                if exp is not None:
                    expectations.append(exp)
        self._check_holes(claims, experiments)
        hole_constraints = self._hole_constraints(program, claims, experiments)
        if self.diagnostics:
            raise ResolveError(sorted(self.diagnostics, key=diagnostic_order))
        return ir.Hypothesis(
            model=self.shape.name or header["model"],
            task=self.task.name,
            metric=header["metric"],
            metric_named=any(isinstance(s, ast.MetricDecl) for s in program.statements),
            ablation=header["ablation"],
            semantics=header["semantics"],
            shape=self.shape,
            seed=header["seed"],
            samples=header["samples"],
            task_params=header["task_params"],
            citations=header["citations"],
            reported=header["reported"],
            groups=tuple(self.groups.items()),
            claims=tuple(claims),
            experiments=tuple(experiments),
            expectations=tuple(expectations),
            imports=tuple(self.imports),
            hole_constraints=hole_constraints,
            filename=self.filename,
            saes=tuple(self.saes.values()),
        )


    # -- groups
    def _group(self, stmt: ast.GroupDef) -> None:
        if stmt.name in KEYWORDS:
            self.report("resolve.group_name", f"{stmt.name!r} is a keyword and cannot name a "
                        "group", stmt.span, f"call it my_{stmt.name}" if stmt.name.endswith("s")
                        else f"call it {stmt.name}s or my_{stmt.name}")
            return
        if stmt.name in self.local_groups:
            self.report("resolve.group_twice", f"group {stmt.name} is defined twice", stmt.span,
                        "merge the two definitions or rename one")
            return
        found = self._sites(stmt.target, wildcards=True)
        if found is None:
            return
        heads = []
        for site in found:
            if isinstance(site, ir.Hole):
                self.report("resolve.group_hole", f"group {stmt.name} contains the hole "
                            f"?{site.name}", stmt.target.span,
                            "groups hold known heads; put the hole in a claim instead")
                return
            if not isinstance(site, sites.Head):
                self.report("resolve.group_kind", f"group {stmt.name} may hold only heads, not "
                            f"{site}", stmt.target.span, "write `group NAME = heads 9.6, 9.9`")
                return
            heads.append(site)
        self.local_groups.add(stmt.name)
        self.groups[stmt.name] = tuple(heads)


    # -- experiments
    def _each_position(self, stmt, text: str) -> list[tuple]:
        """`... at each`: the statement once per position the task names, in the task's
        order (`patch resid * at each` is a layer x position grid, one sweep per
        position); any other statement as it is."""
        pos = getattr(stmt, "position", None)
        if not isinstance(pos, ast.PositionRef) or pos.name != EACH or EACH in self.position_names:
            return [(stmt, text)]
        if pos.offset:
            self.report("resolve.position", "`each` takes no offset", pos.span, "write `each`")
            return []
        out = []
        for name in self.task.positions:
            base, offset = _base_position(name)
            one = dataclasses.replace(stmt, position=ast.PositionRef(base, offset, span=pos.span))
            out.append((one, format_statement(one)))
        return out

    def _attributable(self, found, span) -> bool:
        """Attribution patching estimates units: neurons, SAE latents, SAE error terms."""
        other = next((s for s in found if not isinstance(s, (sites.Neuron, sites.Latent, sites.SaeError))), None)
        if other is None:
            return True
        self.report("resolve.attribution", f"{other} cannot be patched by attribution", span,
                    "`attribution` estimates neurons, SAE latents and error terms (`patch feature res5.* at "
                    "END attribution`); patch heads and MLPs exactly (drop the word)")
        return False

    def _experiment(self, stmt, text: str, default_mode: str) -> ir.Experiment | None:
        match stmt:
            case ast.Patch(target=target, position=position, direction=direction):
                found = self._sites(target, wildcards=True)
                pos = self._position(position)
                if found is None or pos is None:
                    return None
                grid, axes = self._grid(target)
                if direction == "attribution" and not self._attributable(found, stmt.span):
                    return None
                return ir.Patch(tuple(found), pos, bool(axes), grid, axes, text,
                                span=stmt.span, direction=direction or "noise")
            case ast.PathPatch(sender=sender, receiver=receiver, position=position):
                senders = self._sites(sender, wildcards=True)
                receivers = self._sites(receiver)
                pos = self._position(position)
                if senders is None or receivers is None or pos is None:
                    return None
                grid, axes = self._grid(sender)
                # a sweep's grid keeps every cell; a path that cannot exist patches nothing
                pairs = [(s, r) for s in senders for r in receivers
                         if not axes or topology.edge_exists(self.shape, s, r)]
                if not all(self._edge_ok(s, r, stmt.span) for s, r in pairs):
                    return None
                return ir.PathPatch(tuple(senders), tuple(receivers), pos, bool(axes), grid,
                                    axes, text, span=stmt.span)
            case ast.Ablate(target=target, mode=mode, position=position):
                found = self._sites(target, wildcards=True)
                pos = sites.ALL if position is None else self._position(position)
                if mode is not None and mode not in ir.ABLATION_MODES:
                    close = _similar(mode, ir.ABLATION_MODES)
                    self.report("resolve.ablation", f"unknown ablation {mode!r}", stmt.span,
                                (f"did you mean {close}? " if close else "")
                                + "ablations are " + ", ".join(ir.ABLATION_MODES))
                    return None
                if found is None or pos is None:
                    return None
                return ir.Ablate(tuple(found), mode or default_mode, pos, text, span=stmt.span)
        raise TypeError(f"not an experiment: {stmt!r}")  # pragma: no cover

    def _trace_or_probe(self, stmt, text: str) -> ir.Trace | ir.Probe | None:
        """`trace SITE * at P` / `probe SITE * at P for F`, checked against the model and task."""
        pos = self._position(stmt.position)
        shape = self.shape
        if stmt.site == "mlp" and not shape.has_mlp:
            self.report("resolve.no_mlp", f"{shape.name or 'this model'} has no MLPs", stmt.span,
                        f"{'trace' if isinstance(stmt, ast.Trace) else 'probe'} resid instead")
            return None
        layers = range(shape.n_layers)
        if stmt.site == "resid":
            found = tuple(sites.Resid(l) for l in layers)
        elif stmt.site == "mlp":
            found = tuple(sites.Mlp(l) for l in layers)
        else:
            found = tuple(sites.Head(l, h) for l in layers for h in range(shape.n_heads))
        options = dict(stmt.options)
        if isinstance(stmt, ast.Trace):
            missing = [p for p in ("SUBJ_FIRST", "SUBJ_LAST") if p not in self.task.positions]
            if missing:
                self.report("resolve.trace_task", f"causal tracing noises the task's subject span, and "
                            f"task {self.task.name} has none (no {' or '.join(missing)})", stmt.span,
                            "use a factual-recall task: `task facts` (or task facts path=\"facts.jsonl\")")
                return None
            window = options.get("window", ast.TRACE_OPTIONS["window"])
            if stmt.site == "resid" and window != 1:
                self.report("resolve.trace_window", "window applies to tracing mlp and attn, not resid",
                            stmt.span, "restoring the residual stream at one layer already carries "
                            "every layer below it; drop `window`, or trace mlp or attn")
                return None
            if pos is None:
                return None
            columns = len(ir.TRACE_COLUMNS) if pos.is_all else 1
            return ir.Trace(stmt.site, pos, found, float(options.get("noise", ast.TRACE_OPTIONS["noise"])),
                            int(window), (shape.n_layers, columns), text, span=stmt.span)
        names = self.task.feature_names()
        if stmt.feature not in names:
            close = _similar(stmt.feature, names)
            self.report("resolve.feature", f"unknown feature {stmt.feature!r}", stmt.span,
                        (f"did you mean {close}? " if close else "")
                        + f"task {self.task.name} defines features " + ", ".join(names))
            return None
        if pos is None:
            return None
        if pos.is_all:
            self.report("resolve.probe_position", "a probe reads one position, not all", stmt.span,
                        "name one, e.g. `probe resid * at END for IO`")
            return None
        return ir.Probe(stmt.site, pos, self.task.canonical_feature(stmt.feature), found,
                        float(options.get("heldout", 0.25)), options.get("save"), (shape.n_layers,), text,
                        span=stmt.span)

    def _grid(self, target: ast.Target) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """The sweep grid a wildcard target spans ((), () for no wildcard)."""
        if isinstance(target, ast.HeadTarget) and isinstance(target.ref, ast.HeadRef):
            grid, axes = [], []
            if target.ref.layer is None:
                grid.append(self.shape.n_layers)
                axes.append("layer")
            if target.ref.head is None:
                grid.append(self.shape.n_heads)
                axes.append("head")
            return tuple(grid), tuple(axes)
        if isinstance(target, (ast.NeuronTarget, ast.FeatureTarget)):
            return self._unit_grid(target)
        if isinstance(target, (ast.MlpTarget, ast.ResidTarget)) and target.layer is None:
            extra = 1 if isinstance(target, ast.ResidTarget) else 0
            return (self.shape.n_layers + extra,), ("layer",)
        return (), ()



