"""`--force` of convert_hf.py / export_hf.py (issue 13): never deletes a folder that is, holds or
is inside the source, and replaces only what the tool itself writes."""
import importlib.util
import shutil
from pathlib import Path

import pytest

from megablock.checkpoint.convert import ConversionError, convert
from megablock.checkpoint.export import export
from megablock.testing import save_tiny_hf_model

ROOT = Path(__file__).resolve().parents[1]
quiet = dict(progress=False, log=lambda *a: None)


def _tool(name: str):
    """tools/NAME.py as a module, without putting tools/ on sys.path (where tools/lm_eval.py would
    shadow the lm_eval package for every later import)."""
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("force")
    save_tiny_hf_model(root / "hf", "llama")
    convert(root / "ckpt", hf_dir=root / "hf", **quiet)
    return root


def _tree(path: Path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _training_run(models, tmp_path):
    """runs/A as training leaves it: step folders, latest, metrics, TensorBoard."""
    run = tmp_path / "runs" / "A"
    shutil.copytree(models / "ckpt", run / "step_0000006")
    (run / "latest").write_text("step_0000006\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "tensorboard").mkdir()
    return run


def test_export_never_replaces_its_source(models, tmp_path):
    run = _training_run(models, tmp_path)
    before = _tree(run)
    for out in (run, run.parent, run / "step_0000006", run / "step_0000006" / "hf"):
        with pytest.raises(ConversionError, match="the source"):
            export(run, out, force=True, **quiet)
    assert _tree(run) == before  # nothing deleted, nothing added

    export_hf = _tool("export_hf")

    assert export_hf.main(["--ckpt", str(run), "--out", str(run), "--force", "--quiet"]) == 1
    assert _tree(run) == before


def test_convert_never_replaces_its_source(models, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(models / "hf", hf)
    before = _tree(hf)
    for out in (hf, tmp_path, hf / "mb"):
        with pytest.raises(ConversionError, match="the source"):
            convert(out, hf_dir=hf, force=True, **quiet)
    assert _tree(hf) == before

    convert_hf = _tool("convert_hf")

    assert convert_hf.main(["--hf-dir", str(hf), "--out", str(hf), "--force", "--quiet"]) == 1
    assert _tree(hf) == before


def test_force_replaces_only_what_the_tool_writes(models, tmp_path):
    out = tmp_path / "out"
    export(models / "ckpt", out, **quiet)
    first = _tree(out)
    export(models / "ckpt", out, force=True, **quiet)  # a previous export: replaced
    assert _tree(out) == first
    (out / "notes.md").write_text("my notes")
    with pytest.raises(ConversionError, match=r"holds files this tool does not write \(notes.md\)"):
        export(models / "ckpt", out, force=True, **quiet)
    assert (out / "notes.md").read_text() == "my notes" and _tree(out) == sorted(first + ["notes.md"])

    conv = tmp_path / "conv"
    convert(conv, hf_dir=models / "hf", **quiet)
    convert(conv, hf_dir=models / "hf", force=True, **quiet)
    (conv / "deepspeed").mkdir()  # e.g. a training step folder given as --out by mistake
    with pytest.raises(ConversionError, match="deepspeed"):
        convert(conv, hf_dir=models / "hf", force=True, **quiet)
    assert (conv / "deepspeed").is_dir() and (conv / "megablock.json").is_file()
    assert not list(tmp_path.glob("*.tmp-*")) and not list(tmp_path.glob("*.old-*"))


def test_export_force_never_replaces_a_real_model(models, tmp_path):
    """Issue 25.4: ownership judged by file names replaced a real model.safetensors. Only a folder
    with the export marker (an earlier export) may be replaced."""
    export_hf = _tool("export_hf")
    from megablock.checkpoint.export import EXPORT_MARKER

    real = tmp_path / "real"
    export(models / "ckpt", real, **quiet)
    (real / EXPORT_MARKER).unlink()  # now: a model folder with exactly the names export writes
    (real / "model.safetensors").write_bytes(b"the user's real weights")
    before = {p.name: p.read_bytes() for p in real.iterdir()}
    with pytest.raises(ConversionError, match=f"has no {EXPORT_MARKER}, so it is not an earlier output"):
        export(models / "ckpt", real, force=True, **quiet)
    assert export_hf.main(["--ckpt", str(models / "ckpt"), "--out", str(real), "--force", "--quiet"]) == 1
    assert {p.name: p.read_bytes() for p in real.iterdir()} == before  # byte-identical
    assert not list(tmp_path.glob("*.tmp-*")) and not list(tmp_path.glob("*.old-*"))

    # convert_hf.py --force likewise needs its own megablock.json in the folder.
    mine = tmp_path / "mine"
    (mine / "model").mkdir(parents=True)
    (mine / "model" / "keep.bin").write_bytes(b"mine")
    with pytest.raises(ConversionError, match="has no megablock.json"):
        convert(mine, hf_dir=models / "hf", force=True, **quiet)
    assert (mine / "model" / "keep.bin").read_bytes() == b"mine"
