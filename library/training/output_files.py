"""Names of the files a training run writes, as sd-scripts names them, and which old ones to prune.

    {output_name}.safetensors                 the final LoRA
    {output_name}-{epoch:06d}.safetensors     --save_every_n_epochs
    {output_name}-step{step:08d}.safetensors  --save_every_n_steps
    {output_name}-interrupted-step{step:08d}.safetensors   Ctrl-C (ours: says what it is)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from library.errors import UserInputError

LORA_SUFFIX = ".safetensors"
STATE_SUFFIX = "-state"


def final_name(output_name: str | None) -> str:
    return f"{output_name or 'last'}{LORA_SUFFIX}"  # sd-scripts' names when --output_name is not given


def epoch_name(output_name: str | None, epoch: int) -> str:
    return f"{output_name or 'epoch'}-{epoch:06d}{LORA_SUFFIX}"


def step_name(output_name: str | None, step: int) -> str:
    return f"{output_name or 'at'}-step{step:08d}{LORA_SUFFIX}"


def interrupted_name(output_name: str | None, step: int) -> str:
    return f"{output_name or 'last'}-interrupted-step{step:08d}{LORA_SUFFIX}"


def state_folder_name(lora_name: str) -> str:
    """`name-step00000100.safetensors` -> `name-step00000100-state` (sd-scripts' state folder names)."""
    return lora_name.removesuffix(LORA_SUFFIX) + STATE_SUFFIX


def epoch_to_remove(epoch: int, save_every_n_epochs: int | None, save_last_n_epochs: int | None) -> int | None:
    """The epoch file that falls out of `--save_last_n_epochs` when `epoch` is saved (sd-scripts' rule)."""
    if not save_last_n_epochs or not save_every_n_epochs:
        return None
    old = epoch - save_every_n_epochs * save_last_n_epochs
    return old if old > 0 else None


def step_to_remove(step: int, save_every_n_steps: int | None, save_last_n_steps: int | None) -> int | None:
    """The step file that falls out of `--save_last_n_steps` (a number of steps, as in sd-scripts)."""
    if not save_last_n_steps or not save_every_n_steps:
        return None
    old = step - save_last_n_steps - 1
    old -= old % save_every_n_steps
    return old if old > 0 else None


def check_writable(output_dir: str | Path) -> Path:
    """Create `output_dir` and prove a file can be written there, before any training starts."""
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        raise UserInputError(
            f"--output_dir {folder} is not writable ({error.strerror}); choose a folder you can write to."
        ) from None
    return folder
