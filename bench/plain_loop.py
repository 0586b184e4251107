"""The plain LoRA training loop that `bench/trainer_overhead.py` holds our trainer against.

    .venv/bin/python -m bench.plain_loop CHECKPOINT MODEL_CONFIG IMAGE_FOLDER OUTPUT_FILE STEPS

The same work as `train_network_cat.py --cat_weight 0` on a folder of images with `.txt` captions,
done as directly as possible: the checkpoint loaded with our loader, `networks.lora_cat` attached
(rank 4, alpha 4, U-Net and text encoder), and each step: read and decode the batch's images (PIL ->
tensor in [-1, 1]), VAE encode (the batch in one call), tokenize and encode the captions, noise,
U-Net, MSE, backward, gradient clipping at norm 1.0 (sd-scripts' `--max_grad_norm` default, and ours),
AdamW step; the LoRA saved at the end. Prints `STEP <unix time> <process CPU time>` after each
optimizer step.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import library  # noqa: F401  (before diffusers, as the trainer does)
import networks.lora_cat as lora_cat
from library.families.sd.models import load_stable_diffusion

BATCH = 2


def load_pixels(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array * 2.0 - 1.0).permute(2, 0, 1)


def main(checkpoint: str, model_config: str, images: str, output: str, steps: int) -> None:
    torch.manual_seed(0)
    sd = load_stable_diffusion(checkpoint, model_config=model_config)
    network = lora_cat.create_network(1.0, 4, 4, sd.vae, sd.text_encoder, sd.unet)
    network.apply_to(sd.text_encoder, sd.unet, True, True)
    network.prepare_grad_etc(sd.text_encoder, sd.unet)
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    paths = sorted(p for folder in Path(images).iterdir() for p in folder.glob("*.png"))
    scheduler = sd.noise_scheduler
    for step in range(steps):
        chosen = [paths[(step * BATCH + i) % len(paths)] for i in range(BATCH)]
        pixels = torch.stack([load_pixels(p) for p in chosen])
        captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in chosen]
        with torch.no_grad():
            latents = sd.vae.encode(pixels).latent_dist.sample() * sd.vae.config.scaling_factor
        ids = sd.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        states = sd.text_encoder(ids).last_hidden_state
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (BATCH,))
        prediction = sd.unet(scheduler.add_noise(latents, noise, timesteps), timesteps, states).sample
        loss = torch.nn.functional.mse_loss(prediction, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"STEP {time.time():.6f} {time.process_time():.6f}", flush=True)
    network.save_weights(output, None, None)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
