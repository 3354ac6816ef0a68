"""A paired A/B of one run-engine shortcut on ACDC's own passes.

Runs ACDC once (tau 0.01, KL, its own order, 2 circuits per pass) on the 4-layer, 8-head
model of bench/bench_discovery.py, recording every batch of circuits it scored, then
replays those batches one by one with the shortcut on and then off, summing each side's
seconds. Drift in the machine's speed then falls on both sides alike, which whole runs one
after the other (bench/bench_acdc_ab.py) do not give on a noisy machine. Both sides must
give the same faith for every batch to 1e-5. Results go to
bench/results/acdc_replay_SWITCH.json (written atomically).

    python bench/bench_acdc_replay.py [--switch reuse|reference|last-attention|last-mlp|sparse] [--every 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_acdc_ab import SWITCHES as AB_SWITCHES  # noqa: E402
from make_model import build_model, make_prompts, token_task  # noqa: E402

import circuitlang.discover.acdc as acdc_module  # noqa: E402
import circuitlang.models.run as run_engine  # noqa: E402
from circuitlang.discover.problem import Problem  # noqa: E402
from circuitlang.models import load_model  # noqa: E402
from circuitlang.report import write_json_atomic  # noqa: E402

#: --switch -> (module, attribute, its value when off); "reference": ACDC's `EdgeReference`
#: (each batch replayed with the reference it was scored with, and without one)
SWITCHES = {**AB_SWITCHES, "reuse": (run_engine, "_reuses_columns", lambda *a: False),
            "reference": (None, None, None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switch", choices=SWITCHES, default="reuse", help="the shortcut turned on and off")
    parser.add_argument("--every", type=int, default=1, help="replay every n-th recorded batch")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    module, name, off_value = SWITCHES[args.switch]
    shortcut = getattr(module, name) if module is not None else None
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(Path(tmp) / "gpt2-4x8", layers=4, heads=8, d_model=256, vocab=512, n_ctx=64)
        make_prompts(folder / "prompts.json", batch=16, tokens=32, vocab=512)
        lm = load_model(str(folder), device="cpu")
        task = token_task(folder / "prompts.json", lm.tokenizer)
        prompts = task.prompts()
        problem = Problem(lm, task, prompts, "kl", "corrupt", batch_size=2 * len(prompts.input_ids))
        batches = []
        score = acdc_module._Faith.__call__

        def recording(self, kept):
            if len(batches) % args.every == 0:  # (the reference it is scored with: shared, not copied)
                batches.append((kept.clone(), self.reference))
            else:
                batches.append(None)
            return score(self, kept)

        acdc_module._Faith.__call__ = recording
        try:
            start = time.perf_counter()
            circuit, decisions = acdc_module.acdc(problem, 0.01, rows=2 * len(prompts.input_ids))  # 2 a pass
            whole = time.perf_counter() - start
        finally:
            acdc_module._Faith.__call__ = score
        evaluator = acdc_module._Faith(problem, 2 * len(prompts.input_ids))
        seconds = {True: 0.0, False: 0.0}
        worst = 0.0
        replayed = [b for b in batches if b is not None]
        for kept, reference in replayed:
            got = {}
            for on in (True, False):
                evaluator.reference = reference  # as ACDC scored it (the reference switch: none when off)
                evaluator.reuse = on or module is not None
                if module is not None:
                    setattr(module, name, shortcut if on else off_value)
                t = time.perf_counter()
                got[on] = evaluator(kept)
                seconds[on] += time.perf_counter() - t
            worst = max(worst, float(np.abs(got[True] - got[False]).max()))
        if module is not None:
            setattr(module, name, shortcut)
    if worst > 1e-5:
        raise SystemExit(f"{args.switch}: faith differs by {worst:.2e} between on and off")
    result = {"switch": args.switch, "model": "gpt2-shaped 4 layers x 8 heads, d_model 256 (random init)",
              "prompts": 16, "tokens": 32, "tau": 0.01, "metric": "kl", "threads": args.threads,
              "cores": os.cpu_count(), "load_average_before": list(os.getloadavg()),
              "acdc_seconds": whole, "acdc_passes": decisions.passes, "kept": int(circuit.sum()),
              "batches_replayed": len(replayed), "on_s": seconds[True], "off_s": seconds[False],
              "speedup": round(seconds[False] / seconds[True], 3), "largest_faith_difference": worst}
    write_json_atomic(HERE / "results" / f"acdc_replay_{args.switch.replace('-', '_')}.json", result)
    print(f"{args.switch}: {len(replayed)} batches, on {seconds[True]:.1f} s, off {seconds[False]:.1f} s: "
          f"{result['speedup']:.2f}x (ACDC itself {whole:.1f} s, {decisions.passes} passes, kept {result['kept']})")


if __name__ == "__main__":
    main()
