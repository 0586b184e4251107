"""Stable Diffusion 1.x and 2.x: diffusers folders and single-file checkpoints, `--v2`,
`--v_parameterization`, `--vae`, and the family interface over them (`family`).

May import: `library.families` (its shared modules), and what that package may import.
"""
