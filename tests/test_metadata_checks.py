"""megablock.json that contradicts its shards is rejected at load and export (issue 13)."""
import json
import shutil
from pathlib import Path

import pytest

from megablock.checkpoint import format as fmt
from megablock.checkpoint.convert import convert
from megablock.checkpoint.export import export
from megablock.testing import save_tiny_hf_model

quiet = dict(progress=False, log=lambda *a: None)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta")
    save_tiny_hf_model(root / "hf", "llama")
    convert(root / "ckpt", hf_dir=root / "hf", **quiet)
    return root / "ckpt"


def _edited(ckpt, tmp_path, edit):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    meta = json.loads((bad / fmt.METADATA_FILE).read_text())
    edit(meta)
    (bad / fmt.METADATA_FILE).write_text(json.dumps(meta))
    return bad


def _fewer_layers(m):
    m["model"]["num_layers"] = 1
    m["layers_per_stage"] = [1]


def _other_vocab(m):
    m["model"]["vocab_size"] = m["vocab_size"] = 256
    m["padded_vocab_size"] = 256
    m["model"]["mask_token_id"] = m["mask_token_id"] = 255


def _mask_past_vocab(m):
    m["model"]["mask_token_id"] = m["mask_token_id"] = m["vocab_size"] + 3


def _qk_norm(m):
    m["model"]["qk_norm"] = True


def _eos_past_vocab(m):
    m["model"]["eos_token_id"] = m["vocab_size"] + 7


def _generation_eos_past_vocab(m):
    m["generation_config"] = {"eos_token_id": [0, m["vocab_size"]]}


def _mask_is_a_bool(m):
    m["model"]["mask_token_id"] = m["mask_token_id"] = True


@pytest.mark.parametrize("edit, message", [
    # Issue 25.11: export ignored these (generate refused the qk_norm one).
    (_qk_norm, r"model.qk_norm is True but a llama checkpoint has no query/key norms"),
    (_eos_past_vocab, r"model.eos_token_id \d+ is outside the vocabulary"),
    (_generation_eos_past_vocab, r"generation_config.eos_token_id \[0, \d+\] is outside the vocabulary"),
    (_mask_is_a_bool, r"mask_token_id True is outside the vocabulary"),
    (_fewer_layers, r"contradicts its shards: model/tp00_pp000.safetensors holds layers\.1\."),
    (_other_vocab, r"contradicts its shards: .* has embedding.weight of shape \[\d+, 64\] where megablock.json implies \[256, 64\]"),
    (_mask_past_vocab, r"mask_token_id \d+ is outside the vocabulary|invalid model config"),
])
def test_contradicting_metadata_is_rejected(ckpt, tmp_path, edit, message):
    fmt.read_metadata(ckpt)  # the intact checkpoint reads
    bad = _edited(ckpt, tmp_path, edit)
    with pytest.raises(fmt.CheckpointError, match=message):
        fmt.read_metadata(bad)
    with pytest.raises(fmt.CheckpointError, match=message):
        export(bad, tmp_path / "hf", **quiet)
    assert not (tmp_path / "hf").exists()
