"""What differs between the training scripts of the model families, as their command lines see it.

Each family has one script, the drop-in for one sd-scripts script; the command line is shared
(`library.cli`), and these few facts decide what differs: how many text-encoder learning rates,
which bucket steps, whether `--v2` and `--clip_skip` mean anything, which family-only flags work.
A new family adds one `TrainingScript` here and passes it from its script.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from library.config.train_config import SampleDefaults

# Flags only FLUX.1's script reads (sd-scripts' flux_train_network.py flags); the others refuse them.
FLUX_FLAGS = ("clip_l", "t5xxl", "ae", "t5xxl_max_token_length", "apply_t5_attn_mask", "guidance_scale", "model_type",
              "blocks_to_swap", "split_mode", "timestep_sampling", "sigmoid_scale", "discrete_flow_shift",
              "model_prediction_type", "weighting_scheme", "logit_mean", "logit_std", "mode_scale")


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
    family_flags: tuple[str, ...] = ()  # flags only this family's script reads (e.g. FLUX_FLAGS)
    flow_matching: bool = False  # trained by flow matching: the DDPM noise and SNR-weight flags do not apply
    weighted_captions: bool = True  # --weighted_captions works (sd-scripts' tokenizer of the family has weights)
    sample_defaults: SampleDefaults = field(default_factory=SampleDefaults)  # sd-scripts' sample prompt defaults


SD_SCRIPT = TrainingScript(
    name="train_network_cat.py", replaces="train_network.py", model_name="Stable Diffusion 1.x/2.x",
    text_encoders=1, bucket_reso_multiple=8, has_v2=True, uses_clip_skip=True, text_encoder_caching=False,
)
SDXL_SCRIPT = TrainingScript(
    name="sdxl_train_network_cat.py", replaces="sdxl_train_network.py", model_name="SDXL",
    text_encoders=2, bucket_reso_multiple=32, has_v2=False, uses_clip_skip=False, text_encoder_caching=True,
)
FLUX_SCRIPT = TrainingScript(
    name="flux_train_network_cat.py", replaces="flux_train_network.py", model_name="FLUX.1",
    text_encoders=2, bucket_reso_multiple=32, has_v2=False, uses_clip_skip=False, text_encoder_caching=True,
    family_flags=FLUX_FLAGS, flow_matching=True, weighted_captions=False,
    # sd-scripts' FLUX sampling: 20 steps, no CFG, guidance 3.5, sizes a multiple of 16, no prompt weights.
    sample_defaults=SampleDefaults(steps=20, scale=1.0, guidance=3.5, size_multiple=16, weights=False),
)
# Which script reads each family-only flag (for the sentence that refuses it elsewhere).
FAMILY_FLAG_SCRIPTS = {flag: FLUX_SCRIPT for flag in FLUX_FLAGS}
