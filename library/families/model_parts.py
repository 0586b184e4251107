"""What the SD-style families share when they load a model: the architecture config folders in
`configs/models/` (single files are converted against them, offline), the training noise schedule
they give, and a replacement VAE (`--vae`)."""

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler

from library.errors import UserInputError
from library.families import ldm_single_file
from library.families.checkpoint_file import read_state_dict
from library.families.diffusers_folder import load_pretrained

MODEL_CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


def build_noise_scheduler(config_dir: Path, v_parameterization: bool) -> DDPMScheduler:
    """The DDPM training schedule of the architecture, predicting noise or v as the flag says."""
    return DDPMScheduler.from_pretrained(
        config_dir,
        subfolder="scheduler",
        prediction_type="v_prediction" if v_parameterization else "epsilon",
        clip_sample=False,
        local_files_only=True,
    )


def load_replacement_vae(path: str | os.PathLike, config_dir: Path, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """A replacement VAE (`--vae`): a diffusers VAE folder, or a file in LDM or diffusers layout.

    LDM-layout files may carry the `first_stage_model.` prefix of a full checkpoint or none, as the
    VAE files A1111 users download do; `config_dir/vae` gives the architecture for single files.
    """
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"The --vae path {path} does not exist; give a VAE folder or a .safetensors/.ckpt file.")
    if not path.is_dir():
        return ldm_single_file.load_vae(read_state_dict(path, "--vae file"), config_dir, path, dtype)
    subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
    if subfolder is None and not (path / "config.json").is_file():
        raise UserInputError(
            f"The --vae folder {path} has neither config.json nor vae/config.json; give a diffusers VAE folder."
        )
    return load_pretrained(AutoencoderKL, path, subfolder, "--vae VAE", dtype)
