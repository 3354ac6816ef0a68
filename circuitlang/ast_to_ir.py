"""Resolve: `Program` (AST) + `ModelShape` + `TaskSignature` -> `Hypothesis` (IR).

Binds every name the program uses: `use` imports (the stdlib prelude always),
verb definitions, groups, heads (checked against the model's layer and head
counts), channels, positions and features (checked against the task), metric names
in expressions. Verb uses are matched against the verb patterns in scope and
expanded into core claims (`circuitlang.verbs` does the matching and the
substitution, AST to AST; the claims it gives are resolved here); groups into their heads; wildcards (`patch head * at
END`) into explicit site lists with a grid shape; expressions into sympy
expressions built node by node from the AST (no string is ever evaluated). Holes
(`head ?h`) stay in the IR as `ir.Hole` placeholders.

The resolver reports every problem at once: it keeps going after an error, and
raises one `ResolveError` carrying all the diagnostics, in source order. Reading a
hypothesis never runs code: imports are other `.circ` files, parsed and resolved
the same way.
"""
from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import sympy

from circuitlang import ast, ir, sites, verbs
from circuitlang.errors import CircuitlangError, Diagnostic, ResolveError, Span
from circuitlang.printer import format_statement, format_target
from circuitlang.resources import stdlib_dir
from circuitlang.tasks.signature import TaskSignature
from circuitlang.text_to_ast import KEYWORDS, parse

__all__ = ["resolve", "resolve_text", "stdlib_modules", "verb_patterns"]

CHANNELS = tuple(c.value for c in sites.Channel)
CMP_OPS = (">=", "<=", ">", "<", "==", "!=")
_FUNCTIONS = {"abs": (1, 1), "min": (2, None), "max": (2, None)}
_MAX_VERB_DEPTH = 16


def resolve(
    program: ast.Program,
    shape: sites.ModelShape | None = None,
    task: TaskSignature | str | None = None,
    *,
    model: str | None = None,
    filename: str | None = None,
    source: str | None = None,
) -> ir.Hypothesis:
    """Resolve a parsed program against a model shape and a task signature.

    Args:
        program: what `circuitlang.parse` returned.
        shape: the model's layers, heads, MLPs (no weights needed). When None, it
            is looked up by name (`model`, else the file's `model` line) with
            `circuitlang.models.known_shape`.
        task: the task's signature, or a task name overriding the file's `task`
            line (looked up with `circuitlang.tasks.get_signature`).
        model: a model name overriding the file's `model` line.
        filename: where the program came from (defaults to `program.filename`);
            relative `use` imports are looked up next to it.
        source: the program's text; errors then render with carets.

    Returns:
        The `Hypothesis`, with verbs expanded and every name checked.

    Raises:
        ResolveError: carrying every problem found (or the `ModelError` /
            `TaskError` when the model or task alone cannot be found).
    """
    filename = filename if filename is not None else program.filename
    try:
        shape, signature = _environment(program, shape, task, model, filename)
        hypothesis = _Resolver(shape, signature, filename).run(program)
    except CircuitlangError as exc:
        if source is not None:
            exc.with_source(source)
        raise
    if model and model != hypothesis.model:
        hypothesis = replace(hypothesis, model=model)
    return hypothesis


def resolve_text(
    text: str,
    shape: sites.ModelShape | None = None,
    task: TaskSignature | str | None = None,
    *,
    model: str | None = None,
    filename: str | None = None,
) -> ir.Hypothesis:
    """Parse and resolve in one step; errors carry the source for carets.

    Raises:
        ParseError: the text does not parse.
        ResolveError: it parses but names things this model or task lacks.
    """
    program = parse(text, filename)
    return resolve(program, shape, task, model=model, filename=filename, source=text)


def _environment(program: ast.Program, shape, task, model, filename):
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


def stdlib_modules() -> list[str]:
    """Every importable stdlib module, as `stdlib.NAME`, sorted."""
    return sorted(f"stdlib.{p.stem}" for p in stdlib_dir().glob("*.circ"))


