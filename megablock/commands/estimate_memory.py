"""Per-rank memory of a training config: weights, gradients, optimizer state, activations, logits.

    python tools/estimate_memory.py --config X.yaml [--set key=value ...] [--hf-config config.json]
        [--data-parallel N] [--context C] [--block-size B] [--device-memory-gb 80] [--json]

The architecture comes from --hf-config (a Hugging Face config.json, e.g. the model you will
convert), else from model.init_from's megablock.json when that checkpoint exists, else from
model.architecture (`--set model.architecture='{hidden_size: ..., ...}'`). --data-parallel is the
number of model replicas (ZeRO partitions over it; default 1); --context sets parallel.context
(each sample split over C ranks; docs/context_parallel.md). The block size defaults to the
curriculum's largest (the most expensive step). Prints a table per pipeline stage and the
largest micro-batch whose peak fits --device-memory-gb with 10% kept free; the model is
megablock/training/memory.py's (what it counts and what it leaves out is written there).
"""
import argparse
import json
import math
from pathlib import Path

from megablock.checkpoint.format import Checkpoint
from megablock.checkpoint.mappings import family_for_hf_config
from megablock.cli import add_common_flags, run_tool
from megablock.config import ConfigError, load_config, validate_model, validate_parallel_layout
from megablock.model.config import ModelConfig
from megablock.training.memory import GiB, estimate, format_table, largest_micro_batch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="training YAML")
    p.add_argument("--set", nargs="+", action="append", default=[], metavar="KEY=VALUE",
                   help="config overrides, as for pretrain_nbdiff.py")
    p.add_argument("--hf-config", help="a Hugging Face config.json giving the architecture")
    p.add_argument("--data-parallel", type=int, default=1, help="model replicas (ZeRO partitions over them)")
    p.add_argument("--context", type=int, help="context-parallel size (sets parallel.context)")
    p.add_argument("--block-size", type=int, help="block size of the step (default: the curriculum's largest)")
    p.add_argument("--device-memory-gb", type=float, help="device memory (GB = 1e9 bytes) for the fit")
    p.add_argument("--json", action="store_true", help="one JSON object on the last line")
    return add_common_flags(p)


def architecture_from_hf(path: str) -> ModelConfig:
    """ModelConfig of an HF config.json, with a mask token added as conversion adds one."""
    from transformers import AutoConfig  # deferred: transformers costs seconds to import

    raw = json.loads(Path(path).read_text())
    hf = AutoConfig.for_model(raw["model_type"], **{k: v for k, v in raw.items() if k != "model_type"})
    cfg = family_for_hf_config(raw).model_config(hf, raw)
    if cfg.mask_token_id is None:
        cfg.mask_token_id, cfg.vocab_size = cfg.vocab_size, cfg.vocab_size + 1
    return cfg


def resolve_architecture(cfg, hf_config) -> ModelConfig:
    if hf_config:
        return architecture_from_hf(hf_config)
    if cfg.model.init_from and Path(cfg.model.init_from).exists():
        return Checkpoint.open(cfg.model.init_from).meta.model
    if cfg.model.architecture:
        try:
            return ModelConfig(**cfg.model.architecture)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model.architecture: {err}") from None
    raise ConfigError(
        f"no architecture: model.init_from={cfg.model.init_from!r} does not exist here; pass --hf-config "
        "CONFIG.json (the HF model's config) or --set model.architecture='{hidden_size: ..., num_layers: ...}'"
    )


def check_inputs(args, cfg, m: ModelConfig) -> None:
    """The checks a launch of this config would make (config.validate_model: TP/PP divide the
    model; validate_parallel_layout: the batch arithmetic at this data-parallel size), and the
    tool's own numbers: an estimate of a run that cannot start is no answer."""
    if args.data_parallel < 1:
        raise ConfigError(f"--data-parallel {args.data_parallel} must be >= 1 (the number of model replicas)")
    if args.device_memory_gb is not None and not (math.isfinite(args.device_memory_gb) and args.device_memory_gb > 0):
        raise ConfigError(f"--device-memory-gb {args.device_memory_gb} must be a positive number of GB (e.g. 80)")
    if args.block_size is not None and not (args.block_size >= 1 and cfg.data.seq_len % args.block_size == 0):
        raise ConfigError(f"--block-size {args.block_size} must be >= 1 and divide data.seq_len={cfg.data.seq_len}")
    validate_model(cfg, m)
    p = cfg.parallel
    validate_parallel_layout(cfg, args.data_parallel * p.tensor * p.pipeline * p.context)


def run(args) -> int:
    context = [] if args.context is None else [f"parallel.context={args.context}"]
    cfg = load_config(args.config, [a for group in args.set for a in group] + context)
    m = resolve_architecture(cfg, args.hf_config)
    check_inputs(args, cfg, m)
    dp = args.data_parallel
    stages = estimate(cfg, m, dp, block_size=args.block_size)
    p, t = cfg.parallel, cfg.train
    B = args.block_size or max(cfg.diffusion.block_sizes)
    print(f"{m.arch}: {m.num_layers} layers, hidden {m.hidden_size}, intermediate {m.intermediate_size}, "
          f"{m.num_attention_heads}/{m.num_kv_heads} heads, vocab {m.vocab_size}")
    cp = f" x CP {p.context} ({p.context_impl})" if p.context > 1 else ""
    print(f"layout TP {p.tensor}{cp} x PP {p.pipeline} x DP {dp}, ZeRO {p.zero_stage}, {t.precision}, "
          f"recompute {t.recompute}, micro-batch {t.micro_batch_size}, L = {cfg.data.seq_len}, B = {B}, "
          f"loss chunk {t.loss_chunk_tokens} tokens")
    print(format_table(stages))
    out = {"stages": [{"stage": s.stage, "layers": s.layers, "weights": s.weights, "gradients": s.gradients,
                       "optimizer": s.optimizer, "activations": s.activations, "logits": s.logits,
                       "transient": s.transient, "peak": s.peak} for s in stages],
           "peak_bytes": max(s.peak for s in stages)}
    if args.device_memory_gb is not None:
        fit = largest_micro_batch(cfg, m, dp, args.device_memory_gb * 1e9)
        out.update(device_memory_gb=args.device_memory_gb, largest_micro_batch=fit)
        print(f"largest micro-batch within {args.device_memory_gb:g} GB (10% kept free): {fit}"
              + ("" if fit else "  (even 1 does not fit: raise TP / PP / ZeRO or recompute)"))
    print(f"peak of the busiest rank: {out['peak_bytes'] / GiB:.2f} GiB")
    if args.json:
        print(json.dumps(out))
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    return run_tool(run, parser.parse_args(argv), parser)
