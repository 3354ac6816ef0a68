"""The same head sweep, written the way a TransformerLens user writes it: cache the
corrupted run, patch one head's `hook_z` at the last position with a hook, read the
logit difference, and normalise by the clean-vs-corrupt gap.

Run it where TransformerLens 4 is installed (it is never a circuitlang dependency):
    python examples/transformerlens/with_transformerlens.py prompts.json
where prompts.json was written by with_circuitlang.py.
"""
import json
import sys

import torch
from transformer_lens.model_bridge import TransformerBridge

torch.set_grad_enabled(False)
data = json.load(open(sys.argv[1]))
clean, corrupt = torch.tensor(data["clean"]), torch.tensor(data["corrupt"])
answer, wrong = torch.tensor(data["answer"]), torch.tensor(data["wrong"])
rows = torch.arange(len(clean))

model = TransformerBridge.boot_transformers(data["model"], device="cpu")
model.eval()


def logit_diff(logits):
    last = logits[:, -1]
    return (last[rows, answer] - last[rows, wrong]).mean().item()


clean_ld = logit_diff(model(clean))
corrupt_logits, corrupt_cache = model.run_with_cache(corrupt)
corrupt_ld = logit_diff(corrupt_logits)


def patch_head(z, hook, head):  # z: [batch, position, head, d_head]
    z[:, -1, head] = corrupt_cache[hook.name][:, -1, head]
    return z


print("TransformerLens: normalized effect of patching each head's output at END")
for layer in range(model.cfg.n_layers):
    effects = []
    for head in range(model.cfg.n_heads):
        hook = (f"blocks.{layer}.attn.hook_z", lambda z, hook, head=head: patch_head(z, hook, head))
        patched = logit_diff(model.run_with_hooks(clean, fwd_hooks=[hook]))
        effects.append((patched - clean_ld) / (corrupt_ld - clean_ld))
    print(f"  L{layer} " + " ".join(f"{v:6.3f}" for v in effects))
