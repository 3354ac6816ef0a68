"""Side by side: circuitlang vs TransformerLens 4 and auto-circuit, same model, same prompts.

Takes a model folder written by `make_model.py` (its prompts.json inside) and the JSON
files the peer scripts wrote for it (`tl_patching.py`, `ac_edges.py`, with timing on);
gives a table on stdout and a JSON file with, for each experiment, the largest gap
between circuitlang's numbers and the peer's and the wall times and their ratio:

* head sweep at one position / at every position (one patched run per head, as
  TransformerLens does it, and circuitlang's batched form: every head's patch in one
  run, one block of rows per head, via `Patch(..., rows=...)`);
* a forward pass with every edge ablated vs auto-circuit's full-mask forward, and each
  tool's plain forward.

Run with the system Python (circuitlang installed), after the peer scripts::

    python bench/peers/compare.py MODEL_DIR --tl tl.json --ac ac.json [-o compare.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_io import (  # noqa: E402
    Prompts, best_of, environment, logit_diff, read_prompts, set_threads, write_json,
)


def _repeat(prompts, n: int):
    """The prompts tiled n times along the batch (row block k = copy k)."""
    return Prompts(prompts.clean.repeat(n, 1), prompts.corrupt.repeat(n, 1), prompts.answer.repeat(n),
                   prompts.wrong.repeat(n), prompts.position)


def head_sweeps(lm, prompts, repeats: int) -> dict:
    """circuitlang's head sweeps, looped and batched: values [L, H] and best-of timings."""
    from circuitlang.models import Patch

    shape = lm.shape
    heads = shape.heads()
    b, pos = prompts.batch, prompts.position
    corrupt = lm.run(prompts.corrupt, capture=heads).cache
    at_pos = torch.full((b,), pos)

    def looped(one_position: bool) -> torch.Tensor:
        out = []
        for head in heads:
            value = corrupt[head][:, pos] if one_position else corrupt[head]
            patch = Patch(head, value, at_pos if one_position else None)
            out.append(logit_diff(lm.run(prompts.clean, patches=[patch]).logits, prompts).mean())
        return torch.stack(out).view(shape.n_layers, shape.n_heads)

    n = len(heads)
    tiled = _repeat(prompts, n)
    blocks = torch.arange(n * b) // b

    def batched(one_position: bool) -> torch.Tensor:
        patches = []
        for k, head in enumerate(heads):
            value = corrupt[head][:, pos] if one_position else corrupt[head]
            patches.append(Patch(head, value.repeat(n, *([1] * (value.dim() - 1))),
                                 torch.full((n * b,), pos) if one_position else None, rows=blocks == k))
        run = lm.run(tiled.clean, patches=patches)
        return logit_diff(run.logits, tiled).view(n, b).mean(1).view(shape.n_layers, shape.n_heads)

    return {
        "head_out_pos": looped(True),
        "head_out_all": looped(False),
        "head_out_pos_batched": batched(True),
        "head_out_all_batched": batched(False),
        "timing": {
            "plain_forward": best_of(lambda: lm.hf_model(input_ids=prompts.clean, use_cache=False), repeats),
            "head_sweep_pos": best_of(lambda: looped(True), repeats),
            "head_sweep_all": best_of(lambda: looped(False), repeats),
            "head_sweep_pos_batched": best_of(lambda: batched(True), repeats),
            "head_sweep_all_batched": best_of(lambda: batched(False), repeats),
        },
    }


def full_mask(lm, prompts, repeats: int) -> dict:
    """circuitlang with every edge ablated: the metric and best-of timings."""
    from circuitlang.models import EdgePatch

    es = lm.edge_set()
    cache = lm.run(prompts.corrupt, capture=es.senders).cache
    ablated = torch.stack([cache[s] for s in es.senders], 1)
    patch = EdgePatch(ablated, es.mask(prompts.batch), es.senders, es.receivers)

    def run():
        return lm.run(prompts.clean, edges=patch)

    return {
        "all_edges": logit_diff(run().logits, prompts).mean().item(),
        "n_edges": int(es.valid().sum()),
        "timing": {
            "plain_forward": best_of(lambda: lm.hf_model(input_ids=prompts.clean, use_cache=False), repeats),
            "full_mask_forward": best_of(run, repeats),
            "ablation_run": best_of(lambda: lm.run(prompts.corrupt, capture=es.senders), repeats),
        },
    }


