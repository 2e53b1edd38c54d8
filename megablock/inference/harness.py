"""megablock as an lm-evaluation-harness model: `megablock`, registered when this module is imported.

    import megablock.inference.harness  # registers "megablock"
    lm_eval.simple_evaluate(model="megablock", model_args={"hf_dir": DIR, "mode": "threshold",
                            "block_size": 4}, tasks=[...])

or `tools/lm_eval.py` / `megablock-lm-eval`, which does the same with the harness's flags.

Model arguments: exactly one of `ckpt` (a megablock checkpoint) / `hf_dir` (an HF folder, plain or
exported; `pretrained` is accepted as its alias, as the `hf` backend spells it), `drafter`,
`mode` = ar | threshold | speculative, `block_size`, `threshold` or `tokens_per_step`, `two_pass`,
`next_draft`, `branches`, `reuse_drafts`, `candidates` and `candidate_split` (speculative), `dtype`, `batch_size`, `max_length`,
`max_gen_toks`, `add_bos_token`, `prefix_token_id`, `tp`, `seed`.

What each request type computes, and why it matches the `hf` backend:

- `loglikelihood` / `loglikelihood_rolling`: the exact AR log-likelihood of the clean causal pass
  (AttentionLayout "ar": the clean half of the network is the AR model it was adapted from). The
  requests are tokenized, sorted, batched (right padding), left-truncated to `max_length` and, for
  rolling, cut into the same disjoint windows as the `hf` backend does, with the harness's own
  helpers (Collator, get_rolling_token_windows), so both backends score the same token windows.
  Only the continuation positions go through the output layer. The mask token is not a real token
  and is never predicted (the model puts it at -inf), so on an exported folder with a mask token
  the two backends differ by the probability the HF model gives the mask token; on a plain HF
  folder they agree to float rounding.
- `generate_until`: `mode=ar` is greedy (or sampled) AR decoding with the KV-cache sampler at
  block size 1, `threshold` the block sampler's parallel decoding, `speculative` the lossless
  self-speculative sampler (token for token the `ar` output when greedy). Prompts are encoded and
  left-truncated to `max_length - max_gen_toks` as the `hf` backend does; a row ends at EOS, at
  `max_gen_toks` new tokens, or once its decoded text (special tokens included, as the harness's
  stopping criterion sees it) holds a stop sequence; the text is then cut at the first stop
  sequence by the harness's own post-processing. Greedy AR output therefore equals the `hf`
  backend's text. Chat templates are the tokenizer's (`--apply_chat_template`).

Decoding statistics (new tokens, forwards, tokens per forward, and for speculative decoding the
drafts checked and kept per verified block) are kept per task and reported through the harness's
hook for backend information, `get_model_info`, which lands in the results JSON under
`config.megablock.decoding.TASK`. `tokens_per_forward` is the per-sequence figure (new tokens over
the forwards each row took part in with work of its own: what it would take decoded alone, as
papers report it); `tokens_per_batch_forward` counts every model call of the batched run once.

Parallelism: under torchrun / deepspeed, the launched processes form TP groups of `tp` ranks
(default: all of them, as in every megablock tool) and the groups are data-parallel replicas:
the harness splits the documents over the DP ranks and gathers the metrics (and these
statistics) on rank 0. The TP ranks of a group run the same requests and agree on every token.
(When the documents do not split evenly, the harness pads the short ranks with repeats of their
last request; those are decoded and counted in the statistics too.)
"""
from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from typing import Optional

import torch
import torch.distributed as dist
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (Collator, _add_special_kwargs, handle_stop_sequences, has_bos_prefix,
                                  normalize_gen_kwargs, postprocess_generated_text)
from megatron.core import parallel_state

from megablock.diffusion.layout import AttentionLayout
from megablock.model.params import parameter_count
from megablock.parallel.state import default_device, initialize_parallel

from .loading import load
from .sampler import GenerateConfig
from .sampling import SamplingParams
from .speculative import SpeculativeConfig, speculative_sampler

logger = logging.getLogger(__name__)

MODES = ("ar", "threshold", "speculative")
SAMPLING_KEYS = {"do_sample", "temperature", "top_k", "top_p"}


def _stats() -> dict:
    return {"requests": 0, "new_tokens": 0, "forwards": 0, "row_forwards": 0, "seconds": 0.0, "drafted": 0,
            "accepted": 0, "verified_blocks": 0}


