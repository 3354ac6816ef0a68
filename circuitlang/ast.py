"""The AST: what a hypothesis file says, before any name is looked up.

`circuitlang.text_to_ast.parse` produces these nodes; `circuitlang.printer.format`
turns them back into canonical text; `circuitlang.ast_to_ir.resolve` turns them into
the IR. Every node is a frozen dataclass. Source spans (`span`) and layout trivia
(comments, blank lines: `trivia`) are excluded from equality, so two nodes with the
same content compare equal wherever they came from, and `parse(format(p)) == p`.

Nothing here knows about models or tasks: a head is just two numbers, a position
just a name, and a verb use is just a subject followed by terms (which verb it is
gets decided by the resolver, against the verb patterns in scope).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Union

from circuitlang.errors import Span


def _span() -> Span | None:
    return field(default=None, compare=False, repr=False, kw_only=True)


@dataclass(frozen=True, slots=True)
class Trivia:
    """Layout the printer keeps but equality ignores.

    Attributes:
        leading: the full-line comments just above the statement (text after `#`),
            with `None` for a blank line between them.
        trailing: the comment at the end of the statement's (first) line, if any.
        blank_before: whether a blank line separated it from the previous statement.
    """

    leading: tuple[str | None, ...] = ()
    trailing: str | None = None
    blank_before: bool = False


NO_TRIVIA = Trivia()


def _trivia() -> Trivia:
    return field(default=NO_TRIVIA, compare=False, repr=False, kw_only=True)


# ---------------------------------------------------------------- references


@dataclass(frozen=True, slots=True)
class HeadRef:
    """A head by number: `9.6`, `8.6.q`; `None` in layer/head is a wildcard `*`.

    `channel` is the raw channel word (`q`, `k`, `v`, `out`, `pattern`), or a slot
    name such as `$c` inside a verb body; the resolver checks it.
    """

    layer: int | None
    head: int | None
    channel: str | None = None
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class Hole:
    """An unknown component the solver fills in: `?h` (optionally `?h.q`); after `heads`
    (`heads ?g`) a group of heads of unknown size; in a `features` list (`features a.?g`)
    a group of latents."""

    name: str
    channel: str | None = None
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class Slot:
    """A verb parameter `$x` inside a verb definition."""

    name: str
    span: Span | None = _span()


# -------------------------------------------------------------------- targets


@dataclass(frozen=True, slots=True)
class HeadTarget:
    """`head 9.6`, `head ?h`, `head *`, `head 9.*`, or a bare `9.6`.

    `keyword` records whether `head` was written (layout only: not part of equality,
    so `5.5 -> 8.6.q` and `head 5.5 -> head 8.6.q` are the same edge).
    """

    ref: HeadRef | Hole
    span: Span | None = _span()
    keyword: bool = field(default=True, compare=False, repr=False, kw_only=True)


@dataclass(frozen=True, slots=True)
class HeadsTarget:
    """`heads 7.3, 7.9, 8.6`: several heads as one subject.

    A hole in the list is a *group hole* (`heads ?g`): a set of heads of unknown size,
    for the solver to fill.
    """

    items: tuple[HeadRef | Hole, ...]
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class MlpTarget:
    """`mlp 3`, `mlp *` (layer `None`), `mlp ?m` (a hole)."""

    layer: int | Hole | None
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class ResidTarget:
    """`resid 3`: the residual stream entering block 3 (`resid *`, `resid ?r`)."""

    layer: int | Hole | None
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class EmbedTarget:
    """`embed`: token plus positional embedding."""

    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class LogitsTarget:
    """`logits`: the model's output."""

    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class GroupTarget:
    """A named group (`name_movers`), optionally at one channel (`name_movers.q`)."""

    name: str
    channel: str | None = None
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class SlotTarget:
    """A verb parameter used as a site: `$h`, `$g.q`, `$g.$c`."""

    name: str
    channel: str | None = None
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class NeuronTarget:
    """`neuron 5.12` (an MLP hidden unit; `neuron 5.*` sweeps a layer's units)."""

    ref: HeadRef
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class NeuronsTarget:
    """`neurons 5.12, 5.99`: several neurons as one subject."""

    items: tuple[HeadRef, ...]
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class FeatureTarget:
    """`feature res5.1234`: a latent of the SAE the file declares as `res5` (`res5.*`: every
    latent, index None; `res5.?f`: an unknown latent the solver fills in)."""

    sae: str
    index: "int | Hole | None"
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class FeaturesTarget:
    """`features res5.12, res5.99`: several latents as one subject (each a `FeatureTarget`
    with an index). A hole in the list (`features res5.?g`) is a *latent group hole*: a
    set of latents of that SAE of unknown size, for the solver to fill."""

    items: tuple[FeatureTarget, ...]
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class ErrorTarget:
    """`error res5`: what SAE `res5` misses at its hook point (its reconstruction error)."""

    sae: str
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class SubspaceTarget:
    """`subspace io`: a state's coordinates in the subspace the file declares (or aligns)
    as `io`."""

    name: str
    span: Span | None = _span()


