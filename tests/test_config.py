"""Config loading: YAML + --set, and load-time errors that name the key and the fix."""
import pytest

from megablock.config import ConfigError, Stage, deepspeed_config, load_config, validate_model, validate_parallel_layout
from megablock.model.config import ModelConfig

TINY = "examples/configs/tiny.yaml"


def test_yaml_and_overrides(tmp_path):
    cfg = load_config(TINY, [
        "train.lr=3e-4", "parallel.tensor=2",
        "diffusion.stages=[{block_size: 1, tokens: 4096}, {block_size: 4, tokens: 8192}]",
        "data.prefix=[0.3, a, 0.7, b]",
    ])
    assert cfg.train.lr == 3e-4 and cfg.parallel.tensor == 2
    assert cfg.diffusion.stages[1] == Stage(block_size=4, tokens=8192)
    assert cfg.data.prefix == [0.3, "a", 0.7, "b"]
    assert cfg.data.seq_len == 32  # untouched keys keep the file's values


@pytest.mark.parametrize("override, words", [
    (["train.lrr=1"], ["train.lrr", "'lr'"]),
    (["diffusion.atention=full"], ["diffusion.atention", "'attention'"]),
    (["trian.lr=1"], ["trian", "'train'"]),
    (["diffusion.stages=[{block_size: 3}]"], ["block_size 3", "data.seq_len 32"]),
    (["train.global_batch_size=5"], ["train.global_batch_size=5", "micro_batch_size=2"]),
    (["parallel.pipeline=2", "parallel.zero_stage=2"], ["parallel.zero_stage=2", "zero_stage=1"]),
    (["diffusion.attention=sideways"], ["diffusion.attention", "context_causal"]),
    (["train.lr=fast"], ["train.lr='fast'", "float"]),
    (["diffusion.clip_min=0.9"], ["clip_min", "clip_max"]),
    (["diffusion.attention=block_causal"], ["ar_loss_weight=0.5", "block_causal", "ar_loss_weight=0"]),
    # Every value is checked when the config loads, before anything is built.
    (["train.log_interval=0"], ["train.log_interval=0", ">= 1"]),
    (["train.max_nonfinite_steps=0"], ["train.max_nonfinite_steps=0", ">= 1"]),
    (["diffusion.position_strength=5"], ["diffusion.position_strength=5", "[0, 1]"]),
    (["checkpoint.interval=-1"], ["checkpoint.interval=-1", ">= 0"]),
    (["train.eval_interval=-3"], ["train.eval_interval=-3", ">= 0"]),
    (["train.lr=0"], ["train.lr=0.0", "> 0"]),
    (["train.betas=[0.9]"], ["train.betas=[0.9]", "two numbers"]),
    (["train.betas=[0.9, 1.5]"], ["train.betas", "[0, 1)"]),
    (["data.split=90,10"], ["data.split='90,10'", "three"]),
    (["train.eval_batches=0"], ["train.eval_batches=0", ">= 1"]),
    (["parallel.zero_stage=4"], ["parallel.zero_stage=4", "[0, 1, 2, 3]"]),
    (["diffusion.schedule=cosine"], ["diffusion.schedule='cosine'", "linear"]),
    (["lora.target_modules=[linear_qkv, q_proj]"], ["lora.target_modules='q_proj'", "linear_fc1"]),
    (["diffusion.stages=[{block_size: 1, tokens: 5"], ["--set diffusion.stages", "not valid YAML"]),
])
def test_bad_input_names_key_and_fix(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, override)
    for word in words:
        assert word in str(err.value)


def test_batch_arithmetic_and_deepspeed_config():
    cfg = load_config(TINY, ["train.global_batch_size=8", "train.micro_batch_size=2", "parallel.tensor=2"])
    assert validate_parallel_layout(cfg, world_size=4) == 2  # DP = 2, accumulation = 8 / (2 x 2)
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_batch_size"] == 8 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2
    with pytest.raises(ConfigError, match="launch a multiple of 2"):
        validate_parallel_layout(cfg, world_size=3)
    cfg = load_config(TINY, ["train.global_batch_size=6", "train.micro_batch_size=2"])
    with pytest.raises(ConfigError, match="multiple of micro_batch_size x data-parallel size = 2 x 2"):
        validate_parallel_layout(cfg, world_size=2)


