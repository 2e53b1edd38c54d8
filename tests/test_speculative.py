"""Self-speculative block decoding (megablock.inference.speculative): lossless against AR decoding
(the sampler at B = 1 and Hugging Face `generate`), forward accounting with a perfect drafter,
KV-cache rollback, the distribution under speculative sampling, tensor parallelism and the CLI.

Models are tiny random HF models with the output layer scaled up (peaked, varied distributions;
near-ties of the argmax, where two correct implementations could differ by rounding, are rare).
Their noised half is untrained, so its drafts are mostly wrong: the greedy tests also run a
drafter that is the AR continuation with some tokens corrupted, so blocks are kept whole, cut
at the first slot and cut in the middle, all within one run.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from dataclasses import replace

import pytest
import torch

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

from megablock.diffusion import block_rules  # noqa: E402
from megablock.inference.loading import from_hf_model, load  # noqa: E402
from megablock.inference.sampler import GenerateConfig  # noqa: E402
from megablock.inference.sampling import SamplingParams, filter_logits  # noqa: E402
from megablock.inference.speculative import (RowKVCache, SpeculativeConfig, SpeculativeSampler,  # noqa: E402
                                             speculative_sampler)
from megablock.parallel.state import initialize_parallel  # noqa: E402
from megablock.testing import (peaked_model, run_distributed, save_tiny_hf_model, speculative_configs,  # noqa: E402
                               tiny_hf_model)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MASK = 319  # an ordinary token of the tiny vocabulary, used as the mask for untrained models
PROMPTS = [list(range(20, 28)), [5, 6, 7], list(range(40, 53)), [101]]


@pytest.fixture(autouse=True)
def _parallel():
    initialize_parallel(1, 1)


def hf_greedy(hf, prompt, n, eos):
    x = torch.tensor([prompt])
    out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                      eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


class OracleSampler(SpeculativeSampler):
    """Drafts are the AR continuation `ref[row][i]`, except every `corrupt`-th one (counted over
    the whole run) is replaced by a wrong token; corrupt=None is a perfect drafter."""

    def __init__(self, *args, ref, corrupt=None, **kw):
        super().__init__(*args, **kw)
        self.ref, self.corrupt, self.count = ref, corrupt, 0

    def propose(self, rows, positions, drafts):
        out = []
        for r, pos in zip(rows, positions):
            row = []
            for p in pos:
                tok = self.ref[r][p] if p < len(self.ref[r]) else 0
                self.count += 1
                if self.corrupt and self.count % self.corrupt == 0:
                    tok = (tok + 1) % MASK
                row.append(tok)
            out.append(row)
        return out


def oracle(im, ref, corrupt=None):
    return OracleSampler(im.model, im.mask_token_id, im.eos_token_ids, im.pad_token_id, ref=ref, corrupt=corrupt)


# --- lossless: greedy speculative == AR greedy ------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_greedy_equals_ar_and_hf_generate(family):
    hf = peaked_model(family, seed=1)
    im = from_hf_model(hf, mask_token_id=MASK)
    n = 19
    ar = im.sampler().generate(PROMPTS, GenerateConfig(block_size=1, max_new_tokens=n)).tokens
    assert ar == [hf_greedy(hf, p, n, im.eos_token_ids) for p in PROMPTS]
    sampler = speculative_sampler(im)
    for cfg in speculative_configs(n):
        assert sampler.generate(PROMPTS, cfg).tokens == ar, cfg
        mixed = oracle(im, ar, corrupt=3).generate(PROMPTS, cfg)
        assert mixed.tokens == ar, cfg
        if cfg.block_size == 8 and cfg.branches == 1:  # the corrupted oracle cut blocks at several places and kept some whole
            hist = mixed.histogram()
            assert len(hist) >= 3 and mixed.mean_accepted > 0.5, hist


def test_refined_drafts_and_single_prompts():
    hf = peaked_model("qwen2", seed=2)
    im = from_hf_model(hf, mask_token_id=MASK)
    ar = im.sampler().generate(PROMPTS, GenerateConfig(block_size=1, max_new_tokens=12)).tokens
    sampler = speculative_sampler(im)
    for kw in (dict(draft_steps=3), dict(draft_threshold=0.5)):
        res = sampler.generate(PROMPTS, SpeculativeConfig(block_size=4, max_new_tokens=12, two_pass=True, **kw))
        assert res.tokens == ar
    for p, ref in zip(PROMPTS, ar):  # a batch of one row: no padding at all
        assert sampler.generate([p], SpeculativeConfig(block_size=8, max_new_tokens=12)).tokens == [ref]


def test_eos_inside_a_block_equals_hf_generate():
    hf = peaked_model("llama", seed=3)
    im = from_hf_model(hf, mask_token_id=MASK)
    im.eos_token_ids = []
    n, B = 24, 8
    free = im.sampler().generate(PROMPTS[:2], GenerateConfig(block_size=1, max_new_tokens=n)).tokens
    # A token first produced by row 0 at new-token index >= 3 and never by row 1: with a perfect
    # drafter it is a kept draft inside a verified block (the first one covers indices 1..7), so
    # the row stops in the middle of a block while row 1 runs on.
    eos = next(t for t in free[0][3:] if free[0].index(t) >= 3 and t not in free[1])
    im.eos_token_ids = [eos]
    expected = [hf_greedy(hf, p, n, eos) for p in PROMPTS[:2]]
    stop = free[0].index(eos)
    assert expected[0] == free[0][: stop + 1] and 1 <= stop % B
    assert expected[1] == free[1]
    for cfg in speculative_configs(n, (B,)):
        assert oracle(im, expected).generate(PROMPTS[:2], cfg).tokens == expected
        assert speculative_sampler(im).generate(PROMPTS[:2], cfg).tokens == expected


def test_exported_folder_equals_hf_generate(tmp_path):
    hf = save_tiny_hf_model(tmp_path / "hf", "qwen3", seed=4)
    im = load(hf_dir=tmp_path / "hf")
    im.mask_token_id = MASK  # a plain HF folder has none; any id serves an untrained drafter
    ref = [hf_greedy(hf, p, 10, im.eos_token_ids) for p in PROMPTS]
    got = speculative_sampler(im).generate(PROMPTS, SpeculativeConfig(block_size=4, max_new_tokens=10))
    assert got.tokens == ref


# --- accounting with a perfect drafter ------------------------------------------------------------------
def perfect_forwards(n, B, two_pass, layout):
    """Forwards for n new tokens per row when every draft is kept: the prefill yields the first
    token; then each block yields its D drafts plus the next AR token, the last block only what
    is left. Two-forward mode: a draft pass and a verify pass per block (D = B - 1), except a last
    block of one token, which needs no draft. One pass: one pass per block (D = B - 1, or B - 2 with
    the overlapping layout)."""
    if two_pass:
        rest = n - 1
        return 1 + 2 * math.ceil(rest / B) - (1 if rest % B == 1 else 0)
    D = B - (2 if layout == "overlap" else 1)
    return 1 + math.ceil((n - 1) / (D + 1))


def test_perfect_drafter_is_accepted_whole():
    hf = peaked_model("llama", seed=5)
    im = from_hf_model(hf, mask_token_id=MASK)
    im.eos_token_ids = []
    prompts, n = PROMPTS[:2], 20
    ar = im.sampler().generate(prompts, GenerateConfig(block_size=1, max_new_tokens=n)).tokens
    for cfg in speculative_configs(n):
        res = oracle(im, ar).generate(prompts, cfg)
        assert res.tokens == ar
        assert res.acceptance_rate == 1.0 and res.accepted == res.drafted
        want = perfect_forwards(n, cfg.block_size, cfg.two_pass, cfg.next_draft)
        assert res.forwards == want, cfg
        assert res.tokens_per_forward == pytest.approx(2 * n / want)  # two rows per forward
    # The formula itself, by hand: B = 4, 20 tokens: prefill 1, then 4+4+4+4+3.
    assert perfect_forwards(20, 4, True, "masked") == 1 + 2 * 5
    assert perfect_forwards(20, 4, False, "masked") == 1 + 5
    assert perfect_forwards(20, 4, False, "overlap") == 1 + 7  # blocks of 3: 3 * 6 + 1


# --- branches: next blocks for several outcomes of one verify pass ----------------------------------------
def test_each_branch_equals_its_block_drafted_alone():
    """A pass carrying m draft blocks (each after its own prefix of the verified tokens) gives each
    block the hidden states it gets as the only draft block of that pass: blocks see neither each
    other nor the append slots past their prefix, and their positions are their own."""
    im = from_hf_model(peaked_model("qwen2", seed=9), mask_token_id=MASK)
    s = speculative_sampler(im)
    prompts, B = [[3, 4, 5, 6, 7], [8, 9]], 4
    verified = [[10, 11, 12, 13], [14, 15, 16, 17]]  # pending token + three drafts per row
    bets = [[3, 0, 1], [3, 2, 0]]
    for overlap in (False, True):
        def pass_with(points):
            cache = RowKVCache(2, 64, s.device)
            s._forward(cache, prompts)
            cache.commit(torch.tensor([len(p) for p in prompts]))
            app, noise = s._forward(cache, verified, s._next_blocks(cache, verified, points, B, overlap))
            return app, noise.view(2, len(points[0]), B, -1)
        app, together = pass_with(bets)
        for j in range(3):
            alone_app, alone = pass_with([[row[j]] for row in bets])
            torch.testing.assert_close(together[:, j], alone[:, 0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(app, alone_app, atol=1e-5, rtol=1e-5)  # the verify slots never see drafts
        assert not torch.allclose(together[:, 0], together[:, 1], atol=1e-3)


def test_all_branches_give_every_pass_drafts():
    """With a next block for every possible count, every verify pass after the prefill has drafts
    whatever it kept (but for a last one with no room left); with one branch, a pass after a
    rejection has none. The untrained drafter's drafts are mostly rejected."""
    hf = peaked_model("llama", seed=4)
    im = from_hf_model(hf, mask_token_id=MASK)
    im.eos_token_ids = []
    prompt, n, B = [PROMPTS[0]], 24, 4
    ar = im.sampler().generate(prompt, GenerateConfig(block_size=1, max_new_tokens=n)).tokens
    sampler = speculative_sampler(im)
    one = sampler.generate(prompt, SpeculativeConfig(block_size=B, max_new_tokens=n))
    every = sampler.generate(prompt, SpeculativeConfig(block_size=B, max_new_tokens=n, branches=B))
    reuse = sampler.generate(prompt, SpeculativeConfig(block_size=B, max_new_tokens=n, reuse_drafts=True))
    assert one.tokens == every.tokens == reuse.tokens == ar
    assert one.histogram().get(0, 0) >= 3  # rejections happened
    assert len(one.drafted) < one.forwards - 3
    assert len(every.drafted) >= every.forwards - 2
    assert len(reuse.drafted) > len(one.drafted)


