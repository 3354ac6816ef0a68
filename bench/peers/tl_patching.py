"""TransformerLens 4 side of the agreement tests and the benchmark: activation patching.

Takes a local HF model folder (`make_model.py`), a prompts file (`peer_io.py`) and an
output path; gives a JSON file of patching results computed with TransformerLens's own
patching code (`transformer_lens.patching`) on a `TransformerBridge` booted from the
folder (raw HF numerics, no weight processing), plus wall-clock timings.

Convention: the *clean* prompts are the run being patched and the values come from the
*corrupt* run (TransformerLens's functions call these `corrupted_tokens` and
`clean_cache`; we pass clean ids and the corrupt cache). The metric is the logit
difference (answer - wrong) at the last position. Results, each as the batch mean and
per prompt (`..._per_prompt`, prompt index last):

* `head_out_pos[l][h]`: head (l, h)'s output (`hook_z`, equivalently `z @ W_O`) patched at
  the prompts' `position` only.
* `head_out_all[l][h]`: the same at every position (`get_act_patch_attn_head_out_all_pos`).
* `resid_pre_pos[l]`: the residual stream entering block l, patched at `position`.
* `mlp_out_pos[l]`, `mlp_out_all[l]`: MLP l's output at `position` / at every position.
* with `--path`: `path_{q,k,v}[sl][sh][dl][dh]`: direct path patching
  (`get_act_patch_direct_path_all_sources`): only the edge from head (sl, sh) into head
  (dl, dh)'s q/k/v input carries the corrupt value, at every position; 0 where dl <= sl.

Timings (`timing`, seconds, best of `--repeats` after a warm-up): `plain_forward` (one
batched forward), `head_sweep_pos` and `head_sweep_all` (the full sweep over every head).

Run inside the TransformerLens 4 venv::

    .peers/tl/bin/python bench/peers/tl_patching.py MODEL_DIR PROMPTS.json OUT.json [--path]
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

# Progress bars off (TransformerLens sweeps use tqdm); read when tqdm is first imported.
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peer_io import (  # noqa: E402
    DTYPES, script_parser, best_of, environment, logit_diff, read_prompts, set_threads, to_list, write_json,
)


def _per_prompt(result, shape: tuple[int, ...]):
    """(mean, per-prompt) lists from a TransformerLens `PatchingResult` with reduce='none'."""
    values = result.values.reshape(*shape, -1)
    return to_list(values.mean(-1)), to_list(values)


def run(model_dir: str, prompts_path: str, out_path: str, *, dtype: str = "float32",
        path: bool = False, timing: bool = True, repeats: int = 3) -> dict:
    """Compute every result listed in the module docstring and write them to `out_path`.

    Args:
        model_dir: a folder written by `save_pretrained` (GPT-2-shaped).
        prompts_path: the prompts file.
        out_path: where the JSON goes.
        dtype: "float32" or "float64" for the model's weights.
        path: also run direct path patching (one forward per head pair per channel).
        timing: also time the sweeps.
        repeats: timing repetitions (the best is kept).

    Returns:
        The payload written.
    """
    import pandas as pd
    import torch
    from importlib.metadata import version
    from transformer_lens import patching
    from transformer_lens.model_bridge import TransformerBridge

    torch.set_grad_enabled(False)
    prompts = read_prompts(prompts_path)
    bridge = TransformerBridge.boot_transformers(model_dir, device="cpu", dtype=DTYPES[dtype])
    bridge.eval()
    cfg = bridge.cfg
    n_layers, n_heads, pos = cfg.n_layers, cfg.n_heads, prompts.position
    clean, corrupt = prompts.clean, prompts.corrupt

    def metric(logits):
        return logit_diff(logits, prompts)

    clean_logits, clean_cache = bridge.run_with_cache(clean)
    corrupt_logits, corrupt_cache = bridge.run_with_cache(corrupt)

    def sweep(activation: str, setter, rows: list[tuple[int, ...]], columns: list[str]):
        index_df = pd.DataFrame(rows, columns=columns)
        return patching.generic_activation_patch(
            bridge, clean, corrupt_cache, metric, setter, activation, index_df=index_df, reduce="none"
        )

    head_pos_rows = [(l, pos, h) for l in range(n_layers) for h in range(n_heads)]

    def head_sweep_pos():
        return sweep("z", patching.layer_pos_head_vector_patch_setter, head_pos_rows, ["layer", "pos", "head_index"])

    def head_sweep_all():
        return patching.get_act_patch_attn_head_out_all_pos(bridge, clean, corrupt_cache, metric, reduce="none")

    layer_pos_rows = [(l, pos) for l in range(n_layers)]
    results: dict = {
        "clean_logit_diff": to_list(metric(clean_logits)),
        "corrupt_logit_diff": to_list(metric(corrupt_logits)),
    }
    results["head_out_pos"], results["head_out_pos_per_prompt"] = _per_prompt(head_sweep_pos(), (n_layers, n_heads))
    results["head_out_all"], results["head_out_all_per_prompt"] = _per_prompt(head_sweep_all(), (n_layers, n_heads))
    resid = sweep("resid_pre", patching.layer_pos_patch_setter, layer_pos_rows, ["layer", "pos"])
    results["resid_pre_pos"], results["resid_pre_pos_per_prompt"] = _per_prompt(resid, (n_layers,))
    mlp_pos = sweep("mlp_out", patching.layer_pos_patch_setter, layer_pos_rows, ["layer", "pos"])
    results["mlp_out_pos"], results["mlp_out_pos_per_prompt"] = _per_prompt(mlp_pos, (n_layers,))
    # TransformerLens's get_act_patch_mlp_out sweeps (layer, pos) one position at a time;
    # "every position" is one whole-sequence replacement per layer.
    mlp_all = sweep("mlp_out", _whole_tensor_setter, [(l,) for l in range(n_layers)], ["layer"])
    results["mlp_out_all"], results["mlp_out_all_per_prompt"] = _per_prompt(mlp_all, (n_layers,))
    if path:
        for component in ("q", "k", "v"):
            grid = patching.get_act_patch_direct_path_all_sources(
                bridge, clean, corrupt_cache, clean_cache, lambda lg: metric(lg).mean(),
                component=component, verbose=False,
            )
            results[f"path_{component}"] = to_list(grid)

    payload = {
        "environment": environment("transformer-lens", version("transformer-lens")),
        "model": str(model_dir),
        "dtype": dtype,
        "shape": {"n_layers": n_layers, "n_heads": n_heads, "d_model": cfg.d_model,
                  "batch": prompts.batch, "tokens": prompts.tokens},
        "position": pos,
        "results": results,
    }
    if timing:
        payload["timing"] = {
            "repeats": repeats,
            "plain_forward": best_of(lambda: bridge(clean), repeats),
            "head_sweep_pos": best_of(head_sweep_pos, repeats),
            "head_sweep_all": best_of(head_sweep_all, repeats),
            "forwards_per_sweep": n_layers * n_heads,
        }
    write_json(out_path, payload)
    return payload


def _whole_tensor_setter(corrupted_activation, index, clean_activation):
    """Replace the whole activation (every position) with the other run's value."""
    corrupted_activation[...] = clean_activation
    return corrupted_activation


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--path", action="store_true", help="also run direct path patching")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads {args.threads} must be at least 1")
    set_threads(args.threads)
    run(args.model_dir, args.prompts, args.out, dtype=args.dtype, path=args.path,
        timing=not args.no_timing, repeats=args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
