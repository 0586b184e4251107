"""The tracker flags (`--log_with`, `--log_tracker_config`, `--log_config`, `--wandb_*`) as sd-scripts
reads them, checked at parse time so that a mistake is refused before any model is loaded.

sd-scripts' rules (library/train_util.py: `prepare_accelerator`, `init_trackers`,
`get_sanitized_config_or_none`, `verify_command_line_training_args`):
- `--log_with tensorboard` and `all` need `--logging_dir`; `wandb` and `all` need the wandb package.
  `all` is accelerate's: every tracker installed (here tensorboard and wandb).
- The trackers' init keywords: `--wandb_run_name` gives `{"wandb": {"name": ...}}`; a
  `--log_tracker_config` TOML file replaces that whole, one table per tracker (`[wandb]`, ...).
- `--log_config` stores the run's flags as the trackers' config, without the API keys and the paths
  that name the user's files; lists and other values as their text.
- With wandb, which records the command line with the run, a key given on the command line is warned about.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from library.config.toml_file import read_toml
from library.cli.arg_values import ArgValues
from library.errors import UserInputError

logger = logging.getLogger(__name__)

WANDB_VALUES = ("wandb", "all")  # the --log_with values that start wandb
LOGGING_DIR_VALUES = ("tensorboard", "all")  # ... and those that write TensorBoard files
# Left out of --log_config's configuration (sd-scripts' lists): keys, and paths that name the user's files.
SECRET_FLAGS = ("wandb_api_key", "huggingface_token")
PATH_FLAGS = ("pretrained_model_name_or_path", "vae", "tokenizer_cache_dir", "train_data_dir",
              "conditioning_data_dir", "reg_data_dir", "output_dir", "logging_dir")


def check_logging(args: ArgValues) -> None:
    """TensorBoard needs a folder, wandb needs its package (sd-scripts' prepare_accelerator refuses both)."""
    log_with = args["log_with"]
    if log_with in LOGGING_DIR_VALUES and not args["logging_dir"]:
        raise UserInputError(f"{args.show('log_with')} needs --logging_dir, the folder TensorBoard writes its event "
                             "files to (sd-scripts requires it too); add e.g. --logging_dir logs.")
    if log_with in WANDB_VALUES and importlib.util.find_spec("wandb") is None:
        raise UserInputError(f"{args.show('log_with')} needs the wandb package, which is not installed in this Python; "
                             "install it with `pip install -r requirements.txt` (or `pip install wandb`), or log with "
                             "--log_with tensorboard.")


def warn_logging(args: ArgValues) -> None:
    """wandb records the command line with the run: a key there is published with it (sd-scripts warns too)."""
    if args["log_with"] not in WANDB_VALUES:
        return
    for dest in SECRET_FLAGS:
        if dest in args.from_command_line and args[dest] is not None:
            logger.warning("--%s is on the command line, which wandb records with the run; put it in the "
                           "--config_file TOML instead.", dest)
    absolute = [f"--{dest}" for dest in PATH_FLAGS
                if dest in args.from_command_line and args[dest] and os.path.isabs(args[dest])]
    if absolute:
        logger.info("%s: absolute paths on the command line are recorded by wandb with the run; use relative "
                    "paths or the --config_file TOML to keep them private.", ", ".join(absolute))


def tracker_init_kwargs(args: ArgValues) -> Mapping[str, Mapping[str, Any]]:
    """The keywords each tracker is started with: --log_tracker_config's tables, else wandb's run name."""
    path = args["log_tracker_config"]
    if path is None:
        name = args["wandb_run_name"]
        return MappingProxyType({"wandb": MappingProxyType({"name": name})} if name else {})
    tables = read_tracker_config(Path(path), args.show("log_tracker_config"))
    _warn_unused_tables(args, tables)
    for tracker in set(tables) & set(_trackers(args["log_with"])):
        _check_keywords(tracker, tables[tracker], args.show("log_tracker_config"))
    return MappingProxyType({tracker: MappingProxyType(dict(kwargs)) for tracker, kwargs in tables.items()})


def read_tracker_config(path: Path, shown: str) -> dict[str, dict[str, Any]]:
    """A TOML file of one table per tracker (`[wandb]` with wandb.init's keywords, ...); a missing,
    unreadable or malformed file, or a top-level key that is not a table, is a `UserInputError`."""
    document = read_toml(path, f"{shown}: the tracker config file", 'name = "my run"', missing_hint=(
        'give a .toml file with one table per tracker, e.g. [wandb] with entity = "my-team"'))
    loose = [key for key, value in document.items() if not isinstance(value, dict)]
    if loose:
        raise UserInputError(f"{shown}: {', '.join(loose)} {'is' if len(loose) == 1 else 'are'} not in a tracker's "
                             "table; put each tracker's keywords under its name, e.g. [wandb] then name = \"my run\".")
    return document


def _warn_unused_tables(args: ArgValues, tables: Mapping[str, Any]) -> None:
    """A table for a tracker this run does not start is not used (a misspelt [WandB], or another --log_with)."""
    unused = sorted(set(tables) - set(_trackers(args["log_with"])))
    if unused:
        logger.warning("%s: the table%s %s %s not used, since %s starts %s.", args.show("log_tracker_config"),
                       "s" if len(unused) > 1 else "", ", ".join(f"[{name}]" for name in unused),
                       "are" if len(unused) > 1 else "is",
                       args.show("log_with") if args["log_with"] else "no --log_with",
                       " and ".join(_trackers(args["log_with"])) or "no tracker")
    if args["wandb_run_name"] and "wandb" in _trackers(args["log_with"]) and "name" not in tables.get("wandb", {}):
        logger.warning("%s is not used: %s replaces it, as in sd-scripts; give the run name as name = \"...\" under "
                       "its [wandb] table.", args.show("wandb_run_name"), args.show("log_tracker_config"))


def _check_keywords(tracker: str, kwargs: Mapping[str, Any], shown: str) -> None:
    """The keywords of a [wandb] or [tensorboard] table must be ones its tracker takes: wandb.init's, or
    TensorBoard's SummaryWriter's (accelerate names the project and the folder itself)."""
    if tracker == "wandb":
        import wandb

        function, given_by_us = wandb.init, {"project": "--log_tracker_name"}
    elif tracker == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        function, given_by_us = SummaryWriter.__init__, {"log_dir": "--logging_dir", "self": "--logging_dir"}
    else:
        return
    for key in kwargs:
        if key in given_by_us:
            raise UserInputError(f"{shown}: {key} in [{tracker}] is given by {given_by_us[key]}; remove it from the "
                                 "file and use that flag.")
    known = set(inspect.signature(function).parameters) - set(given_by_us)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise UserInputError(f"{shown}: [{tracker}] has {', '.join(unknown)}, which {tracker} does not take; its "
                             f"keywords are {', '.join(sorted(known))}.")


def _trackers(log_with: str | None) -> tuple[str, ...]:
    """The trackers accelerate starts for --log_with ('all': every one installed)."""
    if log_with == "all":
        from accelerate.tracking import get_available_trackers

        return tuple(str(tracker) for tracker in get_available_trackers())
    return (log_with,) if log_with else ()


def logged_config(args: ArgValues) -> Mapping[str, Any] | None:
    """--log_config: the flags as the trackers' config, without keys and the user's paths; None without it.

    Values that are not None, bool, str, int or float (lists) are stored as their text, as sd-scripts does.
    """
    if not args["log_config"]:
        return None
    left_out = set(SECRET_FLAGS) | set(PATH_FLAGS)
    return MappingProxyType({dest: value if value is None or isinstance(value, (bool, str, int, float)) else f"{value}"
                             for dest, value in args.values.items() if dest not in left_out})
