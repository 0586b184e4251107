"""Training state for `--save_state` / `--resume`: enough to continue as if never stopped.

A state folder holds the adapter weights (`network.safetensors`), the optimizer and learning-rate
scheduler state, every random-number stream the loop draws from, and the progress (step, epoch,
batches done in that epoch). The data order of an epoch is a function of (seed, epoch), so the
resumed run skips exactly the batches already trained on; sd-scripts restarts its step count and
data order here. Tensors are read back with `torch.load(weights_only=True)`: a state folder never
runs code. Folders are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from library.errors import UserInputError

PROGRESS_FILE = "progress.json"
NETWORK_FILE = "network.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "lr_scheduler.pt"
RNG_FILE = "rng.pt"
SCALER_FILE = "grad_scaler.pt"  # fp16 on a GPU only: the loss scale and its growth tracker
BUDGET_FILE = "cat_budget.json"  # --cat_drift_budget only: alpha and the running mean of the CAT term


@dataclass(frozen=True)
class Progress:
    """Where the run is: optimizer steps done, the epoch in progress and the batches done in it."""

    step: int
    epoch: int
    batches_in_epoch: int
    seed: int
    max_train_steps: int


def save_state(
    folder: Path, network, optimizer, lr_scheduler, random_streams: list[dict], progress: Progress, scaler=None,
    budget=None,
) -> Path:
    """Write the state folder atomically (a partial folder never carries the final name).

    `random_streams` holds `random_streams()` of every process, in process order: each process draws
    its own noise, so each resumes its own streams."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    network.save_weights(partial / NETWORK_FILE, None, None)
    torch.save(optimizer.state_dict(), partial / OPTIMIZER_FILE)
    torch.save(lr_scheduler.state_dict(), partial / SCHEDULER_FILE)
    torch.save({"processes": random_streams}, partial / RNG_FILE)
    if scaler is not None:
        torch.save(scaler.state_dict(), partial / SCALER_FILE)
    (partial / PROGRESS_FILE).write_text(json.dumps(asdict(progress), indent=2), encoding="utf-8")
    if budget is not None:  # --cat_drift_budget's alpha and running mean (JSON floats round-trip exactly)
        (partial / BUDGET_FILE).write_text(json.dumps(budget.state_dict(), indent=2), encoding="utf-8")
    if folder.exists():  # rename the old one aside first: at no moment is there no complete state
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
        partial.rename(folder)
        shutil.rmtree(old)
    else:
        partial.rename(folder)
    return folder


def load_state(folder: Path, network, optimizer, lr_scheduler, generator: torch.Generator, scaler=None,
               process_index: int = 0, num_processes: int = 1, budget=None) -> Progress:
    """Restore everything `save_state` wrote (this process's own random streams, the drift budget's
    alpha when `budget` is given); a state that does not fit this run is a UserInputError."""
    progress = read_progress(folder)
    network.load_weights(folder / NETWORK_FILE)
    try:
        optimizer.load_state_dict(_load(folder / OPTIMIZER_FILE))
        lr_scheduler.load_state_dict(_load(folder / SCHEDULER_FILE))
    except (ValueError, KeyError, RuntimeError) as error:
        raise UserInputError(
            f"--resume {folder}: its optimizer or scheduler state does not fit this run ({error}); resume with the "
            "same --network_dim, network_args, optimizer and learning-rate flags as the run that saved it."
        ) from None
    _restore_rng(_process_streams(folder, process_index, num_processes), generator)
    if scaler is not None and (folder / SCALER_FILE).is_file():
        scaler.load_state_dict(_load(folder / SCALER_FILE))
    if budget is not None:
        if not (folder / BUDGET_FILE).is_file():
            raise UserInputError(f"--resume {folder} was saved by a run without --cat_drift_budget, so its alpha is "
                                 "not known; resume without --cat_drift_budget (and with its --cat_weight).")
        budget.load_state_dict(json.loads((folder / BUDGET_FILE).read_text(encoding="utf-8")))
    return progress


def read_progress(folder: Path) -> Progress:
    """The progress record of a state folder, with a sentence when it is not one."""
    path = Path(folder) / PROGRESS_FILE
    if not path.is_file():
        raise UserInputError(
            f"--resume {folder} is not a state folder of this trainer (no {PROGRESS_FILE}); give a folder written "
            "by --save_state, e.g. output/name-step00000100-state."
        )
    try:
        return Progress(**json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as error:
        raise UserInputError(f"--resume {folder}: {PROGRESS_FILE} is damaged ({error}).") from None


def _load(path: Path):
    if not path.is_file():
        raise UserInputError(f"--resume {path.parent} lacks {path.name}; the state folder is incomplete.")
    return torch.load(path, map_location="cpu", weights_only=True)


def _process_streams(folder: Path, process_index: int, num_processes: int) -> dict:
    saved = _load(folder / RNG_FILE)
    streams = saved.get("processes", [saved])  # a single process's flat record, as earlier versions wrote
    if len(streams) != num_processes:
        raise UserInputError(
            f"--resume {folder} was saved by a run of {len(streams)} process(es), this run has {num_processes}; "
            f"resume with {len(streams)} (accelerate launch --num_processes {len(streams)}): each process "
            "continues its own noise stream."
        )
    return streams[process_index]


def random_streams(generator: torch.Generator) -> dict:
    """This process's random streams: torch's, Python's, CUDA's and the run's noise generator."""
    states = {"torch": torch.get_rng_state(), "generator": generator.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng(states: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(states["torch"])
    generator.set_state(states["generator"])
    random.setstate(_as_tuple(states["python"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuple(value):
    """random.setstate needs tuples; a round trip through torch.save may hand back lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value
