"""megablock as an lm-evaluation-harness model (megablock.inference.harness, tools/lm_eval.py),
against the harness's own `hf` backend on the same tiny random HF folders and megablock's offline
tasks (megablock/inference/lm_eval_tasks: generate_until, multiple choice, rolling text):

- parity: equal log-likelihoods (rel 1e-5, fp32), identical generate_until text with mode=ar,
  identical metrics (Llama with a chat template applied, Qwen3 without), and the same at TP = 2
  and data-parallel over 2 processes (metrics and decoding statistics merged on rank 0);
- stop sequences cut where the hf backend cuts, and end the row early;
- mode=speculative returns exactly the mode=ar text; mode=threshold runs and reports tokens per
  forward, the per-sequence figure independent of the batch;
- the command's output (table, results JSON, samples) and its error cases, one line each.

A short max_length (128) makes the rolling task span several windows and the few-shot prompts
left-truncate, so both backends' windowing and truncation are compared too.
"""
from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from megablock.commands import lm_eval as tool  # noqa: E402
from megablock.inference.harness import MegablockLM  # noqa: E402
from megablock.testing import peaked_model, run_distributed, save_tiny_hf_model, tiny_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = str(ROOT / "megablock" / "inference" / "lm_eval_tasks")
MAX_LEN = 128
MASK = 319  # an ordinary token of the tiny vocabulary, used as the mask of an untrained model
CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    save_tiny_hf_model(root / "llama", "llama", seed=3)
    tok = tiny_tokenizer(root / "llama")
    tok.chat_template = CHAT
    tok.save_pretrained(str(root / "llama"))
    save_tiny_hf_model(root / "qwen3", "qwen3", seed=4)
    # A peaked model (confident, few near-ties) with a mask token, for the block decoders.
    peaked = peaked_model("llama", seed=5)
    peaked.save_pretrained(str(root / "peaked"))
    tiny_tokenizer(root / "peaked")
    cfg = json.loads((root / "peaked" / "config.json").read_text())
    (root / "peaked" / "config.json").write_text(json.dumps({**cfg, "mask_token_id": MASK}))
    return {k: str(root / k) for k in ("llama", "qwen3", "peaked")}


@pytest.fixture(scope="module")
def tm():
    return TaskManager(include_path=TASKS, include_defaults=False)


def evaluate(model, args, tm, tasks=("megablock_local",), **kw):
    kw = {"limit": 4, "num_fewshot": 1, "batch_size": 2, **kw}
    return lm_eval.simple_evaluate(model=model, model_args=args, tasks=list(tasks), task_manager=tm,
                                   log_samples=True, bootstrap_iters=0, **kw)


def hf_args(folder):
    return {"pretrained": folder, "device": "cpu", "dtype": "float32", "max_length": MAX_LEN}


def resps(results) -> dict:
    """task -> doc_id -> the model's raw responses (one per request of the document)."""
    return {task: {s["doc_id"]: [r[0] for r in s["resps"]] for s in samples}
            for task, samples in results["samples"].items()}


def metrics(results) -> dict:
    return {task: {k: v for k, v in r.items() if "," in k and "stderr" not in k}
            for task, r in results["results"].items()}


def assert_same(ref, got):
    """Log-likelihoods to rel 1e-5 (and the same greedy flags), texts identical, metrics equal
    (perplexities, sums of log-likelihoods, to rel 1e-5)."""
    a, b = resps(ref), resps(got)
    assert a.keys() == b.keys()
    for task in a:
        assert a[task].keys() == b[task].keys(), task
        for doc in a[task]:
            for x, y in zip(a[task][doc], b[task][doc], strict=True):
                if isinstance(x, str):
                    assert x == y, (task, doc)
                else:
                    x = x if isinstance(x, (list, tuple)) else (x, None)
                    y = y if isinstance(y, (list, tuple)) else (y, None)
                    assert math.isclose(x[0], y[0], rel_tol=1e-5), (task, doc, x, y)
                    assert x[1] == y[1], (task, doc)
    ma, mb = metrics(ref), metrics(got)
    assert ma.keys() == mb.keys()
    for task in ma:
        assert ma[task].keys() == mb[task].keys()
        for k in ma[task]:
            assert math.isclose(ma[task][k], mb[task][k], rel_tol=1e-5), (task, k, ma[task][k], mb[task][k])


