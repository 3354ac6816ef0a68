"""The model layer: real Hugging Face transformers, typed sites, exact capture and patching.

Takes a model name (embedded short name, local folder, or hub id); gives a
`LoadedModel` whose `run` captures and replaces activations at typed sites
(`circuitlang.sites`) in one batched forward pass.

API (what the checker and the solver use)::

    lm = load_model("toy-induction")               # or a local path, or "gpt2"
    known_shape("gpt2")                            # ModelShape, no weights
    list_models()                                  # embedded toy models

    run = lm.run(ids, mask, capture=[Head(1, 0), Head(1, 0, Channel.PATTERN), Resid(2)])
    run.logits                                     # [B, T, V]
    run.cache[Head(1, 0)]                          # that head's own output [B, T, D]

    # node patches: whole sequence, or one / k positions per row, on chosen rows
    lm.run(ids, patches=[Patch(Head(1, 0), corrupt.cache[Head(1, 0)])])
    lm.run(ids, patches=[Patch(Mlp(3), value_BD, positions=end_B)])

    # edge patches (ACDC / auto-circuit): mask [B, R, S] or [B, T, R, S], 1 = ablate
    es = lm.edge_set()                             # or EdgePatch.all_edges(shape)
    abl = lm.run(corrupt_ids, capture=es.senders).cache
    lm.run(ids, edges=EdgePatch(abl, es.mask(B), es.senders, es.receivers))

Site values (B batch, T tokens, D d_model): `Embed`/`TokenEmbed`/`PosEmbed` [B, T, D];
`Head(l, h)` (OUT) the head's own contribution to the residual stream (z_h @ W_O[h],
no shared bias) [B, T, D]; `Head(l, h, Q|K|V)` the residual stream the head's
q/k/v computation reads, *before* the layer norm [B, T, D]; `Head(l, h, PATTERN)`
[B, Tq, Tk]; `Mlp(l)` [B, T, D]; `Resid(l)` the stream entering block l [B, T, D];
`Logits()` [B, T, V]. Under grouped-query attention `Head(l, h, K|V)` is the input
of the key/value head query head h uses (shared by its group).

Identity interventions reproduce the plain forward pass exactly (CPU fp32).
"""
from circuitlang.models.interventions import CleanPass, EdgePatch, EdgeReference, EdgeSet, Patch, Run
from circuitlang.models.known import KNOWN_SHAPES, ToyInfo, known_shape, list_models, toy_names
from circuitlang.models.load import LoadedModel, load_config, load_model
from circuitlang.models.adapters import supported_model_types

__all__ = [
    "CleanPass",
    "EdgePatch",
    "EdgeReference",
    "EdgeSet",
    "KNOWN_SHAPES",
    "LoadedModel",
    "Patch",
    "Run",
    "ToyInfo",
    "known_shape",
    "list_models",
    "load_config",
    "load_model",
    "supported_model_types",
    "toy_names",
]
