"""The typed checkpoint metadata (issue 24): megablock.json files written by earlier megablock
versions keep loading (committed fixtures of the v1 format, metadata only), a write / read round
trip keeps every field, and no code outside checkpoint/format.py reads the metadata by string key."""
import json
import re
import shutil
from pathlib import Path

import pytest

from megablock.checkpoint import format as fmt
from megablock.config import LoraSection

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def _folder(tmp_path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(FIXTURES / f"megablock_json_v1_{name}.json", folder / fmt.METADATA_FILE)
    return folder


def test_v1_converted_checkpoint_loads(tmp_path):
    ckpt = fmt.Checkpoint.open(_folder(tmp_path, "converted"))
    meta = ckpt.meta
    assert (meta.model.arch, meta.model.num_layers, meta.model.qkv_bias) == ("qwen2", 3, True)
    assert (meta.tp, meta.pp, meta.layers_per_stage, meta.dtype) == (2, 1, (3,), "bf16")
    assert (meta.mask_token_id, meta.padded_vocab_size, meta.block_size) == (320, 512, 1)
    # Written before shift / attention were recorded by conversion: the recipe's defaults.
    assert (meta.shift, meta.attention, meta.lora, meta.gated) == (True, "context_causal", None, False)
    assert meta.generation_config == {"eos_token_id": [2, 3], "do_sample": False}
    assert Path(ckpt) == ckpt.path == tmp_path / "converted" and str(ckpt) == str(ckpt.path)


def test_v1_lora_training_checkpoint_loads(tmp_path):
    meta = fmt.read_metadata(_folder(tmp_path, "train_lora"))
    assert (meta.tp, meta.pp, meta.layers_per_stage, meta.step, meta.curriculum_stage) == (1, 2, (1, 2), 12, 1)
    assert meta.lora == LoraSection(enabled=True, rank=4, alpha=8.0, scope="noised")
    assert meta.gated and meta.trainable_parameters == 1234 and meta.source == "hf:/models/tiny-qwen2"


def test_v1_minimal_metadata_takes_the_defaults(tmp_path):
    meta = fmt.read_metadata(_folder(tmp_path, "minimal"))
    defaults = fmt.CheckpointMeta(meta.model)
    assert meta == defaults and meta.mask_token_id is None and meta.format_version == fmt.FORMAT_VERSION


@pytest.mark.parametrize("name", ["converted", "train_lora", "minimal"])
def test_round_trip_keeps_every_field_of_the_old_file(tmp_path, name):
    folder = _folder(tmp_path, name)
    old = json.loads((folder / fmt.METADATA_FILE).read_text())
    meta = fmt.read_metadata(folder)
    fmt.write_metadata(folder, meta)
    assert fmt.read_metadata(folder) == meta
    new = json.loads((folder / fmt.METADATA_FILE).read_text())
    assert {k: new[k] for k in old} == old  # the same file plus the defaults it lacked


def test_bad_values_are_refused_with_the_file_named(tmp_path):
    folder = _folder(tmp_path, "converted")
    raw = json.loads((folder / fmt.METADATA_FILE).read_text())
    (folder / fmt.METADATA_FILE).write_text(json.dumps({**raw, "attention": "sideways"}))
    with pytest.raises(fmt.CheckpointError, match=r"megablock.json.*attention='sideways' is not one of"):
        fmt.read_metadata(folder)
    with pytest.raises(Exception, match="cannot assign"):
        fmt.read_metadata(_folder(tmp_path, "minimal")).tp = 2  # frozen


# A string-key read of the metadata: meta["tp"], meta.get("lora"), src_meta['shift'], or the
# file read straight from JSON (json.loads of megablock.json / METADATA_FILE).
STRING_KEY_READ = re.compile(
    r"""\b\w*meta\w*\s*(\[\s*["']|\.get\(\s*["'])"""
    r"""|json\.loads?\([^)\n]*(megablock\.json|METADATA_FILE)""")


def test_the_pattern_finds_string_key_reads():
    for line in ['meta["tp"]', "source_meta.get('lora')", 'json.loads((d / "megablock.json").read_text())',
                 "json.loads((ckpt / METADATA_FILE).read_text())['model']"]:
        assert STRING_KEY_READ.search(line), line
    for line in ["meta.tp", "ckpt.meta.lora", 'torch.empty(s, device="meta")', "json.loads(path.read_text())"]:
        assert not STRING_KEY_READ.search(line), line


def test_no_string_key_reads_of_checkpoint_metadata_outside_format_py():
    allowed = REPO / "megablock" / "checkpoint" / "format.py"
    found = []
    for folder in ("megablock", "benchmarks", "studies", "scripts", "examples", "tools"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == allowed:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if STRING_KEY_READ.search(line):
                    found.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not found, "read checkpoint metadata through megablock.checkpoint.format.Checkpoint:\n" + "\n".join(found)