def test_model_divisibility_is_checked_against_parallel_sizes():
    model = ModelConfig(num_attention_heads=6, num_kv_heads=3, hidden_size=96, intermediate_size=96, num_layers=2)
    with pytest.raises(ConfigError, match="num_kv_heads=3"):
        validate_model(load_config(TINY, ["parallel.tensor=2"]), model)
    with pytest.raises(ConfigError, match="pipeline parallel size 4 exceeds num_layers=2"):
        validate_model(load_config(TINY, ["parallel.pipeline=4"]), model)
    with pytest.raises(ConfigError, match="no mask token"):
        validate_model(load_config(TINY), model)  # tiny.yaml grows to B = 4: needs a mask token
    model.mask_token_id = 5
    validate_model(load_config(TINY, ["parallel.tensor=3"]), model)


@pytest.mark.parametrize("name", ["tiny.yaml", "quickstart_cpu.yaml", "qwen2.5_7b_cluster.yaml", "qwen3_8b_cluster.yaml"])
def test_example_configs_load(name):
    cfg = load_config(f"examples/configs/{name}")
    assert cfg.diffusion.stages[0].block_size == 1  # every recipe grows from AR


def test_malformed_yaml_file_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 1e-3\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+ is not valid YAML"):
        load_config(str(bad))


def test_training_entry_prints_one_line_and_exits_1(tmp_path):
    """Any error of the training command is one line with the cause (a traceback with --debug)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "examples/pretrain_nbdiff.py", "--config", TINY, "--set", "train.log_interval=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["error: train.log_interval=0: must be >= 1"]
    missing = subprocess.run(cmd[:-2] + ["--set", f"model.init_from={tmp_path / 'nowhere'}",
                                         f"data.prefix={tmp_path / 'd'}", "--debug"],
                             capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 1 and "Traceback" in missing.stderr
    assert missing.stderr.strip().splitlines()[-1].startswith("error: checkpoint folder")


@pytest.mark.parametrize("override", ["train.lr=.inf", "train.weight_decay=.inf", "train.grad_clip=.nan",
                                      "diffusion.eps=-.inf"])
def test_non_finite_numbers_are_refused(override):
    """Issue 25.11: train.lr=.inf and train.weight_decay=.inf passed validation (.inf > 0)."""
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}=.* must be a finite number"):
        load_config(TINY, [override])


def test_config_file_errors_name_the_file(tmp_path):
    """Issue 25.10 / 25.11: a second `train:` section silently dropped the first's keys; a
    non-UTF8 file and a top-level list were unexpected errors (UnicodeDecodeError, AttributeError)."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  steps: 5\ndata:\n  seq_len: 32\ntrain:\n  lr: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"twice.yaml line 5 .*the key 'train' appears twice \(lines 1 and 5\)"):
        load_config(str(twice))
    with pytest.raises(ConfigError, match=r"--set train: .*'lr' appears twice"):
        load_config(None, ["train={lr: 1, lr: 2}"])
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("train:\n  lr: 1.0e-4  # r\xe9glage\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin.yaml is not UTF-8 text \(byte 24"):
        load_config(str(latin))
    listed = tmp_path / "list.yaml"
    listed.write_text("- train:\n    lr: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"list.yaml should be a mapping of sections .* got a list"):
        load_config(str(listed))


def test_seq_len_past_the_models_positions_is_warned(caplog):
    """Issue 25.12: data.seq_len=512 on a model with 256 positions said nothing."""
    import logging

    from megablock.training.setup import warn_past_positions

    model = ModelConfig(arch="llama", vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_attention_heads=4, num_kv_heads=2, max_position_embeddings=256)
    with caplog.at_level(logging.WARNING, logger="megablock.training.setup"):
        warn_past_positions(load_config(TINY, ["data.seq_len=512"]), model)
        warn_past_positions(load_config(TINY, ["data.seq_len=256"]), model)
    [record] = caplog.records
    assert "data.seq_len=512 is longer than the model's 256 positions" in record.message and "256..511" in record.message
