"""Sites below the component: `sae` declarations, neurons, SAE latents and error terms.

`sae res5 = "saes/res5" at resid 5` becomes a `sites.Dictionary`: the folder is read
relative to the file's folder and confined to it (as `use` and task files are), and
its cfg.json is read (never its weights) for the format, the width it reads (it must
be the model's d_model), its number of latents, and where it was trained when its files
say (SAELens's `hook_name`, sparsify's hookpoint folder): it must be where it is declared. `neuron 5.12` is checked against
the model's MLP width (`ModelShape.d_mlp`), `feature res5.1234` against the SAE's
latents, `error res5` needs the SAE declared. A part of `_Resolver`.
"""
from __future__ import annotations

from circuitlang import ast, ir, sites
from circuitlang.ast_to_ir.imports import OutsideError, confined_path
from circuitlang.ast_to_ir.names import _similar
from circuitlang.errors import CircuitlangError
from circuitlang.text_to_ast import KEYWORDS


class UnitResolver:
    """`sae` declarations and neuron / latent / error sites (uses `report`, `shape`)."""

    saes: dict[str, sites.Dictionary]

    # -- declarations
    def _sae_decl(self, stmt: ast.SaeDecl) -> None:
        if not hasattr(self, "saes"):
            self.saes = {}
        refused = getattr(self, "refused_saes", set())
        self.refused_saes = refused
        known = len(self.diagnostics)
        self._declare_sae(stmt)
        if len(self.diagnostics) > known and stmt.name not in self.saes:
            refused.add(stmt.name)  # its uses are not reported again as unknown

    def _declare_sae(self, stmt: ast.SaeDecl) -> None:
        if stmt.name in KEYWORDS:
            self.report("resolve.sae_name", f"{stmt.name!r} is a keyword and cannot name an SAE",
                        stmt.span, f"call it {stmt.name}_sae")
            return
        if stmt.name in self.saes:
            self.report("resolve.sae_twice", f"SAE {stmt.name} is declared twice", stmt.span,
                        "give each dictionary its own name")
            return
        n = self.shape.n_layers
        top = n if stmt.hook == "resid" else n - 1
        if not 0 <= stmt.layer <= top:
            self.report("resolve.layer_range", f"{stmt.hook} {stmt.layer} out of range (model has "
                        f"layers 0-{top})", stmt.span, f"did you mean {stmt.hook} {min(stmt.layer, top)}?")
            return
        if stmt.hook == "mlp" and not self.shape.has_mlp:
            self.report("resolve.no_mlp", "this model has no MLPs (attention only)", stmt.span,
                        "declare the SAE at resid L or attn L")
            return
        from circuitlang.models.sae import check_trained_at, read_sae_info  # torch: only for SAE files

        try:
            real = confined_path(stmt.path, self.filename)
            info = read_sae_info(real)
            check_trained_at(info, stmt.hook, stmt.layer)
        except OutsideError as exc:
            self.report("resolve.sae_outside", f"cannot read SAE folder: {exc.message}", stmt.span,
                        "a file may read SAE folders only inside its own folder tree")
            return
        except CircuitlangError as exc:
            self.report(exc.diagnostics[0].code, exc.message, stmt.span, exc.hint)
            return
        except (OSError, ValueError) as exc:  # a name the file system refuses
            self.report("resolve.sae_path", f"cannot read SAE folder {stmt.path!r}: {exc}", stmt.span,
                        'write the folder as a relative path, such as "saes/res5"')
            return
        if info.d_in != self.shape.d_model:
            self.report("resolve.sae_width", f"SAE {stmt.name} reads width {info.d_in}, but the model's "
                        f"stream is {self.shape.d_model} wide", stmt.span,
                        "declare an SAE trained on this model")
            return
        self.saes[stmt.name] = sites.Dictionary(stmt.name, str(real), stmt.hook, stmt.layer, info.d_sae)

    # -- sites
    def _unit_sites(self, target, wildcards: bool) -> list[ir.SiteOrHole] | None:
        match target:
            case ast.NeuronTarget(ref=ref):
                return self._neurons([ref], wildcards)
            case ast.NeuronsTarget(items=items):
                return self._neurons(list(items), wildcards)
            case ast.FeaturesTarget(items=items):  # a hole in the list: a latent group hole
                out: list[ir.SiteOrHole] = []
                ok = True
                for item in items:  # every bad item is reported
                    found = self._unit_sites(item, wildcards)
                    if found is None:
                        ok = False
                        continue
                    out += [ir.Hole(s.name, "latents", sae=s.sae) if isinstance(s, ir.Hole) else s for s in found]
                return out if ok else None
            case ast.FeatureTarget(sae=name, index=index):
                sae = self._dictionary(name, target.span)
                if sae is None:
                    return None
                if isinstance(index, ast.Hole):
                    return [ir.Hole(index.name, "latent", sae=sae)]
                if index is None:
                    if not wildcards:
                        self.report("resolve.wildcard", f"wildcard `feature {name}.*` in a claim",
                                    target.span, "wildcards sweep in `patch` and `ablate`; a claim "
                                    f"names one latent, such as `feature {name}.0`")
                        return None
                    return [sites.Latent(sae, i) for i in range(sae.d_sae)]
                if index >= sae.d_sae:
                    self.report("resolve.latent_range", f"feature {name}.{index} out of range (SAE "
                                f"{name} has latents 0-{sae.d_sae - 1})", target.span,
                                f"did you mean feature {name}.{sae.d_sae - 1}?")
                    return None
                return [sites.Latent(sae, index)]
            case ast.ErrorTarget(sae=name):
                sae = self._dictionary(name, target.span)
                return None if sae is None else [sites.SaeError(sae)]
        raise TypeError(f"not a unit target: {target!r}")  # pragma: no cover

    def _dictionary(self, name: str, span) -> sites.Dictionary | None:
        saes = getattr(self, "saes", {})
        if name in saes:
            return saes[name]
        if name in getattr(self, "refused_saes", ()):
            return None  # its declaration was refused, and said why
        close = _similar(name, saes)
        hint = (f"did you mean {close}?" if close else
                "SAEs here: " + ", ".join(saes) if saes else
                f'declare it first: `sae {name} = "path/to/sae" at resid 5`')
        self.report("resolve.sae", f"unknown SAE {name!r}", span, hint)
        return None

    def _neurons(self, refs: list[ast.HeadRef], wildcards: bool) -> list[ir.SiteOrHole] | None:
        shape = self.shape
        if not shape.has_mlp:
            self.report("resolve.no_mlp", "this model has no MLPs (attention only), so no neurons",
                        refs[0].span, "claim heads, embed or logits instead")
            return None
        width = shape.d_mlp
        out: list[ir.SiteOrHole] = []
        ok = True
        for ref in refs:
            text = f"{'*' if ref.layer is None else ref.layer}.{'*' if ref.head is None else ref.head}"
            if (ref.layer is None or ref.head is None) and not wildcards:
                self.report("resolve.wildcard", f"wildcard neuron {text} in a claim", ref.span,
                            "wildcards sweep in `patch` and `ablate`; a claim names neurons, such as "
                            "neuron 5.12")
                ok = False
                continue
            if ref.layer is not None and ref.layer >= shape.n_layers:
                self.report("resolve.neuron_range", f"neuron {text} out of range (model has layers "
                            f"0-{shape.n_layers - 1})", ref.span,
                            f"did you mean neuron {shape.n_layers - 1}.{ref.head if ref.head is not None else '*'}?")
                ok = False
                continue
            if ref.head is None and not width:
                self.report("resolve.neuron_width", f"cannot sweep neuron {text}: the width of this "
                            "model's MLPs is not known without its config", ref.span,
                            "name the model by a local folder with config.json, or list the neurons")
                ok = False
                continue
            if ref.head is not None and width and ref.head >= width:
                self.report("resolve.neuron_range", f"neuron {text} out of range (each MLP has neurons "
                            f"0-{width - 1})", ref.span, f"did you mean neuron {text.split('.')[0]}.{width - 1}?")
                ok = False
                continue
            layers = range(shape.n_layers) if ref.layer is None else [ref.layer]
            units = range(width) if ref.head is None else [ref.head]
            out.extend(sites.Neuron(layer, unit) for layer in layers for unit in units)
        return out if ok else None

    def _unit_grid(self, target) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """The sweep grid of `patch neuron 5.*` ((d_mlp,), ("neuron",)), `neuron *.*`
        ((n_layers, d_mlp), ("layer", "neuron")), `feature res5.*` ((d_sae,), ("latent",))."""
        if isinstance(target, ast.NeuronTarget):
            grid, axes = [], []
            if target.ref.layer is None:
                grid.append(self.shape.n_layers)
                axes.append("layer")
            if target.ref.head is None:
                grid.append(self.shape.d_mlp)
                axes.append("neuron")
            return tuple(grid), tuple(axes)
        if isinstance(target, ast.FeatureTarget) and target.index is None:
            sae = getattr(self, "saes", {}).get(target.sae)
            if sae is not None:
                return (sae.d_sae,), ("latent",)
        return (), ()
