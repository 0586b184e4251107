"""What CAT costs per training step against plain LoRA: seconds and peak memory.

    .venv/bin/python -m bench.cat_cost [--models tiny sd_v1 tiny_sdxl sdxl tiny_flux flux] [--steps 3]

For each model and each way to train (plain LoRA = `--cat_weight 0`, CAT batched, CAT sequential)
a fresh process builds the model (seeded random weights), attaches `networks.lora_cat` (rank 16),
and runs warm-up + `--steps` optimizer steps of the real objective (`library.cat.objective.cat_step`)
on random latents. It prints the median seconds per step and the peak resident memory during the
steps above what the process held before them (Linux `clear_refs`/`VmHWM`; on a GPU,
`torch.cuda.max_memory_allocated`), with ratios to plain LoRA.

- SD 1.x (`tiny`, `sd_v1`): LoRA on the U-Net and the text encoder, captions encoded every step.
- SDXL (`tiny_sdxl`, `sdxl`): LoRA on the U-Net only, with fixed random text states as
  `--cache_text_encoder_outputs` gives them (77 x 2048 states and a 1280 pooled vector at full size;
  the trigger and trigger-free captions are two different fixed tensors) and the resolution's
  uncropped size/crop `time_ids`; no text encoder is built. `sdxl` is SDXL base 1.0's U-Net shape
  (`configs/models/sdxl_base/unet`, 2.6B parameters): its fp32 weights alone take about 10 GB.
- FLUX.1 (`tiny_flux`, `flux`): LoRA on the transformer only (sd-scripts' default targets, fused qkv
  and linear1 included), with fixed random text states as `--cache_text_encoder_outputs` gives them
  (`bench.flux_text`: 256 T5 tokens, the CLIP-L pooled vector) and FLUX.1-dev's guidance input. `flux`
  is FLUX.1-dev's transformer at full width (hidden 3072, 24 heads, its block design) with 1 double and
  2 single blocks instead of 19 and 38 (about 0.67B parameters): what a 2-core CPU can step in minutes.

Targets (CAT.md, issue 4): step time <= 2.7x plain (2.5x is the floor for exact CAT); sequential
peak memory <= 1.1x plain. For SDXL (issue 12): sequential <= 2.6x plain time, <= 1.1x plain memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ModelSpec:
    family: str  # "sd", "sdxl" or "flux"
    config: str | None  # folder under configs/models; None for the built-in tiny SD model
    resolution: int
    batch: int


MODELS = {
    "tiny": ModelSpec("sd", None, 64, 2),
    "sd_v1": ModelSpec("sd", "sd_v1", 256, 1),
    "tiny_sdxl": ModelSpec("sdxl", "tiny_sdxl", 64, 2),
    "sdxl": ModelSpec("sdxl", "sdxl_base", 256, 1),
    "sdxl_512": ModelSpec("sdxl", "sdxl_base", 512, 1),  # 4x the activations of `sdxl`: ~25 min on 2 cores
    "tiny_flux": ModelSpec("flux", "tiny_flux", 64, 2),
    "flux": ModelSpec("flux", "flux_dev", 256, 1),
}
FLUX_BLOCKS = {"flux": (1, 2)}  # (double, single) blocks where the bench cuts FLUX.1-dev's 19 and 38
DEFAULT_MODELS = ("tiny", "sd_v1")  # `sdxl` needs ~11 GB of memory and minutes per mode: asked for by name
MODES = (("plain LoRA", 0.0, "batched"), ("CAT batched", 1.0, "batched"), ("CAT sequential", 1.0, "sequential"))
RANK, ALPHA = 16, 8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="CAT step cost vs plain LoRA")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(DEFAULT_MODELS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "ALPHA", "MODE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child[0], float(args.child[1]), args.child[2], args.steps)))
        return
    for model in args.models:
        rows = []
        for name, alpha, mode in MODES:
            rows.append((name, _run_child(model, alpha, mode, args.steps)))
            # A full-size run takes minutes per mode: each figure is on stderr as soon as it is measured.
            print(f"{model} {name}: {rows[-1][1]['seconds']:.3f} s/step, {rows[-1][1]['peak_mib']:.1f} MiB",
                  file=sys.stderr, flush=True)
        _print_table(model, rows)


def _run_child(model: str, alpha: float, mode: str, steps: int) -> dict:
    command = [sys.executable, "-m", "bench.cat_cost", "--steps", str(steps), "--child", model, str(alpha), mode]
    # A fixed mmap threshold makes glibc hand every large tensor back to the OS when freed, so the
    # peak resident memory follows the peak of live tensors instead of the allocator's cache.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, capture_output=True, text=True, env=env,
                            cwd=Path(__file__).resolve().parent.parent)
    if result.returncode != 0:  # e.g. killed for memory (-9): say which run, and show its last words
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"bench.cat_cost: the {model} run (alpha {alpha}, {mode}) exited with {result.returncode}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _print_table(model: str, rows: list[tuple[str, dict]]) -> None:
    first = rows[0][1]
    print(f"\nmodel {model}: U-Net {first['unet_params'] / 1e6:.1f}M params, {first['resolution']} px, batch {first['batch']}, "
          f"{first['steps']} steps after warm-up, device {first['device']}, LoRA on {first['trains']}")
    print(f"{'':<16}{'s/step':>9}{'x plain':>9}{'peak MiB':>10}{'x plain':>9}")
    for name, row in rows:
        print(f"{name:<16}{row['seconds']:>9.3f}{row['seconds'] / first['seconds']:>9.2f}"
              f"{row['peak_mib']:>10.1f}{row['peak_mib'] / first['peak_mib']:>9.2f}")


# --- the measured process --------------------------------------------------------------------------


def measure(model: str, alpha: float, mode: str, steps: int) -> dict:
    import torch

    import library  # noqa: F401
    from library.cat.objective import cat_step

    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = MODELS[model]
    setup = {"sd": _sd_setup, "sdxl": _sdxl_setup, "flux": _flux_setup}[spec.family]
    unet, network, denoiser, batch, trains = setup(model, spec, device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
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
        "seconds": statistics.median(times), "peak_mib": _peak_mib(device), "device": device, "trains": trains,
        "unet_params": sum(p.numel() for p in unet.parameters()), "steps": steps,
        "resolution": spec.resolution, "batch": spec.batch,
    }


def _sd_setup(model: str, spec: ModelSpec, device: str):
    """SD 1.x: U-Net and text encoder, LoRA on both, real captions tokenized and encoded every step."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.cat.objective import CATBatch
    from library.families.clip_tokenizer import build_clip_tokenizer
    from library.families.sd.denoiser import SDDenoiser
    from library.families.sd.models import MODEL_CONFIGS_DIR
    from library.testing.tiny_sd import build_tiny_sd

    if spec.config is None:
        sd = build_tiny_sd(seed=0)
        unet, text_encoder, tokenizer = sd.unet, sd.text_encoder, sd.tokenizer
    else:
        torch.manual_seed(0)
        folder = MODEL_CONFIGS_DIR / spec.config
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        tokenizer = build_clip_tokenizer()
    for part in (unet, text_encoder):
        part.requires_grad_(False)
        part.to(device)
    network = _network(text_encoder, unet, device)
    latents, noise = _latents(unet, spec, device)
    ids = tokenizer(["a photo of sks teapot"] * spec.batch, padding="max_length", return_tensors="pt").input_ids
    free = tokenizer(["a photo of teapot"] * spec.batch, padding="max_length", return_tensors="pt").input_ids
    batch = CATBatch(latents, _timesteps(spec, device), noise, ids.to(device), free.to(device),
                     torch.ones(spec.batch, device=device))
    return unet, network, SDDenoiser(unet, text_encoder), batch, "U-Net and text encoder"


