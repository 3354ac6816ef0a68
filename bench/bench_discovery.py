"""Benchmark the solver beside auto-circuit 1.0.1: EAP, EAP-IG, a faithfulness curve, ACDC.

Takes nothing (options below); builds the models from configs (random weights, fixed
seeds, no download) with `bench/peers/make_model.py`, and runs circuitlang and then
auto-circuit (`bench/peers/ac_discovery.py`, in its own venv `.peers/ac`) on the same
folder and prompts, one after the other, with the same number of torch threads:

1. **Attribution** on a GPT-2-small-shaped model (12 layers x 12 heads, d_model 768,
   vocab 50257; 32,491 edges), 8 prompts x 64 tokens, logit difference at the last
   token, corrupt ablation:
   * EAP: `attribution.eap` vs `mask_gradient_prune_scores(mask_val=0)` (and the
     largest gap between the two, which the agreement tests bound by 1e-4);
   * EAP-IG, 5 gradient points each: `eap_ig("activations", 5)` vs
     `mask_gradient_prune_scores(integrated_grad_samples=4)` (points 0, 1/4, ..., 1);
     circuitlang's `inputs` variant (MIB's default) is timed too;
   * a 10-point faithfulness curve of the EAP ranking (MIB's edge fractions, plus the
     full and the empty circuit): `faithfulness.curve` vs `run_circuits`, each also as a
     multiple of its own tool's plain forward pass of the batch;
   * faithfulness at equal edge count: f(k) = (m(C_k) - m(empty)) / (m(full) - m(empty))
     of each tool's top-k circuit at those ten counts.
2. **ACDC** at one tau (KL divergence) on the 4-layer, 8-head, d_model 256 model of the
   earlier benchmarks (vocab 512, 16 prompts x 32 tokens; 1,519 edges): auto-circuit's
   `acdc_prune_scores`, then circuitlang's `acdc` given auto-circuit's edge order (so the
   same decisions: the kept edge sets are compared), and in its own default order.

Every circuitlang time is one run (these are long), after a warm-up forward pass.
Prints a table and writes bench/results/discovery.json atomically.

    python bench/bench_discovery.py [--threads 1] [--tau 0.01] [--no-peers]
                                    [--skip-attribution] [--skip-acdc] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE.parent))

from make_model import build_model, make_prompts, token_task  # noqa: E402
from peer_io import best_of  # noqa: E402

from circuitlang.discover.acdc import acdc  # noqa: E402
from circuitlang.discover.attribution import eap, eap_ig  # noqa: E402
from circuitlang.discover.faithfulness import curve  # noqa: E402
from circuitlang.discover.problem import Problem  # noqa: E402
from circuitlang.models import load_model  # noqa: E402
from circuitlang.report import write_json_atomic  # noqa: E402

RESULTS = HERE / "results" / "discovery.json"
AC_PYTHON = HERE.parent / ".peers" / "ac" / "bin" / "python"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run_peer(folder: Path, threads: int, *flags: str) -> dict:
    """ac_discovery.py on the folder, in the auto-circuit venv; its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ac.json"
        subprocess.run([str(AC_PYTHON), str(HERE / "peers" / "ac_discovery.py"), str(folder),
                        str(folder / "prompts.json"), str(out), "--threads", str(threads), *flags], check=True)
        return json.loads(out.read_text())


def _indices(space, peer: dict) -> list[int]:
    by_name = {(str(s), str(r)): i for i, (s, r, _) in enumerate(space.edges())}
    return [by_name[(e["sender"], e["receiver"])] for e in peer["edges"]]


def _plain(lm, prompts, repeats: int = 3) -> float:
    ids = prompts.input_ids

    def once():
        with torch.no_grad():
            lm.hf_model(input_ids=ids, use_cache=False)
    return best_of(once, repeats)


