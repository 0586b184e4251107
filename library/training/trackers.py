"""The run's trackers (`--log_with`), started as sd-scripts' train_util.init_trackers starts them."""

from __future__ import annotations

import time
from pathlib import Path

from accelerate import Accelerator

from library.config.train_config import LogArgs

# sd-scripts' train_network.py names its project so, for every family (SD, SDXL, FLUX.1).
DEFAULT_TRACKER_NAME = "network_train"


def log_folder(log: LogArgs) -> str | None:
    """This run's log folder, as sd-scripts' prepare_accelerator names it: --logging_dir/<--log_prefix>
    <start time, YYYYmmddHHMMSS>, so runs logged to one --logging_dir stay apart; None without --logging_dir."""
    if log.logging_dir is None:
        return None
    return str(Path(log.logging_dir) / f"{log.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S', time.localtime())}")


def start_trackers(accelerator: Accelerator, log: LogArgs) -> None:
    """Start the trackers on the main process: the project is --log_tracker_name, each tracker gets its
    init keywords and, with --log_config, the run's flags as its config.

    wandb, as in sd-scripts' prepare_accelerator: logged in first with --wandb_api_key, and its files
    written in the run's log folder (sd-scripts sets WANDB_DIR; a `dir` in the tracker config still wins).
    """
    if not log.log_with or not accelerator.is_main_process:
        return
    init_kwargs = {tracker: dict(kwargs) for tracker, kwargs in log.tracker_init_kwargs.items()}
    if log.log_with in ("wandb", "all"):
        import wandb

        if log.wandb_api_key is not None:
            wandb.login(key=log.wandb_api_key)
        folder = accelerator.logging_dir  # log_folder's, given to the Accelerator
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
            init_kwargs.setdefault("wandb", {}).setdefault("dir", str(folder))
    accelerator.init_trackers(
        log.log_tracker_name or DEFAULT_TRACKER_NAME,
        config=None if log.log_config is None else dict(log.log_config),
        init_kwargs=init_kwargs,
    )


def log_values(accelerator: Accelerator, values: dict[str, float], *, step: int, epoch: int,
               tensorboard_step: int | None = None) -> None:
    """Log `values` as sd-scripts' accelerator_logging does: TensorBoard (and any tracker but wandb) at
    `tensorboard_step` (the global `step` unless given: epoch averages are logged at their epoch), wandb
    with `global_step` and `epoch` among the values, at the global step (sd-scripts lets wandb count
    its own steps, one a call; this keeps them the training steps). Does nothing without trackers
    (they run on the main process only)."""
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            tracker.log({**values, "global_step": step, "epoch": epoch}, step=step)
        else:
            tracker.log(values, step=step if tensorboard_step is None else tensorboard_step)
