"""Forward noising for block diffusion: which tokens of x0 become masks, and with what probability.

Every (sample, block) gets its own mask ratio t_b and each *eligible* token of the block is masked
independently with probability p (p = t_b, or a per-position tilt of t_b for the `position`
schedule). With token shift the first token of every block is not eligible: it is predicted by the
clean half (an AR step), so it must stay visible.

Randomness is keyed by (seed, global sample index): each sample gets its own `torch.Generator`,
so a sample's noise does not depend on which rank draws it, on the micro-batch it lands in, or on
whether training was resumed. The draw order inside a sample is fixed: block ratios first, then one
uniform per position; a token is masked when its uniform is below its probability.

Schedules (`t` range [lo, hi]):
  - ``linear``: t ~ U[eps, 1]  (the NELBO's own t, truncated at eps so 1/t stays finite).
  - ``clipped``: t ~ U[clip_min, clip_max]  (BD3-LM: drops the extreme, high-variance ratios).
  - ``position``: t ~ U[eps, 1], then inside a block the probability of the eligible position of
    rank j (0..n-1) is  p_j(t) = t * (1 + s * (1 - t) * z_j),  z_j = 2j/(n-1) - 1 in [-1, 1].
    Mean over j is exactly t (z has mean 0); p_j increases with j (later positions are masked more);
    the tilt s*(1-t) vanishes as t -> 1 (uniform) and is largest at small t, where the last
    position is masked (1+s)/(1-s) times as often as the first.  0 <= p_j <= 1 for s <= 1; the
    default s = 0.5 keeps p_j >= t/2, so the 1/p weight is at most 2/t.

Antithetic (stratified) ratios, any schedule: one u ~ U[0,1) per sample and
t_b = lo + (hi - lo) * ((u + pi(b)/nB) mod 1), where pi is a random permutation of the blocks drawn
from the same generator.  Each t_b is still U[lo, hi], the sample's ratios cover the range evenly
(lower variance of the per-sample loss), and the shuffle keeps the ratio uncorrelated with the
block's position (without it, t would rise cyclically along the sequence).

Complementary masking is done by the batch builder from the probabilities returned here
(`complement`): the second copy masks exactly the eligible tokens the first left visible, each with
probability q = 1 - p.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megablock.config import DiffusionSection

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, sample_index: int) -> int:
    """A 63-bit generator seed for one (seed, global sample index) pair.

    Hashing both (rather than seed + index) keeps different seeds from sharing streams shifted by a
    few samples."""
    return _splitmix64(_splitmix64(int(seed) & _MASK64) ^ (int(sample_index) & _MASK64)) >> 1


def sample_generator(seed: int, sample_index: int) -> torch.Generator:
    """The CPU generator that draws all of one sample's noise."""
    g = torch.Generator()
    g.manual_seed(sample_seed(seed, sample_index))
    return g


def hidden_first_slots(sample_indices, seq_len: int, block_size: int, prob: float, seed: int = 0) -> torch.Tensor:
    """bool [b, L]: block starts whose input is hidden (`diffusion.first_slot_mask_prob`), one coin
    per (sample, block). The stream is its own (a derived seed), so turning the option on leaves
    every sample's masks exactly as they were."""
    indices = [int(i) for i in torch.as_tensor(sample_indices).flatten().tolist()]
    nb = seq_len // block_size
    hidden = torch.zeros(len(indices), seq_len, dtype=torch.bool)
    derived = _splitmix64(int(seed) & _MASK64) ^ 0x46495253545F534C  # "FIRST_SL": not the noise's seed
    for row, idx in enumerate(indices):
        coins = torch.rand(nb, generator=sample_generator(derived, idx), dtype=torch.float64) < prob
        hidden[row, ::block_size] = coins
    return hidden


def schedule_range(settings: DiffusionSection) -> tuple[float, float]:
    """[lo, hi] of the mask ratio t (the section validated the values when it was built)."""
    if settings.schedule == "adaptive":
        raise ValueError("schedule 'adaptive' has no fixed range: the trainer resolves it to a clipped "
                         "interval (megablock.training.schedule_search) before drawing noise")
    if settings.schedule == "clipped":
        return float(settings.clip_min), float(settings.clip_max)
    return float(settings.eps), 1.0


