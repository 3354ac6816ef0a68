"""`circuitlang models`: list the embedded toy models (shape, description), or show one
model's shape (`circuitlang models gpt2`) without loading weights."""
from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the embedded models, or show a model's shape",
        description="List the embedded toy models (loadable offline by short name), or show the "
        "shape of one model (short name, local folder or well-known hub id) without loading weights.",
    )
    parser.add_argument("name", nargs="?", help="a model to describe instead of listing")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)


def _shape_dict(shape) -> dict:
    return {
        "name": shape.name, "architecture": shape.architecture, "n_layers": shape.n_layers,
        "n_heads": shape.n_heads, "n_kv_heads": shape.kv_heads, "d_model": shape.d_model,
        "d_head": shape.d_head, "vocab_size": shape.vocab_size, "n_ctx": shape.n_ctx,
        "has_mlp": shape.has_mlp,
    }


def _line(shape) -> str:
    mlp = "" if shape.has_mlp else ", attention-only"
    kv = f" ({shape.kv_heads} kv)" if shape.kv_heads != shape.n_heads else ""
    return (f"{shape.architecture}, {shape.n_layers} layers x {shape.n_heads} heads{kv}, "
            f"d_model {shape.d_model}, vocab {shape.vocab_size}{mlp}")


def run(args: argparse.Namespace) -> int:
    from circuitlang.models import known_shape, list_models

    if args.name:
        shape = known_shape(args.name)
        print(json.dumps(_shape_dict(shape), indent=2) if args.json else f"{shape.name}: {_line(shape)}")
        return 0
    toys = list_models()
    if args.json:
        print(json.dumps([dict(_shape_dict(t.shape), description=t.description,
                                measured=t.metadata.get("measured", {})) for t in toys], indent=2))
        return 0
    if not toys:
        print("no embedded models in this install (train them: python -m circuitlang.models.toys.train)")
        return 0
    width = max(len(t.name) for t in toys)
    print("embedded models (load offline by name, e.g. circuitlang.load_model('toy-induction')):")
    for t in toys:
        print(f"  {t.name:<{width}}  {_line(t.shape)}")
        if t.description:
            print(f"  {'':<{width}}  {t.description}")
    return 0