def _sdxl_setup(model: str, spec: ModelSpec, device: str):
    """SDXL with cached text-encoder outputs: the U-Net alone (weights built in place, no copy), LoRA
    on it, and the trainer's own cache lookup in front of `SDXLDenoiser.predict`."""
    import torch
    from diffusers import UNet2DConditionModel

    from bench.sdxl_text import cached_sdxl_denoiser
    from library.cat.objective import CATBatch
    from library.families.model_parts import MODEL_CONFIGS_DIR
    from library.families.sdxl.denoiser import uncropped_time_ids

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(MODEL_CONFIGS_DIR / spec.config / "unet"))
    unet.requires_grad_(False)
    unet.to(device)
    network = _network(None, unet, device)
    latents, noise = _latents(unet, spec, device)

    denoiser, trigger_ids, free_ids = cached_sdxl_denoiser(unet, device)
    trigger, free = (ids.expand(spec.batch, 1).to(device) for ids in (trigger_ids, free_ids))
    batch = CATBatch(latents, _timesteps(spec, device), noise, trigger, free, torch.ones(spec.batch, device=device),
                     conditioning={"time_ids": uncropped_time_ids(latents, 8)})
    return unet, network, denoiser, batch, "U-Net only, cached text-encoder outputs"


def _flux_setup(model: str, spec: ModelSpec, device: str):
    """FLUX.1 with cached text-encoder outputs: the transformer alone, LoRA on it, the trainer's cache
    lookup in front of `FluxDenoiser.predict`, and the guidance value as training passes it."""
    import torch
    from diffusers import FluxTransformer2DModel

    from bench.flux_text import cached_flux_denoiser
    from library.cat.objective import CATBatch
    from library.families.model_parts import MODEL_CONFIGS_DIR

    torch.manual_seed(0)
    config = FluxTransformer2DModel.load_config(MODEL_CONFIGS_DIR / spec.config / "transformer")
    if model in FLUX_BLOCKS:
        config = {**config, "num_layers": FLUX_BLOCKS[model][0], "num_single_layers": FLUX_BLOCKS[model][1]}
    transformer = FluxTransformer2DModel.from_config(config)
    transformer.requires_grad_(False)
    transformer.to(device)
    network = _network(None, transformer, device)
    gen = torch.Generator().manual_seed(0)
    size = spec.resolution // 8
    latents = torch.randn(spec.batch, 16, size, size, generator=gen).to(device)
    denoiser, trigger_ids, free_ids = cached_flux_denoiser(transformer, device)
    trigger, free = (ids.expand(spec.batch, 1).to(device) for ids in (trigger_ids, free_ids))
    batch = CATBatch(latents, _timesteps(spec, device), torch.randn_like(latents), trigger, free,
                     torch.ones(spec.batch, device=device), conditioning={"guidance": torch.ones(spec.batch)})
    return transformer, network, denoiser, batch, "transformer only, cached text-encoder outputs"


def _network(text_encoder, unet, device):
    """`networks.lora_cat` as the trainer builds it; `text_encoder=None` gives a U-Net-only network."""
    import networks.lora_cat as lora_cat

    network = lora_cat.create_network(1.0, RANK, ALPHA, None, text_encoder, unet)
    network.apply_to(text_encoder, unet, apply_text_encoder=text_encoder is not None)
    network.prepare_grad_etc(text_encoder, unet)
    return network.to(device)


def _latents(unet, spec: ModelSpec, device: str):
    """Seeded (noisy latents, target noise) at the spec's resolution (8 pixels per latent)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    size = spec.resolution // 8
    latents = torch.randn(spec.batch, unet.config.in_channels, size, size, generator=gen).to(device)
    return latents, torch.randn_like(latents)


def _timesteps(spec: ModelSpec, device: str):
    import torch

    return torch.full((spec.batch,), 500, device=device)


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
