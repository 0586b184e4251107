"""SDXL and the models built on it (Pony, Illustrious, NoobAI, v-prediction variants): diffusers folders
and single-file checkpoints in the original SGM layout (`models`, whose `load` is the family's
`ModelLoader`), and the family interface over the loaded parts (`family.SDXLModels`): two text
encoders, a pooled text embedding and six size/crop numbers per image.

May import: `library.families` (its shared modules), and what that package may import.
"""