class RecordingSampler(SpeculativeSampler):
    """Records every pass's drafts with the new-token index of the first one."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.seen = []

    def propose(self, rows, positions, drafts):
        self.seen += [(r, pos[0], d) for r, pos, d in zip(rows, positions, drafts) if d]
        return drafts


def test_candidate_blocks_give_drafts_one_ahead_of_the_verifiers_token():
    """With candidates, a pass after a cut block verifies the drafts of a block that revealed the
    verifier's token whenever the drafter had ranked it among its next likeliest: exactly the
    two-forward layout's drafts for that state (one ahead of a known token). Without candidates
    the same states get the masked block's drafts (two ahead). A vocabulary of 8 tokens, so the
    untrained drafter's 3 next likeliest often hold the verifier's token."""
    hf = peaked_model("llama", seed=8, scale=4.0, vocab_size=V_TINY)
    im = from_hf_model(hf, mask_token_id=V_TINY - 1)
    im.eos_token_ids = []
    prompts, n, B = [[1, 2, 3, 4], [5, 0, 2]], 30, 4
    ar = im.sampler().generate(prompts, GenerateConfig(block_size=1, max_new_tokens=n)).tokens
    s = RecordingSampler(im.model, im.mask_token_id, im.eos_token_ids, im.pad_token_id)

    def drafts_alone(context, pending, revealed):
        """The drafts of one block after `context` whose first slot is `pending` (revealed) or masked."""
        cache = RowKVCache(1, 64, s.device)
        s._forward(cache, [context])
        cache.commit(torch.tensor([len(context)]))
        x = torch.full((1, B), im.mask_token_id)
        if revealed:
            x[0, 0] = pending
        _, hidden = s._forward(cache, [[]], (x, cache.lengths.cpu(), torch.zeros(1, dtype=torch.long)))
        return s._logits(hidden[0, : B - 1]).argmax(-1).tolist()

    kinds = {}
    for candidates, split in ((0, "even"), (3, "even"), (3, "likeliest")):
        s.seen = []
        cfg = SpeculativeConfig(block_size=B, max_new_tokens=n, branches=2, candidates=candidates,
                                candidate_split=split)
        assert s.generate(prompts, cfg).tokens == ar
        kinds[candidates, split] = []
        for r, at, drafts in s.seen:
            context, pending = prompts[r] + ar[r][: at - 1], ar[r][at - 1]
            one_ahead = drafts_alone(context, pending, revealed=True)[: len(drafts)]
            two_ahead = drafts_alone(context, pending, revealed=False)[: len(drafts)]
            assert drafts in (one_ahead, two_ahead), (candidates, r, at)
            if one_ahead != two_ahead:
                kinds[candidates, split].append(drafts == one_ahead)
    assert len(kinds[0, "even"]) >= 5 and not any(kinds[0, "even"])
    assert sum(kinds[3, "even"]) >= 3 and sum(kinds[3, "likeliest"]) >= 3, kinds


def test_likeliest_split_ranks_cut_and_token_pairs_by_the_drafters_odds():
    """The "likeliest" split's (slot, token) pairs against brute force: every pair of every next
    block scored as log q(token at k) + the log q of the drafts before k, best first; and the bets
    built from them: the masked bets, then the best pairs at the bet slots, the draft excluded."""
    torch.manual_seed(0)
    b, m, w, V, tops = 2, 3, 3, 7, 4
    logits = torch.randn(b, m, w, V) * 2
    drafts = torch.randint(0, V, (b, m, w))
    codes = block_rules.SpeculativeDecoder._ranked_pairs(logits, drafts, tops)
    logq = logits.log_softmax(-1)
    for i in range(b):
        for j in range(m):
            scored = []
            for k in range(w):
                before = sum(logq[i, j, x, drafts[i, j, x]].item() for x in range(k))
                scored += [(before + logq[i, j, k, c].item(), k, c) for c in logq[i, j, k].topk(tops).indices.tolist()]
            expected = [(k, c) for _, k, c in sorted(scored, key=lambda x: -x[0])]
            assert [divmod(x, V) for x in codes[i, j].tolist()] == expected
    d = [4, 1, 6]  # drafts of one row; alternatives ranked best first
    alts = [(0, 4), (1, 2), (0, 3), (2, 5), (0, 1), (1, 0), (1, 3)]
    counts, firsts = block_rules.SpeculativeDecoder._bets([d], 3, [alts], 2, "likeliest")
    assert list(zip(counts[0], firsts[0])) == [(3, None), (0, None), (1, None), (1, 2), (0, 3), (0, 1), (1, 0)]
    counts, firsts = block_rules.SpeculativeDecoder._bets([d], 3, [alts], 2, "even")
    assert list(zip(counts[0], firsts[0])) == [(3, None), (0, None), (1, None), (0, 3), (0, 1), (1, 2), (1, 0)]


# --- KV cache rollback ----------------------------------------------------------------------------------
def test_cache_after_rollback_equals_never_drafted():
    hf = peaked_model("qwen3", seed=6)
    im = from_hf_model(hf, mask_token_id=MASK)
    s = speculative_sampler(im)
    prompts = [[3, 4, 5, 6, 7], [8, 9]]
    block = [[10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]
    kept = [1, 3]  # row 0 keeps its first draft, row 1 three
    after = [[30, 31], [32, 33]]
    B = 4
    noised = lambda c, toks: (torch.full((2, B), MASK), c.lengths.cpu() + torch.tensor([len(t) for t in toks]),  # noqa: E731
                              torch.tensor([len(t) for t in toks]))

    def run(steps):
        cache = RowKVCache(2, 64, s.device)
        for toks, commit, draft in steps:
            hidden, _ = s._forward(cache, toks, noised(cache, toks) if draft else None)
            cache.commit(torch.tensor(commit))
        return cache, hidden

    # Drafted: the verify pass carries a draft block (scratch K/V) and rows roll back different amounts.
    a, ha = run([(prompts, [5, 2], True), (block, [1 + k for k in kept], True), (after, [2, 2], True)])
    # Never drafted: the prompt and the kept tokens in one causal pass, then the same last step.
    clean = [p + b[: 1 + k] for p, b, k in zip(prompts, block, kept)]
    c, hc = run([(clean, [len(t) for t in clean], False), (after, [2, 2], False)])
    assert a.lengths.tolist() == c.lengths.tolist() == [len(t) + 2 for t in clean]
    # Same K/V for every kept slot; different grouping of the same causal computation, so only
    # float rounding differs (fp32, values O(1)): 1e-5.
    for layer in a.k:
        for r, n in enumerate(c.lengths.tolist()):
            torch.testing.assert_close(a.k[layer][r, :, :n], c.k[layer][r, :, :n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(a.v[layer][r, :, :n], c.v[layer][r, :, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ha, hc, atol=1e-5, rtol=1e-5)  # and what the next pass computes


# --- sampling: the output distribution is the AR distribution -------------------------------------------
V_TINY = 8  # ids 0..6 are tokens, 7 is the mask (never sampled)


def exact_joint(hf, prompt, k, params):
    """P(first k new tokens) under AR sampling with `params`, for every k-tuple: [V] * k."""
    V = V_TINY
    seqs = torch.tensor([prompt])
    joint = torch.ones(1)
    for _ in range(k):
        with torch.no_grad():
            logits = hf(seqs).logits[:, -1, :V].float()
        logits[:, V - 1] = float("-inf")
        p = filter_logits(logits, params).softmax(-1)  # [n_prefixes, V]
        joint = (joint[:, None] * p).reshape(-1)
        seqs = torch.cat([seqs.repeat_interleave(V, 0), torch.arange(V).repeat(seqs.shape[0])[:, None]], 1)
    return joint


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson goodness of fit; cells expected below 5 are pooled into one."""
    n = counts.sum()
    expected = probs * n
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         torch.tensor(stat / 2.0, dtype=torch.float64)))


