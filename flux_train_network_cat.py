"""Train a FLUX.1 LoRA with Contrastive Adapter Training: a drop-in for kohya sd-scripts'
`flux_train_network.py` (FLUX.1 dev and schnell, and models fine-tuned from them).

    accelerate launch flux_train_network_cat.py --config_file my_flux.toml --cat_trigger sks

The model as sd-scripts users give it: a BFL-layout transformer file (flux1-dev.safetensors) with
`--clip_l`, `--t5xxl` and `--ae`, or a diffusers FLUX folder. Every flag of `train_network_cat.py`
that applies, with sd-scripts' FLUX flags (`--guidance_scale`, `--timestep_sampling`,
`--model_prediction_type`, `--t5xxl_max_token_length`, `--apply_t5_attn_mask`, ...) and rules; see
README.md, "FLUX.1".
"""

from __future__ import annotations

import sys
from typing import Sequence

import library  # noqa: F401  (before diffusers: quiets an irrelevant bitsandbytes import warning)
from library.cli.script_main import script_main
from library.config.training_script import FLUX_SCRIPT
from library.families.flux.models import load as load_flux


def main(argv: Sequence[str] | None = None) -> int:
    """Train; exit code 0, or 2 for a mistake in the flags (1 diverged, 130 interrupted), with a sentence."""
    return script_main(argv, FLUX_SCRIPT, load_flux)


if __name__ == "__main__":
    sys.exit(main())
