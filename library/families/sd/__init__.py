"""Stable Diffusion 1.x and 2.x: diffusers folders and single-file checkpoints, `--v2`,
`--v_parameterization`, `--vae` (`models`, whose `load` is the family's `ModelLoader`), and the
family interface over the loaded parts (`family.StableDiffusionModels`).

May import: `library.families` (its shared modules), and what that package may import.
"""
