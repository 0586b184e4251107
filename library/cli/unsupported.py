"""Flags that are accepted (sd-scripts users and GUIs pass them) but not implemented yet, with the
reason for each, and the values and combinations of them that are not refused.

checks.py refuses, in one sentence, every one of these that asks for something; the flags themselves are
declared in flags.py. Remove an entry when its feature lands.
"""

from __future__ import annotations

from typing import Any

# Giving one of these a value other than its default is refused at parse time, all of them in one sentence.
NOT_IMPLEMENTED: dict[str, str] = {
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
IMPLEMENTED_VALUES: dict[str, tuple[Any, ...]] = {}
# A NOT_IMPLEMENTED flag that does nothing unless one of these is set is not refused on its own.
INERT_WITHOUT: dict[str, tuple[str, ...]] = {
    "save_last_n_epochs_state": ("save_state",),
    "save_last_n_steps_state": ("save_state",),
}
