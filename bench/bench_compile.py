"""Does `torch.compile` help circuitlang's passes? Measured, not assumed (issue 11).

Takes nothing (options below); builds GPT-2 small's shape from a config (random
weights, fixed seed, the real GPT-2 tokenizer) and times, on the same prompts, one
after the other in one process:

1. a plain forward pass of the HF model, eager;
2. the same pass with every transformer block compiled in place (`block.compile()`,
   inductor), after a warm-up that pays the compilation (recorded apart);
3. a head sweep at END (`Experiments.activation_patching`, the hooks of the run
   engine on the compiled blocks), eager and compiled, and the largest gap between
   their grids.

Writes bench/results/compile.json atomically and prints it. Compilation needs a C++
compiler on a CPU; if it fails, the error is recorded instead of the timings.

    python bench/bench_compile.py [--n 16] [--threads 1] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_checker import best_of, build, one_length_prompts  # noqa: E402

from circuitlang.experiments import Experiments  # noqa: E402
from circuitlang.report import write_json_atomic  # noqa: E402
from circuitlang.sites import Head, Position  # noqa: E402
from circuitlang.tasks import load_task  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "compile.json"))
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    report: dict = {"torch": torch.__version__, "threads": args.threads, "n": args.n}
    with tempfile.TemporaryDirectory() as tmp:
        model = build("small", Path(tmp) / "model")
        task = load_task("ioi", tokenizer=model.tokenizer)
        prompts = one_length_prompts(task, args.n, 0)
        shape = model.shape
        heads = [Head(l, h) for l in range(shape.n_layers) for h in range(shape.n_heads)]
        report["shape"], report["tokens"] = shape.describe(), int(prompts.input_ids.shape[1])

        def plain():
            model.run(prompts.input_ids, prompts.attention_mask)

        def sweep():
            exp = Experiments(model, task, prompts, "logit_diff", batch_size=256)
            return exp.activation_patching(heads, Position("END")).values

        report["eager"] = {"plain_s": best_of(plain, args.repeats), "sweep_s": best_of(sweep, args.repeats)}
        eager_grid = sweep()
        report["compiled"] = {}
        try:
            for block in model.adapter.blocks():
                block.compile()
            start = time.perf_counter()
            plain()  # the first call compiles
            report["compile_s"] = time.perf_counter() - start
            report["compiled"]["plain_s"] = best_of(plain, args.repeats)
            report["speedup_plain"] = report["eager"]["plain_s"] / report["compiled"]["plain_s"]
        except Exception as exc:  # noqa: BLE001 - the finding is that it does not run
            report["compiled"]["plain_error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
        try:
            start = time.perf_counter()
            compiled_grid = sweep()  # new shapes and hooks: compiles again
            report["sweep_compile_s"] = time.perf_counter() - start
            report["compiled"]["sweep_s"] = best_of(sweep, args.repeats)
            report["sweep_max_abs_diff"] = float(abs(compiled_grid - eager_grid).max())
            report["speedup_sweep"] = report["eager"]["sweep_s"] / report["compiled"]["sweep_s"]
        except Exception as exc:  # noqa: BLE001 - the finding is that it does not run
            report["compiled"]["sweep_error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
    write_json_atomic(args.out, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
