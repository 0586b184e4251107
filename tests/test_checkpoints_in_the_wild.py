"""Single-file checkpoints as users have them: pruned "no-VAE" files, and 2022-era training `.ckpt` files.

The files are written here from the tiny model (`library.testing.tiny_sd`) the way those checkpoints
were written, and read back through `load_stable_diffusion`, as a user's checkpoint is.
"""

import builtins
import os
import pickle
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy
import numpy.core.multiarray  # where numpy 1.x pickles name their scalar constructor
import pytest
import torch
from diffusers.models.model_loading_utils import load_state_dict as diffusers_load_state_dict
from safetensors.torch import load_file

from library.errors import UserInputError
from library.families.sd.family import StableDiffusionModels
from library.families.sd.models import load_stable_diffusion
from library.testing.tiny_sd import build_tiny_sd, ldm_state_dict, tiny_config_dir, write_state_dict

VAE_PREFIX = "first_stage_model."
LIGHTNING_MODULE = "pytorch_lightning.callbacks.model_checkpoint"


@torch.no_grad()
def _outputs(models: StableDiffusionModels) -> dict[str, torch.Tensor]:
    """Text-encoder hidden states, U-Net prediction and VAE reconstruction on fixed inputs."""
    generator = torch.Generator().manual_seed(0)
    ids = models.tokenizer(["a photo of sks dog"], padding="max_length", return_tensors="pt").input_ids
    image = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    cross = torch.randn(1, 77, models.unet.config.cross_attention_dim, generator=generator)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    return {
        "text": models.text_encoder(ids).last_hidden_state,
        "unet": models.unet(latents, torch.tensor([500]), cross).sample,
        "vae": models.vae.decode(models.vae.encode(image).latent_dist.mean).sample,
    }


def _assert_same_outputs(expected: StableDiffusionModels, actual: StableDiffusionModels) -> None:
    expected_outputs, actual_outputs = _outputs(expected), _outputs(actual)
    for name, tensor in expected_outputs.items():
        torch.testing.assert_close(actual_outputs[name], tensor, rtol=0, atol=1e-6, msg=f"{name} differs")


@pytest.fixture(scope="module")
def reference(tiny_sd_v1_files) -> StableDiffusionModels:
    """The tiny SD1 model as its .safetensors file loads."""
    return load_stable_diffusion(tiny_sd_v1_files.safetensors, model_config=tiny_config_dir())


# --- pruned checkpoints without VAE weights -----------------------------------------------------


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory) -> Path:
    """A diffusers VAE folder with other weights than the tiny model's, as users pass to --vae."""
    folder = tmp_path_factory.mktemp("vae") / "vae"
    build_tiny_sd(seed=7).vae.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference_with_vae_flag(tiny_sd_v1_files, vae_folder) -> StableDiffusionModels:
    """The full tiny SD1 .safetensors loaded with --vae."""
    return load_stable_diffusion(tiny_sd_v1_files.safetensors, vae=vae_folder, model_config=tiny_config_dir())


