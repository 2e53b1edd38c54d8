"""Configuration of a megablock block-diffusion export (remote code: torch and transformers only).

Each class is the family's own transformers config with the block-diffusion settings the export
writes into config.json, typed and documented. `model_type` stays the family's, so the folder
still loads as the plain AR model without trust_remote_code. (Each class spells out its
`__init__`: transformers turns config subclasses into dataclasses, whose generated `__init__`
would otherwise replace a shared one.)
"""
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config


class BlockDiffusionSettings:
    """The recipe's entries in config.json (tools/export_hf.py writes them):

    block_size: the block size the model was trained with, block_generate's default;
    mask_token_id: the token that fills a block's undecided slots;
    diffusion_shift: token shift, output i predicts token i + 1 (False: output i predicts slot i);
    diffusion_attention: the attention it was trained with (context_causal: its clean half is a
    causal LM, which speculative decoding verifies with).
    """

    def _take_settings(self, kwargs: dict) -> dict:
        self.block_size = int(kwargs.pop("block_size", 1))
        self.mask_token_id = kwargs.pop("mask_token_id", None)
        self.diffusion_shift = bool(kwargs.pop("diffusion_shift", True))
        self.diffusion_attention = kwargs.pop("diffusion_attention", "context_causal")
        return kwargs


class MegablockLlamaConfig(BlockDiffusionSettings, LlamaConfig):
    def __init__(self, **kwargs):
        super().__init__(**self._take_settings(kwargs))


class MegablockQwen2Config(BlockDiffusionSettings, Qwen2Config):
    def __init__(self, **kwargs):
        super().__init__(**self._take_settings(kwargs))


class MegablockQwen3Config(BlockDiffusionSettings, Qwen3Config):
    def __init__(self, **kwargs):
        super().__init__(**self._take_settings(kwargs))


class MegablockMistralConfig(BlockDiffusionSettings, MistralConfig):
    def __init__(self, **kwargs):
        super().__init__(**self._take_settings(kwargs))
