"""Subspaces: `subspace` declarations, `align` statements (DAS) and `subspace NAME` sites.

`subspace io = "io.safetensors" at resid 6` becomes a `sites.Basis`: the file is read
relative to the file's folder and confined to it (as `sae` folders are), and its basis is
read and checked now (safetensors only, the key `basis` or a probe file's `layer{L}.basis`,
orthonormal, as wide as the model's stream). `align io at resid 6 at END with IO dims 1`
becomes an `ir.Align` and declares `io` from then on: its basis is the file
`io.safetensors` beside the hypothesis file, which the `align` writes when it runs, so
only later statements may use it. `subspace io` names the coordinates site
`sites.Subspace`. A part of `_Resolver`.
"""
from __future__ import annotations

from pathlib import Path

from circuitlang import ast, ir, sites
from circuitlang.ast_to_ir.imports import OutsideError, confined_path
from circuitlang.ast_to_ir.names import _similar
from circuitlang.errors import CircuitlangError
from circuitlang.text_to_ast import KEYWORDS


class SubspaceResolver:
    """`subspace` declarations, `align` statements and `subspace NAME` sites."""

    subspaces: dict[str, sites.Basis]

    def _subspace_table(self) -> dict[str, sites.Basis]:
        if not hasattr(self, "subspaces"):
            self.subspaces = {}
            self.refused_subspaces: set[str] = set()
            self.aligned_names: set[str] = set()
        return self.subspaces

    def _align_ahead(self, stmt: ast.Align) -> None:
        """Before the statements are resolved in order: the names `align`s will declare (a use
        above its `align` gets its own message)."""
        self._subspace_table()
        self.aligned_names.add(stmt.name)

    def _place_ok(self, stmt, name: str) -> bool:
        """The checks a declaration and an `align` share: the name, and the place."""
        table = self._subspace_table()
        if name in KEYWORDS:
            self.report("resolve.subspace_name", f"{name!r} is a keyword and cannot name a subspace",
                        stmt.span, f"call it {name}_dir")
            return False
        if name in table:
            self.report("resolve.subspace_twice", f"subspace {name} is declared twice", stmt.span,
                        "give each subspace its own name")
            return False
        shape = self.shape
        top = shape.n_layers if stmt.hook == "resid" else shape.n_layers - 1
        if not 0 <= stmt.layer <= top:
            self.report("resolve.layer_range", f"{stmt.hook} {stmt.layer} out of range (model has "
                        f"layers 0-{top})", stmt.span, f"did you mean {stmt.hook} {min(stmt.layer, top)}?")
            return False
        if stmt.hook == "mlp" and not shape.has_mlp:
            self.report("resolve.no_mlp", "this model has no MLPs (attention only)", stmt.span,
                        "put the subspace at resid L or head L.H.out")
            return False
        if stmt.hook == "head" and shape.n_heads and stmt.head >= shape.n_heads:
            self.report("resolve.head_range", f"head {stmt.layer}.{stmt.head} out of range (heads "
                        f"0-{shape.n_heads - 1})", stmt.span, f"did you mean head {stmt.layer}.{shape.n_heads - 1}.out?")
            return False
        return True

    def _subspace_decl(self, stmt: ast.SubspaceDecl) -> None:
        table = self._subspace_table()
        known = len(self.diagnostics)
        basis = self._declare_subspace(stmt) if self._place_ok(stmt, stmt.name) else None
        if basis is not None:
            table[stmt.name] = basis
        elif len(self.diagnostics) > known:
            self.refused_subspaces.add(stmt.name)  # its uses are not reported again as unknown

    def _declare_subspace(self, stmt: ast.SubspaceDecl) -> sites.Basis | None:
        from circuitlang.models.subspace import (  # torch: only for subspace files
            basis_key,
            read_basis,
        )

        try:
            real = confined_path(stmt.path, self.filename)
            key = basis_key(real, stmt.layer)
            b = read_basis(real, key, d_model=self.shape.d_model or None)
        except OutsideError as exc:
            self.report("resolve.subspace_outside", f"cannot read subspace file: {exc.message}", stmt.span,
                        "a file may read subspace files only inside its own folder tree")
            return None
        except CircuitlangError as exc:
            self.report(exc.diagnostics[0].code, exc.message, stmt.span, exc.hint)
            return None
        except (OSError, ValueError) as exc:  # a name the file system refuses
            self.report("resolve.subspace_path", f"cannot read subspace file {stmt.path!r}: {exc}", stmt.span,
                        'write the file as a relative path, such as "io.safetensors"')
            return None
        return sites.Basis(stmt.name, str(real), stmt.hook, stmt.layer, stmt.head, int(b.shape[1]), key)

    def _align(self, stmt: ast.Align, text: str) -> ir.Align | None:
        """`align NAME at PLACE at P with F ...`, checked; declares NAME for later statements."""
        table = self._subspace_table()
        if not self._place_ok(stmt, stmt.name):
            self.refused_subspaces.add(stmt.name)
            return None
        from circuitlang.das import ALIGN_DEFAULTS

        options = {**ALIGN_DEFAULTS, **dict(stmt.options)}
        names = self.task.feature_names()
        ok = True
        if stmt.feature not in names:
            close = _similar(stmt.feature, names)
            self.report("resolve.feature", f"unknown feature {stmt.feature!r}", stmt.span,
                        (f"did you mean {close}? " if close else "")
                        + f"task {self.task.name} defines features " + ", ".join(names))
            ok = False
        width = self.shape.d_model
        if width and options["dims"] > width:
            self.report("resolve.align_dims", f"dims {options['dims']} is more than the model's width {width}",
                        stmt.span, f"ask for dims 1..{width}")
            ok = False
        pos = self._position(stmt.position)
        if pos is not None and pos.is_all:
            self.report("resolve.align_position", "align intervenes at one position, not all", stmt.span,
                        "name one, e.g. `align io at resid 6 at END with IO`")
            ok = False
        if not ok or pos is None:
            self.refused_subspaces.add(stmt.name)
            return None
        folder = Path(self.filename).resolve().parent if self.filename else Path.cwd()
        basis = sites.Basis(stmt.name, str(folder / f"{stmt.name}.safetensors"), stmt.hook, stmt.layer,
                            stmt.head, int(options["dims"]))
        table[stmt.name] = basis
        return ir.Align(basis, pos, self.task.canonical_feature(stmt.feature), int(options["steps"]),
                        int(options["pairs"]), float(options["heldout"]), text=text, span=stmt.span)

    def _subspace_sites(self, target: ast.SubspaceTarget) -> list[ir.SiteOrHole] | None:
        table = self._subspace_table()
        if target.name in table:
            return [sites.Subspace(table[target.name])]
        if target.name in self.refused_subspaces:
            return None  # its declaration was refused, and said why
        if target.name in self.aligned_names:
            self.report("resolve.subspace_order", f"subspace {target.name} is used before the `align` that "
                        "learns it", target.span, f"move `align {target.name} ...` above this statement: "
                        "the basis exists only once the align has run")
            return None
        close = _similar(target.name, table)
        hint = (f"did you mean {close}?" if close else
                "subspaces here: " + ", ".join(table) if table else
                f'declare it first: `subspace {target.name} = "file.safetensors" at resid 6`, '
                f"or learn it with `align {target.name} at resid 6 at END with IO`")
        self.report("resolve.subspace", f"unknown subspace {target.name!r}", target.span, hint)
        return None
