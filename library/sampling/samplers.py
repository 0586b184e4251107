"""sd-scripts' sampler names (`--sample_sampler`) mapped to diffusers' inference schedulers.

The scheduler is built from the model's training noise schedule (betas, prediction type), so a
v-prediction model samples as v-prediction.
"""

from __future__ import annotations

import importlib.util

import diffusers

from library.errors import UserInputError

# name -> (diffusers scheduler class name, extra config)
SAMPLERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}
# sd-scripts accepts k_-prefixed spellings of the k-diffusion samplers.
SAMPLERS.update({f"k_{name}": SAMPLERS[name] for name in ("lms", "euler", "euler_a", "dpm_2", "dpm_2_a")})


def inference_scheduler(sampler: str, training_scheduler) -> diffusers.SchedulerMixin:
    """A fresh diffusers scheduler for `sampler` on the noise schedule of `training_scheduler`.

    A flow-matching model (FLUX.1) samples with its own Euler flow scheduler whatever `sampler` says,
    as sd-scripts' FLUX sampling does (the DDPM samplers' math does not apply to it)."""
    if isinstance(training_scheduler, diffusers.FlowMatchEulerDiscreteScheduler):
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(training_scheduler.config)
    if sampler not in SAMPLERS:
        raise UserInputError(f"Unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    class_name, extra = SAMPLERS[sampler]
    if class_name == "LMSDiscreteScheduler" and importlib.util.find_spec("scipy") is None:
        raise UserInputError(f"The sampler {sampler} needs scipy, which is not installed; pip install scipy, or pick ddim.")
    return getattr(diffusers, class_name).from_config(training_scheduler.config, **extra)
