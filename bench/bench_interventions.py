"""Benchmark: a forward pass with a full set of edge interventions vs a plain forward pass.

Takes nothing (options below); prints, per model, the median time of a plain HF forward
pass and of `LoadedModel.run` with an edge mask that ablates every edge, on the same
batch, and their ratio; writes them to bench/results/interventions.json (atomically).

    python bench/bench_interventions.py [--batch 8] [--tokens 64] [--repeats 5]

Models: a GPT-2-small-shaped random-init model (config only, no download) and the
embedded toy models.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from circuitlang.models import EdgePatch, LoadedModel, load_model, toy_names

RESULTS = Path(__file__).resolve().parent / "results" / "interventions.json"


def _time(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(lm: LoadedModel, batch: int, tokens: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    vocab = lm.shape.vocab_size
    clean = torch.randint(0, vocab, (batch, tokens), generator=g)
    corrupt = torch.randint(0, vocab, (batch, tokens), generator=g)
    es = lm.edge_set()
    cache = lm.run(corrupt, capture=es.senders).cache
    ablated = torch.stack([cache[s] for s in es.senders], 1)  # [B, S, T, D]: built once per experiment
    full = EdgePatch.from_set(es, ablated, es.mask(batch))
    zero = EdgePatch.from_set(es, ablated, es.mask(batch) * 0)

    def plain():
        with torch.no_grad():
            lm.hf_model(input_ids=clean, use_cache=False)

    t_plain = _time(plain, repeats)
    t_full = _time(lambda: lm.run(clean, edges=full), repeats)
    t_zero = _time(lambda: lm.run(clean, edges=zero), repeats)
    return {
        "model": lm.name,
        "shape": lm.shape.describe(),
        "d_model": lm.shape.d_model,
        "batch": batch,
        "tokens": tokens,
        "senders": len(es.senders),
        "receivers": len(es.receivers),
        "edges": int(es.valid().sum()),
        "plain_s": round(t_plain, 5),
        "full_edge_mask_s": round(t_full, 5),
        "zero_edge_mask_s": round(t_zero, 5),
        "ratio_full": round(t_full / t_plain, 3),
        "ratio_zero": round(t_zero / t_plain, 3),
    }


def gpt2_small_random() -> LoadedModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(attn_implementation="eager"))
    return LoadedModel.from_hf(model, name="gpt2-small-shaped (random init)")


def write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-gpt2", action="store_true", help="only the toy models")
    args = parser.parse_args()
    rows = []
    models = [] if args.skip_gpt2 else [gpt2_small_random]
    models += [lambda n=n: load_model(n, device="cpu") for n in toy_names()]
    for make in models:
        lm = make()
        tokens = min(args.tokens, lm.shape.n_ctx)
        row = bench(lm, args.batch, tokens, args.repeats)
        rows.append(row)
        print(f"{row['model']:<36} B={row['batch']} T={row['tokens']} edges={row['edges']:<6} "
              f"plain {row['plain_s'] * 1e3:8.1f} ms  full mask {row['full_edge_mask_s'] * 1e3:8.1f} ms  "
              f"ratio {row['ratio_full']:.2f}  (zero mask {row['ratio_zero']:.2f})")
    write_atomic(RESULTS, {
        "benchmark": "forward with a full edge mask vs plain forward, same batch",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "results": rows,
    })
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
