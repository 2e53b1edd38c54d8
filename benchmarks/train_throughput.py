#!/usr/bin/env python
"""Training throughput: megablock's block-diffusion step vs a plain Hugging Face dense-mask loop.

    python benchmarks/train_throughput.py           # SmolLM2-135M architecture, L = 256 and 2048
    python benchmarks/train_throughput.py --quick   # 4 layers, L = 128 and 512 (a minute or two)

Model: the SmolLM2-135M architecture (LlamaForCausalLM: 30 layers, hidden 576, intermediate 1536,
9 heads / 3 KV heads, vocab 49152, tied embeddings, rope theta 100000), random weights, fp32.
The HF model is built from that config with attn_implementation="sdpa"; megablock's
BlockDiffusionLM gets the same weights through the llama conversion mappings. A stand-in mask
token id (the last vocabulary id) is used: nothing here is trained for real.

One training step = zero_grad + forward + loss + backward + AdamW step, micro-batch 1,
block-diffusion objective (context_causal, token shift, ELBO weights, AR loss weight 1) on the
same DiffusionBatch from build_batch for both contenders:
  - megablock : BlockDiffusionLM, attention impl "sdpa" (the exact CPU fast path), through the
                training objective (DiffusionObjective: logits only at loss positions, and the
                noised blocks with nothing masked left out of the forward, about 1 in B of them;
                --keep-unmasked-blocks carries all 2L positions);
  - HF dense  : the way existing adaptation code does it: LlamaForCausalLM on [xt ; x0] (2L
                tokens), position ids 0..L-1 twice, a 4D additive float mask [1, 1, 2L, 2L] built
                from megablock.diffusion.masks.dense_mask, loss = cross-entropy over the targets
                with the same weights and normalizers;
  - HF AR     : plain causal LlamaForCausalLM forward/backward on the L clean tokens with next-token
                cross-entropy: the floor any block-diffusion step is compared with.
Masks and batches are built outside the timed region (both contenders reuse theirs across
steps). Every contender steps torch's fused AdamW: megablock's trainer runs it
(megablock.training.optim), and it is HF Trainer's default optimizer with torch >= 2.8
(`adamw_torch_fused`). Both optimizers run with lr = 0: every AdamW operation still runs, but the weights stay
equal, so the two block-diffusion losses can be checked against each other at every step
(they differ only by megablock excluding the mask token from the softmax, ~1e-5).

Settings: L = 256 with B = 4 (the quickstart's sequence length), then L = 2048 with B = 16
(--blocks-long adds others, e.g. 4 16). Each setting's steps run interleaved (round-robin) so
load from other processes hits them alike. L = 256: one warm-up round (it also creates the
optimizer state), then --repeats rounds; L = 2048: --repeats-long rounds without warm-up
(each step takes tens of seconds; the optimizer state exists by then). Reported: clean tokens
per second = L / step time (best of the rounds; the median is shown too) and the ratio
megablock / HF dense; "cores" = CPU seconds / wall seconds of the fastest run (~2 when it had
both cores, less when other jobs took them: see benchmarks/common.py). After the timed rounds,
one more step of each contender measures its tensor peak: the most bytes held through torch's
CPU allocator during the step above what was alive before it (weights and optimizer state), from
torch.profiler's memory events (benchmarks/common.py). Issue targets: megablock / HF dense
>= 1.5x at L = 2048 and >= 1.2x at L = 256, in the median.

Prints a table, then one JSON object on the last line.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

from common import (  # noqa: E402
    MiB, init_single_process, interleaved, machine_note, peak_tensor_bytes, setup_cpu, stats, table,
)

TARGET = 1.5  # megablock / HF dense at the long L, in the median (issue 17)
TARGET_SHORT = 1.2  # at the short L (256, B = 4)

SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0,
    max_position_embeddings=8192, rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=0, eos_token_id=0,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="4 layers, L = 128 (B = 4) and 512 (B = 16)")
    p.add_argument("--layers", type=int, help="override the number of layers (default 30; 4 with --quick)")
    p.add_argument("--short", type=int, help="quickstart-like L (default 256; 128 with --quick)")
    p.add_argument("--long", type=int, help="long L (default 2048; 512 with --quick); 0 skips it")
    p.add_argument("--block-short", type=int, default=4)
    p.add_argument("--blocks-long", type=int, nargs="+", default=[16])
    p.add_argument("--repeats", type=int, default=3, help="timed rounds at the short L (after one warm-up)")
    p.add_argument("--repeats-long", type=int, default=3, help="timed rounds at the long L (no warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--loss", choices=["selected", "full"], default="selected",
                   help="megablock's loss: head at loss positions only (training's path) or at all positions")
    p.add_argument("--loss-chunk-tokens", type=int, default=8192)
    p.add_argument("--keep-unmasked-blocks", action="store_true",
                   help="train.drop_unmasked_blocks=false: megablock carries every noised block")
    p.add_argument("--compare-keep", action="store_true",
                   help="add a contender 'megablock B=..., all blocks' (train.drop_unmasked_blocks=false) "
                        "to the same interleaved rounds")
    p.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    p.add_argument("--profile", action="store_true",
                   help="torch.profiler op table (self CPU seconds) of one megablock and one HF dense step at the short L")
    p.add_argument("--no-memory", action="store_true",
                   help="skip the extra step per contender that measures its tensor peak")
    args = p.parse_args(argv)
    args.layers = args.layers or (4 if args.quick else SMOLLM2_135M["num_hidden_layers"])
    args.short = args.short or (128 if args.quick else 256)
    args.long = (512 if args.quick else 2048) if args.long is None else args.long
    return args


# ---------------------------------------------------------------------------------------------
# models


def build_models(layers: int):
    """(HF LlamaForCausalLM with SDPA, BlockDiffusionLM with the same weights, mask token id)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from megablock.checkpoint.loading import model_from_hf_tensors
    from megablock.checkpoint.mappings import get_family

    hf_cfg = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers})
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=torch.float32)
    hf.train()

    family = get_family("llama")
    cfg = family.model_config(hf_cfg, {})
    cfg.mask_token_id = cfg.vocab_size - 1  # stand-in: SmolLM2 has no mask token
    mb = model_from_hf_tensors(cfg, hf.state_dict().__getitem__)  # the library's in-memory conversion (a copy)
    mb.set_attention_impl("sdpa")
    mb.train()
    return hf, mb, cfg.mask_token_id


