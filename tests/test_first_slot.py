"""`diffusion.first_slot_mask_prob`: training the draft layout of one-forward-per-block speculative
decoding, where the next block is drafted before its first token is known.

What a user relies on: off is bit-identical to the plain objective; on, only the inputs at some
block starts change (targets, weights and the rest of the noise stay exactly as they were, prompt
tokens of SFT data stay visible); and a training block with its first slot hidden is exactly
what the sampler's one-pass mode (`next_draft="masked"`) computes for the next block.
"""
from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

from megablock.config import ConfigError, DiffusionSection  # noqa: E402
from megablock.diffusion.batch import build_batch  # noqa: E402
from megablock.inference.loading import from_hf_model  # noqa: E402
from megablock.inference.speculative import RowKVCache, speculative_sampler  # noqa: E402
from megablock.parallel.state import initialize_parallel  # noqa: E402
from megablock.testing import tiny_hf_model  # noqa: E402

MASK = 319
FIELDS = ("position_ids", "targets", "diff_weights", "ar_weights")


def batch(prob, B=4, L=32, n=6, **kw):
    torch.manual_seed(0)
    x0 = torch.randint(5, 300, (n, L))
    return x0, build_batch(x0, torch.arange(100, 100 + n), B, DiffusionSection(first_slot_mask_prob=prob),
                           mask_token_id=MASK, seed=3, **kw)


@pytest.mark.parametrize("B", [2, 4, 8])
def test_only_inputs_at_block_starts_change(B):
    L = 32
    _, off = batch(0.0, B)
    _, on = batch(0.5, B)
    for name in FIELDS:
        assert torch.equal(getattr(off, name), getattr(on, name)), name
    assert on.diff_normalizer == off.diff_normalizer
    changed = off.input_ids != on.input_ids
    starts = torch.zeros(2 * L, dtype=torch.bool)
    starts[:L:B] = True  # block starts of the noised half
    assert not (changed & ~starts).any(), "only noised-half block starts may change"
    assert (on.input_ids[changed] == MASK).all()
    # Block starts are never masked by the ordinary noise, so every hidden one shows as a change;
    # about half of the 6 * L/B coins come up (a binomial with p = 1/2: 0.15 -> 0.85 is > 4 sigma).
    share = changed[:, :L].sum().item() / (6 * L // B)
    assert 0.15 < share < 0.85, share
    _, everything = batch(1.0, B)
    assert (everything.input_ids[:, :L:B] == MASK).all()


def test_off_is_the_plain_objective_and_the_stream_is_its_own():
    _, plain = batch(0.0)
    x0 = torch.randint(5, 300, (6, 32))
    default = build_batch(x0, torch.arange(100, 106), 4, DiffusionSection(), mask_token_id=MASK, seed=3)
    zero = build_batch(x0, torch.arange(100, 106), 4, DiffusionSection(first_slot_mask_prob=0.0),
                       mask_token_id=MASK, seed=3)
    for name in ("input_ids",) + FIELDS:
        assert torch.equal(getattr(default, name), getattr(zero, name)), name
    # The coins depend on (seed, sample index) only, not on the batch a sample lands in.
    samples, on = batch(0.5)
    again = build_batch(samples[3:4], torch.tensor([103]), 4,
                        DiffusionSection(first_slot_mask_prob=0.5), mask_token_id=MASK, seed=3)
    assert torch.equal(again.input_ids[0], on.input_ids[3])


def test_prompt_tokens_stay_visible():
    L, B = 32, 4
    x0 = torch.randint(5, 300, (4, L))
    resp = torch.zeros(4, L, dtype=torch.bool)
    resp[:, 13:] = True  # prompt 0..12: blocks 0-2 start on prompt tokens, block 3 on position 12
    out = build_batch(x0, torch.arange(4), B, DiffusionSection(first_slot_mask_prob=1.0), mask_token_id=MASK,
                      loss_mask=resp, doc_ids=torch.zeros(4, L, dtype=torch.long))
    xt = out.input_ids[:, :L]
    assert torch.equal(xt[:, :13], x0[:, :13]), "a prompt token was hidden"
    assert (xt[:, 16::B] == MASK).all(), "response block starts are hidden at prob 1"


@pytest.mark.parametrize("bad", [dict(first_slot_mask_prob=1.5), dict(first_slot_mask_prob=-0.1),
                                 dict(first_slot_mask_prob=0.5, shift=False),
                                 dict(first_slot_mask_prob=0.5, attention="full")])
def test_bad_settings_name_the_key(bad):
    with pytest.raises(ConfigError, match="first_slot_mask_prob"):
        DiffusionSection(**bad).check()


def test_training_layout_is_the_one_pass_draft_layout():
    """A noised block whose slots are all masks (first one hidden) after a clean prefix gives,
    in a training forward, the logits the sampler's one-pass mode computes for the next block."""
    initialize_parallel(1, 1)
    torch.manual_seed(0)
    im = from_hf_model(tiny_hf_model("llama", seed=1), mask_token_id=MASK)
    model, B, P = im.model.eval(), 4, 8
    prefix = torch.randint(5, 300, (1, P))
    x0 = torch.cat([prefix, torch.randint(5, 300, (1, B))], dim=1)
    train = build_batch(x0, torch.tensor([0]), B, DiffusionSection(first_slot_mask_prob=1.0), mask_token_id=MASK)
    ids = train.input_ids.clone()
    ids[0, P:P + B] = MASK  # the drafted block: every slot a mask (t = 1), its first slot hidden
    with torch.no_grad():
        want = model(ids, train.position_ids, train.layout)[0, P:P + B]

    sampler = speculative_sampler(im)
    cache = RowKVCache(1, P + 2 * B, torch.device("cpu"))
    tokens = [prefix[0].tolist()]  # pending + drafts of the verified block: the clean prefix
    with torch.no_grad():
        noised = sampler._next_blocks(cache, tokens, [[len(tokens[0]) - 1]], B, overlap=False)
        _, hidden = sampler._forward(cache, tokens, noised)
        got = model.head(hidden)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
