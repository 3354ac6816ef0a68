"""A/B of one run-engine shortcut on ACDC: the last block's MLP at END alone.

When a pass reads the logits at one token per row (every discovery pass: `Problem.forward`
gives `logits_at=END`), the run engine computes the last block's MLP at that token only
(`circuitlang.models.run._only_read_at_logits`). This script runs ACDC (tau 0.01, KL, its
own order, 2 circuits per pass) on the 4-layer, 8-head model of bench/bench_discovery.py,
in one process, with the shortcut on and off in turn, and checks that both keep the same
edges. Results go to bench/results/acdc_ab.json (written atomically).

    python bench/bench_acdc_ab.py [--rounds 2] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE.parent))

from make_model import build_model, make_prompts, token_task  # noqa: E402

import circuitlang.models.run as run_engine  # noqa: E402
from circuitlang.discover.acdc import acdc  # noqa: E402
from circuitlang.discover.problem import Problem  # noqa: E402
from circuitlang.models import load_model  # noqa: E402
from circuitlang.report import write_json_atomic  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shortcut = run_engine._only_read_at_logits
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(Path(tmp) / "gpt2-4x8", layers=4, heads=8, d_model=256, vocab=512, n_ctx=64)
        make_prompts(folder / "prompts.json", batch=16, tokens=32, vocab=512)
        lm = load_model(str(folder), device="cpu")
        task = token_task(folder / "prompts.json", lm.tokenizer)
        prompts = task.prompts()
        runs, kept = [], {}
        for _ in range(args.rounds):
            for mode in ("off", "on"):
                run_engine._only_read_at_logits = shortcut if mode == "on" else (lambda *a: False)
                problem = Problem(lm, task, prompts, "kl", "corrupt", batch_size=2 * len(prompts.input_ids))
                start = time.perf_counter()
                circuit, decisions = acdc(problem, 0.01)
                seconds = time.perf_counter() - start
                edges = sorted(circuit.nonzero()[:, 0].tolist())
                kept.setdefault(mode, edges)
                runs.append({"last_mlp_at_end": mode == "on", "seconds": seconds, "passes": decisions.passes,
                             "kept": len(edges)})
                print(f"[acdc] last MLP at END {mode}: {seconds:.1f} s, {decisions.passes} passes, "
                      f"kept {len(edges)}", flush=True)
        run_engine._only_read_at_logits = shortcut
    off = min(r["seconds"] for r in runs if not r["last_mlp_at_end"])
    on = min(r["seconds"] for r in runs if r["last_mlp_at_end"])
    result = {"model": "gpt2-shaped 4 layers x 8 heads, d_model 256 (random init)", "prompts": 16, "tokens": 32,
              "tau": 0.01, "metric": "kl", "threads": args.threads, "cores": os.cpu_count(),
              "load_average_before": list(os.getloadavg()), "runs": runs,
              "same_edges": kept["off"] == kept["on"], "best_off_s": off, "best_on_s": on,
              "speedup": round(off / on, 3)}
    write_json_atomic(HERE / "results" / "acdc_ab.json", result)
    print(f"best off {off:.1f} s, on {on:.1f} s: {off / on:.2f}x; same edges: {result['same_edges']}")


if __name__ == "__main__":
    main()
