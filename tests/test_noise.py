"""Noising, the DiffusionBatch contract, and the block-size curriculum."""
import math

import pytest
import torch

from megablock.config import DiffusionSection
from megablock.diffusion.batch import build_batch, document_ids
from megablock.diffusion.curriculum import Curriculum, Stage, stage_at
from megablock.diffusion.noise import draw_noise, sample_seed

M = 99  # mask token id in these tests


def x0_batch(b, L, vocab=90, seed=0):
    return torch.randint(0, vocab, (b, L), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ hand-worked example


def test_hand_worked_example_L8_B4_shift():
    """L=8, B=4, shift, context_causal, t fixed at 0.5 (clipped [0.5, 0.5], so w = 2)."""
    x0 = torch.arange(10, 18).view(1, 8)
    batch = build_batch(x0, [0], 4, mask_token_id=M, schedule="clipped", clip_min=0.5, clip_max=0.5, seed=0)
    # The draw for (seed 0, sample 0) masks positions 1, 3 and 6 (0 and 4 start blocks: never).
    assert batch.input_ids.tolist() == [[10, M, 12, M, 14, 15, M, 17] + list(range(10, 18))]
    assert batch.position_ids.tolist() == [list(range(8)) * 2]
    assert batch.targets.tolist() == [[
        # xt outputs: 0 -> x0[1] (masked), 1 -> x0[2] (visible: unused), 2 -> x0[3] (masked),
        # 3 = block end (next token starts block 1: predicted by the clean half), 4 -> x0[5]
        # visible, 5 -> x0[6] masked, 6 -> x0[7] visible, 7 = block end.
        11, 0, 13, 0, 0, 16, 0, 0,
        # clean half: next clean token; the last clean position has none.
        11, 12, 13, 14, 15, 16, 17, 0,
    ]]
    assert batch.diff_weights.tolist() == [[
        2, 0, 2, 0, 0, 2, 0, 0,
        # clean position 3 = bB-1 for b=1 predicts block 1's first token x0[4]: an AR step.
        0, 0, 0, 1, 0, 0, 0, 0,
    ]]
    assert batch.ar_weights.tolist() == [[0] * 8 + [1] * 7 + [0]]
    assert batch.diff_normalizer == 7.0  # b * (L - 1)
    assert batch.layout.mode == "context_causal" and batch.layout.seq_len == 8
    assert batch.layout.block_size == 4 and batch.layout.doc_ids is None
    assert batch.input_ids.dtype == torch.long and batch.diff_weights.dtype == torch.float32


def test_hand_worked_example_no_shift():
    """Same draw without shift: position 0 is now eligible too (masked: 0, 1, 3, 6) and a mask
    at j predicts x0[j]; the clean half only carries L_AR."""
    x0 = torch.arange(10, 18).view(1, 8)
    batch = build_batch(x0, [0], 4, mask_token_id=M, schedule="clipped", clip_min=0.5, clip_max=0.5,
                        shift=False, attention="block_causal", seed=0)
    assert batch.input_ids.tolist() == [[M, M, 12, M, 14, 15, M, 17] + list(range(10, 18))]
    assert batch.targets.tolist() == [[10, 11, 0, 13, 0, 0, 16, 0] + list(range(11, 18)) + [0]]
    assert batch.diff_weights.tolist() == [[2, 2, 0, 2, 0, 0, 2, 0] + [0] * 8]
    assert batch.ar_weights.tolist() == [[0] * 8 + [1] * 7 + [0]]
    assert batch.diff_normalizer == 8.0  # b * L
    assert batch.layout.mode == "block_causal" and batch.layout.block_size == 4


def test_block_size_one_with_shift_is_the_ar_batch():
    x0 = x0_batch(3, 8)
    batch = build_batch(x0, [0, 1, 2], 1, mask_token_id=M, complementary=True)
    assert batch.layout.mode == "ar" and batch.layout.total_len == 8
    assert torch.equal(batch.input_ids, x0)  # nothing masked, no complement copy
    assert torch.equal(batch.targets[:, :-1], x0[:, 1:]) and (batch.targets[:, -1] == 0).all()
    assert torch.equal(batch.diff_weights, batch.ar_weights)
    assert batch.ar_weights[:, :-1].eq(1).all() and batch.ar_weights[:, -1].eq(0).all()
    assert batch.diff_normalizer == 3 * 7
    # L_diff == L_AR for any logits (one CE over all S positions, as the trainer computes it).
    logits = torch.randn(3, 8, 100)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none").view(3, 8)
    l_diff = (batch.diff_weights * ce).sum() / batch.diff_normalizer
    l_ar = (batch.ar_weights * ce).sum() / batch.ar_weights.sum()
    assert torch.allclose(l_diff, l_ar)


def test_full_mode_hand_worked():
    """attention=full: xt only, the whole sequence is one block (one t; position 4 is masked
    although B=4 is passed), token 0 never masked, no L_AR."""
    x0 = torch.arange(10, 26).view(1, 16)
    batch = build_batch(x0, [0], 4, mask_token_id=M, attention="full", schedule="clipped",
                        clip_min=0.5, clip_max=0.5, seed=0)
    assert batch.layout.mode == "full" and batch.layout.block_size == 16
    assert batch.input_ids.tolist() == [[10, M, M, 13, M, 15, 16, M, 18, M, 20, 21, M, M, 24, M]]
    assert batch.position_ids.tolist() == [list(range(16))]
    assert batch.targets.tolist() == [[11, 12, 0, 14, 0, 0, 17, 0, 19, 0, 0, 22, 23, 0, 25, 0]]
    assert batch.diff_weights.tolist() == [[2, 2, 0, 2, 0, 0, 2, 0, 2, 0, 0, 2, 2, 0, 2, 0]]
    assert batch.ar_weights.eq(0).all() and batch.diff_normalizer == 15.0


# ------------------------------------------------------------------ contract invariants


@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("attention", ["context_causal", "block_causal"])
@pytest.mark.parametrize("B", [2, 4, 16])
def test_contract_invariants(shift, attention, B):
    b, L = 4, 32
    x0 = x0_batch(b, L)
    batch = build_batch(x0, torch.arange(b) + 100, B, mask_token_id=M, shift=shift, attention=attention)
    xt, clean = batch.input_ids[:, :L], batch.input_ids[:, L:]
    assert torch.equal(clean, x0)
    masked = xt == M
    assert torch.equal(torch.where(masked, x0, xt), x0)  # xt is x0 with masks only
    pos = torch.arange(L)
    if shift:
        assert not masked[:, pos % B == 0].any(), "block starts must stay visible with shift"
        assert torch.equal(batch.diff_weights[:, :L - 1] > 0, masked[:, 1:])
        assert batch.diff_weights[:, L - 1].eq(0).all()
        clean_diff = batch.diff_weights[:, L:]
        expected = ((pos + 1) % B == 0) & (pos < L - 1)
        assert torch.equal(clean_diff > 0, expected.expand(b, L)) and clean_diff[clean_diff > 0].eq(1).all()
        assert batch.diff_normalizer == b * (L - 1)
        assert torch.equal(batch.targets[:, :L - 1][masked[:, 1:]], x0[:, 1:][masked[:, 1:]])
    else:
        assert torch.equal(batch.diff_weights[:, :L] > 0, masked)
        assert batch.diff_weights[:, L:].eq(0).all() and batch.diff_normalizer == b * L
    unused = (batch.diff_weights == 0) & (batch.ar_weights == 0)
    assert batch.targets[unused].eq(0).all()
    assert batch.ar_weights[:, :L].eq(0).all() and batch.ar_weights[:, L:L + L - 1].eq(1).all()


def test_weights_are_inverse_mask_probability():
    b, L, B = 8, 64, 8
    for schedule in ("linear", "clipped", "position"):
        noise = draw_noise(torch.arange(b), L, B, DiffusionSection(schedule=schedule), seed=7)
        batch = build_batch(x0_batch(b, L), torch.arange(b), B, mask_token_id=M, schedule=schedule, seed=7)
        m = noise.masked[:, 1:]
        w = batch.diff_weights[:, :L - 1]
        assert torch.allclose(w[m].double(), 1.0 / noise.prob[:, 1:][m], rtol=1e-6)
        assert w[~m].eq(0).all()
        uniform = build_batch(x0_batch(b, L), torch.arange(b), B, mask_token_id=M, schedule=schedule,
                              seed=7, loss_weighting="uniform")
        assert uniform.diff_weights[:, :L - 1][m].eq(1).all()


def test_clipped_at_one_masks_every_draft_slot():
    """clip_min = clip_max = 1 (the drafter recipe, t = 1): every eligible slot is masked with
    weight 1, the pattern of a speculative draft block; with shift each block's first slot stays
    visible unless first_slot_mask_prob hides it."""
    b, L, B = 4, 64, 8
    settings = DiffusionSection(schedule="clipped", clip_min=1.0, clip_max=1.0)
    noise = draw_noise(torch.arange(b), L, B, settings, seed=3)
    assert torch.equal(noise.masked, noise.eligible) and noise.masked.sum() == b * L * (B - 1) // B
    batch = build_batch(x0_batch(b, L), torch.arange(b), B, settings, mask_token_id=M, seed=3)
    xt = batch.input_ids[:, :L]
    assert xt[:, torch.arange(L) % B != 0].eq(M).all() and not xt[:, ::B].eq(M).any()
    assert batch.diff_weights[:, :L][batch.diff_weights[:, :L] > 0].eq(1).all()


def test_diffusion_weights_are_unbiased_per_token():
    """E[sum diff_weights] = diff_normalizer: every target token counts once in expectation
    (w = 1/p on masked tokens, 1 on the AR steps).  Clipped t keeps the variance small: with
    p in [0.3, 0.8] each of ~n=4000*63 masked-token weights has std <= sqrt((1-p)/p) < 1.6, so
    the ratio's standard error is < 1.6/sqrt(n) ~ 0.003; we allow 0.02."""
    b, L = 4000, 64
    batch = build_batch(torch.zeros(b, L, dtype=torch.long), torch.arange(b), 8, mask_token_id=M,
                        schedule="clipped")
    assert abs(batch.diff_weights.sum().item() / batch.diff_normalizer - 1.0) < 0.02


# ------------------------------------------------------------------ schedules


def per_sample_rates(noise, positions=None):
    elig = noise.eligible if positions is None else noise.eligible & positions
    return (noise.masked & elig).sum(1).double() / elig.sum(1)


@pytest.mark.parametrize("schedule,antithetic,expected", [
    ("linear", False, (1 + 1e-3) / 2),
    ("linear", True, (1 + 1e-3) / 2),
    ("clipped", False, 0.55),
    ("clipped", True, 0.55),
    ("position", False, (1 + 1e-3) / 2),
])
def test_mask_rate_matches_schedule(schedule, antithetic, expected):
    """Mean mask rate over eligible tokens equals E[t].  Samples are independent (each has its
    own generator), so we compare with 5 standard errors of the per-sample rates (deterministic
    seeds: the test cannot flake; 5 SE would reject a correct sampler with prob. ~6e-7)."""
    n, L, B = 2000, 64, 8
    noise = draw_noise(torch.arange(n), L, B, DiffusionSection(schedule=schedule, antithetic=antithetic), seed=11)
    rates = per_sample_rates(noise)
    se = rates.std() / math.sqrt(n)
    assert abs(rates.mean().item() - expected) < 5 * se.item()
    lo, hi = (0.3, 0.8) if schedule == "clipped" else (1e-3, 1.0)
    if schedule != "position":
        p = noise.prob[noise.eligible]
        assert p.min() >= lo and p.max() <= hi


def test_antithetic_ratios_are_stratified():
    """With antithetic draws the blocks' ratios of a sample are one shifted grid of spacing
    (hi-lo)/nB: sorted, consecutive gaps are exactly that, in shuffled block order."""
    L, B = 64, 8
    noise = draw_noise(torch.arange(2000), L, B, DiffusionSection(schedule="clipped", antithetic=True), seed=1)
    t = noise.prob[:, 1::B]  # one eligible position per block carries t_b
    gaps = t.sort(dim=1).values.diff(dim=1)
    assert t.min() >= 0.3 and t.max() <= 0.8
    assert torch.allclose(gaps, torch.full_like(gaps, 0.5 / 8), atol=1e-9)
    assert not all(torch.equal(row, row.sort().values) for row in t[:10]), "blocks should be shuffled"
    # The per-sample mean ratio varies nB^2 times less than with independent draws: its variance
    # is (hi-lo)^2/(12 nB^2) against (hi-lo)^2/(12 nB); we ask for 4x less, well inside that.
    plain = draw_noise(torch.arange(2000), L, B, DiffusionSection(schedule="clipped"), seed=1).prob[:, 1::B]
    assert t.mean(1).var() < (plain.mean(1).var() / 4)


def test_position_schedule_tilts_towards_later_positions():
    """p_j(t) = t(1 + s(1-t) z_j): mean over the block is t, monotone in j, uniform at t=1.
    Expected first/last eligible rates: E[t] -/+ s E[t(1-t)] with t ~ U[eps, 1]."""
    n, L, B, s = 3000, 32, 8, 0.5
    noise = draw_noise(torch.arange(n), L, B, DiffusionSection(schedule="position", position_strength=s), seed=5)
    p = noise.prob.view(n, L // B, B)[:, :, 1:]  # eligible ranks j = 0..6
    t = p.mean(-1)
    assert (p.diff(dim=-1) >= 0).all()
    first_expected = 0.5 - s / 6  # E[t] = ~1/2, E[t(1-t)] = ~1/6
    last_expected = 0.5 + s / 6
    pos = torch.arange(L)
    for j, want in ((1, first_expected), (B - 1, last_expected)):
        rates = per_sample_rates(noise, (pos % B) == j)
        assert abs(rates.mean().item() - want) < 5 * rates.std().item() / math.sqrt(n) + 2e-3
    # With t := the block's mean probability, p_j = t(1 + s(1-t) z_j) holds exactly, i.e. the mean
    # over positions is t and the tilt shrinks to 0 as t -> 1.
    z = torch.linspace(-1, 1, B - 1, dtype=torch.float64)
    assert torch.allclose(p, t[..., None] * (1 + s * (1 - t[..., None]) * z), atol=1e-12)
    assert p.min() > 0 and p.max() <= 1


def test_complementary_masks_are_exact_complements():
    b, L, B = 6, 32, 4
    x0 = x0_batch(b, L)
    batch = build_batch(x0, torch.arange(b), B, mask_token_id=M, complementary=True, seed=2)
    assert batch.input_ids.shape == (2 * b, 2 * L) and batch.diff_normalizer == 2 * b * (L - 1)
    m1, m2 = batch.input_ids[:b, :L] == M, batch.input_ids[b:, :L] == M
    eligible = (torch.arange(L) % B != 0).expand(b, L)
    assert not (m1 & m2).any() and torch.equal(m1 | m2, eligible)
    noise = draw_noise(torch.arange(b), L, B, DiffusionSection(), seed=2)
    w2 = batch.diff_weights[b:, :L - 1][m2[:, 1:]].double()
    assert torch.allclose(w2, 1.0 / (1.0 - noise.prob[:, 1:][m2[:, 1:]]).clamp_min(1e-3), rtol=1e-6)
    assert torch.equal(batch.input_ids[b:, L:], x0) and torch.equal(batch.diff_weights[b:, L:], batch.diff_weights[:b, L:])


def test_noise_keyed_by_seed_and_global_index():
    L, B = 32, 4
    x0 = x0_batch(5, L)
    whole = build_batch(x0, [10, 11, 12, 13, 14], B, mask_token_id=M, seed=3)
    part = build_batch(x0[3:4], [13], B, mask_token_id=M, seed=3)
    assert torch.equal(whole.input_ids[3], part.input_ids[0])
    other = build_batch(x0, [10, 11, 12, 13, 14], B, mask_token_id=M, seed=4)
    assert not torch.equal(whole.input_ids, other.input_ids)
    assert len({sample_seed(s, i) for s in range(50) for i in range(200)}) == 50 * 200


def test_document_ids_from_eod():
    eod = 0
    x = torch.tensor([[5, 6, 0, 7, 0, 0, 8, 9]])
    assert document_ids(x, eod).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    batch = build_batch(x, [0], 4, mask_token_id=M, document_masking=True, eod_token_id=eod)
    assert batch.layout.doc_ids.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3]]
    with pytest.raises(ValueError, match="eod_token_id"):
        build_batch(x, [0], 4, mask_token_id=M, document_masking=True)


