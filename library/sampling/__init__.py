"""Side trips during a run that leave training exactly as it was: sample images (prompt files,
sd-scripts sampler names), the drift probe on trigger-free prompts, and the state guard they share.

May import: `library.data`, `library.families`, `library.cat`, `library.config`, `library.errors`.
"""