def sampled_joint(sampler, prompt, cfg, n_samples, k):
    res = sampler.generate([prompt] * n_samples, cfg)
    idx = torch.zeros(n_samples, dtype=torch.long)
    for j in range(k):
        idx = idx * V_TINY + torch.tensor([t[j] for t in res.tokens])
    return torch.bincount(idx, minlength=V_TINY ** k).double(), res


def test_speculative_sampling_matches_ar_distribution(monkeypatch):
    """The joint distribution of the first 3 new tokens (343 cells, 3,000 samples) against the
    exact AR probabilities, for each draft layout, and of tokens 3-5 for the layouts with branches
    and reused drafts. Each check raises a false alarm with probability 1e-3 (p-value threshold;
    seven checks, < 0.7% together); seeds are fixed, so the test is deterministic. Token 1 comes
    from the prefill; tokens 2 and 3 pass through draft acceptance and residual resampling."""
    hf = peaked_model("llama", seed=7, scale=4.0, vocab_size=V_TINY)
    im = from_hf_model(hf, mask_token_id=V_TINY - 1)
    im.eos_token_ids = []
    prompt, k, n = [1, 2, 3, 4], 3, 3000
    params = SamplingParams(temperature=0.9, top_k=5)
    probs = exact_joint(hf, prompt, k, params)
    sampler = speculative_sampler(im)
    for cfg in speculative_configs(k, (4,), sampling=params, seed=11):
        counts, res = sampled_joint(sampler, prompt, cfg, n, k)
        assert 0.1 < res.acceptance_rate < 0.9  # both branches of the rule are exercised
        assert chi_square_p(counts, probs) > 1e-3, cfg
    # The test has power: taking every draft (no acceptance test) samples the drafter's
    # distribution, which it must reject.
    def take_all(ar_logits, drafts, q, params, generator=None):
        p = filter_logits(ar_logits.float(), params).softmax(-1)
        return len(drafts), int(torch.multinomial(p[-1], 1, generator=generator))

    # Branches and reused drafts decide tokens 3-5 here (token 2 is the first verified draft).
    k5 = 5
    tail = exact_joint(hf, prompt, k5, params).view(V_TINY ** 2, V_TINY ** 3).sum(0)
    for cfg in speculative_configs(k5, (4,), sampling=params, seed=12):
        if cfg.branches == 1:
            continue
        res = sampler.generate([prompt] * n, cfg)
        idx = torch.zeros(n, dtype=torch.long)
        for j in range(2, k5):
            idx = idx * V_TINY + torch.tensor([t[j] for t in res.tokens])
        assert chi_square_p(torch.bincount(idx, minlength=V_TINY ** 3).double(), tail) > 1e-3, cfg
    monkeypatch.setattr(block_rules, "verify_drafts", take_all)
    cfg = SpeculativeConfig(block_size=4, max_new_tokens=k, two_pass=True, sampling=params, seed=11)
    counts, _ = sampled_joint(sampler, prompt, cfg, n, k)
    assert chi_square_p(counts, probs) < 1e-3


