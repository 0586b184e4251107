"""LyCORIS (`--network_module lycoris.kohya`, PyPI lycoris-lora) LoCon, LoHa and LoKr through our trainer:
CAT's reference is the bare model after training, the CLI trains and the file loads back, DoRA is refused."""

import copy

import lycoris.kohya
import pytest
import torch

import train_network_cat
from library.cat.objective import CATBatch, base_prediction
from library.cli.train_args import parse_args
from library.errors import UserInputError
from library.families.sd.models import load_stable_diffusion
from library.testing.tiny_cli import tiny_sd_argv, write_tiny_sd_workspace
from library.testing.tiny_sd import build_tiny_sd, tiny_config_dir
from library.training.network_guard import OffProbe
from library.training.network_setup import build_network, optimizer_groups
from networks.lora_cat.file_format import read_lora_file

CPU = torch.device("cpu")
ALGOS = ["locon", "loha", "lokr"]
pytestmark = pytest.mark.usefixtures("lycoris_preset_state")  # conftest.py


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return write_tiny_sd_workspace(tmp_path_factory.mktemp("lycoris"))


def _argv(workspace, out, *extra):
    return tiny_sd_argv(workspace, out, "--max_train_steps", "3", "--cat_weight", "1", "--network_module", "lycoris.kohya",
                        *extra)


def _batch(models, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(models.latent_shape(2, 64, 64), generator=generator)
    return CATBatch(
        noisy_latents=latents, timesteps=torch.tensor([50, 800]), target=torch.randn(latents.shape, generator=generator),
        trigger_ids=models.tokenize(["a photo of sks teapot", "sks teapot on a table"]),
        free_ids=models.tokenize(["a photo of teapot", "teapot on a table"]), weights=torch.ones(2),
    )


def _predict(models, ids, batch):
    denoiser = models.denoiser()
    with torch.no_grad():
        return denoiser.predict(batch.noisy_latents, batch.timesteps, denoiser.encode(ids))


@pytest.mark.parametrize("algo", ALGOS)
def test_reference_at_multiplier_0_is_the_bare_model_after_a_training_step(workspace, algo):
    models = build_tiny_sd(seed=0)
    bare = copy.deepcopy(models)
    config = parse_args(_argv(workspace, workspace / "unused", "--network_args", f"algo={algo}", "preset=attn-mlp"))
    network = build_network(config, models, CPU)
    groups, _ = optimizer_groups(network, config)
    optimizer = torch.optim.SGD(groups, lr=0.5)
    for group in optimizer.param_groups:
        group["lr"] = 0.5  # one large step moves the zero-initialised factors
    batch = _batch(models)
    denoiser = models.denoiser()
    loss = (denoiser.predict(batch.noisy_latents, batch.timesteps, denoiser.encode(batch.trigger_ids))
            - batch.target).square().mean()
    loss.backward()
    optimizer.step()

    base = _predict(bare, batch.free_ids, batch)
    assert (_predict(models, batch.free_ids, batch) - base).abs().max() > 1e-4, "the step moved the adapters"
    reference = base_prediction(denoiser, network, batch)
    assert (reference - base).abs().max() <= 1e-6
    assert OffProbe.of_bare_model(bare, CPU).check(network, algo) <= 1e-6
    assert network.multiplier == 1.0


@pytest.mark.parametrize("algo", ALGOS)
def test_cli_trains_and_the_file_loads_back(workspace, tmp_path, algo):
    out = tmp_path / "out"
    assert train_network_cat.main(_argv(workspace, out, "--network_args", f"algo={algo}", "preset=attn-mlp")) == 0
    path = out / "cat.safetensors"
    tensors, metadata = read_lora_file(path)
    assert metadata["ss_network_module"] == "lycoris.kohya" and metadata["ss_steps"] == "3"

    sd = load_stable_diffusion(workspace / "tiny.safetensors", model_config=tiny_config_dir(False))
    bare = copy.deepcopy(sd)
    network, _ = lycoris.kohya.create_network_from_weights(1.0, str(path), sd.vae, sd.text_encoder, sd.unet)
    network.apply_to(sd.text_encoder, sd.unet, True, True)
    network.load_weights(str(path))
    state = network.state_dict()
    assert sorted(state) == sorted(tensors)
    assert all(torch.equal(state[key], tensors[key]) for key in tensors)
    assert any(key.startswith("lora_te_") for key in tensors) and any(key.startswith("lora_unet_") for key in tensors)

    batch = _batch(sd, seed=1)
    base = _predict(bare, batch.trigger_ids, batch)
    assert (_predict(sd, batch.trigger_ids, batch) - base).abs().max() > 1e-6, "the file holds trained adapters"
    network.set_multiplier(0.0)
    assert (_predict(sd, batch.trigger_ids, batch) - base).abs().max() <= 1e-6


@pytest.mark.parametrize("algo", ALGOS)
def test_dora_is_refused_with_the_measured_difference(workspace, algo):
    config = parse_args(_argv(workspace, workspace / "unused", "--network_args", f"algo={algo}", "preset=attn-mlp",
                              "dora_wd=true"))
    with pytest.raises(UserInputError) as refused:
        build_network(config, build_tiny_sd(seed=0), CPU)
    message = str(refused.value)
    assert message.startswith(f"--network_module lycoris.kohya --network_args algo={algo} preset=attn-mlp dora_wd=true: "
                              "at multiplier 0 this network is not the base model (max |off - base| = ")
    assert float(message.split("max |off - base| = ")[1].split(" ")[0]) > 0.01
    assert "LyCORIS' DoRA (dora_wd=true) keeps its weight decomposition at multiplier 0: drop dora_wd." in message


def test_cli_refuses_dora_with_a_sentence(workspace, tmp_path, capsys):
    argv = _argv(workspace, tmp_path / "out", "--network_args", "algo=locon", "preset=attn-mlp", "dora_wd=true")
    assert train_network_cat.main(argv) == 2
    err = capsys.readouterr().err
    assert "error: --network_module lycoris.kohya" in err and "not the base model" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "cat.safetensors").exists()
