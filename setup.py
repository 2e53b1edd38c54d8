from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.split("#")[0].strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip() and not line.startswith("pytest")
]

setup(
    name="megablock",
    version="0.1.0",
    description="Block-diffusion adaptation of pretrained autoregressive LLMs (NBDiff recipe) "
    "with megatron-core tensor parallelism and DeepSpeed.",
    packages=find_packages(include=["megablock", "megablock.*"]),
    # megablock's offline lm-eval tasks (YAML, their data and loader) travel with the package.
    # The remote code an export copies into a release folder (megablock.checkpoint.release) too.
    package_data={"megablock.inference": ["lm_eval_tasks/*.yaml", "lm_eval_tasks/*.jsonl", "lm_eval_tasks/*.py"],
                  "megablock.checkpoint": ["remote/*.py"]},
    python_requires=">=3.10,<3.12.99",
    install_requires=requirements,
    entry_points={"console_scripts": [
        f"megablock-{name.replace('_', '-')}=megablock.commands.{name}:main"
        for name in ("convert_hf", "export_hf", "generate", "evaluate", "pretrain", "plot_metrics",
                     "estimate_memory", "distill_data", "preprocess_data", "lm_eval")
    ]},
)
