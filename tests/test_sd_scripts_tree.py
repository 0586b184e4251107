"""`networks/lora_cat/` copied alone into an sd-scripts checkout works as `--network_module networks.lora_cat`.

The test builds an sd-scripts-shaped tree (its own `library` package, a `networks/` namespace folder
with sd-scripts' `lora.py`) and runs this same file there as a script, in a subprocess whose only
path to our code is the copied folder. The script does with the module what sd-scripts'
`train_network.py` does and prints a JSON summary, on which the test asserts.
"""

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Just enough of sd-scripts that `library` and `networks` are clearly its packages, not ours.
SD_SCRIPTS_STUBS = {
    "library/__init__.py": "",
    "library/train_util.py": '"""Stands for sd-scripts\' train_util.py."""\nSD_SCRIPTS = True\n',
    "networks/lora.py": '"""Stands for sd-scripts\' networks/lora.py."""\nSD_SCRIPTS = True\n',
}


def _sd_scripts_tree(root: Path) -> Path:
    """sd-scripts' layout, `networks/` without `__init__.py`, plus our adapter folder as the README says to copy it."""
    for name, text in SD_SCRIPTS_STUBS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    shutil.copytree(REPO / "networks" / "lora_cat", root / "networks" / "lora_cat",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


def test_lora_cat_trains_saves_and_reloads_inside_an_sd_scripts_tree(tmp_path):
    tree = _sd_scripts_tree(tmp_path / "sd-scripts")
    # -P (safe path): this file's folder is not put on sys.path, so PYTHONPATH=tree is the only way
    # to our code; -s keeps the user's site-packages out.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(PYTHONPATH=str(tree), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-P", "-s", str(Path(__file__).resolve()), str(REPO)],
        cwd=tree, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, f"the probe failed in the sd-scripts tree:\n{result.stdout}\n{result.stderr}"
    summary = json.loads(result.stdout.strip().splitlines()[-1])

    assert summary["library_file"] == str(tree / "library" / "__init__.py")
    assert summary["lora_cat_file"] == str(tree / "networks" / "lora_cat" / "__init__.py")
    assert summary["modules_from_repo"] == []
    assert summary["unet_loras"] > 0 and summary["text_encoder_loras"] > 0 and summary["conv_loras"] > 0
    assert summary["other_names"] == []
    assert summary["optimizer_groups"] > 0
    assert summary["parameters_changed"] > 0
    assert summary["trained_differs_from_base"] is True
    assert summary["multiplier_0_equals_base"] is True
    assert summary["file_tensors"] == summary["network_tensors"]
    assert summary["reload_missing_keys"] == [] and summary["reload_unexpected_keys"] == []
    assert summary["reloaded_tensors_equal"] is True
    assert summary["reloaded_output_equals_trained"] is True


# --- the probe: runs inside the sd-scripts tree, never inside pytest -------------------------------


def _tiny_sd(config_dir: Path, seed: int = 0):
    """The tiny SD1 model from our configs with seeded weights, built without our `library`."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config_dir, subfolder="unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(config_dir, subfolder="vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(config_dir, subfolder="text_encoder"))
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)  # sd-scripts freezes the base model; only the adapters train
    return vae, text_encoder, unet


def _inputs(unet):
    import torch

    gen = torch.Generator().manual_seed(7)
    cfg = unet.config
    latents = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    token_ids = torch.randint(0, 49408, (2, 77), generator=gen)
    return latents, torch.tensor([10, 500]), token_ids


def _predict(text_encoder, unet, inputs):
    latents, timesteps, token_ids = inputs
    return unet(latents, timesteps, encoder_hidden_states=text_encoder(token_ids)[0]).sample


def _probe(repo: Path) -> dict:
    """What sd-scripts' train_network.py does with a network module, on the tiny model."""
    import torch

    import library

    # Fail before anything else if the names resolve to our repository instead of the tree.
    if importlib.util.find_spec("library.errors") is not None or importlib.util.find_spec("library.train_util") is None:
        raise RuntimeError(f"`library` is not sd-scripts' stub here: {library.__file__}")
    importlib.import_module("networks.lora")  # sd-scripts' own module beside ours in the namespace folder

    network_module = importlib.import_module("networks.lora_cat")
    config_dir = repo / "configs" / "models" / "tiny_sd_v1"
    vae, text_encoder, unet = _tiny_sd(config_dir)
    inputs = _inputs(unet)
    with torch.no_grad():
        base = _predict(text_encoder, unet, inputs)

    # Build, attach and train one step, as the training loop does.
    network = network_module.create_network(1.0, 4, 4, vae, text_encoder, unet, conv_dim="4")
    network.apply_to(text_encoder, unet, True, True)
    network.prepare_grad_etc(text_encoder, unet)
    network.on_epoch_start(text_encoder, unet)
    params, _descriptions = network.prepare_optimizer_params(1e-4, 1e-4, 1e-4)
    optimizer = torch.optim.AdamW(params)
    before = {name: p.detach().clone() for name, p in network.named_parameters()}
    loss = torch.nn.functional.mse_loss(_predict(text_encoder, unet, inputs), torch.zeros_like(base))
    loss.backward()
    optimizer.step()
    changed = sum(not torch.equal(before[name], p) for name, p in network.named_parameters())

    # The switch: multiplier 0 is the bare model, bitwise.
    with torch.no_grad():
        trained = _predict(text_encoder, unet, inputs)
        network.set_multiplier(0)
        off = _predict(text_encoder, unet, inputs)
        network.set_multiplier(1.0)

    # Save, then rebuild from the file on a fresh copy of the model, as a later run or a user does.
    file = Path.cwd() / "lora_cat_probe.safetensors"
    network.save_weights(file, torch.float32, {"ss_network_module": "networks.lora_cat"})
    vae2, text_encoder2, unet2 = _tiny_sd(config_dir)
    reloaded, weights_sd = network_module.create_network_from_weights(1.0, file, vae2, text_encoder2, unet2)
    reloaded.apply_to(text_encoder2, unet2, True, True)
    info = reloaded.load_weights(file)
    with torch.no_grad():
        reloaded_output = _predict(text_encoder2, unet2, inputs)

    names = [lora.lora_name for lora in network.all_loras]
    saved, reread = network.state_dict(), reloaded.state_dict()
    tensors_equal = saved.keys() == reread.keys() and all(torch.equal(saved[k], reread[k]) for k in saved)
    return {
        "library_file": library.__file__,
        "lora_cat_file": network_module.__file__,
        "modules_from_repo": _modules_from(repo),
        "unet_loras": sum(name.startswith("lora_unet_") for name in names),
        "text_encoder_loras": sum(name.startswith("lora_te_") for name in names),
        "conv_loras": sum(w.dim() == 4 and w.shape[-1] > 1 for k, w in saved.items() if k.endswith("lora_down.weight")),
        "other_names": [name for name in names if not name.startswith(("lora_unet_", "lora_te_"))],
        "optimizer_groups": len(params),
        "parameters_changed": changed,
        "trained_differs_from_base": not torch.equal(trained, base),
        "multiplier_0_equals_base": torch.equal(off, base),
        "file_tensors": len(weights_sd),
        "network_tensors": len(saved),
        "reload_missing_keys": info["missing_keys"],
        "reload_unexpected_keys": info["unexpected_keys"],
        "reloaded_tensors_equal": tensors_equal,
        "reloaded_output_equals_trained": torch.equal(reloaded_output, trained),
    }


def _modules_from(repo: Path) -> list[str]:
    """Imported modules from our repository's code (this script, also aliased as `__mp_main__`, aside)."""
    ours = [repo / "library", repo / "networks", repo / "tests"]
    return sorted(
        name for name, module in list(sys.modules.items())
        if module is not sys.modules["__main__"] and getattr(module, "__file__", None)
        and any(Path(module.__file__).resolve().is_relative_to(folder) for folder in ours)
    )


if __name__ == "__main__":
    print(json.dumps(_probe(Path(sys.argv[1]))))
