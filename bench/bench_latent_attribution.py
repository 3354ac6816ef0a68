"""Benchmark SAE splicing and latent-level attribution on a GPT-2-small-shaped model.

On one batch of IOI prompts, with an SAE of d_sae = 16 x d_model (12,288 latents for
GPT-2 small) at `resid 6`:

1. **Plain pass**: `LoadedModel.run` with nothing captured.
2. **Splice**: the same pass with the SAE spliced in (every latent and the error term
   captured, `AllLatents` + `SaeError`): its cost as a multiple of the plain pass, and
   a check that the logits are bit-identical.
3. **Attribution**: every latent and the error term scored at once at END
   (`circuitlang.models.attribution.attribute_nodes`): the passes it runs per batch
   (one corrupt forward, one clean forward + backward) and its wall time as a multiple
   of the plain pass.

The model is GPT-2-shaped with random weights from a fixed seed (built from a config,
with the real GPT-2 tokenizer from tests/fixtures); the SAE is random, saved in
SAELens's format and read back through the loader. Results go to
bench/results/latent_attribution.json (written atomically).

    python bench/bench_latent_attribution.py [--size small|medium] [--n 16] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_checker import SIZES, build, one_length_prompts  # noqa: E402
from circuitlang.models.attribution import attribute_nodes  # noqa: E402
from circuitlang.report import write_json_atomic  # noqa: E402
from circuitlang.sites import AllLatents, Dictionary, SaeError  # noqa: E402
from circuitlang.tasks import load_task  # noqa: E402


def save_sae(folder: Path, d_model: int, d_sae: int) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    save_file({"W_enc": torch.randn(d_model, d_sae, generator=g) / d_model ** 0.5,
               "b_enc": torch.randn(d_sae, generator=g) * 0.1 - 0.5,
               "W_dec": torch.randn(d_sae, d_model, generator=g) / d_sae ** 0.5,
               "b_dec": torch.zeros(d_model)}, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": d_model, "d_sae": d_sae, "architecture": "standard",
                                                 "apply_b_dec_to_input": True, "normalize_activations": "none"}))


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "latent_attribution.json"))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = build(args.size, Path(tmp) / "model")
        d_model = model.shape.d_model
        d_sae = args.expansion * d_model
        layer = min(args.layer, model.shape.n_layers - 1)
        save_sae(Path(tmp) / "sae", d_model, d_sae)
        sae = Dictionary("res", str(Path(tmp) / "sae"), "resid", layer, d_sae)
        task = load_task("ioi", tokenizer=model.tokenizer)
        prompts = one_length_prompts(task, args.n, 0)
        ids, mask = prompts.input_ids, prompts.attention_mask
        units = [AllLatents(sae), SaeError(sae)]
        with torch.no_grad():
            model.run(ids, mask, capture=units)  # reads the SAE once, warms up
            plain_s, plain = timed(lambda: model.run(ids, mask), args.repeats)
            splice_s, spliced = timed(lambda: model.run(ids, mask, capture=units), args.repeats)
        end = prompts.positions["END"]

        def metric(logits, rows):
            return task.metric("logit_diff", logits, prompts.subset(list(range(len(ids)))[rows]))

        attr_s, found = timed(lambda: attribute_nodes(model, ids, prompts.corrupt_input_ids, metric, units,
                                                      attention_mask=mask, positions=end,
                                                      batch_size=len(ids)), args.repeats)
        report = {
            "size": args.size, "shape": model.shape.describe(), "d_model": d_model, "d_sae": d_sae,
            "sae_at": f"resid {layer}", "prompts": len(ids), "tokens": int(ids.shape[1]),
            "device": str(model.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "plain_pass_s": plain_s,
            "splice_pass_s": splice_s,
            "splice_vs_plain": splice_s / plain_s,
            "splice_logits_identical": bool(torch.equal(spliced.logits, plain.logits)),
            "attribution_s": attr_s,
            "attribution_vs_plain": attr_s / plain_s,
            "attribution_passes_per_batch": found.passes,
            "nodes_scored": len(found.sites),
            "top_5": [[str(s), v] for s, v in found.top(5)],
        }
    write_json_atomic(args.out, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
