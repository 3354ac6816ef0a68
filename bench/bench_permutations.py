"""Benchmark the permutation test: 200 random circuits of the same size, as a multiple of one scrub.

Runs, for each hypothesis (the embedded toys' shipped circuits, and a 3-level hypothesis
on a GPT-2-small-shaped model with random weights and the real GPT-2 tokenizer), on
one prompt set:

* **one scrub**: `Scrubber.scrub` of the hypothesis's graph (its plain activations
  already cached, as in a check);
* **the null**: `variants.permutation_null` with K random circuits (default 200; all of
  them, exactly, when the model has fewer), evaluated along the batch
  (`Scrubber.scrub_many`);
* **one plain pass** of the same prompts, for scale.

Each time is the best of `--repeats` runs, one thread. Results go to
bench/results/permutations.json (atomically); docs/benchmarks.md records them.

    python bench/bench_permutations.py [--k 200] [--repeats 3] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from circuitlang import stats, variants  # noqa: E402
from circuitlang.ast_to_ir import resolve_text  # noqa: E402
from circuitlang.execute import Scrubber  # noqa: E402
from circuitlang.ir_to_graph import ir_to_graph  # noqa: E402
from circuitlang.models import LoadedModel, load_model  # noqa: E402
from circuitlang.report import versions, write_json_atomic  # noqa: E402
from circuitlang.tasks import load_task  # noqa: E402

GPT2_HYPOTHESIS = """\
task ioi
metric logit_diff
head 9.6 at END depends on IO
head 7.3 at END depends on S
7.3 -> 9.6.q at END
3.0 -> 7.3.v at S2
embed -> 9.6.v at IO
"""


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def case(name, lm, task, text, n, k, repeats):
    prompts = task.prompts(n, 0)
    hypothesis = resolve_text(text, lm.shape, task.SIGNATURE)
    graph = ir_to_graph(hypothesis)
    scrubber = Scrubber(lm, task, prompts, hypothesis.metric)
    clean = scrubber.clean()
    random = scrubber.scrub(ir_to_graph(resolve_text(f"task {task.SIGNATURE.name}\n", lm.shape,
                                                      task.SIGNATURE)), seed=0).scrubbed
    scrubber.scrub(graph, seed=0)  # warm: the plain activations are cached, as in a check
    one, result = best_of(lambda: scrubber.scrub(graph, seed=0), repeats)
    observed = stats.recovered(clean, result.scrubbed, random)
    null_time, null = best_of(lambda: variants.permutation_null(hypothesis, scrubber, clean, random, lm.shape,
                                                                 k, 0, observed), repeats)
    plain, _ = best_of(lambda: lm.run(prompts.input_ids, prompts.attention_mask), repeats)
    return {
        "case": name, "model": lm.name, "shape": lm.shape.describe(), "n": len(prompts.input_ids),
        "circuits": len(null.scores), "exact": null.exact, "total": null.total,
        "one_scrub_s": round(one, 4), "null_s": round(null_time, 4), "plain_pass_s": round(plain, 4),
        "null_over_one_scrub": round(null_time / one, 2),
        "null_per_circuit_over_one_scrub": round(null_time / one / max(1, len(null.scores)), 3),
        "null_over_plain_pass": round(null_time / plain, 1), "p_value": null.p_value,
        "recovered": observed,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=200, help="random circuits (default 200)")
    parser.add_argument("--n", type=int, default=32, help="prompts (default 32)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "permutations.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    toy = load_model("toy-induction", device="cpu")
    rows.append(case("toy-induction: stdlib/toy_induction.circ", toy,
                     load_task("induction", tokenizer=toy.tokenizer), (ROOT / "stdlib" / "toy_induction.circ").read_text(),
                     args.n, args.k, args.repeats))
    ioi = load_model("toy-ioi", device="cpu")
    rows.append(case("toy-ioi: stdlib/toy_ioi.circ", ioi, load_task("ioi", tokenizer=ioi.tokenizer, prepend_bos=False),
                     (ROOT / "stdlib" / "toy_ioi.circ").read_text(), args.n, args.k, args.repeats))
    import transformers as tf

    torch.manual_seed(0)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config()).eval()
    fixture = ROOT / "tests" / "fixtures" / "gpt2_tokenizer"
    tok = tf.GPT2TokenizerFast(str(fixture / "encoder.json"), str(fixture / "vocab.bpe"))
    lm = LoadedModel.from_hf(gpt2, tok, name="gpt2-shape-random")
    task = load_task("ioi", tokenizer=tok)
    rows.append(case("GPT-2-small shape (random weights): a 3-level IOI-style hypothesis", lm, task,
                     GPT2_HYPOTHESIS, min(args.n, 16), args.k, 1))
    write_json_atomic(args.out, {"threads": args.threads, "k": args.k, "results": rows, "versions": versions()})
    for r in rows:
        print(f"{r['case']}: {r['circuits']} circuits{' (exact)' if r['exact'] else ''}: null "
              f"{r['null_s']:.2f}s = {r['null_over_one_scrub']}x one scrub ({r['one_scrub_s']:.3f}s), "
              f"{r['null_over_plain_pass']}x a plain pass")
    return 0


if __name__ == "__main__":
    sys.exit(main())
