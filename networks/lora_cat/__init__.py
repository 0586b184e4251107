"""`networks.lora_cat`: a drop-in `--network_module` for kohya sd-scripts (LoRA / LoCon for SD 1.x, 2.x and SDXL;
LoRA for FLUX.1).

    accelerate launch train_network_cat.py --network_module networks.lora_cat --network_dim 16 ...

The whole adapter lives in this folder and imports nothing of the CAT trainer's `library` package
(sd-scripts has a `library` package of its own): copy the folder into an sd-scripts checkout's
`networks/` and `--network_module networks.lora_cat` works there too. Its parts:

- `network`: `create_network`, `create_network_from_weights`, `LoRANetwork` (the contract's entry points);
- `layer` and `lora_math`: one adapter on one Linear/Conv2d, and its pure math; `fused_layer`: one
  adapter over the Linears of one fused layer (FLUX.1's qkv and linear1 on diffusers' split model);
- `targets`, `sgm_names` and `flux_names`: which layers are adapted and their kohya names (SDXL's U-Net
  in Stability's layout, FLUX.1's transformer in Black Forest Labs', as sd-scripts names them);
- `network_args` and `block_lr`: `--network_args` parsing, sd-scripts' block-wise lr weights;
- `fit`: does a file fit the model (its family, then each layer's shapes);
- `file_format` and `metadata`: kohya LoRA files, `ss_*`/`modelspec.*` metadata and the sshs hashes;
- `errors`: `UserInputError`, the one exception for user mistakes (the trainer raises it too).

May import: torch, safetensors, the standard library, and its own modules (relative imports only).
"""

from .network import LoRANetwork, create_network, create_network_from_weights

__all__ = ["LoRANetwork", "create_network", "create_network_from_weights"]
