"""megablock.cli: the tools' shared conventions (exit codes, one-line errors, flags in messages)."""
import argparse
import subprocess
import sys
from pathlib import Path

from megablock.cli import EXIT_ERROR, add_common_flags, as_flags, run_tool

ROOT = Path(__file__).resolve().parents[1]


def _parser():
    p = argparse.ArgumentParser()
    p.add_argument("--block-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--force", action="store_true")
    return add_common_flags(p)


def test_library_argument_names_become_flags():
    msg = "block_size=3 does not divide seq_len=32; pass force=True, or a smaller block_size"
    assert as_flags(msg, _parser()) == "--block-size 3 does not divide --seq-len 32; pass --force, or a smaller block_size"


def test_errors_are_one_line_and_exit_1(capsys):
    def run(args):
        raise ValueError("block_size=3 does not divide seq_len=32")

    assert run_tool(run, _parser().parse_args([]), _parser(), teardown=False) == EXIT_ERROR
    assert capsys.readouterr().err == "error: --block-size 3 does not divide --seq-len 32\n"

    def crash(args):
        raise KeyError("boom")

    assert run_tool(crash, _parser().parse_args([]), _parser(), teardown=False) == EXIT_ERROR
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "error: KeyError: 'boom'" and "--debug" in err[1]
    assert run_tool(crash, _parser().parse_args(["--debug"]), _parser(), teardown=False) == EXIT_ERROR
    assert "Traceback" in capsys.readouterr().err


def test_every_tool_speaks_flags_and_exits_1(tmp_path):
    proc = subprocess.run([sys.executable, "tools/convert_hf.py", "--hf-dir", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "out"), "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"error: --hf-dir {tmp_path / 'nope'} does not exist; pass a Hugging Face model folder"
    usage = subprocess.run([sys.executable, "tools/export_hf.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and "--ckpt" in usage.stderr  # argparse: a malformed command line


def test_expected_errors_are_one_line_not_unexpected(tmp_path, capsys):
    """Issue 25.10: every PreprocessError and TrainingStopped printed "an unexpected error ...
    report it"; TrainingStopped claimed a checkpoint "remains latest" when none existed."""
    from types import SimpleNamespace

    from megablock.commands.preprocess_data import main as preprocess_main
    from megablock.config import load_config
    from megablock.training.checkpointing import Checkpointer
    from megablock.training.trainer import Trainer, TrainingStopped

    assert preprocess_main(["--input", str(tmp_path / "nope.txt"), "--tokenizer", str(tmp_path),
                            "--output-prefix", str(tmp_path / "x"), "--quiet"]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "nope.txt does not exist" in err and "unexpected" not in err and len(err.strip().splitlines()) == 1

    def stopped(args):
        raise TrainingStopped("2 consecutive steps had a non-finite loss")

    assert run_tool(stopped, _parser().parse_args([]), _parser(), teardown=False) == EXIT_ERROR
    assert "unexpected" not in capsys.readouterr().err
    cfg = load_config(None, [f"checkpoint.save_dir={tmp_path / 'run'}"])
    fresh = SimpleNamespace(cfg=cfg, checkpointer=Checkpointer(cfg, SimpleNamespace(rank=0), None,
                                                               SimpleNamespace(lora=None, cfg=None)))
    assert Trainer._what_remains(fresh) == f"No checkpoint was saved in {tmp_path / 'run'} before it stopped"
    (tmp_path / "run" / "step_0000004").mkdir(parents=True)
    (tmp_path / "run" / "step_0000004" / "megablock.json").write_text("{}")
    (tmp_path / "run" / "latest").write_text("step_0000004\n")
    assert "step_0000004" in Trainer._what_remains(fresh) and "remains 'latest'" in Trainer._what_remains(fresh)


def test_generate_reads_jsonl_prompt_files_as_the_benchmarks_and_distillation_do(tmp_path, capsys):
    """tools/generate.py --prompt-file took every line verbatim, so a .jsonl of held-out prompts (the
    benchmarks' and distill_data's format, the only way to pass a prompt that spans lines) was decoded
    as JSON text."""
    import json

    from megablock.commands.generate import build_parser, main, read_prompts

    prompts = ["Woodworking\nWoodworking is the skill of", "ULYSSES.\nAchilles stands"]
    jsonl = tmp_path / "heldout.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p, "corpus": "x"}) + "\n" for p in prompts))
    plain = tmp_path / "prompts.txt"
    plain.write_text("one prompt\n\nanother one\n")
    args = ["--ckpt", str(tmp_path / "no-ckpt"), "--max-new-tokens", "4", "--block-size", "1", "--prompt-file"]
    assert read_prompts(build_parser().parse_args(args + [str(jsonl)])) == prompts
    assert read_prompts(build_parser().parse_args(args + [str(plain)])) == ["one prompt", "another one"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"text": "no prompt field"}\n')
    assert main(args + [str(bad)]) == EXIT_ERROR  # before any model loads
    assert capsys.readouterr().err.strip() == f"error: {bad} line 2: no 'prompt' string"
