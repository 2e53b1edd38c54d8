#!/usr/bin/env python
"""How often a drafter's first draft would be right with k guesses instead of one.

    python studies/draft_coverage.py --ckpt CKPT --prompt-file HELDOUT.jsonl [--block-size 8] [--max-new-tokens 32]

Along the model's own greedy AR continuation of each prompt, at every position p it asks the
noised half for the block after the prefix x[:p], in the two shapes the speculative sampler
uses (megablock.inference.speculative):
- one pass (masked): the block's first slot, x[p], is masked too, so its first usable draft is
  x[p+1], two tokens past the last known one;
- two passes: the first slot is revealed (x[p], the token the verifier has just drawn), so the
  first draft, again x[p+1], is one token ahead.
It prints, for each shape, the share of positions where x[p+1] is among the draft distribution's
top k. Top 1 is the sampler's own first-draft acceptance along this trajectory; larger k is what a
token tree over the first draft (k candidates verified in the same forward) would keep. A
measurement of the drafter, not of a decoding layout: no such tree is built here.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megablock.cli import launched_parallel  # noqa: E402
from megablock.diffusion.block_rules import GenerateConfig, KVCache  # noqa: E402
from megablock.inference.distill import read_prompt_file  # noqa: E402
from megablock.inference.loading import load  # noqa: E402

TOPS = (1, 2, 3, 4, 8)


@torch.inference_mode()
def first_draft_ranks(sampler, trajectory: list, start: int, block: int, reveal_first: bool) -> list:
    """Rank of x[p+1] in the first draft's distribution, for every p from `start` on. One cache
    grows a token at a time; each block is a peek, whose K/V the next append overwrites."""
    cache = KVCache(1, len(trajectory) + block)
    sampler._hidden(cache, torch.tensor([trajectory[:start]]), torch.arange(start)[None], append=True)
    ranks = []
    for p in range(start, len(trajectory) - 1):
        ids = torch.full((1, block), sampler.mask_token_id)
        if reveal_first:
            ids[0, 0] = trajectory[p]
        hidden = sampler._hidden(cache, ids, torch.arange(p, p + block)[None], append=False)
        logits = sampler._logits(hidden[0, 0])  # with token shift, slot 0 predicts x[p+1]
        ranks.append(int((logits > logits[trajectory[p + 1]]).sum()))
        sampler._hidden(cache, torch.tensor([[trajectory[p]]]), torch.tensor([[p]]), append=True)
    return ranks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a checkpoint with a mask token (a gated drafter's run, say)")
    p.add_argument("--prompt-file", required=True)
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    args = p.parse_args(argv)
    im = load(ckpt=args.ckpt, parallel=launched_parallel())
    sampler = im.sampler()
    if sampler.mask_token_id is None:
        sys.exit(f"{args.ckpt} has no mask token: nothing drafts")
    prompts = [im.tokenizer(t)["input_ids"] for t in read_prompt_file(args.prompt_file)]
    greedy = sampler.generate(prompts, GenerateConfig(block_size=1, max_new_tokens=args.max_new_tokens)).tokens
    rows = []
    for name, reveal in (("one pass (first slot masked): x[p+1], two ahead", False),
                         ("two passes (first slot revealed): x[p+1], one ahead", True)):
        ranks = [r for prompt, new in zip(prompts, greedy)
                 for r in first_draft_ranks(sampler, list(prompt) + list(new), len(prompt), args.block_size, reveal)]
        rows.append({"shape": name, "positions": len(ranks),
                     **{f"top{k}": round(sum(r < k for r in ranks) / len(ranks), 3) for k in TOPS}})
    print("| first draft | positions | " + " | ".join(f"in top {k}" for k in TOPS) + " |")
    print("|---|---|" + "---|" * len(TOPS))
    for r in rows:
        print(f"| {r['shape']} | {r['positions']} | " + " | ".join(f"{r[f'top{k}']:.2f}" for k in TOPS) + " |")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
