"""The command line of `train_network_cat.py`: sd-scripts flags and `--config_file`, checked and
turned once into a `TrainConfig`.

May import: `library.training` and everything below it.
"""
