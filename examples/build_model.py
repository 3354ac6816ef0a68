"""Build a model with a published model's layer x head shape from a config, for the stories
that need GPT-2's tokenizer but cannot download GPT-2 (no hub here; CI has none either).

Takes a shape name and a folder; gives, in that folder, a GPT-2-architecture model with
random weights from a fixed seed, saved as safetensors with the real GPT-2 BPE tokenizer
(tests/fixtures/gpt2_tokenizer), so `circuitlang check FILE --model FOLDER` runs a
hypothesis written for that model end to end. The residual stream is narrow (`--d-model`,
default 48) so that a check takes seconds on a CPU: the numbers such a model gives say
nothing about the real one, only that the whole pipeline runs on its shape.

    python examples/build_model.py gpt2 gpt2-shaped
    python examples/build_model.py attn-only-4l attn-only-4l-shaped

Shapes: gpt2 (12 layers x 12 heads, as GPT-2 small) and attn-only-4l (4 x 8, no MLPs,
as the docstring paper's model). Users with the hub pass the real model's name instead
(`--model gpt2`), and nothing here is needed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "gpt2_tokenizer"
#: shape name -> (layers, heads, attention-only)
SHAPES = {"gpt2": (12, 12, False), "attn-only-4l": (4, 8, True)}


def build(shape: str, folder: str | Path, *, d_model: int = 48, seed: int = 0) -> Path:
    """Write a random-weight model of `shape` with the GPT-2 tokenizer into `folder`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    layers, heads, attn_only = SHAPES[shape]
    if d_model % heads:
        raise SystemExit(f"--d-model {d_model} is not a multiple of the {heads} heads of {shape}")
    vocab = json.loads((TOKENIZER / "encoder.json").read_text(encoding="utf-8"))
    lines = (TOKENIZER / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]  # 1: a version line
    tokenizer = GPT2TokenizerFast(vocab=vocab, merges=[tuple(m.split(" ")) for m in lines if m])
    config = GPT2Config(n_layer=layers, n_head=heads, n_embd=d_model, n_positions=256,
                        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    if attn_only:
        config.circuitlang_attn_only = True  # circuitlang reads it: the blocks have no MLP
        config.n_inner = 4
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    if attn_only:  # the HF block still runs its MLP: zero, it adds nothing to the stream
        for block in model.transformer.h:
            for p in block.mlp.parameters():
                p.data.zero_()
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("folder")
    parser.add_argument("--d-model", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    folder = build(args.shape, args.folder, d_model=args.d_model, seed=args.seed)
    layers, heads, _ = SHAPES[args.shape]
    print(f"wrote {folder}: {args.shape}-shaped, {layers} layers x {heads} heads, d_model {args.d_model}, "
          "random weights, GPT-2 tokenizer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
