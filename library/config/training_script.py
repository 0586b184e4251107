"""What differs between the training scripts of the model families, as their command lines see it.

Each family has one script, the drop-in for one sd-scripts script; the command line is shared
(`library.cli`), and these few facts decide what differs: how many text-encoder learning rates,
which bucket steps, whether `--v2` and `--clip_skip` mean anything, which family-only flags work.
A new family adds one `TrainingScript` here and passes it from its script.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainingScript:
    """One training script and the rules of its family's flags (sd-scripts' rules for its counterpart)."""

    name: str  # our script, e.g. "sdxl_train_network_cat.py"
    replaces: str  # the sd-scripts script it stands in for
    model_name: str  # how messages name the family
    text_encoders: int  # how many text encoders (and so --text_encoder_lr values) the model has
    bucket_reso_multiple: int  # bucket_reso_steps must be a multiple of this
    has_v2: bool  # --v2 selects SD 2.x; refused where the family has no such variant
    uses_clip_skip: bool  # --clip_skip changes the conditioning; warned about where it does not
    text_encoder_caching: bool  # --cache_text_encoder_outputs(_to_disk) belong to this family


SD_SCRIPT = TrainingScript(
    name="train_network_cat.py", replaces="train_network.py", model_name="Stable Diffusion 1.x/2.x",
    text_encoders=1, bucket_reso_multiple=8, has_v2=True, uses_clip_skip=True, text_encoder_caching=False,
)
SDXL_SCRIPT = TrainingScript(
    name="sdxl_train_network_cat.py", replaces="sdxl_train_network.py", model_name="SDXL",
    text_encoders=2, bucket_reso_multiple=32, has_v2=False, uses_clip_skip=False, text_encoder_caching=True,
)
