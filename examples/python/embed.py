"""Embedding circuitlang in a Python script: DSL strings in, numbers and programs out.

Run: python examples/python/embed.py

Every step below is one call; the strings are circuitlang programs (or single
statements: a bare claim gets the model and task from the keyword arguments).
"""
import circuitlang

# 1. A hypothesis as a string. `check` parses, resolves against the model and task,
#    lowers it to a scrubbing graph, runs it and judges every `expect`.
#    The string may be indented like the code around it.
result = circuitlang.check(
    """
    group name_movers = heads 1.0, 1.1, 1.2
    name_movers moves name from IO to END
    expect recovered >= 0.8
    """,
    model="toy-ioi", task="ioi", n=32, permutations=0, progress=False,
)
low, high = result.recovered.low, result.recovered.high
print(f"recovered {result.recovered.value:.1%} [{low:.1%}, {high:.1%}]; holds: {result.holds}")

# 2. A patching sweep: `run` executes experiments only, and gives arrays.
[sweep] = circuitlang.run("patch head * at END", model="toy-ioi", task="ioi", n=32)
layer, head = divmod(int(sweep.normalized.argmax()), sweep.normalized.shape[1])
print(f"the head that carries most of the gap at END: {layer}.{head} "
      f"({sweep.normalized[layer, head]:.2f} of it)")

# 3. Discovery: the circuit comes back as a program, ready to edit and re-check.
found = circuitlang.discover(model="toy-ioi", task="ioi", method="eap-ig", edges=80, n=32)
print(f"eap-ig kept {len(found.edges)} edges; faithfulness {found.faithfulness.value:.3f}")
print(found.text.splitlines()[0])