# --- tensor parallelism -----------------------------------------------------------------------------
def _tp_worker(rank, world, cfgs):
    initialize_parallel(tp=world, pp=1)
    im = from_hf_model(peaked_model("llama", seed=8), mask_token_id=MASK)
    im.eos_token_ids = []
    sampler = speculative_sampler(im)
    return [sampler.generate(PROMPTS[:3], c).tokens for c in cfgs]


def test_tp2_equals_ar():
    cfgs = [SpeculativeConfig(block_size=4, max_new_tokens=10),
            SpeculativeConfig(block_size=4, max_new_tokens=10, two_pass=True),
            SpeculativeConfig(block_size=4, max_new_tokens=10, sampling=SamplingParams(1.0, 20), seed=5),
            SpeculativeConfig(block_size=4, max_new_tokens=10, branches=4, candidates=2)]
    ranks = run_distributed(_tp_worker, 2, cfgs)
    assert ranks[0] == ranks[1]  # every TP rank made the same choices
    im = from_hf_model(peaked_model("llama", seed=8), mask_token_id=MASK)
    im.eos_token_ids = []
    ar = im.sampler().generate(PROMPTS[:3], GenerateConfig(block_size=1, max_new_tokens=10)).tokens
    assert ranks[0][0] == ar and ranks[0][1] == ar and ranks[0][3] == ar


