"""Train the embedded toy models, deterministically, on CPU, in a few minutes.

Takes nothing (or `--only NAME`, `--out DIR`, `--steps N`); writes one folder per model
(`config.json`, `model.safetensors`, tokenizer files, `circuitlang.json` with what
was measured after training) into `circuitlang/models/toys/` by default::

    python -m circuitlang.models.toys.train                  # both models
    python -m circuitlang.models.toys.train --only toy-ioi   # one of them

Models:
* `toy-induction`: GPT-2 architecture, 2 layers x 8 heads, attention only (MLP
  weights zero and frozen), word-level vocabulary of 64, trained on
  sequences of length 40 that repeat a random period of 4-15 tokens. It learns to
  predict the repeats (loss after the first period far below the first period's), but
  at this training budget with diffuse, position-weighted attention rather than a sharp
  previous-token head feeding an induction head: `circuitlang.json` records each head's
  previous-token and induction scores and whether a sharp head exists. (For a model with
  a known, sharp induction circuit, see the hand-planted model in tests/models/test_planted_induction.py.)
* `toy-ioi`: GPT-2 architecture, 3 layers x 4 heads, word-level vocabulary covering
  the IOI templates, names, places and objects of Wang et al. 2022
  (`circuitlang.tasks.ioi`), trained as a language model on IOI sentences.

Training fixes every seed, uses one CPU thread and deterministic algorithms, so a
rerun reproduces the shipped weights (the sha256 of each `model.safetensors` is
recorded in `circuitlang.json`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

TOYS_DIR = Path(__file__).resolve().parent
SPECIALS = ("<pad>", "<unk>", "<bos>")


# ---- tokenizers -----------------------------------------------------------------
def word_tokenizer(words: list[str]):
    """A word-level `PreTrainedTokenizerFast` (whitespace + punctuation split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(list(SPECIALS) + sorted(set(words) - set(SPECIALS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<bos>")


# ---- one recipe per model ---------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Recipe:
    """How to build and train one toy model."""

    name: str
    description: str
    steps: int
    lr: float
    build: Callable[[], tuple]  # -> (model, tokenizer, batch_fn, measure_fn)


def _gpt2(vocab: int, n_layer: int, n_embd: int, n_head: int, n_ctx: int, n_inner: int, attn_only: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_positions=n_ctx, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        n_inner=n_inner, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=2, eos_token_id=2, pad_token_id=0)
    if attn_only:
        config.circuitlang_attn_only = True
    model = GPT2LMHeadModel(config)
    if attn_only:
        for block in model.transformer.h:
            for p in block.mlp.parameters():
                p.data.zero_()
                p.requires_grad_(False)
    model.config._attn_implementation = "eager"
    return model


INDUCTION_LEN = 40


def _induction():
    words = [f"w{i:02d}" for i in range(61)]
    tok = word_tokenizer(words)
    model = _gpt2(len(tok), 2, 64, 8, 64, 4, attn_only=True)
    ids = torch.tensor(tok.convert_tokens_to_ids(words))
    bos = tok.bos_token_id

    def rows(gen: torch.Generator, size: int):
        """Token ids [size, INDUCTION_LEN]: `<bos>` then a random period of 4-15 distinct
        tokens repeated to the end; and each row's period."""
        x = torch.empty(size, INDUCTION_LEN, dtype=torch.long)
        x[:, 0] = bos
        periods = []
        for i in range(size):
            period = int(torch.randint(4, 16, (1,), generator=gen))
            chunk = ids[torch.randperm(len(words), generator=gen)[:period]]
            x[i, 1:] = chunk.repeat(INDUCTION_LEN // period + 1)[: INDUCTION_LEN - 1]
            periods.append(period)
        return x, periods

    def batch(gen: torch.Generator, size: int = 64):
        x, periods = rows(gen, size)
        weight = torch.ones(x.shape)
        for i, period in enumerate(periods):
            weight[i, : period + 1] = 0.1  # the first period is unpredictable
        return x, torch.ones_like(x), weight

    def measure(model) -> dict:
        x, periods = rows(torch.Generator().manual_seed(12345), 256)
        with torch.no_grad():
            out = model(x, output_attentions=True)
        nll = -out.logits.log_softmax(-1)[:, :-1].gather(-1, x[:, 1:, None])[..., 0]  # predicts x[t+1]
        att0, att1 = out.attentions[0], out.attentions[1]  # [B, H, T, T]
        t = torch.arange(2, x.shape[1])
        prev = att0[:, :, t, t - 1].mean((0, 2))
        # induction: attention from t to every k whose previous token equals x[t]
        same = (x[:, None, :-1] == x[:, 1:, None])  # [B, t, k-1]: x[k-1] == x[t]
        target = torch.zeros(x.shape[0], x.shape[1], x.shape[1], dtype=torch.bool)
        target[:, 1:, 1:] = same
        target &= torch.ones_like(target[0]).tril(-1)
        first, second, induction = [], [], []
        for i, period in enumerate(periods):
            first.append(nll[i, 1:period].mean())
            second.append(nll[i, period + 1:].mean())
            q = torch.arange(period + 1, x.shape[1])
            induction.append((att1[i][:, q] * target[i][q]).sum(-1).mean(-1))
        ind = torch.stack(induction).mean(0)
        return {
            "loss_first_period": round(torch.stack(first).mean().item(), 4),
            "loss_after_first_period": round(torch.stack(second).mean().item(), 4),
            "previous_token_scores_layer0": [round(v, 4) for v in prev.tolist()],
            "induction_scores_layer1": [round(v, 4) for v in ind.tolist()],
            "previous_token_head": [0, int(prev.argmax())],
            "induction_head": [1, int(ind.argmax())],
            # a sharp circuit puts most attention on the target; uniform is ~1/20 here
            "has_sharp_previous_token_head": bool(prev.max() > 0.5),
            "has_sharp_induction_head": bool(ind.max() > 0.5),
        }

    return model, tok, batch, measure


def _ioi_sentences(rng: random.Random, names: list[str], held_out: Callable[[str, str], bool], train: bool):
    from circuitlang.tasks.ioi import ABBA_TEMPLATES, BABA_TEMPLATES, OBJECTS, PLACES

    templates = ABBA_TEMPLATES + BABA_TEMPLATES
    while True:
        io, s = rng.sample(names, 2)
        if held_out(io, s) == train:
            continue
        t = rng.choice(templates)
        text = (t.replace("[PLACE]", rng.choice(PLACES)).replace("[OBJECT]", rng.choice(OBJECTS))
                .replace("[A]", io).replace("[B]", s))
        yield text, io, s


def _ioi():
    from circuitlang.tasks.ioi import ABBA_TEMPLATES, BABA_TEMPLATES, NAMES, OBJECTS, PLACES

    words = list(NAMES) + list(PLACES) + list(OBJECTS)
    for t in ABBA_TEMPLATES + BABA_TEMPLATES:
        for w in t.replace("[", " ").replace("]", " ").replace(",", " , ").replace(".", " . ").split():
            if w not in ("A", "B", "PLACE", "OBJECT"):
                words.append(w)
    tok = word_tokenizer(words)
    names = list(NAMES)
    index = {n: i for i, n in enumerate(names)}

    def held_out(a: str, b: str) -> bool:  # 1 in 8 ordered name pairs never seen in training
        return (index[a] * 7 + index[b] * 3) % 8 == 0

    model = _gpt2(len(tok), 3, 64, 4, 64, 128, attn_only=False)
    ctx = 32

    def encode(rows):
        ids = [tok.encode(r[0], add_special_tokens=False) for r in rows]
        x = torch.zeros(len(ids), ctx, dtype=torch.long)
        att = torch.zeros(len(ids), ctx, dtype=torch.long)
        weight = torch.zeros(len(ids), ctx)
        for i, r in enumerate(ids):
            x[i, : len(r)] = torch.tensor(r)
            att[i, : len(r)] = 1
            weight[i, : len(r)] = 1.0
            weight[i, len(r) - 1] = 8.0  # the answer: the last token of the sentence
        return x, att, weight

    state = {}

    def batch(gen: torch.Generator, size: int = 32):
        if "rng" not in state:
            state["rng"] = _ioi_sentences(random.Random(int(torch.randint(0, 2**31, (1,), generator=gen))),
                                          names, held_out, True)
        return encode([next(state["rng"]) for _ in range(size)])

    def measure(model) -> dict:
        rows = []
        stream = _ioi_sentences(random.Random(999), names, held_out, False)
        for _ in range(500):
            rows.append(next(stream))
        prompts = [(r[0].rsplit(" ", 1)[0], r[1], r[2]) for r in rows]
        x, att, _ = encode(prompts)
        last = att.sum(1) - 1
        with torch.no_grad():
            logits = model(x, attention_mask=att).logits[torch.arange(len(rows)), last]
        io = torch.tensor(tok.convert_tokens_to_ids([r[1] for r in rows]))
        s = torch.tensor(tok.convert_tokens_to_ids([r[2] for r in rows]))
        diff = logits.gather(1, io[:, None])[:, 0] - logits.gather(1, s[:, None])[:, 0]
        return {
            "heldout_prompts": len(rows),
            "heldout_logit_diff_mean": round(diff.mean().item(), 4),
            "heldout_logit_diff_positive_fraction": round((diff > 0).float().mean().item(), 4),
            "heldout_top1_is_io": round((logits.argmax(-1) == io).float().mean().item(), 4),
        }

    return model, tok, batch, measure


RECIPES = {
    "toy-induction": Recipe(
        "toy-induction",
        "2-layer attention-only GPT-2 trained on repeated random sequences; predicts "
        "repeats in context (see circuitlang.json for its head scores)",
        3000,
        3e-3,
        _induction,
    ),
    "toy-ioi": Recipe(
        "toy-ioi",
        "3-layer GPT-2 trained on IOI sentences (Wang et al. 2022 templates); "
        "word-level vocabulary, every name one token",
        1500,
        3e-3,
        _ioi,
    ),
}


# ---- training loop --------------------------------------------------------------
def train(name: str, steps: int | None = None, seed: int = 0, log: Callable[[str], None] = print,
          lr: float | None = None):
    """Train one toy model; returns (model, tokenizer, metadata). Deterministic for a seed."""
    recipe = RECIPES[name]
    steps = recipe.steps if steps is None else steps
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(seed)
        model, tok, batch, measure = recipe.build()
        gen = torch.Generator().manual_seed(seed + 1)
        params = [p for p in model.parameters() if p.requires_grad]
        lr = recipe.lr if lr is None else lr
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
        model.train()
        loss_value = float("nan")
        start = time.time()
        for step in range(steps):
            x, att, weight = batch(gen)
            logits = model(x, attention_mask=att).logits[:, :-1]
            target = x[:, 1:]
            w = weight[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     reduction="none")
            loss = (loss * w.reshape(-1)).sum() / w.sum()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            loss_value = loss.item()
            if step % 250 == 0 or step == steps - 1:
                log(f"{name} step {step:5d} loss {loss_value:.4f} ({time.time() - start:.0f}s)")
        model.eval()
        meta = {
            "name": name,
            "description": recipe.description,
            "seed": seed,
            "steps": steps,
            "final_train_loss": round(loss_value, 4),
            "trained_by": "python -m circuitlang.models.toys.train --only " + name,
            # whether its training prompts began with <bos>: tasks follow this
            "prepend_bos": name != "toy-ioi",
            "measured": measure(model),
        }
        return model, tok, meta
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def save(model, tok, meta: dict, folder: Path) -> dict:
    """Write config.json, model.safetensors, tokenizer files and circuitlang.json; returns meta."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    for extra in ("generation_config.json",):
        (folder / extra).unlink(missing_ok=True)
    meta = dict(meta)
    meta["sha256"] = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    (folder / "circuitlang.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m circuitlang.models.toys.train", description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(RECIPES), help="train just this model")
    parser.add_argument("--out", type=Path, default=TOYS_DIR, help="folder to write model folders into")
    parser.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    args = parser.parse_args(argv)
    for name in [args.only] if args.only else sorted(RECIPES):
        model, tok, meta = train(name, args.steps)
        meta = save(model, tok, meta, args.out / name)
        print(json.dumps(meta["measured"]), meta["sha256"])
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