def _write_without_vae(tmp_path: Path, suffix: str) -> Path:
    """The tiny SD1 model as a pruned checkpoint: every `first_stage_model.` key dropped."""
    state_dict = ldm_state_dict(build_tiny_sd(seed=0))
    path = tmp_path / f"pruned-novae{suffix}"
    write_state_dict({key: value for key, value in state_dict.items() if not key.startswith(VAE_PREFIX)}, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_checkpoint_without_vae_loads_with_vae_flag(tmp_path, vae_folder, reference_with_vae_flag, suffix):
    path = _write_without_vae(tmp_path, suffix)
    models = load_stable_diffusion(path, vae=vae_folder, model_config=tiny_config_dir())
    _assert_same_outputs(reference_with_vae_flag, models)
    other_vae = build_tiny_sd(seed=7).vae.state_dict()
    assert all(torch.equal(tensor, other_vae[key]) for key, tensor in models.vae.state_dict().items())


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_checkpoint_without_vae_and_without_vae_flag_asks_for_it(tmp_path, suffix):
    path = _write_without_vae(tmp_path, suffix)
    with pytest.raises(UserInputError, match=rf"{path.name} has no VAE weights.*pass --vae"):
        load_stable_diffusion(path, model_config=tiny_config_dir())


def test_vae_flag_leaves_the_checkpoints_own_vae_unchecked(
    tiny_sd_v1_files, tmp_path, vae_folder, reference_with_vae_flag
):
    """A VAE that does not fit the config is refused, but with --vae it is not looked at."""
    state_dict = load_file(tiny_sd_v1_files.safetensors)
    state_dict[VAE_PREFIX + "encoder.conv_in.weight"] = torch.zeros(5, 3, 3, 3)
    path = tmp_path / "odd_vae.safetensors"
    write_state_dict(state_dict, path)
    with pytest.raises(UserInputError, match=r"VAE in .*odd_vae\.safetensors does not fit"):
        load_stable_diffusion(path, model_config=tiny_config_dir())
    models = load_stable_diffusion(path, vae=vae_folder, model_config=tiny_config_dir())
    _assert_same_outputs(reference_with_vae_flag, models)


# --- 2022-era training checkpoints --------------------------------------------------------------


def _fake_lightning_class(monkeypatch: pytest.MonkeyPatch) -> type:
    """A class that pickles as Lightning's ModelCheckpoint, with modules standing in for Lightning's
    (pickle looks the class up by name to check it), which stay until `monkeypatch` is undone."""
    cls = type("ModelCheckpoint", (), {"__module__": LIGHTNING_MODULE, "__qualname__": "ModelCheckpoint"})
    parts = LIGHTNING_MODULE.split(".")
    for depth in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:depth]), types.ModuleType(".".join(parts[:depth])))
    monkeypatch.setattr(sys.modules[LIGHTNING_MODULE], "ModelCheckpoint", cls, raising=False)
    return cls


def _callback_state(cls: type, layout: str) -> dict:
    """`checkpoint["callbacks"]`: Lightning < 1.5 keyed it by the class; a pickled callback object has attributes."""
    state = {"monitor": None, "best_model_score": torch.tensor(0.25), "best_model_path": "logs/last.ckpt"}
    if layout == "class-key":
        return {cls: state}
    callback = cls()
    callback.__dict__.update(state, save_top_k=-1, dirpath="logs/checkpoints")
    return {"ModelCheckpoint{'monitor': None}": callback}


class _Numpy1Pickler(pickle.Pickler):
    """Pickles numpy scalars as numpy 1.x did: through numpy.core.multiarray.scalar."""

    def reducer_override(self, obj):
        if isinstance(obj, numpy.generic):
            return numpy.core.multiarray.scalar, (obj.dtype, obj.tobytes())
        return NotImplemented


def _numpy1_pickle_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A pickle module for torch.save that names numpy.core.multiarray.scalar, as numpy 1.x pickles do."""
    real_scalar = numpy.core.multiarray.scalar

    def scalar(*args):
        return real_scalar(*args)

    scalar.__module__, scalar.__qualname__ = "numpy.core.multiarray", "scalar"
    monkeypatch.setattr(numpy.core.multiarray, "scalar", scalar)
    module = types.ModuleType("numpy1_pickle")
    module.Pickler = _Numpy1Pickler
    return module


def _write_training_checkpoint(path: Path, state_dict: dict, numpy_names: str, layout: str, **extra) -> Path:
    """A .ckpt laid out as the 2022 Lightning training scripts saved them."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        checkpoint = {
            "epoch": 6,
            "global_step": numpy.int64(470000),
            "pytorch-lightning_version": "1.4.2",
            "state_dict": state_dict,
            "callbacks": _callback_state(_fake_lightning_class(monkeypatch), layout),
            "optimizer_states": [],
            "lr_schedulers": [],
            **extra,
        }
        pickle_module = _numpy1_pickle_module(monkeypatch) if numpy_names == "numpy1" else pickle
        torch.save(checkpoint, path, pickle_module=pickle_module)
    return path


