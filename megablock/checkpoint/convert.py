"""Hugging Face (folder or GGUF file) -> sharded megablock checkpoint.

Memory: source tensors are read one at a time (safetensors opened per tensor, torch .bin files
memory-mapped), each full megablock tensor is built, cut into its TP pieces and streamed into the TP
shard files of its pipeline stage, then freed. Peak memory is about one tensor plus the process
itself, at any TP x PP. (A GGUF source is the exception: transformers dequantizes the whole model
into memory first.)

Atomicity: everything is written to `OUT.tmp-<pid>` and renamed to OUT only when complete; on any
error the temporary folder is removed, so a folder named OUT is always a whole checkpoint. OUT may
not be, hold or be inside the source, and --force replaces only a previous conversion output
(megablock.json, model/, tokenizer/), never unrelated files.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from megablock.model.config import ModelConfig, stage_layer_ranges
from megablock.model.params import parameter_count

from . import format as fmt
from .mappings import Family, family_for_hf_config

DEFAULT_MASK_TOKEN = "<|mask|>"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class ConversionError(ValueError):
    """Bad input to a conversion; the message names the problem and the fix."""


# --- sources -----------------------------------------------------------------------------------
class Source:
    """Where HF tensors, config and tokenizer come from. Subclasses fill `shapes` (name -> shape)."""

    description = ""
    raw_config: dict
    hf_config = None
    generation_config: Optional[dict] = None

    def __init__(self):
        self.shapes: dict[str, tuple] = {}
        self.load_tokenizer: Optional[Callable] = None  # None: the source has no tokenizer

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self) -> int:
        return self._nbytes


class SafetensorsSource(Source):
    """A folder of *.safetensors files (single, or sharded with model.safetensors.index.json)."""

    def __init__(self, folder: Path, files: list[Path]):
        super().__init__()
        from safetensors import safe_open

        self.files: dict[str, Path] = {}
        self._nbytes = 0
        for path in files:
            try:
                with safe_open(str(path), "pt") as f:
                    for name in f.keys():
                        shape = tuple(f.get_slice(name).get_shape())
                        self.shapes[name], self.files[name] = shape, path
            except Exception as e:  # SafetensorError: bad header, truncated data
                raise ConversionError(f"{path} is not a valid safetensors file ({e}); re-download or re-save the model") from None
            self._nbytes += path.stat().st_size

    def get(self, name):
        from safetensors import safe_open

        with safe_open(str(self.files[name]), "pt") as f:  # opened per tensor: only its pages are touched
            return f.get_tensor(name)


class TorchBinSource(Source):
    """pytorch_model.bin files, memory-mapped so only the tensors read are paged in."""

    def __init__(self, folder: Path, files: list[Path]):
        super().__init__()
        self.tensors: dict[str, torch.Tensor] = {}
        self._nbytes = 0
        for path in files:
            try:
                sd = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:
                raise ConversionError(f"{path} cannot be read as a torch checkpoint ({e}); re-download or re-save the model") from None
            self.tensors.update(sd)
            self._nbytes += path.stat().st_size
        self.shapes = {n: tuple(t.shape) for n, t in self.tensors.items()}

    def get(self, name):
        return self.tensors[name]


class FolderSource:
    """Config, generation config and tokenizer of an HF folder, plus one of the weight readers."""

    @staticmethod
    def open(folder) -> Source:
        folder = Path(folder)
        if not folder.is_dir():
            raise ConversionError(f"hf_dir={folder} does not exist; pass a Hugging Face model folder")
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ConversionError(f"no config.json in {folder}; pass a Hugging Face model folder (save_pretrained output)")
        try:
            raw = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ConversionError(f"{config_path} is not valid JSON ({e}); re-download or re-save the model") from None
        family_for_hf_config(raw)  # unknown architecture: fail before reading any weights
        src = _weights(folder)
        from transformers import AutoConfig

        src.raw_config, src.hf_config = raw, AutoConfig.from_pretrained(str(folder))
        src.description = f"hf:{folder.resolve()}"
        gen = folder / "generation_config.json"
        src.generation_config = json.loads(gen.read_text()) if gen.is_file() else None
        if any((folder / n).is_file() for n in _TOKENIZER_FILES):
            from transformers import AutoTokenizer

            src.load_tokenizer = lambda: AutoTokenizer.from_pretrained(str(folder))
        return src


def _weights(folder: Path) -> Source:
    for index_name, cls in (("model.safetensors.index.json", SafetensorsSource), ("pytorch_model.bin.index.json", TorchBinSource)):
        index = folder / index_name
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index} is corrupt ({e}); re-download or re-save the model") from None
            missing = [f for f in files if not (folder / f).is_file()]
            if missing:
                raise ConversionError(f"{index} lists {missing[0]}, which is missing; the download is incomplete")
            return cls(folder, [folder / f for f in files])
    st = sorted(folder.glob("*.safetensors"))
    if st:
        return SafetensorsSource(folder, st)
    if (folder / "pytorch_model.bin").is_file():
        return TorchBinSource(folder, [folder / "pytorch_model.bin"])
    raise ConversionError(
        f"no weights in {folder}: expected model.safetensors (or a sharded index) or pytorch_model.bin"
    )


class GGUFSource(Source):
    """A GGUF file, dequantized into memory by transformers (needs the `gguf` package)."""

    def __init__(self, path):
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise ConversionError(f"gguf={path} does not exist; pass a .gguf file")
        try:
            import accelerate  # noqa: F401  (transformers 5 requires it for GGUF)
            import gguf  # noqa: F401
        except ImportError:
            raise ConversionError("reading GGUF needs the gguf and accelerate packages: pip install gguf accelerate") from None
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        except Exception as e:
            raise ConversionError(f"cannot load {path} as a GGUF model ({type(e).__name__}: {e})") from None
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        self.raw_config = config.to_diff_dict()
        self.raw_config.pop("quantization_config", None)
        self.raw_config["architectures"] = [type(model).__name__]
        family_for_hf_config(self.raw_config)
        self.hf_config = config
        self.generation_config = model.generation_config.to_diff_dict() if model.generation_config else None
        self.state = {k: v.detach() for k, v in model.state_dict().items()}
        self.shapes = {k: tuple(v.shape) for k, v in self.state.items()}
        self._nbytes = sum(v.numel() * v.element_size() for v in self.state.values())
        self.description = f"gguf:{path.resolve()}"
        self.load_tokenizer = lambda: AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

    def get(self, name):
        return self.state[name]


# --- mask token ----------------------------------------------------------------------------------
def apply_mask_token(tokenizer, cfg: ModelConfig, mask_token: Optional[str], explicit: bool, warn: Callable) -> list[int]:
    """Choose or add the mask token; sets cfg.mask_token_id (and grows cfg.vocab_size when the id
    is past the embedding). Returns the rows to initialise to the mean row (a newly added token)."""
    if mask_token is None:
        return []
    if tokenizer is None:
        if explicit:
            raise ConversionError(f"mask_token={mask_token!r} needs a tokenizer, and the source has none; "
                                  "add the tokenizer files, or convert without a mask token")
        warn(f"warning: the source has no tokenizer; mask token id {cfg.vocab_size} added to the embedding only")
        cfg.mask_token_id, cfg.vocab_size = cfg.vocab_size, cfg.vocab_size + 1
        return [cfg.mask_token_id]
    vocab = tokenizer.get_vocab()
    if mask_token in vocab:
        tid = vocab[mask_token]
        if tid >= cfg.vocab_size:
            raise ConversionError(f"mask token {mask_token!r} has id {tid}, past the model's {cfg.vocab_size} embedding rows")
        tokenizer.mask_token = mask_token
        cfg.mask_token_id = tid
        return []
    if explicit:
        raise ConversionError(
            f"mask token {mask_token!r} is not in the tokenizer's vocabulary; pick an existing token, "
            f"let conversion add {DEFAULT_MASK_TOKEN}, or convert without a mask token"
        )
    tokenizer.add_special_tokens({"mask_token": mask_token})
    tid = tokenizer.convert_tokens_to_ids(mask_token)
    cfg.mask_token_id = tid
    cfg.vocab_size = max(cfg.vocab_size, tid + 1)
    return [tid]


def previous_diffusion_settings(raw: dict, cfg: ModelConfig, mask_token: Optional[str]) -> dict:
    """Metadata fields for a fresh conversion; a source exported by megablock (config.json with
    block-diffusion settings) keeps its block size, shift, attention and, with --no-mask-token,
    its mask token id."""
    if mask_token is None and raw.get("mask_token_id") is not None:
        cfg.mask_token_id = raw["mask_token_id"]
    out = {"block_size": raw.get("block_size") or 1}
    if "diffusion_shift" in raw:
        out["shift"] = bool(raw["diffusion_shift"])
    if "diffusion_attention" in raw:
        out["attention"] = raw["diffusion_attention"]
    return out


# --- conversion ----------------------------------------------------------------------------------
# What each tool writes at the top of its output folder: --force replaces a folder holding only
# these (a previous output of the same tool), never anything else.
CONVERT_OUTPUT = frozenset({fmt.METADATA_FILE, fmt.MODEL_DIR, fmt.TOKENIZER_DIR})


def _overlap(out: Path, source: Path) -> Optional[str]:
    if out == source:
        return "is"
    if out in source.parents:
        return "holds"
    if source in out.parents:
        return "is inside"
    return None


def prepare_out(out, force: bool, sources=(), owned=lambda name: name in CONVERT_OUTPUT,
                marker: str = fmt.METADATA_FILE) -> tuple[Path, Path]:
    """Check OUT can be written; return (out, temporary folder next to it).

    OUT may never be, hold or be inside a source (replacing it would delete what is being read,
    e.g. `export_hf.py --ckpt runs/A --out runs/A --force` wiping the run), with or without
    --force. --force replaces a non-empty OUT only when it holds the tool's `marker` file (file
    names alone cannot tell an earlier output from a real model with the same names) and
    everything in it is something this tool writes (`owned(name)`): nothing else is deleted."""
    out = Path(out).resolve()
    for source in sources:
        if source is None:
            continue
        source = Path(source).resolve()
        relation = _overlap(out, source)
        if relation:
            raise ConversionError(
                f"out={out} {relation} the source {source}; writing there would delete or mix with what is "
                f"being read (even with force=True): choose an output folder outside {source}"
            )
    if out.exists() and not out.is_dir():
        raise ConversionError(f"out={out} exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ConversionError(f"out={out} is not empty; choose an empty folder or pass force=True to replace it")
        _check_only_owned(out, owned, marker)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    return out, tmp


def _check_only_owned(out: Path, owned, marker: str) -> None:
    foreign = sorted(p.name for p in out.iterdir() if not owned(p.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConversionError(
            f"out={out} holds files this tool does not write ({shown}); force=True replaces only a previous "
            f"output of this tool. Move them away or choose another output folder"
        )
    if not (out / marker).is_file():
        raise ConversionError(
            f"out={out} has no {marker}, so it is not an earlier output of this tool (a real model, or an output "
            f"of an older megablock): force=True replaces only folders this tool wrote. Choose another output "
            f"folder, or delete {out} yourself if it is yours to replace"
        )


def finish_out(tmp: Path, out: Path, owned=lambda name: name in CONVERT_OUTPUT, marker: str = fmt.METADATA_FILE) -> None:
    """Move the finished temporary folder into place, replacing OUT when --force allowed it: the
    old OUT is renamed aside first and deleted last, so an interruption leaves the old or the new
    folder complete (plus the aside copy), never neither."""
    if out.exists():
        if any(out.iterdir()):  # an empty folder holds nothing to lose
            _check_only_owned(out, owned, marker)  # again: files may have appeared while we were writing
        aside = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, aside)
        os.replace(tmp, out)
        shutil.rmtree(aside)
    else:
        os.replace(tmp, out)


def check_source(src: Source, family: Family, cfg: ModelConfig, mean_rows: list[int]) -> None:
    """Every tensor the mappings need exists with the shape the config implies (checked on meta
    tensors, before anything is written)."""
    expected = fmt.full_shapes(cfg, 1)

    def meta_get(name):
        if name not in src.shapes:
            raise ConversionError(
                f"the weights lack {name} (needed for {family.hf_class}); the source is incomplete or not a "
                f"{family.hf_class} checkpoint"
            )
        return torch.empty(src.shapes[name], device="meta")

    for b in family.params(cfg):
        try:
            got = tuple(b.to_megablock(meta_get, cfg, mean_rows).shape)
        except RuntimeError as e:
            raise ConversionError(f"weights for {b.name} do not match config.json ({e})") from None
        if got != expected[b.name]:
            shapes = {n: src.shapes[n] for n in b.hf_names()}
            raise ConversionError(f"weights {shapes} do not match config.json (expected {b.name} {expected[b.name]})")


def convert(out, hf_dir=None, gguf=None, tp: int = 1, pp: int = 1, mask_token: Optional[str] = DEFAULT_MASK_TOKEN,
            explicit_mask: bool = False, dtype: str = "fp32", layers_per_stage: Optional[list] = None,
            force: bool = False, progress: bool = True, log: Callable = print) -> dict:
    """Convert an HF folder (`hf_dir`) or GGUF file (`gguf`) into a megablock checkpoint at `out`.

    mask_token: token text to use as the diffusion mask (added as a special token with a mean-row
    embedding when absent, unless `explicit_mask`, which requires it to exist); None leaves the
    model and tokenizer untouched. Returns a summary dict.
    """
    start = time.time()
    if (hf_dir is None) == (gguf is None):
        raise ConversionError("pass exactly one of hf_dir or gguf")
    if tp < 1 or pp < 1:
        raise ConversionError(f"tp={tp} and pp={pp} must both be >= 1")
    if dtype not in fmt.DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not supported; use one of {', '.join(fmt.DTYPES)}")
    out, tmp = prepare_out(out, force, sources=[hf_dir, gguf])

    src = FolderSource.open(hf_dir) if hf_dir is not None else GGUFSource(gguf)
    family = family_for_hf_config(src.raw_config)
    cfg = family.model_config(src.hf_config, src.raw_config)
    cfg.check_parallel(tp, pp)
    ranges = stage_layer_ranges(cfg.num_layers, pp, layers_per_stage)
    tokenizer = src.load_tokenizer() if src.load_tokenizer else None
    warn = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    mean_rows = apply_mask_token(tokenizer, cfg, mask_token, explicit_mask, warn)
    diffusion = previous_diffusion_settings(src.raw_config, cfg, mask_token)
    check_source(src, family, cfg, mean_rows)

    torch_dtype = fmt.DTYPES[dtype]
    lps = [len(r) for r in ranges]
    total = sum(len(fmt.stage_param_names(cfg, pp, s, lps)) for s in range(pp))
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="convert", unit="tensor", disable=not progress)
        for stage in range(pp):
            specs = {n: (s, torch_dtype) for n, s in fmt.shard_shapes(cfg, tp, pp, stage, lps).items()}
            writers = [fmt.SafetensorsWriter(fmt.shard_path(tmp, r, stage), specs) for r in range(tp)]
            try:
                for name in specs:
                    b = family.find(name, cfg)
                    full = b.to_megablock(src.get, cfg, mean_rows).to(torch_dtype)
                    for r, w in enumerate(writers):
                        w.write(name, b.split(full, tp, r, cfg))
                    del full
                    bar.update()
                for w in writers:
                    w.close()
            except BaseException:
                for w in writers:
                    w.abort()
                raise
        bar.close()
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / fmt.TOKENIZER_DIR))
        meta = fmt.CheckpointMeta(
            cfg, tp, pp, lps, dtype, src.description, step=0, curriculum_stage=0,
            generation_config=src.generation_config, **diffusion,
        )
        fmt.write_metadata(tmp, meta)
        finish_out(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_params = parameter_count(cfg)[1]
    summary = {
        "out": str(out), "arch": cfg.arch, "parameters": n_params, "shards": tp * pp, "tp": tp, "pp": pp,
        "vocab_size": cfg.vocab_size, "padded_vocab_size": cfg.padded_vocab_size(tp),
        "mask_token_id": cfg.mask_token_id, "dtype": dtype, "source_bytes": src.nbytes(),
        "seconds": round(time.time() - start, 2),
    }
    log(f"converted {cfg.arch} ({n_params:,} parameters) into {tp * pp} shards (tp={tp}, pp={pp}, {dtype}) "
        f"at {out} in {summary['seconds']} s")
    return summary
