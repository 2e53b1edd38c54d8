"""Score a megablock model on lm-evaluation-harness tasks (the harness's `megablock` model).

    python tools/lm_eval.py (--ckpt DIR | --hf-dir DIR) [--mode ar|threshold|speculative] [--block-size B]
        [--threshold T] --tasks T1,T2 [--num_fewshot K] [--limit N] [--include_path DIR]
        [--output_path DIR] [--log_samples] [--batch_size N] [--apply_chat_template]

Prints the harness's results table, then one line per generative task with its decoding
statistics (tokens per forward; drafts kept per verified block with --mode speculative).
`--output_path` gets the harness's own results JSON (and, with --log_samples, its samples files);
the statistics are in it under config.megablock. megablock's offline tasks
(megablock/inference/lm_eval_tasks: megablock_arith, megablock_choice, megablock_text and the
group megablock_local) are always on the include path.

One process runs TP = 1. Under torchrun / deepspeed the launched processes form TP groups of
--tp ranks (default: all of them, as in every megablock tool) and the groups run data-parallel:
`torchrun --nproc_per_node 8 tools/lm_eval.py --tp 1 ...` is 8 data-parallel replicas, `--tp 2`
four replicas of two TP ranks. The harness splits the documents over the replicas; rank 0 merges
the metrics (and the decoding statistics), prints and writes the results.
The harness model is megablock.inference.harness (its docstring says what each request computes).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from megablock.cli import add_common_flags, add_model_flags, is_rank_zero, run_tool

MODES = ("ar", "threshold", "speculative")
TASKS_DIR = Path(__file__).resolve().parents[1] / "inference" / "lm_eval_tasks"


class UsageError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_flags(p)
    p.add_argument("--mode", default="ar", help="generate_until decoding: ar (default), threshold (parallel "
                                                "decoding) or speculative (lossless draft-and-verify)")
    p.add_argument("--block-size", type=int, default=None,
                   help="B for threshold / speculative (default: the block size the model was trained at)")
    p.add_argument("--threshold", type=float, default=None, help="threshold mode: commit confidence (default 0.9)")
    p.add_argument("--tokens-per-step", type=int, default=None, help="threshold mode: commit exactly K per step")
    p.add_argument("--two-pass", action="store_true", help="speculative: draft in a forward of its own")
    p.add_argument("--next-draft", default="masked", help="speculative, one pass: masked (default) | overlap")
    p.add_argument("--branches", type=int, default=1, help="speculative, one pass: next blocks per verify pass")
    p.add_argument("--reuse-drafts", action="store_true",
                   help="speculative, one pass: after a rejection, verify the drafts after it in the next pass")
    p.add_argument("--candidates", type=int, default=0,
                   help="speculative, one pass, --branches >= 2: next blocks revealing the drafter's next likeliest "
                        "tokens where a block is cut")
    p.add_argument("--candidate-split", default="even",
                   help="speculative, --candidates: even (default; C per cut bet) | likeliest (as many blocks, to the "
                        "drafter's likeliest (cut, token) pairs)")
    p.add_argument("--dtype", default="fp32", help="fp32 (default) | bf16")
    p.add_argument("--tp", type=int, default=None, help="TP ranks per replica (default: every launched process)")
    p.add_argument("--max-length", type=int, default=None,
                   help="context window in tokens (default: the model's max_position_embeddings)")
    p.add_argument("--max-gen-toks", type=int, default=256, help="new tokens when a task sets none (default 256)")
    p.add_argument("--add-bos-token", action="store_true", default=None, help="prepend BOS to every request")
    p.add_argument("--tasks", required=True, help="comma-separated task or group names")
    p.add_argument("--num_fewshot", "--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    p.add_argument("--include_path", "--include-path", action="append", default=[],
                   help="a folder of task YAMLs (repeatable); megablock's offline tasks are always included")
    p.add_argument("--output_path", "--output-path", default=None, help="folder (or .json file) for the results")
    p.add_argument("--log_samples", "--log-samples", action="store_true", help="also write every sample")
    p.add_argument("--batch_size", "--batch-size", default="1", help="requests per forward (default 1)")
    p.add_argument("--apply_chat_template", "--apply-chat-template", nargs="?", const=True, default=False,
                   help="format prompts with the tokenizer's chat template (optionally a template name)")
    p.add_argument("--fewshot_as_multiturn", "--fewshot-as-multiturn", action="store_true")
    p.add_argument("--system_instruction", "--system-instruction", default=None)
    p.add_argument("--gen_kwargs", "--gen-kwargs", default=None, help="e.g. max_gen_toks=512,temperature=0")
    p.add_argument("--metadata", default=None, help="JSON object passed to the tasks (as the harness's --metadata)")
    p.add_argument("--confirm_run_unsafe_code", "--confirm-run-unsafe-code", action="store_true",
                   help="let tasks that execute model-written code run it (humaneval, mbpp; also HF_ALLOW_CODE_EVAL=1)")
    p.add_argument("--seed", type=int, default=0, help="decoding seed (sampling); the harness's seeds are its own")
    p.add_argument("--bootstrap_iters", "--bootstrap-iters", type=int, default=100000,
                   help="stderr bootstrap resamples (the harness default; 0 skips the stderr)")
    p.add_argument("--verbosity", default="WARNING", help="the harness's log level (default WARNING)")
    return add_common_flags(p)


def check_args(args) -> None:
    """What can be checked before anything heavy is imported or loaded."""
    if args.mode not in MODES:
        raise UsageError(f"--mode {args.mode} is not a decoding mode; use one of {', '.join(MODES)}")
    for d in args.include_path:
        if not Path(d).is_dir():
            raise UsageError(f"--include_path {d} is not a folder (of task YAML files)")
    if not [t for t in args.tasks.split(",") if t.strip()]:
        raise UsageError("--tasks is empty; name at least one task")
    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"--limit {args.limit} must be > 0")
    if args.metadata is not None:
        try:
            if not isinstance(json.loads(args.metadata), dict):
                raise ValueError
        except ValueError:
            raise UsageError(f"--metadata {args.metadata} is not a JSON object") from None


def model_args(args) -> dict:
    out = {"ckpt": args.ckpt} if args.ckpt else {"hf_dir": args.hf_dir}
    for key in ("drafter", "block_size", "threshold", "tokens_per_step", "tp", "max_length", "add_bos_token"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    out.update(mode=args.mode, dtype=args.dtype, batch_size=args.batch_size, max_gen_toks=args.max_gen_toks,
               seed=args.seed)
    if args.mode == "speculative":
        out.update(two_pass=args.two_pass, next_draft=args.next_draft, branches=args.branches,
                   reuse_drafts=args.reuse_drafts, candidates=args.candidates, candidate_split=args.candidate_split)
    return out


_MANAGERS: dict = {}


def task_manager(paths: list, defaults: bool, metadata: dict):
    """A cached TaskManager (indexing the harness's ~200 task folders takes seconds)."""
    from lm_eval.tasks import TaskManager

    key = (tuple(paths), defaults, json.dumps(metadata, sort_keys=True, default=str))
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=paths, include_defaults=defaults, metadata=metadata)
    return _MANAGERS[key]


