"""Benchmark the flagship check: stdlib/ioi.circ on a GPT-2-small-shaped model.

Measures, each part in its own process (so that each peak resident memory is that
part's own), on one prompt set:

1. **plain**: N plain forward passes of the prompts (the unit of cost: what running
   the model once over the dataset takes), in batches of the check's batch size;
2. **check**: `circuitlang check stdlib/ioi.circ -n N --permutations 0 --no-breakdown`
   (the scrubbed and fully ablated graphs, the clean run, the plain captures);
3. **full**: the check with the per-claim breakdown and K random circuits: the same
   pipeline as `check` (`checker.prepare`, `verdict.null_circuits`, `verdict.score`
   capturing what the random circuits read in its pass), then the breakdown's and
   the permutation null's scrubbing (`variants.claim_breakdown`,
   `variants.permutation_null`) called directly, since on random weights the task
   shows no behaviour and `check` would skip both.

The model is GPT-2 small's shape (12 layers x 12 heads, d 768) with random weights
from a fixed seed, built from a config (no hub), with the real GPT-2 tokenizer
(tests/fixtures/gpt2_tokenizer): bench/bench_checker.py's `build`. Results go to
bench/results/ioi_check.json, written atomically after every part, with each part's
wall time, CPU time (its process's, model loading included: on a machine shared with
other work the wall time measures the neighbours too) and the load average.

    python bench/bench_ioi_check.py [--n 100] [--permutations 200] [--parts plain,check,full]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

IOI = ROOT / "stdlib" / "ioi.circ"
BATCH = 64


def _text() -> str:
    # the file names `model gpt2` (the hub model); the benchmark model replaces it
    return "\n".join(line for line in IOI.read_text().splitlines() if not line.startswith("model "))


def part(name: str, folder: str, n: int, permutations: int) -> dict:
    """Run one part in this process; gives its wall time, peak memory and work."""
    import torch

    from circuitlang import variants
    from circuitlang.checker import check, load_hypothesis, prepare
    from circuitlang.ir_to_graph import ir_to_graph
    from circuitlang.models import load_model
    from circuitlang.verdict import null_circuits, score

    torch.set_grad_enabled(False)
    model = load_model(folder)
    out: dict = {}
    start = time.perf_counter()
    if name == "plain":
        from circuitlang.tasks import load_task

        task = load_task("ioi", tokenizer=model.tokenizer)
        prompts = task.prompts(n, 0)
        start = time.perf_counter()
        for s in range(0, n, BATCH):
            model.run(prompts.input_ids[s:s + BATCH], prompts.attention_mask[s:s + BATCH])
        out["tokens"] = int(prompts.attention_mask.sum())
        out["width"] = int(prompts.input_ids.shape[1])
    elif name == "check":
        result = check(_text(), model=model, n=n, permutations=0, breakdown=False, max_examples=1,
                       batch_size=BATCH)
        out["recovered"] = result.recovered.value
        out["scrubbed"] = result.scrubbed.value
        out["work"] = result.work
        out["forward_passes"] = result.passes
    else:
        hypothesis, _ = load_hypothesis(_text(), model=model)
        setup = prepare(hypothesis, model=model, n=n, batch_size=BATCH)
        graph = ir_to_graph(hypothesis)
        drawn = null_circuits(hypothesis, setup, permutations)  # as `check` does: read in the main pass
        scores = score(graph, setup, later=drawn.graphs)
        out["main_s"] = time.perf_counter() - start
        out["inner_nodes"] = sum(1 for v in graph.graph.nodes if v != graph.root and not graph.is_leaf(v))
        t = time.perf_counter()
        claims = variants.claim_breakdown(hypothesis, setup.scrubber, scores.clean, scores.random, 0.5, setup.seed)
        out["breakdown_s"] = time.perf_counter() - t
        out["statements"] = len(claims)
        t = time.perf_counter()
        null = variants.permutation_null(hypothesis, setup.scrubber, scores.clean, scores.random, setup.model.shape,
                                         permutations, setup.seed, 0.5, drawn=drawn)
        out["permutations_s"] = time.perf_counter() - t
        out["random_circuits"] = len(null.scores)
        out["work"] = setup.scrubber.work.as_dict()
        out["forward_passes"] = setup.scrubber.passes + setup.scrubber.cache.passes
    out["seconds"] = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = usage.ru_utime + usage.ru_stime  # the process's whole life: the fair unit on a shared machine
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--permutations", type=int, default=200)
    ap.add_argument("--parts", default="plain,check,full")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ioi_check.json"))
    ap.add_argument("--part", help=argparse.SUPPRESS)  # internal: run one part, print JSON
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:
        print(json.dumps(part(args.part, args.model, args.n, args.permutations)))
        return 0

    import torch
    from bench_checker import build

    from circuitlang.report import write_json_atomic

    report = {"n": args.n, "permutations": args.permutations, "batch_size": BATCH, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "parts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        model = build("small", folder)
        report["shape"] = model.shape.describe()
        del model
        for name in args.parts.split(","):
            cmd = [sys.executable, __file__, "--part", name, "--model", str(folder), "--n", str(args.n),
                   "--permutations", str(args.permutations)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                report["parts"][name] = {"error": done.stderr[-2000:]}
            else:
                report["parts"][name] = json.loads(done.stdout.strip().splitlines()[-1])
            parts = report["parts"]
            plain = parts.get("plain", {})
            for key in ("check", "full"):
                if "seconds" in parts.get(key, {}) and plain.get("seconds"):
                    parts[key]["multiple_of_plain"] = parts[key]["seconds"] / plain["seconds"]
                if "cpu_s" in parts.get(key, {}) and plain.get("cpu_s"):
                    parts[key]["cpu_multiple_of_plain"] = parts[key]["cpu_s"] / plain["cpu_s"]
            report["load_average"] = list(__import__("os").getloadavg())
            write_json_atomic(args.out, report)
            print(name, json.dumps(report["parts"][name]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
