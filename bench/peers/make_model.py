"""Build the local model and prompts the peer comparisons run on (no hub, no downloads).

Takes a folder and a model size; gives, in that folder, a GPT-2-shaped model with
random weights from a fixed seed (`GPT2Config` + `GPT2LMHeadModel`, saved with
`save_pretrained` as safetensors), a word-level tokenizer over the same vocabulary
(tokens `t0 ... t{V-1}`, so `load_model` finds one), and a prompts file in the format
`peer_io.py` documents. Every tool then reads the same folder: circuitlang through
`load_model(folder)`, TransformerLens 4 through `TransformerBridge.boot_transformers`,
auto-circuit through a TransformerLens 2 `HookedTransformer` built from the config
plus `convert_gpt2_weights`.

Run with the system Python (it needs `transformers` and `tokenizers`)::

    python bench/peers/make_model.py OUT_DIR [--layers 2 --heads 4 --d-model 64 ...]

The prompts file is OUT_DIR/prompts.json unless `--prompts` says otherwise.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def build_model(
    out_dir: str | Path,
    *,
    layers: int = 2,
    heads: int = 4,
    d_model: int = 64,
    vocab: int = 128,
    n_ctx: int = 64,
    seed: int = 0,
    init_std: float = 0.2,
) -> Path:
    """Save a random-init GPT-2-shaped model and a word-level tokenizer to `out_dir`.

    Args:
        out_dir: the folder to write (created if missing).
        layers: number of transformer blocks.
        heads: attention heads per block; `d_model` must be a multiple of it.
        d_model: residual stream width.
        vocab: vocabulary size (at least 4).
        n_ctx: maximum context length.
        seed: torch seed for the weights; the same seed gives the same weights.
        init_std: weight init scale. GPT-2's own 0.02 leaves a random model nearly
            insensitive to its input (patching effects ~1e-3, too small to tell heads
            apart at a 1e-4 tolerance); 0.2 gives effects of order 1.

    Returns:
        The folder.

    Raises:
        ValueError: `d_model` is not a multiple of `heads`, or `vocab` < 4.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    if d_model % heads:
        raise ValueError(f"d_model {d_model} is not a multiple of heads {heads}")
    if vocab < 4:
        raise ValueError(f"vocab {vocab} too small (need at least 4 tokens)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = GPT2Config(
        n_layer=layers, n_head=heads, n_embd=d_model, n_positions=n_ctx, vocab_size=vocab,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    # The default init leaves every bias and layer-norm parameter at 0/1; randomise
    # them too, so a tool that drops or folds a bias differently cannot agree by luck.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") or ".ln_" in name or name.startswith("transformer.ln_f"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(out)
    words = {f"t{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="t0", bos_token="t0", eos_token="t0", pad_token="t0"
    ).save_pretrained(out)
    return out


def make_prompts(
    path: str | Path,
    *,
    batch: int = 8,
    tokens: int = 12,
    vocab: int = 128,
    changed: int = 2,
    seed: int = 1,
    position: int = -1,
) -> Path:
    """Write a prompts file: random clean prompts, corrupt copies with a few tokens changed.

    Args:
        path: the JSON file to write.
        batch: number of prompt pairs.
        tokens: tokens per prompt.
        vocab: vocabulary size (ids are drawn from 1..vocab-1).
        changed: how many positions (before the last) the corrupt prompt changes.
        seed: seed for the token draws.
        position: the position single-position sweeps patch (-1 = last).

    Returns:
        The file.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, vocab, (batch, tokens), generator=gen)
    corrupt = clean.clone()
    for row in range(batch):
        where = torch.randperm(tokens - 1, generator=gen)[:changed]
        shift = torch.randint(1, vocab - 1, (len(where),), generator=gen)
        corrupt[row, where] = (clean[row, where] - 1 + shift) % (vocab - 1) + 1
    answer = torch.randint(1, vocab, (batch,), generator=gen)
    wrong = (answer - 1 + torch.randint(1, vocab - 1, (batch,), generator=gen)) % (vocab - 1) + 1
    payload = {
        "clean": clean.tolist(),
        "corrupt": corrupt.tolist(),
        "answer": answer.tolist(),
        "wrong": wrong.tolist(),
        "position": position,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload) + "\n")
    return path


def token_task(prompts_file: Path, tokenizer=None):
    """The prompts file as a circuitlang task of token-id records (END = the last token),
    for the circuitlang side of the discovery benchmark and agreement tests (run where
    circuitlang is installed; the peers' scripts never call it)."""
    from circuitlang.tasks import load_task

    data = json.loads(Path(prompts_file).read_text())
    records = Path(prompts_file).with_suffix(".jsonl")
    with open(records, "w") as fh:
        for clean, corrupt, answer, wrong in zip(data["clean"], data["corrupt"], data["answer"], data["wrong"]):
            fh.write(json.dumps({"clean": clean, "corrupt": corrupt, "answers": [answer],
                                 "wrong_answers": [wrong]}) + "\n")
    return load_task(str(records), tokenizer=tokenizer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--n-ctx", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-std", type=float, default=0.2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--position", type=int, default=-1)
    parser.add_argument("--prompts", help="prompts file (default OUT_DIR/prompts.json)")
    args = parser.parse_args(argv)
    if args.tokens > args.n_ctx:
        parser.error(f"--tokens {args.tokens} exceeds --n-ctx {args.n_ctx}")
    try:
        out = build_model(args.out_dir, layers=args.layers, heads=args.heads, d_model=args.d_model,
                          vocab=args.vocab, n_ctx=args.n_ctx, seed=args.seed,
                          init_std=args.init_std)
    except ValueError as exc:
        parser.error(str(exc))
    prompts = make_prompts(args.prompts or out / "prompts.json", batch=args.batch, tokens=args.tokens,
                           vocab=args.vocab, seed=args.seed + 1, position=args.position)
    print(f"model: {out}\nprompts: {prompts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
