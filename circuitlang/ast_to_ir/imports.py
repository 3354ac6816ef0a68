"""`use`: the other `.circ` files a hypothesis imports, and the verbs and groups they give.

`use stdlib.NAME` reads the stdlib shipped with the package; `use NAME` reads
`NAME.circ` next to the importing file. Imports are parsed and resolved the same way
(never executed); verbs and groups come back, claims do not.

What a file may read (docs/language.md, "What a file may read"): the stdlib, and
files inside the folder tree of the file that names them, after symlinks are
resolved: `.circ` files for `use`, `.jsonl` / `.json` files for `task`. A
hypothesis given as text without a file name reads relative to the working
directory, within it. Paths a user gives on the command line or in Python are
theirs to choose and are not confined. `confined_path` is that rule.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterable

from circuitlang import ast, verbs
from circuitlang.ast_to_ir.names import _similar
from circuitlang.errors import CircuitlangError, Span, diagnostic_order
from circuitlang.resources import stdlib_dir
from circuitlang.text_to_ast import MAX_SOURCE_CHARS, parse


class OutsideError(Exception):
    """A file a hypothesis names lies outside the folder it may read (never raised out:
    the resolver reports it as a diagnostic)."""

    def __init__(self, named: str, real: Path, root: Path):
        super().__init__(f"{named} resolves to {real}, outside {root}")
        self.named, self.real, self.root = named, real, root

    @property
    def message(self) -> str:
        return (f"{self.named} lies outside the folder this file may read ({self.root}): "
                f"it resolves to {self.real}")


def base_folder(importer: str | None) -> Path:
    """The folder paths in a hypothesis are relative to: its file's, else the cwd."""
    return Path(importer).parent if importer else Path.cwd()


def confined_path(named: str | Path, importer: str | None) -> Path:
    """A path a hypothesis file names, relative to the file's folder, checked to lie inside it.

    Args:
        named: the path as the file writes it (`pairs.jsonl`, `data/pairs.jsonl`).
        importer: the hypothesis file's name (None: text without a file; the working
            directory is then the folder).

    Returns:
        The path, absolute, with symlinks resolved.

    Raises:
        OutsideError: it resolves (through `..` or a symlink) outside the folder tree
            of the file that names it.
    """
    base = base_folder(importer)
    root = base.resolve()
    real = (base / Path(named).expanduser()).resolve()
    if not real.is_relative_to(root):
        raise OutsideError(str(named), real, root)
    return real


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
    """Parse an imported file: (program, display name, source).

    Raises:
        FileNotFoundError: no such file.
        OutsideError: a (symlinked) file outside the importer's folder tree.
        CircuitlangError: it does not parse, or cannot be read as UTF-8 text.
    """
    file = _module_path(path, importer)
    # stdlib files are named as users write them; others by their path (for their own
    # relative imports)
    display = "/".join(path) + ".circ" if path[0] == "stdlib" else str(file)
    if len(path) < 2 and path[0] == "stdlib" or not file.is_file():
        raise FileNotFoundError(display)
    if path[0] != "stdlib":
        confined_path(file.relative_to(base_folder(importer)), importer)
    stat = file.stat()
    if stat.st_size > 4 * MAX_SOURCE_CHARS:  # too long however it decodes: do not read it
        raise CircuitlangError(f"{display} is {stat.st_size:,} bytes, more than a "
                               f"hypothesis file may hold ({MAX_SOURCE_CHARS:,} characters)",
                               code="resolve.import")
    program, text = _parse_file(str(file), stat.st_mtime_ns, display)
    return program, display, text


@functools.lru_cache(maxsize=64)
def _parse_file(file: str, mtime_ns: int, display: str) -> tuple[ast.Program, str]:
    """Parse an imported file once per version of it (the prelude is read by every resolve)."""
    try:
        text = Path(file).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CircuitlangError(f"{display} is not UTF-8 text ({exc.reason} at byte "
                               f"{exc.start})", code="resolve.import") from None
    except OSError as exc:
        raise CircuitlangError(f"cannot read {display}: {exc.strerror}",
                               code="resolve.import") from None
    return parse(text, display), text



class ImportResolver:
    """Imports and verb definitions (a part of `_Resolver`)."""

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
        except OutsideError as exc:
            self.report("resolve.import_outside", f"cannot import {dotted}: {exc.message}",
                        span, "a file may import only .circ files in its own folder tree "
                        "(and the stdlib); copy the file there instead of linking to it")
            return
        except CircuitlangError as exc:
            self.report("resolve.import", f"cannot import {dotted}: {exc.message}", span,
                        f"fix {exc.span.filename if exc.span else dotted} first")
            return
        if path != ("stdlib", "prelude"):
            self.imports.append(dotted)
        sub = type(self)(self.shape, self.task, display, (*self.importing, dotted))
        sub._imports(program)
        sub._local_verbs(program)
        for stmt in program.statements:
            if isinstance(stmt, ast.GroupDef):
                sub._group(stmt)
        if sub.diagnostics:
            first = sorted(sub.diagnostics, key=diagnostic_order)[0]
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

