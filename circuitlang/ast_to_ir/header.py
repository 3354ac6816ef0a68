"""Header statements: which model and task, the metric, the ablation, settings, citations.

`environment` finds the `ModelShape` and `TaskSignature` a program resolves against
(an override beats the file's `model` / `task` line); `HeaderResolver` reads the
other header statements into the values the `Hypothesis` carries.
"""
from __future__ import annotations

from circuitlang import ast, ir
from circuitlang.ast_to_ir.names import _similar
from circuitlang.errors import CircuitlangError, Diagnostic, ResolveError, Span
from circuitlang.tasks.signature import TaskSignature


def environment(program: ast.Program, shape, task, model, filename):
    """The ModelShape and TaskSignature to resolve against (overrides beat the file)."""
    decls = {type(s): s for s in reversed(program.statements)
             if isinstance(s, (ast.ModelDecl, ast.TaskDecl))}
    problems: list[tuple[CircuitlangError | None, Diagnostic]] = []
    if shape is None:
        decl = decls.get(ast.ModelDecl)
        name = model or (decl.name if decl else None)
        if name is None:
            problems.append((None, Diagnostic(
                "resolve.no_model", "no model: the file has no `model` line", None,
                "add `model gpt2` (or another model) to the file, or pass --model NAME")))
        else:
            try:
                from circuitlang.models import known_shape

                shape = known_shape(name)
            except CircuitlangError as exc:
                span = decl.span if decl is not None and not model else None
                problems.append((exc, Diagnostic(exc.diagnostics[0].code, exc.message, span,
                                                 exc.hint)))
    signature = task if isinstance(task, TaskSignature) else None
    if signature is None:
        decl = decls.get(ast.TaskDecl)
        name = task or (decl.name if decl else None)
        if name is None:
            problems.append((None, Diagnostic(
                "resolve.no_task", "no task: the file has no `task` line", None,
                "add `task ioi` (or another task) to the file, or pass --task NAME")))
        else:
            try:
                from circuitlang.tasks import get_signature

                signature = get_signature(name)
            except CircuitlangError as exc:
                span = decl.span if decl is not None and not task else None
                problems.append((exc, Diagnostic(exc.diagnostics[0].code, exc.message, span,
                                                 exc.hint)))
    if len(problems) == 1 and problems[0][0] is not None:
        raise type(problems[0][0])(problems[0][1])
    if problems:
        raise ResolveError([d for _, d in problems])
    return shape, signature



class HeaderResolver:
    """Header statements (a part of `_Resolver`: uses `report`, `task`, `_feature`)."""

    def _header(self, program: ast.Program) -> dict:
        out: dict = {"model": None, "metric": self.task.default_metric,
                     "ablation": ir.Ablation(), "semantics": ir.DEFAULT_SEMANTICS,
                     "seed": None, "samples": None,
                     "citations": (), "reported": ()}
        seen: dict[str, Span | None] = {}
        citations, reported = [], []
        for stmt in program.statements:
            kind = {ast.ModelDecl: "model", ast.TaskDecl: "task", ast.MetricDecl: "metric",
                    ast.AblationDecl: "ablation", ast.SemanticsDecl: "semantics"}.get(type(stmt))
            if isinstance(stmt, ast.Setting):
                kind = stmt.name
            if kind is not None:
                if kind in seen:
                    first = seen[kind]
                    line = f" (first on line {first.line})" if first else ""
                    self.report("resolve.twice", f"`{kind}` is set twice{line}", stmt.span,
                                "keep one")
                    continue
                seen[kind] = stmt.span
            match stmt:
                case ast.ModelDecl(name=name):
                    out["model"] = name
                case ast.MetricDecl(name=name):
                    if name not in self.task.metrics:
                        self.report("resolve.metric", f"unknown metric {name!r}", stmt.span,
                                    f"task {self.task.name} defines metrics "
                                    + ", ".join(self.task.metrics))
                    else:
                        out["metric"] = name
                case ast.AblationDecl(mode=mode, given=given):
                    out["ablation"] = self._ablation(stmt, mode, given)
                case ast.SemanticsDecl(mode=mode):
                    if mode not in ir.SEMANTICS:
                        close = _similar(mode, ir.SEMANTICS)
                        self.report("resolve.semantics", f"unknown semantics {mode!r}", stmt.span,
                                    (f"did you mean {close}? " if close else "")
                                    + "semantics are paths (Chan et al.: every input path no "
                                    "claimed child covers is scrubbed) or channels")
                    else:
                        out["semantics"] = mode
                case ast.Setting(name=name, value=value):
                    if name == "samples" and value < 1:
                        self.report("resolve.setting", "samples must be at least 1", stmt.span)
                    out[name] = value
                case ast.Cite(text=text):
                    citations.append(text)
                case ast.Reported(name=name, value=value):
                    # a free label: `clean`, `faithfulness`, `circuit`, ... as the paper says
                    reported.append(ir.Reported(name, float(value)))
        out["citations"] = tuple(citations)
        out["reported"] = tuple(reported)
        return out

    def _ablation(self, stmt, mode: str, given) -> ir.Ablation:
        if mode not in ir.ABLATION_MODES:
            close = _similar(mode, ir.ABLATION_MODES)
            self.report("resolve.ablation", f"unknown ablation {mode!r}", stmt.span,
                        (f"did you mean {close}? " if close else "")
                        + "ablations are resample, mean or zero")
            return ir.Ablation()
        if given and mode != "resample":
            self.report("resolve.ablation", f"`given` needs resampling, not {mode} ablation",
                        stmt.span, "write `ablation resample given ...`, or drop `given`")
        features = tuple(f for f in (self._feature(g) for g in given) if f is not None)
        return ir.Ablation(mode, features)