@pytest.mark.parametrize("layout", ["class-key", "callback-object"])
@pytest.mark.parametrize("numpy_names", ["numpy1", "numpy2"])
def test_lightning_checkpoint_with_numpy_step_loads(tiny_sd_v1_files, tmp_path, reference, numpy_names, layout):
    path = tmp_path / "sd-v1-train.ckpt"
    _write_training_checkpoint(path, load_file(tiny_sd_v1_files.safetensors), numpy_names, layout)
    expected_name = "numpy.core.multiarray" if numpy_names == "numpy1" else "numpy._core.multiarray"
    globals_named = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    assert {f"{expected_name}.scalar", f"{LIGHTNING_MODULE}.ModelCheckpoint"} <= set(globals_named)
    modules_before = set(sys.modules)
    models = load_stable_diffusion(path, model_config=tiny_config_dir())
    _assert_same_outputs(reference, models)
    assert not [name for name in set(sys.modules) - modules_before if "lightning" in name]  # nothing imported


class _RunsCommand:
    """A pickle payload: unpickling it calls `function(argument)`, which must never happen."""

    def __init__(self, function, argument) -> None:
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


def _payloads(marker: Path) -> dict[str, tuple[object, str]]:
    """Each attack, and a pattern for the global the refusal must name (pickle protocol 2 writes
    subprocess.Popen under its Python 2 module name, commands.Popen)."""
    command = f"echo pwned > {marker}"
    return {
        "os.system": (_RunsCommand(os.system, command), rf"{os.system.__module__}\.system"),
        "builtins.eval": (_RunsCommand(builtins.eval, f"open({str(marker)!r}, 'w').write('pwned')"), r"builtins\.eval"),
        "arbitrary class": (_RunsCommand(subprocess.Popen, ["sh", "-c", command]), r"\w+\.Popen"),
    }


@pytest.mark.parametrize("attack", ["os.system", "builtins.eval", "arbitrary class"])
def test_training_checkpoint_that_runs_code_is_refused(tiny_sd_v1_files, tmp_path, attack):
    marker = tmp_path / "FILE"
    payload, named = _payloads(marker)[attack]
    path = tmp_path / "malicious.ckpt"
    state_dict = load_file(tiny_sd_v1_files.safetensors)
    _write_training_checkpoint(path, state_dict, "numpy1", "class-key", hyper_parameters=payload)
    with pytest.raises(UserInputError, match=r"malicious\.ckpt was refused and not executed") as refusal:
        load_stable_diffusion(path, model_config=tiny_config_dir())
    assert re.search(rf"asks for {named}\. ", str(refusal.value))  # and for none of the allowed globals
    assert not marker.exists()


# --- why the reader is ours ---------------------------------------------------------------------


def test_diffusers_reader_says_the_same_for_a_refused_and_a_damaged_pickle(tmp_path):
    """checkpoint_file keeps its own reader because diffusers' (safe as well) loses which failure it was.

    If this starts failing, diffusers tells the two apart and the reader could be delegated to it.
    """
    marker = tmp_path / "FILE"
    refused = tmp_path / "refused.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCommand(os.system, f"echo pwned > {marker}")}, refused)
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(b"this is not a checkpoint")
    messages = []
    for path in (refused, damaged):
        with pytest.raises(OSError) as failure:
            diffusers_load_state_dict(str(path))
        messages.append(str(failure.value).replace(path.name, "FILE.ckpt"))
    assert messages[0] == messages[1]
    assert not marker.exists()
    ours = []
    for path in (refused, damaged):
        with pytest.raises(UserInputError) as failure:
            load_stable_diffusion(path)
        ours.append(str(failure.value))
    assert "refused and not executed: only pickles of plain tensors are read" in ours[0]
    assert f"asks for {os.system.__module__}.system." in ours[0]
    assert "could not be read" in ours[1]
