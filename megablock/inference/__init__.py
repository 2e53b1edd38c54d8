"""Block-diffusion sampling (KV cache, parallel decoding) and evaluation (NELBO, AR NLL,
generation metrics), with model loading for both.

    from megablock.inference import GenerateConfig, load
    im = load(hf_dir="DIR", parallel=info)   # info: megablock.parallel.state.initialize_parallel()
    out = im.sampler().generate([im.tokenizer("Hello")["input_ids"]], GenerateConfig(block_size=4))
"""
from megablock.diffusion.block_rules import KVCache
from .loading import InferenceModel, from_hf_model, load, load_checkpoint, load_hf_folder
from .sampler import BlockDiffusionSampler, GenerateConfig, GenerationOutput
from .sampling import SamplingParams, choose_tokens, select_commits

__all__ = [
    "BlockDiffusionSampler", "GenerateConfig", "GenerationOutput", "InferenceModel", "KVCache",
    "SamplingParams", "choose_tokens", "from_hf_model", "load", "load_checkpoint", "load_hf_folder",
    "select_commits",
]
