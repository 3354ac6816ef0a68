"""Scale on one CPU machine: a ~1B-parameter Llama-shaped model, a check and EAP over every edge.

Builds a Llama-shaped model from a config (hidden 2048, 16 layers, 32 heads, 8 key/value
heads, intermediate 8192, vocab 32000: about 1.1B parameters, random weights from a
fixed seed; no hub, no tokenizer), then on induction prompts over token ids:

1. **check**: a small hypothesis over a few heads (`head 5.3 moves next to END`, and an
   edge into it), scrubbed with `circuitlang.check` (no permutations, no breakdown);
2. **eap**: `circuitlang.discover(method="eap")` scoring every edge of the model (no
   faithfulness curve, no re-check).

Each part records its wall time and the process's peak resident memory so far
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`, and psutil's RSS when psutil is present;
tracemalloc does not see torch's allocations). Results go to bench/results/scale.json,
rewritten atomically after each part, so a run killed midway keeps what it measured.

    nice python bench/bench_scale.py [--n 8] [--length 16] [--threads 2]
"""
from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import circuitlang  # noqa: E402
from circuitlang.models import LoadedModel  # noqa: E402
from circuitlang.report import write_json_atomic  # noqa: E402

OUT = ROOT / "bench" / "results" / "scale.json"
CONFIG = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
          "intermediate_size": 8192, "vocab_size": 32000, "max_position_embeddings": 256}
HYPOTHESIS = """\
task induction
metric logit_diff
head 5.3 moves next to END
head 2.1 -> 5.3.k at PREV+1
"""


def peak_rss_gib() -> dict:
    """The process's peak resident set (ru_maxrss, KiB on Linux) and, with psutil, its RSS now."""
    out = {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    try:
        import psutil

        out["rss_now_gib"] = round(psutil.Process().memory_info().rss / 2**30, 3)
    except ImportError:
        pass
    return out


def build(sizes: dict, seed: int = 0) -> LoadedModel:
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.LlamaConfig(**sizes)
    config._attn_implementation = "eager"
    model = tf.LlamaForCausalLM(config)
    return LoadedModel.from_hf(model.eval(), name="llama-1b-shape")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="prompts (default 8)")
    parser.add_argument("--length", type=int, default=16,
                        help="tokens per copy (default 16: prompts of 32 tokens)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="the check's batch size (default 8)")
    parser.add_argument("--eap-batch-size", type=int, default=None,
                        help="EAP's rows per pass (default: chosen from free memory, circuitlang.models.memory)")
    parser.add_argument("--skip-check", action="store_true",
                        help="keep the check part of an earlier run's scale.json and run EAP only")
    parser.add_argument("--smoke", action="store_true",
                        help="a 2-layer model of the same widths, written to scale_smoke.json (a quick try)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = OUT.with_name("scale_smoke.json") if args.smoke else OUT
    config = {**CONFIG, "num_hidden_layers": 6, "hidden_size": 512, "intermediate_size": 1024} if args.smoke \
        else CONFIG
    record: dict = {
        "machine": f"{platform.node()}: {platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} torch threads (CPU only, shared)",
        "torch": torch.__version__,
        "config": config,
        "n": args.n,
        "tokens_per_prompt": 2 * args.length,
        "parts": {},
    }

    def save() -> None:
        write_json_atomic(out, record)

    if args.skip_check and out.is_file():
        import json

        earlier = json.loads(out.read_text()).get("parts", {})
        record["parts"].update({k: v for k, v in earlier.items() if k == "check"})

    started = time.perf_counter()
    lm = build(config)
    params = sum(p.numel() for p in lm.hf_model.parameters())
    record["parameters"] = params
    record["parts"]["build"] = {"seconds": round(time.perf_counter() - started, 2), **peak_rss_gib()}
    save()
    print(f"built {params / 1e9:.2f}B parameters in {record['parts']['build']['seconds']} s", flush=True)

    task_params = {"length": args.length, "vocab": 1000}
    if args.skip_check and "check" in record["parts"]:
        return run_eap(args, lm, record, save, task_params)
    started = time.perf_counter()
    result = circuitlang.check(HYPOTHESIS, model=lm, task="induction", n=args.n, seed=0, permutations=0,
                               breakdown=False, batch_size=args.batch_size, task_params=task_params)
    record["parts"]["check"] = {"seconds": round(time.perf_counter() - started, 2),
                                "clean": result.clean.value, "scrubbed": result.scrubbed.value,
                                "random": result.random.value, "recovered": result.recovered.value, **peak_rss_gib()}
    save()
    print(f"check: {record['parts']['check']}", flush=True)

    return run_eap(args, lm, record, save, task_params)


def run_eap(args, lm, record: dict, save, task_params: dict) -> int:
    """EAP over every edge; the batch size from free memory unless --eap-batch-size."""
    from circuitlang.models.memory import choose_batch_size

    edges = len(lm.edge_set().edges())
    plan = choose_batch_size(lm, 2 * args.length, grad=True, edges=True, cap=32)
    batch = args.eap_batch_size or plan.size
    started = time.perf_counter()
    found = circuitlang.discover(model=lm, task="induction", method="eap", n=args.n, seed=0, edges=50,
                                 batch_size=args.eap_batch_size, with_curve=False, check=False,
                                 task_params=task_params)
    record["parts"]["eap"] = {"seconds": round(time.perf_counter() - started, 2), "edges_scored": edges,
                              "edges_kept": int(found.circuit.sum()), "batch_size": batch,
                              "batch_plan": plan.describe(), "estimated_row_gib": round(plan.row_bytes / 2**30, 3),
                              **peak_rss_gib()}
    record["peak_rss_gib"] = peak_rss_gib()["peak_rss_gib"]
    save()
    print(f"eap: {record['parts']['eap']}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
