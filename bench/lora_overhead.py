"""What the LoRA network costs in a U-Net forward pass, and what switching it off costs.

    .venv/bin/python -m bench.lora_overhead [--model tiny|sd_v1] [--repeats 5]

Prints seconds per U-Net forward (no gradients) for: the bare model, the model with
`networks.lora_cat` attached at multiplier 1, and at multiplier 0 (CAT's reference pass), each as
the median of `--repeats` runs measured in this one process, with ratios to the bare model. The
multiplier-0 path is an explicit branch, so its ratio should sit near 1.0.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import library  # noqa: F401  (before diffusers: quiets an irrelevant bitsandbytes import warning)
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

import networks.lora_cat as lora_cat
from library.families.sd.models import MODEL_CONFIGS_DIR
from library.testing.tiny_sd import build_tiny_sd


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="LoRA forward overhead")
    parser.add_argument("--model", choices=["tiny", "sd_v1"], default="tiny",
                        help="tiny: the built-in test model, 64 px; sd_v1: SD 1.5's U-Net shape (random weights), 64 px")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    return parser.parse_args(argv)


def build(model: str) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    if model == "tiny":
        sd = build_tiny_sd(seed=0)
        return sd.unet, sd.text_encoder
    torch.manual_seed(0)
    folder = MODEL_CONFIGS_DIR / "sd_v1"
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    return unet.eval(), text_encoder.eval()


@torch.no_grad()
def interleaved_medians(unet, network, inputs, repeats: int) -> dict[str, float]:
    """Median seconds per forward of each configuration, measured in alternating rounds.

    Alternating keeps slow drifts of a shared machine (other jobs, clock changes) out of the ratios.
    """
    configurations = {
        "bare U-Net": lambda: (network.restore(), network.set_multiplier(1.0)),
        "LoRA on (multiplier 1)": lambda: (network.apply_to(None, unet), network.set_multiplier(1.0)),
        "LoRA off (multiplier 0)": lambda: (network.apply_to(None, unet), network.set_multiplier(0.0)),
    }
    times: dict[str, list[float]] = {name: [] for name in configurations}
    for round_index in range(repeats + 1):
        for name, switch in configurations.items():
            switch()
            start = time.perf_counter()
            unet(*inputs)
            if round_index > 0:  # round 0 warms up allocations and kernels
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    unet, text_encoder = build(args.model)
    cfg = unet.config
    latents = torch.randn(args.batch, cfg.in_channels, 8, 8)
    hidden = torch.randn(args.batch, 77, cfg.cross_attention_dim)
    inputs = (latents, torch.tensor([500] * args.batch), hidden)

    network = lora_cat.create_network(1.0, 16, 8, None, text_encoder, unet, conv_dim="8")
    network.apply_to(text_encoder, unet)
    with torch.no_grad():
        for lora in network.all_loras:
            lora.lora_up.weight.normal_(std=0.01)
    medians = interleaved_medians(unet, network, inputs, args.repeats)
    bare = medians["bare U-Net"]

    params = sum(p.numel() for p in unet.parameters())
    print(f"model {args.model}: U-Net {params / 1e6:.1f}M params, {len(network.unet_loras)} U-Net adapters "
          f"(rank 16, conv rank 8), batch {args.batch}, 64 px, {torch.get_num_threads()} threads")
    print(f"{'configuration':<28}{'s/forward':>12}{'x bare':>10}")
    for name, seconds in medians.items():
        print(f"{name:<28}{seconds:>12.4f}{seconds / bare:>10.2f}")


if __name__ == "__main__":
    main()
