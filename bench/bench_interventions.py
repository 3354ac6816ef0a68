"""Benchmark: a forward pass with edge interventions vs a plain forward pass, beside auto-circuit.

Takes nothing (options below); builds a GPT-2-small-shaped model (12 layers x 12 heads,
d_model 768, vocab 50257, random weights from a fixed seed, saved to a temporary folder:
no download), times on the same batch

* the plain HF forward pass;
* `LoadedModel.run` with an edge mask over every edge of the model (32,491 edges) that
  ablates: nothing (`zero`), everything (`all`), everything but 8 random edges
  (`acdc_late`, the shape of a mask late in an ACDC run), a random half shared by the
  batch (`random_shared`), a different random half per row (`random_per_row`, many
  circuits in one pass);

and, when the auto-circuit venv exists (`bash bench/peers/setup.sh ac`), runs
auto-circuit 1.0.1 on the same folder and batch in its own venv
(`bench/peers/ac_edges.py`): its plain HookedTransformer forward and its patched
forward with every edge ablated and with a random half, masks set beforehand. Each
tool's ratio is its patched time over its own plain time. The embedded toy models get
circuitlang's rows too. Every time is the best of `--repeats` after a warm-up, with the
same number of torch threads in both tools. Prints a table and writes
bench/results/interventions.json (atomically).

    python bench/bench_interventions.py [--batch 8] [--tokens 64] [--repeats 5] [--threads 1]
                                        [--no-peers] [--skip-gpt2]
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))

from make_model import build_model, make_prompts  # noqa: E402
from peer_io import best_of, read_prompts  # noqa: E402

from circuitlang.models import EdgePatch, LoadedModel, load_model, toy_names  # noqa: E402
from circuitlang.report import write_json_atomic  # noqa: E402

RESULTS = HERE / "results" / "interventions.json"
AC_PYTHON = HERE.parent / ".peers" / "ac" / "bin" / "python"
MASKS = ("zero", "all", "acdc_late", "random_shared", "random_per_row")


def masks(es, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The edge masks timed, over every edge of the model ([B or 1, R, S])."""
    g = torch.Generator().manual_seed(seed)
    valid = es.valid().float()
    edges = valid.nonzero()
    late = valid.clone()
    for i in torch.randperm(len(edges), generator=g)[:8].tolist():
        late[edges[i, 0], edges[i, 1]] = 0
    return {
        "zero": torch.zeros(1, *valid.shape),
        "all": valid[None],
        "acdc_late": late[None],
        "random_shared": (torch.rand(1, *valid.shape, generator=g) < 0.5).float() * valid,
        "random_per_row": (torch.rand(batch, *valid.shape, generator=g) < 0.5).float() * valid,
    }


def bench_circuitlang(lm: LoadedModel, clean: torch.Tensor, corrupt: torch.Tensor, repeats: int) -> dict:
    es = lm.edge_set()
    cache = lm.run(corrupt, capture=es.senders).cache
    ablated = torch.stack([cache[s] for s in es.senders], 1)  # [B, S, T, D]: once per experiment

    def plain():
        with torch.no_grad():
            lm.hf_model(input_ids=clean, use_cache=False)

    row = {
        "model": lm.name, "shape": lm.shape.describe(), "d_model": lm.shape.d_model,
        "batch": int(clean.shape[0]), "tokens": int(clean.shape[1]),
        "senders": len(es.senders), "receivers": len(es.receivers), "edges": int(es.valid().sum()),
        "plain_s": best_of(plain, repeats),
    }
    for name, mask in masks(es, clean.shape[0]).items():
        patch = EdgePatch.from_set(es, ablated, mask)
        row[f"{name}_s"] = best_of(lambda: lm.run(clean, edges=patch), repeats)
    for name in MASKS:
        row[f"ratio_{name}"] = round(row[f"{name}_s"] / row["plain_s"], 3)
    return row


def bench_auto_circuit(folder: Path, prompts: Path, repeats: int, threads: int) -> dict:
    """auto-circuit's timings on the same folder and prompts, from its own venv."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ac.json"
        subprocess.run([str(AC_PYTHON), str(HERE / "peers" / "ac_edges.py"), str(folder), str(prompts), str(out),
                        "--repeats", str(repeats), "--threads", str(threads)], check=True)
        data = json.loads(out.read_text())
    timing = data["whole"]["timing"]
    plain = timing["plain_forward"]
    env = data["environment"]
    return {
        "tool": f"auto-circuit {env['version']} (TransformerLens {env['transformer-lens']})",
        "edges": data["whole"]["n_edges"],
        "plain_s": plain,
        "all_s": timing["all_ablated_forward_only"],
        "random_shared_s": timing["random_half_forward_only"],
        "ratio_all": round(timing["all_ablated_forward_only"] / plain, 3),
        "ratio_random_shared": round(timing["random_half_forward_only"] / plain, 3),
    }


def _fmt(row: dict) -> str:
    cells = "  ".join(f"{m} {row[f'ratio_{m}']:.2f}x" for m in MASKS if f"ratio_{m}" in row)
    return f"{row.get('model', row.get('tool')):<34} plain {row['plain_s'] * 1e3:8.1f} ms  {cells}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same in every tool")
    parser.add_argument("--no-peers", action="store_true", help="skip auto-circuit")
    parser.add_argument("--skip-gpt2", action="store_true", help="only the toy models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows, peers = [], []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_gpt2:
            folder = build_model(Path(tmp) / "gpt2-small-shaped", layers=12, heads=12, d_model=768, vocab=50257,
                                 n_ctx=1024, init_std=0.02)
            prompts = make_prompts(folder / "prompts.json", batch=args.batch, tokens=args.tokens, vocab=50257)
            p = read_prompts(prompts)
            lm = load_model(str(folder), device="cpu")
            lm.name = "gpt2-small-shaped (random init)"
            rows.append(bench_circuitlang(lm, p.clean, p.corrupt, args.repeats))
            print(_fmt(rows[-1]), flush=True)
            del lm
            if not args.no_peers and AC_PYTHON.exists():
                peers.append(bench_auto_circuit(folder, prompts, args.repeats, args.threads))
                print(_fmt(peers[-1]), flush=True)
            elif not args.no_peers:
                print(f"(auto-circuit not run: {AC_PYTHON} missing; `bash bench/peers/setup.sh ac` makes it)")
    g = torch.Generator().manual_seed(0)
    for name in toy_names():
        lm = load_model(name, device="cpu")
        tokens = min(args.tokens, lm.shape.n_ctx)
        clean, corrupt = torch.randint(0, lm.shape.vocab_size, (2, args.batch, tokens), generator=g)
        rows.append(bench_circuitlang(lm, clean, corrupt, args.repeats))
        print(_fmt(rows[-1]), flush=True)
    write_json_atomic(RESULTS, {
        "benchmark": "forward pass with edge masks over every edge vs the same tool's plain forward, same batch",
        "device": "cpu",
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "timing": f"best of {args.repeats} after a warm-up",
        "circuitlang": rows,
        "peers": peers,
    })
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
