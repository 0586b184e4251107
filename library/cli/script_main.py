"""The `main` every training script runs: parse, train the family's model, and turn user mistakes
into one readable sentence with an exit code, as sd-scripts users expect from a script."""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from library.cli.train_args import parse_args
from library.config.training_script import TrainingScript
from library.errors import UserInputError
from library.families.family import ModelLoader
from library.training.trainer import TrainingDiverged, train


def script_main(argv: Sequence[str] | None, script: TrainingScript, load_models: ModelLoader) -> int:
    """0 when trained; 2 for a user mistake, 1 for a diverged run, 130 when interrupted (each with its sentence)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        train(parse_args(argv, script), load_models)
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
