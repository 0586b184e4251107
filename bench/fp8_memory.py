"""What `--fp8_base` saves: the base model's resident memory in bf16 and with its weights in fp8, and the
peak of one training step above it (plain LoRA and CAT sequential), measured in one process per mode.

    .venv/bin/python -m bench.fp8_memory [--model flux|sd_v1] [--resolution 256]

- `flux`: FLUX.1-dev's transformer at full width cut to 1 double and 2 single blocks (as in
  bench.cat_cost), cached text states, guidance input; `sd_v1`: SD 1.5's U-Net, captions' states random.
Memory is the process's resident set (Linux `VmRSS`, peak `VmHWM` reset before the step), with glibc
returning freed blocks at once (`MALLOC_MMAP_THRESHOLD_`): the base weights' bytes as the OS sees them.
Each mode runs in a fresh process, so one's allocations do not hide the other's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = (("bf16", "plain LoRA", 0.0), ("fp8", "plain LoRA", 0.0), ("bf16", "CAT sequential", 1.0),
         ("fp8", "CAT sequential", 1.0))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="--fp8_base: base model memory and one step's peak")
    parser.add_argument("--model", choices=["flux", "sd_v1"], default="flux")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--child", nargs=2, metavar=("WEIGHTS", "ALPHA"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.model, args.resolution, args.child[0], float(args.child[1]))))
        return
    rows = []
    for weights, method, alpha in MODES:
        command = [sys.executable, "-m", "bench.fp8_memory", "--model", args.model, "--resolution", str(args.resolution),
                   "--child", weights, str(alpha)]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        if result.returncode != 0:
            sys.stderr.write(result.stderr[-3000:])
            raise SystemExit(f"bench.fp8_memory: the {weights} {method} run exited with {result.returncode}")
        rows.append((weights, method, json.loads(result.stdout.strip().splitlines()[-1])))
    first = rows[0][2]
    print(f"model {args.model}: {first['params'] / 1e6:.1f}M base parameters, {args.resolution} px, batch 1, "
          f"LoRA rank 16, bf16 autocast, one step after a warm-up step, device cpu")
    print(f"{'':<28}{'base MiB':>10}{'x bf16':>8}{'step peak MiB':>15}")
    for weights, method, row in rows:
        print(f"{weights + ' weights, ' + method:<28}{row['base_mib']:>10.1f}{row['base_mib'] / first['base_mib']:>8.2f}"
              f"{row['step_peak_mib']:>15.1f}")


def measure(model: str, resolution: int, weights: str, alpha: float) -> dict:
    import gc

    import torch

    import library  # noqa: F401
    from bench.cat_cost import MODELS, _flux_setup, _sd_setup, _status_kib
    from library.cat.objective import cat_step
    from library.training.fp8_weights import store_in_fp8

    before = _status_kib("VmRSS")
    spec = MODELS[model]
    spec = type(spec)(spec.family, spec.config, resolution, 1)
    setup = _flux_setup if spec.family == "flux" else _sd_setup
    with _fp8_before_the_network(weights == "fp8", store_in_fp8):
        unet, network, denoiser, batch, _ = setup(model, spec, "cpu")
    gc.collect()
    base_mib = (_status_kib("VmRSS") - before) / 1024
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    mse = lambda p, t: (p.float() - t.float()).square().mean(dim=(1, 2, 3))  # noqa: E731

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cat_step(denoiser, network, batch, alpha, "sequential", mse, lambda loss, last: loss.backward())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    gc.collect()
    start = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    step()
    return {"params": sum(p.numel() for p in unet.parameters()), "base_mib": base_mib,
            "step_peak_mib": (_status_kib("VmHWM") - start) / 1024}


class _fp8_before_the_network:
    """Around a bench setup: the frozen model in bf16 (and its weights in fp8) before the adapters attach,
    as the trainer orders it (`_prepare_models`, then the network)."""

    def __init__(self, fp8: bool, store_in_fp8) -> None:
        self.fp8, self.store_in_fp8 = fp8, store_in_fp8

    def __enter__(self):
        import bench.cat_cost as cat_cost

        self.original = cat_cost._network

        def network(text_encoder, unet, device):
            import torch

            for part in (unet, text_encoder):
                if part is not None:
                    part.to(torch.bfloat16)
                    if self.fp8:
                        self.store_in_fp8(part)
            return self.original(text_encoder, unet, device)

        cat_cost._network = network

    def __exit__(self, *exc) -> None:
        import bench.cat_cost as cat_cost

        cat_cost._network = self.original


if __name__ == "__main__":
    main()
