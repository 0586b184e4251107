"""The built-in demo (`make demo`): everything that exists so far, on the built-in tiny SD model.

1. Build the tiny SD-shaped model (seeded random weights) and save it as a single-file checkpoint
   in the original LDM layout, as users have their models.
2. Load it back through the same loader a real checkpoint goes through.
3. Attach `networks.lora_cat` (LoRA + LoCon, U-Net and text encoder), give the adapters weights,
   and save a kohya LoRA file with its metadata.
4. Show the two properties CAT stands on: multiplier 0 is bitwise the base model, and diffusers'
   own `load_lora_weights` reproduces our network's outputs from the file.

The adapter weights are random here: training arrives with `train_network_cat.py`.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import library  # noqa: F401  (before diffusers: quiets an irrelevant bitsandbytes import warning)
from diffusers import StableDiffusionPipeline

import networks.lora_cat as lora_cat
from library.lora_file import read_lora_file
from library.lora_metadata import modelspec_metadata, stringify_metadata
from library.sd_models import load_stable_diffusion
from library.tiny_sd import build_tiny_sd, save_single_file, tiny_config_dir

PROMPTS = ["a photo of sks teapot on a table", "a photo of a teapot on a table"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="demo_output", help="where the checkpoint and the LoRA are written")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    checkpoint = out / "tiny_sd_v1.safetensors"
    save_single_file(build_tiny_sd(seed=args.seed), checkpoint)
    print(f"1. built the tiny SD model and saved it as a single-file checkpoint: {checkpoint}")

    sd = load_stable_diffusion(checkpoint, model_config=tiny_config_dir(v2=False))
    pristine = copy.deepcopy(sd)
    params = sum(p.numel() for p in sd.unet.parameters())
    print(f"2. loaded it back like a user's checkpoint: U-Net {params / 1e6:.2f}M parameters")

    network = lora_cat.create_network(1.0, 4, 2.0, sd.vae, sd.text_encoder, sd.unet, conv_dim="2", conv_alpha="1")
    network.apply_to(sd.text_encoder, sd.unet)
    _give_adapters_weights(network, args.seed)
    lora_path = out / "demo_lora.safetensors"
    network.save_weights(lora_path, torch.float32, _metadata(sd))
    print(f"3. saved a LoRA with {len(network.all_loras)} adapted layers: {lora_path}")

    inputs = _inputs(sd, args.seed)
    ours = _predict(sd, inputs)
    with network.adapters_off():
        off = _predict(sd, inputs)
    base = _predict(pristine, inputs)
    pipe = _pipeline(pristine)
    pipe.load_lora_weights(str(lora_path))
    theirs = _predict(pristine, inputs)
    _report(ours, off, base, theirs, lora_path)


def _give_adapters_weights(network, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _metadata(sd) -> dict[str, str]:
    metadata = stringify_metadata({
        "ss_network_module": "networks.lora_cat",
        "ss_network_dim": 4,
        "ss_network_alpha": 2.0,
        "ss_network_args": json.dumps({"conv_dim": "2", "conv_alpha": "1"}),
        "ss_base_model_version": sd.model_version,
        "ss_output_name": "demo_lora",
    })
    metadata.update(modelspec_metadata(model_version=sd.model_version, title="demo_lora", resolution=64,
                                       timestamp=time.time(), trigger_phrase="sks"))
    return metadata


def _inputs(sd, seed: int):
    gen = torch.Generator().manual_seed(seed)
    cfg = sd.unet.config
    ids = sd.tokenizer(PROMPTS, padding="max_length", truncation=True, return_tensors="pt").input_ids
    latents = torch.randn(len(PROMPTS), cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    return ids, latents, torch.tensor([100, 800])


@torch.no_grad()
def _predict(sd, inputs):
    ids, latents, timesteps = inputs
    hidden = sd.text_encoder(ids).last_hidden_state
    return hidden, sd.unet(latents, timesteps, hidden).sample


def _pipeline(sd) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer, unet=sd.unet,
        scheduler=sd.noise_scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _report(ours, off, base, theirs, lora_path: Path) -> None:
    def gap(a, b):
        return max((x - y).abs().max().item() for x, y in zip(a, b))

    _, metadata = read_lora_file(lora_path)
    print("4. checks (max |difference| over text-encoder states and U-Net predictions):")
    print(f"   adapter on  vs base model                : {gap(ours, base):.3e}  (the LoRA changes the model)")
    print(f"   multiplier 0 vs base model               : {gap(off, base):.3e}  (must be exactly 0)")
    print(f"   diffusers load_lora_weights vs ours      : {gap(theirs, ours):.3e}  (must be < 1e-4)")
    print(f"   file metadata: {len(metadata)} keys, sshs_model_hash {metadata['sshs_model_hash'][:16]}..., "
          f"modelspec.architecture {metadata['modelspec.architecture']}")
    ok = gap(off, base) == 0.0 and gap(theirs, ours) < 1e-4
    print("demo OK" if ok else "demo FAILED")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
