"""The built-in demo (`make demo`): plain LoRA vs CAT on the built-in tiny SD model (`--model sdxl`:
the tiny SDXL model and `sdxl_train_network_cat.py`).

1. Build the tiny model (seeded random weights), save it as a single-file checkpoint as users have
   their models, and write a small dataset in sd-scripts' folder layout.
2. Train two LoRAs with the family's training script, same seed and settings, U-Net and text encoders:
   a plain one (`--cat_weight 0`) and a CAT one (`--cat_weight 1`).
3. Print, for each, how far it moved the U-Net's predictions on trigger-free prompts away from the
   base model (drift: lower is better) and how much it lowered the loss on the training images
   (learning: higher is better); then check that diffusers loads the CAT LoRA and reproduces it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

import library  # noqa: F401  (before diffusers: quiets an irrelevant bitsandbytes import warning)
import networks.lora_cat as lora_cat
from library.testing.demo_data import CONCEPT_CAPTIONS, write_demo_dataset
from library.data.image_loading import load_image
from library.cat.preservation import FixedNoise, denoising_loss, prediction_drift
from library.cat.objective import Denoiser
from library.training.noise import training_target
from library.families.sd.models import load_stable_diffusion
from library.families.sdxl.models import load_sdxl
from library.testing.tiny_sd import build_tiny_sd, save_single_file, tiny_config_dir
from library.testing.tiny_sdxl import TINY_SDXL_CONFIG, build_tiny_sdxl, save_sdxl_single_file

ROOT = Path(__file__).resolve().parent
# model -> (training script, tiny model builder, checkpoint writer, loader, architecture folder, file name)
MODELS = {
    "sd1": ("train_network_cat.py", build_tiny_sd, save_single_file, load_stable_diffusion, tiny_config_dir(False),
            "tiny_sd_v1.safetensors"),
    "sdxl": ("sdxl_train_network_cat.py", build_tiny_sdxl, save_sdxl_single_file, load_sdxl, TINY_SDXL_CONFIG,
             "tiny_sdxl.safetensors"),
}
TRIGGER_FREE_PROMPTS = [
    "a photo of a teapot", "a teapot on a table", "a red car in the street", "a portrait of a woman",
    "a bowl of fruit", "a mountain landscape at sunset", "a dog running on the beach", "a city at night",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="plain LoRA vs CAT on the built-in tiny model")
    parser.add_argument("--output_dir", default="demo_output")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", choices=sorted(MODELS), default="sd1", help="the tiny model's family (default sd1)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    script, build, save, _, _, file_name = MODELS[args.model]
    checkpoint = out / file_name
    save(build(seed=args.seed), checkpoint)
    data = write_demo_dataset(out / "data", seed=args.seed)
    print(f"built the tiny {args.model} model ({checkpoint}) and a {len(CONCEPT_CAPTIONS)}-image dataset "
          f"({data / 'train'})")

    loras = {name: _train(checkpoint, data, out, name, weight, args) for name, weight in (("plain", 0.0), ("cat", 1.0))}
    _report(checkpoint, data, loras, args.seed, args.model)


def _train(checkpoint: Path, data: Path, out: Path, name: str, cat_weight: float, args) -> Path:
    script, config_dir = MODELS[args.model][0], MODELS[args.model][4]
    command = [
        sys.executable, str(ROOT / script),
        "--pretrained_model_name_or_path", str(checkpoint), "--model_config", str(config_dir),
        "--train_data_dir", str(data / "train"), "--caption_extension", ".txt", "--resolution", "64",
        "--output_dir", str(out), "--output_name", f"demo_{name}",
        "--network_module", "networks.lora_cat", "--network_dim", "4", "--network_alpha", "4",
        "--learning_rate", "2e-3", "--optimizer_type", "AdamW", "--lr_scheduler", "constant",
        "--max_train_steps", str(args.steps), "--train_batch_size", "2", "--seed", str(args.seed),
        "--cat_trigger", "sks", "--cat_weight", str(cat_weight), "--max_data_loader_n_workers", "0",
    ]
    print(f"\ntraining the {name} LoRA (--cat_weight {cat_weight}, {args.steps} steps):")
    subprocess.run(command, check=True)
    return out / f"demo_{name}.safetensors"


def _load(checkpoint: Path, model: str):
    load, config_dir = MODELS[model][3], MODELS[model][4]
    return load(checkpoint, model_config=config_dir)


def _report(checkpoint: Path, data: Path, loras: dict[str, Path], seed: int, model: str) -> None:
    sd = _load(checkpoint, model)
    denoiser = sd.denoiser()
    images = sorted((data / "train").glob("*/*.png"))
    latents = sd.latents_from_vae(sd.vae.encode(torch.stack([load_image(p, (64, 64)) for p in images])).latent_dist.mean)
    captions = [p.with_suffix(".txt").read_text().strip() for p in images]
    train_ids = sd.tokenize(captions)
    free_ids = sd.tokenize(TRIGGER_FREE_PROMPTS)
    free_latents = torch.randn((len(TRIGGER_FREE_PROMPTS), *latents.shape[1:]), generator=torch.Generator().manual_seed(seed))
    train_noise = FixedNoise.draw(tuple(latents.shape), seed + 1)
    free_noise = FixedNoise.draw(tuple(free_latents.shape), seed + 2)
    target = training_target(sd.noise_scheduler, latents, train_noise.noise, train_noise.timesteps)
    base_loss = denoising_loss(denoiser, train_ids, latents, train_noise, sd.noise_scheduler, target)

    results = {}
    for name, path in loras.items():
        network, _ = lora_cat.create_network_from_weights(1.0, path, sd.vae, sd.network_text_encoder, sd.unet)
        network.apply_to(sd.network_text_encoder, sd.unet)
        network.load_weights(path)
        drift = prediction_drift(denoiser, network, free_ids, free_latents, free_noise, sd.noise_scheduler)
        learned = base_loss - denoising_loss(denoiser, train_ids, latents, train_noise, sd.noise_scheduler, target)
        results[name] = (drift, learned)
        if name == "cat":
            ours = _predict(denoiser, free_ids, free_latents)
        network.restore()
    gap = _diffusers_gap(_load(checkpoint, model), loras["cat"], free_ids, free_latents, ours)

    print("\n                        drift on trigger-free prompts   training-loss drop")
    for name, (drift, learned) in results.items():
        print(f"  {name:<8} LoRA       {drift:>22.6f}   {learned:>18.6f}")
    (plain_drift, plain_learned), (cat_drift, cat_learned) = results["plain"], results["cat"]
    print(f"  CAT / plain          {cat_drift / plain_drift:>22.2f}x  {cat_learned / plain_learned:>17.2f}x")
    print(f"diffusers' load_lora_weights of demo_cat.safetensors reproduces our U-Net output to {gap:.1e}")
    print("CAT keeps trigger-free predictions closer to the base model while still learning the trigger."
          if cat_drift < plain_drift else "warning: CAT did not reduce drift in this run.")


@torch.no_grad()
def _predict(denoiser: Denoiser, ids: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    return denoiser.predict(latents, torch.full((latents.shape[0],), 500), denoiser.encode(ids))


def _diffusers_gap(sd, lora: Path, ids: torch.Tensor, latents: torch.Tensor, ours: torch.Tensor) -> float:
    """Load the LoRA the way users of diffusers do (into freshly loaded models) and compare its U-Net output with ours."""
    pipe = sd.pipeline()
    pipe.load_lora_weights(str(lora))
    theirs = _predict(sd.denoiser(), ids, latents)  # the pipeline shares these models
    return (theirs - ours).abs().max().item()


if __name__ == "__main__":
    main()
