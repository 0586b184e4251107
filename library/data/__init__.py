"""Datasets as sd-scripts reads them, to batches: folders and `--dataset_config`, captions and their
transforms, images and augmentations, loss masks, buckets, the batches of each epoch, DataLoader
workers and the latent cache.

May import: `library.cat` (trigger-free captions), `library.config`, `library.errors`.
"""
