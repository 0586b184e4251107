"""The training run: `trainer` (setup and the loop) and its parts: the noised batch, noise and
timestep options, losses, optimizers and lr schedulers, gradient sync, state and resume, output
files and their metadata.

May import: `library.sampling` and everything below it.
"""
