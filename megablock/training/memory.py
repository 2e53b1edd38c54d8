"""Per-rank memory of a training run, from the config and the architecture alone.

What is counted (bytes on the busiest rank of a TP x PP x DP layout):
- weights: this rank's TP shard of its pipeline stage, in the training dtype (ZeRO-3: / DP);
- gradients of the trainable weights, same dtype (ZeRO >= 2: / DP);
- optimizer state: AdamW m and v in fp32, plus an fp32 master copy under mixed precision or
  whenever DeepSpeed's ZeRO optimizer holds the partition (ZeRO >= 1) (ZeRO >= 1: / DP); the
  fused AdamW step has no temporaries of its own, the guarded step's gradient-norm pass one fp32
  tensor of the largest gradient;
- activations: what autograd keeps from forward to backward, per token of each decoder layer,
  derived from megablock's own layers (megablock/model/layers.py, diffusion/attention.py):
  norms keep an fp32 copy of their input and the normed tensor, each linear its input, the
  attention core the roped q, k, v (a view of the qkv output, which so stays whole), out and the
  fp32 log-sum-exp, the MLP
  its fc1 output, silu(gate) and the product. `selective` drops the core's out and lse; `full`
  keeps each layer's input only and recomputes one layer at a time in backward. Tokens are
  micro_batch x S (S = 2L for a two-half block-diffusion step, L for the AR stage), times the
  micro-batches a pipeline stage holds in flight (1F1B: P - stage). S is the worst case, a
  micro-batch that masks something in every noised block (`train.drop_unmasked_blocks` carries
  about 1 in B noised blocks fewer on average). With sequence parallelism the norms' tensors,
  the column-parallel linears' inputs and `full`'s layer inputs are 1 / TP;
- logits: the loss positions gathered before the head (expected number under the noise
  schedule, or given), and the [chunk, V / TP] head output (with its fp32 copy in bf16 / fp16)
  for one chunk.

Context parallelism (parallel.context = c): every rank carries S / c positions of each sample, so
the tokens above (activations, loss positions, workspaces) are / c, and ZeRO partitions over
data x context. `ring` attention keeps only the shard's q, k, v, out and lse per layer, plus two
K/V shards and the fp32 merge buffers while a layer runs; `allgather` keeps, per layer, the
gathered K/V of all S positions, the local queries spread over S and the S-long output and lse
(none of which `selective` or `full` keeps).

The peak is weights + optimizer state + the larger of (activations + the head's gradients,
which backward makes first) and (all gradients), + the largest transient (loss chunk, one
recomputed layer, a layer's backward workspace, or the optimizer step's temporaries).
Allocator fragmentation, communication buffers (NCCL, DeepSpeed buckets) and the CUDA context
are not modelled: leave headroom (the CLI reports the fit with 10% of the device kept free).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megablock.config import Config
from megablock.model.config import ModelConfig, stage_layer_ranges
from megablock.model.params import parameter_count

GiB = 1024 ** 3


def _dtype_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


@dataclass
class StageMemory:
    """Bytes of one pipeline stage's rank (one TP rank of one DP replica)."""

    stage: int
    layers: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    transient: float
    parts: dict = field(default_factory=dict)

    @property
    def peak(self) -> float:
        """The larger of the backward peak and the optimizer step's peak."""
        p = self.parts
        backward = (self.weights + self.optimizer + max(self.activations + p.get("head_grads", 0.0), self.gradients)
                    + max(p.get("logits_chunk", 0.0), p.get("layer_workspace", 0.0)))
        step = self.weights + self.optimizer + self.gradients + p.get("optimizer_step", 0.0)
        return max(backward, step)


