"""Run by tests/test_ddp.py under `torchrun --nproc_per_node 2`: trains with the real trainer and
writes, per rank, how many all-reduce calls the training loop made and a checksum of the adapter weights."""

import json
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


def main() -> None:
    config = parse_args(sys.argv[1:])
    run = trainer.setup(config, load_stable_diffusion)
    torch.distributed.all_reduce = counting_all_reduce  # counts the collectives of the training loop only
    trainer.training_loop(run)
    torch.distributed.all_reduce = real_all_reduce
    network = unwrap_network(run.network)
    checksum = sum(p.double().sum().item() for p in network.parameters())
    # One file per rank: lines printed by two processes into one pipe can interleave.
    probe = {"rank": run.accelerator.process_index, "allreduce": calls["allreduce"], "checksum": checksum}
    (Path(config.save.output_dir) / f"probe-rank{probe['rank']}.json").write_text(json.dumps(probe))


if __name__ == "__main__":
    main()
