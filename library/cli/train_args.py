"""The command line of `train_network_cat.py`: sd-scripts' `train_network.py` flags plus CAT's.

`parse_args(argv)` reads the command line and `--config_file` once and returns a checked
`TrainConfig` (library/config/train_config.py), in four steps, each in its own file:
- flags.py declares the flags (names, types, defaults and choices are sd-scripts');
- arg_values.py merges the command line with `--config_file` (command line > file > defaults);
- checks.py refuses mistakes with a sentence (`UserInputError`, never an assert), and, all at once,
  the flags that are accepted but not implemented yet (listed with reasons in unsupported.py);
- to_config.py turns the checked values into the `TrainConfig`.
Between merging and checking, the few rewrites that sd-scripts does to values are done here, once.
"""

from __future__ import annotations

import logging
from types import MappingProxyType
from typing import Sequence

from library.cli.arg_values import ArgValues, read_arg_values
from library.cli.checks import check_args
from library.cli.config_file import config_path, write_config_file
from library.cli.flags import build_parser
from library.cli.to_config import to_train_config
from library.config.train_config import TrainConfig
from library.config.training_script import SD_SCRIPT, TrainingScript
from library.errors import UserInputError

logger = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None = None, script: TrainingScript = SD_SCRIPT) -> TrainConfig:
    """The checked training configuration of `script` from `argv` (default: sys.argv[1:]) and its
    --config_file.

    With --output_config, writes the command-line flags to --config_file and exits (as sd-scripts).
    """
    args = _normalized(read_arg_values(argv, build_parser(script)))
    if args["output_config"]:
        _write_output_config(args)
    check_args(args, script)
    return to_train_config(args, script)


def _normalized(args: ArgValues) -> ArgValues:
    """Rewrites done once here: GUI's max_token_length 75 is the default window, sampling intervals
    <= 0 mean no sampling (sd-scripts), the old --caption_extention spelling still works (sd-scripts),
    persistent workers need workers, and --logging_dir without --log_with logs to TensorBoard (sd-scripts)."""
    values = dict(args.values)
    if values["max_token_length"] == 75:
        values["max_token_length"] = None
    for dest in ("sample_every_n_steps", "sample_every_n_epochs"):
        if values[dest] is not None and values[dest] <= 0:
            logger.warning("%s is 0 or less, so no samples are made at that interval, as in sd-scripts.",
                           args.show(dest))
            values[dest] = None
    if values["cache_text_encoder_outputs_to_disk"]:  # sd-scripts: the disk cache implies the cache
        values["cache_text_encoder_outputs"] = True
    if values["caption_extention"] is not None:
        values["caption_extension"], values["caption_extention"] = values["caption_extention"], None
    if values["persistent_data_loader_workers"] and values["max_data_loader_n_workers"] == 0:
        # torch's DataLoader refuses persistent workers without workers; a GUI config can hold this pair.
        logger.warning("%s with %s: there are no workers to keep, so workers are not persistent.",
                       args.show("persistent_data_loader_workers"), args.show("max_data_loader_n_workers"))
        values["persistent_data_loader_workers"] = False
    if values["log_with"] is None and values["logging_dir"]:  # sd-scripts: a log folder alone means TensorBoard
        values["log_with"] = "tensorboard"
    return ArgValues(MappingProxyType(values), args.defaults, args.from_command_line, args.from_file, args.config_file)


def _write_output_config(args: ArgValues) -> None:
    """--output_config: write the non-default command-line flags to --config_file and exit."""
    if not args["config_file"]:
        raise UserInputError("--output_config needs --config_file naming the .toml file to write.")
    path = config_path(args["config_file"])
    skipped = {"config_file", "output_config", "wandb_api_key"}  # a key is not written into a shareable file
    values = {dest: args[dest] for dest in sorted(args.from_command_line) if dest not in skipped and args.is_set(dest)}
    write_config_file(path, values)
    logger.info("Wrote the flags to %s; run again with --config_file %s to train.", path, path)
    raise SystemExit(0)
