"""Flags that are accepted (sd-scripts users and GUIs pass them) but not implemented yet, with the
reason for each, and the values and combinations of them that are not refused.

checks.py refuses, in one sentence, every one of these that asks for something; the flags themselves are
declared in flags.py. Remove an entry when its feature lands.
"""

from __future__ import annotations

from typing import Any

# sd-scripts needs these three to continue a run at the right step; --resume does that by itself.
_USE_RESUME = ("starting at a given step is not implemented; to continue a run, --resume a state folder "
               "written by --save_state, which restores its step count, epoch and data order exactly")

# Giving one of these a value other than its default is refused at parse time, all of them in one sentence.
NOT_IMPLEMENTED: dict[str, str] = {
    "--mem_eff_attn": "use --sdpa or --xformers",
    "--masked_loss": "masked loss is not implemented",
    "--alpha_mask": "masked loss is not implemented",
    "--skip_until_initial_step": _USE_RESUME,
    "--initial_epoch": _USE_RESUME,
    "--initial_step": _USE_RESUME,
    "--face_crop_aug_range": "face crops are not implemented",
    "--token_warmup_min": "token warmup is not implemented",
    "--token_warmup_step": "token warmup is not implemented",
    "--weighted_captions": "weighted captions are not implemented",
    "--log_with": "only tensorboard logging is implemented (wandb is not)",
    "--log_tracker_config": "tracker config files are not read",
    "--log_config": "the configuration is not logged to the tracker",
    "--validation_split": "validation is not implemented",
    "--validation_seed": "validation is not implemented",
    "--validate_every_n_steps": "validation is not implemented",
    "--validate_every_n_epochs": "validation is not implemented",
    "--max_validation_steps": "validation is not implemented",
    "--huggingface_repo_id": "uploading to the Hugging Face Hub is not implemented",
    "--huggingface_repo_type": "uploading to the Hugging Face Hub is not implemented",
    "--huggingface_path_in_repo": "uploading to the Hugging Face Hub is not implemented",
    "--huggingface_token": "uploading to the Hugging Face Hub is not implemented",
    "--huggingface_repo_visibility": "uploading to the Hugging Face Hub is not implemented",
    "--save_state_to_huggingface": "uploading to the Hugging Face Hub is not implemented",
    "--resume_from_huggingface": "uploading to the Hugging Face Hub is not implemented",
    "--async_upload": "uploading to the Hugging Face Hub is not implemented",
}
# Values of a NOT_IMPLEMENTED flag that are implemented (so not refused).
IMPLEMENTED_VALUES: dict[str, tuple[Any, ...]] = {"log_with": ("tensorboard",)}
# A NOT_IMPLEMENTED flag that does nothing unless one of these is set is not refused on its own.
INERT_WITHOUT: dict[str, tuple[str, ...]] = {
    "save_last_n_epochs_state": ("save_state",),
    "save_last_n_steps_state": ("save_state",),
}
