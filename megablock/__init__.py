"""megablock: block-diffusion adaptation of pretrained AR LLMs (NBDiff recipe) at cluster scale.

Packages, imported one way only (tests/test_structure.py keeps it so):
    config                      typed run config, option lists, validation
    parallel, diffusion         process groups and layout; masks, attention, noise, batches, loss
    model                       the tensor-parallel decoder, LoRA layers, parameter/FLOP count
    checkpoint                  sharded format, HF mappings, convert/export, loading, adapter files
    data                        indexed datasets, samplers, per-step batches
    training, inference         the trainer and its engines; sampling and evaluation
    cli, commands               what the command-line tools share, and the tools themselves
"""
import warnings

# megatron-core warns at import, once per module (four lines), that Transformer Engine and Apex
# are absent; megablock uses neither (its CPU paths and fallbacks are the intended ones).
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed", category=UserWarning)
