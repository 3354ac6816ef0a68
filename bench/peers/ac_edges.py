"""auto-circuit side of the agreement tests and the benchmark: ACDC-style edge patching.

Takes a local GPT-2-shaped HF model folder (`make_model.py`), a prompts file
(`peer_io.py`) and an output path; gives a JSON file with the logit difference of the
clean prompts when chosen sets of edges are ablated with the corrupt run's values, as
computed by auto-circuit's own machinery (`patchable_model`, `src_ablations`,
`patch_mode`) on a TransformerLens 2 `HookedTransformer` built from the folder's config
plus `convert_gpt2_weights` (no weight processing: no layer-norm folding, no centring,
no value-bias folding, so every node carries what it carries in the HF model).

The graph is auto-circuit's factorized one with separate q/k/v inputs. Each edge is
written out with its auto-circuit name and circuitlang's names for its two ends:

    Resid Start -> embed        A{l}.{h}   -> head l.h      MLP {l} (src)  -> mlp l
    A{l}.{h}.Q/K/V -> head l.h.q/k/v     MLP {l} (dest) -> mlp l     Resid End -> logits

An ablated edge gives its receiver `input - (sender's current output - sender's corrupt
output)`, with the receiver's layer norm applied afterwards (auto-circuit's
`PatchWrapper`). Edge sets reported (`results.sets`, each with the batch-mean and the
per-prompt logit difference):

* `none` (no edge ablated) and `all` (every edge ablated);
* with `--single`: every edge alone (`results.single`, aligned with `edges`);
* with `--random-sets N`: N random subsets (each edge kept with probability
  `--density`, seeded by `--seed`), listed by edge index;
* with `--edge-sets FILE`: named sets from a JSON object `{"name": [edge, ...]}`, each
  edge an auto-circuit name (`A0.1->A1.2.Q`) or circuitlang's (`head 0.1 -> head 1.2.q`).

All of the above is the `whole` section (an edge covers every token position). With
`--per-position` a second section, `per_position`, holds the graph where every edge
exists once per token position (auto-circuit's `seq_len`): its edges carry a `pos`,
and it reports `none`, `all` and `--position-sets N` random subsets.

Timings (each section's `timing`, seconds, best of `--repeats`): `plain_forward` (the unpatched
HookedTransformer), `patchable_forward` (wrapped, patching off), `full_mask_forward`
(wrapped, every edge ablated, including setting the masks edge by edge),
`all_ablated_forward_only` and `random_half_forward_only` (the patched forward alone,
masks set beforehand: every edge, or each edge with probability 1/2), `src_ablations`
(the corrupt run that collects the ablation values).

Run inside the auto-circuit venv::

    .peers/ac/bin/python bench/peers/ac_edges.py MODEL_DIR PROMPTS.json OUT.json [--single]
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_io import (  # noqa: E402
    DTYPES, script_parser, best_of, environment, logit_diff, read_prompts, set_threads, to_list, write_json,
)


def circuitlang_name(node_name: str, is_src: bool) -> str:
    """circuitlang's printed site for an auto-circuit node name (see the module docstring).

    Raises:
        ValueError: the name is not one auto-circuit gives a GPT-2 factorized graph.
    """
    if node_name == "Resid Start":
        return "embed"
    if node_name == "Resid End":
        return "logits"
    match = re.fullmatch(r"A(\d+)\.(\d+)(?:\.([QKV]))?", node_name)
    if match:
        layer, head, channel = match.groups()
        if (channel is None) != is_src:
            raise ValueError(f"unexpected {'source' if is_src else 'destination'} node {node_name!r}")
        return f"head {layer}.{head}" + ("" if channel is None else f".{channel.lower()}")
    match = re.fullmatch(r"MLP (\d+)", node_name)
    if match:
        return f"mlp {match.group(1)}"
    raise ValueError(f"unknown auto-circuit node {node_name!r}")


def build_hooked_transformer(model_dir: str, dtype):
    """A TransformerLens 2 HookedTransformer holding the folder's GPT-2 weights, unprocessed."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(model_dir, torch_dtype=dtype).eval()
    c = hf.config
    if c.model_type != "gpt2":
        raise ValueError(f"{model_dir}: model_type {c.model_type!r}; this script builds GPT-2 only")
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_heads=c.n_head,
        d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd,
        d_vocab=c.vocab_size,
        n_ctx=c.n_positions,
        act_fn=c.activation_function,
        eps=c.layer_norm_epsilon,
        normalization_type="LN",
        positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel",
        default_prepend_bos=False,
        dtype=dtype,
        device="cpu",
        # auto-circuit's factorized graph needs per-head results and split inputs.
        use_attn_result=True,
        use_split_qkv_input=True,
        use_hook_mlp_in=True,
    )
    model = HookedTransformer(cfg)
    state = convert_gpt2_weights(hf, cfg)
    model.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False, refactor_factored_attn_matrices=False,
    )
    model.eval()
    with torch.no_grad():
        probe = torch.arange(min(8, c.n_positions))[None] % c.vocab_size
        gap = (model(probe) - hf(probe).logits).abs().max().item()
    return model, gap