def make_batch(L: int, block_size: int, mask_id: int):
    import torch
    from megablock.diffusion.batch import build_batch

    x0 = torch.randint(0, mask_id, (1, L), generator=torch.Generator().manual_seed(L))
    return build_batch(x0, [0], block_size, mask_token_id=mask_id, attention="context_causal", seed=1)


def additive_dense_mask(layout):
    """4D additive float mask [b, 1, S, S] from the dense reference mask (0 allowed, min elsewhere)."""
    import torch
    from megablock.diffusion.masks import dense_mask

    allowed = dense_mask(layout)[:, None]
    return torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, torch.finfo(torch.float32).min)


# ---------------------------------------------------------------------------------------------
# training steps (each returns the loss)


def megablock_step(model, opt, batch, args=None):
    """--loss selected (default): the training objective (DiffusionObjective: head and CE at loss
    positions only, in --loss-chunk-tokens chunks, and the noised blocks without a masked token
    left out unless --keep-unmasked-blocks); full: logits at every position (the older path)."""
    from megablock.diffusion.loss import block_diffusion_loss
    from megablock.diffusion.loss import LossWeights
    from megablock.training.engine import DiffusionObjective

    selected = args is None or args.loss == "selected"
    chunk = 8192 if args is None else args.loss_chunk_tokens
    model.set_recompute("none" if args is None else args.recompute)
    objective = DiffusionObjective(model, LossWeights(1.0, chunk_tokens=chunk), drop_unmasked=args is None or not args.keep_unmasked_blocks)

    def step():
        opt.zero_grad(set_to_none=True)
        if selected:
            loss = objective(batch)[0]
        else:
            logits = model(batch.input_ids, batch.position_ids, batch.layout)
            loss = block_diffusion_loss(logits, batch.targets, batch.diff_weights, batch.ar_weights,
                                        batch.diff_normalizer, 1.0).loss
        loss.backward()
        opt.step()
        return loss.item()

    return step


