"""Header statements: which model and task, the metric, the ablation, settings, citations.

`environment` finds the `ModelShape` and `TaskSignature` a program resolves against
(an override beats the file's `model` / `task` line); `HeaderResolver` reads the
other header statements into the values the `Hypothesis` carries.

The `task` line's parameters (`task induction length=20 vocab=32`) are checked
against the task's parameter types (`circuitlang.tasks.params`) and become
`Hypothesis.task_params`; so does a JSONL task's path (`task pairs.jsonl`, relative
to the file's folder and confined to it, like `use`). When `--task` (or `task=`)
names another task, the file's parameters, which were for its own task, are left out.
"""
from __future__ import annotations

from circuitlang import ast, ir
from circuitlang.ast_to_ir.imports import OutsideError, confined_path
from circuitlang.ast_to_ir.names import _similar
from circuitlang.errors import CircuitlangError, Diagnostic, ResolveError, Span, TaskError
from circuitlang.tasks.signature import TaskSignature

_TASK_FILES = (".jsonl", ".json")


def file_task(decl: ast.TaskDecl, filename: str | None) -> tuple[str, dict]:
    """The task a file's `task` line names, as `get_signature` takes it: (name, params).

    A JSONL file (`task pairs.jsonl`, `task "data/p.jsonl"`, `task custom
    path=p.jsonl`) is read relative to the hypothesis file's folder, inside it.

    Raises:
        ResolveError: the path leaves the file's folder tree, or is not a .jsonl/.json
            file.
    """
    name, path, where = decl.name, None, decl.span
    if name.endswith(_TASK_FILES):
        name, path = "custom", decl.name
    elif name == "custom":
        for param in decl.params:
            if param.name == "path":
                path, where = param.value, param.span or decl.span
    if path is None:
        return name, {}
    if not isinstance(path, str) or not path.endswith(_TASK_FILES):
        raise ResolveError(Diagnostic(
            "resolve.task_file", f"a task file must be a .jsonl or .json file, got {path!r}",
            where, 'write `task "data/pairs.jsonl"`'))
    try:
        real = confined_path(path, filename)
    except OutsideError as exc:
        raise ResolveError(Diagnostic(
            "resolve.task_outside", f"cannot read task file: {exc.message}", where,
            "a file may read task files only inside its own folder tree; pass one from "
            "elsewhere on the command line (--task PATH) or in Python (task=PATH)")) from None
    return name, {"path": str(real)}


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

                params: dict = {}
                if not task:  # the file's own task line: its paths are the file's
                    name, params = file_task(decl, filename)
                signature = get_signature(name, **params)
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
                     "citations": (), "reported": (),
                     "task_params": tuple(self.task.params)}
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
                case ast.TaskDecl():
                    out["task_params"] = self._task_params(stmt)
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
                    from circuitlang.options import check_n, check_seed

                    try:
                        (check_n if name == "samples" else check_seed)(value, name)
                    except CircuitlangError as exc:
                        self.report("resolve.setting", exc.message, stmt.span, exc.hint)
                    out[name] = value
                case ast.Cite(text=text):
                    citations.append(text)
                case ast.Reported(name=name, value=value):
                    # a free label: `clean`, `faithfulness`, `circuit`, ... as the paper says
                    reported.append(ir.Reported(name, float(value)))
        out["citations"] = tuple(citations)
        out["reported"] = tuple(reported)
        return out

    def _task_params(self, decl: ast.TaskDecl) -> tuple[tuple[str, object], ...]:
        """The `task` line's parameters, checked: (name, value) pairs sorted by name.

        Left out (the signature's own, such as a JSONL path, kept) when the task was
        overridden by another one. Every problem is reported at its parameter.
        """
        from circuitlang.tasks import task_class
        from circuitlang.tasks.params import validate_task_params

        own = dict(self.task.params)
        if not decl.params or not self._is_file_task(decl):
            return tuple(sorted(own.items()))
        try:
            cls = task_class(self.task.name)
        except TaskError:
            self.report("resolve.task_param", f"cannot check the parameters of task "
                        f"{self.task.name}: it is not a registered task", decl.span,
                        "register it (circuitlang.tasks.register_task), or drop them")
            return tuple(sorted(own.items()))
        given: dict[str, object] = {}
        ok = True
        for param in decl.params:
            if param.name in given:
                self.report("resolve.task_param", f"task parameter {param.name} is given "
                            "twice", param.span, "keep one")
                ok = False
                continue
            if param.name == "path" and "path" in own:
                given["path"] = own["path"]  # already found, relative to the file
                continue
            try:
                given.update(validate_task_params(self.task.name, {param.name: param.value}))
            except TaskError as exc:
                self.report("resolve.task_param", exc.message, param.span, exc.hint)
                ok = False
        if ok and "path" not in own:  # a custom file was read already; others: try now
            try:
                cls(None, **given)
            except TaskError as exc:
                self.report("resolve.task_param", exc.message, decl.span, exc.hint)
        return tuple(sorted({**own, **given}.items()))

    def _is_file_task(self, decl: ast.TaskDecl) -> bool:
        """Whether the task resolved against is the one the file's `task` line names."""
        from circuitlang.tasks import task_class

        if decl.name.endswith(_TASK_FILES) or decl.name == "custom":
            return self.task.name == "custom"
        try:
            return task_class(decl.name).SIGNATURE.name == self.task.name
        except (TaskError, AttributeError):
            return decl.name == self.task.name

    def _ablation(self, stmt, mode: str, given) -> ir.Ablation:
        if mode not in ir.ABLATION_MODES:
            close = _similar(mode, ir.ABLATION_MODES)
            self.report("resolve.ablation", f"unknown ablation {mode!r}", stmt.span,
                        (f"did you mean {close}? " if close else "")
                        + "ablations are " + ", ".join(ir.ABLATION_MODES))
            return ir.Ablation()
        if given and mode != "resample":
            self.report("resolve.ablation", f"`given` needs resampling, not {mode} ablation",
                        stmt.span, "write `ablation resample given ...`, or drop `given`")
        features = tuple(f for f in (self._feature(g) for g in given) if f is not None)
        return ir.Ablation(mode, features)