def attribution(tmp: Path, threads: int, peers: bool) -> dict:
    folder = build_model(tmp / "gpt2-small-shaped", layers=12, heads=12, d_model=768, vocab=50257, n_ctx=1024,
                         init_std=0.02)
    make_prompts(folder / "prompts.json", batch=8, tokens=64, vocab=50257)
    lm = load_model(str(folder), device="cpu")
    task = token_task(folder / "prompts.json", lm.tokenizer)
    prompts = task.prompts()
    n = len(prompts.input_ids)

    def problem() -> Problem:
        return Problem(lm, task, prompts, "logit_diff", "corrupt", batch_size=n)

    plain = _plain(lm, prompts)
    print(f"[attribution] plain forward of {n} x {prompts.input_ids.shape[1]} tokens: {plain:.2f} s", flush=True)
    scores, t_eap = timed(lambda: eap(problem()))
    print(f"[attribution] circuitlang EAP: {t_eap:.1f} s", flush=True)
    _, t_ig = timed(lambda: eap_ig(problem(), "activations", 5))
    print(f"[attribution] circuitlang EAP-IG (activations, 5 points): {t_ig:.1f} s", flush=True)
    _, t_ig_inputs = timed(lambda: eap_ig(problem(), "inputs", 5))
    print(f"[attribution] circuitlang EAP-IG (inputs, 5 points): {t_ig_inputs:.1f} s", flush=True)
    p = problem()
    the_curve, t_curve = timed(lambda: curve(p, scores.ranking(), metric="logit_diff"))
    print(f"[attribution] circuitlang 10-point curve: {t_curve:.1f} s ({p.passes} passes)", flush=True)
    row = {
        "model": "gpt2-small-shaped (random init, std 0.02)", "edges": len(p.space), "prompts": n,
        "tokens": int(prompts.input_ids.shape[1]), "plain_s": plain, "eap_s": t_eap,
        "eap_ig_activations_5_s": t_ig, "eap_ig_inputs_5_s": t_ig_inputs, "curve_s": t_curve,
        "curve_passes": p.passes, "curve_plain_passes": round(t_curve / plain, 2),
        "curve_counts": list(the_curve.edges), "curve_faithfulness": list(the_curve.faithfulness),
    }
    if peers:
        print("[attribution] auto-circuit: EAP, EAP-IG (4 = 5 points), curve ...", flush=True)
        peer = run_peer(folder, threads, "--eap", "--eap-ig", "4", "--curve", "--plain")
        idx = _indices(p.space, peer)
        ours = scores.edges.double().numpy()[idx]
        theirs = -np.asarray(peer["eap"]["scores"])
        c = peer["curve"]
        gap = c["full"] - c["empty"]
        peer_f = [(v - c["empty"]) / gap for v in c["logit_diff"]]
        row["auto_circuit"] = {
            "tool": f"auto-circuit {peer['environment']['version']}", "plain_s": peer["plain_s"],
            "eap_s": peer["eap"]["seconds"], "eap_ig_5_s": peer["eap_ig"]["seconds"], "curve_s": c["seconds"],
            "curve_plain_passes": round(c["seconds"] / peer["plain_s"], 2), "curve_counts": c["counts"],
            "curve_faithfulness": peer_f,
            "eap_max_gap": float(np.abs(ours - theirs).max()), "eap_max_abs": float(np.abs(theirs).max()),
        }
        row["ratios"] = {"eap": round(peer["eap"]["seconds"] / t_eap, 2),
                         "eap_ig": round(peer["eap_ig"]["seconds"] / t_ig, 2),
                         "curve": round(c["seconds"] / t_curve, 2)}
    return row


def scoring_passes(decisions, per_pass: int) -> int:
    """The scoring passes ACDC's search makes for these decisions with `per_pass` circuits
    per pass (acdc.py: a pass ends at its first kept edge, or when full); for a GPU-sized
    batch this is computed from the decisions, not run."""
    scored, kept = decisions.scored.tolist(), decisions.kept.tolist()
    passes, i, m = 0, 0, len(scored)
    while i < m:
        rows = 0
        while i < m and rows < per_pass:
            if scored[i]:
                rows += 1
                if kept[i]:
                    i += 1
                    break
            i += 1
        passes += rows > 0
    return passes


