"""Model families behind one interface (`family.ModelFamily`): loading, text conditioning, the
denoiser call, latents, LoRA targets, metadata ids and the sampling pipeline. `sd` is Stable
Diffusion 1.x/2.x; a new family is one new sub-package here plus its training script. Shared by the
families: checkpoint files (`checkpoint_file`), the offline CLIP tokenizer and prompt tokenizing.

May import: `library.cat`, `library.config`, `library.errors`, `networks.lora_cat`.
"""
