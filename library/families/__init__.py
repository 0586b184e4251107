"""Model families behind one interface (`family.ModelFamily`): loading, text conditioning, the
denoiser call, latents, LoRA targets, metadata ids and the sampling pipeline. `sd` is Stable
Diffusion 1.x/2.x, `sdxl` SDXL; a new family is one new sub-package here plus its training script.
Shared by the families: checkpoint files (`checkpoint_file`), LDM-layout U-Net and VAE conversion
(`ldm_single_file`), diffusers-folder parts (`diffusers_folder`), architecture configs, noise
schedule and `--vae` (`model_parts`), VAE decoding (`vae_images`), the offline CLIP tokenizer and
prompt tokenizing, and which family a checkpoint is (`detect`).

May import: `library.cat`, `library.config`, `library.errors`, `networks.lora_cat`.
"""