def _gap(ours, theirs) -> float:
    return (torch.as_tensor(ours, dtype=torch.float64) - torch.as_tensor(theirs, dtype=torch.float64)).abs().max().item()


def compare(model_dir: str, tl_path: str | None, ac_path: str | None, repeats: int) -> dict:
    """Run circuitlang's side and pair it with the peers' JSON (see the module docstring)."""
    from importlib.metadata import version

    from circuitlang.models import load_model

    torch.set_grad_enabled(False)
    prompts = read_prompts(Path(model_dir) / "prompts.json")
    lm = load_model(model_dir)
    report: dict = {"environment": environment("circuitlang", version("circuitlang")),
                    "model": model_dir, "shape": lm.shape.describe(),
                    "batch": prompts.batch, "tokens": prompts.tokens, "rows": []}
    rows = report["rows"]
    if tl_path:
        tl = json.loads(Path(tl_path).read_text())
        ours = head_sweeps(lm, prompts, repeats)
        t_ours, t_tl = ours["timing"], tl.get("timing", {})
        for key in ("head_out_pos", "head_out_all"):
            sweep = key.replace("head_out", "head_sweep")
            for variant in ("", "_batched"):
                rows.append({
                    "experiment": f"{sweep}{variant}", "peer": "transformer-lens",
                    "max_gap": _gap(ours[key + variant], tl["results"][key]),
                    "circuitlang_s": t_ours[sweep + variant], "peer_s": t_tl.get(sweep),
                })
        rows.append({"experiment": "plain_forward", "peer": "transformer-lens", "max_gap": None,
                     "circuitlang_s": t_ours["plain_forward"], "peer_s": t_tl.get("plain_forward")})
    if ac_path:
        ac = json.loads(Path(ac_path).read_text())["whole"]
        ours = full_mask(lm, prompts, repeats)
        t_ours, t_ac = ours["timing"], ac.get("timing", {})
        if ours["n_edges"] != ac["n_edges"]:
            raise SystemExit(f"edge graphs differ: circuitlang {ours['n_edges']} vs auto-circuit {ac['n_edges']}")
        rows.append({"experiment": "full_mask_forward", "peer": "auto-circuit",
                     "max_gap": abs(ours["all_edges"] - ac["results"]["sets"]["all"]["mean"]),
                     "circuitlang_s": t_ours["full_mask_forward"], "peer_s": t_ac.get("full_mask_forward")})
        rows.append({"experiment": "ablation_run", "peer": "auto-circuit", "max_gap": None,
                     "circuitlang_s": t_ours["ablation_run"], "peer_s": t_ac.get("src_ablations")})
        rows.append({"experiment": "plain_forward", "peer": "auto-circuit", "max_gap": None,
                     "circuitlang_s": t_ours["plain_forward"], "peer_s": t_ac.get("plain_forward")})
    for row in rows:
        row["peer_over_circuitlang"] = (row["peer_s"] / row["circuitlang_s"]) if row["peer_s"] else None
    return report


def render(report: dict) -> str:
    """The report as a fixed-width table."""
    lines = [f"{report['model']}: {report['shape']}, batch {report['batch']} x {report['tokens']} tokens",
             f"{'experiment':<26} {'peer':<17} {'max gap':>9} {'circuitlang s':>14} {'peer s':>9} {'peer/cl':>8}"]
    for r in report["rows"]:
        gap = "-" if r["max_gap"] is None else f"{r['max_gap']:.1e}"
        peer = "-" if r["peer_s"] is None else f"{r['peer_s']:.4f}"
        ratio = "-" if r["peer_over_circuitlang"] is None else f"{r['peer_over_circuitlang']:.2f}"
        lines.append(f"{r['experiment']:<26} {r['peer']:<17} {gap:>9} {r['circuitlang_s']:>14.4f} {peer:>9} {ratio:>8}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--tl", help="tl_patching.py output for this model")
    parser.add_argument("--ac", help="ac_edges.py output for this model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("-o", "--out", help="write the report as JSON here too")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads {args.threads} must be at least 1")
    set_threads(args.threads)
    if not (args.tl or args.ac):
        parser.error("give --tl and/or --ac")
    report = compare(args.model_dir, args.tl, args.ac, args.repeats)
    print(render(report))
    if args.out:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
