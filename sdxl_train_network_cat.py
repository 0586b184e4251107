"""Train an SDXL LoRA with Contrastive Adapter Training: a drop-in for kohya sd-scripts'
`sdxl_train_network.py` (SDXL base and the models built on it: Pony, Illustrious, NoobAI, ...).

    accelerate launch sdxl_train_network_cat.py --config_file my_sdxl.toml --cat_trigger sks

Every flag of `train_network_cat.py` that applies, with sd-scripts' SDXL rules (no --v2, bucket steps
a multiple of 32, --text_encoder_lr one value or one per text encoder); see README.md, "SDXL".
"""

from __future__ import annotations

import sys
from typing import Sequence

import library  # noqa: F401  (before diffusers: quiets an irrelevant bitsandbytes import warning)
from library.cli.script_main import script_main
from library.config.training_script import SDXL_SCRIPT
from library.families.sdxl.models import load as load_sdxl


def main(argv: Sequence[str] | None = None) -> int:
    """Train; exit code 0, or 2 for a mistake in the flags (1 diverged, 130 interrupted), with a sentence."""
    return script_main(argv, SDXL_SCRIPT, load_sdxl)


if __name__ == "__main__":
    sys.exit(main())
