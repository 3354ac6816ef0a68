"""Benchmark the checker: a head-patching sweep vs TransformerLens, and scrubbing's cost.

Runs, on one model and one prompt set, side by side:

1. **Sweep**: activation patching of every head's output at END (the layer x head
   grid of `patch head * at END`), and at every position (`patch head * at all`),
   with circuitlang, beside its limit (below) and one plain pass, and the same sweeps with
   TransformerLens 4 (`transformer_lens.patching`, run by bench/peers/tl_patching.py
   in its own venv, .peers/tl; set up with bench/peers/setup.sh). Both results are
   compared, and the ratio of wall times recorded. The limit (issue 11) is what the
   END sweep must compute: each (head, prompt) row the layers from the head's up, at
   END only, timed as that share of a plain pass's token-layers (without the
   unembedding, which a logit difference needs two columns of).
2. **Scrubbing**: a causal-scrubbing check of a multi-level hypothesis, as a
   multiple of the plain forward passes of the same prompts it needs.

The model is GPT-2-shaped with random weights from a fixed seed (no hub: built
from a config), with the real GPT-2 tokenizer (tests/fixtures/gpt2_tokenizer), on
IOI prompts of one template length. Results go to bench/results/checker.json
(written atomically).

    python bench/bench_checker.py [--size small|medium] [--n 32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from circuitlang.checker import check  # noqa: E402
from circuitlang.experiments import Experiments  # noqa: E402
from circuitlang.models import load_model  # noqa: E402
from circuitlang.report import write_json_atomic  # noqa: E402
from circuitlang.sites import Head, Position  # noqa: E402
from circuitlang.tasks import load_task  # noqa: E402

SIZES = {
    "small": dict(n_layer=12, n_head=12, n_embd=768),  # GPT-2 small's shape
    "medium": dict(n_layer=6, n_head=8, n_embd=512),
}
TL_PYTHON = ROOT / ".peers" / "tl" / "bin" / "python"

HYPOTHESIS = """\
task ioi
metric logit_diff
head 5.1 at END depends on IO
head 3.2 at END depends on S
3.2 -> 5.1.q at END
1.0 -> 3.2.k at S2
"""


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def build(size: str, folder: Path):
    """Save a random GPT-2-shaped model with the GPT-2 tokenizer; return (model, tokenizer)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    fixture = ROOT / "tests" / "fixtures" / "gpt2_tokenizer"
    tok = GPT2TokenizerFast(str(fixture / "encoder.json"), str(fixture / "vocab.bpe"))
    torch.manual_seed(0)
    config = GPT2Config(**SIZES[size], n_positions=128)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return load_model(str(folder))


def one_length_prompts(task, n: int, seed: int):
    """n IOI prompts that all tokenize to the same length (TransformerLens's sweep needs it)."""
    prompts = task.prompts(8 * n, seed)
    lengths = prompts.attention_mask.sum(1)
    common = torch.mode(lengths).values
    idx = torch.nonzero(lengths == common).ravel()[:n]
    sub = prompts.subset(idx)
    width = int(common)
    return type(sub)(**{**{f: getattr(sub, f) for f in sub.__dataclass_fields__},
                        "input_ids": sub.input_ids[:, :width],
                        "attention_mask": sub.attention_mask[:, :width],
                        "corrupt_input_ids": sub.corrupt_input_ids[:, :width],
                        "corrupt_attention_mask": sub.corrupt_attention_mask[:, :width]})


def sweep(model, task, prompts, repeats: int) -> dict:
    shape = model.shape
    heads = [Head(l, h) for l in range(shape.n_layers) for h in range(shape.n_heads)]
    end = Position("END")
    result = {}

    def ours():
        exp = Experiments(model, task, prompts, "logit_diff", batch_size=256)
        result["grid"] = exp.activation_patching(heads, end, grid=(shape.n_layers, shape.n_heads))

    def ours_all():  # every head's output patched at every position
        exp = Experiments(model, task, prompts, "logit_diff", batch_size=256)
        result["grid_all"] = exp.activation_patching(heads, Position("all"), grid=(shape.n_layers, shape.n_heads))

    def plain():
        model.run(prompts.input_ids, prompts.attention_mask)

    def blocks_only():  # the same pass without the unembedding
        model.run(prompts.input_ids, prompts.attention_mask, logit_columns=torch.zeros(0, dtype=torch.long))

    out = {"circuitlang_sweep_s": best_of(ours, repeats), "plain_forward_s": best_of(plain, repeats),
           "plain_blocks_s": best_of(blocks_only, repeats)}
    n, t = prompts.input_ids.shape
    out["n_prompts"], out["n_heads"], out["tokens"] = n, len(heads), t
    # The limit (issue 11): each (head, prompt) row recomputes only the layers from the
    # head's up, at END (the last token) only; in token-layers, against a plain pass's.
    row_token_layers = n * sum(shape.n_layers - hd.layer for hd in heads)
    out["limit_s"] = row_token_layers / (n * t * shape.n_layers) * out["plain_blocks_s"]
    out["sweep_over_limit"] = out["circuitlang_sweep_s"] / out["limit_s"]
    out["sweep_over_plain_pass"] = out["circuitlang_sweep_s"] / out["plain_forward_s"]
    out["circuitlang_sweep_all_s"] = best_of(ours_all, repeats)
    out["circuitlang_values_all"] = result["grid_all"].values.tolist()
    out["circuitlang_values"] = result["grid"].values.tolist()
    return out