# --- parity with the hf backend -----------------------------------------------------------------------
@pytest.mark.parametrize("family,chat", [("llama", True), ("qwen3", False)])
def test_parity_with_the_hf_backend(folders, tm, family, chat):
    kw = {"apply_chat_template": True} if chat else {}
    ref = evaluate("hf", hf_args(folders[family]), tm, **kw)
    got = evaluate("megablock", {"hf_dir": folders[family], "max_length": MAX_LEN}, tm, **kw)
    assert set(resps(ref)) == {"megablock_arith", "megablock_choice", "megablock_text"}
    assert all(len(d) == 4 for d in resps(ref).values())
    if chat:  # the template really was applied, by both
        prompt = got["samples"]["megablock_arith"][0]["arguments"][0][0]
        assert prompt.startswith("<|user|>") and prompt.endswith("<|assistant|>")
        assert ref["samples"]["megablock_arith"][0]["arguments"][0][0] == prompt
    # The rolling task spans several windows, and generation has real text to compare.
    assert any(len(s["doc"]["text"]) > MAX_LEN for s in got["samples"]["megablock_text"])
    assert all(len(r[0]) > 10 for r in resps(got)["megablock_arith"].values())
    assert_same(ref, got)
    stats = got["config"]["megablock"]["decoding"]["megablock_arith"]
    assert stats["tokens_per_forward"] == 1.0 and stats["requests"] == 4  # AR: one token per forward


def _parallel_worker(rank, world, folder):
    import lm_eval as harness
    from lm_eval.tasks import TaskManager as Manager

    from megablock.inference.harness import MegablockLM as LM

    manager = Manager(include_path=TASKS, include_defaults=False)
    out = {}
    for name, tp in (("tp2", 2), ("dp2", 1)):
        lm = LM(hf_dir=folder, max_length=MAX_LEN, batch_size=2, tp=tp)
        r = harness.simple_evaluate(model=lm, tasks=["megablock_local"], task_manager=manager, limit=4,
                                    num_fewshot=1, log_samples=True, bootstrap_iters=0)
        out[name] = None if r is None else {"samples": r["samples"], "results": r["results"],
                                           "megablock": r["config"]["megablock"]}
    return json.loads(json.dumps(out, default=str))


def test_tp2_and_data_parallel_equal_the_hf_backend(folders, tm):
    ref = evaluate("hf", hf_args(folders["qwen3"]), tm)
    ranks = run_distributed(_parallel_worker, 2, folders["qwen3"])
    tp2, dp2 = ranks[0]["tp2"], ranks[0]["dp2"]
    assert ranks[1] == {"tp2": None, "dp2": None}  # rank 0 alone reports (the harness's rule)
    assert tp2["megablock"]["tp"] == 2 and dp2["megablock"]["dp"] == 2
    assert_same(ref, tp2)
    assert_same(ref, dp2)  # documents split over 2 replicas, merged on rank 0
    assert dp2["megablock"]["decoding"]["megablock_arith"]["requests"] == 4  # both ranks' statistics


# --- stop sequences --------------------------------------------------------------------------------------
def _requests(prompts, until, n=24):
    return [Instance("generate_until", {}, (p, {"until": u, "max_gen_toks": n, "do_sample": False}), i,
                     ("stops", i, 1)) for i, (p, u) in enumerate(zip(prompts, until))]


def test_stop_sequences_cut_where_the_hf_backend_cuts(folders):
    from lm_eval.models.huggingface import HFLM

    prompts = ["To be, or not to be", "The quick brown fox", "In the beginning"]
    hf = HFLM(**hf_args(folders["llama"]), batch_size=2)
    mb = MegablockLM(hf_dir=folders["llama"], max_length=MAX_LEN, batch_size=2)
    free = hf.generate_until(_requests(prompts, [[]] * 3))
    assert mb.generate_until(_requests(prompts, [[]] * 3)) == free
    full = mb.stats["stops"]["new_tokens"]
    # Stop at a piece of each text from its middle (the first place it occurs).
    stops = []
    for text in free:
        piece = next(text[i: i + 2] for i in range(6, len(text) - 2) if text[i: i + 2].isprintable())
        stops.append([piece, "never-generated"])
    want = [t[: t.index(s[0])] for t, s in zip(free, stops)]
    assert all(want) and want != free
    assert hf.generate_until(_requests(prompts, stops)) == want
    mb.stats.clear()
    assert mb.generate_until(_requests(prompts, stops)) == want
    assert mb.stats["stops"]["new_tokens"] < full  # rows ended at the stop, not at max_gen_toks
    # Block decoding cuts at its own first stop too.
    th = MegablockLM(hf_dir=folders["peaked"], mode="threshold", block_size=4, max_length=MAX_LEN)
    texts = th.generate_until(_requests(prompts, [[]] * 3))
    cut = th.generate_until(_requests(prompts, [[t[3:5]] for t in texts]))
    assert cut == [t[: t.index(t[3:5])] for t in texts]