def acdc_bench(tmp: Path, threads: int, tau: float, peers: bool) -> dict:
    folder = build_model(tmp / "gpt2-4x8", layers=4, heads=8, d_model=256, vocab=512, n_ctx=64)
    make_prompts(folder / "prompts.json", batch=16, tokens=32, vocab=512)
    lm = load_model(str(folder), device="cpu")
    task = token_task(folder / "prompts.json", lm.tokenizer)
    prompts = task.prompts()
    n = len(prompts.input_ids)
    plain = _plain(lm, prompts)
    row = {"model": "gpt2-shaped 4 layers x 8 heads, d_model 256 (random init)", "prompts": n,
           "tokens": int(prompts.input_ids.shape[1]), "tau": tau, "metric": "kl", "plain_s": plain}
    order = None
    if peers:
        print(f"[acdc] auto-circuit at tau={tau} ...", flush=True)
        peer = run_peer(folder, threads, "--acdc", str(tau), "--plain")
        run = peer["acdc"][0]
        row["auto_circuit"] = {"tool": f"auto-circuit {peer['environment']['version']}", "seconds": run["seconds"],
                               "kept": len(run["kept"]), "plain_s": peer["plain_s"]}
        print(f"[acdc] auto-circuit: {run['seconds']:.1f} s, kept {len(run['kept'])}", flush=True)
        space = Problem(lm, task, prompts, "kl", "corrupt").space
        idx = _indices(space, peer)
        order = [idx[i] for i in run["order"]]
        theirs = {idx[i] for i in run["kept"]}
    runs = [("auto_circuit_order", order, n), ("auto_circuit_order", order, 2 * n), ("default_order", None, 2 * n)]
    for name, how, rows in runs:
        if name == "auto_circuit_order" and order is None:
            continue
        problem = Problem(lm, task, prompts, "kl", "corrupt", batch_size=rows)
        (circuit, decisions), seconds = timed(lambda: acdc(problem, tau, order=how, rows=rows))
        entry = {"rows_per_pass": rows, "seconds": seconds, "passes": decisions.passes,
                 "kept": int(decisions.kept.sum()), "scored": int(decisions.scored.sum()),
                 "tried": len(decisions.order),
                 "scoring_passes": scoring_passes(decisions, rows // n),
                 "scoring_passes_at_64_circuits_per_pass": scoring_passes(decisions, 64)}
        if how is not None:
            entry["same_edges_as_auto_circuit"] = set(circuit.nonzero()[:, 0].tolist()) == theirs
            entry["speedup"] = round(row["auto_circuit"]["seconds"] / seconds, 2)
        row.setdefault(name, []).append(entry)
        print(f"[acdc] circuitlang ({name}, {rows} rows/pass): {seconds:.1f} s, {entry['passes']} passes, "
              f"kept {entry['kept']} of {entry['tried']}" + (f", same edges: {entry['same_edges_as_auto_circuit']}"
                                                             if how is not None else ""), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same in every tool")
    parser.add_argument("--tau", type=float, default=0.01, help="ACDC's threshold (KL)")
    parser.add_argument("--no-peers", action="store_true", help="skip auto-circuit")
    parser.add_argument("--skip-attribution", action="store_true")
    parser.add_argument("--skip-acdc", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON written (default: %(default)s)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peers = not args.no_peers and AC_PYTHON.exists()
    if not args.no_peers and not peers:
        print(f"(auto-circuit not run: {AC_PYTHON} missing; `bash bench/peers/setup.sh ac` makes it)")
    results = {"benchmark": "discovery beside auto-circuit: EAP, EAP-IG, a 10-point curve, ACDC",
               "device": "cpu", "threads": args.threads, "torch": torch.__version__,
               "machine": platform.machine(), "cores": os.cpu_count(),
               "timing": "one run each (after a warm-up forward pass)",
               "load_average_before": list(os.getloadavg())}
    with tempfile.TemporaryDirectory() as tmp:  # each part is written as soon as it is done
        if not args.skip_acdc:
            results["acdc"] = acdc_bench(Path(tmp), args.threads, args.tau, peers)
            write_json_atomic(args.out, {**results, "load_average_after": list(os.getloadavg())})
        if not args.skip_attribution:
            results["attribution"] = attribution(Path(tmp), args.threads, peers)
    results["load_average_after"] = list(os.getloadavg())
    write_json_atomic(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