Target = Union[
    HeadTarget, HeadsTarget, MlpTarget, ResidTarget, EmbedTarget, LogitsTarget,
    GroupTarget, SlotTarget, NeuronTarget, NeuronsTarget, FeatureTarget, FeaturesTarget, ErrorTarget,
    SubspaceTarget,
]


# ------------------------------------------------------- positions, features


@dataclass(frozen=True, slots=True)
class PositionRef:
    """A position the task names, with an offset: `END`, `S1+1`, `all`."""

    name: str
    offset: int = 0
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class FeatureRef:
    """A feature of the prompt: `template`, `IO`, or built-in `token(IO)`, `position(S)`.

    `arg` is set for the call form (`token(IO)` is `FeatureRef("token", PositionRef("IO"))`).
    """

    name: str
    arg: PositionRef | Slot | None = None
    span: Span | None = _span()


Position = Union[PositionRef, Slot]
Feature = Union[FeatureRef, Slot]


# ---------------------------------------------------------------- verb terms


@dataclass(frozen=True, slots=True)
class Word:
    """A bare word in a verb use: a verb word (`moves`) or an argument (`name`, `END`)."""

    text: str
    span: Span | None = _span()


# A term of a verb use: a word, or something only an argument can be.
Term = Union[Word, PositionRef, FeatureRef, HeadRef, Hole, Slot]


# ------------------------------------------------------------- expressions


@dataclass(frozen=True, slots=True)
class Number:
    """A numeric literal, kept exact (`0.85` is 85/100, never a float)."""

    value: Decimal
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class Name:
    """A metric name in an expression: `recovered`, `clean`, `logit_diff`."""

    name: str
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class BinOp:
    """`left op right` with op one of `+ - * /`."""

    op: str
    left: "Expr"
    right: "Expr"
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class Neg:
    """Unary minus."""

    operand: "Expr"
    span: Span | None = _span()


@dataclass(frozen=True, slots=True)
class Call:
    """A function in an expression: `abs(x)`, `min(a, b)`, `max(a, b)`."""

    func: str
    args: tuple["Expr", ...]
    span: Span | None = _span()


Expr = Union[Number, Name, BinOp, Neg, Call]


# ---------------------------------------------------------------- statements


@dataclass(frozen=True, slots=True)
class Cite:
    """`cite "..."`: the paper a circuit comes from."""

    text: str
    span: Span | None = _span()
    trivia: Trivia = _trivia()


@dataclass(frozen=True, slots=True)
class ModelDecl:
    """`model gpt2` or `model "path/to/model"`."""

    name: str
    span: Span | None = _span()
    trivia: Trivia = _trivia()


#: A task parameter's value: a whole number, a decimal, a string or bare word, `true` /
#: `false`, or a list of those (`[0, 1, 2]`, `["Mary", "John"]`).
ParamValue = Union[int, Decimal, str, bool, tuple]


@dataclass(frozen=True, slots=True)
class TaskParam:
    """`length=20` in `task induction length=20`.

    `value` keeps the literal's kind: `int`, `Decimal`, `str` (from a quoted string or
    a bare word: `template_set=ABBA` is `template_set="ABBA"`), `bool`, or a tuple of
    those for a list. Which parameters a task has, and of what type, is the
    resolver's business (`circuitlang.tasks.params`).
    """

    name: str
    value: ParamValue
    span: Span | None = _span()

    def __eq__(self, other: object) -> bool:
        # `true` and `1` (and `1` and `1.0`) are different literals, though Python's
        # `True == 1 == Decimal(1)`: compare the kinds too.
        if not isinstance(other, TaskParam):
            return NotImplemented
        return self.name == other.name and _typed(self.value) == _typed(other.value)

    def __hash__(self) -> int:
        return hash((self.name, _typed(self.value)))


def _typed(value: ParamValue):
    if isinstance(value, tuple):
        return tuple(_typed(v) for v in value)
    return (type(value).__name__, value)


@dataclass(frozen=True, slots=True)
class TaskDecl:
    """`task ioi`, `task induction length=20 vocab=32`, `task "data/pairs.jsonl"`."""

    name: str
    params: tuple[TaskParam, ...] = ()
    span: Span | None = _span()
    trivia: Trivia = _trivia()


@dataclass(frozen=True, slots=True)
class Use:
    """`use stdlib.ioi`: import another file's groups, verbs and claims."""

    path: tuple[str, ...]
    span: Span | None = _span()
    trivia: Trivia = _trivia()


