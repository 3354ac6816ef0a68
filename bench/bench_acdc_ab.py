"""A/B of one run-engine shortcut on ACDC, on and off in turn in one process.

`--switch last-mlp`: when a pass reads the logits at one token per row (every discovery
pass: `Problem.forward` gives `logits_at=END`), the last block's MLP runs at that token
only (`circuitlang.models.run._only_read_at_logits`). `--switch sparse`: a mixed edge
row that differs from the ablated or the clean stream in a few senders reads only their
deltas (`circuitlang.models.edge_engine._sparse_row`). `--switch last-attention`: the last
block's output projection, its heads' deltas and the inputs of the receivers that read
them run at that token only (`circuitlang.models.run._last_attention_at_logits`). ACDC runs at tau 0.01 (KL, its own
order, 2 circuits per pass) on the 4-layer, 8-head model of bench/bench_discovery.py, and
both settings must keep the same edges. Results go to bench/results/acdc_ab_SWITCH.json
(written atomically).

    python bench/bench_acdc_ab.py [--switch last-mlp|last-attention|sparse] [--rounds 2] [--threads 1]
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

import circuitlang.models.edge_engine as edge_engine  # noqa: E402
import circuitlang.models.run as run_engine  # noqa: E402
from circuitlang.discover.acdc import acdc  # noqa: E402
from circuitlang.discover.problem import Problem  # noqa: E402
from circuitlang.models import load_model  # noqa: E402
from circuitlang.report import write_json_atomic  # noqa: E402


#: --switch -> (module, attribute, its value when off)
SWITCHES = {"last-mlp": (run_engine, "_only_read_at_logits", lambda *a: False),
            "last-attention": (run_engine, "_last_attention_at_logits", lambda *a: False),
            "sparse": (edge_engine, "_sparse_row", lambda *a: None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--switch", choices=SWITCHES, default="last-mlp", help="the shortcut turned off and on")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    module, name, off_value = SWITCHES[args.switch]
    shortcut = getattr(module, name)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(Path(tmp) / "gpt2-4x8", layers=4, heads=8, d_model=256, vocab=512, n_ctx=64)
        make_prompts(folder / "prompts.json", batch=16, tokens=32, vocab=512)
        lm = load_model(str(folder), device="cpu")
        task = token_task(folder / "prompts.json", lm.tokenizer)
        prompts = task.prompts()
        runs, kept = [], {}
        for _ in range(args.rounds):
            for mode in ("off", "on"):
                setattr(module, name, shortcut if mode == "on" else off_value)
                problem = Problem(lm, task, prompts, "kl", "corrupt", batch_size=2 * len(prompts.input_ids))
                start = time.perf_counter()
                circuit, decisions = acdc(problem, 0.01, rows=2 * len(prompts.input_ids))  # 2 circuits a pass
                seconds = time.perf_counter() - start
                edges = sorted(circuit.nonzero()[:, 0].tolist())
                if kept.setdefault(mode, edges) != edges:
                    raise SystemExit(f"{args.switch} {mode}: another edge set than this setting's first run")
                runs.append({"on": mode == "on", "seconds": seconds, "passes": decisions.passes, "kept": len(edges)})
                print(f"[acdc] {args.switch} {mode}: {seconds:.1f} s, {decisions.passes} passes, "
                      f"kept {len(edges)}", flush=True)
        setattr(module, name, shortcut)
    off = min(r["seconds"] for r in runs if not r["on"])
    on = min(r["seconds"] for r in runs if r["on"])
    result = {"switch": args.switch, "model": "gpt2-shaped 4 layers x 8 heads, d_model 256 (random init)",
              "prompts": 16, "tokens": 32,
              "tau": 0.01, "metric": "kl", "threads": args.threads, "cores": os.cpu_count(),
              "load_average_before": list(os.getloadavg()), "runs": runs,
              "same_edges": kept["off"] == kept["on"], "best_off_s": off, "best_on_s": on,
              "speedup": round(off / on, 3)}
    write_json_atomic(HERE / "results" / f"acdc_ab_{args.switch.replace('-', '_')}.json", result)
    print(f"best off {off:.1f} s, on {on:.1f} s: {off / on:.2f}x; same edges: {result['same_edges']}")


if __name__ == "__main__":
    main()
