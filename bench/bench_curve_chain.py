"""Benchmark the faithfulness curve's first reference: the empty circuit known, or computed.

With corrupt (or resample) ablation the chain of `Problem.score(chained=True)` starts
from the empty circuit itself (`Problem._empty_reference`: every head and MLP gives its
ablated value there), so the empty circuit's pass computes no node. This runs the
10-point curve of an EAP ranking on GPT-2 small's shape (random init, 8 prompts x 64
tokens, logit difference, corrupt ablation, one torch thread) with that first reference
and with none (every node of the empty circuit computed), in turn in one process so that
the machine's drift falls on both, timing every pass, beside a plain forward of the batch.
Writes bench/results/curve_chain.json atomically.

    python bench/bench_curve_chain.py [--rounds 2] [--out FILE]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_discovery import _plain  # noqa: E402
from make_model import build_model, make_prompts, token_task  # noqa: E402

from circuitlang.discover.attribution import eap  # noqa: E402
from circuitlang.discover.faithfulness import curve  # noqa: E402
from circuitlang.discover.problem import Problem  # noqa: E402
from circuitlang.models import EdgeReference, load_model  # noqa: E402
from circuitlang.report import write_json_atomic  # noqa: E402


def _no_first_reference(self, ablated):  # the setting before: the empty circuit computed whole
    es = self.space.edge_set
    return EdgeReference(torch.zeros(len(es.receivers), len(es.senders)), {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "curve_chain.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model(Path(tmp) / "gpt2-small-shaped", layers=12, heads=12, d_model=768, vocab=50257,
                             n_ctx=1024, init_std=0.02)
        make_prompts(folder / "prompts.json", batch=8, tokens=64, vocab=50257)
        lm = load_model(str(folder), device="cpu")
        task = token_task(folder / "prompts.json", lm.tokenizer)
        prompts = task.prompts()
        n = len(prompts.input_ids)

        def problem() -> Problem:
            return Problem(lm, task, prompts, "logit_diff", "corrupt", batch_size=n)  # one circuit a pass

        ranking = eap(problem()).ranking()
        known = Problem._empty_reference
        forward_run = Problem.forward_run
        times: list[float] = []

        def timed_run(self, *a, **k):
            start = time.perf_counter()
            out = forward_run(self, *a, **k)
            times.append(round(time.perf_counter() - start, 3))
            return out

        runs = []
        Problem.forward_run = timed_run
        try:
            for _ in range(args.rounds):
                for on in (True, False):
                    Problem._empty_reference = known if on else _no_first_reference
                    times.clear()
                    p = problem()
                    start = time.perf_counter()
                    c = curve(p, ranking, metric="logit_diff")
                    seconds = time.perf_counter() - start
                    plain = _plain(lm, prompts)
                    # passes in order: the full model, the empty circuit, then the ten points' circuits
                    runs.append({"empty_circuit_known": on, "seconds": round(seconds, 2), "plain_s": round(plain, 3),
                                 "plain_passes": round(seconds / plain, 2), "pass_seconds": list(times),
                                 "empty_circuit_pass_s": times[1], "faithfulness": [round(float(f), 4)
                                                                                   for f in c.faithfulness]})
                    print(f"[curve] empty circuit {'known' if on else 'computed'}: {seconds:.1f} s "
                          f"({seconds / plain:.2f} plain passes), its pass {times[1]:.2f} s", flush=True)
        finally:
            Problem._empty_reference = known
            Problem.forward_run = forward_run
    write_json_atomic(args.out, {
        "benchmark": "the faithfulness curve's first reference: the empty circuit known vs computed",
        "model": "gpt2-small-shaped (random init, std 0.02)", "prompts": n, "tokens": 64, "ablation": "corrupt",
        "threads": 1, "torch": torch.__version__, "runs": runs})


if __name__ == "__main__":
    main()
