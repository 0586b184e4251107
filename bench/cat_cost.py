"""What CAT costs per training step against plain LoRA: seconds and peak memory.

    .venv/bin/python -m bench.cat_cost [--models tiny sd_v1] [--steps 3]

For each model and each way to train (plain LoRA = `--cat_weight 0`, CAT batched, CAT sequential)
a fresh process builds the model (seeded random weights), attaches `networks.lora_cat` (rank 16,
U-Net and text encoder), and runs warm-up + `--steps` optimizer steps of the real objective
(`library.cat.objective.cat_step`) on random latents. It prints the median seconds per step and the
peak resident memory during the steps above what the process held before them (Linux
`clear_refs`/`VmHWM`; on a GPU, `torch.cuda.max_memory_allocated`), with ratios to plain LoRA.
Targets (CAT.md, issue 4): step time <= 2.7x plain (2.5x is the floor for exact CAT); sequential
peak memory <= 1.1x plain.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = {
    "tiny": {"resolution": 64, "batch": 2},
    "sd_v1": {"resolution": 256, "batch": 1},
}
MODES = (("plain LoRA", 0.0, "batched"), ("CAT batched", 1.0, "batched"), ("CAT sequential", 1.0, "sequential"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="CAT step cost vs plain LoRA")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "ALPHA", "MODE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child[0], float(args.child[1]), args.child[2], args.steps)))
        return
    for model in args.models:
        rows = [(name, _run_child(model, alpha, mode, args.steps)) for name, alpha, mode in MODES]
        _print_table(model, rows)


def _run_child(model: str, alpha: float, mode: str, steps: int) -> dict:
    command = [sys.executable, "-m", "bench.cat_cost", "--steps", str(steps), "--child", model, str(alpha), mode]
    # A fixed mmap threshold makes glibc hand every large tensor back to the OS when freed, so the
    # peak resident memory follows the peak of live tensors instead of the allocator's cache.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, check=True, capture_output=True, text=True, env=env,
                            cwd=Path(__file__).resolve().parent.parent)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _print_table(model: str, rows: list[tuple[str, dict]]) -> None:
    first = rows[0][1]
    print(f"\nmodel {model}: U-Net {first['unet_params'] / 1e6:.1f}M params, {first['resolution']} px, batch {first['batch']}, "
          f"{first['steps']} steps after warm-up, device {first['device']}")
    print(f"{'':<16}{'s/step':>9}{'x plain':>9}{'peak MiB':>10}{'x plain':>9}")
    for name, row in rows:
        print(f"{name:<16}{row['seconds']:>9.3f}{row['seconds'] / first['seconds']:>9.2f}"
              f"{row['peak_mib']:>10.1f}{row['peak_mib'] / first['peak_mib']:>9.2f}")


# --- the measured process --------------------------------------------------------------------------


def measure(model: str, alpha: float, mode: str, steps: int) -> dict:
    import torch

    import library  # noqa: F401
    from library.cat.objective import CATBatch, cat_step
    from library.families.sd.denoiser import SDDenoiser

    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet, text_encoder, tokenizer = _build(model, device)
    network = _network(unet, text_encoder, device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    denoiser = SDDenoiser(unet, text_encoder)
    spec = MODELS[model]
    batch = _batch(CATBatch, tokenizer, unet, spec, device)
    mse = lambda p, t: (p.float() - t.float()).square().mean(dim=(1, 2, 3))  # noqa: E731

    def step() -> None:
        cat_step(denoiser, network, batch, alpha, mode, mse, lambda loss, last: loss.backward())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer state and first-call allocations
    _reset_peak(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        "seconds": statistics.median(times), "peak_mib": _peak_mib(device), "device": device,
        "unet_params": sum(p.numel() for p in unet.parameters()), "steps": steps, **spec,
    }


def _build(model: str, device: str):
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.families.clip_tokenizer import build_clip_tokenizer
    from library.families.sd.models import MODEL_CONFIGS_DIR
    from library.testing.tiny_sd import build_tiny_sd

    if model == "tiny":
        sd = build_tiny_sd(seed=0)
        unet, text_encoder, tokenizer = sd.unet, sd.text_encoder, sd.tokenizer
    else:
        torch.manual_seed(0)
        folder = MODEL_CONFIGS_DIR / model
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        tokenizer = build_clip_tokenizer()
    for part in (unet, text_encoder):
        part.requires_grad_(False)
        part.to(device)
    return unet, text_encoder, tokenizer


def _network(unet, text_encoder, device):
    import networks.lora_cat as lora_cat

    network = lora_cat.create_network(1.0, 16, 8, None, text_encoder, unet)
    network.apply_to(text_encoder, unet)
    network.prepare_grad_etc(text_encoder, unet)
    return network.to(device)


def _batch(batch_class, tokenizer, unet, spec: dict, device: str):
    import torch

    gen = torch.Generator().manual_seed(0)
    size, batch = spec["resolution"] // 8, spec["batch"]
    latents = torch.randn(batch, unet.config.in_channels, size, size, generator=gen).to(device)
    ids = tokenizer(["a photo of sks teapot"] * batch, padding="max_length", return_tensors="pt").input_ids
    free = tokenizer(["a photo of teapot"] * batch, padding="max_length", return_tensors="pt").input_ids
    return batch_class(latents, torch.full((batch,), 500, device=device), torch.randn_like(latents),
                       ids.to(device), free.to(device), torch.ones(batch, device=device))


def _reset_peak(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        _reset_peak.baseline = torch.cuda.memory_allocated()
        return
    _reset_peak.baseline = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS


def _peak_mib(device: str) -> float:
    if device == "cuda":
        import torch

        return (torch.cuda.max_memory_allocated() - _reset_peak.baseline) / 2**20
    return (_status_kib("VmHWM") - _reset_peak.baseline) / 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (this benchmark needs Linux)")


if __name__ == "__main__":
    main()
