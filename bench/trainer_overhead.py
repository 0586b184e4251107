"""What our trainer adds to a plain training loop: `train_network_cat.py --cat_weight 0` against
`bench/plain_loop.py` on the same model, data and work, whole processes alternated in one run.

    .venv/bin/python -m bench.trainer_overhead [--model tiny|small] [--steps 40] [--rounds 3]

Both train plain LoRA (rank 4, AdamW, U-Net and text encoder) on the tiny SD model (U-Net 1M
parameters, configs/models/tiny_sd_v1) or the small one (17.6M, configs/models/small_sd_v1) saved as a single
file and the demo dataset (64 px, batch 2, images decoded every step, no latent cache, no loader
workers, SDPA). For each process it prints, as the median over `--rounds` (after one uncounted warm-up round): the wall time from
process start to exit, the time from process start to the end of the first optimizer step, and the
steady seconds per step (median interval between later steps), wall and the process's CPU time (less
disturbed by other tenants of a shared machine), with the ratio ours / plain: the median, and the
lowest and highest, of the rounds' ratios (each round's pair ran back to back), so the spread
between rounds shows which differences are noise. Step times come from a
`STEP <unix time> <process CPU time>` line after each optimizer step: the plain loop prints it
itself; the trainer gets it from a global optimizer step hook installed by its launcher.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"tiny": "tiny_sd_v1", "small": "small_sd_v1"}  # configs/models/<name>

# Runs train_network_cat.py as `python train_network_cat.py ...` would, with one hook that prints a
# timestamp after every optimizer step (torch.optim is imported by the trainer anyway).
TRAINER_LAUNCHER = (
    "import runpy, sys, time\n"
    "from torch.optim.optimizer import register_optimizer_step_post_hook\n"
    "register_optimizer_step_post_hook(\n"
    "    lambda *a: print(f'STEP {time.time():.6f} {time.process_time():.6f}', flush=True))\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="trainer overhead against a plain loop")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="alternating pairs of processes")
    return parser.parse_args(argv)


def prepare(folder: Path, model: str) -> tuple[Path, Path, Path]:
    """(checkpoint, model config folder, image folder) of the model and the demo dataset."""
    from library.families.model_parts import MODEL_CONFIGS_DIR
    from library.testing.demo_data import write_demo_dataset
    from library.testing.tiny_sd import build_tiny_sd, save_single_file

    config = MODEL_CONFIGS_DIR / MODELS[model]
    checkpoint = save_single_file(build_tiny_sd(seed=0, config_dir=config), folder / f"{model}.safetensors")
    data = write_demo_dataset(folder / "data", seed=0)
    return checkpoint, config, data / "train"


def trainer_command(checkpoint: Path, config: Path, images: Path, out: Path, steps: int) -> list[str]:
    return [
        sys.executable, "-c", TRAINER_LAUNCHER, str(ROOT / "train_network_cat.py"),
        "--pretrained_model_name_or_path", str(checkpoint), "--model_config", str(config),
        "--train_data_dir", str(images), "--caption_extension", ".txt", "--resolution", "64",
        "--output_dir", str(out), "--output_name", "ours", "--network_module", "networks.lora_cat",
        "--network_dim", "4", "--network_alpha", "4", "--learning_rate", "1e-3", "--optimizer_type", "AdamW",
        "--lr_scheduler", "constant", "--max_train_steps", str(steps), "--train_batch_size", "2", "--seed", "0",
        "--cat_trigger", "sks", "--cat_weight", "0", "--max_data_loader_n_workers", "0", "--sdpa",
    ]


def plain_command(checkpoint: Path, config: Path, images: Path, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "bench.plain_loop", str(checkpoint), str(config), str(images),
            str(out / "plain.safetensors"), str(steps)]


ROWS = (("wall", "wall s (start to exit)"), ("first", "s to first step"), ("step", "s/step (steady)"),
        ("cpu_step", "CPU s/step (steady)"))


def timed(command: list[str]) -> dict[str, float]:
    """Run `command`; wall seconds, seconds to the first step's end, and the median later step
    (wall and CPU time)."""
    started = time.time()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - started
    if result.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    stamps = [[float(value) for value in line.split()[1:]] for line in result.stdout.splitlines()
              if line.startswith("STEP ")]
    walls, cpus = zip(*stamps)
    return {"wall": wall, "first": walls[0] - started, "step": _median_interval(walls),
            "cpu_step": _median_interval(cpus)}


def _median_interval(stamps: tuple[float, ...]) -> float:
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:]))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        checkpoint, config, images = prepare(folder, args.model)
        runs: dict[str, list[dict[str, float]]] = {"ours": [], "plain": []}
        # Round 0 is a warm-up, not counted: the first process reads every module from a cold disk cache.
        for round_index in range(args.rounds + 1):
            for name, build in (("ours", trainer_command), ("plain", plain_command)):
                result = timed(build(checkpoint, config, images, folder / f"out_{name}", args.steps))
                if round_index:
                    runs[name].append(result)
    print(f"{args.model} SD model ({MODELS[args.model]}), 64 px, batch 2, rank 4, U-Net + text encoder, {args.steps} steps, "
          f"median of {args.rounds} alternating rounds after a warm-up round")
    print(f"{'':24}{'ours':>8}{'plain':>8}{'ours/plain':>12}{'lowest':>8}{'highest':>8}")
    for key, label in ROWS:
        ours = statistics.median(r[key] for r in runs["ours"])
        plain = statistics.median(r[key] for r in runs["plain"])
        ratios = [a[key] / b[key] for a, b in zip(runs["ours"], runs["plain"])]
        print(f"{label:24}{ours:8.3f}{plain:8.3f}{statistics.median(ratios):12.2f}{min(ratios):8.2f}{max(ratios):8.2f}")


if __name__ == "__main__":
    main()
