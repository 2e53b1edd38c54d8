#!/usr/bin/env python
"""The release folder's remote code against megablock's samplers and HF generate, in one run.

    python benchmarks/remote_code.py --hf-dir DIR [--drafter DIR/drafter] [--max-new-tokens 32]

DIR: an exported folder (a trained one for real acceptance; default /work/runs/export_lr3e-4 if
it exists). A folder exported without remote code gets it in a scratch copy (weights linked, not
copied): the remote code is the same whatever the weights. Batch 1 (the first prompt) and batch 8
(eight different prompts), greedy, EOS ignored, so every row makes --max-new-tokens tokens:

  - megablock threshold / speculative: megablock.inference samplers on the folder (megablock's
    own model, fused QKV);
  - remote threshold / speculative: `block_generate` of
    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True), the same loops
    (block_rules) over the HF network;
  - HF generate: the same HF model's AR `generate(do_sample=False)`.

Tokens/s (new tokens of the batch / seconds; `--clock cpu`: this process's CPU seconds, which on
a shared machine other processes barely affect with --threads 1), best and median of --repeats
runs interleaved across the settings; `vs megablock`: remote time / megablock time per token (1.10 = 10% more).
Each remote row also checks that its tokens equal megablock's. Prints a table, then JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

from benchmarks.common import init_single_process, interleaved, stats, table  # noqa: E402

DEFAULT_DIR = Path("/work/runs/export_lr3e-4")
PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when",
    "Photosynthesis is the process by which plants",
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "To compute the area of a circle, you",
    "The main causes of the First World War were",
    "A good recipe for bread needs flour, water,",
    "In Python, a list comprehension is",
]


def with_remote_code(folder: Path, scratch: Path) -> Path:
    """`folder` itself when it carries remote code, else a scratch copy that does."""
    config = json.loads((folder / "config.json").read_text())
    if "auto_map" in config:
        return folder
    from megablock.checkpoint import release
    from megablock.checkpoint.mappings import family_for_hf_config

    out = scratch / folder.name
    out.mkdir(parents=True)
    for f in folder.iterdir():
        if f.is_file() and f.name != "config.json":
            os.symlink(f.resolve(), out / f.name)
    config["auto_map"] = release.write_remote_code(out, family_for_hf_config(config).hf_class)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hf-dir", type=Path, default=DEFAULT_DIR)
    p.add_argument("--drafter", type=Path, help="a gated drafter folder (decoded with it on both sides)")
    p.add_argument("--block-size", type=int, help="default: the folder's")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time, or this process's CPU time (with --threads 1: robust to other load)")
    args = p.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megablock.diffusion.block_rules import GenerateConfig, SpeculativeConfig
    from megablock.inference.loading import load
    from megablock.inference.speculative import speculative_sampler

    if args.threads:
        torch.set_num_threads(args.threads)
    init_single_process()
    scratch = Path(tempfile.mkdtemp(prefix="remote_code_bench_"))
    try:
        folder = with_remote_code(args.hf_dir, scratch)
        im = load(hf_dir=str(folder), drafter=str(args.drafter) if args.drafter else None)
        im.eos_token_ids = []
        hf = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, attn_implementation="sdpa").eval()
        if args.drafter:
            from peft import PeftModel

            hf = PeftModel.from_pretrained(hf, str(args.drafter)).eval()
            hf.use_drafter(str(args.drafter))
        tok = AutoTokenizer.from_pretrained(str(folder))
        B, n = args.block_size or hf.config.block_size, args.max_new_tokens
        rows, results = [], {}
        for batch in [int(b) for b in args.batches.split(",")]:
            prompts = [tok(t)["input_ids"] for t in (PROMPTS * 8)[:batch]]
            width = max(len(q) for q in prompts)
            ids = torch.tensor([[0] * (width - len(q)) + q for q in prompts])
            mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in prompts])
            common = dict(max_new_tokens=n, eos_token_id=[], pad_token_id=0)
            outs = {}

            def keep(name, fn):
                def run():
                    outs[name] = fn()
                return run

            fns = {
                "megablock threshold": keep("megablock threshold", lambda: im.sampler().generate(
                    prompts, GenerateConfig(block_size=B, max_new_tokens=n))),
                "remote threshold": keep("remote threshold", lambda: hf.block_generate(
                    ids, mask, block_size=B, mode="threshold", **common)),
                "megablock speculative": keep("megablock speculative", lambda: speculative_sampler(im).generate(
                    prompts, SpeculativeConfig(block_size=B, max_new_tokens=n))),
                "remote speculative": keep("remote speculative", lambda: hf.block_generate(
                    ids, mask, block_size=B, mode="speculative", **common)),
                "HF generate": keep("HF generate", lambda: hf.generate(
                    ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)),
            }
            cpu = {}
            with torch.inference_mode():
                times = interleaved(fns, args.repeats, cpu=cpu)
            if args.clock == "cpu":
                times = cpu
            for name, t in times.items():
                s = stats(t)
                row = {"batch": batch, "decoder": name, "best": batch * n / s["min_s"], "median": batch * n / s["median_s"]}
                out = outs[name]
                row["forwards"] = getattr(out, "forwards", None)
                if name.startswith("remote"):
                    twin = name.replace("remote", "megablock")
                    row["same_tokens"] = out.sequences.tolist() == outs[twin].padded().tolist()
                    row["vs_megablock"] = s["min_s"] / min(times[twin])
                rows.append(row)
                results[f"{batch}/{name}"] = {**row, **s}
        load_avg = os.getloadavg()
        print(f"{args.hf_dir} (B={B}, {n} new tokens per row, greedy, EOS ignored, {torch.get_num_threads()} threads, "
              f"{args.clock} clock, best/median of {args.repeats}, load average {load_avg[0]:.2f})")
        print(table(rows, [("batch", "batch", "{}"), ("decoder", "decoder", "{}"), ("tok/s best", "best", "{:.1f}"),
                           ("tok/s median", "median", "{:.1f}"), ("forwards", "forwards", "{}"),
                           ("time vs megablock", "vs_megablock", "{:.2f}"), ("same tokens", "same_tokens", "{}")]))
        print(json.dumps({"folder": str(args.hf_dir), "block_size": B, "max_new_tokens": n,
                          "threads": torch.get_num_threads(), "clock": args.clock, "load_average": [round(x, 2) for x in load_avg],
                          "results": results}))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