def block_ratios(g: torch.Generator, num_blocks: int, lo: float, hi: float, antithetic: bool) -> torch.Tensor:
    """t_b for the blocks of one sample, float64 [num_blocks]."""
    if antithetic:
        u = torch.rand(1, generator=g, dtype=torch.float64)
        perm = torch.randperm(num_blocks, generator=g).to(torch.float64)
        frac = torch.remainder(u + perm / num_blocks, 1.0)
    else:
        frac = torch.rand(num_blocks, generator=g, dtype=torch.float64)
    return lo + (hi - lo) * frac


def position_tilt(num_eligible: int) -> torch.Tensor:
    """z_j = 2j/(n-1) - 1 in [-1, 1] (mean 0) for the `position` schedule; zeros when n <= 1."""
    if num_eligible <= 1:
        return torch.zeros(max(num_eligible, 0), dtype=torch.float64)
    return torch.linspace(-1.0, 1.0, num_eligible, dtype=torch.float64)


@dataclass
class Noise:
    """One batch's masking decision.

    masked: bool [b, L], True where x0's token is replaced by the mask token.
    prob: float64 [b, L], the probability with which that position was (or could have been) masked;
          0 at positions that are never masked (not eligible).
    eligible: bool [b, L], positions that may be masked (all but each block's first with shift).
    """

    masked: torch.Tensor
    prob: torch.Tensor
    eligible: torch.Tensor

    def complement(self) -> "Noise":
        """The inverted mask over eligible positions, with its own probabilities q = 1 - p."""
        return Noise(
            masked=self.eligible & ~self.masked,
            prob=torch.where(self.eligible, 1.0 - self.prob, torch.zeros_like(self.prob)),
            eligible=self.eligible,
        )


def eligible_positions(seq_len: int, block_size: int, shift: bool) -> torch.Tensor:
    """bool [L]: positions that may be masked (with shift, all but the first of each block)."""
    pos = torch.arange(seq_len)
    if shift:
        return pos % block_size != 0
    return torch.ones(seq_len, dtype=torch.bool)


def draw_noise(sample_indices, seq_len: int, block_size: int, settings: DiffusionSection, seed: int = 0) -> Noise:
    """Draw the masks of a batch of samples identified by their global sample indices, with the
    schedule, eps / clip range, antithetic, shift and position_strength of `settings`.

    `block_size` = seq_len gives one ratio per sample (the `full` baseline)."""
    if seq_len % block_size:
        raise ValueError(f"block size {block_size} does not divide sequence length {seq_len}")
    lo, hi = schedule_range(settings)
    indices = [int(i) for i in torch.as_tensor(sample_indices).flatten().tolist()]
    nb = seq_len // block_size
    ratios = torch.empty(len(indices), nb, dtype=torch.float64)
    uniforms = torch.empty(len(indices), seq_len, dtype=torch.float64)
    for row, idx in enumerate(indices):
        g = sample_generator(seed, idx)
        ratios[row] = block_ratios(g, nb, lo, hi, settings.antithetic)
        uniforms[row] = torch.rand(seq_len, generator=g, dtype=torch.float64)

    eligible = eligible_positions(seq_len, block_size, settings.shift)
    t = ratios.repeat_interleave(block_size, dim=1)  # [b, L]
    if settings.schedule == "position":
        n = block_size - 1 if settings.shift else block_size
        z_block = torch.zeros(block_size, dtype=torch.float64)
        z_block[eligible[:block_size]] = position_tilt(n)
        z = z_block.repeat(nb)  # [L]
        prob = t * (1.0 + settings.position_strength * (1.0 - t) * z)
    else:
        prob = t
    prob = torch.where(eligible, prob, torch.zeros_like(prob))
    masked = (uniforms < prob) & eligible
    return Noise(masked=masked, prob=prob, eligible=eligible.expand_as(masked).clone())
