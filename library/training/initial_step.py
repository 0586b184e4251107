"""`--initial_step`, `--initial_epoch`, `--skip_until_initial_step`: where a run starts counting when
it is not (only) a `--resume`, as sd-scripts defines them.

- `--initial_step N` (or `--initial_epoch E`, which means N = (E - 1) x steps per epoch) says N
  optimizer steps are already done: the run trains steps N+1 .. --max_train_steps, and saved files,
  sample images and logs are numbered from there.
- With `--skip_until_initial_step` the data goes on exactly where step N+1's batches are in the
  epoch; without it the run starts at the beginning of that step's epoch (sd-scripts: "only the
  epoch number is skipped").
- The learning-rate schedule is not moved (sd-scripts' note: without `--resume` it starts from 0);
  with `--resume` the state's schedule, optimizer and random streams are restored and N replaces
  the state's step count, as in sd-scripts.

sd-scripts counts differently in two places, both fixed here so that the step count always means
steps done: without `--skip_until_initial_step` it counts from 0 again, and with it, past the first
epoch, it counts from N minus the skipped epochs' batches.
"""

from __future__ import annotations

import logging

from library.config.train_config import RunArgs
from library.errors import UserInputError
from library.training.train_state import Progress

logger = logging.getLogger(__name__)


def initial_step(args: RunArgs, steps_per_epoch: int) -> int | None:
    """The steps already done by --initial_step / --initial_epoch; None when neither is given."""
    if args.initial_step is not None:
        return args.initial_step
    if args.initial_epoch is not None:
        return (args.initial_epoch - 1) * steps_per_epoch
    return None


def starting_progress(args: RunArgs, steps_per_epoch: int, progress: Progress) -> Progress:
    """`progress` (a fresh run's or a resumed state's) moved to --initial_step / --initial_epoch."""
    done = initial_step(args, steps_per_epoch)
    if done is None:
        if args.skip_until_initial_step:
            logger.warning("--skip_until_initial_step without --initial_step or --initial_epoch does nothing.")
        return progress
    if done >= progress.max_train_steps:
        shown = f"--initial_step {args.initial_step}" if args.initial_step is not None else \
            f"--initial_epoch {args.initial_epoch} (= {done} steps done at {steps_per_epoch} steps per epoch)"
        raise UserInputError(f"{shown} leaves nothing to train: the run has {progress.max_train_steps} steps; "
                             "lower it or raise --max_train_steps / --max_train_epochs.")
    if progress.step:
        logger.warning("the state's step count %d is replaced by the initial step %d (sd-scripts does the same).",
                       progress.step, done)
    epoch, in_epoch = divmod(done, steps_per_epoch)
    batches = in_epoch * args.gradient_accumulation_steps if args.skip_until_initial_step else 0
    logger.info("starting after step %d, in epoch %d%s; the learning-rate schedule %s", done, epoch + 1,
                f" at its batch {batches + 1}" if args.skip_until_initial_step else " from its first batch",
                "is the resumed state's" if progress.step else "starts from its beginning (as in sd-scripts)")
    return Progress(done, epoch + 1, batches, progress.seed, progress.max_train_steps)