def verb_patterns() -> list[str]:
    """The prelude's verb patterns, as written (`$h moves $x to $p`)."""
    program = _load_module(("stdlib", "prelude"), None)[0]
    return [verbs.pattern_text(s) for s in program.statements if isinstance(s, ast.VerbDef)]


# ---------------------------------------------------------------- modules


def _module_path(path: tuple[str, ...], importer: str | None) -> Path:
    if path[0] == "stdlib":
        return stdlib_dir().joinpath(*path[1:]).with_suffix(".circ")
    base = Path(importer).parent if importer else Path.cwd()
    return base.joinpath(*path).with_suffix(".circ")


def _load_module(path: tuple[str, ...], importer: str | None) -> tuple[ast.Program, str, str]:
    """Parse an imported file: (program, display name, source). Raises CircuitlangError."""
    file = _module_path(path, importer)
    # stdlib files are named as users write them; others by their path (for their own
    # relative imports)
    display = "/".join(path) + ".circ" if path[0] == "stdlib" else str(file)
    if len(path) < 2 and path[0] == "stdlib" or not file.is_file():
        raise FileNotFoundError(display)
    program, text = _parse_file(str(file), file.stat().st_mtime_ns, display)
    return program, display, text


@functools.lru_cache(maxsize=64)
def _parse_file(file: str, mtime_ns: int, display: str) -> tuple[ast.Program, str]:
    """Parse an imported file once per version of it (the prelude is read by every resolve)."""
    text = Path(file).read_text(encoding="utf-8")
    return parse(text, display), text


@dataclass(frozen=True, slots=True)
class _Origin:
    """The statement a claim comes from (for verb expansions: the user's verb use)."""

    span: Span | None
    text: str
    verb: str | None = None


def _similar(word: str, choices: Iterable[str]) -> str | None:
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def _base_position(name: str) -> tuple[str, int]:
    """`S1+1` -> ("S1", 1); `END` -> ("END", 0)."""
    for sign in "+-":
        head, sep, tail = name.rpartition(sign)
        if sep and head and tail.isdigit():
            return head, int(tail) * (1 if sign == "+" else -1)
    return name, 0


# ---------------------------------------------------------------- resolver


