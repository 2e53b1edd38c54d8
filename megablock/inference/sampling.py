"""Token choice and the commit rule of parallel decoding, as pure functions.

They are part of the decoding rules shared with the exported folder's remote code, so they live
in `block_rules` (torch only); this module keeps their usual import path.
"""
from megablock.diffusion.block_rules import SamplingParams, choose_tokens, filter_logits, select_commits

__all__ = ["SamplingParams", "choose_tokens", "filter_logits", "select_commits"]
