"""Config loading: YAML + --set, and load-time errors that name the key and the fix."""
import pytest

from megablock.config import ConfigError, deepspeed_config, load_config, validate_model, validate_parallel_layout
from megablock.model.config import ModelConfig

TINY = "examples/configs/tiny.yaml"


def test_yaml_and_overrides(tmp_path):
    cfg = load_config(TINY, [
        "train.lr=3e-4", "parallel.tensor=2",
        "diffusion.stages=[{block_size: 1, tokens: 4096}, {block_size: 4, tokens: 8192}]",
        "data.prefix=[0.3, a, 0.7, b]",
    ])
    assert cfg.train.lr == 3e-4 and cfg.parallel.tensor == 2
    assert cfg.diffusion.stages[1] == {"block_size": 4, "tokens": 8192}
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


@pytest.mark.parametrize("name", ["tiny.yaml", "quickstart_cpu.yaml", "qwen2.5_7b_cluster.yaml"])
def test_example_configs_load(name):
    cfg = load_config(f"examples/configs/{name}")
    assert cfg.diffusion.stages[0]["block_size"] == 1  # every recipe grows from AR
