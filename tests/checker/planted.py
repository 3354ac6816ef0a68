"""A planted induction circuit: a 2-layer attention-only GPT-2 whose weights are set by hand.

Residual stream layout (d_model = 2V + P): token one-hot in [0, V), position one-hot
in [V, V+P), previous token one-hot in [V+P, 2V+P).

* Head 0.0 is a previous-token head: its query at p (position one-hot) matches the
  key at p-1; it copies that position's token into the previous-token subspace.
* Head 1.0 is an induction head: its query (current token) matches keys whose
  previous token equals it, and it writes the token it finds (the one that followed
  the earlier occurrence) onto the unembedding, strongly enough to decide the logits.
* Heads 0.1 and 1.1 and every MLP are zero: they do nothing.

Every residual vector has the same mean and norm at each layer, so the layer norms
only rescale (and shift every attention score of a query by the same amount), and
the circuit is exactly the planted one.
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

V, P, N_HEAD = 16, 24, 2
D = 2 * V + P
D_HEAD = D // N_HEAD
SHARP = 6.0  # attention sharpness before the layer norms' rescaling
COPY = 12.0  # size of the induction head's write


def planted_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(V)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def planted_model(neurons: bool = False) -> GPT2LMHeadModel:
    """The planted induction model; with `neurons`, the copy reaches the logits only
    through MLP 1 (see `planted_neuron_model`)."""
    d = D_NEURONS if neurons else D
    cfg = GPT2Config(
        vocab_size=V, n_positions=P, n_embd=d, n_layer=2, n_head=N_HEAD,
        n_inner=V if neurons else 4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None,
    )
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        tr = model.transformer
        for t in range(V):
            tr.wte.weight[t, t] = 1.0
        for p in range(P):
            tr.wpe.weight[p, V + p] = 1.0
        for block in tr.h:
            block.ln_1.weight.fill_(1.0)
            block.ln_2.weight.fill_(1.0)
        tr.ln_f.weight.fill_(1.0)
        # GPT-2's Conv1D weights are [in, out]; c_attn's out is [q | k | v], heads side by side
        qkv = tr.h[0].attn.c_attn.weight
        for p in range(P - 1):
            qkv[V + p + 1, p] = SHARP  # query at p+1 ...
            qkv[V + p, d + p] = SHARP  # ... matches the key at p
        for t in range(V):
            qkv[t, 2 * d + t] = 1.0  # value: the token
            tr.h[0].attn.c_proj.weight[t, V + P + t] = 1.0  # write it as "previous token"
        qkv = tr.h[1].attn.c_attn.weight
        for t in range(V):
            qkv[t, t] = SHARP  # query: my token
            qkv[V + P + t, d + t] = SHARP  # key: your previous token
            qkv[t, 2 * d + t] = 1.0  # value: your token
            tr.h[1].attn.c_proj.weight[t, t] = COPY  # predict it
        for t in range(V):
            model.lm_head.weight[t, OUT + t if neurons else t] = 1.0
        if neurons:  # neuron t of MLP 1 fires on a copied token t and writes it to the output subspace
            mlp = tr.h[1].mlp
            for t in range(V):
                mlp.c_fc.weight[t, t] = 1.0
                mlp.c_fc.bias[t] = -FIRE
                mlp.c_proj.weight[t, OUT + t] = NEURON_WRITE
    model.eval()
    return model


#: The neuron variant's stream adds an output subspace [OUT, OUT + V) that only MLP 1's
#: neurons write and the unembedding alone reads.
OUT = 2 * V + P
D_NEURONS = 3 * V + P
FIRE = 4.0  # a neuron's threshold on its (normalised) token coordinate: the copy is ~8, the token ~0.5
NEURON_WRITE = 3.0


def planted_neuron_model() -> GPT2LMHeadModel:
    """The planted induction circuit with one more step: head 1.0's copy of token t is read
    by neuron t of MLP 1 (GELU over a threshold: it fires on the copy, not on the current
    token), which alone writes the unembedding's direction for t."""
    return planted_model(neurons=True)
