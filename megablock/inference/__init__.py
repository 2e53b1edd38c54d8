"""Block-diffusion sampling: KV cache, parallel decoding, model loading for inference.

    from megablock.inference import GenerateConfig, load
    im = load(hf_dir="DIR")            # or load(ckpt="DIR"); after init_inference_parallel()
    out = im.sampler().generate([im.tokenizer("Hello")["input_ids"]], GenerateConfig(block_size=4))
"""
from .kv_cache import KVCache
from .loading import InferenceModel, from_hf_model, init_inference_parallel, load, load_checkpoint, load_hf_folder
from .sampler import BlockDiffusionSampler, GenerateConfig, GenerationOutput
from .sampling import SamplingParams, choose_tokens, select_commits

__all__ = [
    "BlockDiffusionSampler", "GenerateConfig", "GenerationOutput", "InferenceModel", "KVCache",
    "SamplingParams", "choose_tokens", "from_hf_model", "init_inference_parallel", "load",
    "load_checkpoint", "load_hf_folder", "select_commits",
]
