"""Train the embedded toy models, deterministically, on CPU, in a few minutes.

Takes nothing (or `--only NAME`, `--out DIR`, `--steps N`); writes one folder per model
(`config.json`, `model.safetensors`, tokenizer files, `circuitlang.json` with what
was measured after training) into `circuitlang/models/toys/` by default::

    python -m circuitlang.models.toys.train                  # both models
    python -m circuitlang.models.toys.train --only toy-ioi   # one of them

Models:
* `toy-induction`: GPT-2 architecture, 2 layers x 4 heads (d_model 64, d_head 16),
  attention only (MLP weights zero and frozen), untied embeddings, word-level
  vocabulary of 64 (61 words + 3 specials), trained for 3000 steps (batch 64, AdamW,
  lr 3e-3: 100 warmup steps, constant to 70%, cosine to zero) on rows of `<bos>` +
  random tokens (uniform, with replacement) in which a random segment of 2-20 tokens,
  at a random offset, is immediately repeated once; every position's loss counts alike.
  A locality curriculum gets the textbook circuit (Olsson et al. 2022) within the CPU
  budget: for the first 1000 steps (rows of 25 tokens, segments of 2-12) layer 0 may
  attend only to the current and the previous position; over the next 500 a penalty
  of 4 x (distance - 1) on layer 0's attention logits is annealed to zero; the rest
  (rows of 41 tokens) is plain causal attention, and the saved model is a plain GPT-2.
  The result: a sharp previous-token head 0.3, which the induction heads 1.0, 1.2
  (and 1.3) read through their keys (K-composition); they also match the token before
  (head 0.1 attends two back and feeds their keys; 0.3 feeds their queries).
  `circuitlang.json` records each head's previous-token, two-back and induction
  scores on held-out rows and which heads are sharp (> 0.5 of their attention on the
  target). Without the curriculum, in this budget (tried: 8 or 4 or 2 heads, d_model
  64/128, tied or untied embeddings, lr 1e-3 to 1e-2, several data layouts), the model
  either stays at a bag-of-tokens plateau or finds an offset variant: layer-1 heads
  attend j-1 >= 1 positions *past* the token after the earlier copy, keying on a
  layer-0 head that looks j tokens back and reading the answer from one that looks
  j-1 back (V-composition), so no head scores as a textbook induction head. With every
  layer-0 head clamped to previous-token attention the textbook heads form within 500
  steps; the curriculum is the trainable version of that.
* `toy-facts`: GPT-2, 4 layers x 4 heads, trained on synthetic facts for causal tracing
  (`train_facts.py` says how, and what its `circuitlang.json` measures).
* `toy-ioi`: GPT-2 architecture, 3 layers x 4 heads, word-level vocabulary covering
  the IOI templates, names, places and objects of Wang et al. 2022
  (`circuitlang.tasks.ioi`), trained as a language model on IOI sentences.

Training fixes every seed, uses one CPU thread and deterministic algorithms, so a
rerun on the same versions of torch and transformers and the same CPU kernels (torch's
`cpu` capability, AVX2 or AVX512: its vector width changes the rounding of sums;
`trained_with` in `circuitlang.json`) reproduces the shipped weights bit for bit (the sha256 of each
`model.safetensors` is recorded there too). On other versions the float rounding of
one step differs in the last bits and compounds over thousands of steps: the weights
then differ, but the behaviour repeats (the same sharp heads, the measurements within
a few hundredths), which is what tests/models/test_toys.py checks.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
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
    build: Callable[[], tuple]  # -> (model, tokenizer, batch_fn(gen, step), measure_fn)
    #: "onecycle" (OneCycleLR, 10% warmup) or "wsd" (linear warmup for `warmup` steps,
    #: constant to 70% of the steps, then cosine to zero)
    schedule: str = "onecycle"
    warmup: int = 0


def _gpt2(vocab: int, n_layer: int, n_embd: int, n_head: int, n_ctx: int, n_inner: int, attn_only: bool,
          tie_embeddings: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel

    extra = {} if tie_embeddings else {"tie_word_embeddings": False}
    config = GPT2Config(vocab_size=vocab, n_positions=n_ctx, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        n_inner=n_inner, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=2, eos_token_id=2, pad_token_id=0, **extra)
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


#: Context of toy-induction's training rows after the curriculum (`<bos>` + 40 tokens),
#: and during its first phase (`<bos>` + 24 tokens).
INDUCTION_LEN = 41
INDUCTION_SHORT_LEN = 25
#: The curriculum, in steps: layer 0 attends only to the current and previous position
#: for LOCAL_STEPS, then a distance penalty on its attention logits is annealed to zero
#: over ANNEAL_STEPS (LOCAL_PENALTY per position at the start), then plain causal attention.
INDUCTION_LOCAL_STEPS = 1000
INDUCTION_ANNEAL_STEPS = 500
INDUCTION_LOCAL_PENALTY = 4.0
#: A sharp head puts more than this share of its attention on the target.
SHARP = 0.5


class _LocalAttention:
    """A training-time bias on one attention module's logits (a forward pre-hook).

    `penalty`: 0 = plain causal attention; `inf` = each position attends only to
    itself and the previous position; a finite p subtracts p * (distance - 1) from the
    logit of every key more than one position back. Inert in eval mode, so
    measurements and saved weights see the plain model; `remove()` detaches it.
    """

    def __init__(self, attn):
        self.penalty = 0.0
        self._handle = attn.register_forward_pre_hook(self._hook, with_kwargs=True)

    def remove(self) -> None:
        self._handle.remove()

    def _hook(self, module, args, kwargs):
        if not module.training or self.penalty == 0:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        n = hidden.shape[1]
        mask = kwargs.get("attention_mask")
        low = torch.finfo(hidden.dtype).min
        pos = torch.arange(n)
        dist = pos[:, None] - pos[None, :]  # query - key
        if mask is None:  # plain causal mask
            mask = torch.zeros(n, n, dtype=hidden.dtype).masked_fill(dist < 0, low)[None, None]
        if self.penalty == float("inf"):
            bias = torch.zeros(n, n, dtype=hidden.dtype).masked_fill(dist >= 2, low)
        else:
            bias = -self.penalty * (dist - 1).clamp(min=0).to(hidden.dtype)
        kwargs["attention_mask"] = (mask + bias).clamp(min=low)
        return args, kwargs


def _induction():
    words = [f"w{i:02d}" for i in range(61)]
    tok = word_tokenizer(words)
    model = _gpt2(len(tok), 2, 64, 4, 64, 4, attn_only=True, tie_embeddings=False)
    ids = torch.tensor(tok.convert_tokens_to_ids(words))
    bos = tok.bos_token_id
    local = _LocalAttention(model.transformer.h[0].attn)

    def rows(gen: torch.Generator, size: int, length: int = INDUCTION_LEN, longest: int = 20):
        """Token ids [size, length]: `<bos>`, then random tokens (uniform, with
        replacement) in which a random segment of 2..`longest` tokens, at a random
        offset, is immediately repeated once; and each row's [segment length, offset]
        (the first copy starts at 1 + offset)."""
        seg = torch.randint(2, longest + 1, (size,), generator=gen)
        body = torch.randint(0, len(words), (size, length - 1), generator=gen)
        offset = (torch.rand(size, generator=gen) * (length - 2 * seg)).long()  # 0 .. length-1-2*seg
        pos = torch.arange(length - 1)[None] - offset[:, None]
        second = (pos >= seg[:, None]) & (pos < 2 * seg[:, None])
        source = (pos - seg[:, None] + offset[:, None]).clamp(min=0)
        body = torch.where(second, body.gather(1, source), body)
        x = torch.empty(size, length, dtype=torch.long)
        x[:, 0] = bos
        x[:, 1:] = ids[body]
        return x, torch.stack([seg, offset], 1)

    def batch(gen: torch.Generator, step: int = 0, size: int = 64):
        if step < INDUCTION_LOCAL_STEPS:
            local.penalty = float("inf")
            x, _ = rows(gen, size, INDUCTION_SHORT_LEN, 12)
        else:
            done = (step - INDUCTION_LOCAL_STEPS) / INDUCTION_ANNEAL_STEPS
            local.penalty = INDUCTION_LOCAL_PENALTY * max(0.0, 1.0 - done)
            x, _ = rows(gen, size)
        return x, torch.ones_like(x), torch.ones(x.shape)

    batch.finish = local.remove

    def measure(model) -> dict:
        x, spans = rows(torch.Generator().manual_seed(12345), 256)
        with torch.no_grad():
            out = model(x, output_attentions=True)
        nll = -out.logits.log_softmax(-1)[:, :-1].gather(-1, x[:, 1:, None])[..., 0]  # predicts x[t+1]
        att0, att1 = out.attentions[0], out.attentions[1]  # [B, H, T, T]
        t = torch.arange(2, x.shape[1])
        prev = att0[:, :, t, t - 1].mean((0, 2))
        back2 = att0[:, :, t[1:], t[1:] - 2].mean((0, 2))  # attention to the token two back
        # induction: attention from t to every k whose previous token equals x[t]
        same = (x[:, None, :-1] == x[:, 1:, None])  # [B, t-1, k-1]: x[k-1] == x[t]
        target = torch.zeros(x.shape[0], x.shape[1], x.shape[1], dtype=torch.bool)
        target[:, 1:, 1:] = same
        target &= torch.ones_like(target[0]).tril(-1)
        first, second, induction = [], [], []
        for i, (seg, offset) in enumerate(spans.tolist()):
            a = 1 + offset  # the first copy is x[a : a+seg], the second x[a+seg : a+2*seg]
            first.append(nll[i, a: a + seg - 1].mean())  # its tokens 2..seg, from the ones before
            second.append(nll[i, a + seg: a + 2 * seg - 1].mean())
            q = torch.arange(a + seg, a + 2 * seg)
            induction.append((att1[i][:, q] * target[i][q]).sum(-1).mean(-1))
        ind = torch.stack(induction).mean(0)
        return {
            "heldout_rows": x.shape[0],
            "loss_first_copy": round(torch.stack(first).mean().item(), 4),
            "loss_second_copy": round(torch.stack(second).mean().item(), 4),
            "previous_token_scores_layer0": [round(v, 4) for v in prev.tolist()],
            "two_back_scores_layer0": [round(v, 4) for v in back2.tolist()],
            "induction_scores_layer1": [round(v, 4) for v in ind.tolist()],
            "previous_token_head": [0, int(prev.argmax())],
            "induction_head": [1, int(ind.argmax())],
            # a sharp head puts most of its attention on the target; uniform is ~1/20 here
            "sharp_previous_token_heads": [[0, h] for h, v in enumerate(prev.tolist()) if v > SHARP],
            "sharp_induction_heads": [[1, h] for h, v in enumerate(ind.tolist()) if v > SHARP],
            "has_sharp_previous_token_head": bool(prev.max() > SHARP),
            "has_sharp_induction_head": bool(ind.max() > SHARP),
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

    def batch(gen: torch.Generator, step: int = 0, size: int = 32):
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
        "2-layer x 4-head attention-only GPT-2 trained on random tokens with a repeated "
        "segment (layer 0 limited to the previous token early in training, see train.py); "
        "previous-token head 0.3 feeds induction heads 1.0, 1.2, 1.3",
        3000,
        3e-3,
        _induction,
        schedule="wsd",
        warmup=100,
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

# toy-facts's recipe lives beside this file (its measurements are long)
from circuitlang.models.toys.train_facts import facts_recipe  # noqa: E402

RECIPES["toy-facts"] = facts_recipe()


# ---- training loop --------------------------------------------------------------
def _wsd(steps: int, warmup: int) -> Callable[[int], float]:
    """Learning-rate factor: linear warmup, constant to 70% of `steps`, cosine to zero."""
    decay = int(0.7 * steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step < decay:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (step - decay) / max(1, steps - decay)))

    return factor


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
        if recipe.schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _wsd(steps, recipe.warmup))
        model.train()
        loss_value = float("nan")
        start = time.time()
        for step in range(steps):
            x, att, weight = batch(gen, step)
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
        if hasattr(batch, "finish"):
            batch.finish()
        model.eval()
        meta = {
            "name": name,
            "description": recipe.description,
            "seed": seed,
            "steps": steps,
            "final_train_loss": round(loss_value, 4),
            "trained_by": "python -m circuitlang.models.toys.train --only " + name,
            # a rerun reproduces the weights bit for bit on these versions; on others,
            # float rounding compounds over the steps and only the behaviour repeats
            "trained_with": trained_with(),
            # whether its training prompts began with <bos>: tasks follow this
            "prepend_bos": name != "toy-ioi",
            "measured": measure(model),
        }
        return model, tok, meta
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def trained_with() -> dict[str, str]:
    """The versions (and CPU kernels) whose arithmetic a training run's exact weights
    depend on."""
    import tokenizers
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "cpu": torch.backends.cpu.get_cpu_capability()}


def reproduces_bit_for_bit(recorded: dict) -> bool:
    """Whether retraining here must give the recorded weights exactly: the same versions and
    CPU kernels. A record without the CPU kernels (written before they were recorded) does
    not say which, so it promises only the behaviour."""
    return "cpu" in recorded and recorded == trained_with()


def save(model, tok, meta: dict, folder: Path) -> dict:
    """Write config.json, model.safetensors, tokenizer files and circuitlang.json; returns meta."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    # transformers 5 names its fast tokenizers' class `TokenizersBackend`, which 4.x does
    # not know; `PreTrainedTokenizerFast` loads the same tokenizer.json on both
    config_path = folder / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tok_config, indent=2) + "\n")
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
