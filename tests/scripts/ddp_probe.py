"""Run by tests/test_ddp.py under `torchrun --nproc_per_node 2`: trains with the real trainer and
writes, per rank, how many all-reduce calls the training loop made, a checksum of the adapter weights,
the seed of the rank's noise generator, its CAT weight at the end, and the first optimizer step's gradients before and after
averaging (with one parameter made unused on every rank and one on rank 0 only)."""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import library.training.trainer as trainer  # noqa: E402
from library.cat.network_protocol import unwrap_network  # noqa: E402
from library.cli.train_args import parse_args  # noqa: E402
from library.families.sd.models import load as load_stable_diffusion  # noqa: E402

calls = {"allreduce": 0}


real_all_reduce = torch.distributed.all_reduce


def counting_all_reduce(*args, **kwargs):
    calls["allreduce"] += 1
    return real_all_reduce(*args, **kwargs)


real_average = trainer.average_gradients
first_step: dict = {}


def recording_average(params, world_size):
    """At the first optimizer step: drop the gradient of parameter 0 everywhere and of parameter 1 on
    rank 0 (as module dropout would), and keep the first four gradients before and after averaging."""
    params = list(params)
    if not first_step and os.environ.get("PROBE_FIRST_STEP") == "1":
        params[0].grad = None
        if torch.distributed.get_rank() == 0:
            params[1].grad = None
        first_step["local"] = [None if p.grad is None else p.grad.clone() for p in params[:4]]
        real_average(params, world_size)
        first_step["averaged"] = [None if p.grad is None else p.grad.clone() for p in params[:4]]
        return
    real_average(params, world_size)


def main() -> None:
    config = parse_args(sys.argv[1:])
    trainer.average_gradients = recording_average
    run = trainer.setup(config, load_stable_diffusion)
    torch.distributed.all_reduce = counting_all_reduce  # counts the collectives of the training loop only
    trainer.training_loop(run)
    torch.distributed.all_reduce = real_all_reduce
    network = unwrap_network(run.network)
    checksum = sum(p.double().sum().item() for p in network.parameters())
    # One file per rank: lines printed by two processes into one pipe can interleave.
    rank = run.accelerator.process_index
    probe = {"rank": rank, "allreduce": calls["allreduce"], "checksum": checksum, "seed": run.generator.initial_seed(),
             "alpha": run.alpha}
    torch.save(first_step, Path(config.save.output_dir) / f"grads-rank{rank}.pt")
    (Path(config.save.output_dir) / f"probe-rank{probe['rank']}.json").write_text(json.dumps(probe))


if __name__ == "__main__":
    main()