class _Resolver:
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
            if isinstance(stmt, ast.GroupDef):
                self._group(stmt)
        claims: list[ir.Claim] = []
        experiments: list[ir.Experiment] = []
        expectations: list[ir.Expectation] = []
        for stmt in program.statements:
            text = format_statement(stmt)
            if isinstance(stmt, (ast.Depends, ast.Edge, ast.VerbUse)):
                claims.extend(self._claims(stmt, _Origin(stmt.span, text), 0))
            elif isinstance(stmt, (ast.Patch, ast.PathPatch, ast.Ablate)):
                exp = self._experiment(stmt, text, header["ablation"].mode)
                if exp is not None:
                    experiments.append(exp)
            elif isinstance(stmt, ast.Expect):
                exp = self._expectation(stmt, text)
                if exp is not None:
                    expectations.append(exp)
        self._check_holes(claims, experiments)
        if self.diagnostics:
            raise ResolveError(sorted(self.diagnostics, key=_diag_order))
        return ir.Hypothesis(
            model=self.shape.name or header["model"],
            task=self.task.name,
            metric=header["metric"],
            ablation=header["ablation"],
            seed=header["seed"],
            samples=header["samples"],
            citations=header["citations"],
            reported=header["reported"],
            groups=tuple(self.groups.items()),
            claims=tuple(claims),
            experiments=tuple(experiments),
            expectations=tuple(expectations),
            imports=tuple(self.imports),
            filename=self.filename,
        )

    # -- imports and verbs
    def _imports(self, program: ast.Program) -> None:
        uses: list[tuple[tuple[str, ...], Span | None]] = []
        is_prelude = self.importing[-1:] == ("stdlib.prelude",)
        if not is_prelude:
            uses.append((("stdlib", "prelude"), None))
        uses += [(s.path, s.span) for s in program.statements if isinstance(s, ast.Use)]
        done: set[tuple[str, ...]] = set()
        for path, span in uses:
            if path in done:
                continue
            done.add(path)
            self._import(path, span)

    def _import(self, path: tuple[str, ...], span: Span | None) -> None:
        dotted = ".".join(path)
        if dotted in self.importing:
            chain = " -> ".join((*self.importing, dotted))
            self.report("resolve.import_cycle", f"import cycle: {chain}", span,
                        "remove one of the `use` lines in the cycle")
            return
        try:
            program, display, text = _load_module(path, self.filename)
        except FileNotFoundError:
            if path[0] == "stdlib":
                available = stdlib_modules()
                close = _similar(dotted, available)
                hint = f"did you mean {close}? " if close else ""
                hint += "available: " + ", ".join(available)
            else:
                hint = (f"looked for {_module_path(path, self.filename)}; stdlib modules: "
                        + ", ".join(stdlib_modules()))
            self.report("resolve.import", f"unknown import {dotted!r}", span, hint)
            return
        except CircuitlangError as exc:
            self.report("resolve.import", f"cannot import {dotted}: {exc.message}", span,
                        f"fix {exc.span.filename if exc.span else dotted} first")
            return
        if path != ("stdlib", "prelude"):
            self.imports.append(dotted)
        sub = _Resolver(self.shape, self.task, display, (*self.importing, dotted))
        sub._imports(program)
        sub._local_verbs(program)
        for stmt in program.statements:
            if isinstance(stmt, ast.GroupDef):
                sub._group(stmt)
        if sub.diagnostics:
            first = sorted(sub.diagnostics, key=_diag_order)[0]
            where = ""
            if first.span is not None:
                where = f" ({first.span.filename}:{first.span.line})"
            self.report("resolve.import", f"cannot import {dotted}: {first.message}{where}",
                        span, first.hint)
            return
        self._add_verbs(sub.verbs)
        self.groups.update(sub.groups)

    def _add_verbs(self, verbs: Iterable[verbs.Verb]) -> None:
        for verb in verbs:
            # a later definition with the same words replaces an earlier one
            self.verbs = [v for v in self.verbs if v.skeleton != verb.skeleton]
            self.verbs.append(verb)

    def _local_verbs(self, program: ast.Program) -> None:
        seen: dict[tuple[str | None, ...], ast.VerbDef] = {}
        local: list[verbs.Verb] = []
        for stmt in program.statements:
            if not isinstance(stmt, ast.VerbDef):
                continue
            verb = verbs.verb_of(stmt, self.filename or "<string>")
            if verb.skeleton in seen:
                self.report("resolve.verb_twice", f"verb `{verb.pattern}` is defined twice",
                            stmt.span, "rename one of them or delete the other")
                continue
            seen[verb.skeleton] = stmt
            names = [stmt.subject] + [p for p in verb.params if p is not None]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                self.report("resolve.verb_param", f"verb parameter ${dupes[0]} appears twice in "
                            f"`{verb.pattern}`", stmt.span, "give each parameter its own name")
                continue
            for used, span in verbs.slots_in(stmt.body):
                if used not in names:
                    self.report("resolve.verb_param", f"unknown verb parameter ${used}", span,
                                "parameters of this verb: " + ", ".join(f"${n}" for n in names))
            local.append(verb)
        self._add_verbs(local)

    # -- header statements
    def _header(self, program: ast.Program) -> dict:
        out: dict = {"model": None, "metric": self.task.default_metric,
                     "ablation": ir.Ablation(), "seed": None, "samples": None,
                     "citations": (), "reported": ()}
        seen: dict[str, Span | None] = {}
        citations, reported = [], []
        for stmt in program.statements:
            kind = {ast.ModelDecl: "model", ast.TaskDecl: "task", ast.MetricDecl: "metric",
                    ast.AblationDecl: "ablation"}.get(type(stmt))
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
                        stmt.span, f"write `ablation resample given ...`, or drop `given`")
        features = tuple(f for f in (self._feature(g) for g in given) if f is not None)
        return ir.Ablation(mode, features)

    # -- groups
    def _group(self, stmt: ast.GroupDef) -> None:
        if stmt.name in KEYWORDS:
            self.report("resolve.group_name", f"{stmt.name!r} is a keyword and cannot name a "
                        "group", stmt.span, f"call it {stmt.name}s or my_{stmt.name}")
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

    # -- sites
    def _sites(self, target: ast.Target, *, wildcards: bool = False
               ) -> list[ir.SiteOrHole] | None:
        """The sites a target names, or None when it is wrong (already reported)."""
        match target:
            case ast.HeadTarget(ref=ref):
                return self._head_items([ref], wildcards)
            case ast.HeadsTarget(items=items):
                return self._head_items(list(items), wildcards)
            case ast.MlpTarget(layer=layer) | ast.ResidTarget(layer=layer):
                return self._layer_sites(target, layer, wildcards)
            case ast.EmbedTarget():
                return [sites.Embed()]
            case ast.LogitsTarget():
                return [sites.Logits()]
            case ast.GroupTarget(name=name, channel=channel):
                return self._group_sites(target, name, channel)
            case ast.SlotTarget(name=name):
                self.report("resolve.slot", f"${name} is a verb parameter, and means something "
                            "only inside a verb definition", target.span,
                            "name a site instead, such as `head 9.6`")
                return None
        raise TypeError(f"not a target: {target!r}")  # pragma: no cover

    def _channel(self, text: str | None, span: Span | None) -> sites.Channel | None:
        if text is None:
            return sites.Channel.OUT
        try:
            return sites.Channel.parse(text)
        except ValueError:
            close = _similar(text, CHANNELS)
            self.report("resolve.channel", f"unknown channel {text!r}", span,
                        (f"did you mean {close}? " if close else "")
                        + "channels are " + ", ".join(CHANNELS))
            return None

    def _head_items(self, items, wildcards: bool) -> list[ir.SiteOrHole] | None:
        out: list[ir.SiteOrHole] = []
        ok = True
        for item in items:
            channel = self._channel(item.channel, item.span)
            if channel is None:
                ok = False
                continue
            if isinstance(item, ast.Hole):
                out.append(ir.Hole(item.name, "head", channel))
                continue
            if (item.layer is None or item.head is None) and not wildcards:
                self.report("resolve.wildcard", f"wildcard head {verbs.ref_text(item)} in a claim",
                            item.span, "wildcards sweep in `patch`, `ablate` and `group`; "
                            "a claim names heads, such as head 9.6, or a hole, such as ?h")
                ok = False
                continue
            if not self._head_in_range(item):
                ok = False
                continue
            layers = range(self.shape.n_layers) if item.layer is None else [item.layer]
            heads = range(self.shape.n_heads) if item.head is None else [item.head]
            out.extend(sites.Head(l, h, channel) for l in layers for h in heads)
        return out if ok else None

    def _head_in_range(self, ref: ast.HeadRef) -> bool:
        n_layers, n_heads = self.shape.n_layers, self.shape.n_heads
        bad_layer = ref.layer is not None and ref.layer >= n_layers
        bad_head = ref.head is not None and ref.head >= n_heads
        if not (bad_layer or bad_head):
            return True
        layer = min(ref.layer, n_layers - 1) if ref.layer is not None else None
        head = min(ref.head, n_heads - 1) if ref.head is not None else None
        guess = verbs.ref_text(ast.HeadRef(layer, head, ref.channel))
        if bad_layer:
            message = f"head {verbs.ref_text(ref)} out of range (model has layers 0-{n_layers - 1})"
        else:
            message = (f"head {verbs.ref_text(ref)} out of range (model has heads 0-{n_heads - 1} "
                       "in each layer)")
        self.report("resolve.head_range", message, ref.span, f"did you mean {guess}?")
        return False

    def _layer_sites(self, target, layer, wildcards: bool) -> list[ir.SiteOrHole] | None:
        is_mlp = isinstance(target, ast.MlpTarget)
        kind = "mlp" if is_mlp else "resid"
        if is_mlp and not self.shape.has_mlp:
            self.report("resolve.no_mlp", f"model {self.shape.name or ''} has no MLPs "
                        "(attention only)".replace("  ", " "), target.span,
                        "claim heads, embed or logits instead")
            return None
        top = self.shape.n_layers - 1 if is_mlp else self.shape.n_layers
        make = sites.Mlp if is_mlp else sites.Resid
        if isinstance(layer, ast.Hole):
            return [ir.Hole(layer.name, kind)]
        if layer is None:
            if not wildcards:
                self.report("resolve.wildcard", f"wildcard `{kind} *` in a claim", target.span,
                            f"wildcards sweep in `patch`, `ablate` and `group`; a claim names "
                            f"one layer, such as `{kind} 0`")
                return None
            return [make(l) for l in range(top + 1)]
        if layer > top:
            self.report("resolve.layer_range", f"{kind} {layer} out of range (model has "
                        f"layers 0-{top})", target.span, f"did you mean {kind} {top}?")
            return None
        return [make(layer)]

    def _group_sites(self, target, name: str, channel: str | None):
        if name not in self.groups:
            close = _similar(name, self.groups)
            if close:
                hint = f"did you mean {close}?"
            elif self.groups:
                hint = "groups here: " + ", ".join(self.groups)
            else:
                hint = "define it first: `group NAME = heads 9.6, 9.9`"
            self.report("resolve.group", f"unknown group {name!r}", target.span, hint)
            return None
        heads = self.groups[name]
        if channel is None:
            return list(heads)
        ch = self._channel(channel, target.span)
        if ch is None:
            return None
        return [h.with_channel(ch) for h in heads]

    # -- positions and features
    def _position(self, pos: ast.Position) -> sites.Position | None:
        if isinstance(pos, ast.Slot):
            self.report("resolve.slot", f"${pos.name} is a verb parameter, and means "
                        "something only inside a verb definition", pos.span,
                        "name a position instead, such as END")
            return None
        if pos.name == "all":
            if pos.offset:
                self.report("resolve.position", "`all` takes no offset", pos.span,
                            "write `all`")
                return None
            return sites.ALL
        if pos.name not in self.position_names:
            self.report("resolve.position", f"unknown position {pos.name!r}", pos.span,
                        f"task {self.task.name} defines positions "
                        + ", ".join(self.task.positions))
            return None
        return sites.Position(pos.name, pos.offset)

    def _feature(self, feature: ast.Feature) -> ir.Feature | None:
        if isinstance(feature, ast.Slot):
            self.report("resolve.slot", f"${feature.name} is a verb parameter, and means "
                        "something only inside a verb definition", feature.span,
                        "name a feature instead, such as token(IO)")
            return None
        names = self.task.feature_names()
        if feature.arg is None:
            if feature.name in names:
                return ir.Feature("task", self.task.canonical_feature(feature.name))
            if feature.name in self.position_names:
                hint = (f"{feature.name} is a position; did you mean token({feature.name}) "
                        f"or position({feature.name})?")
            else:
                close = _similar(feature.name, names)
                hint = (f"did you mean {close}? " if close else "") + self._features_hint()
            self.report("resolve.feature", f"unknown feature {feature.name!r}", feature.span,
                        hint)
            return None
        if feature.name not in ("token", "position"):
            self.report("resolve.feature", f"unknown feature function {feature.name!r}",
                        feature.span, "the built-in features are token(P) and position(P)")
            return None
        arg = feature.arg
        if isinstance(arg, ast.Slot):
            return self._feature(arg)
        base = self.task.canonical_feature(arg.name)
        if base not in self.position_names and base not in names:
            self.report("resolve.feature", f"unknown position {arg.name!r} in "
                        f"{feature.name}({arg.name})", arg.span,
                        f"task {self.task.name} defines positions "
                        + ", ".join(self.task.positions) + " and features "
                        + ", ".join(self.task.features))
            return None
        return ir.Feature(feature.name, str(sites.Position(base, arg.offset)))

    def _features_hint(self) -> str:
        text = f"task {self.task.name} defines features " + ", ".join(self.task.features)
        if self.task.aliases:
            text += " (" + ", ".join(f"{a} means {b}" for a, b in self.task.aliases) + ")"
        return text + "; built-ins: token(P), position(P)"

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
        candidates = []
        for s in senders:
            for r in receivers:
                rs = [r]
                if isinstance(r, sites.Head) and r.channel is sites.Channel.OUT:
                    # an edge into a head, no channel named: through q, k and v
                    rs = [r.with_channel(c) for c in (sites.Channel.Q, sites.Channel.K,
                                                      sites.Channel.V)]
                candidates.extend((s, rr) for rr in rs)
        forward = [(s, r) for s, r in candidates if _is_hole(s, r) or
                   _out_order(s) < _in_order(r)]
        if len(senders) * len(receivers) > 1 and forward:
            candidates = forward
        return [(s, r) for s, r in candidates if self._edge_ok(s, r, span)]

    def _edge_ok(self, s, r, span) -> bool:
        if isinstance(s, ir.Hole) or isinstance(r, ir.Hole):
            return True
        if isinstance(s, sites.Logits) or (isinstance(s, sites.Head) and s.channel is not
                                            sites.Channel.OUT):
            self.report("resolve.edge", f"{s} cannot send along an edge", span,
                        "senders are outputs: embed, a head (no channel), mlp L, resid L")
            return False
        if isinstance(r, sites.Embed) or (isinstance(r, sites.Head) and r.channel is
                                           sites.Channel.PATTERN):
            self.report("resolve.edge", f"{r} cannot receive an edge", span,
                        "receivers are inputs: a head's q, k or v, mlp L, resid L, logits")
            return False
        if _out_order(s) >= _in_order(r):
            self.report("resolve.edge", f"edge {s} -> {r} goes backwards", span,
                        "a site reads only sites of earlier layers (or, for an MLP, heads "
                        "of its own layer)")
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

    # -- experiments
    def _experiment(self, stmt, text: str, default_mode: str) -> ir.Experiment | None:
        match stmt:
            case ast.Patch(target=target, position=position):
                found = self._sites(target, wildcards=True)
                pos = self._position(position)
                if found is None or pos is None:
                    return None
                grid, axes = self._grid(target)
                return ir.Patch(tuple(found), pos, bool(axes), grid, axes, text,
                                span=stmt.span)
            case ast.PathPatch(sender=sender, receiver=receiver, position=position):
                senders = self._sites(sender, wildcards=True)
                receivers = self._sites(receiver)
                pos = self._position(position)
                if senders is None or receivers is None or pos is None:
                    return None
                grid, axes = self._grid(sender)
                # a sweep's grid keeps every cell; a path that cannot exist patches nothing
                pairs = [(s, r) for s in senders for r in receivers
                         if not axes or not isinstance(s, sites.Head) or
                         s.layer < getattr(r, "layer", s.layer + 1)]
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
                                + "ablations are resample, mean or zero")
                    return None
                if found is None or pos is None:
                    return None
                return ir.Ablate(tuple(found), mode or default_mode, pos, text, span=stmt.span)
        raise TypeError(f"not an experiment: {stmt!r}")  # pragma: no cover

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
        if isinstance(target, (ast.MlpTarget, ast.ResidTarget)) and target.layer is None:
            extra = 1 if isinstance(target, ast.ResidTarget) else 0
            return (self.shape.n_layers + extra,), ("layer",)
        return (), ()

    # -- expectations
    def _expectation(self, stmt: ast.Expect, text: str) -> ir.Expectation | None:
        lhs, rhs = self._expr(stmt.lhs), self._expr(stmt.rhs)
        if stmt.op not in CMP_OPS:
            self.report("resolve.expect", f"unknown comparison {stmt.op!r}", stmt.span,
                        "comparisons are " + ", ".join(CMP_OPS))
            return None
        if lhs is None or rhs is None:
            return None
        if not (lhs.free_symbols | rhs.free_symbols):
            self.report("resolve.expect", "this expectation names no metric, so it tests "
                        "nothing", stmt.span, "compare a metric such as recovered or "
                        f"{self.task.default_metric}")
            return None
        kind = "each" if stmt.each else "aggregate"
        return ir.Expectation(kind, lhs, stmt.op, rhs, text, span=stmt.span)

    def _expr(self, expr: ast.Expr) -> sympy.Expr | None:
        match expr:
            case ast.Number(value=value):
                num, den = value.as_integer_ratio()
                return sympy.Rational(num, den)
            case ast.Name(name=name):
                if name not in self.metric_names:
                    close = _similar(name, self.metric_names)
                    self.report("resolve.metric", f"unknown metric {name!r}", expr.span,
                                (f"did you mean {close}? " if close else "")
                                + "metrics here: " + ", ".join(self.metric_names))
                    return None
                return sympy.Symbol(name)
            case ast.Neg(operand=operand):
                inner = self._expr(operand)
                return None if inner is None else -inner
            case ast.BinOp(op=op, left=left, right=right):
                a, b = self._expr(left), self._expr(right)
                if a is None or b is None:
                    return None
                if op == "+":
                    return a + b
                if op == "-":
                    return a - b
                if op == "*":
                    return a * b
                if b == 0:
                    self.report("resolve.expect", "division by zero", expr.span,
                                "divide by a metric or a non-zero number")
                    return None
                return a / b
            case ast.Call(func=func, args=args):
                return self._call(expr, func, args)
        raise TypeError(f"not an expression: {expr!r}")  # pragma: no cover

    def _call(self, expr: ast.Call, func: str, args) -> sympy.Expr | None:
        if func not in _FUNCTIONS:
            self.report("resolve.function", f"unknown function {func!r}", expr.span,
                        "functions are abs(x), min(a, b, ...), max(a, b, ...)")
            return None
        low, high = _FUNCTIONS[func]
        if len(args) < low or (high is not None and len(args) > high):
            want = f"{low}" if low == high else f"at least {low}"
            self.report("resolve.function", f"{func} takes {want} argument"
                        f"{'s' if low != 1 or high != low else ''}, got {len(args)}",
                        expr.span, f"write {func}(x)" if func == "abs" else
                        f"write {func}(a, b)")
            return None
        values = [self._expr(a) for a in args]
        if any(v is None for v in values):
            return None
        if func == "abs":
            return sympy.Abs(values[0])
        return (sympy.Min if func == "min" else sympy.Max)(*values)

    # -- holes
    def _check_holes(self, claims, experiments) -> None:
        kinds: dict[str, str] = {}
        for claim in claims:
            parts = (claim.site,) if isinstance(claim, ir.DependsClaim) else (
                claim.sender, claim.receiver)
            for site in parts:
                if isinstance(site, ir.Hole):
                    seen = kinds.setdefault(site.name, site.kind)
                    if seen != site.kind:
                        self.report("resolve.hole", f"hole ?{site.name} is used both as a "
                                    f"{seen} and as a {site.kind}", claim.span,
                                    "use a different name for each unknown")


# ---------------------------------------------------------------- helpers


def _diag_order(diag: Diagnostic):
    span = diag.span
    if span is None:
        return (0, "", 0, 0)
    return (1, span.filename or "", span.line, span.column)


def _is_hole(*parts) -> bool:
    return any(isinstance(p, ir.Hole) for p in parts)


def _out_order(site) -> float:
    """Where a sender's output enters the residual stream (for edge direction)."""
    match site:
        case sites.Embed() | sites.TokenEmbed() | sites.PosEmbed():
            return -1
        case sites.Head(layer=layer):
            return 2 * layer
        case sites.Mlp(layer=layer):
            return 2 * layer + 1
        case sites.Resid(layer=layer):
            return 2 * layer - 0.5
    return float("inf")


def _in_order(site) -> float:
    """Where a receiver reads the residual stream (for edge direction)."""
    match site:
        case sites.Head(layer=layer):
            return 2 * layer
        case sites.Mlp(layer=layer):
            return 2 * layer + 1
        case sites.Resid(layer=layer):
            return 2 * layer - 0.5
        case sites.Logits():
            return float("inf")
    return float("-inf")