def test_batch_validation_messages():
    x = x0_batch(2, 8)
    with pytest.raises(ValueError, match="does not divide"):
        build_batch(x, [0, 1], 3, mask_token_id=M)
    with pytest.raises(ValueError, match="mask token"):
        build_batch(x, [0, 1], 4, mask_token_id=None)
    with pytest.raises(ValueError, match="schedule"):
        build_batch(x, [0, 1], 4, mask_token_id=M, schedule="cosine")
    with pytest.raises(ValueError, match="clip_min"):
        build_batch(x, [0, 1], 4, mask_token_id=M, schedule="clipped", clip_min=0.9, clip_max=0.2)
    with pytest.raises(ValueError, match="attention"):
        build_batch(x, [0, 1], 4, mask_token_id=M, attention="sliding")


# ------------------------------------------------------------------ curriculum


def test_curriculum_switches_at_token_counts():
    stages = [{"block_size": 1, "tokens": 100}, {"block_size": 4, "tokens": 50}, {"block_size": 16}]
    cur = Curriculum(stages, seq_len=32)
    assert cur.stage_at(0) == (0, 1) and cur.stage_at(99) == (0, 1)
    assert cur.stage_at(100) == (1, 4) and cur.stage_at(149) == (1, 4)
    assert cur.stage_at(150) == (2, 16) and cur.stage_at(10**12) == (2, 16)
    assert cur.next_switch(120) == 150 and cur.next_switch(150) is None
    assert stage_at(stages, 100) == (1, 4)
    bounded = Curriculum([Stage(1, 10), Stage(2, 10)])
    assert bounded.stage_at(25) == (1, 2)  # past the last stage's end: stays in it
    assert Curriculum([{"block_size": 2, "tokens": 1.0e3}, {"block_size": 4}]).stage_at(1000) == (1, 4)


@pytest.mark.parametrize("stages,seq_len,match", [
    ([], 32, "empty"),
    ([{"block_size": 0, "tokens": 10}], 32, r"stages\[0\]: block_size 0 must be a positive"),
    ([{"block_size": 1, "tokens": 10}, {"block_size": 3}], 32, r"stages\[1\]: block_size 3 does not divide data.seq_len 32"),
    ([{"block_size": 1}, {"block_size": 2}], 32, r"stages\[0\].*only the last stage may omit tokens"),
    ([{"block_size": 1, "tokens": -5}], 32, r"stages\[0\].*tokens -5 must be a positive"),
    ([{"block_size": 1, "token": 5}], 32, r"stages\[0\] has unknown keys \['token'\]"),
])
def test_curriculum_rejects_bad_stages(stages, seq_len, match):
    with pytest.raises(ValueError, match=match):
        Curriculum(stages, seq_len=seq_len)
