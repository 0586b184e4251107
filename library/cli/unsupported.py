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
    "--torch_compile": "torch.compile of the U-Net is not implemented",
    "--dynamo_backend": "torch.compile of the U-Net is not implemented",
    "--deepspeed": "DeepSpeed is not implemented; for several GPUs use accelerate launch / torchrun (DDP)",
    "--zero_stage": "DeepSpeed is not implemented",
    "--offload_optimizer_device": "DeepSpeed is not implemented",
    "--offload_optimizer_nvme_path": "DeepSpeed is not implemented",
    "--offload_param_device": "DeepSpeed is not implemented",
    "--offload_param_nvme_path": "DeepSpeed is not implemented",
    "--zero3_init_flag": "DeepSpeed is not implemented",
    "--zero3_save_16bit_model": "DeepSpeed is not implemented",
    "--fp16_master_weights_and_gradients": "DeepSpeed is not implemented",
    "--fused_backward_pass": "sd-scripts has it for full fine-tuning with Adafactor, not for LoRA",
    "--debug_dataset": "the dataset viewer is not implemented; the run prints its buckets and batches at start",
    "--dataset_class": "custom dataset classes are not implemented; use --dataset_config",
    "--cpu_offload_checkpointing": "offloading checkpointed activations to the CPU is not implemented",
}
# Values of a NOT_IMPLEMENTED flag that are implemented (so not refused).
IMPLEMENTED_VALUES: dict[str, tuple[Any, ...]] = {}
# A NOT_IMPLEMENTED flag that does nothing unless one of these is set is not refused on its own.
INERT_WITHOUT: dict[str, tuple[str, ...]] = {
    "dynamo_backend": ("torch_compile",),
    **{name: ("deepspeed",) for name in ("zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path",
                                         "offload_param_device", "offload_param_nvme_path", "zero3_init_flag",
                                         "zero3_save_16bit_model", "fp16_master_weights_and_gradients")},
    "save_last_n_epochs_state": ("save_state",),
    "save_last_n_steps_state": ("save_state",),
}
