"""Block-diffusion adaptation of a pretrained AR model (NBDiff recipe).

    deepspeed [--num_accelerators N] examples/pretrain_nbdiff.py --config CONFIG.yaml [--set key=value ...]

Also runs under torchrun and as plain `python` (one process). A thin wrapper: the command is
megablock.commands.pretrain (console command `megablock-pretrain`), the loop megablock.training.
"""
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not __import__("torch").cuda.is_available() else "cuda")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megablock.commands.pretrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