def hf_dense_step(model, opt, batch, mask4d):
    import torch.nn.functional as F

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                       attention_mask=mask4d, use_cache=False).logits
        ce = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(),
                             reduction="none").view_as(batch.targets)
        diff = (ce * batch.diff_weights).sum() / batch.diff_normalizer
        ar = (ce * batch.ar_weights).sum() / batch.ar_weights.sum().clamp(min=1)
        loss = diff + 1.0 * ar
        loss.backward()
        opt.step()
        return loss.item()

    return step


def hf_ar_step(model, opt, x0):
    import torch.nn.functional as F

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=x0, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), x0[:, 1:].flatten())
        loss.backward()
        opt.step()
        return loss.item()

    return step


def recording(fn, losses: list):
    def run():
        losses.append(fn())
    return run


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_cpu(args.threads)
    init_single_process()
    import torch

    from megablock.diffusion.batch import drop_unmasked_blocks

    t0 = time.perf_counter()
    hf, mb, mask_id = build_models(args.layers)
    n_params = sum(p.numel() for p in hf.parameters())
    # lr = 0: identical work, weights stay equal (see the docstring).
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=0.0, weight_decay=0.01, fused=True)
    opt_mb = torch.optim.AdamW(mb.parameters(), lr=0.0, weight_decay=0.01, fused=True)
    print(f"model: SmolLM2-135M architecture, {args.layers} layers, {n_params / 1e6:.1f}M params, fp32, "
          f"random weights, micro-batch 1, torch's fused AdamW")
    print(f"machine: {machine_note()}")

    settings = [(args.short, [args.block_short], 1, args.repeats)]
    if args.long:
        settings.append((args.long, args.blocks_long, 0, args.repeats_long))

    rows, results, parity, profiles = [], {}, [], {}
    for L, blocks, warmup, repeats in settings:
        x0 = make_batch(L, 1, mask_id).input_ids  # the clean tokens (B = 1 batches are x0 only)
        fns, losses, carried = {}, {}, {}
        for B in blocks:
            batch = make_batch(L, B, mask_id)
            dropping = args.loss == "selected" and not args.keep_unmasked_blocks  # full logits carry 2L
            carried[B] = drop_unmasked_blocks(batch).layout.carried_len if dropping else 2 * L
            assert torch.equal(batch.input_ids[:, L:], x0)
            mask4d = additive_dense_mask(batch.layout)
            contenders = [(f"megablock B={B}", megablock_step(mb, opt_mb, batch, args))]
            if args.compare_keep and not args.keep_unmasked_blocks:
                keep = argparse.Namespace(**{**vars(args), "keep_unmasked_blocks": True})
                contenders.append((f"megablock B={B}, all blocks", megablock_step(mb, opt_mb, batch, keep)))
            contenders.append((f"HF dense B={B}", hf_dense_step(hf, opt_hf, batch, mask4d)))
            for name, fn in contenders:
                losses[name] = []
                fns[name] = recording(fn, losses[name])
        losses["HF AR"] = []
        fns["HF AR"] = recording(hf_ar_step(hf, opt_hf, x0), losses["HF AR"])
        cpu = {}
        times = interleaved(fns, repeats, warmup=warmup, before=lambda _n: gc.collect(), cpu=cpu)
        res = {}
        for name in fns:
            s = stats(times[name], cpu[name])
            res[name] = {**s, "tokens_per_s": L / s["min_s"], "tokens_per_s_median": L / s["median_s"],
                         "loss_first": losses[name][0]}
        if not args.no_memory:
            for name, fn in fns.items():
                gc.collect()
                res[name]["tensor_peak_mib"] = peak_tensor_bytes(fn) / MiB
        if args.profile and L == args.short:  # one profiled step at the long L costs a minute per contender
            from train_step import profile_ops

            B = blocks[-1]
            pair = {name: (fns[name], gc.collect) for name in (f"megablock B={B}", f"HF dense B={B}")}
            profiles[L] = profile_ops(None, pair, top=16)
        for B in blocks:
            h = res[f"HF dense B={B}"]
            for name in (f"megablock B={B}", f"megablock B={B}, all blocks"):
                if name in res:
                    res[name]["speedup_vs_hf_dense"] = res[name]["tokens_per_s"] / h["tokens_per_s"]
                    res[name]["speedup_vs_hf_dense_median"] = res[name]["tokens_per_s_median"] / h["tokens_per_s_median"]
            m = res[f"megablock B={B}"]
            diff = max(abs(a - b) for a, b in zip(losses[f"megablock B={B}"], losses[f"HF dense B={B}"]))
            parity.append({"L": L, "B": B, "max_abs_loss_diff": diff, "loss": m["loss_first"], "carried_tokens": carried[B]})
        ar = res["HF AR"]["tokens_per_s"]
        for name, r in res.items():
            rows.append({"L": L, "step": name, "min": r["min_s"], "median": r["median_s"], "tps": r["tokens_per_s"],
                         "tps_med": r["tokens_per_s_median"], "vs_ar": r["tokens_per_s"] / ar,
                         "cores": r["cores"], "vs_hf": r.get("speedup_vs_hf_dense"),
                         "vs_hf_med": r.get("speedup_vs_hf_dense_median"), "mem": r.get("tensor_peak_mib")})
        results[str(L)] = res
        print(f"L = {L} done ({time.perf_counter() - t0:.0f} s so far)", flush=True)

    print()
    print(table(rows, [("L", "L", "{}"), ("step", "step", "{}"), ("min s", "min", "{:.2f}"),
                       ("median s", "median", "{:.2f}"), ("cores", "cores", "{:.2f}"),
                       ("tok/s (best)", "tps", "{:.1f}"),
                       ("tok/s (median)", "tps_med", "{:.1f}"), ("x HF AR", "vs_ar", "{:.2f}"),
                       ("megablock / HF dense (best)", "vs_hf", "{:.2f}"),
                       ("(median)", "vs_hf_med", "{:.2f}"), ("tensor peak MiB", "mem", "{:.0f}")]))
    print("tokens/s = clean tokens L per step (micro-batch 1); the block-diffusion steps process 2L.")
    for p in parity:
        print(f"loss check L={p['L']} B={p['B']}: megablock {p['loss']:.5f}, max |megablock - HF dense| "
              f"over the steps {p['max_abs_loss_diff']:.2e}; megablock's forward carries {p['carried_tokens']} "
              f"of the {2 * p['L']} positions (train.drop_unmasked_blocks)")

    for L, text in profiles.items():
        print(f"\ntorch.profiler, one step each at L = {L} (self CPU seconds per op; ratio = HF dense / megablock):")
        print(text)
    target = []
    checks = [(args.short, args.block_short, TARGET_SHORT)]
    if args.long:
        checks.append((args.long, max(args.blocks_long), TARGET))
    for L, B, goal in checks:
        r = results[str(L)][f"megablock B={B}"]
        med, best = r["speedup_vs_hf_dense_median"], r["speedup_vs_hf_dense"]
        target.append({"L": L, "B": B, "median": med, "best": best, "target": goal, "met": med >= goal})
        print(f"target: megablock / HF dense at L = {L}, B = {B}: median {med:.2f}x, best {best:.2f}x "
              f"(median >= {goal}: {'met' if med >= goal else 'MISSED'})")
    print(f"total {time.perf_counter() - t0:.0f} s")
    print(json.dumps({
        "benchmark": "train_throughput", "model": "SmolLM2-135M architecture (random weights)",
        "layers": args.layers, "params": n_params, "threads": args.threads, "quick": args.quick,
        "results": results, "loss_parity": parity, "target": target,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