# --- settings and CLI -------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [dict(block_size=0), dict(max_new_tokens=0), dict(next_draft="x"),
                                 dict(block_size=2, next_draft="overlap"), dict(draft_steps=2),
                                 dict(two_pass=True, draft_steps=2, sampling=SamplingParams(1.0)),
                                 dict(shift=False), dict(candidates=2), dict(branches=2, candidates=-1),
                                 dict(branches=2, candidates=2, next_draft="overlap"),
                                 dict(two_pass=True, candidates=2),
                                 dict(branches=2, candidate_split="likeliest"),
                                 dict(branches=2, candidates=2, candidate_split="widest")])
def test_bad_settings_raise(bad):
    sampler = speculative_sampler(from_hf_model(tiny_hf_model("llama"), mask_token_id=MASK))
    with pytest.raises(ValueError):
        sampler.generate([[1, 2]], SpeculativeConfig(**{"block_size": 4, **bad}))


def test_no_mask_token_decodes_only_at_block_size_1():
    hf = tiny_hf_model("llama")
    sampler = speculative_sampler(from_hf_model(hf))
    with pytest.raises(ValueError, match="mask token"):
        sampler.generate([[1, 2]], SpeculativeConfig(block_size=4))
    res = sampler.generate([[1, 2, 3]], SpeculativeConfig(block_size=1, max_new_tokens=6))
    assert res.tokens[0] == hf_greedy(hf, [1, 2, 3], 6, [0]) and res.forwards == len(res.tokens[0])


