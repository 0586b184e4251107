"""Train a LoRA with Contrastive Adapter Training: a drop-in for kohya sd-scripts' `train_network.py`.

    accelerate launch train_network_cat.py --config_file my.toml --cat_trigger sks
    python train_network_cat.py --pretrained_model_name_or_path model.safetensors --train_data_dir data ...

Every sd-scripts flag keeps its name and meaning; CAT adds `--cat_weight`, `--cat_trigger`,
`--cat_caption`, `--cat_class_word` and `--cat_mode` (see README.md).
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

import library  # noqa: F401  (before diffusers: quiets an irrelevant bitsandbytes import warning)
from library.cli.train_args import parse_args
from library.errors import UserInputError
from library.families.sd.models import load as load_stable_diffusion
from library.training.trainer import TrainingDiverged, train


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, train, and turn user mistakes into one readable sentence (exit code 2)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        train(parse_args(argv), load_stable_diffusion)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the current LoRA was saved under a name with 'interrupted' in it.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
