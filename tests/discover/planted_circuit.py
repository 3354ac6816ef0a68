"""A planted circuit for the solver: a 2-layer attention-only GPT-2 whose weights are set by
hand, and a task whose counterfactual changes every token, so that exactly the planted
edges carry a different value in the clean and the counterfactual run.

Residual layout (d_model = 3V + P + 2): token one-hot [0, V), position one-hot [V, V+P),
previous token [V+P, 2V+P), output [2V+P, 3V+P), and two constant dimensions (+C, -C at
every position). The unembedding reads only the output subspace, so no path but the
planted one reaches the logits; the constant dimensions dominate every layer norm's
scale, so the norms barely couple one subspace to another (an unplanted edge's effect is
a few thousandths of a planted one's), and attention is sharp but not saturated (so
gradients flow through the queries and keys).

* Head 0.0 is a previous-token head: its query at p (position one-hot) matches the key
  at p-1 (positions only); its value is the token; it writes it as "previous token".
* Head 1.0 is an induction head: its query (the current token) matches keys whose
  previous token equals it; its value is the token there; it writes it to the output.
* Heads 0.1 and 1.1 and every MLP are zero.

The edges that carry different values in a prompt and its counterfactual (fresh random
tokens of the same length, not repeated: nothing for the induction head to find) are
therefore exactly, and each is needed,

    embed -> 0.0.v, 0.0 -> 1.0.k, embed -> 1.0.q, embed -> 1.0.v, 1.0 -> logits

(0.0's query and key read only positions, which the counterfactual keeps).
"""
from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from circuitlang.tasks.induction import InductionTask
from circuitlang.tasks.signature import TaskSignature

V, P, N_HEAD = 12, 20, 2
D = 3 * V + P + 2
D_HEAD = D // N_HEAD
C = 12.0  # the constant dimensions
SHARP = 20.0  # attention score scale (after the norms' rescaling: about 4.5 per match)
COPY = 60.0  # size of the induction head's write

PLANTED = {("embed", "head 0.0.v"), ("head 0.0", "head 1.0.k"), ("embed", "head 1.0.q"),
           ("embed", "head 1.0.v"), ("head 1.0", "logits")}


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(V)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def model() -> GPT2LMHeadModel:
    cfg = GPT2Config(vocab_size=V, n_positions=P, n_embd=D, n_layer=2, n_head=N_HEAD, n_inner=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                     bos_token_id=None, eos_token_id=None)
    m = GPT2LMHeadModel(cfg)
    out = 2 * V + P
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        tr = m.transformer
        for t in range(V):
            tr.wte.weight[t, t] = 1.0
        for p in range(P):
            tr.wpe.weight[p, V + p] = 1.0
            tr.wpe.weight[p, D - 2] = C
            tr.wpe.weight[p, D - 1] = -C
        for block in tr.h:
            block.ln_1.weight.fill_(1.0)
            block.ln_2.weight.fill_(1.0)
        tr.ln_f.weight.fill_(1.0)
        qkv = tr.h[0].attn.c_attn.weight  # Conv1D [in, out], out = [q | k | v], heads side by side
        for p in range(P - 1):
            qkv[V + p + 1, p] = SHARP
            qkv[V + p, D + p] = SHARP
        for t in range(V):
            qkv[t, 2 * D + t] = 1.0
            tr.h[0].attn.c_proj.weight[t, V + P + t] = 1.0
        qkv = tr.h[1].attn.c_attn.weight
        for t in range(V):
            qkv[t, t] = SHARP
            qkv[V + P + t, D + t] = SHARP
            qkv[t, 2 * D + t] = 1.0
            tr.h[1].attn.c_proj.weight[t, out + t] = COPY
        for t in range(V):
            m.lm_head.weight[t, out + t] = 1.0
    return m.eval()


class FreshInduction(InductionTask):
    """Induction whose counterfactual is a fresh random sequence with no repeat (so every
    token differs, and there is nothing to attend to), for the planted-circuit tests."""

    SIGNATURE = TaskSignature("fresh_induction", InductionTask.SIGNATURE.positions,
                              InductionTask.SIGNATURE.features, InductionTask.SIGNATURE.metrics,
                              "logit_diff", description="induction with fresh counterfactuals")

    def _corrupt(self, spec, rng: random.Random):
        picks = rng.sample(list(self.candidates), 2 * self.length)
        return self.make_spec(tuple(picks[: self.length]), spec.distractor, second=tuple(picks[self.length:]))