def test_cli_speculative_json(tmp_path):
    save_tiny_hf_model(tmp_path / "hf", "llama")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    outs = {}
    for mode, B in (("threshold", "1"), ("speculative", "1")):
        cmd = [sys.executable, os.path.join(ROOT, "tools", "generate.py"), "--hf-dir", str(tmp_path / "hf"),
               "--prompt", "To be, or not", "--max-new-tokens", "6", "--block-size", B, "--mode", mode, "--json"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT, env=env)
        assert proc.returncode == 0, proc.stderr
        outs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outs["speculative"]["text"] == outs["threshold"]["text"]
    assert {"mean_accepted", "accepted_histogram", "tokens_per_s"} <= set(outs["speculative"])


def test_evaluation_generation_reports_acceptance():
    from megablock.inference.evaluation import evaluate
    from megablock.inference.measure import decode

    hf = peaked_model("llama", seed=9)
    im = em = from_hf_model(hf, mask_token_id=MASK)
    windows = torch.arange(20, 20 + 4 * 16).view(4, 16)
    prompts = [windows[i, :8].tolist() for i in range(2)]
    ar = im.sampler().generate(prompts, GenerateConfig(block_size=1, max_new_tokens=10)).tokens
    greedy = SpeculativeConfig(block_size=4, max_new_tokens=10, sampling=SamplingParams(0.0))
    assert decode(em, prompts, greedy).tokens == ar
    r = evaluate(em, windows, 4, progress=False, generation=replace(greedy, sampling=SamplingParams(1.0)),
                 gen_prompts=2, gen_prompt_len=8)
    assert r["gen_mode"] == "speculative" and r["gen_verified_blocks"] > 0
    assert sum(r["gen_accepted_histogram"].values()) == r["gen_verified_blocks"]
    assert 0 <= r["gen_acceptance_rate"] <= 1 and "nelbo" in r