@dataclass(frozen=True, slots=True)
class MetricDecl:
    """`metric logit_diff`."""

    name: str
    span: Span | None = _span()
    trivia: Trivia = _trivia()


@dataclass(frozen=True, slots=True)
class AblationDecl:
    """`ablation resample given template, order` (or `mean`, `zero`)."""

    mode: str
    given: tuple[Feature, ...] = ()
    span: Span | None = _span()
    trivia: Trivia = _trivia()


@dataclass(frozen=True, slots=True)
class SemanticsDecl:
    """`semantics paths` (the default) or `semantics channels`: how the scrubber reads a
    claimed node's inputs that no claimed child covers (docs/checker.md)."""

    mode: str
    span: Span | None = _span()
    trivia: Trivia = _trivia()


@dataclass(frozen=True, slots=True)
class Reported:
    """`reported clean = 3.56`: a number the paper reports."""

    name: str
    value: Decimal
    span: Span | None = _span()
    trivia: Trivia = _trivia()


@dataclass(frozen=True, slots=True)
class Setting:
    """`seed 0` or `samples 200`."""

    name: str
    value: int
    span: Span | None = _span()
    trivia: Trivia = _trivia()


@dataclass(frozen=True, slots=True)
class GroupDef:
    """`group name_movers = heads 9.9, 9.6, 10.0`."""

    name: str
    target: Target
    span: Span | None = _span()
    trivia: Trivia = _trivia()


@dataclass(frozen=True, slots=True)
class SaeDecl:
    """`sae res5 = "saes/res5" at resid 5`: a sparse autoencoder the file's claims may use.

    `hook` is "resid", "attn" or "mlp"; `path` is the folder as written (relative to the
    file's folder).
    """

    name: str
    path: str
    hook: str
    layer: int
    span: Span | None = _span()
    trivia: Trivia = _trivia()


@dataclass(frozen=True, slots=True)
class SubspaceDecl:
    """`subspace io = "io.safetensors" at resid 6`: a fixed orthonormal basis the file may use.

    `hook` is "resid", "mlp" or "head" (`head` is then the head of layer `layer`, whose
    output the subspace lies in); `path` is the file as written (relative to the file's
    folder).
    """

    name: str
    path: str
    hook: str
    layer: int
    head: int | None = None
    span: Span | None = _span()
    trivia: Trivia = _trivia()


@dataclass(frozen=True, slots=True)
class Depends:
    """`SITE at POS depends on F, G` (`depends on nothing`: empty `features`)."""

    target: Target
    position: Position
    features: tuple[Feature, ...]
    span: Span | None = _span()
    trivia: Trivia = _trivia()


@dataclass(frozen=True, slots=True)
class Edge:
    """`SENDER -> RECEIVER at POS`: the receiver reads the sender at that position."""

    sender: Target
    receiver: Target
    position: Position
    span: Span | None = _span()
    trivia: Trivia = _trivia()


@dataclass(frozen=True, slots=True)
class VerbUse:
    """`SUBJECT verb term...`: `head 9.6 moves name to END`.

    `verb` is the first word after the subject; `terms` are the rest, still unsorted
    into words and arguments.
    """

    subject: Target
    verb: str
    terms: tuple[Term, ...]
    span: Span | None = _span()
    trivia: Trivia = _trivia()


@dataclass(frozen=True, slots=True)
class VerbDef:
    """`verb $h moves $x to $p:` and an indented body of claims.

    `words` is the pattern after the subject slot: the verb word first, then words
    (`Word`) and parameters (`Slot`).
    """

    subject: str
    words: tuple[Word | Slot, ...]
    body: tuple["Statement", ...]
    span: Span | None = _span()
    trivia: Trivia = _trivia()


#: The words that may end a `patch` line: which run is patched with which values.
PATCH_DIRECTIONS = ("noise", "denoise", "attribution")


@dataclass(frozen=True, slots=True)
class Patch:
    """`patch TARGET at POS [noise|denoise|attribution]`: activation patching; wildcards
    make a sweep.

    `direction` is the word as written: None when there is none (noising, the default),
    "noise", "denoise" or "attribution" (noising estimated to first order, for units;
    the parser refuses any other word).
    """

    target: Target
    position: Position
    direction: str | None = None
    span: Span | None = _span()
    trivia: Trivia = _trivia()


@dataclass(frozen=True, slots=True)
class PathPatch:
    """`patch SENDER -> RECEIVER at POS`: path patching along one edge."""

    sender: Target
    receiver: Target
    position: Position
    span: Span | None = _span()
    trivia: Trivia = _trivia()