def is_network_error(e: BaseException) -> bool:
    text = f"{type(e).__name__}: {e}"
    return isinstance(e, ConnectionError) or any(s in text for s in (
        "Couldn't reach", "OfflineModeIsEnabled", "LocalEntryNotFoundError", "Name or service not known",
        "Failed to resolve", "Max retries exceeded", "Temporary failure in name resolution"))


def load_tasks(names: list, include: list, metadata: dict) -> list:
    """The harness's Task / Group objects, with one-line errors for unknown tasks and tasks whose
    data cannot be fetched here. Only megablock's and --include_path's tasks are indexed when they
    hold every name asked for (fast); otherwise the harness's own too."""
    local = task_manager(include, False, metadata)
    tm = local if all(local.match_tasks([n]) for n in names) else task_manager(include, True, metadata)
    unknown = [n for n in names if not tm.match_tasks([n])]
    if unknown:
        raise UsageError(f"unknown task(s) {', '.join(unknown)}: not a harness task or group, nor in --include_path "
                         f"(`lm-eval ls tasks` lists the harness's; megablock's own: megablock_local, megablock_arith, "
                         f"megablock_choice, megablock_text)")
    objs = []
    for name in names:
        try:
            loaded = tm.load([name])
        except Exception as e:  # noqa: BLE001 - the dataset download is the usual failure
            if not is_network_error(e):
                raise
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UsageError(f"task {name} needs its dataset downloaded (from the Hugging Face Hub), which failed "
                             f"here ({first}); run it where the Hub is reachable, or download the dataset there "
                             "into HF_DATASETS_CACHE first and set HF_DATASETS_OFFLINE=1") from None
        objs.extend(list(loaded["groups"].values()) or list(loaded["tasks"].values()))
    return objs