def test_measure_runs_every_decoder_on_the_same_prompts():
    """One record type for AR, threshold, speculative and HF generate: the lossless decoders
    reproduce the model's own AR tokens (and HF's greedy ones, the same weights), forwards add up
    over the prompts decoded one by one, and the acceptance numbers follow from the blocks."""
    from megablock.inference.measure import measure

    hf = peaked_model("llama", seed=9)
    em = from_hf_model(hf, mask_token_id=MASK)
    em.eos_token_ids = []  # fixed-length rows, as HF's min_new_tokens makes them
    n = 9
    configs = {"spec one pass": SpeculativeConfig(block_size=4, max_new_tokens=n),
               "spec two pass": SpeculativeConfig(block_size=4, max_new_tokens=n, two_pass=True),
               "threshold": GenerateConfig(block_size=4, max_new_tokens=n, threshold=0.9)}
    records = measure(em, PROMPTS, configs, max_new_tokens=n, hf_model=hf)
    assert set(records) == {"ar", "hf", *configs}
    ar = records["ar"]
    assert ar.mode == "ar" and ar.forwards == len(PROMPTS) * n and ar.tokens_per_forward == 1.0
    for name in ("ar", "hf", "spec one pass", "spec two pass"):
        assert records[name].identical_to_ar == len(PROMPTS), name
        assert [len(t) for t in records[name].tokens] == [n] * len(PROMPTS), name
    spec = records["spec one pass"]
    assert spec.mode == "speculative" and records["threshold"].mode == "threshold" and records["hf"].forwards is None
    assert sum(spec.histogram().values()) == len(spec.accepted) == len(spec.drafted) > 0
    assert spec.mean_accepted == sum(spec.accepted) / len(spec.accepted) <= 3
    single = speculative_sampler(em).generate([PROMPTS[0]], configs["spec one pass"])
    assert spec.row_forwards[0] == single.forwards and spec.tokens[0] == single.tokens[0]