def tl_sweep(folder: Path, prompts, repeats: int) -> dict | None:
    """Run TransformerLens's sweep in its own venv; None if the venv is absent."""
    if not TL_PYTHON.exists():
        return None
    payload = {
        "clean": prompts.input_ids.tolist(),
        "corrupt": prompts.corrupt_input_ids.tolist(),
        "answer": prompts.answers[:, 0].tolist(),
        "wrong": prompts.wrong_answers[:, 0].tolist(),
        "position": int(prompts.positions["END"][0]),
    }
    with tempfile.TemporaryDirectory() as tmp:
        pfile, ofile = Path(tmp) / "prompts.json", Path(tmp) / "out.json"
        pfile.write_text(json.dumps(payload))
        cmd = [str(TL_PYTHON), str(ROOT / "bench" / "peers" / "tl_patching.py"), str(folder), str(pfile),
               str(ofile), "--repeats", str(repeats)]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
        if done.returncode != 0:
            return {"error": done.stderr[-2000:]}
        return json.loads(ofile.read_text())


def scrubbing(model, task, n: int, repeats: int) -> dict:
    """A check's wall time against the plain forward passes it runs."""
    prompts = task.prompts(n, 0)
    holder = {}

    def run_check():
        holder["r"] = check(HYPOTHESIS, model=model, task=task, n=n, permutations=0, breakdown=False,
                            max_examples=1, batch_size=256)

    def plain():
        model.run(prompts.input_ids, prompts.attention_mask)

    t_check = best_of(run_check, repeats)
    t_plain = best_of(plain, repeats)
    passes = holder["r"].passes
    return {"check_s": t_check, "plain_pass_s": t_plain, "passes": passes,
            "cost_vs_bare_passes": t_check / (passes * t_plain)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="medium")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "checker.json"))
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)  # the peer scripts pin one thread too: a like-for-like comparison
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        model = build(args.size, folder)
        task = load_task("ioi", tokenizer=model.tokenizer)
        prompts = one_length_prompts(task, args.n, 0)
        report = {"size": args.size, "shape": model.shape.describe(), "device": str(model.device),
                  "torch": torch.__version__, "threads": torch.get_num_threads()}
        report["sweep"] = sweep(model, task, prompts, args.repeats)
        tl = tl_sweep(folder, prompts, args.repeats)
        if tl is None:
            report["transformer_lens"] = "not run: .peers/tl is missing (bash bench/peers/setup.sh)"
        elif "error" in tl:
            report["transformer_lens"] = tl
        else:
            tl_time = tl["timing"]["head_sweep_pos"]
            ours = np.array(report["sweep"]["circuitlang_values"])
            theirs = np.array(tl["results"]["head_out_pos"])
            theirs_all = np.array(tl["results"]["head_out_all"])
            ours_all = np.array(report["sweep"]["circuitlang_values_all"])
            tl_all = tl["timing"]["head_sweep_all"]
            report["transformer_lens_all_positions"] = {
                "sweep_s": tl_all, "max_abs_diff": float(np.abs(ours_all - theirs_all).max()),
                "speedup": tl_all / report["sweep"]["circuitlang_sweep_all_s"]}
            report["transformer_lens"] = {
                "sweep_s": tl_time,
                "plain_forward_s": tl["timing"].get("plain_forward"),
                "max_abs_diff": float(np.abs(ours - theirs).max()),
                "speedup": tl_time / report["sweep"]["circuitlang_sweep_s"],
                "version": tl.get("environment"),
            }
        report["scrubbing"] = scrubbing(model, task, args.n, args.repeats)
    report["sweep"].pop("circuitlang_values")
    report["sweep"].pop("circuitlang_values_all")
    write_json_atomic(args.out, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