class _QuietCustomDataset(logging.Filter):
    """Drops the harness's per-task advice on custom datasets (megablock's tasks have one and need
    no metadata)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to" not in record.getMessage()


def decoding_lines(info: dict) -> list:
    lines = []
    for task, s in (info.get("decoding") or {}).items():
        line = (f"{task}: mode {info['mode']}, block size {info['block_size']}: {s['new_tokens']} tokens in "
                f"{s['forwards']} forwards per sequence ({s['tokens_per_forward']:.2f} tokens/forward; "
                f"{s['tokens_per_batch_forward']:.2f} per batched forward), {s['tokens_per_s']:.1f} tokens/s")
        if "mean_drafts_kept" in s:
            line += (f"; drafts kept per verified block {s['mean_drafts_kept']:.2f} "
                     f"(acceptance {s['acceptance_rate']:.2f})")
        lines.append(line)
    return lines


def run(args) -> int:
    check_args(args)
    level = getattr(logging, str(args.verbosity).upper(), logging.WARNING)
    logging.getLogger("lm_eval").setLevel(level)
    logging.getLogger("lm_eval.api.task").addFilter(_QuietCustomDataset())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import make_table, sanitize_model_name

    from megablock.inference.harness import MegablockLM  # deferred: imports lm-eval, which takes seconds

    margs = model_args(args)
    metadata = {**margs, **(json.loads(args.metadata) if args.metadata else {})}
    names = list(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))
    include = [str(TASKS_DIR)] + [str(Path(d).resolve()) for d in args.include_path]
    tasks = load_tasks(names, include, metadata)  # before the model: a bad task fails in seconds
    lm = MegablockLM(**margs)
    if is_rank_zero():
        par = lm.parallel
        print(f"megablock-lm-eval: {par.world_size} process(es): TP {par.tp} x DP {par.dp}, mode {lm.mode}, "
              f"block size {lm.block_size}", file=sys.stderr)
    tracker = EvaluationTracker(output_path=args.output_path) if args.output_path else None
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=args.num_fewshot, limit=limit, log_samples=args.log_samples,
        evaluation_tracker=tracker, apply_chat_template=args.apply_chat_template,
        fewshot_as_multiturn=args.fewshot_as_multiturn, system_instruction=args.system_instruction,
        gen_kwargs=args.gen_kwargs, bootstrap_iters=args.bootstrap_iters,
        confirm_run_unsafe_code=args.confirm_run_unsafe_code,
    )
    if results is None or not is_rank_zero():
        return 0
    results["config"]["model"] = "megablock"
    results["config"]["model_args"] = margs
    results["config"]["batch_size"] = args.batch_size
    samples = results.pop("samples", None) if args.log_samples else None
    if tracker is not None:
        # Given a model object the harness records it as CUSTOM under a random name (its results
        # folder is named after it): name the model by its folder instead, as `hf` does.
        gct = tracker.general_config_tracker
        gct.model_source, gct.model_name = "megablock", str(args.ckpt or args.hf_dir)
        gct.model_name_sanitized = sanitize_model_name(gct.model_name)
        tracker.save_results_aggregated(results=results, samples=samples)
        if samples is not None:
            for task in results["configs"]:
                tracker.save_results_samples(task_name=task, samples=samples[task])
    shown = ",".join(f"{k}={v}" for k, v in margs.items())
    print(f"megablock ({shown}), gen_kwargs: ({args.gen_kwargs}), limit: {args.limit}, "
          f"num_fewshot: {args.num_fewshot}, batch_size: {args.batch_size}")
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    for line in decoding_lines(results["config"].get("megablock", {})):
        print(line)
    if tracker is not None:
        print(f"results written under {args.output_path}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    return run_tool(run, parser.parse_args(argv), parser)


if __name__ == "__main__":
    sys.exit(main())
