"""Names in claims and experiments: sites (heads, MLPs, groups, holes), positions, features.

Each is checked against the model's `ModelShape` and the task's `TaskSignature`; a
wrong name is reported with what would have been valid.
"""
from __future__ import annotations

import difflib
from typing import Iterable

from circuitlang import ast, ir, sites, verbs
from circuitlang.errors import Span


def _similar(word: str, choices: Iterable[str]) -> str | None:
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


def _base_position(name: str) -> tuple[str, int]:
    """`S1+1` -> ("S1", 1); `END` -> ("END", 0) (`sites.Position.parse`)."""
    position = sites.Position.parse(name)
    return position.name, position.offset



CHANNELS = tuple(c.value for c in sites.Channel)


class NameResolver:
    """Sites, channels, positions and features (a part of `_Resolver`)."""

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
            case ast.NeuronTarget() | ast.NeuronsTarget() | ast.FeatureTarget() | ast.FeaturesTarget() | ast.ErrorTarget():
                return self._unit_sites(target, wildcards)  # ast_to_ir.units
            case ast.SubspaceTarget():
                return self._subspace_sites(target)  # ast_to_ir.subspaces
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