def expected_loss_tokens(cfg: Config, block_size: int) -> float:
    """Expected loss positions per sample (what the head sees) at `block_size`."""
    d, L = cfg.diffusion, cfg.data.seq_len
    if d.shift and block_size == 1 and d.attention != "full":
        return L - 1
    ratio = (d.clip_min + d.clip_max) / 2 if d.schedule == "clipped" else (1 + d.eps) / 2
    eligible = L - L // block_size if d.shift else L  # with shift a block's first token is never masked
    if d.attention == "full":
        return ratio * (L - (1 if d.shift else 0))
    masked = ratio * eligible  # a complementary copy masks 1 - t of it: the same on average
    diffusion = masked + (L // block_size - 1 if d.shift else 0)
    ar = (L - 1) if d.ar_loss_weight > 0 else 0
    return diffusion + ar


def layer_activation_bytes_per_token(m: ModelConfig, tp: int, a: int, recompute: str,
                                     sequence_parallel: bool = False) -> float:
    """Bytes autograd keeps per token of one decoder layer (module docstring)."""
    h, d = m.hidden_size, m.head_dim
    qw, kw = m.num_attention_heads * d / tp, m.num_kv_heads * d / tp
    f = m.intermediate_size / tp
    seq = tp if sequence_parallel else 1  # what lives on the residual stream is a 1 / t shard
    if recompute == "full":
        return a * h / seq  # the layer's input, held by the checkpoint
    norms = 2 * (4 * h + a * h + 4) / seq  # fp32 copy of the input (the input itself in fp32), normed, 1/rms
    # qkv and fc1 inputs (the normed tensors; sequence-parallel linears keep only the shard), proj input
    linear_inputs = 2 * a * h / seq + a * qw
    qkv_out = a * (qw + 2 * kw)  # k and v are views of it: the whole output stays
    rope = a * (qw + kw)  # roped q, k (x * cos keeps only cos: cos needs no gradient)
    core = a * qw + 4 * m.num_attention_heads / tp  # out and fp32 lse
    if m.qk_norm:
        rope += a * (qw + kw) + (4 * (qw + kw) if a != 4 else 0)
    mlp = 4 * a * f  # fc1 output (gate and up), silu(gate), silu * up
    total = norms + linear_inputs + qkv_out + rope + core + mlp
    if recompute == "selective":
        total -= core
    return total


def _context_attention_bytes(m: ModelConfig, tp: int, a: int, tokens: float, c: int, impl: str):
    """(workspace while one layer's attention runs, extra bytes it keeps for backward) of a
    context-parallel rank carrying `tokens` positions (module docstring)."""
    qw, kw, heads = m.num_attention_heads * m.head_dim / tp, m.num_kv_heads * m.head_dim / tp, m.num_attention_heads / tp
    if impl == "ring":  # the stacked K/V, the incoming shard, fp32 running and per-step out and lse
        return tokens * (4 * kw * a + 8 * qw + 8 * heads), 0.0
    full = tokens * c
    kept = full * (2 * kw * a + 2 * qw * a + 4 * heads)  # gathered K/V, spread q, S-long out and lse
    return kept, kept


def _layer_workspace_per_token(m: ModelConfig, tp: int, a: int) -> float:
    """Largest gradient temporaries inside one layer's backward (the MLP's)."""
    f = m.intermediate_size / tp
    return a * (4 * f + 2 * m.hidden_size) + 4 * m.hidden_size


def _stage_parameters(m: ModelConfig, tp: int, pp: int, stage: int, layers: int) -> tuple[float, float]:
    """(parameters of this rank, of which the embedding / output layer)."""
    h, V = m.hidden_size, m.padded_vocab_size(tp)
    per_layer = (h * (m.num_attention_heads + 2 * m.num_kv_heads) * m.head_dim
                 + m.num_attention_heads * m.head_dim * h + 3 * h * m.intermediate_size) / tp
    per_layer += 2 * h + (2 * m.head_dim if m.qk_norm else 0)
    if m.qkv_bias:
        per_layer += (m.num_attention_heads + 2 * m.num_kv_heads) * m.head_dim / tp
    vocab = 0.0
    if stage == 0:
        vocab += V * h / tp
    if stage == pp - 1:
        if not m.tie_word_embeddings or pp > 1:  # a tied last stage holds its own embedding copy
            vocab += V * h / tp
    total = layers * per_layer + vocab + (h if stage == pp - 1 else 0)
    return total, vocab


def estimate(cfg: Config, m: ModelConfig, dp: int = 1, block_size: Optional[int] = None,
             micro_batch_size: Optional[int] = None, loss_tokens: Optional[float] = None) -> list[StageMemory]:
    """Per-stage memory of one rank (see the module docstring); `block_size` defaults to the
    largest curriculum stage (the step with the most loss positions is B > 1's two-half step);
    `loss_tokens` (per micro-batch, all context ranks together) overrides the schedule's expectation."""
    p, t = cfg.parallel, cfg.train
    tp, pp = p.tensor, p.pipeline
    a = _dtype_bytes(t.precision)
    B = block_size or max(cfg.diffusion.block_sizes)
    mb = micro_batch_size or t.micro_batch_size
    L = cfg.data.seq_len
    ar_mode = cfg.diffusion.shift and B == 1 and cfg.diffusion.attention != "full"
    S = L if ar_mode or cfg.diffusion.attention == "full" else 2 * L
    rows = 1 + (1 if cfg.diffusion.complementary and not ar_mode else 0)
    c = p.context
    tokens = mb * rows * S / c  # this rank's positions
    n_loss = (loss_tokens if loss_tokens is not None else mb * rows * expected_loss_tokens(cfg, B)) / c

    trainable_frac = 1.0
    if cfg.lora.enabled:
        trainable, total = parameter_count(m, cfg.lora)
        trainable_frac = trainable / total
    ranges = stage_layer_ranges(m.num_layers, pp, p.layers_per_stage)
    V_local = m.padded_vocab_size(tp) / tp
    out = []
    for stage, layers in enumerate(ranges):
        n, vocab_params = _stage_parameters(m, tp, pp, stage, len(layers))
        # LoRA: the adapters replace the trainable set (their size from the whole-model ratio).
        n_train = n * trainable_frac if cfg.lora.enabled else n
        if cfg.lora.enabled:
            n = n + n_train  # the adapters are extra weights
        zero, shards = p.zero_stage, dp * c  # ZeRO partitions over data x context
        weights = n * a / (shards if zero >= 3 else 1)
        grads = n_train * a / (shards if zero >= 2 else 1)
        master = 4 if (a != 4 or zero >= 1) else 0
        opt_state = n_train * (8 + master) / (shards if zero >= 1 else 1)
        largest = max(m.padded_vocab_size(tp) / tp * m.hidden_size, 2 * m.intermediate_size * m.hidden_size / tp)
        opt_step_tmp = 4 * largest * trainable_frac

        in_flight = min(pp - stage, max(1, t.global_batch_size // (mb * dp))) if pp > 1 else 1
        per_layer = layer_activation_bytes_per_token(m, tp, a, t.recompute, p.sequence_parallel)
        acts = in_flight * tokens * len(layers) * per_layer
        acts += in_flight * tokens * 2 * a * m.head_dim  # RoPE cos / sin, shared by the layers
        core_ws = 0.0
        if c > 1:
            gathered, kept = _context_attention_bytes(m, tp, a, tokens, c, p.context_impl)
            acts += in_flight * len(layers) * (kept if t.recompute == "none" else 0.0)
            core_ws = gathered if p.context_impl == "ring" or t.recompute != "none" else 0.0
        logits = transient_logits = head_grads = 0.0
        last = stage == pp - 1
        if last:
            chunk = min(n_loss, t.loss_chunk_tokens) if t.loss_chunk_tokens > 0 else n_loss
            if t.loss_chunk_tokens > 0 and n_loss > t.loss_chunk_tokens:
                logits = n_loss * a * m.hidden_size  # the gathered states, inputs of the chunks
            else:  # one piece: the normed states and the fp32 softmax stay for backward
                logits = n_loss * (4 * m.hidden_size + a * m.hidden_size + 4 * V_local)
            # The head's output, and its fp32 copy for the cross-entropy unless it is fp32 already.
            transient_logits = chunk * V_local * (a + (4 if a != 4 else 0))
            head_grads = (vocab_params if stage == 0 or not m.tie_word_embeddings else vocab_params / 2) * a
        workspace = tokens * _layer_workspace_per_token(m, tp, a) + core_ws
        if t.recompute == "full":
            workspace += tokens * layer_activation_bytes_per_token(m, tp, a, "none", p.sequence_parallel)
        transient = max(transient_logits, workspace, opt_step_tmp)  # for the table; peak splits them
        out.append(StageMemory(
            stage=stage, layers=len(layers), weights=weights, gradients=grads, optimizer=opt_state,
            activations=acts, logits=logits, transient=transient,
            parts={"head_grads": head_grads, "in_flight": in_flight, "tokens": tokens, "loss_tokens": n_loss,
                   "logits_chunk": transient_logits, "layer_workspace": workspace, "optimizer_step": opt_step_tmp},
        ))
    for s in out:
        s.activations += s.logits  # the gathered loss states are activations too
    return out


def largest_micro_batch(cfg: Config, m: ModelConfig, dp: int, device_bytes: float, headroom: float = 0.1,
                        limit: int = 1024) -> int:
    """Largest micro-batch whose peak (every stage) fits `device_bytes` minus `headroom`; 0 if none."""
    best = 0
    for mb in range(1, limit + 1):
        if max(s.peak for s in estimate(cfg, m, dp, micro_batch_size=mb)) > device_bytes * (1 - headroom):
            break
        best = mb
    return best


def format_table(stages: list[StageMemory]) -> str:
    cols = ["stage", "layers", "weights", "grads", "optimizer", "activations", "(logits)", "transient", "peak"]
    rows = [[str(s.stage), str(s.layers)] + [f"{v / GiB:.2f}" for v in (
        s.weights, s.gradients, s.optimizer, s.activations, s.logits, s.transient, s.peak)] for s in stages]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(cols) + "   (GiB per rank)"] + [line(r) for r in rows])
