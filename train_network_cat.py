"""Train a LoRA with Contrastive Adapter Training: a drop-in for kohya sd-scripts' `train_network.py`
(Stable Diffusion 1.x and 2.x).

    accelerate launch train_network_cat.py --config_file my.toml --cat_trigger sks
    python train_network_cat.py --pretrained_model_name_or_path model.safetensors --train_data_dir data ...

Every sd-scripts flag keeps its name and meaning; CAT adds `--cat_weight`, `--cat_trigger`,
`--cat_caption`, `--cat_class_word` and `--cat_mode` (see README.md).
"""

from __future__ import annotations

import sys
from typing import Sequence

import library  # noqa: F401  (before diffusers: quiets an irrelevant bitsandbytes import warning)
from library.cli.script_main import script_main
from library.config.training_script import SD_SCRIPT
from library.families.sd.models import load as load_stable_diffusion


def main(argv: Sequence[str] | None = None) -> int:
    """Train; exit code 0, or 2 for a mistake in the flags (1 diverged, 130 interrupted), with a sentence."""
    return script_main(argv, SD_SCRIPT, load_stable_diffusion)


if __name__ == "__main__":
    sys.exit(main())
