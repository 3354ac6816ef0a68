"""The recipe of `toy-facts`: a small GPT-2 that recalls synthetic facts.

Takes nothing; gives `facts_recipe()`, the `Recipe` that `train.py` trains (run
`python -m circuitlang.models.toys.train --only toy-facts`, well under a minute on
one CPU thread).

The model: GPT-2 architecture, 4 layers x 4 heads, d_model 64, MLP width 256, tied
embeddings, a word-level vocabulary of the facts' words. It is trained as a language
model on `<bos> SUBJECT RELATION OBJECT` for every fact of
`circuitlang.tasks.facts.synthetic_facts()` (48 subjects of two or three words, no
single word of which names a subject, x 3 relations = 144 facts), the loss on the
object weighted 8x the others; 400 steps of batch 64 (AdamW, lr 3e-3, one cycle).

What `circuitlang.json` records about it, measured with plain PyTorch hooks on the
Hugging Face modules (nothing of circuitlang's run engine or causal tracing), so the
tracing tests have an independent answer to compare with:

* `accuracy`: share of the 144 facts whose object is the top prediction.
* `mlp_swap_subj_last`: per layer, how much the probability of the right object drops
  when that layer's MLP output at the subject's last token is replaced by its value
  for another subject of as many words (same relation). `mlp_swap_end`, `..._subj_first`:
  the same at END and at the subject's first token.
* `subject_storage_layers`: the layers whose `mlp_swap_subj_last` is at least half the
  largest: where the toy reads the subject into the stream at its last token.

What the shipped model does: every fact recalled; at the subject's last token only MLP 0
matters (swap drop 0.31, layers 1-3 below 0.01), at the first token less (0.10). Unlike
GPT-2 XL in the ROME paper, most of the recall happens at END (swapping MLP 0 there drops
0.46): a 4-layer model that reads the relation last looks the object up once it has
it. Causal tracing agrees on both (tests/test_tracing.py): restored at SUBJ_LAST, MLP 0
brings back ~0.1 of p(object) and the other layers ~0; at END, MLP 0 ~0.3.
"""
from __future__ import annotations

import torch

FACTS_CTX = 16


def _prompts(tok, facts):
    """Token ids of every fact's prompt (without the object), with its subject's
    first/last token indices and the object's id (the subject is a prefix after <bos>)."""
    rows = []
    for f in facts:
        subject = f["subject"].split()
        ids = [tok.bos_token_id] + tok.convert_tokens_to_ids(subject + f["relation"].split())
        rows.append((ids, 1, len(subject), tok.convert_tokens_to_ids(f["object"])))
    return rows


def _facts_build():
    from circuitlang.models.toys.train import _gpt2, word_tokenizer
    from circuitlang.tasks.facts import synthetic_facts

    facts = synthetic_facts()
    words = []
    for f in facts:
        words += f["subject"].split() + f["relation"].split() + [f["object"]]
    tok = word_tokenizer(words)
    model = _gpt2(len(tok), 4, 64, 4, FACTS_CTX, 256, attn_only=False)
    rows = _prompts(tok, facts)

    def batch(gen: torch.Generator, step: int = 0, size: int = 64):
        pick = torch.randint(0, len(rows), (size,), generator=gen).tolist()
        x = torch.zeros(size, FACTS_CTX, dtype=torch.long)
        att = torch.zeros(size, FACTS_CTX, dtype=torch.long)
        weight = torch.zeros(size, FACTS_CTX)
        for i, k in enumerate(pick):
            ids, _, _, obj = rows[k]
            full = ids + [obj]
            x[i, : len(full)] = torch.tensor(full)
            att[i, : len(full)] = 1
            weight[i, : len(full)] = 1.0
            weight[i, len(full) - 1] = 8.0  # the object
        return x, att, weight

    def measure(model) -> dict:
        return measure_facts(model, tok, facts)

    return model, tok, batch, measure


def _swap_partner(facts, k: int) -> int:
    """Another fact of the same relation whose subject has as many words (and, where
    possible, another object): the donor of a swap."""
    f = facts[k]
    n = len(f["subject"].split())
    same = [j for j, g in enumerate(facts) if g["relation"] == f["relation"] and j != k
            and len(g["subject"].split()) == n]
    other = [j for j in same if facts[j]["object"] != f["object"]]
    pool = other or same
    return pool[(7 * k) % len(pool)]


def measure_facts(model, tok, facts) -> dict:
    """What `circuitlang.json` records (see the module docstring), by plain hooks on a
    right-padded batch of every fact (the answer is read at each row's last real token)."""
    rows = _prompts(tok, facts)
    n_layers = len(model.transformer.h)
    width = max(len(r[0]) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (r, _, _, _) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    last = mask.sum(1) - 1
    objects = torch.tensor([r[3] for r in rows])
    batch = torch.arange(len(rows))

    def run(layer=None, where=None, value=None, capture=None):
        handles = []
        for l, block in enumerate(model.transformer.h):
            def hook(module, args, output, l=l):
                if capture is not None:
                    capture[l] = output.detach().clone()
                if l == layer:
                    output = output.clone()
                    output[batch, where] = value
                    return output
                return None
            handles.append(block.mlp.register_forward_hook(hook))
        try:
            with torch.no_grad():
                logits = model(ids, attention_mask=mask).logits[batch, last]
        finally:
            for h in handles:
                h.remove()
        return logits.softmax(-1)[batch, objects]

    mlps: dict = {}
    clean = run(capture=mlps)
    with torch.no_grad():
        top = model(ids, attention_mask=mask).logits[batch, last].argmax(-1)
    out = {"facts": len(rows), "accuracy": round(float((top == objects).float().mean()), 4)}
    donors = torch.tensor([_swap_partner(facts, k) for k in range(len(rows))])
    where = {"subj_last": torch.tensor([r[2] for r in rows]), "subj_first": torch.tensor([r[1] for r in rows]),
             "end": last}
    for name, pos in where.items():
        drops = []
        for layer in range(n_layers):
            value = mlps[layer][donors, pos[donors]]
            drops.append(round(float((clean - run(layer, pos, value)).mean()), 4))
        out[f"mlp_swap_{name}"] = drops
    best = max(out["mlp_swap_subj_last"])
    out["subject_storage_layers"] = [l for l, v in enumerate(out["mlp_swap_subj_last"]) if v >= best / 2]
    out["clean_object_prob"] = round(float(clean.mean()), 4)
    return out


def facts_recipe():
    """The `Recipe` of toy-facts."""
    from circuitlang.models.toys.train import Recipe

    return Recipe(
        "toy-facts",
        "4-layer GPT-2 trained on 144 synthetic facts (subject of 2-3 words + relation -> "
        "object); for causal tracing (task facts)",
        400,
        3e-3,
        _facts_build,
    )
