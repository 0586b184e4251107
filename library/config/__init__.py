"""The typed configuration of a training run (`TrainConfig` and its parts), built once by `library.cli`.

May import: nothing of ours (plain dataclasses).
"""
