"""auto-circuit side of the discovery agreement tests and benchmark: EAP, EAP-IG, ACDC, curves.

Takes a local GPT-2-shaped HF model folder (`make_model.py`), a prompts file
(`peer_io.py`) and an output path; gives a JSON file with what auto-circuit 1.0.1's own
discovery algorithms find on that model and those prompts, on a TransformerLens 2
`HookedTransformer` built as `ac_edges.py` builds it (no weight processing), wrapped
by `patchable_model(factorized=True, separate_qkv=True, slice_output="last_seq")`,
with one `PromptDataLoader` batch holding every prompt (auto-circuit's ACDC uses only
the first batch). Ablation is auto-circuit's default `RESAMPLE` from the corrupt
prompts, i.e. circuitlang's `corrupt`.

Every edge is listed once under `edges` (auto-circuit's name and circuitlang's names
of its two ends, the order of `ac_edges.py`); per-edge results are aligned with it.

* `--eap`: `mask_gradient_prune_scores(mask_val=0, grad_function="logit",
  answer_function="avg_diff")`: the gradient of *minus* the mean logit difference at
  the last token with respect to each edge's patch mask (1 = ablated), at the clean
  model (`eap.scores`, `eap.seconds`).
* `--eap-ig N`: the same with `integrated_grad_samples=N`: the gradients at mask values
  0, 1/N, ..., 1 (N + 1 points), summed (`eap_ig`).
* `--acdc TAU` (repeatable): `acdc_prune_scores` with the single threshold TAU
  (`tao_bases=[TAU], tao_exps=[0]`), KL divergence at the last token. `acdc[i]` has
  `tau`, `order` (edge indices in the order ACDC tries them: its own
  `sorted(model.edges, key=dest.layer, reverse=True)`, which within one layer follows
  the iteration order of a Python set, so it is only known by dumping it here),
  `faith` (the KL it measured after each trial removal, recorded by wrapping its
  `multibatch_kl_div`), `kept` (indices of the edges left in the circuit: score inf),
  `seconds`, and `faithfulness` (the kept circuit's mean logit difference, from
  `run_circuits`).
* `--curve`: with the EAP scores, `run_circuits(patch_type=TREE_PATCH)` keeping the
  top edges at MIB's ten edge fractions (circuitlang's `faithfulness.MIB_FRACTIONS`,
  counts rounded as circuitlang rounds them) plus no edge and every edge:
  `curve.counts`, `curve.logit_diff` (mean per count), `curve.seconds`.
* `--plain`: `plain_s`, the unwrapped HookedTransformer's forward of the clean batch
  (best of 3 after a warm-up), the unit the benchmark's ratios use.

Run inside the auto-circuit venv::

    .peers/ac/bin/python bench/peers/ac_discovery.py MODEL_DIR PROMPTS.json OUT.json \\
        [--eap] [--eap-ig 4] [--acdc 0.01 ...] [--curve] [--plain] [--threads 1]
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ac_edges import build_hooked_transformer, circuitlang_name  # noqa: E402
from peer_io import DTYPES, script_parser, best_of, environment, logit_diff, read_prompts, set_threads, write_json  # noqa: E402

#: circuitlang's `discover.faithfulness.MIB_FRACTIONS` (this script cannot import circuitlang)
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def edge_counts(total: int) -> list[int]:
    """circuitlang's edge count at each MIB fraction (faithfulness.curve's rounding)."""
    return [max(1, min(total, int(round(f * total)))) for f in MIB_FRACTIONS]


def _loader(prompts):
    from auto_circuit.data import PromptDataLoader, PromptDataset

    ds = PromptDataset(prompts.clean, prompts.corrupt, list(prompts.answer[:, None]),
                       list(prompts.wrong[:, None]))
    return PromptDataLoader(ds, seq_len=None, diverge_idx=0, batch_size=prompts.batch, shuffle=False)


def _clear_grads(pm) -> None:
    for wrapper in pm.dest_wrappers:
        wrapper.patch_mask.grad = None


def _scores(edges, prune_scores) -> list[float]:
    return [float(e.prune_score(prune_scores)) for e in edges]


def _ld_of(logits, prompts) -> float:
    """Mean logit difference of last-token logits [B, V] (what `run_circuits` returns)."""
    return float(logit_diff(logits[:, None, :], prompts).mean())


def run(model_dir: str, prompts_path: str, out_path: str, *, dtype: str = "float32", eap: bool = False,
        eap_ig: int | None = None, taus: list[float] = (), curve: bool = False, plain: bool = False) -> dict:
    """Run what the flags ask for (module docstring) and write the JSON to `out_path`."""
    import torch
    from importlib.metadata import version

    import auto_circuit.prune_algos.ACDC as acdc_module
    from auto_circuit.prune import run_circuits
    from auto_circuit.prune_algos.ACDC import acdc_prune_scores
    from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores
    from auto_circuit.types import PatchType
    from auto_circuit.utils.graph_utils import patchable_model

    prompts = read_prompts(prompts_path)
    model, hf_gap = build_hooked_transformer(model_dir, DTYPES[dtype])
    plain_s = None
    if plain:
        with torch.no_grad():
            plain_s = best_of(lambda: model(prompts.clean), 3)
    pm = patchable_model(model, factorized=True, slice_output="last_seq", separate_qkv=True,
                         device=torch.device("cpu"))
    loader = _loader(prompts)
    batch_key = next(iter(loader)).key
    edges = sorted(pm.edges, key=lambda e: (e.dest.layer, e.dest.name, e.src.src_idx))
    index = {e: i for i, e in enumerate(edges)}
    payload: dict = {
        "environment": environment("auto-circuit", version("auto-circuit"))
        | {"transformer-lens": version("transformer-lens"), "transformers": version("transformers")},
        "model": str(model_dir), "dtype": dtype, "hooked_vs_hf_max_logit_gap": hf_gap,
        "shape": {"batch": prompts.batch, "tokens": prompts.tokens},
        "n_edges": len(edges), "plain_s": plain_s,
        "edges": [{"name": e.name, "sender": circuitlang_name(e.src.name, True),
                   "receiver": circuitlang_name(e.dest.name, False)} for e in edges],
    }
    eap_scores = None
    if eap or curve:
        _clear_grads(pm)
        start = time.perf_counter()
        eap_scores = mask_gradient_prune_scores(pm, loader, None, grad_function="logit",
                                                answer_function="avg_diff", mask_val=0.0)
        payload["eap"] = {"seconds": time.perf_counter() - start, "scores": _scores(edges, eap_scores)}
    if eap_ig is not None:
        _clear_grads(pm)
        start = time.perf_counter()
        ig = mask_gradient_prune_scores(pm, loader, None, grad_function="logit", answer_function="avg_diff",
                                        integrated_grad_samples=eap_ig)
        payload["eap_ig"] = {"samples": eap_ig, "seconds": time.perf_counter() - start,
                             "scores": _scores(edges, ig)}
    _clear_grads(pm)
    if curve:
        counts = edge_counts(len(edges))
        start = time.perf_counter()
        with torch.no_grad():
            outs = run_circuits(pm, loader, [0] + counts + [len(edges)], eap_scores, patch_type=PatchType.TREE_PATCH)
        seconds = time.perf_counter() - start
        missing = [c for c in [0] + counts + [len(edges)] if c not in outs]
        if missing:  # tied scores: run_circuits keys its outputs by the count it could keep
            raise RuntimeError(f"run_circuits kept other edge counts than {missing}")
        payload["curve"] = {"counts": counts, "seconds": seconds,
                            "logit_diff": [_ld_of(outs[c][batch_key], prompts) for c in counts],
                            "empty": _ld_of(outs[0][batch_key], prompts),
                            "full": _ld_of(outs[len(edges)][batch_key], prompts)}
    runs = []
    original_kl = acdc_module.multibatch_kl_div
    for tau in taus:
        faiths: list[float] = []

        def recording_kl(a, b, faiths=faiths):
            value = original_kl(a, b)
            faiths.append(float(value))
            return value

        # the order ACDC iterates: the same expression over the same set, in this process
        order = [index[e] for e in sorted(pm.edges, key=lambda x: x.dest.layer, reverse=True)]
        acdc_module.multibatch_kl_div = recording_kl
        try:
            start = time.perf_counter()
            scores = acdc_prune_scores(pm, loader, None, tao_exps=[0], tao_bases=[tau])
            seconds = time.perf_counter() - start
        finally:
            acdc_module.multibatch_kl_div = original_kl
        kept = [i for i, e in enumerate(edges) if e.prune_score(scores) == float("inf")]
        if len(faiths) != len(edges):
            raise RuntimeError(f"ACDC measured {len(faiths)} removals for {len(edges)} edges")
        entry = {"tau": tau, "seconds": seconds, "order": order, "faith": faiths, "kept": kept}
        with torch.no_grad():
            outs = run_circuits(pm, loader, [len(kept)], scores, patch_type=PatchType.TREE_PATCH)
        if len(kept) in outs:
            entry["logit_diff"] = _ld_of(outs[len(kept)][batch_key], prompts)
        runs.append(entry)
    if taus:
        payload["acdc"] = runs
    write_json(out_path, payload)
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--eap", action="store_true", help="EAP scores (mask gradients at mask 0)")
    parser.add_argument("--eap-ig", type=int, metavar="N", help="integrated gradients over N+1 mask values")
    parser.add_argument("--acdc", type=float, action="append", default=[], metavar="TAU",
                        help="run ACDC at this threshold (repeatable)")
    parser.add_argument("--curve", action="store_true", help="faithfulness curve of the EAP ranking")
    parser.add_argument("--plain", action="store_true", help="time the plain forward of the batch")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads {args.threads} must be at least 1")
    if args.eap_ig is not None and args.eap_ig < 1:
        parser.error(f"--eap-ig {args.eap_ig} must be at least 1")
    if any(t < 0 for t in args.acdc):
        parser.error("--acdc thresholds must be >= 0")
    set_threads(args.threads)
    run(args.model_dir, args.prompts, args.out, dtype=args.dtype, eap=args.eap, eap_ig=args.eap_ig,
        taus=args.acdc, curve=args.curve, plain=args.plain)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
