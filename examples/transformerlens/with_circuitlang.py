"""The head sweep of head_sweep.circ from Python, and the prompts it ran on, written out
for with_transformerlens.py to run the same experiment by hand.

Run: python examples/transformerlens/with_circuitlang.py prompts.json
"""
import json
import sys

import circuitlang
from circuitlang.models.known import toy_dir

model = circuitlang.load_model("toy-induction")
task = circuitlang.load_task("induction", tokenizer=model.tokenizer)
prompts = task.prompts(32, seed=0)  # what `samples 32` and `seed 0` choose

[sweep] = circuitlang.run("examples/transformerlens/head_sweep.circ", model=model)
print("circuitlang: normalized effect of patching each head's output at END")
for layer, row in enumerate(sweep.normalized):
    print(f"  L{layer} " + " ".join(f"{v:6.3f}" for v in row))

# The same prompts for the TransformerLens side: every row has the same length here
# (the task repeats a segment of fixed length), END is the last token.
end = prompts.positions["END"]
assert bool((end == prompts.input_ids.shape[1] - 1).all())
with open(sys.argv[1], "w") as f:
    json.dump({"clean": prompts.input_ids.tolist(), "corrupt": prompts.corrupt_input_ids.tolist(),
               "answer": prompts.answers[:, 0].tolist(), "wrong": prompts.wrong_answers[:, 0].tolist(),
               "model": str(toy_dir("toy-induction"))}, f)  # the folder both tools load
