"""LoRA on the tensor-parallel linears: exact start, TP = 2 == TP = 1, merged and PEFT exports,
exact resume with a trainable-only optimizer.

One tiny converted Llama (untied, GQA 4/2 heads, so the grouped qkv layout and the [gate; up]
fc1 packing both matter) serves every test.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megablock.diffusion.batch import build_batch
from megablock.diffusion.layout import AttentionLayout
from megablock.diffusion.loss import block_diffusion_loss
from megablock.testing import randomize_adapters, run_distributed, save_tiny_hf_model

ROOT = Path(__file__).resolve().parents[1]
ENTRY = ROOT / "examples" / "pretrain_nbdiff.py"
CONFIG = ROOT / "examples" / "configs" / "tiny.yaml"
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
L = 16
SETTINGS = dict(rank=4, alpha=8.0, train_mask_token_row=True, train_norms=True)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from megablock.checkpoint.convert import convert

    root = tmp_path_factory.mktemp("lora")
    save_tiny_hf_model(root / "hf", "llama")
    convert(root / "ckpt", hf_dir=root / "hf", mask_token="<|mask|>", progress=False, log=lambda *a: None)
    return root


@pytest.fixture(scope="module")
def single_process():
    from megablock.parallel.state import initialize_parallel

    initialize_parallel(1, 1)


def _tokens(seed=0, batch=2):
    return torch.randint(0, 300, (batch, L), generator=torch.Generator().manual_seed(seed))


def _loss(model, tokens, mask_id, block_size=4):
    batch = build_batch(tokens, torch.arange(tokens.shape[0]), block_size, mask_token_id=mask_id, seed=3)
    logits = model(batch.input_ids, batch.position_ids, batch.layout)
    return block_diffusion_loss(logits, batch.targets, batch.diff_weights, batch.ar_weights, batch.diff_normalizer, 0.5)


def _ar_logits(model, tokens):
    return model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), AttentionLayout("ar", tokens.shape[1], 1))


def test_zero_b_is_exactly_the_base_model(assets, single_process):
    from megablock.checkpoint.loading import load_model
    from megablock.config import LoraSection
    from megablock.model.lora import apply_lora, is_adapter_name

    model, meta = load_model(assets / "ckpt")
    tokens = _tokens()
    base = _loss(model, tokens, meta.mask_token_id)
    apply_lora(model, LoraSection(enabled=True, **SETTINGS), seed=7)
    parts = _loss(model, tokens, meta.mask_token_id)
    # B = 0 and a zero mask-row delta add exact zeros: bit-identical losses.
    assert torch.equal(parts.loss, base.loss) and torch.equal(parts.diffusion_loss, base.diffusion_loss)
    parts.loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if is_adapter_name(n) or "layernorm" in n}
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    grads = {n: p.grad for n, p in model.named_parameters() if n in trainable}
    assert all(grads[n].abs().sum() > 0 for n in grads if n.endswith("lora_B"))
    assert all(grads[n].abs().sum() == 0 for n in grads if n.endswith("lora_A"))  # dL/dA = B^T (...) = 0
    assert grads["embedding.mask_row_delta"].abs().sum() > 0  # block size 4 puts masks in the input


def _tp_worker(rank, world, ckpt, out):
    from megablock.checkpoint import adapters
    from megablock.checkpoint import format as fmt
    from megablock.checkpoint.loading import load_model
    from megablock.config import LoraSection
    from megablock.model import lora
    from megablock.parallel.state import initialize_parallel

    info = initialize_parallel(world, 1)
    model, meta = load_model(ckpt, info)
    settings = LoraSection(enabled=True, **SETTINGS)
    lora.apply_lora(model, settings, seed=7)
    randomize_adapters(model, settings.rank)
    parts = _loss(model, _tokens(1), meta.mask_token_id)
    parts.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, grads)
    full = {n: adapters._merge_factor(model.cfg, n, [g[n] for g in gathered]) for n in grads}
    # Replicated factors (column A, row B, mask row, norms) must get the same gradient on every rank.
    params = dict(model.named_parameters())
    replicated = [n for n in grads if not getattr(params[n], "tensor_model_parallel", False)]
    replicated_equal = all(torch.equal(g[n], gathered[0][n]) for g in gathered for n in replicated)
    # Write this layout's LoRA checkpoint: the base shard in model/, the adapters in lora/.
    base, adapter_weights = lora.split_weights(model.weights())
    fmt.save_shard(out, rank, 0, {k: v.detach() for k, v in base.items()})
    adapters.save_adapter_shard(out, rank, 0, adapter_weights)
    if rank == 0:
        fmt.write_metadata(out, fmt.CheckpointMeta(model.cfg, world, 1, None, "fp32", source="test", lora=settings))
        shutil.copytree(Path(ckpt) / "tokenizer", Path(out) / "tokenizer")
    with torch.no_grad():
        logits = _ar_logits(model, _tokens(2)) if world == 1 else None
    return parts.loss.item(), parts.diffusion_loss.item(), full, replicated_equal, logits


@pytest.fixture(scope="module")
def layouts(assets):
    one = run_distributed(_tp_worker, 1, assets / "ckpt", assets / "lora_tp1")[0]
    two = run_distributed(_tp_worker, 2, assets / "ckpt", assets / "lora_tp2")[0]
    return one, two


def test_tensor_parallel_lora_matches_single_process(layouts):
    (loss1, diff1, grads1, _, _), (loss2, diff2, grads2, replicated_equal, _) = layouts
    # TP splits matmuls and sums partial products (base and LoRA) in another order: fp32 rounding.
    assert abs(loss1 - loss2) < 1e-5 and abs(diff1 - diff2) < 1e-5
    assert set(grads1) == set(grads2) and any(n.endswith("lora_A") for n in grads1)
    for name, g1 in grads1.items():
        assert torch.allclose(g1, grads2[name], atol=1e-5, rtol=1e-4), name
        assert g1.abs().sum() > 0, name
    assert replicated_equal


def _hf_logits(path, tokens, peft_adapter=None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa")
    if peft_adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(peft_adapter))
    with torch.no_grad():
        return model.eval()(tokens).logits


def _compare(mb_logits, hf_logits, mask_id, atol=1e-4):
    keep = [i for i in range(hf_logits.shape[-1]) if i != mask_id]  # megablock never predicts the mask
    return (mb_logits[..., keep] - hf_logits[..., keep]).abs().max().item() < atol


def test_exports_merged_and_peft_separate_give_the_lora_model(assets, layouts, single_process):
    from safetensors.torch import load_file

    from megablock.checkpoint.export import export
    from megablock.checkpoint.loading import load_model

    unmerged = layouts[0][4]
    mask_id = json.loads((assets / "ckpt" / "megablock.json").read_text())["mask_token_id"]
    tokens = _tokens(2)
    quiet = dict(progress=False, log=lambda *a: None)
    for tp in (1, 2):
        export(assets / f"lora_tp{tp}", assets / f"merged_tp{tp}", **quiet)
    # Merged in full-tensor space from either layout: the same HF weights.
    a, b = load_file(assets / "merged_tp1" / "model.safetensors"), load_file(assets / "merged_tp2" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # Merged HF == the unmerged megablock model (fp32; sums in another order): logits to 1e-4.
    merged = _hf_logits(assets / "merged_tp1", tokens)
    assert _compare(unmerged, merged, mask_id)
    # ...and the adapters matter: the base model is far from it.
    export(assets / "ckpt", assets / "base_hf", **quiet)
    assert not _compare(unmerged, _hf_logits(assets / "base_hf", tokens), mask_id, atol=1e-2)
    # Base + PEFT adapter folder (fused qkv / fc1 LoRAs split into q/k/v and gate/up).
    export(assets / "lora_tp2", assets / "separate", lora_separate=True, **quiet)
    config = json.loads((assets / "separate" / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert _compare(unmerged, _hf_logits(assets / "separate", tokens, assets / "separate" / "adapter"), mask_id)
    # The loader merges adapters too (same layout, and resharded from TP = 2).
    for tp in (1, 2):
        model, _ = load_model(assets / f"lora_tp{tp}")
        with torch.no_grad():
            logits = _ar_logits(model, tokens)
        assert _compare(unmerged, logits[..., : merged.shape[-1]], mask_id, atol=1e-5)
    # tools/generate.py and tools/evaluate.py load through megablock.inference: merged there too.
    from megablock.inference.loading import load_checkpoint

    for tp in (1, 2):
        with torch.no_grad():
            logits = _ar_logits(load_checkpoint(assets / f"lora_tp{tp}").model, tokens)
        assert _compare(unmerged, logits[..., : merged.shape[-1]], mask_id, atol=1e-5)


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def data(assets):
    from megablock.data.preprocess import preprocess

    inputs = sorted(str(p) for p in (ROOT / "examples" / "data").glob("*.txt.gz"))
    preprocess(inputs, str(assets / "ckpt" / "tokenizer"), str(assets / "data"), workers=1, progress=False)
    return assets / "data"


def _overrides(assets, save_dir, *extra):
    return [f"model.init_from={assets / 'ckpt'}", f"data.prefix={assets / 'data'}", f"checkpoint.save_dir={save_dir}",
            f"data.cache_dir={assets / 'cache'}", "lora.enabled=true", "lora.rank=4", "lora.alpha=8",
            "train.lr=1e-2", *extra]


def _metrics(save_dir):
    return [json.loads(line) for line in (Path(save_dir) / "metrics.jsonl").read_text().splitlines()]


def _train_in_process(rank, world, assets, save_dir):
    from megablock.config import load_config
    from megablock.training.trainer import Trainer

    trainer = Trainer(load_config(str(CONFIG), _overrides(assets, save_dir)))
    trainer.run()
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    named = dict(trainer.model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    return ({n for n, p in named.items() if id(p) in in_optimizer}, trainable,
            sum(p.numel() for n, p in named.items() if n in trainable), trainer.trainable_parameters)


def test_resume_is_exact_and_optimizer_holds_only_adapters(assets, data, tmp_path):
    reference = tmp_path / "reference"
    in_optimizer, trainable, n_trainable, logged = run_distributed(_train_in_process, 1, assets, reference)[0]
    assert in_optimizer == trainable and all("lora" in n or "mask_row" in n for n in trainable)
    assert logged == n_trainable
    save = tmp_path / "run"
    for extra in (["train.exit_after_steps=2"], ["checkpoint.resume=true"]):
        proc = subprocess.run(
            [sys.executable, str(ENTRY), "--config", str(CONFIG), "--set", *_overrides(assets, save, *extra)],
            env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "trainable parameters: " in proc.stderr
    ref, resumed = _metrics(reference), _metrics(save)
    assert [m["step"] for m in resumed] == [m["step"] for m in ref] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(ref, resumed):
        for key in ("loss", "diffusion_loss", "ar_loss", "grad_norm", "lr", "block_size"):
            assert a[key] == b[key], (a["step"], key)  # bit-exact on CPU in fp32
    # Checkpoint layout: the frozen base in model/ equals init_from; adapters in lora/;
    # DeepSpeed's state holds the trainable parameters only.
    from safetensors.torch import load_file

    step = save / "step_0000006"
    base, init = load_file(step / "model" / "tp00_pp000.safetensors"), load_file(assets / "ckpt" / "model" / "tp00_pp000.safetensors")
    assert base.keys() == init.keys() and all(torch.equal(base[k], init[k]) for k in base)
    adapters = load_file(step / "lora" / "tp00_pp000.safetensors")
    assert set(adapters) == trainable and any(adapters[k].abs().sum() > 0 for k in adapters if k.endswith("lora_B"))
    ref_adapters = load_file(reference / "step_0000006" / "lora" / "tp00_pp000.safetensors")
    assert all(torch.equal(adapters[k], ref_adapters[k]) for k in adapters)
    states = torch.load(next((step / "deepspeed").glob("mp_rank_*_model_states.pt")), weights_only=True)
    assert {k for k in states["module"] if not k.endswith("_extra_state")} == {f"model.{n}" for n in trainable}
    meta = json.loads((step / "megablock.json").read_text())
    assert meta["lora"]["rank"] == 4 and meta["lora"]["trainable_parameters"] == n_trainable


def test_lora_config_validation():
    from megablock.config import ConfigError, load_config

    cfg = load_config(None, ["lora.enabled=true", "lora.target_modules=[linear_qkv, linear_fc2]"])
    assert cfg.lora.rank == 64 and cfg.lora.alpha == 128.0 and cfg.lora.target_modules == ["linear_qkv", "linear_fc2"]
    for bad, words in (("lora.rank=0", "lora.rank"), ("lora.target_modules=[q_proj]", "lora.target_modules=.q_proj. is not one of"),
                       ("lora.dropout=1.5", "lora.dropout"), ("lora.alpha=-1", "lora.alpha")):
        with pytest.raises(ConfigError, match=words):
            load_config(None, ["lora.enabled=true", bad])