# --- block decoding: speculative == ar, threshold's tokens per forward ---------------------------------------
def test_speculative_equals_ar_and_threshold_reports_tokens_per_forward(folders, tm):
    base = {"hf_dir": folders["peaked"], "max_length": MAX_LEN}
    arith = ("megablock_arith",)
    ar = evaluate("megablock", base, tm, arith)
    spec = evaluate("megablock", {**base, "mode": "speculative", "block_size": 4}, tm, arith)
    assert resps(spec) == resps(ar)
    assert metrics(spec) == metrics(ar)
    s = spec["config"]["megablock"]["decoding"]["megablock_arith"]
    assert s["verified_blocks"] > 0 and 0 <= s["drafts_kept"] <= s["drafts_checked"]
    assert {"mean_drafts_kept", "acceptance_rate", "tokens_per_forward"} <= set(s)

    thr = {**base, "mode": "threshold", "block_size": 4, "threshold": 0.5}
    one, batched = (evaluate("megablock", thr, tm, arith, batch_size=b) for b in (1, 4))
    a, b = (r["config"]["megablock"]["decoding"]["megablock_arith"] for r in (one, batched))
    assert a["new_tokens"] > 0 and a["tokens_per_forward"] == round(a["new_tokens"] / a["forwards"], 4)
    assert a["tokens_per_forward"] > 1  # the peaked model commits several tokens in some steps
    # Per sequence, a row's forwards do not depend on the batch it ran in; the batch's do.
    assert resps(batched) == resps(one) and (b["new_tokens"], b["forwards"]) == (a["new_tokens"], a["forwards"])
    assert b["batch_forwards"] < a["batch_forwards"]


# --- the command ---------------------------------------------------------------------------------------------
def test_command_prints_the_table_and_writes_the_harness_json(folders, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--hf-dir", folders["peaked"], "--mode", "speculative", "--block-size", "4", "--tasks",
            "megablock_arith,megablock_choice", "--limit", "2", "--num_fewshot", "0", "--max-length", str(MAX_LEN),
            "--output_path", str(out), "--log_samples", "--bootstrap_iters", "0"]
    assert tool.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Tasks" in printed and "|n-shot|" in printed and "megablock_choice" in printed  # the harness's table
    assert "exact_match" in printed and "acc_norm" in printed
    assert "megablock_arith: mode speculative, block size 4:" in printed and "drafts kept" in printed
    [results] = glob.glob(str(out / "*" / "results_*.json"))
    r = json.loads(Path(results).read_text())
    assert r["config"]["model"] == "megablock" and r["config"]["model_args"]["mode"] == "speculative"
    assert r["model_name"] == folders["peaked"] and Path(results).parent.name == r["model_name_sanitized"]
    assert r["config"]["megablock"]["decoding"]["megablock_arith"]["drafts_checked"] > 0
    assert set(r["results"]) == {"megablock_arith", "megablock_choice"}
    assert len(glob.glob(str(out / "*" / "samples_megablock_*.jsonl"))) == 2


def _one_error_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    return lines[0]


def test_command_errors_are_one_line(folders, tmp_path, capsys):
    base = ["--hf-dir", folders["llama"], "--limit", "1"]
    assert tool.main(base + ["--tasks", "megablock_arith", "--mode", "fast"]) == 1
    assert _one_error_line(capsys.readouterr().err) == (
        "error: --mode fast is not a decoding mode; use one of ar, threshold, speculative")
    assert tool.main(base + ["--tasks", "megablock_arith", "--mode", "threshold"]) == 1
    assert _one_error_line(capsys.readouterr().err) == (
        "error: --mode threshold needs a block size, --block-size (this model records none it was trained at)")
    assert tool.main(base + ["--tasks", "megablock_arith", "--mode", "threshold", "--block-size", "4"]) == 1
    assert "no mask token" in _one_error_line(capsys.readouterr().err)
    assert tool.main(base + ["--tasks", "megablock_arith", "--include_path", str(tmp_path / "none")]) == 1
    assert "is not a folder" in _one_error_line(capsys.readouterr().err)
    assert tool.main(base + ["--tasks", "megablock_arith,no_such_task"]) == 1  # indexes the harness's tasks
    assert _one_error_line(capsys.readouterr().err).startswith("error: unknown task(s) no_such_task:")


def test_command_a_task_that_needs_a_download(folders, tmp_path):
    """A task whose dataset is on the Hub, run where it cannot be fetched (offline, so it fails at
    once: an unreachable Hub fails the same way after the client's retries); and the exit code."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: megablock-tests/not-downloaded\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: 0\ndoc_to_choice: ['a', 'b']\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "lm_eval.py"), "--hf-dir", folders["llama"],
                           "--tasks", "hub_task", "--include_path", str(tasks)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 1
    line = _one_error_line(proc.stderr)
    assert line.startswith("error: task hub_task needs its dataset downloaded (from the Hugging Face Hub)"), line
    assert "HF_DATASETS_OFFLINE=1" in line