def graph_section(model_dir: str, prompts, *, dtype: str, per_position: bool, single: bool,
                  random_sets: int, density: float, seed: int, named_sets: dict[str, list[str]],
                  timing: bool, repeats: int) -> dict:
    """Build one patchable graph (whole-sequence or per-position) and evaluate edge sets on it.

    Returns:
        {"n_edges", "edges", "results", "hooked_vs_hf_max_logit_gap", "timing"?}.

    Raises:
        ValueError: a named set lists an edge the graph does not have.
    """
    import torch
    from auto_circuit.types import AblationType
    from auto_circuit.utils.ablation_activations import src_ablations
    from auto_circuit.utils.graph_utils import patch_mode, patchable_model, set_all_masks

    model, hf_gap = build_hooked_transformer(model_dir, DTYPES[dtype])
    clean, corrupt = prompts.clean, prompts.corrupt
    plain_forward = best_of(lambda: model(clean), repeats) if timing else None

    pm = patchable_model(
        model, factorized=True, slice_output=None, separate_qkv=True,
        seq_len=prompts.tokens if per_position else None, device=torch.device("cpu"),
    )
    edges = sorted(pm.edges, key=lambda e: (e.seq_idx or 0, e.dest.layer, e.dest.name, e.src.src_idx))
    described = []
    by_name: dict[str, int] = {}
    for i, e in enumerate(edges):
        sender, receiver = circuitlang_name(e.src.name, True), circuitlang_name(e.dest.name, False)
        entry = {"name": e.name, "sender": sender, "receiver": receiver}
        suffix = ""
        if per_position:
            entry["pos"] = e.seq_idx
            suffix = f" @ {e.seq_idx}"
        described.append(entry)
        by_name[e.name + suffix] = i
        by_name[f"{sender} -> {receiver}{suffix}"] = i

    ablations = src_ablations(pm, corrupt, AblationType.RESAMPLE)

    def forward(chosen) -> torch.Tensor:
        set_all_masks(pm, 0.0)
        for i in chosen:
            e = edges[i]
            e.patch_mask(pm).data[e.patch_idx] = 1.0
        with patch_mode(pm, ablations):
            logits = pm(clean)
        return logit_diff(logits, prompts)

    def evaluate(chosen) -> dict:
        values = forward(chosen)
        return {"mean": float(values.mean()), "per_prompt": to_list(values), "edges": list(chosen)}

    everything = range(len(edges))
    sets: dict[str, dict] = {"none": evaluate([]), "all": evaluate(everything)}
    sets["all"]["edges"] = "all"
    gen = torch.Generator().manual_seed(seed)
    for k in range(random_sets):
        keep = (torch.rand(len(edges), generator=gen) < density).nonzero().flatten().tolist()
        sets[f"random_{k}"] = evaluate(keep)
    for set_name, names in named_sets.items():
        unknown = [n for n in names if n not in by_name]
        if unknown:
            example = f"{edges[0].name!r} or {described[0]['sender']} -> {described[0]['receiver']!r}"
            raise ValueError(f"edge set {set_name!r}: unknown edges {unknown[:5]} (valid e.g. {example}"
                             f"{', with @ POS' if per_position else ''})")
        sets[set_name] = evaluate(sorted({by_name[n] for n in names}))
    results: dict = {"sets": sets}
    if single:
        results["single"] = [float(forward([i]).mean()) for i in everything]
    section = {
        "hooked_vs_hf_max_logit_gap": hf_gap,
        "n_edges": len(edges),
        "edges": described,
        "results": results,
    }
    if timing:
        section["timing"] = {
            "repeats": repeats,
            "plain_forward": plain_forward,
            "patchable_forward": best_of(lambda: pm(clean), repeats),
            "full_mask_forward": best_of(lambda: forward(everything), repeats),
            "src_ablations": best_of(lambda: src_ablations(pm, corrupt, AblationType.RESAMPLE), repeats),
        }
        # the forward pass alone, masks set beforehand: every edge ablated, then a random half
        set_all_masks(pm, 1.0)
        with patch_mode(pm, ablations):
            section["timing"]["all_ablated_forward_only"] = best_of(lambda: pm(clean), repeats)
        gen = torch.Generator().manual_seed(seed)
        for wrapper in pm.wrappers:
            if wrapper.is_dest:
                mask = wrapper.patch_mask
                mask.data = (torch.rand(mask.shape, generator=gen) < 0.5).to(mask.dtype)
        with patch_mode(pm, ablations):
            section["timing"]["random_half_forward_only"] = best_of(lambda: pm(clean), repeats)
        set_all_masks(pm, 0.0)
    return section