@dataclass(frozen=True, slots=True)
class Ablate:
    """`ablate TARGET [with MODE] [at POS]`."""

    target: Target
    mode: str | None = None
    position: Position | None = None
    span: Span | None = _span()
    trivia: Trivia = _trivia()


#: What `trace` restores, and its options with their defaults (`circuitlang.tracing`).
TRACE_SITES = ("resid", "mlp", "attn")
TRACE_OPTIONS = {"noise": 3.0, "window": 1}
#: What `probe` reads, and its options (`circuitlang.probes`).
PROBE_SITES = ("resid", "mlp")
PROBE_OPTIONS = ("save", "heldout")


@dataclass(frozen=True, slots=True)
class Trace:
    """`trace SITE * at POS [noise K] [window K]`: causal tracing.

    `site` is one of `TRACE_SITES`; `options` the (name, value) pairs as written, in
    order (the parser refuses unknown names and repeats).
    """

    site: str
    position: Position
    options: tuple[tuple[str, float | int], ...] = ()
    span: Span | None = _span()
    trivia: Trivia = _trivia()


@dataclass(frozen=True, slots=True)
class Probe:
    """`probe SITE * at POS for FEATURE [heldout F] [save "file"]`: a linear probe per layer.

    `site` is one of `PROBE_SITES`; `options` the (name, value) pairs as written.
    """

    site: str
    position: Position
    feature: str
    options: tuple[tuple[str, float | int | str], ...] = ()
    span: Span | None = _span()
    trivia: Trivia = _trivia()


#: Options of `align` (circuitlang.das.ALIGN_DEFAULTS gives their defaults).
ALIGN_OPTIONS = ("dims", "steps", "pairs", "heldout")


@dataclass(frozen=True, slots=True)
class Align:
    """`align NAME at PLACE at POS with FEATURE [dims K] [steps N] [pairs N] [heldout F]`:
    distributed alignment search for subspace NAME (the place as in `SubspaceDecl`)."""

    name: str
    hook: str
    layer: int
    head: int | None
    position: Position
    feature: str
    options: tuple[tuple[str, float | int], ...] = ()
    span: Span | None = _span()
    trivia: Trivia = _trivia()


@dataclass(frozen=True, slots=True)
class Expect:
    """`expect [each] LHS OP RHS`; `each` makes it a per-prompt property."""

    each: bool
    lhs: Expr
    op: str
    rhs: Expr
    span: Span | None = _span()
    trivia: Trivia = _trivia()


@dataclass(frozen=True, slots=True)
class HoleIn:
    """`?s in layers 7-8`, `?s in layer 5`, `?s in heads 9.6, 9.9`: where a hole may be.

    Exactly one of `layers` and `heads` is non-empty. `layers` holds inclusive
    (first, last) ranges (`layer 5` and `layers 5-5` are both `((5, 5),)`; `layers 3-5, 8`
    is `((3, 5), (8, 8))`); `heads` the heads listed (`9.*` is every head of layer 9). The
    hole is named without a channel: a constraint is about the component, not its input.
    """

    hole: Hole
    layers: tuple[tuple[int, int], ...] = ()
    heads: tuple[HeadRef, ...] = ()
    span: Span | None = _span()
    trivia: Trivia = _trivia()


#: The bounds of `?g has ... N heads`.
SIZE_BOUNDS = ("at most", "at least", "exactly")


@dataclass(frozen=True, slots=True)
class HoleSize:
    """`?g has at most 4 heads` (`at least`, `exactly`): how many heads a group hole holds,
    or latents a latent group hole (`?g has at most 8 features`).

    `bound` is one of `SIZE_BOUNDS`; `unit` is "heads" or "features" (what is counted).
    Whether the singular or the plural was written is layout (the printer writes
    `1 head`, `4 heads`, `1 feature`, `8 features`).
    """

    hole: Hole
    bound: str
    count: int
    unit: str = "heads"
    span: Span | None = _span()
    trivia: Trivia = _trivia()


HoleConstraint = Union[HoleIn, HoleSize]


Statement = Union[
    Cite, ModelDecl, TaskDecl, Use, MetricDecl, AblationDecl, SemanticsDecl, Reported, Setting,
    GroupDef, Depends, Edge, VerbUse, VerbDef, Patch, PathPatch, Ablate, Expect, HoleIn, HoleSize,
    SaeDecl, Trace, Probe, SubspaceDecl, Align,
]


@dataclass(frozen=True, slots=True)
class Program:
    """A whole file: its statements in order.

    Attributes:
        statements: the statements, in source order.
        trailing_comments: comments after the last statement (printed at the end).
        filename: where the text came from (for messages), not part of equality.
    """

    statements: tuple[Statement, ...]
    trailing_comments: tuple[str, ...] = field(default=(), compare=False, repr=False)
    filename: str | None = field(default=None, compare=False, repr=False)