@register_model("megablock")
class MegablockLM(TemplateLM):
    """A megablock checkpoint or HF folder as a harness model (see the module doc)."""

    def __init__(self, ckpt: Optional[str] = None, hf_dir: Optional[str] = None, pretrained: Optional[str] = None,
                 drafter: Optional[str] = None, mode: str = "ar", block_size: Optional[int] = None,
                 threshold: Optional[float] = None, tokens_per_step: Optional[int] = None, two_pass: bool = False,
                 next_draft: str = "masked", branches: int = 1, reuse_drafts: bool = False, candidates: int = 0,
                 candidate_split: str = "even", dtype: str = "fp32",
                 batch_size=1, max_batch_size=None,
                 max_length: Optional[int] = None, max_gen_toks: int = 256, add_bos_token: Optional[bool] = None,
                 prefix_token_id: Optional[int] = None, tp: Optional[int] = None, device: Optional[str] = None,
                 seed: int = 0, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"unknown megablock model argument(s) {', '.join(sorted(unknown))}; it takes ckpt, "
                             "hf_dir, drafter, mode, block_size, threshold, tokens_per_step, two_pass, next_draft, branches, "
                             "reuse_drafts, candidates, candidate_split, "
                             "dtype, batch_size, max_length, max_gen_toks, add_bos_token, prefix_token_id, tp, seed")
        if pretrained is not None:
            if hf_dir is not None:
                raise ValueError("pass hf_dir or its alias pretrained, not both")
            hf_dir = pretrained
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not a decoding mode; use one of {', '.join(MODES)}")
        if mode == "ar" and block_size not in (None, 1):
            raise ValueError(f"mode=ar decodes one token per step; block_size={block_size} needs mode=threshold "
                             "or mode=speculative")
        if mode != "threshold" and (threshold is not None or tokens_per_step is not None):
            raise ValueError("threshold / tokens_per_step belong to mode=threshold")
        if isinstance(batch_size, str) and not batch_size.isdigit():
            raise ValueError(f"batch_size={batch_size} is not supported (no automatic batch size); pass a number")
        self._batch_size = int(batch_size)
        if self._batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")

        def decoding(B: int, shift: bool):
            if mode == "speculative":
                return SpeculativeConfig(block_size=B, two_pass=two_pass, next_draft=next_draft, shift=shift,
                                         branches=int(branches), reuse_drafts=bool(reuse_drafts),
                                         candidates=int(candidates), candidate_split=candidate_split,
                                         seed=int(seed))
            return GenerateConfig(block_size=B, threshold=0.9 if threshold is None else float(threshold),
                                  tokens_per_step=tokens_per_step, shift=shift, seed=int(seed))

        decoding(int(block_size or 1), True).check_ranges()  # before the model loads

        world = int(os.environ.get("WORLD_SIZE", "1"))
        tp = int(tp) if tp is not None else (parallel_state.get_tensor_model_parallel_world_size()
                                             if parallel_state.model_parallel_is_initialized() else world)
        self.parallel = initialize_parallel(tp=tp, pp=1, device=torch.device(device) if device else default_device())
        self.im = load(ckpt=ckpt, hf_dir=hf_dir, dtype=dtype, parallel=self.parallel, drafter=drafter)
        if self.im.tokenizer is None:
            raise ValueError(f"no tokenizer in {ckpt or hf_dir}; the harness needs the model's tokenizer")
        self.tokenizer = self.im.tokenizer
        self.model = self.im.model
        self.source = {"ckpt": ckpt} if ckpt is not None else {"hf_dir": hf_dir}
        self.drafter, self.dtype = drafter, dtype
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self._max_length = max_length
        self._max_gen_toks = int(max_gen_toks)
        self.vocab_size = self.model.cfg.vocab_size

        self.mode = mode
        self.seed = int(seed)
        B = 1 if mode == "ar" else int(block_size or self.im.trained_block_size or 0)
        if B < 1:
            raise ValueError(f"mode={mode} needs a block size, block_size= (this model records none it was trained at)")
        self.block_size = B
        self.decoding = decoding(B, self.im.shift)
        self.sampler = speculative_sampler(self.im) if mode == "speculative" else self.im.sampler()
        if mode == "ar":
            self._need_causal("mode=ar decoding")
        self.decoding.validate(self.im.mask_token_id)  # e.g. no mask token: only mode=ar; bad ranges
        self.stats: dict = defaultdict(_stats)
        self.merged_stats: Optional[dict] = None

    # --- what the harness asks of a model ---------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.im.eos_token_ids[0]

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.eot_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return int(self._max_length)
        return int(self.model.cfg.max_position_embeddings)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self.parallel.device

    @property
    def rank(self) -> int:
        return self.parallel.dp_rank

    @property
    def world_size(self) -> int:
        return self.parallel.dp

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def _dp_group(self):
        return parallel_state.get_data_parallel_group()

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size <= 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self._dp_group())
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size <= 1:
            return [obj]
        group = self._dp_group()
        root = dist.get_process_group_ranks(group)[dst]
        # Every DP rank calls this at the same points of the evaluation (the metrics, the samples),
        # so the decoding statistics ride along: the root then reports the whole run's.
        stats = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(dict(self.stats), stats, dst=root, group=group)
        if self.rank == dst:
            self.merged_stats = _merge(stats)
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=root, group=group)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self._dp_group())

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len=None,
                   **kwargs) -> list:
        """As the `hf` backend encodes (its BOS rules), so both backends score the same tokens."""
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _encode_prompts(self, strings: list, max_len: int) -> list:
        """The `hf` backend's batch encoding (tok_batch_encode), without the padding."""
        special = {}
        if has_bos_prefix(strings[0], getattr(self.tokenizer, "bos_token", None)):
            special = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        ids = self.tokenizer(list(strings), **special)["input_ids"]
        return [x[-max_len:] for x in ids]

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list, add_generation_prompt: bool = True) -> str:
        import jinja2

        kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt,
                      continue_final_message=not add_generation_prompt)
        try:
            return self.tokenizer.apply_chat_template(chat_history, **kwargs)
        except jinja2.exceptions.TemplateError:  # as the hf backend: some templates have no system role
            return self.tokenizer.apply_chat_template([m for m in chat_history if m["role"] != "system"], **kwargs)

    def get_model_info(self) -> dict:
        """Lands in the results JSON's `config`: the model, the decoding and its statistics per task."""
        stats = self.merged_stats if self.merged_stats is not None else dict(self.stats)
        info = dict(self.source, drafter=self.drafter, dtype=self.dtype, mode=self.mode,
                    block_size=self.block_size, tp=self.parallel.tp, dp=self.parallel.dp)
        if self.mode == "threshold":
            info.update(threshold=self.decoding.threshold, tokens_per_step=self.decoding.tokens_per_step)
        if self.mode == "speculative":
            info.update(two_pass=self.decoding.two_pass, next_draft=self.decoding.next_draft,
                        branches=self.decoding.branches, reuse_drafts=self.decoding.reuse_drafts,
                        candidates=self.decoding.candidates, candidate_split=self.decoding.candidate_split)
        info["decoding"] = {task: summarize(s, self.mode) for task, s in sorted(stats.items())}
        return {"megablock": info, "model_num_parameters": parameter_count(self.model.cfg)[1],
                "model_dtype": self.dtype}

    # --- log-likelihoods -----------------------------------------------------------------------------------
    def _need_causal(self, what: str) -> None:
        if not self.im.shift or self.im.attention == "full":
            raise ValueError(f"{what} needs the model's clean causal pass, which a model trained without token "
                             f"shift or with diffusion.attention=full does not have (this one: shift={self.im.shift}, "
                             f"attention={self.im.attention}); evaluate it with generative tasks in mode=threshold")

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary float logits (gathered over TP; padding and the mask token at -inf)."""
        return self.sampler._logits(hidden)

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per
        request, batched and cached as the `hf` backend does (one pass per group of requests that
        share context + continuation[:-1])."""
        self._need_causal("loglikelihood")
        res = []
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                            group_by="contexts", group_fn=lambda r: r[-2] + r[-1][:-1])
        dev = self.parallel.device
        for chunk in collator.get_batched(n=self.batch_size):
            inps, spans = [], []
            for _, ctx, cont in chunk:
                if not ctx or not cont:
                    raise ValueError("a loglikelihood request needs a non-empty context and continuation")
                inp = (ctx + cont)[-(self.max_length + 1):][:-1]  # left-truncated to max_length
                inps.append(inp)
                spans.append((len(inp) - len(cont), len(inp)))
            width = max(len(x) for x in inps)
            ids = torch.full((len(inps), width), self.im.pad_token_id, dtype=torch.long)
            for i, x in enumerate(inps):  # right padding: causal attention never sees it
                ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            pos = torch.arange(width).expand(len(inps), -1)
            hidden = self.model.encode(ids.to(dev), pos.to(dev), AttentionLayout("ar", width))
            picked = torch.cat([hidden[i, a:b] for i, (a, b) in enumerate(spans)])
            logprobs = torch.log_softmax(self._logits(picked), dim=-1).cpu()
            at = 0
            for (request_str, ctx, cont), (a, b) in zip(chunk, spans):
                lp = logprobs[at: at + b - a].unsqueeze(0)
                at += b - a
                # The group's other requests (same context + continuation[:-1], e.g. one-token
                # choices) are scored from the same pass, each on the tail it continues with.
                for key, toks, group_lp in collator.get_cache(req_str=request_str, cxt_toks=ctx,
                                                              cont_toks=cont, logits=lp):
                    target = torch.tensor(toks, dtype=torch.long)[None]
                    tail = group_lp[:, -target.shape[1]:]
                    greedy = bool((tail.argmax(-1) == target).all())
                    answer = (float(tail.gather(2, target[..., None]).sum()), greedy)
                    res.append(answer)
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, answer)
        return collator.get_original(res)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        """Whole-document log-likelihoods over the `hf` backend's disjoint windows of max_length."""
        windows, counts = [], []
        for (string,) in [r.args for r in requests]:
            rolling = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            windows.extend((None,) + w for w in rolling)
            counts.append(len(rolling))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=True)
        out, at = [], 0
        for req, n in zip(requests, counts):
            total = sum(s[0] for s in scores[at: at + n])
            at += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    # --- generation ----------------------------------------------------------------------------------------
    def _sampling(self, kwargs: dict) -> SamplingParams:
        ignored = sorted(set(kwargs) - SAMPLING_KEYS)
        if ignored:
            logger.warning("megablock ignores the generation kwargs %s", ", ".join(ignored))
        if not kwargs.get("do_sample") or not kwargs.get("temperature"):
            return SamplingParams()  # greedy, as the hf backend decodes do_sample=False / temperature 0
        return SamplingParams(float(kwargs["temperature"]), kwargs.get("top_k"), kwargs.get("top_p"))

    def _stopper(self, until: list):
        """stop(row, tokens) for the samplers: the decoded new text holds a stop sequence. Decoded with
        special tokens, as the harness's stopping criterion decodes (a stop such as <|im_end|>)."""
        terms = [t for t in until if t]

        def stop(row: int, tokens: list) -> bool:
            text = self.tokenizer.decode(tokens, skip_special_tokens=False)
            return any(t in text for t in terms)

        return stop if terms else None

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        res: list = [None] * len(requests)
        by_task = defaultdict(list)
        for i, req in enumerate(requests):
            by_task[req.task_name or "unnamed"].append(i)
        for task, idx in by_task.items():  # per task, so the statistics are per task
            for i, text in zip(idx, self._generate([requests[i].args for i in idx], self.stats[task])):
                res[i] = text
        return res

    def _generate(self, args: list, stats: dict) -> list:
        res = []
        collator = Collator(args, sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                            group_by="gen_kwargs", group_fn=lambda a: a[1])
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            kwargs.pop("max_length", None)
            if self.max_length - max_gen <= 0:
                raise ValueError(f"max_gen_toks={max_gen} leaves no room for a prompt in max_length="
                                 f"{self.max_length}; lower max_gen_toks or raise max_length")
            prompts = self._encode_prompts(contexts, self.max_length - max_gen)
            cfg = self.decoding
            cfg.max_new_tokens, cfg.sampling = max_gen, self._sampling(kwargs)
            out = self.sampler.generate(prompts, cfg, stop=self._stopper(until))
            for toks, context, gen_kwargs in zip(out.tokens, contexts, all_kwargs):
                text = postprocess_generated_text(self.tok_decode(toks), stop=until, think_end_token=None)
                res.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            stats["requests"] += len(prompts)
            stats["new_tokens"] += out.new_tokens
            stats["forwards"] += out.forwards
            stats["row_forwards"] += sum(out.row_forwards)
            stats["seconds"] += out.seconds
            if self.mode == "speculative":
                stats["drafted"] += sum(out.drafted)
                stats["accepted"] += sum(out.accepted)
                stats["verified_blocks"] += len(out.accepted)
        return collator.get_original(res)


def _merge(per_rank: list) -> dict:
    merged: dict = defaultdict(_stats)
    for stats in per_rank:
        for task, s in stats.items():
            for k, v in s.items():
                merged[task][k] += v
    return dict(merged)


def summarize(s: dict, mode: str) -> dict:
    """One task's decoding statistics as reported (rates from the sums)."""
    out = {"requests": s["requests"], "new_tokens": s["new_tokens"], "forwards": s["row_forwards"],
           "tokens_per_forward": round(s["new_tokens"] / max(s["row_forwards"], 1), 4),
           "batch_forwards": s["forwards"], "tokens_per_batch_forward": round(s["new_tokens"] / max(s["forwards"], 1), 4),
           "seconds": round(s["seconds"], 3), "tokens_per_s": round(s["new_tokens"] / max(s["seconds"], 1e-9), 2)}
    if mode == "speculative":
        out.update(verified_blocks=s["verified_blocks"], drafts_checked=s["drafted"], drafts_kept=s["accepted"],
                   mean_drafts_kept=round(s["accepted"] / max(s["verified_blocks"], 1), 4),
                   acceptance_rate=round(s["accepted"] / max(s["drafted"], 1), 4))
    return out