def run(model_dir: str, prompts_path: str, out_path: str, *, dtype: str = "float32",
        single: bool = False, random_sets: int = 0, density: float = 0.1, seed: int = 0,
        edge_sets: str | None = None, per_position: bool = False, position_sets: int = 0,
        position_density: float = 0.02, timing: bool = True, repeats: int = 3) -> dict:
    """Compute the edge-patching results in the module docstring and write them to `out_path`.

    Args:
        model_dir: a GPT-2 folder written by `save_pretrained`.
        prompts_path: the prompts file.
        out_path: where the JSON goes.
        dtype: "float32" or "float64".
        single: also ablate every edge alone (whole-sequence graph).
        random_sets: random edge subsets to evaluate on the whole-sequence graph.
        density: probability each edge is in a random subset.
        seed: seed for the random subsets.
        edge_sets: JSON file of named edge sets (whole-sequence graph).
        per_position: also build the per-position graph (`per_position` section).
        position_sets: random subsets to evaluate on the per-position graph.
        position_density: probability each per-position edge is in one of those subsets.
        timing: also time the forwards.
        repeats: timing repetitions (the best is kept).

    Returns:
        The payload written: `whole` (and `per_position`) sections as `graph_section` gives.

    Raises:
        ValueError: an edge set names an edge the graph does not have.
    """
    import torch
    from importlib.metadata import version

    torch.set_grad_enabled(False)
    prompts = read_prompts(prompts_path)
    named = json.loads(Path(edge_sets).read_text()) if edge_sets else {}
    payload = {
        "environment": environment("auto-circuit", version("auto-circuit"))
        | {"transformer-lens": version("transformer-lens"), "transformers": version("transformers")},
        "model": str(model_dir),
        "dtype": dtype,
        "shape": {"batch": prompts.batch, "tokens": prompts.tokens},
        "whole": graph_section(model_dir, prompts, dtype=dtype, per_position=False, single=single,
                               random_sets=random_sets, density=density, seed=seed,
                               named_sets=named, timing=timing, repeats=repeats),
    }
    if per_position:
        payload["per_position"] = graph_section(
            model_dir, prompts, dtype=dtype, per_position=True, single=False,
            random_sets=position_sets, density=position_density, seed=seed + 1, named_sets={},
            timing=timing, repeats=repeats,
        )
    write_json(out_path, payload)
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--single", action="store_true", help="ablate every edge alone")
    parser.add_argument("--random-sets", type=int, default=0, metavar="N")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--edge-sets", metavar="FILE", help='JSON {"name": [edge, ...]}')
    parser.add_argument("--per-position", action="store_true",
                        help="also build the per-position graph (one edge per token position)")
    parser.add_argument("--position-sets", type=int, default=0, metavar="N",
                        help="random subsets to evaluate on the per-position graph")
    parser.add_argument("--position-density", type=float, default=0.02)
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads {args.threads} must be at least 1")
    set_threads(args.threads)
    for flag, value in (("--density", args.density), ("--position-density", args.position_density)):
        if not 0.0 <= value <= 1.0:
            parser.error(f"{flag} {value} must be between 0 and 1")
    try:
        run(args.model_dir, args.prompts, args.out, dtype=args.dtype, single=args.single,
            random_sets=args.random_sets, density=args.density, seed=args.seed,
            edge_sets=args.edge_sets, per_position=args.per_position,
            position_sets=args.position_sets, position_density=args.position_density, timing=not args.no_timing, repeats=args.repeats)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
