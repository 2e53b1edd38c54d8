"""What makes an exported folder a release: remote code that decodes it with transformers alone,
and a model card (docs/release_folder.md).

Remote code: three files beside the weights, and `auto_map` in config.json pointing at them:
- modeling_megablock.py, configuration_megablock.py: copied from megablock/checkpoint/remote/;
  each family's class subclasses its transformers class and adds `block_generate`;
- block_rules.py: megablock.diffusion.block_rules copied verbatim (the decoding rules and both
  loops, torch only), which the modeling file imports relatively.
`architectures` and `model_type` stay the family's, so without trust_remote_code the folder is
the plain AR model, and tools/convert_hf.py reads it as any HF folder (it ignores the .py files;
the export never carries a source's `auto_map` over, it writes its own or none).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import yaml

from megablock.checkpoint.format import CheckpointMeta
from megablock.diffusion import block_rules

REMOTE_SOURCE = Path(__file__).with_name("remote")
MODELING, CONFIGURATION, RULES = "modeling_megablock.py", "configuration_megablock.py", "block_rules.py"
REMOTE_FILES = (MODELING, CONFIGURATION, RULES)
MODEL_CARD = "README.md"


def rules_source() -> Path:
    """The module every export copies as block_rules.py."""
    return Path(block_rules.__file__)


def remote_class_names(hf_class: str) -> tuple[str, str]:
    """(model class, config class) of the remote code for a family's transformers class."""
    return f"Megablock{hf_class}", f"Megablock{hf_class.replace('ForCausalLM', 'Config')}"


def write_remote_code(folder: Path, hf_class: str) -> dict:
    """Copy the three files into `folder`; returns config.json's `auto_map`."""
    for name in (MODELING, CONFIGURATION):
        shutil.copyfile(REMOTE_SOURCE / name, folder / name)
    shutil.copyfile(rules_source(), folder / RULES)
    model_cls, config_cls = remote_class_names(hf_class)
    if f"class {model_cls}(" not in (REMOTE_SOURCE / MODELING).read_text():
        raise RuntimeError(f"{REMOTE_SOURCE / MODELING} has no {model_cls}; add the family there")
    return {"AutoConfig": f"{CONFIGURATION[:-3]}.{config_cls}",
            "AutoModelForCausalLM": f"{MODELING[:-3]}.{model_cls}"}


# --- model card ---------------------------------------------------------------------------------------
def _run_record(ckpt: Path) -> tuple[dict, dict, Optional[dict]]:
    """(run config, trainer state, last held-out record at or before the checkpoint's step) of a
    training checkpoint; empty for a converted one."""
    config = yaml.safe_load((ckpt / "config.yaml").read_text()) if (ckpt / "config.yaml").is_file() else {}
    state = json.loads((ckpt / "trainer_state.json").read_text()) if (ckpt / "trainer_state.json").is_file() else {}
    held_out, metrics = None, ckpt.parent / "metrics.jsonl"
    if metrics.is_file() and state:
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if any(k.startswith("val_") for k in rec) and rec.get("step", 0) <= state.get("step", 0):
                held_out = rec
    return config or {}, state, held_out


def model_card(meta: CheckpointMeta, ckpt: Path, hf_class: str, remote_code: bool, drafter: bool) -> str:
    """README.md of the folder: base model, recipe, held-out numbers where the run has them, and
    how to decode."""
    run, state, held_out = _run_record(ckpt)
    diffusion = run.get("diffusion", {})
    B = meta.block_size
    lines = ["---", "library_name: transformers", "tags: [block-diffusion, megablock]", "---", "",
             f"# Block-diffusion {hf_class} (megablock export)", "",
             f"- Base model: `{meta.source}`",
             f"- Block size: {B}; attention: {meta.attention}; "
             f"token shift: {meta.shift}; mask token id: {meta.mask_token_id}"]
    if diffusion.get("stages"):
        stages = ", ".join(f"B={s['block_size']} for {s['tokens'] if s.get('tokens') else 'the rest'}"
                           + (" tokens" if s.get("tokens") else "") for s in diffusion["stages"])
        lines.append(f"- Curriculum stages: {stages}")
    if state:
        lines.append(f"- Trained {state.get('step')} steps, {state.get('consumed_tokens')} tokens "
                     f"(stopped in stage {state.get('curriculum_stage')}, block size {state.get('block_size')})")
    else:
        lines.append("- Not trained for block diffusion yet (a converted checkpoint)")
    if meta.lora is not None:
        lines.append(f"- LoRA rank {meta.lora.rank}, scope {meta.lora.scope}"
                     + (": the drafter adapters are in drafter/ (see below)" if drafter else ""))
    lines += ["", "## Held-out numbers", ""]
    if held_out:
        lines += [f"- {k[4:]}: {v:.4f} (step {held_out.get('step')})" for k, v in held_out.items()
                  if k.startswith("val_") and isinstance(v, (int, float))]
    elif state:
        lines.append("The run recorded none (train.eval_interval was 0).")
    else:
        lines.append("None: the model was not trained here.")
    lines += ["", "## Decoding", ""]
    if remote_code:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  'model = AutoModelForCausalLM.from_pretrained(".", trust_remote_code=True, attn_implementation="sdpa")',
                  'ids = AutoTokenizer.from_pretrained(".")(["The capital of France is"], return_tensors="pt")',
                  "print(model.block_generate(**ids, max_new_tokens=32).sequences)",
                  "```", "",
                  f"`block_generate(..., mode=\"threshold\" | \"speculative\", block_size={B}, threshold=0.9, temperature=0.0)`:",
                  "threshold mode commits every slot of a block above the confidence threshold; speculative mode drafts",
                  "with the noised half and verifies with the clean half, so its output is the model's AR decoding.",
                  "Attention implementations: sdpa and eager. Without `trust_remote_code` this folder is the plain AR",
                  "model (`generate()` unchanged)."]
    else:
        lines += ["Exported without remote code: decode it with megablock (`tools/generate.py --hf-dir .`), or as",
                  "an AR model with `AutoModelForCausalLM` and `generate()`."]
    if drafter:
        lines += ["", "The drafter in drafter/ runs only on the draft block; `tools/generate.py --hf-dir . "
                  "--drafter drafter` applies it that way (PEFT alone would apply it everywhere)."]
    return "\n".join(lines) + "\n"
