"""The rules of family-only flags and of flow-matching training (FLUX.1), each broken rule one sentence.

Every script reads the same flags (library.cli.flags); a flag that only one family's script reads
(FLUX.1's `--clip_l`, `--guidance_scale`, `--timestep_sampling`, ...) is refused by the others, with
the script that reads it. A flow-matching family is noised by sigmas, not by the DDPM schedule, so
the flags that shape DDPM noise, timesteps or SNR weights would do nothing there: they are refused
rather than ignored (sd-scripts' FLUX trainer ignores most of them without a word).
"""

from __future__ import annotations

from library.cli.arg_values import ArgValues
from library.config.training_script import FAMILY_FLAG_SCRIPTS, TrainingScript
from library.errors import UserInputError

# DDPM-only flags, as a flow-matching script names the reason each one does not apply.
DDPM_ONLY_FLAGS = {
    "v_parameterization": "FLUX.1 predicts the flow's velocity, not epsilon or v",
    "zero_terminal_snr": "it rescales a DDPM noise schedule",
    "noise_offset": "it offsets DDPM noise (sd-scripts' FLUX trainer ignores it)",
    "noise_offset_random_strength": "it varies --noise_offset",
    "adaptive_noise_scale": "it scales --noise_offset",
    "multires_noise_iterations": "it shapes DDPM noise (sd-scripts' FLUX trainer ignores it)",
    "min_snr_gamma": "it weighs by the DDPM schedule's SNR; --weighting_scheme weighs flow-matching losses",
    "scale_v_pred_loss_like_noise_pred": "it weighs by the DDPM schedule's SNR",
    "v_pred_like_loss": "it weighs by the DDPM schedule's SNR",
    "debiased_estimation_loss": "it weighs by the DDPM schedule's SNR",
    "min_timestep": "flow-matching sigmas are drawn by --timestep_sampling",
    "max_timestep": "flow-matching sigmas are drawn by --timestep_sampling",
}


def check_family_flags(args: ArgValues, script: TrainingScript) -> None:
    """A flag only another family's script reads is refused, naming that script."""
    for flag, owner in FAMILY_FLAG_SCRIPTS.items():
        if flag not in script.family_flags and args.is_set(flag):
            raise UserInputError(f"{args.show(flag)}: a {owner.model_name} flag ({owner.name} reads it); remove it "
                                 f"for {script.model_name}, or train a {owner.model_name} model with {owner.name}.")


def check_flow_matching(args: ArgValues, script: TrainingScript) -> None:
    """FLUX.1's rules: DDPM-only flags refused, what is not implemented said, lengths and losses checked."""
    if not script.flow_matching:
        return
    for flag, reason in DDPM_ONLY_FLAGS.items():
        if args[flag]:  # a GUI's 0 or false means "off", as the default does
            raise UserInputError(f"{args.show(flag)}: does not apply to {script.model_name} ({reason}); remove it.")
    if args["model_type"] == "chroma":
        raise UserInputError(f"{args.show('model_type')}: Chroma is not supported yet; train FLUX.1 dev or schnell "
                             "(--model_type flux).")
    for flag in ("blocks_to_swap", "split_mode"):
        if args[flag]:
            raise UserInputError(f"{args.show(flag)}: block swapping is not implemented; to save memory use "
                                 "--gradient_checkpointing and --cache_text_encoder_outputs instead.")
    length = args["t5xxl_max_token_length"]
    if length is not None and length < 1:
        raise UserInputError(f"{args.show('t5xxl_max_token_length')}: expected a positive number of T5 tokens "
                             "(FLUX.1-dev was trained with 512, schnell with 256).")
    if args["loss_type"] in ("huber", "smooth_l1") and args["huber_schedule"] != "constant":
        raise UserInputError(f"{args.show('huber_schedule')} with {args.show('loss_type')}: the snr and exponential "
                             "huber schedules follow the DDPM schedule; use --huber_schedule constant for FLUX.1.")
